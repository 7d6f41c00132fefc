// klingq dashboard: vanilla JS over the HTTP API. Data calls carry the bearer token kept in
// localStorage; live updates come from GET /v1/events (SSE) read with fetch so the
// Authorization header can be sent, plus a periodic refresh. Hash routes: `#/` the overview,
// `#/jobs/{id}` a job's page, `#/batches/{id}` a batch's page. Every element is built with
// el()/svg(); data is only ever set as text or attribute values, never parsed as HTML.
'use strict';

const TOKEN_KEY = 'klingq.token';
const STATS_EVERY_MS = 3000;
const VIEWS_EVERY_MS = 5000;
const HISTORY_EVERY_MS = 15000;
// Minutes of the server's per-minute history the charts show.
const HISTORY_MINUTES = 60;
const BATCH_PAGE = 20;
const STATES = ['queued', 'scheduled', 'submitting', 'generating', 'downloading', 'uploading',
  'publishing', 'succeeded', 'failed', 'cancelled', 'dead'];
const ACTIVE = new Set(['submitting', 'generating', 'downloading', 'uploading', 'publishing']);
const TERMINAL = new Set(['succeeded', 'failed', 'cancelled', 'dead']);
const STEPS = ['submit', 'generate', 'download', 'upload', 'publish'];
// Deliveries that ended (or were exhausted) can be sent again.
const REPLAYABLE = new Set(['succeeded', 'failed', 'exhausted']);
// A route the server does not have (an older server) answers one of these.
const MISSING_ROUTE = new Set([404, 405, 501]);

const $ = (id) => document.getElementById(id);
let token = localStorage.getItem(TOKEN_KEY) || '';
let needToken = false;
let eventsAbort = null;
let refreshTimer = null;
let eventsConnected = false;
let history = null;
let view = { name: 'overview' };

// ---- helpers ---------------------------------------------------------------------------

/** Creates an element; children are nodes or text (never parsed as HTML). */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'onclick') node.addEventListener('click', value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

const usd = (n) => (n === null || n === undefined) ? '–' : '$' + Number(n).toFixed(2);
// UUIDv7 ids share their leading time digits, so show both ends.
const shortId = (id) => id ? id.slice(0, 8) + '…' + id.slice(-6) : '';
const dash = (v) => (v === null || v === undefined || v === '') ? '–' : v;

function duration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return '–';
  if (ms < 1000) return Math.round(ms) + ' ms';
  const s = ms / 1000;
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + ' s';
  const m = Math.floor(s / 60);
  if (m < 60) return m + ' min ' + Math.round(s % 60) + ' s';
  return Math.floor(m / 60) + ' h ' + (m % 60) + ' min';
}

function ago(iso) {
  if (!iso) return '–';
  const ms = Date.now() - Date.parse(iso);
  return ms < 5000 ? 'just now' : duration(ms) + ' ago';
}

function when(iso) {
  if (!iso) return '–';
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

function bytes(n) {
  if (n === null || n === undefined) return '–';
  if (n < 1024) return n + ' B';
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + ' KiB';
  return (n / 1024 / 1024).toFixed(1) + ' MiB';
}

function stateClass(state) {
  if (ACTIVE.has(state)) return 'badge active';
  return 'badge ' + state;
}

const badge = (state) => el('span', { class: stateClass(state), 'data-state': state }, state);
const jobLink = (id, text) => el('a', { href: '#/jobs/' + encodeURIComponent(id), class: 'id-link' },
  el('code', { title: id }, text || shortId(id)));
const batchLink = (id, text) => el('a', { href: '#/batches/' + encodeURIComponent(id), class: 'id-link' },
  el('code', { title: id }, text || shortId(id)));

/** A list of label/value rows; rows whose value is absent are left out. */
function kv(rows) {
  const items = rows.filter(([, value]) => value !== undefined && value !== null && value !== '')
    .map(([label, value]) => el('div', {}, el('dt', {}, label), el('dd', {}, value)));
  return items.length ? el('dl', { class: 'kv' }, items) : el('p', { class: 'muted' }, '–');
}

const pre = (value) => el('pre', { class: 'json' }, JSON.stringify(value, null, 2));

function toast(text) {
  const node = $('toast');
  node.textContent = text;
  // Counts the messages, so a reader can tell a new one from the same text again.
  node.dataset.seq = String(Number(node.dataset.seq || 0) + 1);
  node.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { node.hidden = true; }, 5000);
}

function setLive(state, text) {
  const node = $('live');
  node.dataset.state = state;
  node.textContent = text;
}

/** Replaces a container's children. */
function fill(node, children) {
  node.replaceChildren(...[children].flat().filter((c) => c !== null && c !== undefined));
}

/**
 * Rebuilds a container only when what it shows changed, so a refresh keeps a playing video,
 * a loaded image or a selection in place.
 */
function fillKeyed(node, key, build) {
  const text = typeof key === 'string' ? key : JSON.stringify(key);
  if (node.dataset.key === text) return;
  node.dataset.key = text;
  fill(node, build());
}

// ---- API -------------------------------------------------------------------------------

class Unauthorized extends Error {}

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function headers(extra) {
  const h = Object.assign({ Accept: 'application/json' }, extra || {});
  if (token) h.Authorization = 'Bearer ' + token;
  return h;
}

async function api(path, options) {
  const init = Object.assign({}, options || {});
  init.headers = headers(init.headers);
  const response = await fetch(path, init);
  if (response.status === 401) {
    askToken(Boolean(token));
    throw new Unauthorized('unauthorized');
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.statusText;
    throw new ApiError(message || ('HTTP ' + response.status), response.status);
  }
  return body;
}

/** A call to a route an older server may lack: null when it is missing or refused. */
async function apiOptional(path) {
  try {
    return await api(path);
  } catch (error) {
    if (error instanceof ApiError && (MISSING_ROUTE.has(error.status) || error.status === 422)) return null;
    throw error;
  }
}

function post(path, body) {
  return api(path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body || {}),
  });
}

// ---- confirmation and actions ----------------------------------------------------------

/** Asks in a modal dialog; resolves true when the user confirms. */
function confirmAction(question, label) {
  const dialog = $('confirm-dialog');
  $('confirm-text').textContent = question;
  $('confirm-ok').textContent = label || 'Confirm';
  dialog.returnValue = '';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
    dialog.showModal();
  });
}

/** Confirms, runs, says the outcome in a toast, refreshes. */
async function act(button, question, label, run, outcome) {
  if (!(await confirmAction(question, label))) return;
  if (button) button.disabled = true;
  try {
    toast(outcome(await run()));
  } catch (error) {
    if (!(error instanceof Unauthorized)) toast('failed: ' + error.message);
  }
  if (button) button.disabled = false;
  scheduleRefresh();
}

function redriveOutcome(result) {
  if (result.redriven) return `re-driven: ${result.redriven}`;
  const notDead = (result.not_dead || [])[0];
  if (notDead) return `not re-driven: the job is ${notDead.state}`;
  return 'nothing to re-drive';
}

function replayButton(delivery) {
  return el('button', {
    type: 'button', class: 'secondary', 'data-replay': delivery.id,
    onclick: (e) => act(e.currentTarget,
      `Send the ${delivery.event_type} event to ${delivery.endpoint} again?`, 'Replay',
      () => post(`/v1/webhooks/deliveries/${encodeURIComponent(delivery.id)}/replay`),
      (r) => `delivery replayed (${r && r.mode ? r.mode : 'queued'})`),
  }, 'Replay');
}

// ---- token -----------------------------------------------------------------------------

function askToken(refused) {
  needToken = true;
  setLive('error', 'token needed');
  $('token-error').hidden = !refused;
  const dialog = $('token-dialog');
  if (!dialog.open) dialog.showModal();
}

function setupToken() {
  $('token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    token = $('token-input').value.trim();
    if (!token) return;
    localStorage.setItem(TOKEN_KEY, token);
    $('token-dialog').close();
    needToken = false;
    $('forget-token').hidden = false;
    startEvents();
    refreshAll();
  });
  $('forget-token').hidden = !token;
  $('forget-token').addEventListener('click', () => {
    localStorage.removeItem(TOKEN_KEY);
    token = '';
    $('forget-token').hidden = true;
    refreshAll();
  });
}

// ---- stats -----------------------------------------------------------------------------

async function refreshStats() {
  const stats = await api('/v1/stats');
  const v = stats.videos;
  $('v-waiting').textContent = v.waiting;
  $('v-in-flight').textContent = v.in_flight;
  $('v-scheduled').textContent = v.scheduled;
  $('v-dead').textContent = v.dead;
  $('v-oldest').textContent = v.waiting ? duration(v.oldest_waiting_seconds * 1000) : 'none waiting';
  for (const outcome of ['succeeded', 'failed', 'cancelled', 'dead']) {
    $('f-' + outcome).textContent = (stats.finished || {})[outcome] || 0;
  }
  const w = stats.webhooks;
  $('w-depth').textContent = `${w.waiting} waiting, ${w.in_flight} sending, ${w.scheduled} retrying, ${w.dead} exhausted`;
  const p = stats.provider;
  $('p-in-use').textContent = p.in_use;
  $('p-cap').textContent = p.cap;
  $('p-max').textContent = p.max;
  const pShare = p.cap ? Math.min(1, p.in_use / p.cap) : 0;
  $('p-meter').style.width = (pShare * 100).toFixed(1) + '%';
  $('p-meter').classList.toggle('full', pShare >= 1);
  const s = stats.spend;
  $('s-charged').textContent = usd(s.charged_usd);
  $('s-estimated').textContent = usd(s.estimated_usd);
  $('s-today').textContent = usd(s.spent_today_usd);
  $('s-budget').textContent = s.daily_budget_usd ? usd(s.daily_budget_usd) + ' daily budget' : 'no daily budget';
  const sShare = s.daily_budget_usd ? Math.min(1, s.spent_today_usd / s.daily_budget_usd) : 0;
  $('s-meter').style.width = (sShare * 100).toFixed(1) + '%';
  $('s-meter').classList.toggle('full', sShare >= 0.9);
  if (eventsConnected && $('live').dataset.state === 'error') setLive('live', 'live');
  $('updated').textContent = 'updated ' + new Date(stats.at_ms).toLocaleTimeString();
}

// ---- charts from the server's per-minute history ----------------------------------------

async function refreshHistory() {
  try {
    const body = await api('/v1/stats/history?minutes=' + HISTORY_MINUTES);
    history = { points: Array.isArray(body && body.points) ? body.points : [] };
  } catch (error) {
    if (error instanceof Unauthorized) throw error;
    history = {
      points: [],
      error: error instanceof ApiError && MISSING_ROUTE.has(error.status)
        ? 'this server keeps no history' : 'history: ' + error.message,
    };
  }
  drawCharts();
}

/** One slot per minute of the window, oldest first; minutes with no point count zero. */
function minuteSlots(points) {
  const now = Math.floor(Date.now() / 60000) * 60000;
  const first = now - (HISTORY_MINUTES - 1) * 60000;
  const slots = [];
  for (let i = 0; i < HISTORY_MINUTES; i++) {
    slots.push({ t: first + i * 60000, succeeded: 0, bad: 0, charged: 0 });
  }
  for (const p of points) {
    const at = typeof p.at_ms === 'number' ? p.at_ms : Date.parse(p.at);
    if (Number.isNaN(at)) continue;
    const i = Math.round((Math.floor(at / 60000) * 60000 - first) / 60000);
    if (i < 0 || i >= HISTORY_MINUTES) continue;
    slots[i].succeeded += p.succeeded || 0;
    slots[i].bad += (p.failed || 0) + (p.dead || 0) + (p.cancelled || 0);
    slots[i].charged += p.charged_usd || 0;
  }
  return slots;
}

function drawCharts() {
  const slots = history ? minuteSlots(history.points) : [];
  drawBars($('chart'), slots, [['succeeded', 'bar ok-bar'], ['bad', 'bar bad-bar']],
    (n) => formatRate(n), (slot) => `${slot.succeeded} succeeded, ${slot.bad} failed, dead or cancelled`, 'jobs finished per minute');
  drawBars($('spend-chart'), slots, [['charged', 'bar']],
    (n) => '$' + (n >= 10 ? Math.round(n) : n.toFixed(2)), (slot) => usd(slot.charged) + ' charged', 'USD charged per minute');
}

/** Stacked bars, one per minute, with a y axis and -60/-30/now labels. */
function drawBars(box, slots, series, format, describe, what) {
  const width = Math.max(280, box.clientWidth || 600);
  const height = 180;
  const pad = { l: 44, r: 8, t: 10, b: 22 };
  const root = svg('svg', { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: 'none' });
  const total = slots.reduce((sum, slot) => sum + series.reduce((a, [key]) => a + slot[key], 0), 0);
  const max = Math.max(0, ...slots.map((slot) => series.reduce((a, [key]) => a + slot[key], 0)));
  const top = niceCeil(max > 0 ? max : 1);
  const plotW = width - pad.l - pad.r;
  const plotH = height - pad.t - pad.b;
  const y = (v) => pad.t + plotH * (1 - v / top);
  for (const frac of [0, 0.5, 1]) {
    const yy = y(top * frac);
    root.append(svg('line', { class: 'axis', x1: pad.l, x2: width - pad.r, y1: yy, y2: yy }));
    root.append(svg('text', { x: pad.l - 6, y: yy + 4, 'text-anchor': 'end' }, format(top * frac)));
  }
  const slotW = slots.length ? plotW / slots.length : plotW;
  const labels = [[0, 'start', `-${HISTORY_MINUTES} min`], [0.5, 'middle', `-${HISTORY_MINUTES / 2} min`], [1, 'end', 'now']];
  for (const [frac, anchor, text] of labels) {
    root.append(svg('text', { x: pad.l + plotW * frac, y: height - 6, 'text-anchor': anchor }, text));
  }
  slots.forEach((slot, i) => {
    let base = 0;
    for (const [key, cls] of series) {
      const v = slot[key];
      if (!v) continue;
      const rect = svg('rect', {
        class: cls, x: (pad.l + i * slotW + slotW * 0.1).toFixed(1), width: Math.max(1, slotW * 0.8).toFixed(1),
        y: y(base + v).toFixed(1), height: Math.max(1, y(base) - y(base + v)).toFixed(1),
      });
      rect.append(svg('title', {}, `${new Date(slot.t).toLocaleTimeString()}: ${describe(slot)}`));
      root.append(rect);
      base += v;
    }
  });
  if (!history || history.error) {
    root.append(svg('text', { x: width / 2, y: height / 2, 'text-anchor': 'middle' },
      history ? history.error : 'loading history…'));
  } else if (!total) {
    root.append(svg('text', { x: width / 2, y: height / 2, 'text-anchor': 'middle' }, `nothing in the last ${HISTORY_MINUTES} minutes`));
  }
  box.replaceChildren(root);
  box.dataset.source = history && !history.error ? 'history' : 'none';
  box.dataset.total = String(Math.round(total * 100) / 100);
  const last = slots.length ? slots[slots.length - 1] : null;
  box.setAttribute('aria-label', `${what}: ${last ? describe(last) : 'no data'} this minute`);
}

function niceCeil(n) {
  const pow = Math.pow(10, Math.floor(Math.log10(n)));
  for (const m of [1, 2, 5, 10]) if (n <= m * pow * 1.0000001) return m * pow;
  return 10 * pow;
}

function formatRate(r) {
  return r >= 10 ? Math.round(r).toString() : (Number.isInteger(r) ? String(r) : r.toFixed(1));
}

// ---- batches (overview) ------------------------------------------------------------------

function progressBar(done, total, finished, label) {
  const pct = total ? Math.round(done / total * 100) : 0;
  const bar = el('div', {
    class: 'progress', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100,
    'aria-valuenow': pct, 'aria-label': label,
  });
  const fillNode = el('div', { class: 'progress-fill' + (finished ? ' done' : '') });
  fillNode.style.width = pct + '%';
  bar.append(fillNode, el('span', { class: 'progress-label' }, `${done}/${total} · ${pct}%`));
  return bar;
}

function stateBadges(counts) {
  return el('div', { class: 'states' }, STATES.filter((s) => counts && counts[s]).map((s) =>
    el('span', { class: stateClass(s), 'data-state': s, 'data-count': counts[s] }, `${s} ${counts[s]}`)));
}

async function refreshBatches() {
  const page = await api('/v1/batches?limit=20');
  const rows = page.items.map((b) => el('tr', { 'data-batch-id': b.id, 'data-done': b.done ? 'true' : 'false' },
    el('td', {}, batchLink(b.id), b.done ? el('div', { class: 'muted' }, 'done') : null),
    el('td', { class: 'muted' }, ago(b.created_at)),
    el('td', {}, progressBar(b.terminal, b.total, b.done, `batch ${b.id} progress`)),
    el('td', {}, stateBadges(b.counts)),
    el('td', { class: 'num' }, usd(b.charged_usd),
      el('div', { class: 'muted' }, 'est. ' + usd(b.estimated_usd) + (b.budget_usd ? ' / cap ' + usd(b.budget_usd) : ''))),
  ));
  if (!rows.length) rows.push(el('tr', {}, el('td', { colspan: 5, class: 'muted' }, 'No batches yet.')));
  fill(document.querySelector('#batches tbody'), rows);
  $('batches-note').textContent = page.next_offset !== null && page.next_offset !== undefined ? 'the 20 newest' : '';
}

// ---- tenants (overview) ------------------------------------------------------------------

async function refreshTenants() {
  // An older server has no /v1/tenants: the panel says so instead of failing the page.
  const body = await apiOptional('/v1/tenants');
  if (body === null) {
    fill(document.querySelector('#tenants tbody'), [el('tr', {}, el('td', { colspan: 9, class: 'muted' }, 'This server does not report tenants.'))]);
    return;
  }
  const rows = body.tenants.map((t) => el('tr', { 'data-tenant': t.tenant },
    el('td', {}, el('code', {}, t.tenant), el('div', { class: 'muted', title: 'where the policy comes from' }, t.source)),
    el('td', { class: 'num' }, t.policy.weight),
    el('td', { class: 'num' }, t.policy.max_concurrency ? t.policy.max_concurrency : '–'),
    el('td', { class: 'num', 'data-field': 'in_flight' }, t.in_flight),
    el('td', { class: 'num', 'data-field': 'waiting_for_slot' }, t.waiting_for_slot),
    el('td', { class: 'num', 'data-field': 'active' }, t.counts.active),
    el('td', { class: 'num ok' }, t.counts.succeeded),
    el('td', { class: 'num bad' }, t.counts.failed),
    el('td', { class: 'num' }, usd(t.spend_today.charged_usd),
      el('div', { class: 'muted' }, 'est. ' + usd(t.spend_today.estimated_usd) +
        (t.policy.daily_budget_usd ? ' / budget ' + usd(t.policy.daily_budget_usd) : ''))),
  ));
  if (!rows.length) rows.push(el('tr', {}, el('td', { colspan: 9, class: 'muted' }, 'No tenant has had a job yet.')));
  fill(document.querySelector('#tenants tbody'), rows);
}

// ---- jobs (overview) ---------------------------------------------------------------------

function stepTimings(job) {
  const steps = STEPS.filter((s) => job.step_ms && job.step_ms[s] !== undefined)
    .map((s) => el('span', {}, s + ' ', el('b', {}, duration(job.step_ms[s]))));
  for (const [name, ms] of Object.entries(job.step_ms || {})) {
    if (!STEPS.includes(name)) steps.push(el('span', {}, name + ' ', el('b', {}, duration(ms))));
  }
  if (job.started_at && job.finished_at) {
    steps.push(el('span', {}, 'total ', el('b', {}, duration(Date.parse(job.finished_at) - Date.parse(job.started_at)))));
  } else if (job.started_at && !TERMINAL.has(job.state)) {
    steps.push(el('span', {}, 'elapsed ', el('b', {}, duration(Date.now() - Date.parse(job.started_at)))));
  }
  return steps.length ? el('div', { class: 'steps' }, steps) : el('span', { class: 'muted' }, '–');
}

function errorCell(job) {
  if (job.error) {
    return el('span', { class: 'error', title: job.error.message }, `${job.error.step}: ${job.error.code}`,
      el('div', { class: 'muted' }, job.error.message));
  }
  return job.reason && job.state !== 'succeeded' ? el('span', { class: 'muted' }, job.reason) : '';
}

async function refreshJobs() {
  const params = new URLSearchParams({ limit: '50' });
  const q = $('job-q').value.trim();
  const state = $('job-state').value;
  if (q) params.set('q', q);
  if (state) params.set('state', state);
  const page = await api('/v1/jobs?' + params.toString());
  const rows = page.items.map((job) => el('tr', { 'data-job-id': job.id, 'data-state': job.state },
    el('td', {}, jobLink(job.id),
      job.batch_id ? el('div', { class: 'muted' }, 'batch ', batchLink(job.batch_id)) : null,
      job.trace_id ? el('div', { class: 'muted' }, 'trace ', el('code', { title: job.trace_id }, job.trace_id.slice(0, 8))) : null),
    el('td', {}, badge(job.state),
      job.attempts > 1 ? el('div', { class: 'muted' }, `attempt ${job.attempts}/${job.max_attempts}`) : null),
    el('td', {}, stepTimings(job)),
    el('td', { class: 'muted' }, ago(job.created_at)),
    el('td', {}, errorCell(job)),
  ));
  if (!rows.length) rows.push(el('tr', {}, el('td', { colspan: 5, class: 'muted' }, q || state ? 'No job matches.' : 'No jobs yet.')));
  fill(document.querySelector('#jobs tbody'), rows);
  $('jobs-note').textContent = page.items.length && page.next_offset !== null && page.next_offset !== undefined
    ? `showing ${page.items.length} (searched ${page.scanned} recent jobs)` : '';
}

function setupJobs() {
  for (const select of [$('job-state'), $('batch-state')]) {
    for (const s of STATES) select.append(el('option', { value: s }, s));
  }
  let timer = null;
  $('job-q').addEventListener('input', () => {
    clearTimeout(timer);
    timer = setTimeout(() => refreshJobs().catch(report), 250);
  });
  $('job-state').addEventListener('change', () => refreshJobs().catch(report));
  $('job-search').addEventListener('submit', (event) => {
    event.preventDefault();
    refreshJobs().catch(report);
  });
}

// ---- dead letters ----------------------------------------------------------------------

async function refreshDead() {
  const page = await api('/v1/dead-letters?limit=50');
  const items = page.items.map((job) => el('li', { 'data-dead-id': job.id },
    el('div', { class: 'grow' },
      jobLink(job.id, job.id),
      el('div', { class: 'muted' }, job.error ? `${job.error.step}: ${job.error.code} — ${job.error.message}` : (job.reason || 'dead'),
        ` · after ${job.attempts} attempt${job.attempts === 1 ? '' : 's'}`)),
    el('button', {
      type: 'button', 'data-redrive': job.id,
      onclick: (e) => act(e.currentTarget, `Re-drive job ${job.id}? It gets a new life.`, 'Re-drive',
        () => post('/v1/dead-letters/redrive', { ids: [job.id] }), redriveOutcome),
    }, 'Re-drive'),
  ));
  if (!items.length) items.push(el('li', { class: 'empty' }, 'No dead letters.'));
  fill($('dead'), items);
  $('redrive-all').hidden = page.total < 2;
}

// ---- webhooks (overview) ---------------------------------------------------------------

async function refreshWebhooks() {
  const [list, exhausted] = await Promise.all([
    api('/v1/webhooks/endpoints'),
    api('/v1/webhooks/deliveries?status=exhausted&limit=20'),
  ]);
  const endpoints = list.endpoints.map((ep) => {
    const counts = Object.entries(ep.counts).map(([status, n]) => el('span', { class: 'badge ' + status }, `${status} ${n}`));
    const healthy = ep.total ? Math.round((ep.counts.succeeded || 0) / ep.total * 100) : null;
    return el('li', { 'data-endpoint-id': ep.endpoint_id },
      el('div', { class: 'grow' },
        el('code', {}, ep.endpoint),
        el('div', { class: 'states' }, counts, healthy !== null ? el('span', { class: 'muted' }, `${healthy}% delivered`) : null),
        ep.disabled ? el('div', { class: 'error' }, `disabled ${ago(ep.disabled_at)}: ${ep.disabled_reason}`) : null,
        !ep.disabled && ep.last_error ? el('div', { class: 'muted' }, 'last error: ' + ep.last_error) : null),
      ep.disabled ? el('button', {
        type: 'button', 'data-enable': ep.endpoint_id,
        onclick: (e) => act(e.currentTarget, `Enable deliveries to ${ep.endpoint} again?`, 'Enable',
          () => post(`/v1/webhooks/endpoints/${encodeURIComponent(ep.endpoint_id)}/enable`), () => 'endpoint enabled'),
      }, 'Enable') : null,
    );
  });
  if (!endpoints.length) endpoints.push(el('li', { class: 'empty' }, 'No deliveries yet.'));
  fill($('endpoints'), endpoints);
  const deliveries = exhausted.deliveries.map((d) => el('li', { 'data-delivery-id': d.id },
    el('div', { class: 'grow' },
      el('span', {}, d.event_type, ' → ', el('code', {}, d.endpoint)),
      el('div', { class: 'muted' }, `${d.attempts} attempts · ${d.last_error || 'no answer'}`,
        d.subject ? [' · ', jobLink(d.subject)] : null)),
    replayButton(d),
  ));
  if (!deliveries.length) deliveries.push(el('li', { class: 'empty' }, 'None.'));
  fill($('exhausted'), deliveries);
}

// ---- a job's page ------------------------------------------------------------------------

/** The job's video: a fresh URL from the API, else the one in its record. */
async function videoSource(job) {
  try {
    const body = await api(`/v1/jobs/${encodeURIComponent(job.id)}/video`);
    if (body && body.url) return body;
  } catch (error) {
    if (error instanceof Unauthorized) throw error;
    if (!(error instanceof ApiError && MISSING_ROUTE.has(error.status))) throw error;
  }
  if (job.video && job.video.url) {
    return { url: job.video.url, content_type: job.video.content_type, size: job.video.size, expires_at: null };
  }
  return null;
}

async function renderVideo(job, r) {
  const box = $('job-video');
  const key = job.video ? job.video.key + '/' + job.video.sha256 : 'none:' + job.state;
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  if (!job.video) {
    fill(box, el('p', { class: 'muted' }, TERMINAL.has(job.state) ? 'This job has no stored video.' : 'No video yet.'));
    return;
  }
  fill(box, el('p', { class: 'muted' }, 'loading the video…'));
  let source = null;
  try {
    source = await videoSource(job);
  } catch (error) {
    if (view !== r) return;
    box.dataset.key = '';
    fill(box, el('p', { class: 'error' }, 'video: ' + error.message));
    return;
  }
  if (view !== r) return;
  if (!source) {
    fill(box, el('p', { class: 'muted' }, 'This job has no stored video.'));
    return;
  }
  const video = el('video', { controls: true, preload: 'metadata', playsinline: true, src: source.url });
  video.addEventListener('error', () => {
    const note = box.querySelector('.video-note');
    if (note) note.textContent = 'this browser cannot play the video; open or download it instead';
  });
  fill(box, [
    video,
    el('p', { class: 'muted' },
      [source.content_type || job.video.content_type, bytes(source.size !== undefined ? source.size : job.video.size)].filter(Boolean).join(' · '),
      source.expires_at ? ` · link valid until ${when(source.expires_at)}` : '',
      ' · ', el('a', { href: source.url, target: '_blank', rel: 'noopener noreferrer' }, 'open')),
    el('p', { class: 'muted video-note' }),
    kv([['bucket', el('code', {}, job.video.bucket)], ['key', el('code', {}, job.video.key)], ['sha256', el('code', { class: 'wrap' }, job.video.sha256)]]),
  ]);
}

function thumbnail(label, url) {
  const img = el('img', { src: url, alt: `${label} image`, loading: 'lazy', referrerpolicy: 'no-referrer', class: 'thumb' });
  const caption = el('figcaption', {}, label, ' · ', url.startsWith('data:')
    ? 'data URI' : el('a', { href: url, target: '_blank', rel: 'noopener noreferrer' }, 'open'));
  img.addEventListener('error', () => { img.replaceWith(el('div', { class: 'thumb missing' }, 'image did not load')); });
  return el('figure', { class: 'figure' }, img, caption);
}

function renderRequest(job) {
  fillKeyed($('job-request'), { id: job.id, request: job.request }, () => {
    const req = job.request;
    if (!req) return el('p', { class: 'muted' }, 'The request could not be read.');
    const out = [];
    if (req.prompt) out.push(el('blockquote', { class: 'prompt' }, req.prompt));
    if (Array.isArray(req.multi_prompt)) {
      out.push(el('ol', { class: 'shots' }, req.multi_prompt.map((shot) =>
        el('li', {}, el('span', { class: 'muted' }, `${dash(shot.duration)} s · `), shot.prompt))));
    }
    const images = [];
    if (req.start_image_url) images.push(thumbnail('start', req.start_image_url));
    if (req.end_image_url) images.push(thumbnail('end', req.end_image_url));
    if (images.length) out.push(el('div', { class: 'thumbs' }, images));
    const known = new Set(['prompt', 'multi_prompt', 'start_image_url', 'end_image_url', 'duration',
      'generate_audio', 'cfg_scale', 'negative_prompt', 'shot_type', 'voice_ids', 'elements']);
    const rows = [
      ['duration', req.duration !== undefined ? `${req.duration} s` : null],
      ['billed', job.duration_seconds ? `${job.duration_seconds} s` : null],
      ['audio', req.generate_audio === undefined ? null : (req.generate_audio ? 'generated' : 'none')],
      ['cfg scale', req.cfg_scale],
      ['shot type', req.shot_type],
      ['negative prompt', req.negative_prompt],
      ['voices', Array.isArray(req.voice_ids) ? req.voice_ids.join(', ') : null],
      ['elements', Array.isArray(req.elements) ? pre(req.elements) : null],
      ['priority', job.priority],
    ];
    for (const [key, value] of Object.entries(req)) {
      if (!known.has(key)) rows.push([key, typeof value === 'object' ? pre(value) : String(value)]);
    }
    out.push(kv(rows));
    return out;
  });
}

function stepBar(job) {
  const steps = Object.entries(job.step_ms || {}).filter(([, ms]) => ms > 0);
  steps.sort((a, b) => (STEPS.indexOf(a[0]) + 99) % 99 - (STEPS.indexOf(b[0]) + 99) % 99);
  const total = steps.reduce((sum, [, ms]) => sum + ms, 0);
  if (!total) return el('p', { class: 'muted' }, 'No step timings yet.');
  const bar = el('div', { class: 'stepbar', role: 'img', 'aria-label': 'time per step' },
    steps.map(([name, ms]) => {
      const segment = el('div', { class: 'seg seg-' + name, title: `${name}: ${duration(ms)}` });
      segment.style.width = (ms / total * 100).toFixed(2) + '%';
      return segment;
    }));
  const legend = el('div', { class: 'steps' }, steps.map(([name, ms]) =>
    el('span', {}, el('i', { class: 'dot seg-' + name }), name + ' ', el('b', {}, duration(ms)))),
  el('span', {}, 'sum ', el('b', {}, duration(total))));
  return [bar, legend];
}

function renderTimeline(job) {
  fillKeyed($('job-steps'), job.step_ms || {}, () => stepBar(job));
  const timeline = Array.isArray(job.timeline) ? job.timeline : null;
  fillKeyed(document.querySelector('#job-timeline tbody'), timeline || 'none', () => {
    if (!timeline || !timeline.length) {
      return el('tr', {}, el('td', { colspan: 5, class: 'muted' }, 'This server does not keep a timeline; created ',
        when(job.created_at), job.started_at ? `, started ${when(job.started_at)}` : '',
        job.finished_at ? `, finished ${when(job.finished_at)}` : ''));
    }
    let previousAttempt = null;
    return timeline.map((entry, i) => {
      const prev = i ? Date.parse(timeline[i - 1].at) : null;
      const newAttempt = entry.attempt !== previousAttempt;
      previousAttempt = entry.attempt;
      return el('tr', { class: newAttempt && i ? 'new-attempt' : null, 'data-attempt': entry.attempt, 'data-state': entry.state },
        el('td', {}, newAttempt ? (entry.attempt ? `#${entry.attempt}` : 'enqueue') : ''),
        el('td', {}, badge(entry.state)),
        el('td', { class: 'muted' }, when(entry.at)),
        el('td', { class: 'muted' }, prev === null ? '' : '+' + duration(Date.parse(entry.at) - prev)),
        el('td', {}, dash(entry.reason)));
    });
  });
  const attempts = timeline ? new Set(timeline.map((e) => e.attempt).filter((a) => a > 0)).size : 0;
  $('job-timeline-note').textContent = attempts ? `${attempts} attempt${attempts === 1 ? '' : 's'}` : '';
}

function renderOutcome(job) {
  fillKeyed($('job-outcome'), { e: job.error, r: job.reason, s: job.state, f: job.finished_at }, () => {
    const out = [];
    if (job.error) {
      out.push(el('p', { class: 'error' }, `${job.error.step}: ${job.error.code}`),
        el('p', {}, job.error.message),
        kv([
          ['step', job.error.step], ['code', el('code', {}, job.error.code)],
          ['cost', job.error.cost_committed ? 'committed (a provider run was created)' : 'not committed'],
        ]));
      if (Array.isArray(job.error.details) && job.error.details.length) out.push(el('h3', {}, 'details'), pre(job.error.details));
    } else {
      out.push(el('p', { class: job.state === 'succeeded' ? 'ok' : 'muted' },
        job.state === 'succeeded' ? 'Succeeded.' : TERMINAL.has(job.state) ? job.state : 'Not finished.'));
    }
    out.push(kv([['reason', job.reason], ['finished', job.finished_at ? when(job.finished_at) : null],
      ['due', job.run_at ? when(job.run_at) : null]]));
    return out;
  });
}

function renderIds(job) {
  const p = job.provider || {};
  fillKeyed($('job-ids'), [job.provider, job.trace_id, job.metadata, job.updated_at], () => kv([
    ['job', el('code', { class: 'wrap' }, job.id)],
    ['batch', job.batch_id ? batchLink(job.batch_id, job.batch_id) : null],
    ['provider run', p.run_id ? el('code', { class: 'wrap', 'data-run-id': p.run_id }, p.run_id) : '–'],
    ['provider status', p.status],
    ['submitted', p.submitted_at ? when(p.submitted_at) : null],
    ['create requests', job.provider ? p.creates : null],
    ['provider cost', p.cost_usd !== undefined && p.cost_usd !== null ? usd(p.cost_usd) : null],
    ['trace', job.trace_id ? el('code', { class: 'wrap' }, job.trace_id) : '–'],
    ['idempotency key', job.idempotency_key ? el('code', { class: 'wrap' }, job.idempotency_key) : null],
    ['webhook', job.webhook_url ? el('code', { class: 'wrap' }, job.webhook_url) : null],
    ['created', when(job.created_at)],
    ['started', job.started_at ? when(job.started_at) : null],
    ['updated', when(job.updated_at)],
    ['metadata', job.metadata ? pre(job.metadata) : null],
  ]));
}

function curlFor(job) {
  // The request as enqueued, without the idempotency key (it would return this same job) and
  // without the webhook URL (shown redacted). The token stays a shell variable.
  const body = { request: job.request };
  if (job.metadata) body.metadata = job.metadata;
  if (job.priority && job.priority !== 'normal') body.priority = job.priority;
  const json = JSON.stringify(body).replace(/'/g, "'\\''");
  return `curl -X POST '${location.origin}/v1/jobs' \\\n  -H "Authorization: Bearer $KLINGQ_TOKEN" \\\n`
    + `  -H 'Content-Type: application/json' \\\n  -d '${json}'`;
}

async function copyCurl(job) {
  const text = curlFor(job);
  const box = $('job-curl-out');
  const area = $('job-curl-text');
  area.value = text;
  box.hidden = false;
  let copied = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      copied = true;
    }
  } catch { /* no clipboard permission: the text area below is the fallback */ }
  $('job-curl-note').textContent = copied ? 'copied to the clipboard' : 'select and copy';
  area.focus();
  area.select();
  toast(copied ? 'curl command copied' : 'select the command and copy it');
}

function renderJobHead(job) {
  fillKeyed($('job-head'), [job.state, job.attempts, job.redrives, job.estimated_usd, job.charged_usd, job.updated_at], () => {
    const actions = [];
    if (!TERMINAL.has(job.state)) {
      actions.push(el('button', {
        type: 'button', id: 'job-cancel', class: 'danger',
        onclick: (e) => act(e.currentTarget, `Cancel job ${job.id}?` + (ACTIVE.has(job.state)
          ? ' Its provider run, if one exists, is not stopped and its cost is committed.' : ''), 'Cancel job',
        () => post(`/v1/jobs/${encodeURIComponent(job.id)}/cancel`),
        (r) => r.cancelled ? `cancelled (was ${r.previous_state})` : `not cancelled: the job is ${r.state}`),
      }, 'Cancel'));
    }
    if (job.state === 'dead' || job.state === 'failed') {
      actions.push(el('button', {
        type: 'button', id: 'job-redrive',
        onclick: (e) => act(e.currentTarget, `Re-drive job ${job.id}? It gets a new life and resumes from its checkpoint.`, 'Re-drive',
          () => post('/v1/dead-letters/redrive', { ids: [job.id] }), redriveOutcome),
      }, 'Re-drive'));
    }
    if (job.request) {
      actions.push(el('button', { type: 'button', id: 'job-copy-curl', class: 'secondary', onclick: () => copyCurl(job) }, 'Copy as curl'));
    }
    return [
      el('div', { class: 'panel-head' },
        el('div', { class: 'head-title' }, el('h2', {}, 'Job'), badge(job.state)),
        el('div', { class: 'actions inline' }, actions)),
      el('p', { class: 'title-id' }, el('code', { class: 'wrap' }, job.id)),
      el('dl', { class: 'stats' },
        el('div', {}, el('dt', {}, 'attempts'), el('dd', {}, `${job.attempts}/${job.max_attempts}`)),
        el('div', {}, el('dt', {}, 're-drives'), el('dd', {}, job.redrives || 0)),
        el('div', {}, el('dt', {}, 'estimated'), el('dd', {}, usd(job.estimated_usd))),
        el('div', {}, el('dt', {}, 'charged'), el('dd', { id: 'job-charged' }, usd(job.charged_usd)))),
      el('p', { class: 'muted' }, `created ${ago(job.created_at)}`,
        ' · tenant ', el('code', { id: 'job-tenant' }, job.tenant || 'default'),
        job.batch_id ? [' · batch ', batchLink(job.batch_id)] : null,
        job.run_at && !TERMINAL.has(job.state) ? ` · due ${when(job.run_at)}` : null),
    ];
  });
  $('job-head').dataset.state = job.state;
}

async function renderDeliveries(job, r) {
  const tbody = document.querySelector('#job-deliveries tbody');
  let page;
  try {
    page = await apiOptional(`/v1/webhooks/deliveries?job_id=${encodeURIComponent(job.id)}&limit=50`);
  } catch (error) {
    if (error instanceof Unauthorized) throw error;
    page = null;
  }
  if (view !== r) return;
  const deliveries = page && Array.isArray(page.deliveries) ? page.deliveries : null;
  fillKeyed(tbody, deliveries || 'none', () => {
    if (!deliveries) return el('tr', {}, el('td', { colspan: 6, class: 'muted' }, '–'));
    if (!deliveries.length) return el('tr', {}, el('td', { colspan: 6, class: 'muted' }, 'No deliveries for this job.'));
    return deliveries.map((d) => el('tr', { 'data-delivery-id': d.id, 'data-status': d.status },
      el('td', {}, d.event_type, el('div', { class: 'muted' }, when(d.created_at)),
        d.replay_of ? el('div', { class: 'muted' }, 'replay of ', el('code', { title: d.replay_of }, shortId(d.replay_of))) : null),
      el('td', {}, el('span', { class: 'badge ' + d.status }, d.status)),
      el('td', {}, el('code', { class: 'wrap' }, d.endpoint)),
      el('td', {}, `${d.attempts}/${d.max_attempts}`),
      el('td', {}, d.last_status_code ? `HTTP ${d.last_status_code}` : '', d.last_error ? el('div', { class: 'muted' }, d.last_error) : null,
        d.next_attempt_at ? el('div', { class: 'muted' }, 'next ' + when(d.next_attempt_at)) : null),
      el('td', {}, REPLAYABLE.has(d.status) ? replayButton(d) : null)));
  });
}

async function refreshJobPage(r) {
  let job;
  try {
    job = await api('/v1/jobs/' + encodeURIComponent(r.id));
  } catch (error) {
    if (view !== r) return;
    if (error instanceof ApiError && (error.status === 404 || error.status === 422)) {
      fillKeyed($('job-head'), 'missing', () => [el('h2', {}, 'Job'), el('p', { class: 'error' }, `No job ${r.id}.`)]);
      return;
    }
    throw error;
  }
  if (view !== r) return;
  document.title = `job ${shortId(job.id)} · ${job.state} · klingq`;
  fill($('job-crumb'), job.batch_id ? [' · batch ', batchLink(job.batch_id)] : []);
  renderJobHead(job);
  renderRequest(job);
  renderTimeline(job);
  renderOutcome(job);
  renderIds(job);
  await Promise.all([renderVideo(job, r), renderDeliveries(job, r)]);
}

// ---- a batch's page ----------------------------------------------------------------------

function renderBatchHead(batch) {
  fillKeyed($('batch-head'), batch, () => [
    el('div', { class: 'panel-head' },
      el('div', { class: 'head-title' }, el('h2', {}, 'Batch'),
        el('span', { class: 'badge ' + (batch.done ? 'succeeded' : batch.paused ? 'failed' : 'active') }, batch.done ? 'done' : batch.paused ? 'paused' : batch.sealed ? 'running' : 'enqueueing')),
      el('div', { class: 'actions inline' }, batch.paused && !batch.done ? el('button', {
        type: 'button', id: 'batch-resume',
        onclick: (e) => act(e.currentTarget, `Resume batch ${batch.id}? Its held jobs are submitted again.`, 'Resume batch',
          () => post(`/v1/batches/${encodeURIComponent(batch.id)}/resume`),
          (res) => `resumed: ${res.resumed} held job${res.resumed === 1 ? '' : 's'} submitted again`),
      }, 'Resume batch') : null, batch.done ? null : el('button', {
        type: 'button', id: 'batch-cancel', class: 'danger',
        onclick: (e) => act(e.currentTarget, `Cancel the ${batch.total - batch.terminal} unfinished jobs of batch ${batch.id}?`, 'Cancel batch',
          () => post(`/v1/batches/${encodeURIComponent(batch.id)}/cancel`),
          (res) => `cancelled ${res.cancelled} job${res.cancelled === 1 ? '' : 's'}` + (res.cost_committed ? ` (${res.cost_committed} with committed cost)` : '')),
      }, 'Cancel batch'))),
    el('p', { class: 'title-id' }, el('code', { class: 'wrap' }, batch.id)),
    progressBar(batch.terminal, batch.total, batch.done, `batch ${batch.id} progress`),
    el('div', { id: 'batch-counts', class: 'counts' }, stateBadges(batch.counts)),
    el('dl', { class: 'stats' },
      el('div', {}, el('dt', {}, 'jobs'), el('dd', {}, batch.total)),
      el('div', {}, el('dt', {}, 'in flight'), el('dd', {}, batch.in_flight)),
      el('div', {}, el('dt', {}, 'estimated'), el('dd', {}, usd(batch.estimated_usd))),
      el('div', {}, el('dt', {}, 'charged'), el('dd', { id: 'batch-charged' }, usd(batch.charged_usd))),
      batch.done ? null : el('div', {}, el('dt', {}, 'finish (estimate)'), el('dd', { id: 'batch-eta' }, etaText(batch.eta))),
      batch.done ? null : el('div', {}, el('dt', {}, 'left (estimate)'), el('dd', {}, usd(batch.eta.remaining_usd)))),
    batch.paused ? el('p', { id: 'batch-paused', class: 'error' }, 'Paused: ', batch.pause_reason || 'by its failure guard',
      '. Its waiting jobs are held; runs already paid finish. Resume or cancel it.') : null,
    el('p', { class: 'muted' }, 'tenant ', el('code', { id: 'batch-tenant' }, batch.tenant || 'default'), ' · ',
      batch.budget_usd ? `budget ${usd(batch.budget_usd)} · ` : 'no budget · ',
      `created ${when(batch.created_at)}`, batch.finished_at ? ` · finished ${when(batch.finished_at)}` : '',
      batch.webhook_url ? [' · webhook ', el('code', {}, batch.webhook_url)] : null),
  ]);
}

// A batch's estimated finish, labelled as one.
function etaText(eta) {
  if (eta && eta.basis === 'paused') return 'none while paused';
  if (!eta || eta.remaining_secs == null) return 'estimating…';
  const secs = Math.round(eta.remaining_secs);
  const span = secs < 120 ? `${secs} s` : secs < 7200 ? `${Math.round(secs / 60)} min` : `${(secs / 3600).toFixed(1)} h`;
  const basis = eta.basis === 'fair_share' ? ', from every tenant\'s jobs left and the fair share' : ', at the slots it holds now';
  return `~${span}` + (eta.finish_at ? ` (${when(eta.finish_at)}${basis})` : '');
}

function videoTile(job) {
  const video = el('video', { preload: 'metadata', controls: true, playsinline: true, src: job.video.url });
  const tile = el('figure', { class: 'tile', 'data-job-id': job.id }, video,
    el('figcaption', {}, jobLink(job.id), ' · ', bytes(job.video.size)));
  // A fresher URL when the server can presign one.
  videoSource(job).then((source) => {
    if (source && source.url && source.url !== video.getAttribute('src')) video.setAttribute('src', source.url);
  }).catch(() => {});
  return tile;
}

async function refreshBatchPage(r) {
  let batch;
  try {
    batch = await api('/v1/batches/' + encodeURIComponent(r.id));
  } catch (error) {
    if (view !== r) return;
    if (error instanceof ApiError && (error.status === 404 || error.status === 422)) {
      fillKeyed($('batch-head'), 'missing', () => [el('h2', {}, 'Batch'), el('p', { class: 'error' }, `No batch ${r.id}.`)]);
      return;
    }
    throw error;
  }
  if (view !== r) return;
  document.title = `batch ${shortId(batch.id)} · ${batch.terminal}/${batch.total} · klingq`;
  renderBatchHead(batch);
  const params = new URLSearchParams({ batch_id: r.id, offset: String(r.offsets[r.offsets.length - 1]), limit: String(BATCH_PAGE) });
  if (r.state) params.set('state', r.state);
  const page = await api('/v1/jobs?' + params.toString());
  if (view !== r) return;
  r.next = page.next_offset;
  fillKeyed(document.querySelector('#batch-jobs tbody'), page.items.map((j) => [j.id, j.state, j.updated_at]), () => {
    const rows = page.items.map((job) => el('tr', { 'data-job-id': job.id, 'data-state': job.state },
      el('td', {}, jobLink(job.id)),
      el('td', {}, badge(job.state), job.attempts > 1 ? el('div', { class: 'muted' }, `attempt ${job.attempts}/${job.max_attempts}`) : null),
      el('td', {}, stepTimings(job)),
      el('td', { class: 'num' }, usd(job.charged_usd), el('div', { class: 'muted' }, 'est. ' + usd(job.estimated_usd))),
      el('td', {}, errorCell(job))));
    if (!rows.length) rows.push(el('tr', {}, el('td', { colspan: 5, class: 'muted' }, r.state ? `No ${r.state} job on this page.` : 'No jobs.')));
    return rows;
  });
  const first = r.offsets[r.offsets.length - 1];
  $('batch-page-note').textContent = page.items.length ? `${first + 1}–${first + page.items.length}${r.state ? ' (filtered)' : ''}` : '';
  $('batch-prev').disabled = r.offsets.length < 2;
  $('batch-next').disabled = page.next_offset === null || page.next_offset === undefined;
  const withVideo = page.items.filter((j) => j.state === 'succeeded' && j.video && j.video.url);
  fillKeyed($('batch-videos'), withVideo.map((j) => j.id), () => withVideo.length
    ? withVideo.map(videoTile) : el('p', { class: 'muted' }, 'No video on this page yet.'));
}

function setupBatchPage() {
  $('batch-state').addEventListener('change', () => {
    if (view.name !== 'batch') return;
    view.state = $('batch-state').value;
    view.offsets = [0];
    refreshAll();
  });
  $('batch-next').addEventListener('click', () => {
    if (view.name !== 'batch' || view.next === null || view.next === undefined) return;
    view.offsets.push(view.next);
    refreshAll();
  });
  $('batch-prev').addEventListener('click', () => {
    if (view.name !== 'batch' || view.offsets.length < 2) return;
    view.offsets.pop();
    refreshAll();
  });
}

// ---- routing -----------------------------------------------------------------------------

function parseRoute() {
  const match = location.hash.match(/^#\/(jobs|batches)\/([0-9A-Za-z_-]{1,100})\/?$/);
  if (!match) return { name: 'overview' };
  return match[1] === 'jobs' ? { name: 'job', id: match[2] } : { name: 'batch', id: match[2], state: '', offsets: [0], next: null };
}

function route() {
  view = parseRoute();
  for (const name of ['overview', 'job', 'batch']) $('view-' + name).hidden = view.name !== name;
  // A new page starts from empty sections.
  for (const node of document.querySelectorAll('#view-job [data-key], #view-batch [data-key]')) {
    delete node.dataset.key;
    node.replaceChildren();
  }
  $('job-curl-out').hidden = true;
  $('batch-state').value = '';
  if (view.name === 'overview') document.title = 'klingq dashboard';
  window.scrollTo(0, 0);
  refreshAll();
  if (view.name === 'overview') drawCharts();
}

// ---- refresh loop ----------------------------------------------------------------------

function report(error) {
  if (error instanceof Unauthorized) return;
  setLive('error', 'error: ' + error.message);
}

async function refreshViews() {
  if (needToken) return;
  let work;
  if (view.name === 'job') work = [refreshJobPage(view)];
  else if (view.name === 'batch') work = [refreshBatchPage(view)];
  else work = [refreshBatches(), refreshTenants(), refreshJobs(), refreshDead(), refreshWebhooks()];
  const results = await Promise.allSettled(work);
  const failed = results.find((r) => r.status === 'rejected');
  if (failed) report(failed.reason);
}

async function refreshAll() {
  if (needToken) return;
  const work = [refreshViews()];
  if (view.name === 'overview') work.push(refreshStats().catch(report), refreshHistory().catch(report));
  await Promise.allSettled(work);
}

/** Coalesces refreshes requested by events and buttons. */
function scheduleRefresh() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    refreshAll();
  }, 300);
}

// ---- events (SSE over fetch) -----------------------------------------------------------

let lastEventId = null;

async function readEvents(signal) {
  const h = headers({ Accept: 'text/event-stream' });
  if (lastEventId) h['Last-Event-ID'] = lastEventId;
  const response = await fetch('/v1/events', { headers: h, signal, cache: 'no-store' });
  if (response.status === 401) {
    askToken(Boolean(token));
    throw new Unauthorized('unauthorized');
  }
  if (!response.ok || !response.body) throw new Error('events: HTTP ' + response.status);
  eventsConnected = true;
  setLive('live', 'live');
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let frame = { id: null, event: 'message', data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let nl;
    while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + (buffer.startsWith('\r\n', nl) ? 2 : 1));
      if (line === '') {
        if (frame.data.length) onEvent(frame);
        frame = { id: null, event: 'message', data: [] };
        continue;
      }
      if (line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? '' : line.slice(colon + 1);
      if (val.startsWith(' ')) val = val.slice(1);
      if (field === 'id') { frame.id = val; lastEventId = val; }
      else if (field === 'event') frame.event = val;
      else if (field === 'data') frame.data.push(val);
    }
  }
}

function onEvent(frame) {
  if (frame.event === 'batch.completed') toast('batch completed');
  scheduleRefresh();
}

async function startEvents() {
  if (eventsAbort) eventsAbort.abort();
  const controller = new AbortController();
  eventsAbort = controller;
  let backoff = 1000;
  while (!controller.signal.aborted) {
    try {
      await readEvents(controller.signal);
      backoff = 1000;
    } catch (error) {
      eventsConnected = false;
      if (controller.signal.aborted || error instanceof Unauthorized) return;
      setLive('error', 'reconnecting…');
      await new Promise((resolve) => setTimeout(resolve, backoff));
      backoff = Math.min(backoff * 2, 30000);
    }
  }
}

// ---- start -----------------------------------------------------------------------------

function start() {
  setupToken();
  setupJobs();
  setupBatchPage();
  $('redrive-all').addEventListener('click', (e) => act(e.currentTarget, 'Re-drive every dead job?', 'Re-drive all',
    () => post('/v1/dead-letters/redrive', { all: true }), redriveOutcome));
  window.addEventListener('resize', () => { if (view.name === 'overview') drawCharts(); });
  window.addEventListener('hashchange', route);
  route();
  startEvents();
  const visible = () => !needToken && !document.hidden;
  setInterval(() => { if (visible() && view.name === 'overview') refreshStats().catch(report); }, STATS_EVERY_MS);
  setInterval(() => { if (visible() && view.name === 'overview') refreshHistory().catch(report); }, HISTORY_EVERY_MS);
  setInterval(() => { if (visible()) refreshViews(); }, VIEWS_EVERY_MS);
  window.addEventListener('pagehide', () => { if (eventsAbort) eventsAbort.abort(); });
}

document.addEventListener('DOMContentLoaded', start);
