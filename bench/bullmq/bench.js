// BullMQ side of klingq's side-by-side benchmark: (1) addBulk of N no-op jobs, (2) processing
// them with a Worker at several concurrencies; prints what it measured and ends with one JSON line.
//
// Usage: node bench.js [--jobs N] [--concurrency 50,100,200,500] [--chunk 1000] [--redis URL]
// Uses its own key prefix (`bench-bullmq-<pid>`) and obliterates it afterwards.
'use strict';
const { Queue, Worker } = require('bullmq');
const IORedis = require('ioredis');

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

const jobs = Number(arg('jobs', '100000'));
const concurrencies = arg('concurrency', '50,100,200,500').split(',').map(Number);
const redisUrl = arg('redis', process.env.KLINGQ_REDIS_URL || 'redis://127.0.0.1:6379');
const prefix = `bench-bullmq-${process.pid}`;
const queueName = 'noop';
// addBulk in calls of 1,000 jobs (like klingq's enqueue_chunk): faster than one call of 100k.
const chunk = Number(arg('chunk', '1000'));

async function commandCalls(redis) {
  const info = await redis.info('commandstats');
  let calls = 0;
  for (const line of info.split('\n')) {
    const m = /calls=(\d+)/.exec(line);
    if (m) calls += Number(m[1]);
  }
  return calls;
}

function connection() {
  return new IORedis(redisUrl, { maxRetriesPerRequest: null });
}

async function round(concurrency, admin) {
  const queue = new Queue(queueName, { connection: connection(), prefix });
  await queue.waitUntilReady();
  const batch = [];
  for (let n = 0; n < jobs; n++) batch.push({ name: 'noop', data: { n } });

  const c0 = await commandCalls(admin);
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < batch.length; i += chunk) {
    await queue.addBulk(batch.slice(i, i + chunk));
  }
  const enqueueSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const c1 = await commandCalls(admin);

  let done = 0;
  let finish;
  const finished = new Promise((resolve) => { finish = resolve; });
  const t1 = process.hrtime.bigint();
  const worker = new Worker(queueName, async () => {}, {
    connection: connection(),
    prefix,
    concurrency,
  });
  worker.on('completed', () => {
    done += 1;
    if (done === jobs) finish();
  });
  worker.on('failed', (_job, err) => console.error('failed:', err && err.message));
  const timer = setInterval(() => {
    const s = Number(process.hrtime.bigint() - t1) / 1e9;
    console.log(`  ${done} / ${jobs} done (${(done / s).toFixed(0)} jobs/s so far)`);
  }, 5000);
  await finished;
  const processSeconds = Number(process.hrtime.bigint() - t1) / 1e9;
  clearInterval(timer);
  const c2 = await commandCalls(admin);
  await worker.close();
  await queue.obliterate({ force: true });
  await queue.close();
  const figures = {
    concurrency,
    enqueue_seconds: enqueueSeconds,
    enqueue_jobs_per_s: jobs / enqueueSeconds,
    process_seconds: processSeconds,
    process_jobs_per_s: jobs / processSeconds,
    redis_commands_per_job_enqueue: (c1 - c0) / jobs,
    redis_commands_per_job_process: (c2 - c1) / jobs,
  };
  console.log(
    `concurrency ${concurrency}: addBulk ${jobs} jobs in ${enqueueSeconds.toFixed(2)} s ` +
      `(${figures.enqueue_jobs_per_s.toFixed(0)} jobs/s), processed in ${processSeconds.toFixed(2)} s ` +
      `(${figures.process_jobs_per_s.toFixed(0)} jobs/s); Redis commands per job: ` +
      `${figures.redis_commands_per_job_enqueue.toFixed(1)} enqueue, ${figures.redis_commands_per_job_process.toFixed(1)} processing`,
  );
  return figures;
}

async function main() {
  const admin = connection();
  const version = require('bullmq/package.json').version;
  console.log(`bench bullmq ${version}: ${jobs} no-op jobs, concurrencies ${concurrencies.join(',')}, prefix ${prefix}`);
  const rounds = [];
  try {
    for (const c of concurrencies) rounds.push(await round(c, admin));
  } finally {
    // Anything left behind by an interrupted round.
    let cursor = '0';
    do {
      const [next, keys] = await admin.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', 1000);
      if (keys.length) await admin.unlink(...keys);
      cursor = next;
    } while (cursor !== '0');
  }
  await admin.quit();
  const best = rounds.reduce((a, b) => (b.process_jobs_per_s > a.process_jobs_per_s ? b : a));
  const bestEnqueue = Math.max(...rounds.map((r) => r.enqueue_jobs_per_s));
  console.log(
    `best: concurrency ${best.concurrency}, ${best.process_jobs_per_s.toFixed(0)} jobs/s processing; ` +
      `addBulk best ${bestEnqueue.toFixed(0)} jobs/s`,
  );
  console.log(JSON.stringify({
    bullmq_version: version,
    jobs,
    enqueue_jobs_per_s: bestEnqueue,
    best_concurrency: best.concurrency,
    process_jobs_per_s: best.process_jobs_per_s,
    redis_commands_per_job: best.redis_commands_per_job_enqueue + best.redis_commands_per_job_process,
    rounds,
  }));
}

main().then(() => process.exit(0), (err) => { console.error(err); process.exit(1); });
