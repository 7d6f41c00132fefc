//! A `klingq worker` for end-to-end tests: the same library code (`klingq_worker::Worker`),
//! with services taken from `E2E_*` variables, so tests can SIGKILL and SIGTERM a real process.

use klingq_e2e::E2eServices;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let services = E2eServices::from_env()?;
    let worker = klingq_worker::Worker::connect(
        services.worker_settings(),
        std::time::Duration::from_secs(10),
    )
    .await?;
    println!("ready");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    worker.run(shutdown).await
}
