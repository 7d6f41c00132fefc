// The dashboard in headless Chromium (Debian's `chromium`, driven by playwright-core) against a
// live `klingq demo`: the page loads with no console errors, a running batch progresses to done,
// the charts are drawn from the server's history right after a load, the job search finds a
// job, and re-driving a dead letter takes it off the dead list. A job's page (`/#/jobs/{id}`)
// shows its video (its source answers 200 video/mp4), timeline, request and deliveries, replays
// a delivery, copies the request as curl, cancels a scheduled job and re-drives a dead one; a
// batch's page (`/#/batches/{id}`) shows its counts, jobs and videos; pages fit a phone's width.
// Every action is confirmed in the page's dialog. Screenshots go to tests/browser/artifacts/.
// Prints `N passed, N failed`; exits 1 on failure.
//
// Environment:
//   KLINGQ_BIN        the klingq binary (default: <repo>/target/debug/klingq)
//   CHROMIUM          the browser (default: /usr/bin/chromium)
//   KLINGQ_REDIS_URL  Redis for the demo (default: redis://127.0.0.1:6379)

import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '..', '..');
const bin = process.env.KLINGQ_BIN || join(repo, 'target', 'debug', 'klingq');
const browserPath = process.env.CHROMIUM || '/usr/bin/chromium';
const artifacts = join(here, 'artifacts');
const namespace = `browser-test-${process.pid}-${Date.now()}`;
const JOBS = 12;

let passed = 0;
let failed = 0;
const results = [];

function log(...args) {
  console.log(new Date().toISOString().slice(11, 23), ...args);
}

async function check(name, fn) {
  try {
    await fn();
    passed++;
    results.push(`ok    ${name}`);
    log(`ok: ${name}`);
  } catch (error) {
    failed++;
    results.push(`FAIL  ${name}: ${error.message}`);
    log(`FAIL: ${name}: ${error.stack || error.message}`);
  }
}

function assert(condition, message) {
  if (!condition) throw new Error(message);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Clicks a button that asks to confirm, confirms in the page's dialog, and returns what the
 * page's next message (toast) says.
 */
async function clickConfirmed(page, button) {
  const toast = page.locator('#toast');
  const before = Number(await toast.getAttribute('data-seq')) || 0;
  await button.click();
  await page.locator('#confirm-dialog[open]').waitFor({ timeout: 10000 });
  await page.click('#confirm-ok');
  await page.locator('#confirm-dialog').waitFor({ state: 'hidden', timeout: 10000 });
  await waitFor('the outcome message', async () => Number(await toast.getAttribute('data-seq')) > before, 15000);
  return toast.textContent();
}

/** Opens a dashboard route (`#/jobs/…`) in the page, as a link would. */
async function openRoute(page, base, hash) {
  if (page.url().startsWith(base + '/')) {
    await page.evaluate((h) => { window.location.hash = h; }, hash);
  } else {
    await page.goto(base + '/' + hash, { waitUntil: 'load' });
  }
}

/** How far the document is wider than the screen, in pixels. */
function overflowOf(page) {
  return page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
}

async function waitFor(what, fn, timeoutMs = 60000, everyMs = 250) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const value = await fn();
      if (value) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? ': ' + last.message : ''}`);
    await sleep(everyMs);
  }
}

function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

async function startDemo(port, dataDir) {
  const env = { ...process.env };
  for (const name of ['RUNFLOW_API_KEY', 'AWS_ACCESS_KEY_ID', 'KLINGQ_S3_ENDPOINT', 'KLINGQ_API_TOKENS']) delete env[name];
  Object.assign(env, {
    KLINGQ_NAMESPACE: namespace,
    // One delivery per job, so a job whose submit keeps failing goes to the dead letters.
    KLINGQ_MAX_ATTEMPTS: '1',
    // Two provider slots keep the batch visibly in progress for a while.
    KLINGQ_PROVIDER_CONCURRENCY: '2',
    RUST_LOG: env.RUST_LOG || 'warn',
    NO_COLOR: '1',
  });
  const args = ['demo', '--jobs', String(JOBS), '--keep-running', '--bind', `127.0.0.1:${port}`, '--data-dir', dataDir];
  log(`starting ${bin} ${args.join(' ')} (namespace ${namespace})`);
  const child = spawn(bin, args, { env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let output = '';
  child.stdout.on('data', (d) => { output += d; });
  child.stderr.on('data', (d) => { output += d; });
  child.output = () => output;
  const exited = new Promise((r) => child.on('exit', (code, signal) => r({ code, signal })));
  child.exited = exited;
  const base = await Promise.race([
    waitFor('the demo to print its dashboard URL', () => {
      const match = output.match(/dashboard and API: (http:\/\/[^\s/]+)\//);
      return match && match[1];
    }, 120000),
    exited.then(({ code }) => { throw new Error(`klingq demo exited (${code}):\n${output}`); }),
  ]);
  return { child, base };
}

async function stopDemo(child) {
  if (!child || child.exitCode !== null) return;
  try { process.kill(-child.pid, 'SIGTERM'); } catch { /* already gone */ }
  const stopped = await Promise.race([child.exited, sleep(15000).then(() => null)]);
  if (!stopped) {
    try { process.kill(-child.pid, 'SIGKILL'); } catch { /* already gone */ }
  }
}

function cleanRedis() {
  const url = process.env.KLINGQ_REDIS_URL || 'redis://127.0.0.1:6379';
  const keys = spawnSync('redis-cli', ['-u', url, '--scan', '--pattern', `{${namespace}}*`], { encoding: 'utf8' });
  if (keys.status !== 0 || !keys.stdout.trim()) return;
  const list = keys.stdout.trim().split('\n');
  for (let i = 0; i < list.length; i += 500) {
    spawnSync('redis-cli', ['-u', url, 'DEL', ...list.slice(i, i + 500)], { encoding: 'utf8' });
  }
}

async function api(base, path, options = {}) {
  const response = await fetch(base + path, {
    ...options,
    headers: { 'content-type': 'application/json', ...(options.headers || {}) },
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error(`${options.method || 'GET'} ${path}: ${response.status} ${JSON.stringify(body)}`);
  return body;
}

/** Starts `klingq serve` with a token on the demo's namespace. */
async function startServe(port, token) {
  const env = { ...process.env, KLINGQ_NAMESPACE: namespace, KLINGQ_API_TOKENS: token, RUST_LOG: 'warn', NO_COLOR: '1' };
  const child = spawn(bin, ['serve', '--bind', `127.0.0.1:${port}`], { env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let output = '';
  child.stdout.on('data', (d) => { output += d; });
  child.stderr.on('data', (d) => { output += d; });
  child.output = () => output;
  child.exited = new Promise((r) => child.on('exit', (code, signal) => r({ code, signal })));
  const base = `http://127.0.0.1:${port}`;
  await waitFor('klingq serve to be ready', async () => {
    if (child.exitCode !== null) throw new Error(`klingq serve exited: ${output}`);
    return (await fetch(base + '/readyz')).ok;
  }, 30000);
  return { child, base };
}

/** The token form: shown on 401, a wrong token refused, the right one kept across reloads. */
async function checkTokenFlow(context, batchId) {
  const token = `browser-${process.pid}-${Date.now()}`;
  const serve = await startServe(await freePort(), token);
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (error) => errors.push(`page error: ${error.message}`));
  page.on('console', (message) => {
    // The 401 answers that make the page ask for a token are expected here.
    if (message.type() === 'error' && !/status of 401/.test(message.text())) errors.push(message.text());
  });
  try {
    await page.goto(serve.base + '/');
    await page.locator('#token-dialog[open]').waitFor({ timeout: 15000 });
    await page.fill('#token-input', 'wrong-token');
    await page.click('#token-form button[type=submit]');
    await page.locator('#token-error').waitFor({ state: 'visible', timeout: 15000 });
    await page.fill('#token-input', token);
    await page.click('#token-form button[type=submit]');
    await page.locator('#token-dialog').waitFor({ state: 'hidden', timeout: 15000 });
    await page.locator(`#batches tr[data-batch-id="${batchId}"]`).waitFor({ timeout: 15000 });
    await page.reload();
    await page.locator(`#batches tr[data-batch-id="${batchId}"]`).waitFor({ timeout: 15000 });
    assert(!(await page.locator('#token-dialog').isVisible()), 'the token was asked again after a reload');
    await page.screenshot({ path: join(artifacts, 'with-token.png'), fullPage: true });
    assert(errors.length === 0, errors.join('\n'));
  } finally {
    await page.close();
    await stopDemo(serve.child);
  }
}

async function main() {
  mkdirSync(artifacts, { recursive: true });
  const scratch = mkdtempSync(join(tmpdir(), 'klingq-browser-'));
  let demo;
  let context;
  const consoleErrors = [];
  try {
    demo = await startDemo(await freePort(), join(scratch, 's3'));
    const base = demo.base;
    log(`demo at ${base}`);

    // A job whose submit fails 5 times (the client's in-process retries), then succeeds: its
    // first life ends dead (one attempt allowed), its re-driven life succeeds.
    const dead = await api(base, '/v1/jobs', {
      method: 'POST',
      body: JSON.stringify({
        start_image_url: 'https://example.com/dead.png',
        prompt: `a dead letter for the browser test ${namespace} [[sim:500:5]]`,
        metadata: { test: 'dead-letter', run: namespace },
      }),
    });
    // Another such job, re-driven from its own page.
    const dead2 = await api(base, '/v1/jobs', {
      method: 'POST',
      body: JSON.stringify({
        start_image_url: 'https://example.com/dead2.png',
        prompt: `a second dead letter for the browser test ${namespace} [[sim:500:5]]`,
        metadata: { test: 'dead-letter-page', run: namespace },
      }),
    });
    const batchId = await waitFor('the demo batch', async () => {
      const page = await api(base, '/v1/batches');
      return page.items.length ? page.items[0].id : null;
    });
    log(`batch ${batchId}, dead-letter job ${dead.id}`);

    const userDataDir = join(scratch, 'profile');
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: browserPath,
      headless: true,
      viewport: { width: 1360, height: 1000 },
      args: [
        '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ],
    });
    const page = context.pages()[0] || await context.newPage();
    page.on('console', (message) => {
      if (message.type() !== 'error') return;
      // The demo's start images are on the internet, which the test machine may not reach: a
      // thumbnail that fails to load elsewhere than this machine is not the page's error.
      const url = (message.location() && message.location().url) || '';
      if (/^Failed to load resource/.test(message.text()) && /^https?:/.test(url)
        && !/^https?:\/\/(127\.0\.0\.1|localhost)[:/]/.test(url)) return;
      consoleErrors.push(`console: ${message.text()} (${url})`);
    });
    page.on('pageerror', (error) => consoleErrors.push(`page error: ${error.message}`));

    await check('the page loads from the binary', async () => {
      const response = await page.goto(base + '/', { waitUntil: 'load' });
      assert(response && response.status() === 200, `GET / answered ${response && response.status()}`);
      assert((await page.title()) === 'klingq dashboard', `title is ${await page.title()}`);
    });

    const row = page.locator(`#batches tr[data-batch-id="${batchId}"]`);
    const bar = row.locator('[role="progressbar"]');
    let firstSeen = -1;
    await check('a running batch is shown in progress', async () => {
      await row.waitFor({ timeout: 20000 });
      firstSeen = Number(await bar.getAttribute('aria-valuenow'));
      assert(firstSeen < 100, `the batch was already done when the page loaded (${firstSeen}%)`);
      await page.locator('#v-in-flight').filter({ hasText: /^\d+$/ }).waitFor({ timeout: 10000 });
      await page.screenshot({ path: join(artifacts, 'batch-in-progress.png'), fullPage: true });
    });

    await check('the batch progresses to done (100%)', async () => {
      let sawProgress = false;
      await waitFor('the progress bar to reach 100%', async () => {
        const now = Number(await bar.getAttribute('aria-valuenow'));
        if (now > firstSeen) sawProgress = true;
        return now === 100 && (await row.getAttribute('data-done')) === 'true';
      }, 180000, 500);
      assert(sawProgress, 'the bar never moved');
      await page.screenshot({ path: join(artifacts, 'batch-done.png'), fullPage: true });
    });

    await check('the stats cards and chart show the finished jobs', async () => {
      await waitFor('succeeded count', async () => Number(await page.locator('#f-succeeded').textContent()) >= JOBS, 20000);
      await page.locator('#chart svg rect.bar').first().waitFor({ timeout: 20000 });
    });

    await check('the charts are drawn from the server history right after a load', async () => {
      await page.reload({ waitUntil: 'load' });
      // In-browser sampling needed two samples 8 s apart; the history is there at once.
      await page.locator('#chart[data-source="history"] svg rect.bar').first().waitFor({ timeout: 5000 });
      const total = Number(await page.locator('#chart').getAttribute('data-total'));
      assert(total >= JOBS, `the throughput chart shows ${total} jobs, expected at least ${JOBS}`);
      assert(!/collecting samples/.test(await page.locator('#chart').textContent()), 'the chart is still collecting samples');
      await page.locator('#spend-chart[data-source="history"] svg rect.bar').first().waitFor({ timeout: 5000 });
      const spend = Number(await page.locator('#spend-chart').getAttribute('data-total'));
      assert(spend > 0, `the spend chart shows ${spend}`);
      await page.screenshot({ path: join(artifacts, 'overview-history.png'), fullPage: true });
    });

    await check('the job search finds a job by id prefix', async () => {
      await page.fill('#job-q', dead.id.slice(0, 18));
      await waitFor('the search result', async () => {
        const ids = await page.locator('#jobs tbody tr[data-job-id]').evaluateAll((rows) => rows.map((r) => r.dataset.jobId));
        return ids.length === 1 && ids[0] === dead.id;
      }, 20000);
      await page.fill('#job-q', '');
    });

    await check('re-driving a dead letter takes it off the dead list', async () => {
      const item = page.locator(`#dead li[data-dead-id="${dead.id}"]`);
      await item.waitFor({ timeout: 60000 });
      await page.screenshot({ path: join(artifacts, 'dead-letter.png'), fullPage: true });
      await clickConfirmed(page, item.locator('button[data-redrive]'));
      await item.waitFor({ state: 'detached', timeout: 30000 });
      const job = await waitFor('the re-driven job to succeed', async () => {
        const j = await api(base, `/v1/jobs/${dead.id}`);
        return j.state === 'succeeded' ? j : null;
      }, 90000, 500);
      assert(job.redrives === 1, `redrives is ${job.redrives}`);
      await page.screenshot({ path: join(artifacts, 'redriven.png'), fullPage: true });
    });

    await check('webhook endpoint health is listed', async () => {
      await waitFor('an endpoint with deliveries', async () =>
        (await page.locator('#endpoints li[data-endpoint-id]').count()) >= 1, 30000);
    });

    await check('the page fits a phone screen', async () => {
      await page.setViewportSize({ width: 390, height: 844 });
      await sleep(300);
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      assert(overflow <= 1, `the page is ${overflow}px wider than the screen`);
      await page.screenshot({ path: join(artifacts, 'phone.png'), fullPage: false });
      await page.setViewportSize({ width: 1360, height: 1000 });
    });

    // ---- a job's page and a batch's page ----
    const succeeded = await api(base, `/v1/jobs?batch_id=${batchId}&state=succeeded&limit=1`);
    const okJob = succeeded.items[0];

    await check("a succeeded job's page shows its video, timeline and request", async () => {
      assert(okJob, 'no succeeded job in the demo batch');
      await openRoute(page, base, `#/jobs/${okJob.id}`);
      await page.locator('#job-head[data-state="succeeded"]').waitFor({ timeout: 20000 });
      const video = page.locator('#job-video video');
      await video.waitFor({ timeout: 20000 });
      const src = await video.getAttribute('src');
      assert(src && /^https?:\/\//.test(src), `the video's src is ${src}`);
      const response = await fetch(src);
      assert(response.status === 200, `the video's source answered ${response.status}`);
      const type = response.headers.get('content-type') || '';
      assert(type.split(';')[0].trim() === 'video/mp4', `the video's source is ${type}`);
      const body = new Uint8Array(await response.arrayBuffer());
      assert(body.length > 8 && String.fromCharCode(...body.slice(4, 8)) === 'ftyp', 'the video is not an MP4');
      // Metadata when Chromium can read the file; Debian's Chromium may lack the codec, which
      // is not the page's fault.
      const media = await waitFor('the video to load its metadata or refuse the format', () =>
        video.evaluate((v) => (v.readyState >= 1 || v.error ? { readyState: v.readyState, error: v.error && v.error.code } : null)), 30000);
      assert(media.readyState >= 1 || media.error === 4, `the video failed to load (media error ${media.error})`);
      log(media.readyState >= 1 ? `the video's metadata loaded (readyState ${media.readyState})`
        : 'this Chromium cannot decode the demo video (MEDIA_ERR_SRC_NOT_SUPPORTED); its source was checked');
      const job = await api(base, `/v1/jobs/${okJob.id}`);
      if (Array.isArray(job.timeline) && job.timeline.length) {
        await waitFor('the timeline rows', async () =>
          (await page.locator('#job-timeline tbody tr[data-state]').count()) === job.timeline.length, 20000);
        const states = await page.locator('#job-timeline tbody tr[data-state]').evaluateAll((rows) => rows.map((r) => r.dataset.state));
        assert(states[states.length - 1] === 'succeeded', `the timeline ends in ${states[states.length - 1]}`);
      } else {
        log('the server sends no timeline yet: its rows were not checked');
      }
      await page.locator('#job-steps .stepbar .seg-generate').waitFor({ timeout: 10000 });
      if (job.provider && job.provider.run_id) {
        await page.locator(`#job-ids [data-run-id="${job.provider.run_id}"]`).waitFor({ timeout: 10000 });
      }
      assert((await page.locator('#job-request .prompt').textContent()) === job.request.prompt, 'the prompt is not shown');
      assert(await page.locator('#job-request figure').count() >= 1, 'no start image thumbnail');
      assert((await page.locator('#job-cancel').count()) === 0, 'a succeeded job offers Cancel');
      await page.screenshot({ path: join(artifacts, 'job.png'), fullPage: true });
    });

    await check("Copy as curl gives the job's request, without a token", async () => {
      assert(okJob, 'no succeeded job');
      await page.click('#job-copy-curl');
      const text = await page.locator('#job-curl-text').inputValue();
      assert(text.startsWith(`curl -X POST '${base}/v1/jobs'`), `the command starts ${text.slice(0, 60)}`);
      assert(text.includes('Bearer $KLINGQ_TOKEN'), 'the token is not a shell variable');
      const body = JSON.parse(text.slice(text.indexOf("-d '") + 4, text.lastIndexOf("'")).replace(/'\\''/g, "'"));
      const job = await api(base, `/v1/jobs/${okJob.id}`);
      assert(JSON.stringify(body.request) === JSON.stringify(job.request), 'the copied request differs from the job\'s');
      // The copied request enqueues: the API takes it as it is.
      const copy = await api(base, '/v1/jobs', { method: 'POST', body: JSON.stringify({ ...body, metadata: { test: 'curl-copy', run: namespace } }) });
      assert(copy.id && copy.id !== okJob.id, 'the copy was not enqueued as a new job');
    });

    await check("a job's webhook deliveries are listed and one can be replayed", async () => {
      assert(okJob, 'no succeeded job');
      const listed = await api(base, `/v1/webhooks/deliveries?job_id=${okJob.id}`);
      assert(listed.deliveries.length >= 1, 'the API lists no delivery for the job');
      const row = page.locator('#job-deliveries tbody tr[data-delivery-id]');
      await waitFor('the deliveries to be listed', async () => (await row.count()) === listed.deliveries.length, 20000);
      const replay = page.locator('#job-deliveries button[data-replay]').first();
      await replay.waitFor({ timeout: 30000 });
      const said = await clickConfirmed(page, replay);
      assert(said.startsWith('delivery replayed'), `the page said "${said}"`);
      await waitFor('the replay to be listed', async () => {
        const now = await api(base, `/v1/webhooks/deliveries?job_id=${okJob.id}`);
        return now.deliveries.some((d) => d.replay_of);
      }, 30000);
    });

    await check("a job's page fits a phone screen", async () => {
      assert(okJob, 'no succeeded job');
      await page.setViewportSize({ width: 390, height: 844 });
      await sleep(300);
      const overflow = await overflowOf(page);
      assert(overflow <= 1, `the job page is ${overflow}px wider than the screen`);
      await page.screenshot({ path: join(artifacts, 'job-phone.png'), fullPage: true });
      await page.setViewportSize({ width: 1360, height: 1000 });
    });

    await check("a batch's page shows its counts, jobs and videos", async () => {
      const batch = await api(base, `/v1/batches/${batchId}`);
      await openRoute(page, base, `#/batches/${batchId}`);
      const counts = page.locator('#batch-counts [data-state="succeeded"]');
      await counts.waitFor({ timeout: 20000 });
      assert(Number(await counts.getAttribute('data-count')) === batch.counts.succeeded,
        `the page counts ${await counts.getAttribute('data-count')} succeeded, the API ${batch.counts.succeeded}`);
      const bar = page.locator('#batch-head [role="progressbar"]');
      assert(Number(await bar.getAttribute('aria-valuenow')) === 100, 'the finished batch is not at 100%');
      const first = await api(base, `/v1/jobs?batch_id=${batchId}&limit=20`);
      await waitFor('the batch jobs table', async () =>
        (await page.locator('#batch-jobs tbody tr[data-job-id]').count()) === first.items.length, 20000);
      const withVideo = first.items.filter((j) => j.state === 'succeeded' && j.video).length;
      assert(withVideo >= 1, 'no succeeded job on the first page');
      await waitFor('the video grid', async () => (await page.locator('#batch-videos video').count()) === withVideo, 20000);
      await page.selectOption('#batch-state', 'succeeded');
      await waitFor('the state filter', async () => {
        const states = await page.locator('#batch-jobs tbody tr[data-job-id]').evaluateAll((rows) => rows.map((r) => r.dataset.state));
        return states.length >= 1 && states.every((st) => st === 'succeeded');
      }, 20000);
      await page.screenshot({ path: join(artifacts, 'batch.png'), fullPage: true });
      await page.setViewportSize({ width: 390, height: 844 });
      await sleep(300);
      const overflow = await overflowOf(page);
      await page.screenshot({ path: join(artifacts, 'batch-phone.png'), fullPage: true });
      await page.setViewportSize({ width: 1360, height: 1000 });
      assert(overflow <= 1, `the batch page is ${overflow}px wider than the screen`);
      // The link from the batch's table opens the job's page.
      await page.locator('#batch-jobs tbody tr[data-job-id] a').first().click();
      await page.locator('#job-head[data-state]').waitFor({ timeout: 20000 });
    });

    await check("a scheduled job is cancelled from its page", async () => {
      const later = new Date(Date.now() + 3600 * 1000).toISOString();
      const waiting = await api(base, '/v1/jobs', {
        method: 'POST',
        body: JSON.stringify({
          start_image_url: 'https://example.com/later.png',
          prompt: `a job for later ${namespace}`,
          not_before: later,
          metadata: { test: 'cancel-from-page', run: namespace },
        }),
      });
      await openRoute(page, base, `#/jobs/${waiting.id}`);
      const cancel = page.locator('#job-cancel');
      await cancel.waitFor({ timeout: 20000 });
      // Dismissing the dialog changes nothing.
      await cancel.click();
      await page.locator('#confirm-dialog[open]').waitFor({ timeout: 10000 });
      await page.click('#confirm-no');
      await sleep(500);
      assert((await api(base, `/v1/jobs/${waiting.id}`)).state === 'scheduled', 'the job changed without a confirmation');
      const said = await clickConfirmed(page, cancel);
      assert(said === 'cancelled (was scheduled)', `the page said "${said}"`);
      await waitFor('the job to be cancelled', async () => (await api(base, `/v1/jobs/${waiting.id}`)).state === 'cancelled', 30000);
      await page.locator('#job-head[data-state="cancelled"]').waitFor({ timeout: 20000 });
      await page.screenshot({ path: join(artifacts, 'job-cancelled.png'), fullPage: true });
    });

    await check("a batch is cancelled from its page", async () => {
      const later = new Date(Date.now() + 3600 * 1000).toISOString();
      const entry = (n) => ({
        start_image_url: 'https://example.com/later.png',
        prompt: `a batch for later ${namespace} ${n}`,
        not_before: later,
      });
      const created = await api(base, '/v1/batches', { method: 'POST', body: JSON.stringify([entry(1), entry(2)]) });
      const id = created.id || created.batch_id;
      assert(id, `no batch id in ${JSON.stringify(created)}`);
      await openRoute(page, base, `#/batches/${id}`);
      const cancel = page.locator('#batch-cancel');
      await cancel.waitFor({ timeout: 20000 });
      const said = await clickConfirmed(page, cancel);
      assert(said === 'cancelled 2 jobs', `the page said "${said}"`);
      const batch = await waitFor('the batch to be cancelled', async () => {
        const b = await api(base, `/v1/batches/${id}`);
        return b.counts.cancelled === 2 ? b : null;
      }, 30000);
      await page.locator('#batch-counts [data-state="cancelled"][data-count="2"]').waitFor({ timeout: 20000 });
      assert(batch.done, 'the cancelled batch is not done');
      await page.screenshot({ path: join(artifacts, 'batch-cancelled.png'), fullPage: true });
    });

    await check("a dead job is re-driven from its page", async () => {
      await waitFor('the second job to die', async () => (await api(base, `/v1/jobs/${dead2.id}`)).state === 'dead', 90000, 500);
      await openRoute(page, base, `#/jobs/${dead2.id}`);
      const button = page.locator('#job-redrive');
      await button.waitFor({ timeout: 20000 });
      await page.screenshot({ path: join(artifacts, 'job-dead.png'), fullPage: true });
      const said = await clickConfirmed(page, button);
      assert(said === 're-driven: 1', `the page said "${said}"`);
      const job = await waitFor('the job to leave dead', async () => {
        const j = await api(base, `/v1/jobs/${dead2.id}`);
        return j.state !== 'dead' ? j : null;
      }, 30000);
      assert(job.redrives === 1, `redrives is ${job.redrives}`);
      await page.locator('#job-head:not([data-state="dead"])').waitFor({ timeout: 20000 });
      await openRoute(page, base, '#/');
      await page.locator('#view-overview:not([hidden])').waitFor({ timeout: 10000 });
    });

    await check('with API tokens, the page asks for one once and keeps it', async () => {
      await checkTokenFlow(context, batchId);
    });

    await check('no console errors', async () => {
      assert(consoleErrors.length === 0, consoleErrors.join('\n'));
    });
  } catch (error) {
    failed++;
    results.push(`FAIL  setup: ${error.message}`);
    log(`FAIL: ${error.stack || error.message}`);
  } finally {
    if (context) await context.close().catch(() => {});
    await stopDemo(demo && demo.child);
    if (failed && demo) log(`demo output (tail):\n${demo.child.output().slice(-4000)}`);
    cleanRedis();
    rmSync(scratch, { recursive: true, force: true });
  }
  for (const line of results) console.log(line);
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main();
