// The dashboard in headless Chromium (Debian's `chromium`, driven by playwright-core) against a
// live `klingq demo`: the page loads with no console errors, a running batch progresses to done,
// the job search finds a job, and re-driving a dead letter takes it off the dead list.
// Screenshots go to tests/browser/artifacts/. Prints `N passed, N failed`; exits 1 on failure.
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
      if (message.type() === 'error') consoleErrors.push(`console: ${message.text()}`);
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
      await page.locator('#chart svg polyline').waitFor({ timeout: 20000 });
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
      await item.locator('button[data-redrive]').click();
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
