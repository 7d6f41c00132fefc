//! How long runs take, learned from finished runs and shared by every replica: a histogram
//! per kind of run (model and clip length) in Redis, read by each process at most once per
//! refresh period, so timing thousands of parked polls costs one read per kind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use klingq_provider::GenTimeHistogram;

use super::Coordination;

/// How often a process reads a kind's histogram again.
const REFRESH: Duration = Duration::from_secs(10);
/// Samples a histogram keeps before its counts are halved (older runs weigh less).
pub const SAMPLE_CAP: u64 = 2_000;

/// A kind's histogram and when it was read (`None`: no run of the kind finished yet).
type Cached = (Instant, Option<Arc<GenTimeHistogram>>);

/// This process's view of the learned generation times.
#[derive(Debug, Default)]
pub struct GenTimes {
    cache: Mutex<HashMap<String, Cached>>,
}

impl GenTimes {
    /// The histogram of runs of `kind`, `None` when none finished yet or Redis is away.
    pub async fn get(&self, queue: &dyn Coordination, kind: &str) -> Option<Arc<GenTimeHistogram>> {
        if let Some((read_at, histogram)) = self.lock().get(kind)
            && read_at.elapsed() < REFRESH
        {
            return histogram.clone();
        }
        let histogram = match queue.gen_times(kind).await {
            Ok(fields) => {
                let counts = fields.iter().filter_map(|(field, count)| {
                    GenTimeHistogram::parse_field(field).map(|bucket| (bucket, *count))
                });
                let histogram = GenTimeHistogram::from_counts(counts);
                (histogram.samples() > 0).then(|| Arc::new(histogram))
            }
            Err(error) => {
                tracing::debug!(%error, kind, "reading generation times failed; polling on the cold schedule");
                None
            }
        };
        self.lock()
            .insert(kind.to_owned(), (Instant::now(), histogram.clone()));
        histogram
    }

    /// Counts a finished run of `kind` that took `duration_ms` from creation to completion.
    pub async fn record(&self, queue: &dyn Coordination, kind: &str, duration_ms: u64) {
        let bucket = GenTimeHistogram::encode_field(GenTimeHistogram::bucket_of(duration_ms));
        if let Err(error) = queue.record_gen_time(kind, &bucket, SAMPLE_CAP).await {
            tracing::debug!(%error, kind, "recording a generation time failed");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.cache.lock().expect("generation times poisoned")
    }
}
