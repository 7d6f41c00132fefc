// klingq dashboard: vanilla JS over the HTTP API. Data calls carry the bearer token kept in
// localStorage; live updates come from GET /v1/events (SSE) read with fetch so the
// Authorization header can be sent, plus a periodic refresh of the statistics.
'use strict';

const TOKEN_KEY = 'klingq.token';
const STATS_EVERY_MS = 3000;
const VIEWS_EVERY_MS = 5000;
const CHART_WINDOW_MS = 10 * 60 * 1000;
const RATE_WINDOW_MS = 30 * 1000;
// A rate over less time than this is noise.
const MIN_RATE_SPAN_MS = 8 * 1000;
const STATES = ['queued', 'scheduled', 'submitting', 'generating', 'downloading', 'uploading',
  'publishing', 'succeeded', 'failed', 'cancelled', 'dead'];
const ACTIVE = new Set(['submitting', 'generating', 'downloading', 'uploading', 'publishing']);
const STEPS = ['submit', 'generate', 'download', 'upload', 'publish'];

const $ = (id) => document.getElementById(id);
let token = localStorage.getItem(TOKEN_KEY) || '';
let needToken = false;
let samples = [];
let eventsAbort = null;
let refreshTimer = null;
let eventsConnected = false;

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

function svg(tag, attrs) {
  const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

const usd = (n) => (n === null || n === undefined) ? '–' : '$' + Number(n).toFixed(2);
// UUIDv7 ids share their leading time digits, so show both ends.
const shortId = (id) => id ? id.slice(0, 8) + '…' + id.slice(-6) : '';

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

function stateClass(state) {
  if (ACTIVE.has(state)) return 'badge active';
  return 'badge ' + state;
}

function toast(text) {
  const node = $('toast');
  node.textContent = text;
  node.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { node.hidden = true; }, 4000);
}

function setLive(state, text) {
  const node = $('live');
  node.dataset.state = state;
  node.textContent = text;
}

/** Replaces a container's children. */
function fill(node, children) {
  node.replaceChildren(...children);
}

// ---- API -------------------------------------------------------------------------------

class Unauthorized extends Error {}

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
    throw new Error(message || ('HTTP ' + response.status));
  }
  return body;
}

function post(path, body) {
  return api(path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body || {}),
  });
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

// ---- stats and chart -------------------------------------------------------------------

function finishedTotal(stats) {
  return Object.values(stats.finished || {}).reduce((a, b) => a + b, 0);
}

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
  samples.push({ t: stats.at_ms, finished: finishedTotal(stats) });
  samples = samples.filter((x) => x.t >= stats.at_ms - CHART_WINDOW_MS - RATE_WINDOW_MS);
  drawChart();
}

/** Jobs per minute at each sample, over a sliding window. */
function rates() {
  const out = [];
  let j = 0;
  for (let i = 1; i < samples.length; i++) {
    while (j < i - 1 && samples[i].t - samples[j + 1].t >= RATE_WINDOW_MS) j++;
    const dt = samples[i].t - samples[j].t;
    if (dt < MIN_RATE_SPAN_MS) continue;
    const dn = Math.max(0, samples[i].finished - samples[j].finished);
    out.push({ t: samples[i].t, rate: dn / dt * 60000 });
  }
  return out;
}

function drawChart() {
  const box = $('chart');
  const width = Math.max(300, box.clientWidth || 600);
  const height = 180;
  const pad = { l: 40, r: 10, t: 10, b: 22 };
  const points = rates();
  const now = samples.length ? samples[samples.length - 1].t : Date.now();
  const t0 = now - CHART_WINDOW_MS;
  const max = Math.max(1, ...points.map((p) => p.rate));
  const top = niceCeil(max);
  const x = (t) => pad.l + (width - pad.l - pad.r) * Math.max(0, (t - t0)) / CHART_WINDOW_MS;
  const y = (r) => pad.t + (height - pad.t - pad.b) * (1 - r / top);
  const root = svg('svg', { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: 'none' });
  for (const frac of [0, 0.5, 1]) {
    const yy = y(top * frac);
    root.append(svg('line', { class: 'axis', x1: pad.l, x2: width - pad.r, y1: yy, y2: yy }));
    const label = svg('text', { x: pad.l - 6, y: yy + 4, 'text-anchor': 'end' });
    label.textContent = formatRate(top * frac);
    root.append(label);
  }
  for (const minutes of [10, 5, 0]) {
    const label = svg('text', { x: x(now - minutes * 60000), y: height - 6, 'text-anchor': minutes === 10 ? 'start' : minutes === 0 ? 'end' : 'middle' });
    label.textContent = minutes ? `-${minutes} min` : 'now';
    root.append(label);
  }
  const visible = points.filter((p) => p.t >= t0);
  if (visible.length >= 1) {
    const coords = visible.map((p) => `${x(p.t).toFixed(1)},${y(p.rate).toFixed(1)}`);
    const baseline = y(0).toFixed(1);
    root.append(svg('polygon', {
      class: 'area',
      points: `${x(visible[0].t).toFixed(1)},${baseline} ${coords.join(' ')} ${x(visible[visible.length - 1].t).toFixed(1)},${baseline}`,
    }));
    root.append(svg('polyline', { class: 'line', points: coords.join(' ') }));
  } else {
    const label = svg('text', { x: width / 2, y: height / 2, 'text-anchor': 'middle' });
    label.textContent = 'collecting samples…';
    root.append(label);
  }
  box.replaceChildren(root);
  box.setAttribute('aria-label', `jobs finished per minute: ${visible.length ? formatRate(visible[visible.length - 1].rate) : 'no data yet'}`);
}

function niceCeil(n) {
  const pow = Math.pow(10, Math.floor(Math.log10(n)));
  for (const m of [1, 2, 5, 10]) if (n <= m * pow) return m * pow;
  return 10 * pow;
}

function formatRate(r) {
  return r >= 10 ? Math.round(r).toString() : r.toFixed(1);
}

// ---- batches ---------------------------------------------------------------------------

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

async function refreshBatches() {
  const page = await api('/v1/batches?limit=20');
  const rows = page.items.map((b) => {
    const states = STATES.filter((s) => b.counts[s]).map((s) =>
      el('span', { class: stateClass(s) }, `${s} ${b.counts[s]}`));
    return el('tr', { 'data-batch-id': b.id, 'data-done': b.done ? 'true' : 'false' },
      el('td', {}, el('code', { title: b.id }, shortId(b.id)), b.done ? el('div', { class: 'muted' }, 'done') : null),
      el('td', { class: 'muted' }, ago(b.created_at)),
      el('td', {}, progressBar(b.terminal, b.total, b.done, `batch ${b.id} progress`)),
      el('td', {}, el('div', { class: 'states' }, states)),
      el('td', { class: 'num' }, usd(b.charged_usd),
        el('div', { class: 'muted' }, 'est. ' + usd(b.estimated_usd) + (b.budget_usd ? ' / cap ' + usd(b.budget_usd) : ''))),
    );
  });
  if (!rows.length) rows.push(el('tr', {}, el('td', { colspan: 5, class: 'muted' }, 'No batches yet.')));
  fill(document.querySelector('#batches tbody'), rows);
  $('batches-note').textContent = page.next_offset !== null && page.next_offset !== undefined ? 'the 20 newest' : '';
}

// ---- jobs ------------------------------------------------------------------------------

function stepTimings(job) {
  const steps = STEPS.filter((s) => job.step_ms && job.step_ms[s] !== undefined)
    .map((s) => el('span', {}, s + ' ', el('b', {}, duration(job.step_ms[s]))));
  for (const [name, ms] of Object.entries(job.step_ms || {})) {
    if (!STEPS.includes(name)) steps.push(el('span', {}, name + ' ', el('b', {}, duration(ms))));
  }
  if (job.started_at && job.finished_at) {
    steps.push(el('span', {}, 'total ', el('b', {}, duration(Date.parse(job.finished_at) - Date.parse(job.started_at)))));
  } else if (job.started_at) {
    steps.push(el('span', {}, 'elapsed ', el('b', {}, duration(Date.now() - Date.parse(job.started_at)))));
  }
  return steps.length ? el('div', { class: 'steps' }, steps) : el('span', { class: 'muted' }, '–');
}

async function refreshJobs() {
  const params = new URLSearchParams({ limit: '50' });
  const q = $('job-q').value.trim();
  const state = $('job-state').value;
  if (q) params.set('q', q);
  if (state) params.set('state', state);
  const page = await api('/v1/jobs?' + params.toString());
  const rows = page.items.map((job) => el('tr', { 'data-job-id': job.id, 'data-state': job.state },
    el('td', {}, el('code', { title: job.id }, shortId(job.id)),
      job.batch_id ? el('div', { class: 'muted' }, 'batch ', el('code', { title: job.batch_id }, shortId(job.batch_id))) : null,
      job.trace_id ? el('div', { class: 'muted' }, 'trace ', el('code', { title: job.trace_id }, job.trace_id.slice(0, 8))) : null),
    el('td', {}, el('span', { class: stateClass(job.state) }, job.state),
      job.attempts > 1 ? el('div', { class: 'muted' }, `attempt ${job.attempts}/${job.max_attempts}`) : null),
    el('td', {}, stepTimings(job)),
    el('td', { class: 'muted' }, ago(job.created_at)),
    el('td', {}, job.error
      ? el('span', { class: 'error', title: job.error.message }, `${job.error.step}: ${job.error.code}`,
        el('div', { class: 'muted' }, job.error.message))
      : (job.reason && !['succeeded'].includes(job.state) ? el('span', { class: 'muted' }, job.reason) : '')),
  ));
  if (!rows.length) rows.push(el('tr', {}, el('td', { colspan: 5, class: 'muted' }, q || state ? 'No job matches.' : 'No jobs yet.')));
  fill(document.querySelector('#jobs tbody'), rows);
  $('jobs-note').textContent = page.items.length && page.next_offset !== null && page.next_offset !== undefined
    ? `showing ${page.items.length} (searched ${page.scanned} recent jobs)` : '';
}

function setupJobs() {
  const select = $('job-state');
  for (const s of STATES) select.append(el('option', { value: s }, s));
  let timer = null;
  $('job-q').addEventListener('input', () => {
    clearTimeout(timer);
    timer = setTimeout(() => refreshJobs().catch(report), 250);
  });
  select.addEventListener('change', () => refreshJobs().catch(report));
  $('job-search').addEventListener('submit', (event) => {
    event.preventDefault();
    refreshJobs().catch(report);
  });
}

// ---- dead letters ----------------------------------------------------------------------

async function redrive(body, button) {
  if (button) button.disabled = true;
  try {
    const result = await post('/v1/dead-letters/redrive', body);
    toast(`re-driven: ${result.redriven}`);
  } catch (error) {
    report(error);
  }
  scheduleRefresh();
}

async function refreshDead() {
  const page = await api('/v1/dead-letters?limit=50');
  const items = page.items.map((job) => el('li', { 'data-dead-id': job.id },
    el('div', { class: 'grow' },
      el('code', { title: job.id }, job.id),
      el('div', { class: 'muted' }, job.error ? `${job.error.step}: ${job.error.code} — ${job.error.message}` : (job.reason || 'dead'),
        ` · after ${job.attempts} attempt${job.attempts === 1 ? '' : 's'}`)),
    el('button', { type: 'button', 'data-redrive': job.id, onclick: (e) => redrive({ ids: [job.id] }, e.currentTarget) }, 'Re-drive'),
  ));
  if (!items.length) items.push(el('li', { class: 'empty' }, 'No dead letters.'));
  fill($('dead'), items);
  $('redrive-all').hidden = page.total < 2;
}

// ---- webhooks --------------------------------------------------------------------------

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
        type: 'button', onclick: async (e) => {
          e.currentTarget.disabled = true;
          try { await post(`/v1/webhooks/endpoints/${ep.endpoint_id}/enable`); toast('endpoint enabled'); } catch (error) { report(error); }
          scheduleRefresh();
        },
      }, 'Enable') : null,
    );
  });
  if (!endpoints.length) endpoints.push(el('li', { class: 'empty' }, 'No deliveries yet.'));
  fill($('endpoints'), endpoints);
  const deliveries = exhausted.deliveries.map((d) => el('li', { 'data-delivery-id': d.id },
    el('div', { class: 'grow' },
      el('span', {}, d.event_type, ' → ', el('code', {}, d.endpoint)),
      el('div', { class: 'muted' }, `${d.attempts} attempts · ${d.last_error || 'no answer'}`)),
    el('button', {
      type: 'button', onclick: async (e) => {
        e.currentTarget.disabled = true;
        try { await post(`/v1/webhooks/deliveries/${d.id}/replay`); toast('delivery replayed'); } catch (error) { report(error); }
        scheduleRefresh();
      },
    }, 'Replay'),
  ));
  if (!deliveries.length) deliveries.push(el('li', { class: 'empty' }, 'None.'));
  fill($('exhausted'), deliveries);
}

// ---- refresh loop ----------------------------------------------------------------------

function report(error) {
  if (error instanceof Unauthorized) return;
  setLive('error', 'error: ' + error.message);
}

async function refreshViews() {
  if (needToken) return;
  const results = await Promise.allSettled([refreshBatches(), refreshJobs(), refreshDead(), refreshWebhooks()]);
  const failed = results.find((r) => r.status === 'rejected');
  if (failed) report(failed.reason);
}

async function refreshAll() {
  if (needToken) return;
  await Promise.allSettled([refreshStats().catch(report), refreshViews()]);
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
  $('redrive-all').addEventListener('click', (e) => redrive({ all: true }, e.currentTarget));
  window.addEventListener('resize', () => drawChart());
  drawChart();
  refreshAll();
  startEvents();
  setInterval(() => { if (!needToken && !document.hidden) refreshStats().catch(report); }, STATS_EVERY_MS);
  setInterval(() => { if (!document.hidden) refreshViews(); }, VIEWS_EVERY_MS);
  window.addEventListener('pagehide', () => { if (eventsAbort) eventsAbort.abort(); });
}

document.addEventListener('DOMContentLoaded', start);
