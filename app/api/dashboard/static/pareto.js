// The Pareto plot: every candidate by size (x) and ONNX Runtime latency p50 (y), coloured by
// quality, the Pareto-optimal ones outlined and joined, the chosen one ringed, the fp32
// baseline as a grey square, the size and latency limits as dashed lines. Plain SVG.

const NS = "http://www.w3.org/2000/svg";
const W = 680, H = 420;                        // viewBox, px
const M = { left: 64, right: 120, top: 20, bottom: 48 };

// Viridis at 5 stops: perceptually even, readable in grey and by most colour-blind readers.
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

export function qualityColour(t) {
  const x = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2);
  const f = x - i;
  const c = VIRIDIS[i].map((v, k) => Math.round(v + f * (VIRIDIS[i + 1][k] - v)));
  return `rgb(${c.join(",")})`;
}

function el(tag, attrs = {}, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

// A log axis when the values span more than 5x (a 0.03 MB int8 model beside a 1 MB fp32 one),
// else a linear one with some padding.
function scale(values, lo, hi) {
  let min = Math.min(...values), max = Math.max(...values);
  const log = min > 0 && max / min > 5;
  if (log) {
    const a = Math.log10(min) - 0.08, b = Math.log10(max) + 0.08;
    return { log, min: 10 ** a, max: 10 ** b, at: (v) => lo + (Math.log10(v) - a) / (b - a) * (hi - lo) };
  }
  const pad = (max - min) * 0.1 || Math.abs(max) * 0.1 || 1;
  min = Math.max(0, min - pad);
  max += pad;
  return { log, min, max, at: (v) => lo + (v - min) / (max - min) * (hi - lo) };
}

function ticks(s) {
  if (s.log) {
    const out = [];
    for (let e = Math.floor(Math.log10(s.min)); e <= Math.ceil(Math.log10(s.max)); e++) {
      for (const m of [1, 2, 5]) {
        const v = m * 10 ** e;
        if (v >= s.min && v <= s.max) out.push(v);
      }
    }
    return out;
  }
  const step0 = (s.max - s.min) / 5;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((x) => x >= step0);
  const out = [];
  for (let v = Math.ceil(s.min / step) * step; v <= s.max + 1e-12; v += step) out.push(v);
  return out;
}

const fmt = (v) => (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v >= 1 ? v.toFixed(2)
  : v.toPrecision(2));

// points: [{index, sizeKB, latencyMs, quality, feasible, label}]; front: set of indices;
// chosen: index or null; baseline: {sizeKB, latencyMs, quality} or null;
// limits: {sizeKB, latencyMs} (either may be null); qualityName: legend title.
export function paretoSvg({ points, front, chosen, baseline, limits, qualityName }) {
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "pareto", role: "img",
                          "aria-label": "Pareto plot: size against latency, coloured by quality" });
  const all = [...points];
  if (baseline) all.push(baseline);
  const xs = all.map((p) => p.sizeKB), ys = all.map((p) => p.latencyMs);
  if (limits.sizeKB) xs.push(limits.sizeKB);
  if (limits.latencyMs) ys.push(limits.latencyMs);
  const sx = scale(xs, M.left, W - M.right);
  const sy = scale(ys, H - M.bottom, M.top);

  const grid = el("g", { class: "grid" });
  for (const v of ticks(sx)) {
    const x = sx.at(v);
    grid.append(el("line", { x1: x, x2: x, y1: M.top, y2: H - M.bottom }));
    grid.append(el("text", { x, y: H - M.bottom + 16, "text-anchor": "middle" }, fmt(v)));
  }
  for (const v of ticks(sy)) {
    const y = sy.at(v);
    grid.append(el("line", { x1: M.left, x2: W - M.right, y1: y, y2: y }));
    grid.append(el("text", { x: M.left - 6, y: y + 4, "text-anchor": "end" }, fmt(v)));
  }
  svg.append(grid);
  svg.append(el("text", { class: "axis-title", x: (M.left + W - M.right) / 2, y: H - 8,
                          "text-anchor": "middle" },
                `model.onnx size, KB${sx.log ? " (log)" : ""}`));
  svg.append(el("text", { class: "axis-title", x: 14, y: (M.top + H - M.bottom) / 2,
                          "text-anchor": "middle",
                          transform: `rotate(-90 14 ${(M.top + H - M.bottom) / 2})` },
                `latency p50, ms${sy.log ? " (log)" : ""}`));

  if (limits.sizeKB) {
    const x = sx.at(limits.sizeKB);
    svg.append(el("line", { class: "limit", x1: x, x2: x, y1: M.top, y2: H - M.bottom }));
    svg.append(el("text", { class: "limit-label", x: x + 4, y: M.top + 12 }, "max size"));
  }
  if (limits.latencyMs) {
    const y = sy.at(limits.latencyMs);
    svg.append(el("line", { class: "limit", x1: M.left, x2: W - M.right, y1: y, y2: y }));
    svg.append(el("text", { class: "limit-label", x: W - M.right - 4, y: y - 4,
                            "text-anchor": "end" }, "max latency"));
  }

  const qs = all.map((p) => p.quality).filter((q) => Number.isFinite(q));
  const qmin = Math.min(...qs), qmax = Math.max(...qs);
  const t = (q) => (qmax > qmin ? (q - qmin) / (qmax - qmin) : 1);

  const onFront = points.filter((p) => front.has(p.index)).sort((a, b) => a.sizeKB - b.sizeKB);
  if (onFront.length > 1) {
    svg.append(el("polyline", { class: "front-line", points: onFront.map(
      (p) => `${sx.at(p.sizeKB)},${sy.at(p.latencyMs)}`).join(" ") }));
  }
  if (baseline) {
    const x = sx.at(baseline.sizeKB), y = sy.at(baseline.latencyMs);
    const g = el("g", { class: "baseline" });
    g.append(el("rect", { x: x - 6, y: y - 6, width: 12, height: 12 }));
    // Labelled on the side with room: the baseline is usually the largest, rightmost mark.
    const right = x > (M.left + W - M.right) / 2;
    g.append(el("text", { x: right ? x - 10 : x + 10, y: y + 4,
                          "text-anchor": right ? "end" : "start" }, "fp32 baseline"));
    g.append(el("title", {}, `baseline: ${baseline.label}`));
    svg.append(g);
  }
  // The chosen point last, so nothing covers its ring.
  const order = [...points].sort((a, b) => (a.index === chosen) - (b.index === chosen));
  for (const p of order) {
    const x = sx.at(p.sizeKB), y = sy.at(p.latencyMs);
    const cls = ["point", front.has(p.index) ? "front" : "", p.feasible ? "" : "infeasible",
                 p.index === chosen ? "chosen" : ""].filter(Boolean).join(" ");
    const g = el("g", { class: cls, "data-index": p.index });
    if (p.index === chosen) {
      g.append(el("circle", { class: "chosen-ring", cx: x, cy: y, r: 13 }));
      g.append(el("text", { class: "chosen-label", x: x + 16, y: y - 10 }, "chosen"));
    }
    g.append(el("circle", { cx: x, cy: y, r: 7, fill: qualityColour(t(p.quality)) }));
    g.append(el("title", {}, p.label));
    svg.append(g);
  }

  // Legend: the colour ramp of quality, then the marks.
  const lx = W - M.right + 28, ly = M.top + 10, lh = 150;
  const defs = el("defs");
  const grad = el("linearGradient", { id: "quality-ramp", x1: 0, y1: 1, x2: 0, y2: 0 });
  VIRIDIS.forEach((c, i) => grad.append(el("stop", {
    offset: i / (VIRIDIS.length - 1), "stop-color": `rgb(${c.join(",")})` })));
  defs.append(grad);
  svg.append(defs);
  const legend = el("g", { class: "legend" });
  legend.append(el("text", { x: lx - 8, y: ly - 2 }, qualityName));
  legend.append(el("rect", { x: lx, y: ly + 6, width: 14, height: lh, fill: "url(#quality-ramp)" }));
  legend.append(el("text", { x: lx + 20, y: ly + 16 }, `${(qmax * 100).toFixed(1)} %`));
  legend.append(el("text", { x: lx + 20, y: ly + lh + 6 }, `${(qmin * 100).toFixed(1)} %`));
  const ky = ly + lh + 34;
  legend.append(el("circle", { class: "chosen-ring", cx: lx + 7, cy: ky, r: 9 }));
  legend.append(el("text", { x: lx + 22, y: ky + 4 }, "chosen"));
  legend.append(el("circle", { class: "key-front", cx: lx + 7, cy: ky + 24, r: 6 }));
  legend.append(el("text", { x: lx + 22, y: ky + 28 }, "Pareto"));
  legend.append(el("circle", { class: "key-infeasible", cx: lx + 7, cy: ky + 48, r: 6 }));
  legend.append(el("text", { x: lx + 22, y: ky + 52 }, "infeasible"));
  svg.append(legend);
  return svg;
}
