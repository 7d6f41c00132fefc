//! A batch's progress until it is done, for `batch submit --wait` and `klingq demo`: a bar on
//! stderr when it is a terminal, else a plain line when something changed (or every 30 s),
//! without colour codes or carriage returns.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use klingq_core::JobState;
use klingq_producer::Producer;
use klingq_producer::view::BatchView;

/// Polls the batch every `interval` seconds until it is done; `quiet_lines` leaves out the
/// plain lines (the bar still shows on a terminal).
pub(crate) async fn wait_for_batch(
    producer: &Producer,
    id: &str,
    interval: f64,
    quiet_lines: bool,
) -> anyhow::Result<BatchView> {
    let interval = Duration::from_secs_f64(interval.clamp(0.05, 3600.0));
    let terminal = std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:20}] {pos}/{len} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    });
    let mut last_line = String::new();
    let mut last_printed = tokio::time::Instant::now();
    loop {
        let batch = producer.batch(id).await?;
        let line = progress_line(&batch);
        // The estimate changes at every look: it is shown, not compared.
        let eta = eta_suffix(&batch);
        if let Some(bar) = &bar {
            bar.set_length(batch.total);
            bar.set_position(batch.terminal);
            bar.set_message(format!("{line}{eta}"));
        } else if !quiet_lines
            && (line != last_line || last_printed.elapsed() >= Duration::from_secs(30))
        {
            eprintln!("{}/{} {line}{eta}", batch.terminal, batch.total);
            last_line = line;
            last_printed = tokio::time::Instant::now();
        }
        if batch.done {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            return Ok(batch);
        }
        tokio::time::sleep(interval).await;
    }
}

/// The batch's estimated finish (labelled an estimate), or its pause.
fn eta_suffix(batch: &BatchView) -> String {
    if batch.paused {
        return format!(
            " · PAUSED: {} (klingq batch resume {})",
            batch
                .pause_reason
                .as_deref()
                .unwrap_or("by its failure guard"),
            batch.id
        );
    }
    match batch.eta.remaining_secs {
        Some(secs) if !batch.done => {
            let secs = secs.round() as u64;
            format!(" · eta ~{}m{:02}s (estimate)", secs / 60, secs % 60)
        }
        _ => String::new(),
    }
}

fn progress_line(batch: &BatchView) -> String {
    let failed = batch.count(JobState::Failed) + batch.count(JobState::Dead);
    format!(
        "done {} · failed {} · cancelled {} · in flight {} · spent ${:.2} of ~${:.2}",
        batch.count(JobState::Succeeded),
        failed,
        batch.count(JobState::Cancelled),
        batch.in_flight,
        batch.charged_usd,
        batch.estimated_usd
    )
}
