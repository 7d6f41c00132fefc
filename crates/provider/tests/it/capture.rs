//! A minimal tracing subscriber that writes every span and event, with all fields, to a buffer,
//! so tests can assert what the client logs (and that the API key is never in it).
//!
//! It is installed process-wide, once: a per-thread (`set_default`) subscriber races with the
//! callsite interest cache when other test threads hit the same callsites first.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Everything logged by the test binary since the capture was installed.
#[derive(Clone, Default)]
pub(crate) struct Captured(Arc<Mutex<String>>);

static GLOBAL: OnceLock<Captured> = OnceLock::new();

impl Captured {
    /// Installs the capturing subscriber as the global default (once) and returns its buffer.
    pub(crate) fn global() -> &'static Captured {
        GLOBAL.get_or_init(|| {
            let captured = Captured::default();
            let subscriber = CaptureSubscriber {
                out: captured.clone(),
                next_id: AtomicU64::new(1),
            };
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in this test binary");
            captured
        })
    }

    pub(crate) fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    fn push(&self, line: &str) {
        let mut out = self.0.lock().unwrap();
        out.push_str(line);
        out.push('\n');
    }
}

struct CaptureSubscriber {
    out: Captured,
    next_id: AtomicU64,
}

struct LineVisitor<'a>(&'a mut String);

impl Visit for LineVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, " {}={value}", field.name());
    }
}

impl Subscriber for CaptureSubscriber {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut line = format!("span {}:", span.metadata().name());
        span.record(&mut LineVisitor(&mut line));
        self.out.push(&line);
        Id::from_u64(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &Id, values: &Record<'_>) {
        let mut line = "record:".to_owned();
        values.record(&mut LineVisitor(&mut line));
        self.out.push(&line);
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = format!(
            "{} {}:",
            event.metadata().level(),
            event.metadata().target()
        );
        event.record(&mut LineVisitor(&mut line));
        self.out.push(&line);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}
