//! The testkit never waits on a server it cannot prove it started.

use std::path::PathBuf;
use std::time::Duration;

use klingq_testkit::seaweed::ensure_seaweedfs_in;
use klingq_testkit::wait_for;

/// A folder of this test's own, removed (which also stops its servers) when dropped.
struct StateDir(PathBuf);

impl StateDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "klingq-testkit-{name}-{}-{:x}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("creating the state folder");
        StateDir(dir)
    }

    fn record(&self, port: u16, token: &str) {
        std::fs::write(
            self.0.join("server.json"),
            format!(r#"{{"s3_port":{port},"token":"{token}","pgid":1}}"#),
        )
        .expect("writing server.json");
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_dead_end_or_foreign_server_on_the_recorded_port_is_never_waited_on() {
    // A dead end: accepts connections, never answers.
    let squatter = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let squatter_port = squatter.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        loop {
            if let Ok((stream, _)) = squatter.accept().await {
                connections.push(stream);
            }
        }
    });

    let first = StateDir::new("dead-end");
    first.record(squatter_port, "0123456789abcdef");
    let started = tokio::time::Instant::now();
    let ours = ensure_seaweedfs_in(&first.0)
        .await
        .expect("a server of its own");
    assert_ne!(port_of(&ours.endpoint_url), squatter_port);
    let bucket = ours
        .unique_bucket("testkit")
        .await
        .expect("it accepts writes");
    assert!(!bucket.is_empty());
    eprintln!("started past the dead end in {:?}", started.elapsed());

    // The same folder finds the same server again, proven by its token.
    let again = ensure_seaweedfs_in(&first.0).await.unwrap();
    assert_eq!(again, ours);

    // A server that answers S3 but was not started for this folder: a token it cannot serve.
    let second = StateDir::new("foreign");
    second.record(port_of(&ours.endpoint_url), "not-the-token-it-holds");
    let other = ensure_seaweedfs_in(&second.0)
        .await
        .expect("a second server");
    assert_ne!(other.endpoint_url, ours.endpoint_url);
    other
        .unique_bucket("testkit")
        .await
        .expect("it accepts writes");
    held.abort();

    // Removing a folder stops its server (the watchdog checks every second).
    let other_port = port_of(&other.endpoint_url);
    drop(second);
    wait_for(
        "the removed folder's server to stop",
        Duration::from_secs(30),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", other_port))
                .await
                .is_err()
                .then_some(())
        },
    )
    .await
    .unwrap();
}
