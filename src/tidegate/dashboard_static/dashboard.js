// The dashboard page: asks for a token if the server wants one, reads the summary
// (and the drift report of the version shown) every second, and draws the views.
// Everything from the server is written with textContent, never parsed as HTML.

import { barChart, format, lineChart, shareBar, sparkline, verdictStrip } from "./charts.js";
import { ago, delta, percentile, serverTotals, versionTotals } from "./stats.js";

const POLL_MS = 1000;
const KEEP_S = 300; // the charts' span: five minutes of reads
const TOKEN_KEY = "tidegate.token";
const COLORS = { stable: "#2f6fdb", canary: "#e07b1a", shadow: "#7a5af8", other: "#98a2b3" };
const PRIMARY = {
  validity: "likelihood_ratio", errors: "likelihood_ratio", latency: "ratio",
  predictions: "psi", disagreement: "likelihood_ratio",
};

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  roles: [],
  view: "server",
  server: [], // [{time, requests, failures, buckets}]
  versions: [], // [{time, totals: {"model/version": versionTotals}}]
  checks: {}, // model -> [{key, checks: {name: {verdict, value}}}]
  summary: null,
  driftKey: null,
  driftFeature: null,
  timer: null,
};

const $ = (id) => document.getElementById(id);

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function cell(content, className = "") {
  const td = element("td", className ? { class: className } : {});
  if (content instanceof Node) td.append(content);
  else td.textContent = content ?? "-";
  return td;
}

function badge(value) {
  return element("span", { class: `badge ${value}`, text: String(value).replace("_", " ") });
}

function ms(value) { return value === null ? "-" : `${format(value)} ms`; }
function percent(value) { return value === null || Number.isNaN(value) ? "-" : `${format(value * 100, 2)} %`; }

function duration(seconds) {
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d} d ${h} h`;
  if (h) return `${h} h ${m} min`;
  if (m) return `${m} min ${s % 60} s`;
  return `${s % 60} s`;
}

// -- talking to the server ------------------------------------------------------------

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function call(method, path) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const response = await fetch(path, { method, headers, cache: "no-store" });
  let body = null;
  try { body = await response.json(); } catch { body = null; }
  if (!response.ok) {
    throw new HttpError(response.status, (body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

async function signIn() {
  try {
    const me = await call("GET", "/dashboard/api/whoami");
    state.roles = me.roles;
    $("identity").textContent = me.access_control ? `${me.name}: ${me.roles.join(", ")}` : "no access control";
    $("sign-out").hidden = !me.access_control;
    $("login").hidden = true;
    $("tabs").hidden = false;
    $("views").hidden = false;
    document.body.dataset.roles = me.roles.join(" ");
    poll();
  } catch (error) {
    if (error.status === 401 || error.status === 403) {
      sessionStorage.removeItem(TOKEN_KEY);
      state.token = null;
      $("login").hidden = false;
      $("tabs").hidden = true;
      $("views").hidden = true;
      $("login-error").textContent = error.status === 403 || $("token").value ? error.message : "";
    } else {
      setConnection("error", error.message);
      setTimeout(signIn, POLL_MS);
    }
  }
}

function setConnection(status, title = "") {
  const badgeNode = $("connection");
  badgeNode.dataset.state = status;
  badgeNode.textContent = status === "live" ? "live" : status === "error" ? "unreachable" : status;
  badgeNode.title = title;
}

async function poll() {
  // One chain of reads: a read started now (a view switched) supersedes the one waiting.
  clearTimeout(state.timer);
  state.seq = (state.seq || 0) + 1;
  const mine = state.seq;
  const started = performance.now();
  try {
    const summary = await call("GET", "/dashboard/api/summary");
    record(summary);
    let drift = null;
    if (state.view === "drift" && state.driftKey) {
      const [model, version] = state.driftKey.split("/");
      drift = await call("GET", `/v2/models/${encodeURIComponent(model)}/versions/${encodeURIComponent(version)}/drift`);
    }
    render(summary, drift);
    setConnection("live");
  } catch (error) {
    if (error.status === 401 || error.status === 403) { signIn(); return; }
    setConnection("error", error.message);
  }
  if (mine === state.seq) state.timer = setTimeout(poll, Math.max(0, POLL_MS - (performance.now() - started)));
}

function record(summary) {
  const time = summary.server.time;
  state.summary = summary;
  state.server.push({ time, ...serverTotals(summary.versions) });
  const totals = {};
  for (const v of summary.versions) totals[`${v.model}/${v.version}`] = { time, ...versionTotals(v.stats) };
  state.versions.push({ time, totals });
  for (const list of [state.server, state.versions]) {
    while (list.length > 2 && time - list[0].time > KEEP_S + 10) list.shift();
  }
  for (const [name, model] of Object.entries(summary.models)) {
    const judgement = model.rollout && model.rollout.judgement;
    if (!judgement) continue;
    const looks = (state.checks[name] = state.checks[name] || []);
    const key = JSON.stringify(judgement);
    if (looks.length && looks[looks.length - 1].key === key) continue;
    const checks = {};
    for (const check of judgement.checks) {
      const numbers = check.numbers;
      const primary = PRIMARY[check.name] in numbers ? PRIMARY[check.name] : Object.keys(numbers)[0];
      checks[check.name] = { verdict: check.verdict, value: numbers[primary], primary };
    }
    looks.push({ key, checks });
    if (looks.length > 120) looks.shift();
  }
}

// -- views ------------------------------------------------------------------------------

function render(summary, drift) {
  $("server-version").textContent = `v${summary.server.version}`;
  renderServer(summary);
  renderModels(summary);
  renderTraffic(summary);
  renderRollouts(summary);
  renderDriftChoices(summary);
  if (state.view === "drift") renderDrift(drift);
}

function replaceChart(container, chart) {
  container.replaceChildren(chart);
}

function renderServer(summary) {
  const server = summary.server;
  const bounds = summary.latency_bounds_s;
  $("uptime").textContent = duration(server.uptime_s);
  const restarts = Object.values(server.worker_restarts).reduce((a, b) => a + b, 0);
  $("workers").textContent = server.workers === null ? "-" : `${server.workers}${restarts ? ` (${restarts} restarts)` : ""}`;
  const history = state.server;
  const last = history[history.length - 1];
  const recent = delta(last, ago(history, 5));
  const minute = delta(last, ago(history, 60));
  $("rps").textContent = recent && recent.seconds > 0 ? format(recent.requests / recent.seconds) : "-";
  $("error-rate").textContent = minute && minute.requests > 0 ? percent(minute.failures / minute.requests) : "-";
  $("p50").textContent = minute ? ms(percentile(minute.buckets, bounds, 50)) : "-";
  $("p99").textContent = minute ? ms(percentile(minute.buckets, bounds, 99)) : "-";
  if (state.view !== "server") return;
  const rps = [], p50 = [], p99 = [], errors = [];
  for (let i = 1; i < history.length; i += 1) {
    const step = delta(history[i], history[i - 1]);
    const t = history[i].time;
    rps.push([t, step.seconds > 0 ? step.requests / step.seconds : null]);
    errors.push([t, step.requests > 0 ? (100 * step.failures) / step.requests : null]);
    const window = delta(history[i], history[Math.max(0, i - 5)]);
    p50.push([t, percentile(window.buckets, bounds, 50)]);
    p99.push([t, percentile(window.buckets, bounds, 99)]);
  }
  const now = server.time;
  replaceChart($("chart-rps"), lineChart([{ name: "requests/s", color: COLORS.stable, points: rps }], { now, span: KEEP_S }));
  replaceChart($("chart-latency"), lineChart([
    { name: "p50", color: COLORS.stable, points: p50 },
    { name: "p99", color: COLORS.canary, points: p99 },
  ], { now, span: KEEP_S }));
  replaceChart($("chart-errors"), lineChart([{ name: "errors", color: "#d92d20", points: errors }], { now, span: KEEP_S }));
}

function roleOf(summary, model, version) {
  const traffic = (summary.models[model] || {}).traffic;
  if (!traffic) return "-";
  if (traffic.canary === version) return `canary (${traffic.mode})`;
  if (traffic.stable === version) return "stable";
  return "other";
}

function renderModels(summary) {
  if (state.view !== "models") return;
  const bounds = summary.latency_bounds_s;
  const history = state.versions;
  const last = history[history.length - 1];
  const earlier = ago(history, 5);
  const body = $("models-table").tBodies[0];
  const rows = summary.versions.map((v) => {
    const key = `${v.model}/${v.version}`;
    const now = last.totals[key];
    const window = earlier ? delta(now, earlier.totals[key] || null) : null;
    const per = (value) => (window && window.seconds > 0 ? value / window.seconds : null);
    const sizes = Object.entries(now.runsBySize).sort((a, b) => Number(a[0]) - Number(b[0]));
    const sizeChart = sizes.length
      ? barChart(sizes.map(([size, runs]) => ({ label: size, values: [runs] })), [{ name: "runs", color: COLORS.stable }], { width: 200, height: 44, fixed: true })
      : "-";
    const failures = Object.values(v.stats.failures).reduce((a, b) => a + b, 0);
    return element("tr", { "data-model": v.model, "data-version": v.version },
      cell(v.model), cell(v.version), cell(badge(v.state.toLowerCase())),
      cell(roleOf(summary, v.model, v.version)),
      cell(v.memory_bytes === null ? "-" : `${format(v.memory_bytes / 2 ** 20)} MiB`, "num"),
      cell(`${format(v.load_seconds)} s`, "num"),
      cell(String(v.max_batch_size), "num"),
      cell(format(per(window ? window.requests : null)), "num"),
      cell(window && window.runs > 0 ? format(window.rows / window.runs) : "-", "num"),
      cell(window && window.seconds > 0 ? format(window.queueNs / (window.seconds * 1e9)) : "-", "num"),
      cell(window ? ms(percentile(window.buckets, bounds, 99)) : "-", "num"),
      cell(String(failures), "num"),
      cell(sizeChart));
  });
  body.replaceChildren(...rows);
}

function variantShares(model) {
  const history = state.versions;
  const last = history[history.length - 1];
  const earlier = ago(history, 10);
  const shares = { stable: 0, canary: 0, shadow: 0, other: 0 };
  if (!earlier) return shares;
  for (const [key, totals] of Object.entries(last.totals)) {
    if (!key.startsWith(`${model}/`)) continue;
    const window = delta(totals, earlier.totals[key] || { time: earlier.time, buckets: [] });
    for (const variant of Object.keys(shares)) shares[variant] += window.byVariant[variant];
  }
  return shares;
}

function renderTraffic(summary) {
  if (state.view !== "traffic") return;
  const cards = Object.entries(summary.models).map(([name, model]) => {
    const policy = model.traffic;
    const shares = variantShares(name);
    const answered = shares.stable + shares.canary + shares.other;
    const card = element("div", { class: "card", "data-traffic": name },
      element("h2", { text: name }),
      element("p", {
        text: policy.canary
          ? `stable ${policy.stable}, canary ${policy.canary} at ${format(policy.weight)} % (${policy.mode})`
          : `stable ${policy.stable}, no canary`,
      }));
    const parts = ["stable", "canary", "other"].map((variant) => ({ name: variant, value: shares[variant], color: COLORS[variant] }));
    card.append(shareBar(parts, { marker: policy.canary ? policy.weight : null }));
    const legend = element("p", { class: "legend" });
    for (const part of parts) {
      legend.append(element("span", {}, element("i", { class: part.name }),
        `${part.name} ${answered ? percent(part.value / answered) : "-"} (${part.value})`));
    }
    if (shares.shadow) legend.append(element("span", { text: `shadow copies ${shares.shadow}` }));
    card.append(legend, element("p", { class: "muted", text: "Live shares: requests answered in the last 10 s, by variant." }));
    const window = policy.window;
    if (window) {
      card.append(element("p", {
        class: "muted",
        text: `Step window (${format(window.seconds)} s): stable ${window.stable.requests} requests, ${window.stable.errors} errors; canary ${window.canary.requests} requests, ${window.canary.errors} errors.`,
      }));
    }
    return card;
  });
  $("traffic-list").replaceChildren(...(cards.length ? cards : [element("p", { text: "No model is loaded." })]));
}

function renderRollouts(summary) {
  if (state.view !== "rollout") return;
  const rollouts = Object.entries(summary.models).filter(([, model]) => model.rollout);
  if (!rollouts.length) {
    $("rollout-list").replaceChildren(element("p", { text: "No rollout has been started since the server's state was made." }));
    return;
  }
  $("rollout-list").replaceChildren(...rollouts.map(([name, model]) => rolloutCard(name, model.rollout)));
}

function rolloutCard(name, rollout) {
  const card = element("div", { class: "card", "data-rollout": name, "data-status": rollout.status });
  card.append(element("h2", {},
    `${name}: version ${rollout.canary} against stable ${rollout.stable}, ${rollout.mode} mode `,
    badge(rollout.status)));
  card.append(element("p", { "data-field": "step", text: `step ${rollout.step} of ${rollout.steps.length} at ${format(rollout.weight)} % (steps ${rollout.steps.join(", ")} %), ${format(rollout.seconds_in_step)} s in the step` }));
  card.append(element("p", { "data-field": "reason", text: rollout.reason }));
  const steps = rollout.steps.map((weight, i) => ({
    name: `${weight} %`, value: 1,
    color: i + 1 < rollout.step || rollout.status === "promoted" ? "#1f9d55" : i + 1 === rollout.step ? "#e07b1a" : "#d9dee7",
  }));
  card.append(shareBar(steps, { height: 24 }));
  const looks = state.checks[name] || [];
  if (rollout.judgement) {
    card.append(element("p", { text: `judge: ${rollout.judgement.action}: ${rollout.judgement.reason}` }));
    const table = element("table", { class: "checks" },
      element("thead", {}, element("tr", {}, ...["check", "verdict", "over time", "number", "reason", "numbers"].map((h) => element("th", { text: h })))));
    const body = element("tbody");
    for (const check of rollout.judgement.checks) {
      const series = looks.map((look) => look.checks[check.name]).filter(Boolean);
      const primary = series.length ? series[series.length - 1].primary : null;
      const numbers = Object.entries(check.numbers).map(([k, v]) => `${k}=${v === null ? "-" : format(v, 4)}`).join("  ");
      body.append(element("tr", { "data-check": check.name },
        cell(check.name + (check.critical ? " *" : "")), cell(badge(check.verdict)),
        cell(element("span", {}, verdictStrip(series.map((s) => s.verdict)), " ", sparkline(series.map((s) => s.value)))),
        cell(primary ? `${primary} ${format(check.numbers[primary], 4)}` : "-"),
        cell(check.reason), cell(numbers, "numbers")));
    }
    table.append(body);
    card.append(table, element("p", { class: "muted", text: "* critical: a failure rolls back. Over time: one mark per look of the judge seen by this page." }));
  }
  if (state.roles.includes("operator") && !["promoted", "rolled_back"].includes(rollout.status)) {
    const buttons = element("div", { class: "buttons" });
    for (const action of ["pause", "resume", "promote", "rollback"]) {
      const button = element("button", { type: "button", "data-action": action, text: action });
      if (action === "rollback") button.className = "danger";
      button.disabled = (action === "pause" && rollout.status !== "running") || (action === "resume" && rollout.status !== "paused");
      button.addEventListener("click", () => confirmAction(name, rollout, action));
      buttons.append(button);
    }
    card.append(buttons);
  }
  const message = state.messages && state.messages[name];
  if (message) card.append(element("p", { class: `message ${message.error ? "error" : ""}`, "data-field": "message", text: message.text }));
  const history = element("table", {},
    element("thead", {}, element("tr", {}, ...["time", "action", "actor", "step", "weight", "reason"].map((h) => element("th", { text: h })))));
  const rows = element("tbody");
  for (const entry of [...rollout.history].reverse()) {
    rows.append(element("tr", {},
      cell(new Date(entry.time * 1000).toLocaleTimeString()), cell(entry.action), cell(entry.actor),
      cell(String(entry.step), "num"), cell(`${format(entry.weight)} %`, "num"), cell(entry.reason)));
  }
  history.append(rows);
  card.append(element("h3", { text: "history" }), history);
  return card;
}

function confirmAction(name, rollout, action) {
  const dialog = $("confirm");
  $("confirm-text").textContent = `${action} the rollout of ${name} (version ${rollout.canary} at ${format(rollout.weight)} %, stable ${rollout.stable})?`;
  $("confirm-ok").textContent = action;
  $("confirm-ok").onclick = async () => {
    dialog.close();
    state.messages = state.messages || {};
    try {
      const answer = await call("POST", `/v2/models/${encodeURIComponent(name)}/rollout/${action}`);
      state.messages[name] = { text: `${action}: done, the rollout is ${answer.status}`, error: false };
    } catch (error) {
      state.messages[name] = { text: `${action} refused: ${error.message}`, error: true };
    }
    poll();
  };
  $("confirm-cancel").onclick = () => dialog.close();
  dialog.showModal();
}

function renderDriftChoices(summary) {
  const select = $("drift-version");
  const keys = summary.versions.filter((v) => v.drift).map((v) => `${v.model}/${v.version}`);
  const current = [...select.options].map((o) => o.value);
  if (current.join() !== keys.join()) {
    select.replaceChildren(...keys.map((key) => element("option", { value: key, text: key.replace("/", " version ") })));
  }
  if (!keys.includes(state.driftKey)) state.driftKey = keys[0] || null;
  select.value = state.driftKey || "";
}

// Rows with too little data to judge go last: an empty window's PSI means nothing.
function insufficient(row) { return row.verdict === "insufficient_data" ? 1 : 0; }

function renderDrift(report) {
  const body = $("drift-table").tBodies[0];
  const chart = $("drift-histogram").querySelector(".chart");
  if (!report) { body.replaceChildren(); chart.replaceChildren(); $("drift-summary").textContent = "No version with drift statistics."; return; }
  if (report.state !== "ready") {
    const why = report.state === "collecting_reference"
      ? `collecting the reference from served rows (${report.reference.rows} of ${report.reference_rows_needed})`
      : report.state;
    $("drift-summary").textContent = `${report.model_name} version ${report.model_version}: ${why}`;
    body.replaceChildren();
    chart.replaceChildren();
    return;
  }
  const s = report.summary;
  $("drift-summary").replaceChildren(
    `${report.model_name} version ${report.model_version}: `, badge(s.verdict),
    ` ${format(s.window_rows)} rows in the window, reference ${report.reference.rows} rows (${report.reference.source}); max PSI ${format(s.max_psi)} (${s.max_psi_feature}); ${s.over_warn.length} over warn, ${s.over_alert.length} over alert`);
  const rows = [
    ...report.inputs.map((row) => ({ ...row, kind: "input" })),
    ...report.outputs.map((row) => ({ ...row, kind: "output" })),
    ...report.classes.map((row) => ({ ...row, kind: "classes" })),
  ].sort((a, b) => insufficient(a) - insufficient(b) || b.psi - a.psi);
  // The top row is shown until a row is clicked; then that one, while it exists.
  if (!state.driftPinned || !rows.some((row) => row.name === state.driftFeature)) {
    state.driftFeature = rows.length ? rows[0].name : null;
  }
  body.replaceChildren(...rows.map((row) => {
    const tr = element("tr", { "data-feature": row.name, class: `band-${row.band}`, "aria-selected": String(row.name === state.driftFeature) },
      cell(row.name), cell(row.kind), cell(format(row.psi, 3), "num"), cell(badge(row.band)), cell(badge(row.verdict)),
      cell(format(row.js_distance ?? null), "num"), cell(format(row.ks ?? null), "num"),
      cell(format(row.mean_shift_sigma ?? null), "num"), cell(format(row.rows), "num"));
    tr.addEventListener("click", () => {
      state.driftFeature = row.name;
      state.driftPinned = true;
      renderDrift(report);
    });
    return tr;
  }));
  const selected = rows.find((row) => row.name === state.driftFeature);
  $("drift-histogram-title").textContent = selected ? `${selected.name}: share of rows per bin, reference vs window` : "";
  if (selected && selected.bins) {
    const edges = selected.bins.edges;
    const groups = selected.bins.reference.map((reference, i) => ({
      label: i === 0 ? `<${format(edges[0])}` : i === edges.length ? `>${format(edges[edges.length - 1])}` : format(edges[i - 1]),
      values: [reference, selected.bins.window[i]],
    }));
    chart.replaceChildren(barChart(groups, [{ name: "reference", color: COLORS.other }, { name: "window", color: COLORS.canary }], { percent: true }));
  } else if (selected && selected.shares) {
    const labels = Object.keys(selected.reference_shares);
    chart.replaceChildren(barChart(labels.map((label) => ({ label, values: [selected.reference_shares[label], selected.shares[label] || 0] })),
      [{ name: "reference", color: COLORS.other }, { name: "window", color: COLORS.canary }], { percent: true }));
  } else {
    chart.replaceChildren();
  }
}

// -- navigation and start ---------------------------------------------------------------

function show(view) {
  state.view = ["server", "models", "traffic", "rollout", "drift"].includes(view) ? view : "server";
  for (const section of document.querySelectorAll(".view")) section.classList.toggle("active", section.dataset.view === state.view);
  for (const link of document.querySelectorAll("#tabs a")) {
    if (link.dataset.view === state.view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.body.dataset.view = state.view;
  if (state.summary) poll();
}

window.addEventListener("hashchange", () => show(location.hash.slice(1)));
$("drift-version").addEventListener("change", (event) => {
  state.driftKey = event.target.value;
  state.driftFeature = null;
  state.driftPinned = false;
  poll();
});
$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, state.token);
  signIn();
});
$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(state.timer);
  location.reload();
});
show(location.hash.slice(1));
signIn();
