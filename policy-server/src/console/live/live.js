// qosloop live page: plain JS, no build step, no external resources.
// Live charts from the server-sent events of /api/v1/events; the flow
// explorer over /api/v1/top, /timeseries and /sankey; the view's state in
// the URL's query string.
"use strict";

const live = {
  rateEvents: 0,
  decisionEvents: 0,
  links: new Map(),     // name -> [{t, v}]
  subjects: new Map(),  // name -> [{t, rate, avg}]
  bands: [],            // [{t, band, link}] from decision events
  thresholds: [],       // kbit/s band boundaries
  profiles: new Map(),  // subject name -> profile kbit/s
  topRows: [],
  connects: 0,          // live-update streams opened
  enforcers: [],        // the enforcer table's rows as last loaded
  needsToken: false,    // the token prompt is showing
};
window.qosloopLive = live;

const KEEP_NS = 120e9;
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#aaaaaa"];
const BAND_FILL = { low: "rgba(0,160,0,0.08)", medium: "rgba(230,150,0,0.12)", high: "rgba(200,0,0,0.12)" };

const $ = id => document.getElementById(id);
const esc = s => String(s ?? "").replace(/[&<>"]/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;" }[c]));
const fmt = v => typeof v === "number" ? (Math.abs(v) >= 100 ? Math.round(v).toLocaleString("en") : v.toFixed(1)) : esc(v);
const time = ns => new Date(ns / 1e6).toLocaleTimeString();

// ---- access ---------------------------------------------------------------
// The API token lives in this tab's sessionStorage only: never in the URL
// (which the explorer's state makes shareable) and never in a query string
// (which would land in logs). Every request sends it as
// `Authorization: Bearer`, the live updates included (fetch-streamed, since
// EventSource cannot send headers).

const TOKEN_KEY = "qosloop.apiToken";
const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

class Unauthorized extends Error {}

function authHeaders() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

// Shows the token prompt with why it is shown.
function askForToken(why) {
  live.needsToken = true;
  $("token-form").hidden = false;
  $("token-prompt").textContent = why;
  $("status").textContent = "token needed";
}

async function apiFetch(path, init) {
  const r = await fetch(path, { ...(init || {}), headers: authHeaders() });
  if (r.status === 401) {
    askForToken(token() ? "The API token was refused (401): enter a valid token." : "This server needs an API token: enter it to see the console.");
    throw new Unauthorized("API token needed");
  }
  return r;
}

async function getJson(path) {
  const r = await apiFetch(path);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || (path + ": " + r.status));
  return body;
}

function showError(e) {
  if (!(e instanceof Unauthorized)) $("status").textContent = String(e.message || e);
}

// ---- charts ---------------------------------------------------------------

// Draws lines (series: [{name, color, dash, points: [[t, v]]}]) with
// horizontal threshold lines and shaded bands ([{from, to, band}]).
function drawLines(canvas, series, opts) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 56, R = 8, T = 8, B = 22;
  ctx.clearRect(0, 0, W, H);
  let tmin = Infinity, tmax = -Infinity, vmax = 1;
  for (const s of series) for (const [t, v] of s.points) {
    tmin = Math.min(tmin, t); tmax = Math.max(tmax, t); vmax = Math.max(vmax, v);
  }
  for (const th of opts.thresholds || []) vmax = Math.max(vmax, th * 1.1);
  if (!isFinite(tmin)) { tmin = Date.now() * 1e6 - KEEP_NS; tmax = Date.now() * 1e6; }
  if (opts.window) tmin = Math.min(tmin, tmax - opts.window);
  if (tmax <= tmin) tmax = tmin + 1;
  const x = t => L + (t - tmin) / (tmax - tmin) * (W - L - R);
  const y = v => H - B - v / vmax * (H - T - B);
  for (const b of opts.bands || []) {
    ctx.fillStyle = BAND_FILL[b.band] || "rgba(0,0,200,0.06)";
    const x0 = Math.max(L, x(b.from)), x1 = Math.min(W - R, x(b.to));
    if (x1 > x0) ctx.fillRect(x0, T, x1 - x0, H - T - B);
  }
  ctx.strokeStyle = "#999"; ctx.lineWidth = 1; ctx.setLineDash([]);
  ctx.beginPath(); ctx.moveTo(L, T); ctx.lineTo(L, H - B); ctx.lineTo(W - R, H - B); ctx.stroke();
  ctx.fillStyle = "#555"; ctx.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const v = vmax * i / 4;
    ctx.fillText(fmt(v), 2, y(v) + 4);
  }
  ctx.fillText(time(tmin), L, H - 6);
  ctx.fillText(time(tmax), W - R - 60, H - 6);
  ctx.setLineDash([6, 4]); ctx.strokeStyle = "#b00";
  for (const th of opts.thresholds || []) {
    ctx.beginPath(); ctx.moveTo(L, y(th)); ctx.lineTo(W - R, y(th)); ctx.stroke();
    ctx.fillStyle = "#b00"; ctx.fillText(fmt(th), W - R - 40, y(th) - 2);
  }
  series.forEach((s, i) => {
    ctx.strokeStyle = s.color || COLORS[i % COLORS.length];
    ctx.setLineDash(s.dash ? [3, 3] : []);
    ctx.lineWidth = 1.6;
    ctx.beginPath();
    s.points.forEach(([t, v], j) => j ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v)));
    ctx.stroke();
  });
  ctx.setLineDash([]);
  let lx = L + 6;
  series.forEach((s, i) => {
    ctx.fillStyle = s.color || COLORS[i % COLORS.length];
    ctx.fillText(s.name, lx, T + 12);
    lx += ctx.measureText(s.name).width + 12;
  });
  canvas.dataset.points = String(series.reduce((n, s) => n + s.points.length, 0));
  canvas.dataset.tmax = String(tmax);
}

// Stacked areas: series [{key, values}], one value per step.
function drawStacked(canvas, start, step, series) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 56, R = 8, T = 8, B = 22;
  ctx.clearRect(0, 0, W, H);
  const n = series.length ? series[0].values.length : 0;
  const totals = new Array(n).fill(0);
  for (const s of series) s.values.forEach((v, i) => totals[i] += v);
  const vmax = Math.max(1, ...totals);
  const x = i => L + (n > 1 ? i / (n - 1) : 0) * (W - L - R);
  const y = v => H - B - v / vmax * (H - T - B);
  const base = new Array(n).fill(0);
  series.forEach((s, k) => {
    ctx.fillStyle = COLORS[k % COLORS.length];
    ctx.beginPath();
    for (let i = 0; i < n; i++) ctx.lineTo(x(i), y(base[i] + s.values[i]));
    for (let i = n - 1; i >= 0; i--) ctx.lineTo(x(i), y(base[i]));
    ctx.closePath(); ctx.fill();
    for (let i = 0; i < n; i++) base[i] += s.values[i];
  });
  ctx.fillStyle = "#555"; ctx.font = "11px sans-serif";
  ctx.fillText(fmt(vmax), 2, T + 10);
  if (n) { ctx.fillText(time(start), L, H - 6); ctx.fillText(time(start + (n - 1) * step), W - R - 60, H - 6); }
  let lx = L + 6;
  series.forEach((s, k) => {
    const name = s.other ? "Other" : String(s.key);
    ctx.fillStyle = COLORS[k % COLORS.length];
    ctx.fillText(name, lx, T + 12);
    lx += ctx.measureText(name).width + 10;
  });
  canvas.dataset.series = String(series.length);
}

// A sankey of columns of nodes, links drawn as bands between neighbours.
function drawSankey(svg, answer) {
  const W = 720, H = 300, NW = 10;
  const cols = answer.dims.length;
  const colOf = name => answer.dims.indexOf(name.split("=")[0]);
  const total = Math.max(1, answer.links.filter(l => colOf(l.source) === 0).reduce((a, l) => a + l.value, 0));
  const nodes = new Map();
  for (const name of answer.nodes) {
    const c = colOf(name);
    const value = Math.max(
      answer.links.filter(l => l.source === name).reduce((a, l) => a + l.value, 0),
      answer.links.filter(l => l.target === name).reduce((a, l) => a + l.value, 0));
    nodes.set(name, { name, c, value, y: 0, outY: 0, inY: 0 });
  }
  const scale = (H - 20) / total;
  for (let c = 0; c < cols; c++) {
    let y = 5;
    for (const n of [...nodes.values()].filter(n => n.c === c).sort((a, b) => b.value - a.value)) {
      n.y = y; n.outY = y; n.inY = y; y += n.value * scale + 4;
    }
  }
  const xOf = c => 10 + c * (W - 20 - NW) / Math.max(1, cols - 1);
  let out = "";
  answer.links.forEach((l, i) => {
    const s = nodes.get(l.source), t = nodes.get(l.target), h = l.value * scale;
    if (!s || !t) return;
    const x0 = xOf(s.c) + NW, x1 = xOf(t.c), y0 = s.outY + h / 2, y1 = t.inY + h / 2;
    s.outY += h; t.inY += h;
    const mx = (x0 + x1) / 2;
    out += `<path d="M${x0},${y0} C${mx},${y0} ${mx},${y1} ${x1},${y1}" stroke="${COLORS[i % COLORS.length]}" stroke-opacity="0.4" stroke-width="${Math.max(1, h)}" fill="none"><title>${esc(l.source)} → ${esc(l.target)}: ${fmt(l.value)}</title></path>`;
  });
  for (const n of nodes.values()) {
    const x = xOf(n.c);
    out += `<rect x="${x}" y="${n.y}" width="${NW}" height="${Math.max(1, n.value * scale)}" fill="#345"></rect>`;
    out += `<text x="${n.c === cols - 1 ? x - 4 : x + NW + 4}" y="${n.y + 10}" font-size="10" text-anchor="${n.c === cols - 1 ? "end" : "start"}">${esc(n.name)}</text>`;
  }
  svg.innerHTML = out;
}

// ---- live -----------------------------------------------------------------

function push(map, name, sample) {
  if (!map.has(name)) map.set(name, []);
  const a = map.get(name);
  a.push(sample);
  while (a.length && a[0].t < sample.t - KEEP_NS) a.shift();
}

function redrawLive() {
  const now = [...live.links.values(), ...live.subjects.values()].reduce((m, a) => Math.max(m, a.length ? a[a.length - 1].t : 0), 0);
  const bands = live.bands.map((b, i) => ({ from: b.t, to: i + 1 < live.bands.length ? live.bands[i + 1].t : now, band: b.band }));
  drawLines($("link-chart"), [...live.links].map(([name, a]) => ({ name, points: a.map(s => [s.t, s.v]) })),
    { thresholds: live.thresholds, bands, window: KEEP_NS });
  const subj = [];
  for (const [name, a] of live.subjects) {
    subj.push({ name: name + " rate", points: a.map(s => [s.t, s.rate]) });
    subj.push({ name: name + " avg", points: a.map(s => [s.t, s.avg]) });
  }
  drawLines($("subject-chart"), subj, { thresholds: [...new Set(live.profiles.values())], window: KEEP_NS });
}

function logDecision(at, change, d) {
  const tr = document.createElement("tr");
  const action = change === "remove" ? "remove" : (d.out_of_profile?.action ?? "");
  tr.className = action;
  tr.innerHTML = [time(at), change, d.role, d.policy_dn, action, d.reason?.band, fmt(d.reason?.avg_rate_kbps ?? 0), fmt(d.reason?.link_load_kbps ?? 0)]
    .map(c => `<td>${esc(c)}</td>`).join("");
  const body = $("decision-log").tBodies[0];
  body.insertBefore(tr, body.firstChild);
  while (body.rows.length > 200) body.deleteRow(body.rows.length - 1);
}

function onRates(r) {
  live.rateEvents++;
  for (const l of r.links) push(live.links, l.name, { t: r.at_ns, v: l.rate_kbps });
  for (const f of r.flows) push(live.subjects, f.name, { t: r.at_ns, rate: f.rate_kbps, avg: f.avg_rate_kbps });
}

function onDecisions(ev) {
  live.decisionEvents++;
  for (const c of ev.changes) {
    const d = c.decision;
    logDecision(d.issued_ns, c.change, d);
    if (c.change !== "remove" && d.reason?.band) live.bands.push({ t: d.issued_ns, band: d.reason.band });
  }
  while (live.bands.length > 50) live.bands.shift();
}

// Server-sent events over fetch: one text/event-stream body, split into
// events at blank lines; reconnects (with backoff) when the stream ends.
let stream = null;

function dispatch(kind, data) {
  if (kind === "rates") onRates(JSON.parse(data));
  else if (kind === "decisions") onDecisions(JSON.parse(data));
  else if (kind === "lagged") $("status").textContent = "behind: " + JSON.parse(data).dropped + " events dropped";
}

async function readEvents(signal) {
  const r = await apiFetch("/api/v1/events?types=rates,decisions", { signal });
  if (!r.ok) throw new Error("/api/v1/events: " + r.status);
  $("status").textContent = "live";
  live.connects++;
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let kind = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) kind = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) dispatch(kind, data.join("\n"));
    }
    // A server never sends an event this large: a broken stream.
    if (buf.length > 1 << 20) throw new Error("event stream: an event over 1 MiB");
  }
}

function connect() {
  if (stream) stream.abort();
  const ctl = new AbortController();
  stream = ctl;
  (async () => {
    let wait = 1000;
    while (!ctl.signal.aborted) {
      try {
        await readEvents(ctl.signal);
        wait = 1000;
      } catch (e) {
        if (ctl.signal.aborted || e instanceof Unauthorized) return;
        $("status").textContent = "reconnecting…";
      }
      await new Promise(res => setTimeout(res, wait));
      wait = Math.min(wait * 2, 15000);
    }
  })();
}

async function loadPolicy() {
  try {
    const p = await getJson("/api/policies");
    const th = new Set();
    for (const c of p.classes || []) for (const b of c.out_of_profile || []) if (b.from > 0) th.add(b.from);
    live.thresholds = [...th].sort((a, b) => a - b);
    for (const r of p.rules || []) {
      const c = (p.classes || []).find(c => c.name === r.service_class);
      if (c) live.profiles.set(r.name, c.profile.rate);
    }
  } catch (e) { showError(e); }
}

async function loadDecisions() {
  try {
    const d = await getJson("/api/decisions");
    for (const r of [...d.recent].reverse()) logDecision(r.issued_ns, r.kind, r.decision);
  } catch (e) { showError(e); }
}

// The HTB classes' statistics of one enforcer: how many, and the sums of
// drops, overlimits and backlog; each class in the count's title. No sum of
// bytes: an inner class counts its descendants' bytes again (drops and
// backlog are the leaves' own; overlimits are events of any class).
function htbCells(classes) {
  const cs = Array.isArray(classes) ? classes : [];
  const sum = k => cs.reduce((a, c) => a + Number(c[k] || 0), 0).toLocaleString("en");
  const title = cs.map(c => `${c.classid} (parent ${c.parent}): ${c.bytes} B, ${c.packets} packets, ` +
    `${c.drops} drops, ${c.overlimits} overlimits, ${c.backlog_bytes} B queued`).join("\n");
  return `<td class="num" title="${esc(title)}">${cs.length}</td>` +
    ["drops", "overlimits", "backlog_bytes"].map(k => `<td class="num">${cs.length ? sum(k) : ""}</td>`).join("");
}

async function loadEnforcers() {
  try {
    const list = await getJson("/api/v1/enforcers");
    const rows = Array.isArray(list) ? list : (list.rows || []);
    const num = v => v == null ? "" : Number(v).toLocaleString("en");
    $("enforcers").tBodies[0].innerHTML = rows.map(e => "<tr>" + [e.name, Array.isArray(e.roles) ? e.roles.join(" ") : e.roles, e.state,
      e.last_report_ns ? time(e.last_report_ns) : "", e.installed ?? ""].map(c => `<td>${esc(typeof c === "object" ? JSON.stringify(c) : c)}</td>`).join("") +
      [e.counted_decisions, e.in_profile_packets, e.in_profile_bytes, e.out_of_profile_packets, e.out_of_profile_bytes]
        .map(v => `<td class="num">${num(v)}</td>`).join("") +
      `<td>${e.counters_at_ns ? esc(time(e.counters_at_ns)) : ""}</td>` + htbCells(e.htb_classes) + "</tr>").join("");
    live.enforcers = rows;
  } catch (e) { showError(e); }
}

// ---- explorer -------------------------------------------------------------

const FIELDS = ["filter", "range", "dims", "metric", "sankey"];

function viewState() {
  const f = $("explorer");
  const s = new URLSearchParams();
  for (const k of FIELDS) if (f.elements[k].value) s.set(k, f.elements[k].value);
  return s;
}

function restoreState() {
  const s = new URLSearchParams(location.search);
  const f = $("explorer");
  for (const k of FIELDS) if (s.has(k)) f.elements[k].value = s.get(k);
}

async function explore() {
  const s = viewState();
  history.replaceState(null, "", "?" + s.toString());
  const q = new URLSearchParams({ from: "now-" + s.get("range"), to: "now", metric: s.get("metric") || "bps" });
  if (s.get("filter")) q.set("filter", s.get("filter"));
  $("explorer-error").textContent = "";
  try {
    const top = await getJson("/api/v1/top?" + q + "&dims=" + encodeURIComponent(s.get("dims")) + "&limit=10");
    const head = [...top.dims, top.metric];
    $("top-table").tHead.innerHTML = "<tr>" + head.map(h => `<th>${esc(h)}</th>`).join("") + "</tr>";
    const rows = top.rows.map(r => [...r.keys, r.value]);
    if (top.other > 0) rows.push([...top.dims.map(() => "Other"), top.other]);
    live.topRows = rows;
    $("top-table").tBodies[0].innerHTML = rows.map(r => "<tr>" + r.map((c, i) => i === r.length - 1 ? `<td class="num">${fmt(c)}</td>` : `<td>${esc(c)}</td>`).join("") + "</tr>").join("");
    $("top-source").textContent = "read from: " + top.source + ", total " + fmt(top.total);
    const stack = s.get("dims").split(",")[0];
    const ts = await getJson("/api/v1/timeseries?" + q + "&stack=" + encodeURIComponent(stack) + "&step=" + stepFor(s.get("range")));
    drawStacked($("series-chart"), ts.start_ns, ts.step_ns, ts.series);
    const sk = await getJson("/api/v1/sankey?" + q + "&dims=" + encodeURIComponent(s.get("sankey")) + "&limit=20");
    drawSankey($("sankey"), sk);
  } catch (e) {
    if (!(e instanceof Unauthorized)) $("explorer-error").textContent = String(e.message || e);
  }
}

function stepFor(range) {
  return { "15m": "10s", "1h": "1m", "6h": "5m", "24h": "15m" }[range] || "1m";
}

// ---- start ----------------------------------------------------------------

// Everything the page shows, loaded (again) with the current token.
function start() {
  live.needsToken = false;
  $("token-prompt").textContent = "";
  loadPolicy().then(() => { connect(); });
  loadDecisions();
  loadEnforcers();
  explore();
}

$("token-form").addEventListener("submit", e => {
  e.preventDefault();
  const t = $("token").value.trim();
  $("token").value = "";
  if (t) sessionStorage.setItem(TOKEN_KEY, t); else sessionStorage.removeItem(TOKEN_KEY);
  $("token-form").hidden = true;
  start();
});

restoreState();
$("explorer").addEventListener("submit", e => { e.preventDefault(); explore(); });
setInterval(() => { if (!live.needsToken) loadEnforcers(); }, 5000);
setInterval(redrawLive, 1000);
// Whether the server wants a token is public (the assets are too); asking
// first spares a tab with no token a burst of refused requests.
fetch("/live/access").then(r => r.json()).then(a => {
  if (a.token_required && !token()) askForToken("This server needs an API token: enter it to see the console.");
  else start();
}).catch(() => start());
