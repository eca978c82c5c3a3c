// Sluice status page: polls /api/status and /api/status/series, draws the panels.
// No framework and no build step; every element the page fills has an id.
"use strict";

const REFRESH_MS = 3000;
const RESULTS = ["allowed", "rejected", "shadow_rejected"];
const KEY = "sluice.admin.token";
const $ = (id) => document.getElementById(id);

function takeTokenFromFragment() {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (match) {
    let token = match[1];
    try {
      token = decodeURIComponent(token);
    } catch {
      // not %-encoded after all: use it as it is
    }
    sessionStorage.setItem(KEY, token);
  }
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
}

function text(id, value) {
  $(id).textContent = value === null || value === undefined || value === "" ? "–" : String(value);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "–";
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 90) return `${seconds.toFixed(0)} s`;
  if (seconds < 5400) return `${(seconds / 60).toFixed(0)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function rate(value) {
  return value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1) : value.toFixed(2);
}

async function getJSON(path) {
  const token = sessionStorage.getItem(KEY) || "";
  const response = await fetch(path, { headers: { Authorization: `Bearer ${token}` } });
  if (response.status === 401 || response.status === 403) {
    const body = await response.json().catch(() => ({}));
    const error = new Error(body.message || `HTTP ${response.status}`);
    error.auth = true;
    throw error;
  }
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function showLogin(message) {
  $("panels").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  if (message) $("login-message").textContent = message;
}

function fillRows(tableId, rows) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren(...rows);
  if (!rows.length) {
    const cols = $(tableId).tHead.rows[0].cells.length;
    body.append(el("tr", { class: "empty" }, el("td", { colspan: cols, class: "muted" }, "none")));
  }
}

function panelError(id, panel, ...tables) {
  const node = $(id);
  node.hidden = !panel.error;
  node.className = "error";
  node.textContent = panel.error || "";
  if (panel.error) for (const table of tables) $(table).tBodies[0].replaceChildren();
  return Boolean(panel.error);
}

function renderConfig(config) {
  text("config-path", config.path);
  text("config-sha", config.sha256 ? config.sha256.slice(0, 12) : null);
  $("config-sha").title = config.sha256 || "";
  text("config-loaded", when(config.loaded_at));
  const reload = $("config-reload");
  reload.className = config.last_reload_error ? "error" : "";
  reload.textContent = config.last_reload_error
    ? `failed ${when(config.last_reload_error_at)}: ${config.last_reload_error}`
    : "ok";
}

function renderStorage(storage) {
  const state = $("storage-state");
  state.textContent = storage.state;
  state.className = `badge ${storage.state}`;
  text("storage-url", storage.url);
  text("storage-breaker", storage.breaker + (storage.any_worker_breaker_open ? " (open in a worker)" : ""));
  text("storage-p99", storage.p99_ms === null ? null : `${storage.p99_ms} ms`);
  text("storage-calls", rate(storage.calls_per_second));
  text("storage-error", storage.last_error);
}

function chart(title, series, times, id) {
  const width = 300, height = 90, pad = 4;
  const all = Object.values(series).flat();
  const top = Math.max(1, ...all);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  for (const [name, values] of Object.entries(series)) {
    if (!values.length) continue;
    // One point so far: a flat line across, so a fresh page still shows the level.
    const drawn = values.length === 1 ? [values[0], values[0]] : values;
    const last = drawn.length - 1;
    const points = drawn.map((v, i) => {
      const x = (i / last) * width;
      const y = height - pad - (v / top) * (height - 2 * pad);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("class", name);
    svg.append(line);
  }
  const now = el("div", { class: "now" });
  for (const [name, values] of Object.entries(series)) {
    const last = values.length ? values[values.length - 1] : 0;
    now.append(el("span", { class: name, "data-result": name }, `${name.replace("_rejected", "")} ${rate(last)}/s`));
  }
  return el("div", { class: "chart", id, "data-rule": title },
    el("h3", {}, title, el("span", { class: "muted" }, `max ${rate(top)}/s`)), svg, now);
}

function renderDecisions(status, series) {
  const charts = Object.entries(series.rules).map(([rule, bySeries]) => {
    const picked = {};
    for (const result of RESULTS) picked[result] = bySeries[result] || [];
    const node = chart(rule, picked, series.times, `chart-${rule}`);
    const minute = status.decisions.rules[rule] || {};
    node.dataset.allowed = minute.allowed ?? 0;
    node.dataset.rejected = minute.rejected ?? 0;
    node.dataset.shadow = minute.shadow_rejected ?? 0;
    return node;
  });
  if (!charts.length) charts.push(el("p", { class: "muted" }, "No rate-limit rules in this config."));
  $("charts").replaceChildren(...charts);
}

function clientRows(entries, key) {
  return entries.map((entry, i) =>
    el("tr", {}, el("td", {}, i + 1), el("td", {}, el("code", {}, entry.client)),
      el("td", {}, entry.rule), el("td", { class: "num" }, entry[key])));
}

function renderClients(clients) {
  if (panelError("clients-error", clients, "clients-5m", "clients-1h")) return;
  fillRows("clients-5m", clientRows(clients["5m"], "rejections"));
  fillRows("clients-1h", clientRows(clients["1h"], "rejections"));
}

function renderLinks(links) {
  if (panelError("links-error", links, "links-top")) return;
  if (!links.enabled) {
    $("links-error").hidden = false;
    $("links-error").className = "muted";
    $("links-error").textContent = "Short links are not configured (no redirects: section).";
    fillRows("links-top", []);
    return;
  }
  fillRows("links-top", links.top.map((entry, i) =>
    el("tr", {}, el("td", {}, i + 1), el("td", {}, el("code", {}, entry.code)),
      el("td", { class: "num" }, entry.clicks))));
}

function renderWebhooks(webhooks) {
  if (panelError("webhooks-error", webhooks, "webhooks")) return;
  fillRows("webhooks", webhooks.subscriptions.map((sub) => {
    const state = sub.disabled ? "disabled" : sub.enabled ? (sub.consecutive_failures ? "failing" : "ok") : "off";
    const badge = { ok: "ok", failing: "warn", disabled: "bad", off: "" }[state];
    return el("tr", { "data-name": sub.name },
      el("td", {}, sub.name), el("td", {}, el("span", { class: `badge ${badge}` }, state)),
      el("td", { class: "num" }, sub.depth), el("td", { class: "num" }, age(sub.oldest_pending_age)),
      el("td", { class: "num" }, sub.dead_letters), el("td", { class: "num" }, sub.consecutive_failures),
      el("td", { class: "error" }, sub.last_error || ""));
  }));
}

function renderWhatif(whatif, series) {
  const panel = $("whatif-panel");
  panel.hidden = !whatif || !whatif.enabled;
  if (panel.hidden) return;
  text("whatif-source", whatif.error ? `candidate ${whatif.path}: ${whatif.error}` : `candidate ${whatif.path} (${(whatif.sha256 || "").slice(0, 12)})`);
  $("whatif-source").className = whatif.error ? "error" : "muted";
  text("whatif-summary", whatif.summary);
  const charts = Object.entries((series.whatif || {}).rules || {}).map(([rule, bySeries]) =>
    chart(`${rule} (candidate)`, { allowed: bySeries.allowed || [], rejected: bySeries.rejected || [] },
      series.times, `whatif-chart-${rule}`));
  $("whatif-charts").replaceChildren(...charts);
  if (whatif.clients && whatif.clients.error) {
    $("whatif-clients").tBodies[0].replaceChildren(
      el("tr", {}, el("td", { colspan: 4, class: "error" }, whatif.clients.error)));
  } else if (whatif.clients) {
    fillRows("whatif-clients", clientRows(whatif.clients["5m"], "rejections"));
  }
}

let refreshing = false;

async function refresh() {
  if (refreshing) return; // the last answer is not in yet (storage slow): skip this tick
  refreshing = true;
  try {
    await refreshOnce();
  } finally {
    refreshing = false;
  }
}

async function refreshOnce() {
  if (!sessionStorage.getItem(KEY)) {
    showLogin();
    return;
  }
  try {
    const [status, series] = await Promise.all([getJSON("/api/status"), getJSON("/api/status/series")]);
    $("login").hidden = true;
    $("panels").hidden = false;
    $("logout").hidden = false;
    $("banner").hidden = true;
    renderConfig(status.config);
    renderStorage(status.storage);
    renderDecisions(status, series);
    renderWhatif(status.whatif, series);
    renderClients(status.clients);
    renderLinks(status.links);
    renderWebhooks(status.webhooks);
    text("updated", `updated ${new Date(status.generated_at * 1000).toLocaleTimeString()}`);
    document.body.dataset.loaded = String(status.generated_at);
  } catch (error) {
    if (error.auth) {
      sessionStorage.removeItem(KEY);
      showLogin(error.message);
      return;
    }
    $("banner").hidden = false;
    $("banner").textContent = `cannot refresh: ${error.message}`;
  }
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("token").value);
  $("token").value = "";
  refresh();
});
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  showLogin();
});

takeTokenFromFragment();
refresh();
setInterval(refresh, REFRESH_MS);
