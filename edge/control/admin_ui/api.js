// The admin API, as the dashboard calls it: the token from sessionStorage as a Bearer header on
// every request, never in a cookie or a URL; JSON both ways; errors as ApiError.

const TOKEN_KEY = "edge.adminToken";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function remember(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function forget() {
  sessionStorage.removeItem(TOKEN_KEY);
}

export class ApiError extends Error {
  constructor(status, body) {
    const error = body && body.error ? body.error : {};
    super(error.message || `The server answered ${status}.`);
    this.status = status;
    this.code = error.code || null;
    this.param = error.param || null;
  }
}

// `path` is relative to the admin API (this page is served at /admin/).
export async function call(method, path, body) {
  const headers = { Authorization: `Bearer ${token() || ""}` };
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(new URL(path, document.baseURI), init);
  } catch {
    throw new ApiError(0, { error: { message: "edge could not be reached." } });
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(response.status, data);
  }
  return data;
}

const query = (params) => new URLSearchParams(params || {}).toString();

export const api = {
  plans: () => call("GET", "plans"),
  key: (id) => call("GET", `keys/${encodeURIComponent(id)}`),
  usage: (id, params) => call("GET", `keys/${encodeURIComponent(id)}/usage?${query(params)}`),
  usageSum: (params) => call("GET", `usage?${query(params)}`),
  top: (params) => call("GET", `usage/top?${query(params)}`),
  audit: (params) => call("GET", `audit?${query(params)}`),
  keys: (params) => call("GET", `keys?${new URLSearchParams(params)}`),
  create: (fields) => call("POST", "keys", fields),
  update: (id, fields) => call("PATCH", `keys/${encodeURIComponent(id)}`, fields),
  act: (id, action, body) => call("POST", `keys/${encodeURIComponent(id)}/${action}`, body),
};
