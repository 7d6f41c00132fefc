//! Shared limits across worker replicas, kept in Redis: a concurrency limit with leases (a dead
//! worker's slots come back when their lease lapses) whose cap adapts down on throttling and
//! recovers slowly; budget reservations; and a pause flag (e.g. out of credit).

use std::time::Duration;

use klingq_core::Priority;
use redis::Value;

use crate::error::QueueError;
use crate::keys::day_stamp;
use crate::queue::Queue;
use crate::queue::value_string;
use crate::scripts;

/// The state of a shared limit after an acquire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotStatus {
    /// Whether the holder has a slot now.
    pub acquired: bool,
    /// Slots held across all replicas.
    pub in_use: u64,
    /// The live cap (at most the configured maximum; lower after throttling).
    pub cap: u64,
    /// Why the holder did not get a slot (`None` when it did).
    pub wait: Option<SlotWait>,
}

/// The outcome of a budget reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetDecision {
    Reserved,
    /// Today's spend plus this job would pass the daily budget.
    OverDailyBudget {
        spent_micros: u64,
    },
    /// The job's batch is paused by its failure guard: the job is held until a resume.
    BatchPaused,
    /// The tenant's spend today plus this job would pass the tenant's daily budget.
    OverTenantBudget {
        spent_micros: u64,
    },
    /// The batch's committed spend plus this job would pass the batch budget.
    OverBatchBudget {
        committed_micros: u64,
    },
}

/// Who asks for a slot of a shared limit: the tenant whose share it counts against, what the
/// run is estimated to cost (the fair share is in dollars), and the tenant's policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlotClaim<'a> {
    pub tenant: &'a str,
    pub micros: u64,
    /// The tenant's weight (relative share; more than 0).
    pub weight: f64,
    /// Slots the tenant may hold at once (0: only the limit's cap).
    pub max_concurrency: u64,
    /// Orders the tenant's own waiters.
    pub priority: Priority,
}

impl SlotClaim<'_> {
    /// A claim of the default tenant with the default policy (tools, tests).
    pub fn anonymous() -> SlotClaim<'static> {
        SlotClaim {
            tenant: klingq_core::DEFAULT_TENANT,
            micros: 0,
            weight: 1.0,
            max_concurrency: 0,
            priority: Priority::Normal,
        }
    }
}

/// Why a holder did not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotWait {
    /// Every slot is held.
    Full,
    /// The tenant holds its `max_concurrency`.
    TenantLimit,
    /// A slot is free but another tenant is further below its share; this one waits its turn.
    OtherTenantsTurn,
}

impl Queue {
    /// Takes back `holder`'s slot in the shared limit `name` for `lease` when it lapsed (a run
    /// that exists), if one is free, charging nothing to the fair share; renews it if held.
    pub async fn acquire_slot(
        &self,
        name: &str,
        holder: &str,
        claim: SlotClaim<'_>,
        lease: Duration,
        max: u64,
    ) -> Result<SlotStatus, QueueError> {
        self.acquire_slot_as(name, holder, claim, lease, max, false)
            .await
    }

    /// Takes or renews `holder`'s slot in fair order: a holder turned away (a job id) joins
    /// its tenant's waiters, and free slots go to the waiter of the tenant furthest below its
    /// weighted share of dollars started (see `slot_acquire.lua`); the waiters given a slot
    /// are woken ([`Queue::wake`]), so they take it at once instead of at their next try.
    pub async fn acquire_slot_or_wait(
        &self,
        name: &str,
        holder: &str,
        claim: SlotClaim<'_>,
        lease: Duration,
        max: u64,
    ) -> Result<SlotStatus, QueueError> {
        self.acquire_slot_as(name, holder, claim, lease, max, true)
            .await
    }

    async fn acquire_slot_as(
        &self,
        name: &str,
        holder: &str,
        claim: SlotClaim<'_>,
        lease: Duration,
        max: u64,
        wait: bool,
    ) -> Result<SlotStatus, QueueError> {
        let rank = Priority::ALL
            .iter()
            .position(|p| *p == claim.priority)
            .unwrap_or(1) as u64;
        let weight = if claim.weight.is_finite() && claim.weight > 0.0 {
            claim.weight
        } else {
            1.0
        };
        let cmd = self.call(
            &scripts::SLOT_ACQUIRE,
            0,
            &SlotAcquireHeader {
                name,
                holder,
                tenant: claim.tenant,
                micros: claim.micros,
                weight: weight.to_string(),
                tenant_max: claim.max_concurrency,
                rank,
                lease_ms: lease.as_millis() as u64,
                max: max.max(1),
                wait,
            },
        );
        let reply: Vec<Value> = self.run_script(cmd).await?;
        let int = |i: usize| match reply.get(i) {
            Some(Value::Int(n)) => *n as u64,
            _ => 0,
        };
        let why = reply.get(3).and_then(value_string).unwrap_or_default();
        let granted: Vec<String> = reply.iter().skip(4).filter_map(value_string).collect();
        if !granted.is_empty() {
            self.wake_granted(name, granted).await;
        }
        Ok(SlotStatus {
            acquired: int(0) == 1,
            in_use: int(1),
            cap: int(2),
            wait: match why.as_str() {
                "full" => Some(SlotWait::Full),
                "tenant" => Some(SlotWait::TenantLimit),
                "turn" => Some(SlotWait::OtherTenantsTurn),
                _ => None,
            },
        })
    }

    /// Extends a slot `holder` already has (one command; does nothing if it has none).
    /// Returns whether it had one.
    pub async fn renew_slot(
        &self,
        name: &str,
        holder: &str,
        lease: Duration,
    ) -> Result<bool, QueueError> {
        let key = self.keys().limit(name);
        let expiry = klingq_core::job::now_ms() + lease.as_millis() as u64;
        // CH: counts the member whose expiry changed; XX: never adds one.
        let renewed: i64 = self
            .query(
                redis::cmd("ZADD")
                    .arg(key)
                    .arg("XX")
                    .arg("CH")
                    .arg(expiry)
                    .arg(holder),
            )
            .await?;
        Ok(renewed == 1)
    }

    /// Gives a slot back, and wakes the first waiter for it.
    pub async fn release_slot(&self, name: &str, holder: &str) -> Result<(), QueueError> {
        self.release_slot_fenced_as(name, holder, 0).await?;
        Ok(())
    }

    /// Gives a slot back unless its expiry lies past `fence_ms` (ms since the epoch), i.e.
    /// unless the holder took or renewed it after the release was asked for. For releases
    /// retried after Redis was unreachable. Returns whether a slot was removed.
    pub async fn release_slot_fenced(
        &self,
        name: &str,
        holder: &str,
        fence_ms: u64,
    ) -> Result<bool, QueueError> {
        self.release_slot_fenced_as(name, holder, fence_ms.max(1))
            .await
    }

    async fn release_slot_fenced_as(
        &self,
        name: &str,
        holder: &str,
        fence_ms: u64,
    ) -> Result<bool, QueueError> {
        let (removed, granted) = self.release_slot_once(name, holder, fence_ms).await?;
        if !granted.is_empty() {
            self.wake_granted(name, granted).await;
        }
        Ok(removed)
    }

    async fn release_slot_once(
        &self,
        name: &str,
        holder: &str,
        fence_ms: u64,
    ) -> Result<(bool, Vec<String>), QueueError> {
        let cmd = self.call(
            &scripts::SLOT_RELEASE,
            0,
            &SlotReleaseHeader {
                name,
                holder,
                fence: fence_ms,
            },
        );
        let reply: Vec<Value> = self.run_script(cmd).await?;
        let removed = matches!(reply.first(), Some(Value::Int(1)));
        Ok((
            removed,
            reply.iter().skip(1).filter_map(value_string).collect(),
        ))
    }

    /// Wakes the waiters the fair share gave a slot to. A waiter that is gone (cancelled,
    /// finished) gives its slot back, which hands it to the next, a few times at most. Best
    /// effort: a waiter that is not woken finds its slot when its wait ends, and a slot no
    /// one takes lapses after its lease.
    async fn wake_granted(&self, name: &str, granted: Vec<String>) {
        const MAX_HANDOFFS: usize = 16;
        let mut todo = granted;
        let mut handoffs = 0;
        while let Some(waiter) = todo.pop() {
            match self.wake(&waiter, "a provider slot was freed").await {
                Ok(crate::WakeOutcome::Gone) if handoffs < MAX_HANDOFFS => {
                    handoffs += 1;
                    match self.release_slot_once(name, &waiter, 0).await {
                        Ok((_, more)) => todo.extend(more),
                        Err(error) => {
                            tracing::debug!(%error, waiter, "giving back a gone waiter's slot failed; it lapses after its lease");
                        }
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%error, waiter, "waking a slot waiter failed; it tries again on its own");
                }
            }
        }
    }

    /// Lowers the shared cap after the provider throttled us; returns the new cap.
    pub async fn throttle_slots(
        &self,
        name: &str,
        max: u64,
        recovery_period: Duration,
    ) -> Result<u64, QueueError> {
        let cmd = self.call(
            &scripts::SLOT_THROTTLE,
            0,
            &SlotThrottleHeader {
                name,
                max: max.max(1),
                period_ms: recovery_period.as_millis().max(1) as u64,
            },
        );
        self.run_script(cmd).await
    }

    /// The holders of a shared limit's slots (live or lapsed, not yet tidied), for tools.
    pub async fn slot_holders(&self, name: &str) -> Result<Vec<String>, QueueError> {
        self.query(
            redis::cmd("ZRANGE")
                .arg(self.keys().limit(name))
                .arg(0)
                .arg(-1),
        )
        .await
    }

    /// Slots in use and the live cap of a shared limit, for metrics.
    pub async fn slot_usage(&self, name: &str, max: u64) -> Result<(u64, u64), QueueError> {
        let keys = self.keys();
        let now = klingq_core::job::now_ms();
        let mut pipe = redis::pipe();
        pipe.cmd("ZCOUNT")
            .arg(keys.limit(name))
            .arg(now)
            .arg("+inf");
        pipe.cmd("HGET").arg(keys.limit_cap(name)).arg("cap");
        let (in_use, cap): (u64, Option<u64>) = self.query_pipe(&pipe).await?;
        Ok((in_use, cap.unwrap_or(max).min(max)))
    }

    /// Reserves a job's estimated cost against the daily budget (0: none) and its batch's
    /// budget. Idempotent per job and life. The daily budget is global (partition 0); a job
    /// of another partition checks whether it reserved already, then reserves the day's
    /// share there (once per job and day), then its batch's in its own partition, giving the
    /// day's back if the batch refuses.
    pub async fn reserve_budget(
        &self,
        job_id: &str,
        micros: u64,
        daily_limit_micros: u64,
        tenant: &str,
        tenant_daily_micros: u64,
    ) -> Result<BudgetDecision, QueueError> {
        let day = day_stamp(time::OffsetDateTime::now_utc().date());
        let p = self.partitions().of(job_id);
        let in_job_partition = |mode: &str| {
            self.call(
                &scripts::BUDGET_RESERVE,
                p,
                &BudgetHeader {
                    id: job_id,
                    day: &day,
                    micros,
                    daily: daily_limit_micros,
                    tenant,
                    tenant_daily: tenant_daily_micros,
                    mode,
                },
            )
        };
        let decide = |decision: &str, spent: u64, committed: u64| match decision {
            "daily" => BudgetDecision::OverDailyBudget {
                spent_micros: spent,
            },
            "tenant" => BudgetDecision::OverTenantBudget {
                spent_micros: spent,
            },
            "paused" => BudgetDecision::BatchPaused,
            "batch" => BudgetDecision::OverBatchBudget {
                committed_micros: committed,
            },
            _ => BudgetDecision::Reserved,
        };
        if p == 0 {
            let (decision, spent, committed): (String, u64, u64) =
                self.run_script(in_job_partition("all")).await?;
            return Ok(decide(&decision, spent, committed));
        }
        // Reserved before (an earlier attempt, an earlier day): nothing to do.
        let (check, _, _): (String, u64, u64) = self.run_script(in_job_partition("check")).await?;
        match check.as_str() {
            "already" => return Ok(BudgetDecision::Reserved),
            "paused" => return Ok(BudgetDecision::BatchPaused),
            _ => {}
        }
        let (decision, spent, new) = self
            .budget_day(
                job_id,
                &day,
                micros,
                (daily_limit_micros, tenant, tenant_daily_micros),
                "reserve",
            )
            .await?;
        if decision == "daily" || decision == "tenant" {
            return Ok(decide(&decision, spent, 0));
        }
        let (decision, _, committed): (String, u64, u64) =
            self.run_script(in_job_partition("partition")).await?;
        // Refused by the batch: today's reservation is given back (whichever call made it).
        // Reserved meanwhile by another attempt: only what this call added goes back.
        if decision == "batch" || decision == "paused" || (decision == "already" && new == 1) {
            self.budget_day(job_id, &day, micros, (0, tenant, 0), "release")
                .await?;
        }
        Ok(decide(&decision, spent, committed))
    }

    async fn budget_day(
        &self,
        job_id: &str,
        day: &str,
        micros: u64,
        (daily_limit_micros, tenant, tenant_daily_micros): (u64, &str, u64),
        op: &str,
    ) -> Result<(String, u64, u64), QueueError> {
        let cmd = self.call(
            &scripts::BUDGET_DAY,
            0,
            &BudgetDayHeader {
                id: job_id,
                day,
                micros,
                daily: daily_limit_micros,
                tenant,
                tenant_daily: tenant_daily_micros,
                op,
            },
        );
        self.run_script(cmd).await
    }

    /// Today's reserved spend, in micro-dollars.
    pub async fn spent_today_micros(&self) -> Result<u64, QueueError> {
        let key = self
            .keys()
            .daily_budget(time::OffsetDateTime::now_utc().date());
        let spent: Option<u64> = self.query(redis::cmd("GET").arg(key)).await?;
        Ok(spent.unwrap_or(0))
    }

    /// Pauses `name` for every replica for `ttl` (after which one caller probes again).
    pub async fn set_pause(
        &self,
        name: &str,
        ttl: Duration,
        reason: &str,
    ) -> Result<(), QueueError> {
        let key = self.keys().pause(name);
        let _: () = self
            .query(
                redis::cmd("SET")
                    .arg(key)
                    .arg(reason)
                    .arg("PX")
                    .arg(ttl.as_millis().max(1) as u64),
            )
            .await?;
        Ok(())
    }

    /// The reason `name` is paused, if it is.
    pub async fn pause_reason(&self, name: &str) -> Result<Option<String>, QueueError> {
        let key = self.keys().pause(name);
        self.query(redis::cmd("GET").arg(key)).await
    }

    /// Lifts a pause at once (a probe succeeded).
    pub async fn clear_pause(&self, name: &str) -> Result<(), QueueError> {
        let key = self.keys().pause(name);
        let _: i64 = self.query(redis::cmd("DEL").arg(key)).await?;
        Ok(())
    }
}

crate::wire::record! {
    /// `slot_acquire.lua`'s header.
    struct SlotAcquireHeader<'a> {
        name: &'a str,
        holder: &'a str,
        tenant: &'a str,
        micros: u64,
        weight: String,
        tenant_max: u64,
        rank: u64,
        lease_ms: u64,
        max: u64,
        wait: bool,
    }
}

crate::wire::record! {
    /// `slot_release.lua`'s header.
    struct SlotReleaseHeader<'a> {
        name: &'a str,
        holder: &'a str,
        fence: u64,
    }
}

crate::wire::record! {
    /// `slot_throttle.lua`'s header.
    struct SlotThrottleHeader<'a> {
        name: &'a str,
        max: u64,
        period_ms: u64,
    }
}

crate::wire::record! {
    /// `budget_reserve.lua`'s header.
    struct BudgetHeader<'a> {
        id: &'a str,
        day: &'a str,
        micros: u64,
        daily: u64,
        tenant: &'a str,
        tenant_daily: u64,
        mode: &'a str,
    }
}

crate::wire::record! {
    /// `budget_day.lua`'s header.
    struct BudgetDayHeader<'a> {
        id: &'a str,
        day: &'a str,
        micros: u64,
        daily: u64,
        tenant: &'a str,
        tenant_daily: u64,
        op: &'a str,
    }
}
