// Charts drawn as plain SVG: a line chart over time, grouped bars, a share bar and a
// sparkline. Each function returns a new <svg> element; the caller swaps it in.

const NS = "http://www.w3.org/2000/svg";

export function svg(tag, attributes = {}, children = []) {
  const element = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  for (const child of children) element.append(child);
  return element;
}

function text(x, y, content, anchor = "start") {
  const label = svg("text", { x, y, "text-anchor": anchor });
  label.textContent = content;
  return label;
}

export function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

export function format(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "-";
  if (value === 0) return "0";
  const magnitude = Math.abs(value);
  if (magnitude >= 1000) return Math.round(value).toLocaleString("en");
  return Number(value.toPrecision(digits)).toString();
}

// series: [{name, color, points: [[t, y], ...]}]; t in seconds; the x axis spans `span`
// seconds up to `now`.
export function lineChart(series, { now, span = 300, width = 420, height = 140, unit = "" } = {}) {
  const left = 44, right = 8, top = 8, bottom = 18;
  const plotW = width - left - right, plotH = height - top - bottom;
  const values = series.flatMap((s) => s.points.map((p) => p[1])).filter((v) => v !== null);
  const yMax = niceMax(Math.max(0, ...values));
  const x = (t) => left + plotW * (1 - (now - t) / span);
  const y = (v) => top + plotH * (1 - v / yMax);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  for (const fraction of [0, 0.5, 1]) {
    const value = yMax * fraction;
    root.append(svg("line", { class: "axis", x1: left, x2: width - right, y1: y(value), y2: y(value) }));
    root.append(text(left - 4, y(value) + 3, format(value) + unit, "end"));
  }
  root.append(text(left, height - 4, `-${Math.round(span / 60)} min`));
  root.append(text(width - right, height - 4, "now", "end"));
  for (const s of series) {
    let path = "";
    let pen = "M";
    for (const [t, v] of s.points) {
      if (v === null || now - t > span) { pen = "M"; continue; }
      path += `${pen}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      pen = "L";
    }
    if (path) root.append(svg("path", { d: path, fill: "none", stroke: s.color, "stroke-width": 1.6 }));
  }
  const legend = series.length > 1 ? series : [];
  legend.forEach((s, i) => {
    root.append(svg("rect", { x: left + 8 + i * 70, y: top + 2, width: 8, height: 8, fill: s.color }));
    root.append(text(left + 20 + i * 70, top + 10, s.name));
  });
  return root;
}

// Grouped bars: groups [{label, values: [v per series]}], series [{name, color}].
export function barChart(groups, series, { width = 420, height = 170, percent = false, fixed = false } = {}) {
  // A fixed-size chart is a small one (in a table): no y labels and no legend.
  const left = fixed ? 4 : 40, right = 6, top = fixed ? 4 : 18, bottom = fixed ? 14 : 30;
  const plotW = width - left - right, plotH = height - top - bottom;
  const yMax = niceMax(Math.max(0, ...groups.flatMap((g) => g.values)));
  const band = plotW / Math.max(groups.length, 1);
  const barW = Math.max(1, (band * 0.8) / series.length);
  const y = (v) => top + plotH * (1 - v / yMax);
  const size = fixed ? { width, height } : {};
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, ...size, role: "img" });
  for (const fraction of [0, 0.5, 1]) {
    const value = yMax * fraction;
    root.append(svg("line", { class: "axis", x1: left, x2: width - right, y1: y(value), y2: y(value) }));
    if (!fixed) root.append(text(left - 4, y(value) + 3, percent ? `${format(value * 100, 2)}%` : format(value), "end"));
  }
  groups.forEach((group, g) => {
    group.values.forEach((value, s) => {
      const x0 = left + g * band + band * 0.1 + s * barW;
      root.append(svg("rect", {
        x: x0.toFixed(1), y: y(value).toFixed(1), width: barW.toFixed(1),
        height: Math.max(0, top + plotH - y(value)).toFixed(1), fill: series[s].color,
      }));
    });
    const every = Math.ceil(groups.length / 8);
    if (g % every === 0) root.append(text(left + g * band + band / 2, height - bottom + 12, group.label, "middle"));
  });
  if (fixed) return root;
  series.forEach((s, i) => {
    root.append(svg("rect", { x: left + 8 + i * 90, y: 4, width: 8, height: 8, fill: s.color }));
    root.append(text(left + 20 + i * 90, 12, s.name));
  });
  return root;
}

// One horizontal bar split into shares: parts [{name, value, color}]; marker: a
// percentage drawn as a tick (the configured weight).
export function shareBar(parts, { marker = null, width = 600, height = 34 } = {}) {
  const total = parts.reduce((sum, part) => sum + part.value, 0);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img" });
  root.append(svg("rect", { x: 0, y: 4, width, height: 16, fill: "#eef0f3" }));
  let x = 0;
  for (const part of parts) {
    const w = total > 0 ? (width * part.value) / total : 0;
    if (w > 0) root.append(svg("rect", { x: x.toFixed(1), y: 4, width: w.toFixed(1), height: 16, fill: part.color }));
    x += w;
  }
  if (marker !== null) {
    const mx = (width * (100 - marker)) / 100;
    root.append(svg("line", { x1: mx, x2: mx, y1: 0, y2: 24, stroke: "#102a43", "stroke-width": 2 }));
    root.append(text(Math.min(Math.max(mx, 20), width - 20), height - 1, `weight ${format(marker)} %`, "middle"));
  }
  return root;
}

// A small line of values (nulls skipped), for a check's number over time.
export function sparkline(values, { width = 120, height = 24, color = "#2f6fdb" } = {}) {
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img" });
  const finite = values.filter((v) => v !== null && Number.isFinite(v));
  if (finite.length === 0) return root;
  const lo = Math.min(...finite), hi = Math.max(...finite);
  const y = (v) => (hi === lo ? height / 2 : 2 + (height - 4) * (1 - (v - lo) / (hi - lo)));
  const step = values.length > 1 ? width / (values.length - 1) : 0;
  let path = "", pen = "M";
  values.forEach((v, i) => {
    if (v === null || !Number.isFinite(v)) { pen = "M"; return; }
    path += `${pen}${(i * step).toFixed(1)},${y(v).toFixed(1)}`;
    pen = "L";
  });
  root.append(svg("path", { d: path, fill: "none", stroke: color, "stroke-width": 1.4 }));
  return root;
}

// A row of squares, one per look of the judge: green pass, grey continue, red fail.
export function verdictStrip(verdicts, { size = 8, gap = 2 } = {}) {
  const shown = verdicts.slice(-40);
  const width = Math.max(1, shown.length * (size + gap));
  const root = svg("svg", { viewBox: `0 0 ${width} ${size}`, width, height: size, role: "img" });
  const colors = { pass: "#1f9d55", fail: "#d92d20", continue: "#98a2b3" };
  shown.forEach((verdict, i) => {
    root.append(svg("rect", { x: i * (size + gap), y: 0, width: size, height: size, fill: colors[verdict] || "#98a2b3" }));
  });
  return root;
}
