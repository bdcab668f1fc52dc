// The usage views: today's overview above the key table, and a key's detail (its requests per
// day for 30 days or per hour for 48 hours, stacked by outcome, tokens beside them when the key
// is metered, its previous secret's use during a rotation grace, its last 20 audit entries).

import { api } from "./api.js";
import { legend, numbers, stackedBars } from "./chart.js";
import { ago, el, isoTime, showError } from "./render.js";

const $ = (id) => document.getElementById(id);
const OUTCOMES = [
  { key: "requests", label: "admitted", color: "#1f6feb" },
  { key: "rate_limited", label: "rate-limited", color: "#c4661f" },
  { key: "rejected", label: "rejected", color: "#8250df" },
];
const TOKENS = [
  { key: "input_tokens", label: "input tokens", color: "#1a7f37" },
  { key: "output_tokens", label: "output tokens", color: "#9a6700" },
];
const n = (value) => numbers.format(value ?? 0);

// ---- the overview ----------------------------------------------------------------------

function stat(label, value, detail) {
  const box = el("div", null, "stat");
  box.append(el("span", label, "stat-label"), el("strong", value, "stat-value"));
  if (detail) box.append(el("span", detail, "note"));
  return box;
}

export async function loadOverview(onOpen) {
  try {
    const top = await api.top({ limit: "10" });
    const day = { from: top.date, to: top.date };
    const all = (await api.usageSum(day)).totals;
    const asked = all.requests + all.rate_limited + all.rejected;
    const share = asked ? `${((100 * all.rate_limited) / asked).toFixed(1)} %` : "0 %";
    $("overview-date").textContent = top.date;
    $("overview-stats").replaceChildren(
      stat("Requests today", n(all.requests)),
      stat("Rate-limited", share, `${n(all.rate_limited)} of ${n(asked)}`),
      stat("Rejected", n(all.rejected)),
      stat("Tokens today", n(all.input_tokens + all.output_tokens),
        `${n(all.input_tokens)} in, ${n(all.output_tokens)} out`),
    );
    $("busiest-body").replaceChildren(...top.data.map((row) => busiestRow(row, onOpen)));
    $("busiest-empty").hidden = top.data.length > 0;
    showError($("overview-error"), "");
  } catch (err) {
    showError($("overview-error"), err.message);
    throw err;
  }
}

function busiestRow(row, onOpen) {
  const tr = el("tr");
  const id = el("td");
  const open = el("button", row.id, "link");
  open.type = "button";
  open.setAttribute("aria-label", `Usage of key ${row.id}`);
  open.addEventListener("click", () => onOpen(row.id));
  id.append(open);
  tr.append(
    id, el("td", row.name), el("td", row.owner), el("td", row.plan),
    el("td", n(row.requests)), el("td", n(row.rate_limited)), el("td", n(row.rejected)),
    el("td", n(row.input_tokens + row.output_tokens)),
  );
  return tr;
}

// ---- a key's detail --------------------------------------------------------------------

const detail = { id: null, granularity: "day" };

export async function openDetail(id) {
  detail.id = id;
  detail.granularity = "day";
  $("detail-title").textContent = `Key ${id}`;
  for (const target of ["detail-summary", "detail-previous", "detail-charts", "audit-body"]) {
    $(target).replaceChildren();
  }
  showError($("detail-error"), "");
  if (!$("detail-dialog").open) $("detail-dialog").showModal();
  await Promise.all([showRecord(), showUsage(), showAudit()]);
}

async function showRecord() {
  try {
    const rec = await api.key(detail.id);
    if (rec.name) $("detail-title").textContent = `Key ${rec.id} · ${rec.name}`;
    const used = rec.last_used ? `${ago(rec.last_used)} (${isoTime(rec.last_used)})` : "never";
    $("detail-summary").replaceChildren(
      el("span", `plan ${rec.plan}`), el("span", rec.status),
      el("span", rec.owner ? `owner ${rec.owner}` : "no owner"),
      el("span", `last used ${used}`),
      el("span", `${n(rec.requests)} requests in all`),
    );
    const previous = $("detail-previous");
    if (rec.previous_key_valid_until) {
      const until = rec.previous_key_valid_until;
      const last = rec.previous_key_last_used;
      previous.replaceChildren(
        el("strong", "Previous secret"),
        el("span", ` valid until ${isoTime(until)} (${ago(until)}): `),
        el("span", `${n(rec.previous_key_requests)} requests since the rotation`, "prev-count"),
        el("span", last ? `, last used ${ago(last)} (${isoTime(last)})` : ", not used since"),
      );
      previous.hidden = false;
    } else {
      previous.hidden = true;
    }
  } catch (err) {
    showError($("detail-error"), err.message);
  }
}

function rowsOf(data, granularity) {
  return data.map((row) => {
    const day = row.start.slice(0, 10);
    const hour = row.start.slice(11, 16);
    return {
      start: row.start,
      label: granularity === "day" ? day.slice(5) : hour,
      title: granularity === "day" ? day : `${day} ${hour} UTC`,
      values: row,
    };
  });
}

const utcDate = (date) => date.toISOString().slice(0, 10);

// By hour: the days that hold the last 48 hours (three UTC dates), then those 48 up to now.
function hourParams() {
  const now = new Date();
  return {
    granularity: "hour",
    from: utcDate(new Date(now.getTime() - 47 * 3600 * 1000)),
    to: utcDate(now),
  };
}

function hourWindow(data) {
  const now = new Date();
  now.setUTCMinutes(0, 0, 0);
  const stamp = now.toISOString().replace(".000Z", "Z");
  return data.filter((row) => row.start <= stamp).slice(-48);
}

async function showUsage() {
  const charts = $("detail-charts");
  try {
    const params = detail.granularity === "day" ? { granularity: "day" } : hourParams();
    const usage = await api.usage(detail.id, params);
    const data = detail.granularity === "day" ? usage.data : hourWindow(usage.data);
    const rows = rowsOf(data, detail.granularity);
    const span = detail.granularity === "day" ? "per day, last 30 days" : "per hour, last 48 hours";
    const caption = el("p", "Hover over or focus a bar for its numbers.", "chart-caption");
    caption.setAttribute("aria-live", "polite");
    const requests = stackedBars(rows, OUTCOMES, {
      id: "requests-chart", title: `Requests ${span}`, caption,
    });
    const totals = usage.totals;
    const parts = [el("h3", `Requests ${span}`), legend(OUTCOMES, "requests-chart"), requests];
    if (data.some((row) => row.input_tokens || row.output_tokens)) {
      const tokens = stackedBars(rows, TOKENS, {
        id: "tokens-chart", title: `LLM tokens ${span}`, caption,
      });
      parts.push(el("h3", `LLM tokens ${span}`), legend(TOKENS, "tokens-chart"), tokens);
    }
    const sum = el("p", null, "totals");
    sum.textContent = `In these ${data.length} ${detail.granularity}s: ${n(totals.requests)} admitted,`
      + ` ${n(totals.rate_limited)} rate-limited, ${n(totals.rejected)} rejected,`
      + ` ${n(totals.input_tokens + totals.output_tokens)} tokens, ${n(totals.credits)} credits.`;
    charts.replaceChildren(...parts, caption, sum);
    for (const button of document.querySelectorAll("#detail-range button")) {
      button.setAttribute("aria-pressed", String(button.dataset.granularity === detail.granularity));
    }
  } catch (err) {
    showError($("detail-error"), err.message);
  }
}

async function showAudit() {
  try {
    const page = await api.audit({ key: detail.id, limit: "20" });
    $("audit-body").replaceChildren(...page.data.map((entry) => {
      const tr = el("tr");
      const when = el("td", ago(entry.time));
      when.title = isoTime(entry.time);
      tr.append(when, el("td", entry.action), el("td", entry.actor),
        el("td", JSON.stringify(entry.changes)));
      return tr;
    }));
    $("audit-empty").hidden = page.data.length > 0;
  } catch (err) {
    showError($("detail-error"), err.message);
  }
}

for (const button of document.querySelectorAll("#detail-range button")) {
  button.addEventListener("click", async () => {
    detail.granularity = button.dataset.granularity;
    await showUsage();
  });
}
