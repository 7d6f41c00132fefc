//! `klingq bench rehost`: re-host throughput and peak RSS against a plain streamed download.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::{SimProcess, allow_loopback_downloads, peak_rss_mib, reset_peak_rss};
use crate::settings::Settings;

#[derive(Debug, Args)]
pub(crate) struct RehostBenchArgs {
    /// Video sizes in MB (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,50,500")]
    size_mb: Vec<u64>,
}

#[derive(Debug, Serialize)]
struct RehostFigures {
    size_mb: u64,
    rehost_seconds: f64,
    rehost_mb_per_s: f64,
    rehost_peak_rss_mib: f64,
    ceiling_seconds: f64,
    ceiling_mb_per_s: f64,
    ceiling_peak_rss_mib: f64,
}

pub(super) async fn run(args: RehostBenchArgs, settings: Settings) -> anyhow::Result<()> {
    let mut storage = settings.storage.clone();
    allow_loopback_downloads(&mut storage);
    let store = klingq_storage::VideoStore::new(storage)
        .await
        .context("building the S3 client (set KLINGQ_S3_ENDPOINT, KLINGQ_S3_BUCKET and AWS_* for an S3-compatible store)")?;
    store.ensure_bucket().await.context("creating the bucket")?;
    let http = reqwest::Client::new();
    let mut all = Vec::new();
    for size_mb in &args.size_mb {
        let bytes = size_mb * 1_000_000;
        // A 5-second video of the wanted size.
        let per_second = (bytes / 5).to_string();
        let sim = SimProcess::start(&[
            "--time-scale",
            "0.001",
            "--video-bytes-per-second",
            &per_second,
        ])
        .await?;
        let url = sim_video_url(&http, &sim.base_url).await?;

        reset_peak_rss();
        let started = Instant::now();
        let mut response = http.get(&url).send().await?.error_for_status()?;
        let mut received = 0u64;
        while let Some(chunk) = response.chunk().await? {
            received += chunk.len() as u64;
        }
        let ceiling_seconds = started.elapsed().as_secs_f64();
        let ceiling_peak_rss_mib = peak_rss_mib();

        reset_peak_rss();
        let job_id = klingq_core::JobId::new().to_string();
        let started = Instant::now();
        let stored = store
            .rehost(&job_id, &url, None)
            .await
            .map_err(|error| anyhow::anyhow!("re-host failed: {error}"))?;
        let rehost_seconds = started.elapsed().as_secs_f64();
        let rehost_peak_rss_mib = peak_rss_mib();
        anyhow::ensure!(
            stored.size == received,
            "stored {} bytes, served {received}",
            stored.size
        );
        let megabytes = received as f64 / 1_000_000.0;
        let figures = RehostFigures {
            size_mb: *size_mb,
            rehost_seconds,
            rehost_mb_per_s: megabytes / rehost_seconds,
            rehost_peak_rss_mib,
            ceiling_seconds,
            ceiling_mb_per_s: megabytes / ceiling_seconds,
            ceiling_peak_rss_mib,
        };
        println!(
            "{size_mb} MB: re-host {:.0} MB/s ({:.2} s, peak RSS {:.1} MiB); plain streamed download {:.0} MB/s (peak RSS {:.1} MiB)",
            figures.rehost_mb_per_s,
            figures.rehost_seconds,
            figures.rehost_peak_rss_mib,
            figures.ceiling_mb_per_s,
            figures.ceiling_peak_rss_mib
        );
        all.push(figures);
    }
    println!("{}", serde_json::to_string(&all)?);
    Ok(())
}

/// Creates a run on the simulator, waits for it, and returns its video URL.
async fn sim_video_url(http: &reqwest::Client, base_url: &str) -> anyhow::Result<String> {
    let model = klingq_provider::DEFAULT_MODEL;
    let run: serde_json::Value = http
        .post(format!("{base_url}/v1/models/{model}/runs"))
        .bearer_auth("bench")
        .json(&serde_json::json!({
            "input": {"prompt": "bench", "start_image_url": "https://example.com/a.png"},
            "client_ref": klingq_core::JobId::new().to_string(),
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = run["id"].as_str().context("run id")?.to_owned();
    let started = Instant::now();
    loop {
        let run: serde_json::Value = http
            .get(format!("{base_url}/v1/runs/{id}"))
            .bearer_auth("bench")
            .send()
            .await?
            .json()
            .await?;
        if run["status_code"] == "succeeded" {
            let url = run["output"]["video"]["url"]
                .as_str()
                .or_else(|| run["output"]["outputs"][0]["url"].as_str())
                .context("video url")?;
            return Ok(url.to_owned());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
