//! Every Redis key klingq uses, in one place: [`SHAPES`] is the one source of key shapes. The
//! Rust side builds keys from it ([`Keys`]) and the Lua scripts get a function per shape
//! (`K.job(id)`, `K.ready(queue, prio)`, …; [`lua_functions`]), so no script spells a key.
//! All keys of one partition share its hash tag (`{ns}` for partition 0, see
//! [`crate::Partitions`]), so multi-key scripts stay in one Redis Cluster slot.

use klingq_core::Priority;

/// The consumer group every worker of a queue joins.
pub(crate) const GROUP: &str = "workers";

/// One key shape: a name (the Lua function `K.<name>`) and its template after the prefix,
/// where each `{}` is an argument.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) name: &'static str,
    pub(crate) template: &'static str,
}

macro_rules! shapes {
    ($($(#[$doc:meta])* $konst:ident = $name:literal, $template:literal;)*) => {
        $($(#[$doc])* pub(crate) const $konst: Shape = Shape { name: $name, template: $template };)*
        /// Every key shape, for [`lua_functions`].
        pub(crate) const SHAPES: &[Shape] = &[$($konst),*];
    };
}

shapes! {
    /// Hash of one job: payload, state, attempts, checkpoint, timestamps, error.
    JOB = "job", "job:{}";
    /// Ready stream of a queue at a priority; consumer group [`GROUP`].
    READY = "ready", "q:{}:ready:{}";
    /// Sorted set of job ids waiting for a time (score: due time in ms).
    DELAYED = "delayed", "q:{}:delayed";
    /// Sorted set of dead job ids (score: time of death in ms).
    DEAD = "dead", "q:{}:dead";
    /// Idempotency key to job id, with a TTL.
    IDEMPOTENCY = "idempotency", "idem:{}:{}";
    /// Hash of a batch's counters.
    BATCH = "batch", "batch:{}";
    /// List of a batch's job ids, in enqueue order.
    BATCH_JOBS = "batch_jobs", "batch:{}:jobs";
    /// Sorted set of a paused batch's jobs held at submit (score: when), woken by a resume.
    BATCH_HELD = "batch_held", "batch:{}:held";
    /// Hash of a queue's counters (jobs finished per state, spend, parked jobs).
    STATS = "stats", "q:{}:stats";
    /// Hash of a queue's counters sampled once a minute: the minute (ms since the epoch) to
    /// the sample ([`crate::history`]). Global (partition 0).
    HISTORY = "history", "q:{}:history";
    /// Stream of completion events.
    EVENTS = "events", "events";
    /// Sorted set of batch ids by creation time, for listing.
    BATCHES = "batches", "batches";
    /// Sorted set of job ids by creation time per queue, for listing and search.
    JOBS_INDEX = "jobs_index", "q:{}:jobs";
    /// Batch idempotency key to the first batch's id, with the idempotency TTL.
    BATCH_IDEMPOTENCY = "batch_idempotency", "idem-batch:{}:{}";
    /// Sorted set of the holders of a shared concurrency limit (score: lease expiry in ms).
    LIMIT = "limit", "limit:{}";
    /// Hash of a shared limit's adaptive cap (`cap`, `recover_at`, `period`).
    LIMIT_CAP = "limit_cap", "limit:{}:cap";
    /// Sorted set of one tenant's jobs waiting for a slot of a shared limit (score: priority
    /// rank × 10^13 + when they first waited); the fair share picks the tenant, this the job.
    LIMIT_WAITING = "limit_waiting", "limit:{}:waiting:{}";
    /// Sorted set of the tenants with jobs waiting for a slot of a shared limit (score: the
    /// tenant's virtual time, micro-dollars started per unit of weight).
    LIMIT_TENANTS = "limit_tenants", "limit:{}:tenants";
    /// Hash of a shared limit's fair-share state: per tenant `vt:<t>` (virtual time),
    /// `inflight:<t>`, `started:<t>` (micro-dollars started), `policy:<t>` (`weight cap`);
    /// `v` (the virtual start of the last run started), `max` and `lease` (ms).
    LIMIT_FAIR = "limit_fair", "limit:{}:fair";
    /// Hash of a shared limit's holders and waiters: member to `tenant micros`.
    LIMIT_HELD = "limit_held", "limit:{}:held";
    /// Hash of the tenant policies operators set through the API: name to JSON.
    TENANTS = "tenants", "tenants";
    /// Hash of the estimated spend each tenant reserved on one UTC day (micro-dollars).
    TENANT_DAY = "tenant_day", "budget:day:{}:tenants";
    /// Hash of what each tenant was charged on one UTC day (micro-dollars), per partition.
    TENANT_CHARGED = "tenant_charged", "tenants:charged:{}";
    /// Hash of one provider run: `job` (the job it belongs to) and `cb` (the status its last
    /// callback reported). Global (partition 0): a callback names only the run.
    RUN = "run", "run:{}";
    /// Hash of how long finished runs of one kind (model and clip duration) took: bucket to
    /// count, and `n`, the samples. Global (partition 0).
    GEN_TIMES = "gen_times", "gentime:{}";
    /// Estimated spend reserved on one UTC day (`YYYYMMDD`), in micro-dollars.
    DAILY_BUDGET = "daily_budget", "budget:day:{}";
    /// Hash of the jobs outside partition 0 whose daily reservation is in the day's total.
    DAILY_BUDGET_JOBS = "daily_budget_jobs", "budget:day:{}:jobs";
    /// A pause shared by every replica (e.g. out of provider credit), with a TTL.
    PAUSE = "pause", "pause:{}";
    /// The key every script names as `KEYS[1]`, so Redis Cluster routes it to the
    /// namespace's slot. Nothing is stored under it.
    ROUTE = "route", "route";
    /// Hash of what the namespace was created with (`partitions`). Global: partition 0.
    META = "meta", "meta";
    /// List of one webhook delivery's attempt records, oldest first.
    WEBHOOK_ATTEMPTS = "webhook_attempts", "webhooks:attempts:{}";
    /// Hash of webhook endpoints disabled by `410 Gone`: endpoint id to its record.
    WEBHOOKS_DISABLED = "webhooks_disabled", "webhooks:disabled";
}

/// The Lua functions of every shape, for the scripts' prelude: `K.job(id)` and so on, each
/// joining the prefix `P` and its arguments as [`Keys`] does.
pub(crate) fn lua_functions() -> String {
    let mut lua = String::from("local K = {}\n");
    for shape in SHAPES {
        let parts: Vec<&str> = shape.template.split("{}").collect();
        let args: Vec<String> = (1..parts.len()).map(|i| format!("a{i}")).collect();
        let mut body = String::from("P .. ':'");
        for (i, part) in parts.iter().enumerate() {
            if !part.is_empty() {
                body.push_str(&format!(" .. '{part}'"));
            }
            if i + 1 < parts.len() {
                body.push_str(&format!(" .. a{}", i + 1));
            }
        }
        lua.push_str(&format!(
            "function K.{}({}) return {body} end\n",
            shape.name,
            args.join(", ")
        ));
    }
    lua
}

/// Key names of one namespace.
#[derive(Debug, Clone)]
pub struct Keys {
    /// `{ns}`: the hash-tagged prefix of every key.
    prefix: String,
}

impl Keys {
    pub fn new(namespace: &str) -> Self {
        Self {
            prefix: format!("{{{namespace}}}"),
        }
    }

    /// The hash-tagged prefix, `{ns}`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key of `shape` with `args` in its `{}`s.
    fn key(&self, shape: Shape, args: &[&str]) -> String {
        let mut key = String::with_capacity(self.prefix.len() + shape.template.len() + 40);
        key.push_str(&self.prefix);
        key.push(':');
        let mut args = args.iter();
        for (i, part) in shape.template.split("{}").enumerate() {
            if i > 0 {
                key.push_str(args.next().expect("an argument per {}"));
            }
            key.push_str(part);
        }
        debug_assert!(args.next().is_none(), "{}: too many arguments", shape.name);
        key
    }

    /// See [`JOB`].
    pub fn job(&self, job_id: &str) -> String {
        self.key(JOB, &[job_id])
    }

    /// See [`READY`].
    pub fn ready(&self, queue: &str, priority: Priority) -> String {
        self.key(READY, &[queue, priority.as_str()])
    }

    /// See [`DELAYED`].
    pub fn delayed(&self, queue: &str) -> String {
        self.key(DELAYED, &[queue])
    }

    /// See [`DEAD`].
    pub fn dead(&self, queue: &str) -> String {
        self.key(DEAD, &[queue])
    }

    /// See [`IDEMPOTENCY`].
    pub fn idempotency(&self, queue: &str, key: &str) -> String {
        self.key(IDEMPOTENCY, &[queue, key])
    }

    /// See [`BATCH`].
    pub fn batch(&self, batch_id: &str) -> String {
        self.key(BATCH, &[batch_id])
    }

    /// See [`BATCH_HELD`].
    pub fn batch_held(&self, batch_id: &str) -> String {
        self.key(BATCH_HELD, &[batch_id])
    }

    /// See [`BATCH_JOBS`].
    pub fn batch_jobs(&self, batch_id: &str) -> String {
        self.key(BATCH_JOBS, &[batch_id])
    }

    /// See [`STATS`].
    pub fn stats(&self, queue: &str) -> String {
        self.key(STATS, &[queue])
    }

    /// See [`EVENTS`].
    pub fn events(&self) -> String {
        self.key(EVENTS, &[])
    }

    /// See [`BATCHES`].
    pub fn batches(&self) -> String {
        self.key(BATCHES, &[])
    }

    /// See [`JOBS_INDEX`].
    pub fn jobs_index(&self, queue: &str) -> String {
        self.key(JOBS_INDEX, &[queue])
    }

    /// See [`BATCH_IDEMPOTENCY`].
    pub fn batch_idempotency(&self, queue: &str, key: &str) -> String {
        self.key(BATCH_IDEMPOTENCY, &[queue, key])
    }

    /// See [`LIMIT`].
    pub fn limit(&self, name: &str) -> String {
        self.key(LIMIT, &[name])
    }

    /// See [`LIMIT_CAP`].
    pub fn limit_cap(&self, name: &str) -> String {
        self.key(LIMIT_CAP, &[name])
    }

    /// See [`LIMIT_WAITING`].
    pub fn limit_waiting(&self, name: &str, tenant: &str) -> String {
        self.key(LIMIT_WAITING, &[name, tenant])
    }

    /// See [`LIMIT_TENANTS`].
    pub fn limit_tenants(&self, name: &str) -> String {
        self.key(LIMIT_TENANTS, &[name])
    }

    /// See [`LIMIT_FAIR`].
    pub fn limit_fair(&self, name: &str) -> String {
        self.key(LIMIT_FAIR, &[name])
    }

    /// See [`LIMIT_HELD`].
    pub fn limit_held(&self, name: &str) -> String {
        self.key(LIMIT_HELD, &[name])
    }

    /// See [`TENANTS`].
    pub fn tenants(&self) -> String {
        self.key(TENANTS, &[])
    }

    /// See [`TENANT_DAY`].
    pub fn tenant_day(&self, day: &str) -> String {
        self.key(TENANT_DAY, &[day])
    }

    /// See [`TENANT_CHARGED`].
    pub fn tenant_charged(&self, day: &str) -> String {
        self.key(TENANT_CHARGED, &[day])
    }

    /// See [`RUN`].
    pub fn run(&self, run_id: &str) -> String {
        self.key(RUN, &[run_id])
    }

    /// See [`GEN_TIMES`].
    pub fn gen_times(&self, name: &str) -> String {
        self.key(GEN_TIMES, &[name])
    }

    /// See [`DAILY_BUDGET`].
    pub fn daily_budget(&self, day: time::Date) -> String {
        self.key(DAILY_BUDGET, &[&day_stamp(day)])
    }

    /// See [`DAILY_BUDGET_JOBS`].
    pub fn daily_budget_jobs(&self, day: time::Date) -> String {
        self.key(DAILY_BUDGET_JOBS, &[&day_stamp(day)])
    }

    /// See [`PAUSE`].
    pub fn pause(&self, name: &str) -> String {
        self.key(PAUSE, &[name])
    }

    /// See [`ROUTE`].
    pub fn route(&self) -> String {
        self.key(ROUTE, &[])
    }

    /// See [`HISTORY`].
    pub fn history(&self, queue: &str) -> String {
        self.key(HISTORY, &[queue])
    }

    /// See [`META`].
    pub fn meta(&self) -> String {
        self.key(META, &[])
    }

    /// See [`WEBHOOK_ATTEMPTS`].
    pub fn webhook_attempts(&self, delivery_id: &str) -> String {
        self.key(WEBHOOK_ATTEMPTS, &[delivery_id])
    }

    /// See [`WEBHOOKS_DISABLED`].
    pub fn webhooks_disabled(&self) -> String {
        self.key(WEBHOOKS_DISABLED, &[])
    }
}

/// A UTC day as `YYYYMMDD`, as the daily budget keys spell it (scripts get it as an argument).
pub(crate) fn day_stamp(day: time::Date) -> String {
    format!(
        "{:04}{:02}{:02}",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_shares_the_hash_tag() {
        let keys = Keys::new("klingq");
        for key in [
            keys.job("j"),
            keys.ready("videos", Priority::High),
            keys.delayed("videos"),
            keys.dead("videos"),
            keys.idempotency("videos", "k"),
            keys.batch("b"),
            keys.batch_jobs("b"),
            keys.events(),
            keys.batches(),
            keys.jobs_index("videos"),
            keys.batch_idempotency("videos", "k"),
            keys.limit("provider"),
            keys.limit_cap("provider"),
            keys.daily_budget(time::macros::date!(2025 - 03 - 07)),
            keys.pause("provider"),
            keys.route(),
            keys.meta(),
            keys.webhook_attempts("d"),
            keys.webhooks_disabled(),
        ] {
            assert!(key.starts_with("{klingq}:"), "{key}");
        }
        assert_eq!(
            keys.ready("videos", Priority::Low),
            "{klingq}:q:videos:ready:low"
        );
        assert_eq!(
            keys.daily_budget(time::macros::date!(2025 - 03 - 07)),
            "{klingq}:budget:day:20250307"
        );
        assert_eq!(keys.limit_cap("p"), format!("{}:cap", keys.limit("p")));
        assert_eq!(
            keys.daily_budget_jobs(time::macros::date!(2025 - 03 - 07)),
            "{klingq}:budget:day:20250307:jobs"
        );
    }

    /// Every key function the scripts get, run by a real Redis, builds the key Rust builds.
    #[tokio::test]
    async fn the_scripts_key_functions_build_the_keys_rust_builds() {
        klingq_testkit::redis::require_shared_redis().await.unwrap();
        let client = redis::Client::open(klingq_testkit::redis::redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys = Keys::new("ns");
        let args = ["first", "second"];
        let mut calls = Vec::new();
        let mut expected = Vec::new();
        for shape in SHAPES {
            let n = shape.template.matches("{}").count();
            let quoted: Vec<String> = args[..n].iter().map(|a| format!("'{a}'")).collect();
            calls.push(format!("K.{}({})", shape.name, quoted.join(", ")));
            expected.push(keys.key(*shape, &args[..n]));
        }
        let script = format!(
            "local P = ARGV[1]\n{}return {{ {} }}",
            lua_functions(),
            calls.join(", ")
        );
        let built: Vec<String> = redis::cmd("EVAL")
            .arg(script)
            .arg(0)
            .arg(keys.prefix())
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(built, expected);
    }

    #[test]
    fn lua_functions_spell_each_shape_as_rust_does() {
        let lua = lua_functions();
        assert!(lua.contains("function K.job(a1) return P .. ':' .. 'job:' .. a1 end"));
        assert!(lua.contains(
            "function K.ready(a1, a2) return P .. ':' .. 'q:' .. a1 .. ':ready:' .. a2 end"
        ));
        assert!(lua.contains("function K.events() return P .. ':' .. 'events' end"));
        assert_eq!(lua.lines().count(), SHAPES.len() + 1);
    }
}
