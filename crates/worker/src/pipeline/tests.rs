//! The pipeline's state machine without Redis, S3 or a network: in-memory fakes of the three
//! seams (`seams.rs`) and a scripted `VideoProvider`, every call recorded in one ordered log,
//! under paused (virtual) time. Each delivery runs `Pipeline::run` as the apalis handler does;
//! a re-delivery starts a new attempt (and a new process's `Pipeline`) from the checkpoint the
//! previous attempt saved last.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use klingq_core::job::now_ms;
use klingq_core::{Checkpoint, GenerationRequest, JobError, JobId, JobSpec, JobState, SignedUrl};
use klingq_provider::{
    ErrorDetail, GenTimeHistogram, Mode, Operation, PollPolicy, ProviderError, ReadLimits, Run,
    RunFailure, RunStatus, VideoOutput, VideoProvider,
};
use klingq_queue::{
    BudgetDecision, Completion, JobFailure, LeaseError, QueueError, SlotClaim, SlotStatus, SlotWait,
};
use klingq_storage::{RedactedUrl, RehostError, StorageError, StoredVideo};

use super::*;

/// The provider slot's lease (`WorkerConfig::default().limit_lease_secs`).
const LEASE: Duration = Duration::from_secs(120);
/// How long a run stays bound to its job: the job deadline plus an hour.
const BIND_TTL: Duration = Duration::from_secs(30 * 60 + 3600);
const FLOOR: Duration = Duration::from_secs(1);

/// One call through a seam, in the order the pipeline made it.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    // The job's handle.
    Save(JobState, String),
    /// A checkpoint kept for the settle (the settle of a retry writes `scheduled`).
    Keep,
    /// A checkpoint and state kept for the park that ends the attempt.
    KeepAs(JobState),
    SetState(JobState, String),
    // The shared coordination.
    PauseReason,
    SetPause(Duration),
    /// Estimated micros, daily limit micros.
    ReserveBudget(u64, u64),
    /// `wait`: `acquire_slot_or_wait` (a refused holder joins the waiters).
    AcquireSlot {
        lease: Duration,
        wait: bool,
    },
    RenewSlot(Duration),
    ReleaseSlot,
    ReleaseSlotFenced,
    ThrottleSlots,
    BindRun(String, Duration),
    GenTimes(String),
    RecordGenTime(String, String),
    ReadJobState,
    // The provider.
    Create(u32),
    RunSync(u32),
    FindRun,
    GetRun(String),
    WaitForRun(String),
    RefreshUrl(String),
    // The object store.
    Head,
    Rehost {
        url: String,
        expected: Option<u64>,
    },
}

type Log = Arc<Mutex<Vec<Call>>>;

fn record(log: &Log, call: Call) {
    log.lock().unwrap().push(call);
}

fn ready<'a, T: Send + 'a>(value: T) -> BoxFuture<'a, T> {
    Box::pin(std::future::ready(value))
}

// ---------------------------------------------------------------------------------------------
// The provider.

/// A scripted answer to a read; `None`: the call never answers (a long poll), only the
/// watch can end the attempt.
type Reply = Option<Result<Run, ProviderError>>;

/// A provider that answers from scripts and panics on a call no test scripted (so a stray
/// create fails the test).
struct FakeProvider {
    log: Log,
    job_id: String,
    mode: Mode,
    limits: ReadLimits,
    creates: Mutex<VecDeque<Result<Run, ProviderError>>>,
    finds: Mutex<VecDeque<Result<Option<Run>, ProviderError>>>,
    gets: Mutex<VecDeque<Reply>>,
    refreshes: Mutex<VecDeque<Result<VideoOutput, ProviderError>>>,
}

impl FakeProvider {
    fn on_create(&self, reply: Result<Run, ProviderError>) {
        self.creates.lock().unwrap().push_back(reply);
    }

    fn on_find(&self, reply: Result<Option<Run>, ProviderError>) {
        self.finds.lock().unwrap().push_back(reply);
    }

    fn on_get(&self, reply: Result<Run, ProviderError>) {
        self.gets.lock().unwrap().push_back(Some(reply));
    }

    fn on_get_never(&self) {
        self.gets.lock().unwrap().push_back(None);
    }

    fn on_refresh(&self, reply: Result<VideoOutput, ProviderError>) {
        self.refreshes.lock().unwrap().push_back(reply);
    }
}

impl VideoProvider for FakeProvider {
    fn mode(&self) -> Mode {
        self.mode
    }

    fn model(&self) -> &str {
        "kling-test"
    }

    fn poll_policy(&self) -> PollPolicy {
        PollPolicy::default()
    }

    fn read_limits(&self) -> ReadLimits {
        self.limits
    }

    fn create_run<'a>(
        &'a self,
        job_id: &'a JobId,
        attempt: u32,
        _request: &'a GenerationRequest,
    ) -> BoxFuture<'a, Result<Run, ProviderError>> {
        record(&self.log, Call::Create(attempt));
        assert_eq!(
            job_id.to_string(),
            self.job_id,
            "a create carries the job id"
        );
        let reply = self.creates.lock().unwrap().pop_front();
        ready(reply.expect("unscripted create_run"))
    }

    fn find_run<'a>(
        &'a self,
        client_ref: &'a str,
    ) -> BoxFuture<'a, Result<Option<Run>, ProviderError>> {
        record(&self.log, Call::FindRun);
        assert_eq!(
            client_ref, self.job_id,
            "runs are looked up by client_ref = job id"
        );
        let reply = self.finds.lock().unwrap().pop_front();
        ready(reply.expect("unscripted find_run"))
    }

    fn get_run<'a>(&'a self, run_id: &'a str) -> BoxFuture<'a, Result<Run, ProviderError>> {
        record(&self.log, Call::GetRun(run_id.to_owned()));
        match self.gets.lock().unwrap().pop_front() {
            Some(Some(reply)) => ready(reply),
            Some(None) => Box::pin(async {
                // Long past any watch: a watch that misses its cue fails the test, never hangs it.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                unanswered()
            }),
            None => panic!("unscripted get_run"),
        }
    }

    fn wait_for_run<'a>(
        &'a self,
        run_id: &'a str,
        _deadline: tokio::time::Instant,
    ) -> BoxFuture<'a, Result<Run, ProviderError>> {
        record(&self.log, Call::WaitForRun(run_id.to_owned()));
        panic!("unscripted wait_for_run")
    }

    fn run_sync<'a>(
        &'a self,
        _job_id: &'a JobId,
        attempt: u32,
        _request: &'a GenerationRequest,
    ) -> BoxFuture<'a, Result<Run, ProviderError>> {
        record(&self.log, Call::RunSync(attempt));
        panic!("unscripted run_sync")
    }

    fn refresh_video_url<'a>(
        &'a self,
        run_id: &'a str,
    ) -> BoxFuture<'a, Result<VideoOutput, ProviderError>> {
        record(&self.log, Call::RefreshUrl(run_id.to_owned()));
        let reply = self.refreshes.lock().unwrap().pop_front();
        ready(reply.expect("unscripted refresh_video_url"))
    }
}

fn unanswered() -> Result<Run, ProviderError> {
    panic!("the watch did not end a call that never answers")
}

// ---------------------------------------------------------------------------------------------
// The object store.

/// An object store whose HEAD finds nothing and whose re-host succeeds, unless scripted.
struct FakeStore {
    log: Log,
    heads: Mutex<VecDeque<Result<Option<StoredVideo>, StorageError>>>,
    rehosts: Mutex<VecDeque<Result<StoredVideo, RehostError>>>,
}

impl FakeStore {
    fn on_head(&self, reply: Result<Option<StoredVideo>, StorageError>) {
        self.heads.lock().unwrap().push_back(reply);
    }

    fn on_rehost(&self, reply: Result<StoredVideo, RehostError>) {
        self.rehosts.lock().unwrap().push_back(reply);
    }
}

impl ObjectStore for FakeStore {
    fn head<'a>(
        &'a self,
        _job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredVideo>, StorageError>> {
        record(&self.log, Call::Head);
        let reply = self.heads.lock().unwrap().pop_front();
        ready(reply.unwrap_or(Ok(None)))
    }

    fn rehost<'a>(
        &'a self,
        job_id: &'a str,
        source_url: &'a str,
        expected_size: Option<u64>,
    ) -> BoxFuture<'a, Result<StoredVideo, RehostError>> {
        record(
            &self.log,
            Call::Rehost {
                url: source_url.to_owned(),
                expected: expected_size,
            },
        );
        let reply = self.rehosts.lock().unwrap().pop_front();
        ready(reply.unwrap_or_else(|| Ok(stored(job_id))))
    }
}

// ---------------------------------------------------------------------------------------------
// The shared coordination.

#[derive(Default)]
struct CoordState {
    pause: Option<String>,
    /// `None`: reserved.
    budget: Option<BudgetDecision>,
    /// Every slot is taken by other jobs: a holder without one is refused.
    slots_full: bool,
    holders: BTreeSet<String>,
    waiters: Vec<String>,
    /// What `bind_run` answers: the status of a callback that came before the binding.
    early_callback: Option<String>,
    /// What `job_state` answers, in turn; `Generating` once the script is spent.
    job_states: VecDeque<Option<JobState>>,
    histogram: Vec<(String, u64)>,
}

/// The queue's shared state in memory; clones share it (the lease's queue and the slot
/// releaser's are one queue in production too).
#[derive(Clone)]
struct FakeCoordination {
    log: Log,
    state: Arc<Mutex<CoordState>>,
}

impl FakeCoordination {
    fn with<T>(&self, f: impl FnOnce(&mut CoordState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    fn holds(&self, holder: &str) -> bool {
        self.with(|state| state.holders.contains(holder))
    }

    fn acquire(&self, name: &str, holder: &str, lease: Duration, wait: bool) -> SlotStatus {
        assert_eq!(name, PROVIDER_LIMIT);
        record(&self.log, Call::AcquireSlot { lease, wait });
        self.with(|state| {
            let acquired = !state.slots_full || state.holders.contains(holder);
            if acquired {
                state.holders.insert(holder.to_owned());
            } else if wait {
                state.waiters.push(holder.to_owned());
            }
            SlotStatus {
                acquired,
                in_use: 10,
                cap: 10,
                wait: (!acquired).then_some(SlotWait::Full),
            }
        })
    }
}

impl Coordination for FakeCoordination {
    fn pause_reason<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, QueueError>> {
        assert_eq!(name, CREDIT_PAUSE);
        record(&self.log, Call::PauseReason);
        ready(Ok(self.with(|state| state.pause.clone())))
    }

    fn set_pause<'a>(
        &'a self,
        name: &'a str,
        ttl: Duration,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        assert_eq!(name, CREDIT_PAUSE);
        record(&self.log, Call::SetPause(ttl));
        self.with(|state| state.pause = Some(reason.to_owned()));
        ready(Ok(()))
    }

    fn reserve_budget<'a>(
        &'a self,
        _job_id: &'a str,
        micros: u64,
        daily_limit_micros: u64,
        _tenant: &'a str,
        _tenant_daily_micros: u64,
    ) -> BoxFuture<'a, Result<BudgetDecision, QueueError>> {
        record(&self.log, Call::ReserveBudget(micros, daily_limit_micros));
        let decision = self.with(|state| state.budget.unwrap_or(BudgetDecision::Reserved));
        ready(Ok(decision))
    }

    fn acquire_slot<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        _claim: SlotClaim<'a>,
        lease: Duration,
        _max: u64,
    ) -> BoxFuture<'a, Result<SlotStatus, QueueError>> {
        ready(Ok(self.acquire(name, holder, lease, false)))
    }

    fn acquire_slot_or_wait<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        _claim: SlotClaim<'a>,
        lease: Duration,
        _max: u64,
    ) -> BoxFuture<'a, Result<SlotStatus, QueueError>> {
        ready(Ok(self.acquire(name, holder, lease, true)))
    }

    fn tenant_policies(
        &self,
    ) -> BoxFuture<
        '_,
        Result<std::collections::BTreeMap<String, klingq_core::TenantPolicy>, QueueError>,
    > {
        ready(Ok(std::collections::BTreeMap::new()))
    }

    fn renew_slot<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, QueueError>> {
        assert_eq!(name, PROVIDER_LIMIT);
        record(&self.log, Call::RenewSlot(lease));
        ready(Ok(self.with(|state| state.holders.contains(holder))))
    }

    fn release_slot<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        assert_eq!(name, PROVIDER_LIMIT);
        record(&self.log, Call::ReleaseSlot);
        self.with(|state| state.holders.remove(holder));
        ready(Ok(()))
    }

    fn release_slot_fenced<'a>(
        &'a self,
        _name: &'a str,
        holder: &'a str,
        _fence_ms: u64,
    ) -> BoxFuture<'a, Result<bool, QueueError>> {
        record(&self.log, Call::ReleaseSlotFenced);
        ready(Ok(self.with(|state| state.holders.remove(holder))))
    }

    fn throttle_slots<'a>(
        &'a self,
        name: &'a str,
        max: u64,
        _recovery_period: Duration,
    ) -> BoxFuture<'a, Result<u64, QueueError>> {
        assert_eq!(name, PROVIDER_LIMIT);
        record(&self.log, Call::ThrottleSlots);
        ready(Ok(max.saturating_sub(1)))
    }

    fn bind_run<'a>(
        &'a self,
        _job_id: &'a str,
        run_id: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<String>, QueueError>> {
        record(&self.log, Call::BindRun(run_id.to_owned(), ttl));
        ready(Ok(self.with(|state| state.early_callback.clone())))
    }

    fn gen_times<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, u64)>, QueueError>> {
        record(&self.log, Call::GenTimes(name.to_owned()));
        ready(Ok(self.with(|state| state.histogram.clone())))
    }

    fn record_gen_time<'a>(
        &'a self,
        name: &'a str,
        bucket: &'a str,
        _cap: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        record(
            &self.log,
            Call::RecordGenTime(name.to_owned(), bucket.to_owned()),
        );
        ready(Ok(()))
    }

    fn job_state<'a>(
        &'a self,
        _job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<JobState>, QueueError>> {
        record(&self.log, Call::ReadJobState);
        let state = self.with(|state| {
            state
                .job_states
                .pop_front()
                .unwrap_or(Some(JobState::Generating))
        });
        ready(Ok(state))
    }
}

// ---------------------------------------------------------------------------------------------
// The job's handle.

/// One delivery's hold on the job: the checkpoint it was delivered with, and every save.
struct FakeJob {
    log: Log,
    job_id: String,
    created_ms: u64,
    checkpoint: Checkpoint,
    saves: Mutex<Vec<(JobState, Checkpoint)>>,
    /// Makes the next save fail.
    save_error: Mutex<Option<LeaseError>>,
    shutting_down: Arc<AtomicBool>,
    lost: AtomicBool,
    queue: FakeCoordination,
}

impl JobHandle for FakeJob {
    fn job_id(&self) -> &str {
        &self.job_id
    }

    fn created_ms(&self) -> u64 {
        self.created_ms
    }

    fn attempt(&self) -> u32 {
        1
    }

    fn checkpoint(&self) -> Result<Checkpoint, serde_json::Error> {
        Ok(self.checkpoint.clone())
    }

    fn save<'a>(
        &'a self,
        state: JobState,
        checkpoint: &'a Checkpoint,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), LeaseError>> {
        record(&self.log, Call::Save(state, reason.to_owned()));
        if let Some(error) = self.save_error.lock().unwrap().take() {
            return ready(Err(error));
        }
        self.saves.lock().unwrap().push((state, checkpoint.clone()));
        ready(Ok(()))
    }

    fn keep_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), LeaseError> {
        record(&self.log, Call::Keep);
        self.saves
            .lock()
            .unwrap()
            .push((JobState::Scheduled, checkpoint.clone()));
        Ok(())
    }

    fn keep_progress(&self, state: JobState, checkpoint: &Checkpoint) -> Result<(), LeaseError> {
        record(&self.log, Call::KeepAs(state));
        self.saves.lock().unwrap().push((state, checkpoint.clone()));
        Ok(())
    }

    fn set_state<'a>(
        &'a self,
        state: JobState,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), LeaseError>> {
        record(&self.log, Call::SetState(state, reason.to_owned()));
        ready(Ok(()))
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    fn queue(&self) -> &dyn Coordination {
        &self.queue
    }
}

// ---------------------------------------------------------------------------------------------
// The harness.

struct Harness {
    log: Log,
    job_id: String,
    spec: JobSpec,
    config: WorkerConfig,
    provider: Arc<FakeProvider>,
    store: Arc<FakeStore>,
    coord: FakeCoordination,
    job: FakeJob,
    pipeline: Pipeline,
}

impl Harness {
    fn new(checkpoint: Checkpoint) -> Self {
        Self::with_config(WorkerConfig::default(), checkpoint)
    }

    fn with_config(config: WorkerConfig, checkpoint: Checkpoint) -> Self {
        let log = Log::default();
        let job_id = JobId::new().to_string();
        let provider = Arc::new(FakeProvider {
            log: log.clone(),
            job_id: job_id.clone(),
            mode: Mode::Async,
            limits: ReadLimits {
                not_found_retries: 2,
                output_rereads: 2,
            },
            creates: Mutex::default(),
            finds: Mutex::default(),
            gets: Mutex::default(),
            refreshes: Mutex::default(),
        });
        let store = Arc::new(FakeStore {
            log: log.clone(),
            heads: Mutex::default(),
            rehosts: Mutex::default(),
        });
        let coord = FakeCoordination {
            log: log.clone(),
            state: Arc::default(),
        };
        let job = FakeJob {
            log: log.clone(),
            job_id: job_id.clone(),
            created_ms: now_ms(),
            checkpoint,
            saves: Mutex::default(),
            save_error: Mutex::default(),
            shutting_down: Arc::default(),
            lost: AtomicBool::new(false),
            queue: coord.clone(),
        };
        let pipeline = Self::pipeline(&config, &provider, &store, &coord);
        Self {
            log,
            job_id,
            spec: JobSpec::new(GenerationRequest::new(
                "https://images.example/first.png",
                "a cat on a skateboard",
            )),
            config,
            provider,
            store,
            coord,
            job,
            pipeline,
        }
    }

    /// A worker process's pipeline over the fakes.
    fn pipeline(
        config: &WorkerConfig,
        provider: &Arc<FakeProvider>,
        store: &Arc<FakeStore>,
        coord: &FakeCoordination,
    ) -> Pipeline {
        Pipeline {
            provider: provider.clone(),
            provider_stats: Arc::default(),
            store: store.clone(),
            config: config.clone(),
            metrics: Arc::default(),
            slots: SlotReleaser::new(coord.clone(), PROVIDER_LIMIT, config.limit_lease()),
            gen_times: GenTimes::default(),
            tenants: Default::default(),
        }
    }

    /// One attempt, as the apalis handler runs it.
    async fn deliver(&self) -> Result<Completion, JobFailure> {
        self.pipeline.run(&self.spec, &self.job).await
    }

    /// The job comes back (parked, retried, deferred or recovered), to a fresh worker
    /// process, with the checkpoint the last attempt saved.
    fn redeliver(&mut self) {
        let checkpoint = self.last_checkpoint();
        self.job = FakeJob {
            log: self.log.clone(),
            job_id: self.job_id.clone(),
            created_ms: self.job.created_ms,
            checkpoint,
            saves: Mutex::default(),
            save_error: Mutex::default(),
            shutting_down: Arc::default(),
            lost: AtomicBool::new(false),
            queue: self.coord.clone(),
        };
        self.pipeline = Self::pipeline(&self.config, &self.provider, &self.store, &self.coord);
    }

    /// The calls made since the last time they were taken.
    fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn saves(&self) -> Vec<(JobState, Checkpoint)> {
        self.job.saves.lock().unwrap().clone()
    }

    /// The checkpoint the job holds in the queue: this attempt's last save, or the one it was
    /// delivered with.
    fn last_checkpoint(&self) -> Checkpoint {
        self.saves()
            .last()
            .map_or_else(|| self.job.checkpoint.clone(), |(_, c)| c.clone())
    }

    /// The kind of run whose generation times are learned together.
    fn kind(&self) -> String {
        format!("kling-test:{}s", self.spec.request.billed_seconds())
    }

    fn estimate(&self) -> u64 {
        self.pipeline
            .cost_model()
            .estimate_micros(self.spec.request.billed_seconds())
    }

    /// The calls of a fresh submit up to (and including) the create.
    fn submit_calls(&self, attempt: u32) -> Vec<Call> {
        vec![
            Call::PauseReason,
            Call::ReserveBudget(self.estimate(), 0),
            Call::AcquireSlot {
                lease: LEASE,
                wait: true,
            },
            Call::Save(JobState::Submitting, "creating the provider run".to_owned()),
            Call::Create(attempt),
        ]
    }

    /// The calls of the download, upload and publish of a run the attempt saw finish (and so
    /// saved `downloading` already). The last step's timing is kept for the settle.
    fn rehost_calls(&self, run_id: &str, url: &str, expected: Option<u64>) -> Vec<Call> {
        vec![
            Call::Head,
            Call::RefreshUrl(run_id.to_owned()),
            Call::SetState(JobState::Uploading, String::new()),
            Call::Rehost {
                url: url.to_owned(),
                expected,
            },
            Call::Save(JobState::Publishing, String::new()),
            Call::Keep,
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// Scripted values.

fn run(id: &str, status: RunStatus) -> Run {
    Run {
        id: id.to_owned(),
        status,
        client_ref: None,
        metadata: None,
        input: None,
        video: None,
        cost_usd: None,
        failure: None,
        created_at: None,
        started_at: None,
        completed_at: None,
        completed_at_ms: None,
        duration_ms: None,
        adopted: false,
    }
}

fn video(url: &str, file_size: Option<u64>) -> VideoOutput {
    VideoOutput {
        url: SignedUrl::new(url),
        file_size,
        content_type: Some("video/mp4".to_owned()),
    }
}

const FIRST_URL: &str = "https://cdn.provider.example/out.mp4?sig=first";
const FRESH_URL: &str = "https://cdn.provider.example/out.mp4?sig=fresh";

/// A run that succeeded 100 s after its creation, billed $0.91 (the estimate is $0.70),
/// naming a 1234-byte video.
fn succeeded(id: &str) -> Run {
    Run {
        video: Some(video(FIRST_URL, Some(1234))),
        cost_usd: Some(0.91),
        completed_at_ms: Some(now_ms() - 500),
        duration_ms: Some(100_000),
        ..run(id, RunStatus::Succeeded)
    }
}

fn failed(id: &str, failure: RunFailure) -> Run {
    Run {
        failure: Some(failure),
        ..run(id, RunStatus::Failed)
    }
}

fn detail(status: u16, code: &str, retry_after: Option<Duration>) -> ErrorDetail {
    ErrorDetail {
        status: Some(status),
        code: Some(code.to_owned()),
        message: "scripted".to_owned(),
        retry_after,
        attempts: 1,
        ..ErrorDetail::default()
    }
}

fn stored(job_id: &str) -> StoredVideo {
    StoredVideo {
        bucket: "videos".to_owned(),
        key: format!("videos/{job_id}.mp4"),
        job_id: job_id.to_owned(),
        size: 1234,
        sha256: "ab".repeat(32),
        content_type: "video/mp4".to_owned(),
        url: format!("https://s3.example/videos/{job_id}.mp4?X-Amz-Signature=s"),
    }
}

/// A job whose run `run-1` exists and was `status` at the last poll, created `age` ago.
fn generating(status: &str, age: Duration) -> Checkpoint {
    let mut checkpoint = Checkpoint::default();
    let provider = &mut checkpoint.provider;
    provider.run_id = Some("run-1".to_owned());
    provider.submitted_at_ms = Some(now_ms() - age.as_millis() as u64);
    provider.creates = 1;
    provider.status = Some(status.to_owned());
    checkpoint
}

fn parked(result: Result<Completion, JobFailure>) -> Duration {
    match result {
        Err(JobFailure::Park { after, .. }) => after,
        other => panic!("expected a park, got {other:?}"),
    }
}

fn retried(result: Result<Completion, JobFailure>) -> (Duration, JobError) {
    match result {
        Err(JobFailure::Retry {
            after,
            error: Some(error),
            ..
        }) => (after, error),
        other => panic!("expected a retry with an error, got {other:?}"),
    }
}

fn deferred(result: Result<Completion, JobFailure>) -> (Duration, String) {
    match result {
        Err(JobFailure::Defer { after, reason }) => (after, reason),
        other => panic!("expected a defer, got {other:?}"),
    }
}

fn failed_with(result: Result<Completion, JobFailure>) -> JobError {
    match result {
        Err(JobFailure::Fail(error)) => error,
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn creates(calls: &[Call]) -> usize {
    calls
        .iter()
        .filter(|call| matches!(call, Call::Create(_) | Call::RunSync(_)))
        .count()
}

// ---------------------------------------------------------------------------------------------
// Submit.

#[tokio::test(start_paused = true)]
async fn a_fresh_job_takes_a_slot_checkpoints_creates_binds_and_parks() {
    let h = Harness::new(Checkpoint::default());
    h.provider.on_create(Ok(run("run-1", RunStatus::Queued)));

    let after = parked(h.deliver().await);

    // A run created a moment ago: the cold rule on an age of ~0 gives the policy's floor.
    let policy = PollPolicy::default();
    assert!(policy.floor <= after && after <= policy.max_interval);
    assert_eq!(after, FLOOR);
    let mut expected = h.submit_calls(1);
    expected.extend([
        Call::BindRun("run-1".to_owned(), BIND_TTL),
        // The run id and `generating` go with the park: one write.
        Call::KeepAs(JobState::Generating),
        Call::GenTimes(h.kind()),
        // The slot is kept across the park: renewed for the wait plus a lease.
        Call::RenewSlot(after + LEASE),
    ]);
    assert_eq!(h.take_calls(), expected);
    assert!(h.coord.holds(&h.job_id));
    let saves = h.saves();
    assert_eq!(saves.len(), 2);
    // The checkpoint that makes a retry look before it creates, saved before the create.
    let before = &saves[0].1.provider;
    assert_eq!(saves[0].0, JobState::Submitting);
    assert!(before.submitted_at_ms.is_some());
    assert_eq!((before.creates, before.run_id.as_deref()), (1, None));
    // The run id, saved at once.
    let after_create = &saves[1].1.provider;
    assert_eq!(after_create.run_id.as_deref(), Some("run-1"));
    assert_eq!(after_create.status.as_deref(), Some("queued"));
    assert_eq!(after_create.submitted_at_ms, before.submitted_at_ms);
    assert_eq!(after_create.creates, 1);
}

#[tokio::test(start_paused = true)]
async fn a_save_refused_before_the_create_creates_nothing() {
    let h = Harness::new(Checkpoint::default());
    *h.job.save_error.lock().unwrap() = Some(LeaseError::Cancelled);

    let result = h.deliver().await;

    assert!(matches!(result, Err(JobFailure::Cancelled)), "{result:?}");
    let mut expected = h.submit_calls(1);
    expected.pop(); // no create
    assert_eq!(h.take_calls(), expected);
}

#[tokio::test(start_paused = true)]
async fn a_submit_of_unknown_outcome_is_looked_up_before_any_create_and_adopted() {
    let mut checkpoint = Checkpoint::default();
    checkpoint.provider.submitted_at_ms = Some(now_ms() - 30_000);
    checkpoint.provider.creates = 1;
    let h = Harness::new(checkpoint);
    h.provider.on_find(Ok(Some(Run {
        adopted: true,
        ..run("run-7", RunStatus::Running)
    })));

    let after = parked(h.deliver().await);

    assert_eq!(
        h.take_calls(),
        vec![
            Call::FindRun,
            Call::BindRun("run-7".to_owned(), BIND_TTL),
            Call::KeepAs(JobState::Generating),
            Call::GenTimes(h.kind()),
            // Not held (lapsed): renewing finds none, so it is taken again.
            Call::RenewSlot(after + LEASE),
            Call::AcquireSlot {
                lease: after + LEASE,
                wait: false
            },
        ]
    );
    let provider = h.last_checkpoint().provider;
    assert_eq!(provider.run_id.as_deref(), Some("run-7"));
    assert_eq!(provider.status.as_deref(), Some("running"));
    assert_eq!(provider.creates, 1);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_submit_not_found_waits_out_the_grace_then_creates_once_more() {
    // Sent 2 s ago: the run may still appear, so no create yet.
    let mut checkpoint = Checkpoint::default();
    checkpoint.provider.submitted_at_ms = Some(now_ms() - 2_000);
    checkpoint.provider.creates = 1;
    let h = Harness::new(checkpoint.clone());
    h.provider.on_find(Ok(None));

    let (after, _) = deferred(h.deliver().await);

    assert!(
        after <= Duration::from_secs(8) && after > Duration::from_secs(7),
        "{after:?}"
    );
    assert_eq!(h.take_calls(), vec![Call::FindRun]);
    assert!(h.saves().is_empty());

    // Sent 30 s ago and still not found: nothing was created, a create is allowed (the second).
    checkpoint.provider.submitted_at_ms = Some(now_ms() - 30_000);
    let h = Harness::new(checkpoint);
    h.provider.on_find(Ok(None));
    h.provider.on_create(Ok(run("run-2", RunStatus::Queued)));

    parked(h.deliver().await);

    let calls = h.take_calls();
    assert_eq!(calls[0], Call::FindRun);
    assert_eq!(calls[1..6], h.submit_calls(2)[..]);
    assert_eq!(creates(&calls), 1);
    assert_eq!(h.last_checkpoint().provider.creates, 2);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_create_outcome_retries_keeping_submitted_at_and_the_retry_looks_first() {
    let mut h = Harness::new(Checkpoint::default());
    h.provider
        .on_create(Err(ProviderError::SubmitOutcomeUnknown {
            operation: Operation::Create,
            detail: ErrorDetail {
                message: "timed out after the request was sent".to_owned(),
                ..ErrorDetail::default()
            },
            source: None,
        }));

    let (after, error) = retried(h.deliver().await);

    assert!(
        after >= Duration::from_secs(1) && after <= Duration::from_secs(2),
        "{after:?}"
    );
    assert_eq!(error.step, "submit");
    assert_eq!(error.code, "submit_outcome_unknown");
    assert!(error.cost_committed);
    let mut expected = h.submit_calls(1);
    expected.push(Call::Keep);
    assert_eq!(h.take_calls(), expected);
    let saves = h.saves();
    let submitted_at = saves[0].1.provider.submitted_at_ms;
    let provider = &saves[1].1.provider;
    assert!(submitted_at.is_some());
    assert_eq!(provider.submitted_at_ms, submitted_at);
    assert_eq!((provider.run_id.as_deref(), provider.creates), (None, 1));
    assert_eq!(saves[1].1.step_retries.get("submit"), Some(&1));
    // A run may exist: its slot is kept.
    assert!(h.coord.holds(&h.job_id));

    // The retry finds the run the lost create made, and adopts it.
    h.redeliver();
    h.provider.on_find(Ok(Some(Run {
        adopted: true,
        ..run("run-1", RunStatus::Queued)
    })));

    parked(h.deliver().await);

    let calls = h.take_calls();
    assert_eq!(calls[0], Call::FindRun);
    assert_eq!(creates(&calls), 0);
    assert_eq!(
        h.last_checkpoint().provider.run_id.as_deref(),
        Some("run-1")
    );
    assert_eq!(h.last_checkpoint().provider.creates, 1);
}

#[tokio::test(start_paused = true)]
async fn a_throttled_create_lowers_the_shared_cap_and_retries_with_nothing_to_reconcile() {
    let h = Harness::new(Checkpoint::default());
    let retry_after = Some(Duration::from_secs(3));
    h.provider.on_create(Err(ProviderError::Transient {
        operation: Operation::Create,
        detail: detail(429, "RATE_LIMITED", retry_after),
        source: None,
    }));

    let (after, error) = retried(h.deliver().await);

    assert_eq!(after, Duration::from_secs(3));
    assert_eq!(error.code, "RATE_LIMITED");
    let mut expected = h.submit_calls(1);
    expected.extend([Call::ThrottleSlots, Call::ReleaseSlot, Call::Keep]);
    assert_eq!(h.take_calls(), expected);
    let checkpoint = h.last_checkpoint();
    // Known to have created nothing: the retry need not look before creating.
    assert_eq!(checkpoint.provider.submitted_at_ms, None);
    assert_eq!(checkpoint.step_retries.get("submit"), Some(&1));
    assert!(!h.coord.holds(&h.job_id));
}

#[tokio::test(start_paused = true)]
async fn out_of_credit_pauses_submissions_and_defers_without_counting() {
    let mut h = Harness::new(Checkpoint::default());
    h.provider.on_create(Err(ProviderError::InsufficientCredit {
        operation: Operation::Create,
        detail: detail(402, "INSUFFICIENT_CREDIT", None),
    }));

    let (after, _) = deferred(h.deliver().await);

    let pause = Duration::from_secs(60);
    assert_eq!(after, pause);
    let mut expected = h.submit_calls(1);
    expected.extend([Call::ReleaseSlot, Call::SetPause(pause), Call::Keep]);
    assert_eq!(h.take_calls(), expected);
    let checkpoint = h.last_checkpoint();
    assert_eq!(checkpoint.provider.submitted_at_ms, None);
    assert!(checkpoint.step_retries.is_empty());
    assert!(!h.coord.holds(&h.job_id));

    // While the pause lasts, the job does not even reach for a slot.
    h.redeliver();
    let (after, reason) = deferred(h.deliver().await);
    assert_eq!(after, pause);
    assert!(reason.contains("paused"), "{reason}");
    assert_eq!(h.take_calls(), vec![Call::PauseReason]);
}

#[tokio::test(start_paused = true)]
async fn a_full_provider_limit_defers_and_registers_the_job_as_a_waiter() {
    let h = Harness::new(Checkpoint::default());
    h.coord.with(|state| state.slots_full = true);

    let (after, _) = deferred(h.deliver().await);

    assert_eq!(after, Duration::from_secs(5));
    let mut expected = h.submit_calls(1);
    expected.truncate(3);
    assert_eq!(h.take_calls(), expected);
    let waiters = h.coord.with(|state| state.waiters.clone());
    assert_eq!(waiters, std::slice::from_ref(&h.job_id));
    assert!(h.saves().is_empty());
}

#[tokio::test(start_paused = true)]
async fn over_the_daily_budget_the_job_is_scheduled_and_deferred() {
    let config = WorkerConfig {
        daily_budget_usd: 5.0,
        ..WorkerConfig::default()
    };
    let h = Harness::with_config(config, Checkpoint::default());
    h.coord.with(|state| {
        state.budget = Some(BudgetDecision::OverDailyBudget {
            spent_micros: 5_000_000,
        })
    });

    let (after, reason) = deferred(h.deliver().await);

    assert_eq!(after, Duration::from_secs(300));
    assert_eq!(
        reason,
        "over the daily budget: $5.00 of $5.00 committed today"
    );
    assert_eq!(
        h.take_calls(),
        vec![
            Call::PauseReason,
            Call::ReserveBudget(h.estimate(), 5_000_000),
            Call::SetState(JobState::Scheduled, reason),
        ]
    );
    assert!(h.saves().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_early_callback_makes_the_job_poll_at_once_instead_of_parking() {
    let h = Harness::new(Checkpoint::default());
    h.coord
        .with(|state| state.early_callback = Some("succeeded".to_owned()));
    h.provider.on_create(Ok(run("run-1", RunStatus::Queued)));
    h.provider.on_get(Ok(succeeded("run-1")));
    h.provider.on_refresh(Ok(video(FRESH_URL, Some(1234))));

    let completion = h.deliver().await.expect("the job completes in one attempt");

    let mut expected = h.submit_calls(1);
    expected.extend([
        Call::BindRun("run-1".to_owned(), BIND_TTL),
        // No park follows: the run id is saved before it is read.
        Call::Save(JobState::Generating, String::new()),
        Call::GetRun("run-1".to_owned()),
        Call::ReleaseSlot,
        Call::RecordGenTime(
            h.kind(),
            GenTimeHistogram::encode_field(GenTimeHistogram::bucket_of(100_000)),
        ),
        Call::Save(JobState::Downloading, String::new()),
    ]);
    expected.extend(h.rehost_calls("run-1", FRESH_URL, Some(1234)));
    assert_eq!(h.take_calls(), expected);
    assert_eq!(completion.charged_micros, 910_000);
}

#[tokio::test(start_paused = true)]
async fn shutting_down_hands_the_job_over_before_any_call() {
    let h = Harness::new(Checkpoint::default());
    h.job.shutting_down.store(true, Ordering::SeqCst);

    let (after, _) = deferred(h.deliver().await);

    assert_eq!(after, Duration::ZERO);
    assert_eq!(h.take_calls(), Vec::<Call>::new());
}

// ---------------------------------------------------------------------------------------------
// Generate.

#[tokio::test(start_paused = true)]
async fn a_parked_job_whose_run_still_runs_parks_again_without_saving() {
    let h = Harness::new(generating("running", Duration::from_secs(30)));
    h.provider.on_get(Ok(run("run-1", RunStatus::Running)));

    let after = parked(h.deliver().await);

    // Cold rule: a tenth of the run's 30 s age, shortened by at most 10 % of jitter.
    assert!(
        after >= Duration::from_millis(2_600) && after <= Duration::from_millis(3_100),
        "{after:?}"
    );
    assert_eq!(
        h.take_calls(),
        vec![
            Call::GetRun("run-1".to_owned()),
            Call::GenTimes(h.kind()),
            // Not held (lapsed): renewing finds none, so it is taken again.
            Call::RenewSlot(after + LEASE),
            Call::AcquireSlot {
                lease: after + LEASE,
                wait: false
            },
        ]
    );
    assert!(h.saves().is_empty());
    assert!(h.coord.holds(&h.job_id));
}

#[tokio::test(start_paused = true)]
async fn a_changed_status_is_saved_before_parking() {
    let h = Harness::new(generating("queued", Duration::from_secs(30)));
    h.provider.on_get(Ok(run("run-1", RunStatus::Running)));

    let after = parked(h.deliver().await);

    assert_eq!(
        h.take_calls(),
        vec![
            Call::GetRun("run-1".to_owned()),
            Call::Save(JobState::Generating, String::new()),
            Call::GenTimes(h.kind()),
            // Not held (lapsed): renewing finds none, so it is taken again.
            Call::RenewSlot(after + LEASE),
            Call::AcquireSlot {
                lease: after + LEASE,
                wait: false
            },
        ]
    );
    assert_eq!(
        h.last_checkpoint().provider.status.as_deref(),
        Some("running")
    );
}

#[tokio::test(start_paused = true)]
async fn polls_follow_the_learned_generation_times() {
    let h = Harness::new(generating("running", Duration::from_secs(30)));
    // 20 runs of this kind took about 50 s: the next poll aims at their end, not at 3 s.
    let bucket = GenTimeHistogram::encode_field(GenTimeHistogram::bucket_of(50_000));
    h.coord.with(|state| state.histogram = vec![(bucket, 20)]);
    h.provider.on_get(Ok(run("run-1", RunStatus::Running)));

    let after = parked(h.deliver().await);

    assert!(
        after >= Duration::from_secs(15) && after <= Duration::from_secs(21),
        "{after:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_succeeded_run_frees_its_slot_learns_its_time_and_is_rehosted_and_charged() {
    let h = Harness::new(generating("running", Duration::from_secs(100)));
    h.coord.with(|state| state.holders.insert(h.job_id.clone()));
    h.provider.on_get(Ok(succeeded("run-1")));
    h.provider.on_refresh(Ok(video(FRESH_URL, Some(1234))));

    let completion = h.deliver().await.expect("the job completes");

    let mut expected = vec![
        Call::GetRun("run-1".to_owned()),
        Call::ReleaseSlot,
        Call::RecordGenTime(
            h.kind(),
            GenTimeHistogram::encode_field(GenTimeHistogram::bucket_of(100_000)),
        ),
        Call::Save(JobState::Downloading, String::new()),
    ];
    expected.extend(h.rehost_calls("run-1", FRESH_URL, Some(1234)));
    assert_eq!(h.take_calls(), expected);
    assert!(!h.coord.holds(&h.job_id));
    assert_eq!(
        completion,
        Completion {
            extras: EventExtras {
                video: Some(to_core(stored(&h.job_id))),
                duration_seconds: Some(h.spec.request.billed_seconds()),
                provider_run_id: Some("run-1".to_owned()),
                cost_usd: Some(0.91),
            },
            charged_micros: 910_000,
        }
    );
    let checkpoint = h.last_checkpoint();
    assert!(checkpoint.provider.finished);
    assert_eq!(checkpoint.provider.cost_usd, Some(0.91));
    assert_eq!(checkpoint.provider.file_size, Some(1234));
    assert_eq!(checkpoint.video, Some(to_core(stored(&h.job_id))));
}

#[tokio::test(start_paused = true)]
async fn a_job_resumed_with_a_run_id_only_polls_it_across_deliveries() {
    let mut h = Harness::new(Checkpoint::default());
    h.provider.on_create(Ok(run("run-1", RunStatus::Queued)));
    parked(h.deliver().await);
    let mut calls = h.take_calls();

    // Between polls: a credit pause and a full limit would stop a submit; not a poll.
    h.coord.with(|state| {
        state.pause = Some("out of credit".to_owned());
        state.slots_full = true;
    });
    h.redeliver();
    h.provider.on_get(Ok(run("run-1", RunStatus::Running)));
    parked(h.deliver().await);
    let second = h.take_calls();
    assert_eq!(second[0], Call::GetRun("run-1".to_owned()));
    calls.extend(second);

    h.redeliver();
    h.provider.on_get(Ok(succeeded("run-1")));
    h.provider.on_refresh(Ok(video(FRESH_URL, Some(1234))));
    let completion = h.deliver().await.expect("the job completes");
    calls.extend(h.take_calls());

    assert_eq!(creates(&calls), 1);
    assert!(!calls.contains(&Call::FindRun));
    assert_eq!(calls.iter().filter(|c| **c == Call::PauseReason).count(), 1);
    assert_eq!(h.last_checkpoint().provider.creates, 1);
    assert_eq!(completion.extras.provider_run_id.as_deref(), Some("run-1"));
}

#[tokio::test(start_paused = true)]
async fn a_transient_read_error_parks_without_counting_a_retry() {
    let h = Harness::new(generating("running", Duration::from_secs(30)));
    h.provider.on_get(Err(ProviderError::Transient {
        operation: Operation::GetRun,
        detail: detail(503, "UNAVAILABLE", Some(Duration::from_secs(7))),
        source: None,
    }));

    let after = parked(h.deliver().await);

    // The provider's Retry-After (at least the floor).
    assert_eq!(after, Duration::from_secs(7));
    assert_eq!(
        h.take_calls(),
        vec![
            Call::GetRun("run-1".to_owned()),
            // Not held (lapsed): renewing finds none, so it is taken again.
            Call::RenewSlot(after + LEASE),
            Call::AcquireSlot {
                lease: after + LEASE,
                wait: false
            },
        ]
    );
    // Nothing saved: no retry counted, the run id kept.
    assert!(h.saves().is_empty());
    assert!(h.last_checkpoint().step_retries.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_run_not_found_is_tolerated_up_to_the_limit_then_retried_then_failed() {
    let mut h = Harness::new(generating("queued", Duration::from_secs(30)));
    let not_found = || {
        Err(ProviderError::RunNotFound {
            run_id: "run-1".to_owned(),
            detail: detail(404, "NOT_FOUND", None),
        })
    };
    // Two 404s (the limit) park at the floor, each counted in the checkpoint.
    for misses in 1..=2 {
        h.provider.on_get(not_found());
        let after = parked(h.deliver().await);
        assert_eq!(after, FLOOR);
        assert_eq!(h.take_calls(), {
            let mut calls = vec![
                Call::GetRun("run-1".to_owned()),
                Call::Save(JobState::Generating, String::new()),
                Call::RenewSlot(FLOOR + LEASE),
            ];
            // Not held at first (lapsed): renewing finds none, so it is taken again;
            // later parks renew it.
            if misses == 1 {
                calls.push(Call::AcquireSlot {
                    lease: FLOOR + LEASE,
                    wait: false,
                });
            }
            calls
        });
        let checkpoint = h.last_checkpoint();
        assert_eq!(checkpoint.provider.not_found, misses);
        assert!(checkpoint.step_retries.is_empty());
        h.redeliver();
    }
    // Past the limit: the slot goes back and a retry of the generate step is counted.
    for retry in 1..=2 {
        h.provider.on_get(not_found());
        let (_, error) = retried(h.deliver().await);
        assert_eq!(
            (error.step.as_str(), error.code.as_str()),
            ("generate", "NOT_FOUND")
        );
        assert!(error.cost_committed);
        assert_eq!(
            h.take_calls(),
            vec![
                Call::GetRun("run-1".to_owned()),
                Call::ReleaseSlot,
                Call::Keep,
            ]
        );
        let checkpoint = h.last_checkpoint();
        assert_eq!(checkpoint.step_retries.get("generate"), Some(&retry));
        // Never a new run for a run we hold.
        assert_eq!(checkpoint.provider.run_id.as_deref(), Some("run-1"));
        h.redeliver();
    }
    // The generate budget (2) spent: the job fails.
    h.provider.on_get(not_found());
    let error = failed_with(h.deliver().await);
    assert_eq!(error.code, "NOT_FOUND");
    assert!(
        error
            .message
            .contains("gave up after 2 retries of generate"),
        "{}",
        error.message
    );
    assert_eq!(creates(&h.take_calls()), 0);
}

#[tokio::test(start_paused = true)]
async fn a_run_succeeded_without_a_video_is_reread_at_the_floor_then_fails() {
    let mut h = Harness::new(generating("running", Duration::from_secs(30)));
    for reads in 1..=2 {
        h.provider.on_get(Ok(run("run-1", RunStatus::Succeeded)));
        let after = parked(h.deliver().await);
        assert_eq!(after, FLOOR);
        assert_eq!(h.take_calls(), {
            let mut calls = vec![
                Call::GetRun("run-1".to_owned()),
                Call::Save(JobState::Generating, String::new()),
                Call::RenewSlot(FLOOR + LEASE),
            ];
            // Not held at first (lapsed): renewing finds none, so it is taken again;
            // later parks renew it.
            if reads == 1 {
                calls.push(Call::AcquireSlot {
                    lease: FLOOR + LEASE,
                    wait: false,
                });
            }
            calls
        });
        assert_eq!(h.last_checkpoint().provider.empty_reads, reads);
        h.redeliver();
    }
    h.provider.on_get(Ok(run("run-1", RunStatus::Succeeded)));

    let error = failed_with(h.deliver().await);

    assert_eq!(error.code, "SUCCEEDED_WITHOUT_OUTPUT");
    assert_eq!(error.step, "generate");
    assert!(error.cost_committed);
    assert_eq!(
        h.take_calls(),
        vec![Call::GetRun("run-1".to_owned()), Call::ReleaseSlot]
    );
}

#[tokio::test(start_paused = true)]
async fn a_run_the_provider_failed_is_retried_with_a_new_create() {
    let mut h = Harness::new(generating("running", Duration::from_secs(30)));
    h.provider.on_get(Ok(failed(
        "run-1",
        RunFailure {
            code: Some("PROVIDER_TIMEOUT".to_owned()),
            message: Some("the model timed out".to_owned()),
            stage: Some("execution".to_owned()),
        },
    )));

    let (_, error) = retried(h.deliver().await);

    assert_eq!(
        (error.step.as_str(), error.code.as_str()),
        ("generate", "PROVIDER_TIMEOUT")
    );
    // Failed runs are not billed.
    assert!(!error.cost_committed);
    assert_eq!(
        h.take_calls(),
        vec![
            Call::GetRun("run-1".to_owned()),
            // Released by the poll and again by the failure mapping (see the report).
            Call::ReleaseSlot,
            Call::ReleaseSlot,
            Call::Keep,
        ]
    );
    let checkpoint = h.last_checkpoint();
    assert_eq!(checkpoint.provider.run_id, None);
    assert_eq!(checkpoint.provider.submitted_at_ms, None);
    assert_eq!(checkpoint.provider.status.as_deref(), Some("failed"));
    assert_eq!(checkpoint.step_retries.get("generate"), Some(&1));

    // The retry creates a second run (no lookup: the failed one is known), attempt 2.
    h.redeliver();
    h.provider.on_create(Ok(run("run-2", RunStatus::Queued)));
    parked(h.deliver().await);
    let calls = h.take_calls();
    assert_eq!(calls[..5], h.submit_calls(2)[..]);
    assert_eq!(creates(&calls), 1);
    let provider = h.last_checkpoint().provider;
    assert_eq!(
        (provider.run_id.as_deref(), provider.creates),
        (Some("run-2"), 2)
    );
}

#[tokio::test(start_paused = true)]
async fn failed_runs_past_the_generate_budget_fail_the_job() {
    let mut checkpoint = generating("running", Duration::from_secs(30));
    checkpoint.step_retries.insert("generate".to_owned(), 2);
    let h = Harness::new(checkpoint);
    h.provider.on_get(Ok(failed(
        "run-1",
        RunFailure {
            code: Some("PROVIDER_TIMEOUT".to_owned()),
            ..RunFailure::default()
        },
    )));

    let error = failed_with(h.deliver().await);

    assert_eq!(error.code, "PROVIDER_TIMEOUT");
    assert!(!error.cost_committed);
    assert!(
        error
            .message
            .contains("gave up after 2 retries of generate"),
        "{}",
        error.message
    );
    assert_eq!(creates(&h.take_calls()), 0);
}

#[tokio::test(start_paused = true)]
async fn a_moderated_run_fails_uncharged_and_frees_its_slot() {
    let h = Harness::new(generating("running", Duration::from_secs(30)));
    h.coord.with(|state| state.holders.insert(h.job_id.clone()));
    h.provider.on_get(Ok(failed(
        "run-1",
        RunFailure {
            code: Some("CONTENT_POLICY_VIOLATION".to_owned()),
            message: Some("flagged".to_owned()),
            stage: Some("moderation".to_owned()),
        },
    )));

    let error = failed_with(h.deliver().await);

    assert_eq!(error.step, "generate");
    assert_eq!(error.code, "CONTENT_POLICY_VIOLATION");
    assert!(!error.cost_committed);
    assert_eq!(
        h.take_calls(),
        vec![
            Call::GetRun("run-1".to_owned()),
            Call::ReleaseSlot,
            Call::ReleaseSlot,
        ]
    );
    assert!(!h.coord.holds(&h.job_id));
    assert!(h.saves().is_empty());
}

#[tokio::test(start_paused = true)]
async fn past_its_deadline_a_job_fails_and_gives_its_slot_back() {
    let mut h = Harness::new(generating("running", Duration::from_secs(60)));
    h.job.created_ms = now_ms() - (30 * 60 + 1) * 1000;
    h.coord.with(|state| state.holders.insert(h.job_id.clone()));

    let error = failed_with(h.deliver().await);

    assert_eq!(
        (error.step.as_str(), error.code.as_str()),
        ("generate", "DEADLINE_EXCEEDED")
    );
    // A run exists: it may be billed.
    assert!(error.cost_committed);
    assert_eq!(h.take_calls(), vec![Call::ReleaseSlot]);
    assert!(!h.coord.holds(&h.job_id));

    // Without a run, nothing to give back and nothing billed.
    let mut h = Harness::new(Checkpoint::default());
    h.job.created_ms = now_ms() - (30 * 60 + 1) * 1000;
    let error = failed_with(h.deliver().await);
    assert_eq!(error.code, "DEADLINE_EXCEEDED");
    assert!(!error.cost_committed);
    assert_eq!(h.take_calls(), Vec::<Call>::new());
}

#[tokio::test(start_paused = true)]
async fn a_cancellation_seen_by_the_watch_ends_a_long_read() {
    let h = Harness::new(generating("running", Duration::from_secs(30)));
    h.provider.on_get_never();
    h.coord.with(|state| {
        state.job_states = [Some(JobState::Generating), Some(JobState::Cancelled)].into()
    });
    let started = tokio::time::Instant::now();

    let result = h.deliver().await;

    assert!(matches!(result, Err(JobFailure::Cancelled)), "{result:?}");
    // One look every 10 s (virtual time), the slot renewed at each look while still going.
    assert_eq!(started.elapsed(), Duration::from_secs(20));
    assert_eq!(
        h.take_calls(),
        vec![
            Call::GetRun("run-1".to_owned()),
            Call::ReadJobState,
            Call::RenewSlot(LEASE),
            Call::ReadJobState,
        ]
    );
    assert!(h.saves().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_seen_by_the_watch_ends_a_long_read() {
    let h = Harness::new(generating("running", Duration::from_secs(30)));
    h.provider.on_get_never();
    h.job.lost.store(true, Ordering::SeqCst);

    let result = h.deliver().await;

    assert!(matches!(result, Err(JobFailure::LeaseLost)), "{result:?}");
    assert_eq!(h.take_calls(), vec![Call::GetRun("run-1".to_owned())]);
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_during_a_long_read_hands_the_job_over() {
    let h = Harness::new(generating("running", Duration::from_secs(30)));
    h.provider.on_get_never();
    let flag = h.job.shutting_down.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        flag.store(true, Ordering::SeqCst);
    });
    let started = tokio::time::Instant::now();

    let (after, reason) = deferred(h.deliver().await);

    assert_eq!(after, Duration::ZERO);
    assert!(reason.contains("shutting down"), "{reason}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited <= Duration::from_millis(1_250),
        "{waited:?}"
    );
    assert_eq!(h.take_calls(), vec![Call::GetRun("run-1".to_owned())]);
    assert!(h.saves().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Download, upload, publish.

#[tokio::test(start_paused = true)]
async fn an_object_already_stored_is_published_without_a_download() {
    let mut checkpoint = generating("succeeded", Duration::from_secs(100));
    checkpoint.provider.finished = true;
    checkpoint.provider.cost_usd = Some(0.91);
    let h = Harness::new(checkpoint);
    h.store.on_head(Ok(Some(stored(&h.job_id))));

    let completion = h.deliver().await.expect("the job completes");

    assert_eq!(
        h.take_calls(),
        vec![
            Call::Head,
            Call::Save(JobState::Publishing, String::new()),
            Call::Keep,
        ]
    );
    assert_eq!(completion.extras.video, Some(to_core(stored(&h.job_id))));
    assert_eq!(completion.charged_micros, 910_000);
}

#[tokio::test(start_paused = true)]
async fn a_verified_object_in_the_checkpoint_is_only_published() {
    let mut checkpoint = generating("succeeded", Duration::from_secs(100));
    checkpoint.provider.finished = true;
    checkpoint.video = Some(to_core(stored("earlier")));
    let h = Harness::new(checkpoint);

    let completion = h.deliver().await.expect("the job completes");

    assert_eq!(h.take_calls(), vec![Call::Keep]);
    // No cost reported: the estimate is charged.
    assert_eq!(completion.charged_micros, h.estimate());
}

#[tokio::test(start_paused = true)]
async fn an_expired_download_url_is_refreshed_from_the_run_not_recreated() {
    let mut checkpoint = generating("succeeded", Duration::from_secs(100));
    checkpoint.provider.finished = true;
    checkpoint.provider.file_size = Some(1234);
    let h = Harness::new(checkpoint);
    h.provider.on_refresh(Ok(video(FIRST_URL, None)));
    h.provider.on_refresh(Ok(video(FRESH_URL, None)));
    h.store.on_rehost(Err(RehostError::SourceStatus {
        url: RedactedUrl::new(FIRST_URL),
        status: 410,
        retry_after: None,
    }));

    h.deliver().await.expect("the job completes");

    assert_eq!(
        h.take_calls(),
        vec![
            Call::Head,
            Call::Save(JobState::Downloading, String::new()),
            Call::RefreshUrl("run-1".to_owned()),
            Call::SetState(JobState::Uploading, String::new()),
            // The provider named no size this time: the checkpoint's is expected.
            Call::Rehost {
                url: FIRST_URL.to_owned(),
                expected: Some(1234)
            },
            // Uploading already: not written again.
            Call::RefreshUrl("run-1".to_owned()),
            Call::Rehost {
                url: FRESH_URL.to_owned(),
                expected: Some(1234)
            },
            Call::Save(JobState::Publishing, String::new()),
            Call::Keep,
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn unreachable_object_storage_counts_a_download_retry() {
    let mut checkpoint = generating("succeeded", Duration::from_secs(100));
    checkpoint.provider.finished = true;
    let h = Harness::new(checkpoint);
    h.store.on_head(Err(StorageError::Interrupted {
        operation: "HeadObject",
        target: "videos/x.mp4".to_owned(),
    }));

    let (_, error) = retried(h.deliver().await);

    assert_eq!(
        (error.step.as_str(), error.code.as_str()),
        ("upload", "STORAGE_UNAVAILABLE")
    );
    assert_eq!(h.take_calls(), vec![Call::Head, Call::Keep,]);
    assert_eq!(h.last_checkpoint().step_retries.get("download"), Some(&1));
}
