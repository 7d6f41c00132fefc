//! The queue's history, a minute at a time: once a minute a worker's keeper samples the
//! queue's counters (jobs finished per outcome, spend charged) into one hash, keyed by the
//! minute ([`crate::keys::HISTORY`]); the first replica to sample a minute writes it (`HSETNX`),
//! so any number of replicas keep one sample per minute. What happened in a minute is the
//! difference between its sample and the next one; the current minute's is the live counters
//! less its sample. Samples older than [`HISTORY_MINUTES`] are dropped.
//!
//! Nothing is written per job: the history costs one `HGETALL` per partition and one `HSETNX`
//! per replica per minute.

use std::collections::HashMap;

use crate::error::QueueError;
use crate::queue::Queue;

/// Minutes of history kept (a day).
pub const HISTORY_MINUTES: u64 = 24 * 60;

const MINUTE_MS: u64 = 60_000;

/// The outcomes the history counts, in the order a sample stores them.
pub const HISTORY_OUTCOMES: [&str; 4] = ["succeeded", "failed", "cancelled", "dead"];

/// The queue's cumulative counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Sample {
    /// Jobs finished per outcome, as [`HISTORY_OUTCOMES`].
    finished: [u64; 4],
    charged_micros: u64,
}

impl Sample {
    fn of(counters: &HashMap<String, u64>) -> Self {
        let mut finished = [0; 4];
        for (slot, outcome) in finished.iter_mut().zip(HISTORY_OUTCOMES) {
            *slot = counters
                .get(&format!("finished:{outcome}"))
                .copied()
                .unwrap_or(0);
        }
        Self {
            finished,
            charged_micros: counters.get("charged_micros").copied().unwrap_or(0),
        }
    }

    fn encode(&self) -> String {
        let [a, b, c, d] = self.finished;
        format!("{a} {b} {c} {d} {}", self.charged_micros)
    }

    fn decode(text: &str) -> Option<Self> {
        let numbers: Vec<u64> = text
            .split(' ')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        match numbers[..] {
            [a, b, c, d, charged_micros] => Some(Self {
                finished: [a, b, c, d],
                charged_micros,
            }),
            _ => None,
        }
    }

    /// What happened between `self` and the later `next` (counters only grow; a reset reads 0).
    fn until(&self, next: &Sample) -> Sample {
        let mut finished = [0; 4];
        for (i, slot) in finished.iter_mut().enumerate() {
            *slot = next.finished[i].saturating_sub(self.finished[i]);
        }
        Sample {
            finished,
            charged_micros: next.charged_micros.saturating_sub(self.charged_micros),
        }
    }
}

/// What happened in one minute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPoint {
    /// The minute's start, in ms since the Unix epoch.
    pub minute_ms: u64,
    /// Jobs that finished in the minute, per outcome, as [`HISTORY_OUTCOMES`].
    pub finished: [u64; 4],
    /// Spend the provider reported in the minute, in micro-dollars.
    pub charged_micros: u64,
}

/// The start of the minute `ms` is in.
pub fn minute_of(ms: u64) -> u64 {
    ms - ms % MINUTE_MS
}

impl Queue {
    /// Samples this queue's counters for the minute `now_ms` is in, unless a replica already
    /// did; drops samples past [`HISTORY_MINUTES`]. Returns whether this call wrote the sample.
    pub async fn record_history(&self, now_ms: u64) -> Result<bool, QueueError> {
        let sample = Sample::of(&self.counters().await?);
        self.write_sample(now_ms, &sample).await
    }

    async fn write_sample(&self, now_ms: u64, sample: &Sample) -> Result<bool, QueueError> {
        let key = self.keys().history(self.name());
        let minute = minute_of(now_ms);
        let written: bool = self
            .query(
                redis::cmd("HSETNX")
                    .arg(&key)
                    .arg(minute)
                    .arg(sample.encode()),
            )
            .await?;
        let fields: u64 = self.query(redis::cmd("HLEN").arg(&key)).await?;
        // Trim when an hour's worth of samples is past the retention: one HKEYS an hour.
        if fields > HISTORY_MINUTES + 60 {
            let oldest_kept = minute.saturating_sub(HISTORY_MINUTES * MINUTE_MS);
            let old: Vec<String> = self
                .query::<Vec<String>>(redis::cmd("HKEYS").arg(&key))
                .await?
                .into_iter()
                .filter(|field| field.parse::<u64>().is_ok_and(|m| m < oldest_kept))
                .collect();
            if !old.is_empty() {
                let _: u64 = self.query(redis::cmd("HDEL").arg(&key).arg(&old)).await?;
            }
        }
        Ok(written)
    }

    /// What happened in each of the last `minutes` minutes (at most [`HISTORY_MINUTES`]) up to
    /// `now_ms`, oldest first; the last point is the current minute, so far. A minute with no
    /// sample after it (no worker sampled) has no point. Samples the current minute first if
    /// no replica has, so a history read with no worker running starts one.
    pub async fn history(
        &self,
        minutes: u64,
        now_ms: u64,
    ) -> Result<Vec<HistoryPoint>, QueueError> {
        let minutes = minutes.clamp(1, HISTORY_MINUTES);
        let current = minute_of(now_ms);
        let first = current.saturating_sub((minutes - 1) * MINUTE_MS);
        let live = Sample::of(&self.counters().await?);
        self.write_sample(now_ms, &live).await?;
        let raw: HashMap<String, String> = self
            .query(redis::cmd("HGETALL").arg(self.keys().history(self.name())))
            .await?;
        let mut samples: Vec<(u64, Sample)> = raw
            .iter()
            .filter_map(|(minute, text)| Some((minute.parse().ok()?, Sample::decode(text)?)))
            .filter(|(minute, _)| *minute >= first && *minute <= current)
            .collect();
        samples.sort_unstable_by_key(|(minute, _)| *minute);
        let mut points = Vec::with_capacity(samples.len());
        for (i, (minute, sample)) in samples.iter().enumerate() {
            let next = match samples.get(i + 1) {
                Some((next_minute, next)) if *next_minute == minute + MINUTE_MS => *next,
                // A gap: the minute's end was not sampled.
                Some(_) => continue,
                None => live,
            };
            let delta = sample.until(&next);
            points.push(HistoryPoint {
                minute_ms: *minute,
                finished: delta.finished,
                charged_micros: delta.charged_micros,
            });
        }
        Ok(points)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_round_trips_and_differences_never_go_negative() {
        let sample = Sample {
            finished: [5, 1, 0, 2],
            charged_micros: 700_000,
        };
        assert_eq!(Sample::decode(&sample.encode()), Some(sample));
        assert_eq!(Sample::decode("1 2 3"), None);
        assert_eq!(Sample::decode("1 2 3 4 x"), None);
        let later = Sample {
            finished: [8, 1, 0, 1],
            charged_micros: 1_400_000,
        };
        let delta = sample.until(&later);
        assert_eq!(delta.finished, [3, 0, 0, 0]);
        assert_eq!(delta.charged_micros, 700_000);
        assert_eq!(minute_of(125_000), 120_000);
    }
}
