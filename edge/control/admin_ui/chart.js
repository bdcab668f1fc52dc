// Stacked bar charts as SVG, drawn by the page (no library: the admin pages load nothing from
// anywhere else, under a CSP that allows only this origin's scripts and styles).
//
// Each series has a fill colour and a pattern, so the chart reads without colour; each bar is
// focusable and names its numbers (aria-label), and hovering or focusing one shows them in
// the chart's caption line.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 720;
const HEIGHT = 200;
const PAD = { top: 10, right: 10, bottom: 24, left: 48 };

export const numbers = new Intl.NumberFormat("en");
const compact = new Intl.NumberFormat("en", { notation: "compact" }); // axis labels: 20M

function node(tag, attrs = {}) {
  const n = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) n.setAttribute(name, String(value));
  return n;
}

// Pattern fills, by series index: solid, diagonal hatching, dots, cross-hatching.
function pattern(color, i, pid) {
  const p = node("pattern", { id: pid, width: 6, height: 6, patternUnits: "userSpaceOnUse" });
  p.append(node("rect", { width: 6, height: 6, fill: color }));
  const ink = "rgba(255,255,255,0.75)";
  if (i % 4 === 1) p.append(node("path", { d: "M-1,7 L7,-1", stroke: ink, "stroke-width": 1.5 }));
  if (i % 4 === 2) p.append(node("circle", { cx: 3, cy: 3, r: 1.3, fill: ink }));
  if (i % 4 === 3) p.append(node("path", { d: "M0,3 H6 M3,0 V6", stroke: ink, "stroke-width": 1.2 }));
  return p;
}

function niceMax(value) {
  if (value <= 5) return 5;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (step * power >= value) return step * power;
  }
  return 10 * power;
}

// A legend: a swatch with the series' pattern and its name, per series.
export function legend(series, id) {
  const list = document.createElement("ul");
  list.className = "legend";
  series.forEach((s, i) => {
    const item = document.createElement("li");
    const swatch = node("svg", { width: 14, height: 14, "aria-hidden": "true" });
    const defs = node("defs");
    defs.append(pattern(s.color, i, `${id}-legend-p${i}`));
    swatch.append(defs, node("rect", { width: 14, height: 14, fill: `url(#${id}-legend-p${i})` }));
    item.append(swatch, document.createTextNode(` ${s.label}`));
    list.append(item);
  });
  return list;
}

// `rows`: [{label, title, values: {key: number}}]; `series`: [{key, label, color}].
// `caption`: the element that shows the focused bar's numbers.
export function stackedBars(rows, series, { id, title, caption }) {
  const svg = node("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "chart", role: "group", "aria-label": title,
  });
  const defs = node("defs");
  series.forEach((s, k) => defs.append(pattern(s.color, k, `${id}-p${k}`)));
  svg.append(defs);
  const totals = rows.map((r) => series.reduce((sum, s) => sum + (r.values[s.key] || 0), 0));
  const top = niceMax(Math.max(0, ...totals));
  const plotW = WIDTH - PAD.left - PAD.right;
  const plotH = HEIGHT - PAD.top - PAD.bottom;
  const y = (v) => PAD.top + plotH - (v / top) * plotH;

  for (const tick of [0, top / 2, top]) {
    svg.append(node("line", {
      x1: PAD.left, x2: WIDTH - PAD.right, y1: y(tick), y2: y(tick), class: "grid",
    }));
    const text = node("text", { x: PAD.left - 6, y: y(tick) + 4, "text-anchor": "end", class: "axis" });
    text.textContent = compact.format(tick);
    svg.append(text);
  }

  const slot = plotW / Math.max(rows.length, 1);
  const barW = Math.max(2, slot * 0.72);
  const labelEvery = Math.ceil(rows.length / 8);
  rows.forEach((row, i) => {
    const x = PAD.left + i * slot + (slot - barW) / 2;
    const parts = series.map((s) => `${numbers.format(row.values[s.key] || 0)} ${s.label}`);
    const said = `${row.title}: ${parts.join(", ")}`;
    const bar = node("g", { class: "bar", tabindex: 0, role: "img", "aria-label": said });
    bar.dataset.start = row.start;
    const tip = node("title");
    tip.textContent = said;
    bar.append(tip);
    // an invisible full-height target, so a bar of zeros can be hovered and focused too
    bar.append(node("rect", { x, y: PAD.top, width: barW, height: plotH, class: "hit" }));
    let base = 0;
    series.forEach((s, k) => {
      const value = row.values[s.key] || 0;
      if (value > 0) {
        bar.append(node("rect", {
          x, width: barW, y: y(base + value), height: Math.max(1, y(base) - y(base + value)),
          fill: `url(#${id}-p${k})`, class: `seg seg-${s.key}`,
        }));
      }
      base += value;
    });
    const show = () => { caption.textContent = said; };
    bar.addEventListener("mouseenter", show);
    bar.addEventListener("focus", show);
    svg.append(bar);
    if (i % labelEvery === 0) {
      const text = node("text", { x: x + barW / 2, y: HEIGHT - 6, "text-anchor": "middle", class: "axis" });
      text.textContent = row.label;
      svg.append(text);
    }
  });
  return svg;
}
