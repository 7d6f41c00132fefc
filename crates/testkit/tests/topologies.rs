//! The testkit starts real Redis topologies, and their failovers keep acknowledged writes.

use std::process::Stdio;
use std::time::Instant;

use klingq_testkit::cluster::slot_of;
use klingq_testkit::{RedisCluster, RedisSentinel};
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

/// Runs `script` (one command a line, all on one connection) through `redis-cli -p PORT`,
/// following redirections when `follow`; returns its output, trimmed, without the lines
/// `-c` prints when it follows a redirection.
async fn cli(port: u16, follow: bool, script: &str) -> anyhow::Result<String> {
    let mut command = Command::new("redis-cli");
    command.args(["-p", &port.to_string()]);
    if follow {
        command.arg("-c");
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(script.as_bytes()).await?;
    drop(stdin);
    let output = child.wait_with_output().await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let replies: Vec<&str> = text
        .lines()
        .filter(|line| !line.starts_with("-> Redirected to slot"))
        .collect();
    Ok(replies.join("\n").trim().to_owned())
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_cluster_fails_over_and_keeps_a_replicated_write() -> anyhow::Result<()> {
    let started = Instant::now();
    let cluster = RedisCluster::start().await?;
    eprintln!("cluster started in {:?}", started.elapsed());
    assert_eq!(cluster.node_urls().len(), 6);

    let key = "{klingq}:x";
    let slot = slot_of(key);
    assert_eq!(slot, 6281);
    let owner = cluster.owner_of_slot(slot).await?;
    assert_eq!(cluster.primary_ports().await?.len(), 3);

    // Entered through a primary that does not own the slot, a plain client is redirected.
    let wrong = port_of(&cluster.url_not_owning(slot).await?);
    assert_ne!(wrong, owner);
    assert_eq!(
        cli(wrong, false, &format!("SET {key} 0\n")).await?,
        format!("MOVED {slot} 127.0.0.1:{owner}")
    );
    // A cluster client follows the redirection from the seed.
    assert_eq!(
        cli(
            port_of(&cluster.seed_url()),
            true,
            &format!("SET {key} 0\n")
        )
        .await?,
        "OK"
    );

    // Writes at the owner, acknowledged by its replica (WAIT on the writing connection).
    cluster.reset_stats().await?;
    let writes: String = (1..=20).map(|i| format!("SET {key} {i}\n")).collect();
    let replies = cli(owner, false, &format!("{writes}WAIT 1 10000\n")).await?;
    assert_eq!(replies.lines().last(), Some("1"), "WAIT: {replies}");
    let counts = cluster.commands_per_node().await?;
    assert_eq!(counts.len(), 6);
    let at_owner = counts.iter().find(|(port, _)| *port == owner).unwrap().1;
    assert!(at_owner >= 21, "commands per node: {counts:?}");

    let killed_at = Instant::now();
    let killed = cluster.kill_primary_of_slot(slot).await?;
    assert_eq!(killed, owner);
    let new_owner = cluster.wait_failover(slot, killed).await?;
    eprintln!("cluster failed over in {:?}", killed_at.elapsed());
    assert_ne!(new_owner, owner);
    assert_eq!(cluster.owner_of_slot(slot).await?, new_owner);
    assert_eq!(cluster.node_urls().len(), 5);

    // The promoted replica has the write, and serves the slot directly and through any node.
    assert_eq!(cli(new_owner, false, &format!("GET {key}\n")).await?, "20");
    let seed = port_of(&cluster.seed_url());
    assert_ne!(seed, killed);
    assert_eq!(cli(seed, true, &format!("GET {key}\n")).await?, "20");
    assert_eq!(
        cli(new_owner, false, &format!("SET {key} 21\n")).await?,
        "OK"
    );

    // The killed primary comes back as a replica of its successor.
    let restarted_at = Instant::now();
    cluster.restart_node(killed).await?;
    eprintln!("killed node rejoined in {:?}", restarted_at.elapsed());
    assert_eq!(cluster.owner_of_slot(slot).await?, new_owner);
    assert_eq!(
        cli(killed, false, "ROLE\n").await?.lines().next(),
        Some("slave")
    );
    assert_eq!(cluster.node_urls().len(), 6);
    Ok(())
}

#[tokio::test]
async fn sentinels_promote_the_replica_when_the_primary_dies() -> anyhow::Result<()> {
    let started = Instant::now();
    let sentinel = RedisSentinel::start().await?;
    eprintln!("sentinel setup started in {:?}", started.elapsed());
    let ports = sentinel.sentinel_ports();
    assert_eq!(ports.len(), 3);
    assert_eq!(
        sentinel.url(),
        format!(
            "redis+sentinel://127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}/mymaster",
            ports[0], ports[1], ports[2]
        )
    );
    let primary = sentinel.primary_port().await?;
    assert_eq!(
        sentinel.primary_url().await?,
        format!("redis://127.0.0.1:{primary}")
    );

    let replies = cli(primary, false, "SET klingq:x 1\nWAIT 1 10000\n").await?;
    assert_eq!(replies, "OK\n1");

    let killed_at = Instant::now();
    let killed = sentinel.kill_primary().await?;
    assert_eq!(killed, primary);
    let promoted = sentinel.wait_failover(killed).await?;
    eprintln!("sentinel failed over in {:?}", killed_at.elapsed());
    assert_ne!(promoted, primary);
    assert_eq!(sentinel.primary_port().await?, promoted);
    assert_eq!(cli(promoted, false, "GET klingq:x\n").await?, "1");
    assert_eq!(cli(promoted, false, "SET klingq:x 2\n").await?, "OK");
    Ok(())
}
