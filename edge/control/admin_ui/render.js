// DOM building for the dashboard. Every value from the server is set with textContent (or as
// a form control's value), never as HTML, so a key named `<img onerror=…>` is just text.

const relative = new Intl.RelativeTimeFormat("en", { numeric: "auto" });
const count = new Intl.NumberFormat("en"); // 50,000: numbers for people
const STEPS = [
  ["year", 31536000], ["month", 2592000], ["day", 86400],
  ["hour", 3600], ["minute", 60], ["second", 1],
];

export function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

export function ago(unixSeconds) {
  if (!unixSeconds) return "never";
  const delta = unixSeconds - Date.now() / 1000;
  for (const [unit, size] of STEPS) {
    if (Math.abs(delta) >= size || unit === "second") {
      return relative.format(Math.round(delta / size), unit);
    }
  }
  return "now";
}

export function isoTime(unixSeconds) {
  return new Date(unixSeconds * 1000).toISOString().replace(".000Z", "Z");
}

function cell(text, title) {
  const td = el("td", text);
  if (title) td.title = title;
  return td;
}

function limitCell(effective, override) {
  const td = cell(effective === null || effective === undefined ? "—" : count.format(effective));
  if (override !== null && override !== undefined) {
    td.append(el("span", " (key)", "note"));
  }
  return td;
}

function todayCell(rec) {
  const td = el("td");
  if (!rec.rpd) return cell("—");
  const used = Math.max(0, Math.min(rec.day_used ?? 0, rec.rpd));
  const bar = el("progress");
  bar.max = rec.rpd;
  bar.value = used;
  bar.setAttribute("aria-label", `${count.format(used)} of ${count.format(rec.rpd)} requests today`);
  td.append(bar, el("span", ` ${count.format(used)}/${count.format(rec.rpd)}`, "note"));
  return td;
}

function button(label, onClick) {
  const b = el("button", label);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}

// One <tr> for a key record; `on` maps an action name to its handler (record → void).
export function keyRow(rec, on) {
  const tr = el("tr");
  tr.dataset.id = rec.id;
  if (rec.status === "revoked") tr.className = "revoked";
  const id = el("td");
  const open = el("button", null, "link");
  open.type = "button";
  open.append(el("code", rec.id));
  open.setAttribute("aria-label", `Usage of key ${rec.id}`);
  open.addEventListener("click", () => on.open(rec));
  id.append(open);
  const expires = rec.expires === null ? "never" : isoTime(rec.expires).slice(0, 16);
  tr.append(
    id,
    cell(rec.name),
    cell(rec.owner),
    cell(rec.plan),
    statusCell(rec),
    limitCell(rec.rpm, rec.rpm_override),
    limitCell(rec.rpd, rec.rpd_override),
    limitCell(rec.tpm, rec.tpm_override),
    limitCell(rec.tpd, rec.tpd_override),
    cell(count.format(rec.requests)),
    cell(count.format(rec.tokens ?? 0)),
    todayCell(rec),
    cell(ago(rec.last_used), rec.last_used ? isoTime(rec.last_used) : ""),
    cell(rec.credits === null ? "unlimited" : count.format(rec.credits)),
    cell(expires),
  );
  const actions = el("td", null, "row-actions");
  if (rec.status !== "revoked") {
    const pausing = rec.status === "active";
    actions.append(
      button(pausing ? "Pause" : "Resume", () => on[pausing ? "pause" : "resume"](rec)),
      button("Rotate", () => on.rotate(rec)),
      button("Edit", () => on.edit(rec)),
      button("Revoke", () => on.revoke(rec)),
    );
  } else {
    actions.append(el("span", "revoked", "note"));
  }
  tr.append(actions);
  return tr;
}

// The status, and whether the key's limits are only observed (shadow): said in words, so it
// does not rest on colour.
function statusCell(rec) {
  const td = cell(rec.status);
  if (rec.shadow) {
    const badge = el("span", "shadow", "badge");
    badge.title = "Shadow: the limits are counted, not enforced";
    td.append(" ", badge);
  }
  return td;
}

export function planRow(plan) {
  const tr = el("tr");
  const limit = (value) => (value === null || value === undefined ? "—" : count.format(value));
  tr.append(
    cell(plan.plan), cell(limit(plan.rpm)), cell(limit(plan.rpd)), cell(limit(plan.tpm)),
    cell(limit(plan.tpd)), cell(plan.shadow ? "shadow" : "enforced"),
  );
  return tr;
}

export function showError(node, message) {
  node.textContent = message || "";
  node.hidden = !message;
}
