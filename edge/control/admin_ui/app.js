// The dashboard: sign in with the admin token, see today's usage, list keys page by page,
// open a key's usage, create, pause, resume, rotate, revoke and edit keys over the admin API.
// A new key is shown once, then wiped.

import { api, ApiError, forget, remember, token } from "./api.js";
import { keyRow, planRow, showError } from "./render.js";
import { loadOverview, openDetail } from "./usage.js";

const $ = (id) => document.getElementById(id);
const state = { cursor: null, filters: {}, plans: [] };

// ---- signing in and out ---------------------------------------------------------------

async function start() {
  if (!token()) return showSignIn();
  try {
    state.plans = (await api.plans()).data;
  } catch (err) {
    forget();
    return showSignIn(err instanceof ApiError && err.status === 401
      ? "That admin token is not valid." : err.message);
  }
  $("sign-in-view").hidden = true;
  $("app-view").hidden = false;
  $("sign-out").hidden = false;
  renderPlans();
  await Promise.all([loadKeys(true), overview()]);
}

async function overview() {
  try {
    await loadOverview(showDetail);
  } catch (err) {
    handle(err, $("overview-error"));
  }
}

async function showDetail(id) {
  try {
    await openDetail(id);
  } catch (err) {
    handle(err, $("detail-error"));
  }
}

function showSignIn(message) {
  $("app-view").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in-view").hidden = false;
  $("keys-body").replaceChildren();
  showError($("sign-in-error"), message);
  $("admin-token").focus();
}

$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("admin-token");
  remember(input.value.trim());
  input.value = "";
  await start();
});

$("sign-out").addEventListener("click", () => {
  forget();
  showSignIn();
});

// ---- listing --------------------------------------------------------------------------

function renderPlans() {
  $("plans-body").replaceChildren(...state.plans.map(planRow));
  const select = $("create-plan");
  select.replaceChildren(...state.plans.map((p) => new Option(p.plan, p.plan)));
}

async function loadKeys(fresh) {
  if (fresh) state.cursor = null;
  const params = { limit: "100", ...state.filters };
  if (state.cursor) params.cursor = state.cursor;
  try {
    const page = await api.keys(params);
    const rows = page.data.map((rec) => keyRow(rec, handlers));
    if (fresh) $("keys-body").replaceChildren(...rows);
    else $("keys-body").append(...rows);
    state.cursor = page.next_cursor;
    $("load-more").hidden = !state.cursor;
    $("keys-empty").hidden = $("keys-body").children.length > 0;
    showError($("keys-error"), "");
  } catch (err) {
    handle(err, $("keys-error"));
  }
}

$("filters").addEventListener("submit", async (event) => {
  event.preventDefault();
  const owner = $("filter-owner").value.trim();
  const status = $("filter-status").value;
  state.filters = {};
  if (owner) state.filters.owner = owner;
  if (status) state.filters.status = status;
  await loadKeys(true);
});

$("load-more").addEventListener("click", () => loadKeys(false));

function replaceRow(rec) {
  const row = $("keys-body").querySelector(`tr[data-id="${CSS.escape(rec.id)}"]`);
  const fresh = keyRow(rec, handlers);
  if (row) row.replaceWith(fresh);
  else $("keys-body").prepend(fresh);
  $("keys-empty").hidden = true;
}

// An expired or changed admin token signs the page out instead of failing quietly.
function handle(err, where) {
  if (err instanceof ApiError && err.status === 401) {
    forget();
    showSignIn("The admin token is no longer accepted; sign in again.");
    return;
  }
  showError(where, err.message);
}

// ---- dialogs --------------------------------------------------------------------------

function open(dialog, errorNode) {
  showError(errorNode, "");
  dialog.showModal();
}

for (const cancel of document.querySelectorAll("dialog .cancel")) {
  cancel.addEventListener("click", () => cancel.closest("dialog").close());
}

function whole(input) {
  return input.value === "" ? null : Number(input.value);
}

// The one place a plaintext key is ever shown; closing the dialog wipes it from the page.
function showKey(key) {
  const field = $("new-key-value");
  field.value = key;
  $("copy-status").textContent = "";
  $("key-dialog").showModal();
  field.select();
}

function wipeKey() {
  $("new-key-value").value = "";
  $("copy-status").textContent = "";
}

// Close wipes the key before the dialog goes; Escape closes it too, and the close event wipes.
$("close-key").addEventListener("click", wipeKey);
$("key-dialog").addEventListener("close", wipeKey);

$("copy-key").addEventListener("click", async () => {
  const field = $("new-key-value");
  try {
    await navigator.clipboard.writeText(field.value);
  } catch {
    field.select();
    document.execCommand("copy");
  }
  $("copy-status").textContent = "Copied.";
});

$("new-key").addEventListener("click", () => {
  $("create-form").reset();
  open($("create-dialog"), $("create-error"));
});

$("create-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const fields = { plan: $("create-plan").value };
  for (const name of ["name", "owner"]) {
    const value = $(`create-${name}`).value.trim();
    if (value) fields[name] = value;
  }
  for (const name of ["rpm", "rpd", "tpm", "tpd", "credits"]) {
    const value = whole($(`create-${name}`));
    if (value !== null) fields[name] = value;
  }
  const expires = $("create-expires").value;
  if (expires) fields.expires_at = Math.floor(new Date(expires).getTime() / 1000);
  try {
    const created = await api.create(fields);
    const { key, ...record } = created;
    $("create-dialog").close();
    replaceRow(record);
    showKey(key);
  } catch (err) {
    handle(err, $("create-error"));
  }
});

let target = null; // the record the open dialog acts on

$("rotate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const rotated = await api.act(target.id, "rotate", { grace_seconds: whole($("rotate-grace")) ?? 0 });
    const { key, ...record } = rotated;
    $("rotate-dialog").close();
    replaceRow(record);
    showKey(key);
  } catch (err) {
    handle(err, $("rotate-error"));
  }
});

$("revoke-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    replaceRow(await api.act(target.id, "revoke"));
    $("revoke-dialog").close();
  } catch (err) {
    handle(err, $("revoke-error"));
  }
});

$("edit-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const fields = {
    rpm: whole($("edit-rpm")),
    rpd: whole($("edit-rpd")),
    tpm: whole($("edit-tpm")),
    tpd: whole($("edit-tpd")),
    credits: whole($("edit-credits")),
  };
  const shadow = { plan: null, enforced: false, shadow: true }[$("edit-shadow").value];
  if (shadow !== (target.shadow_override ?? null)) fields.shadow = shadow;
  try {
    replaceRow(await api.update(target.id, fields));
    $("edit-dialog").close();
  } catch (err) {
    handle(err, $("edit-error"));
  }
});

const handlers = {
  open: (rec) => showDetail(rec.id),
  pause: (rec) => status(rec, "pause"),
  resume: (rec) => status(rec, "resume"),
  rotate: (rec) => {
    target = rec;
    $("rotate-grace").value = "0";
    $("rotate-title").textContent = `Rotate key ${rec.id}`;
    open($("rotate-dialog"), $("rotate-error"));
  },
  revoke: (rec) => {
    target = rec;
    $("revoke-title").textContent = `Revoke key ${rec.id}`;
    open($("revoke-dialog"), $("revoke-error"));
  },
  edit: (rec) => {
    target = rec;
    $("edit-rpm").value = rec.rpm_override ?? "";
    $("edit-rpd").value = rec.rpd_override ?? "";
    $("edit-tpm").value = rec.tpm_override ?? "";
    $("edit-tpd").value = rec.tpd_override ?? "";
    $("edit-credits").value = rec.credits ?? "";
    const override = rec.shadow_override;
    $("edit-shadow").value = override === null ? "plan" : override ? "shadow" : "enforced";
    $("edit-title").textContent = `Limits and credits of ${rec.id}`;
    open($("edit-dialog"), $("edit-error"));
  },
};

async function status(rec, action) {
  try {
    replaceRow(await api.act(rec.id, action));
  } catch (err) {
    handle(err, $("keys-error"));
  }
}

start();
