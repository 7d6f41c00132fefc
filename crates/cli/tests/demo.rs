//! `klingq demo` and the log output of the built binary, as real processes with stdout and
//! stderr piped: no colour codes outside a terminal, a private `redis-server` when nothing
//! answers at a loopback Redis URL, the install hint when there is none to start, and the whole
//! log in `<data dir>/demo.log` while the terminal shows the progress lines.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use klingq_testkit::redis::{free_port, unique_namespace};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// A whole demo on a loaded 2-core machine, with a Redis to start.
const DEMO_DEADLINE: Duration = Duration::from_secs(300);

/// The binary with none of the environment that would change what these tests see.
fn klingq(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_klingq"));
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for name in [
        "KLINGQ_CONFIG",
        "KLINGQ_REDIS_URL",
        "KLINGQ_S3_ENDPOINT",
        "KLINGQ_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "RUNFLOW_API_KEY",
        "AWS_ACCESS_KEY_ID",
        "RUST_LOG",
        "NO_COLOR",
    ] {
        command.env_remove(name);
    }
    command
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("klingq-{}", unique_namespace(name)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn assert_plain(what: &str, text: &str) {
    assert!(!text.contains("\x1b["), "colour codes in {what}:\n{text}");
    assert!(!text.contains('\r'), "carriage returns in {what}:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_through_a_pipe_have_no_colour_codes() {
    let port = free_port();
    let mut sim = klingq(&["sim", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sim.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("sim listening") {
                return line;
            }
        }
        panic!("the simulator exited without logging that it listens");
    })
    .await
    .expect("the simulator logged nothing within 120 s");
    // The level and the fields would be coloured on a terminal.
    assert!(line.contains(" INFO "), "{line}");
    assert!(
        line.contains(&format!("url=http://127.0.0.1:{port}")),
        "{line}"
    );
    assert_plain("the simulator's log line", &line);
    sim.kill().await.unwrap();
}

/// Runs `klingq demo --jobs 3` against `redis_url` with `data_dir`; returns the exit code,
/// stdout and stderr.
async fn demo(redis_url: &str, data_dir: &Path, path: Option<&Path>) -> (i32, String, String) {
    let mut command = klingq(&["demo", "--jobs", "3", "--bind", "127.0.0.1:0", "--data-dir"]);
    command
        .arg(data_dir)
        .env("KLINGQ_REDIS_URL", redis_url)
        .env("KLINGQ_NAMESPACE", unique_namespace("demo"));
    if let Some(path) = path {
        command.env("PATH", path);
    }
    let output = tokio::time::timeout(DEMO_DEADLINE, command.output())
        .await
        .expect("the demo did not finish in time")
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_redis_the_demo_starts_a_private_one_and_logs_to_a_file() {
    let dir = temp_dir("demo-redis");
    // Nothing listens on this port: the demo's private Redis takes it.
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let (code, stdout, stderr) = demo(&url, &dir, None).await;
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains(&format!(
            "no Redis at {url}: started a private redis-server on 127.0.0.1:{port}, data under {}",
            dir.join("redis").display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("3 of 3 succeeded"), "{stdout}");
    assert!(
        stdout.contains("dashboard and API: http://127.0.0.1:"),
        "{stdout}"
    );
    // Progress as plain lines (stderr is a pipe), and no info logs on the terminal.
    assert!(stderr.contains("3/3 done 3 · failed 0"), "{stderr}");
    assert!(
        !stderr.contains(" INFO "),
        "info logs on the terminal:\n{stderr}"
    );
    assert_plain("stderr", &stderr);
    assert_plain("stdout", &stdout);
    // The whole log is in the file the summary names.
    let log_file = dir.join("demo.log");
    assert!(
        stdout.contains(&format!("log             {}", log_file.display())),
        "{stdout}"
    );
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(log.contains(" INFO "), "{log}");
    assert!(log.contains("klingq_worker"), "{log}");
    assert_plain("demo.log", &log);
    // The private Redis kept its data there and stopped with the demo.
    assert!(dir.join("redis/appendonlydir").is_dir());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the private redis-server still runs on port {port}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_installed_the_demo_says_how_to_install_it() {
    let dir = temp_dir("demo-no-redis");
    // A PATH with no redis-server on it.
    let empty = dir.join("bin");
    std::fs::create_dir_all(&empty).unwrap();
    let url = format!("redis://127.0.0.1:{}", free_port());
    let (code, stdout, stderr) = demo(&url, &dir, Some(&empty)).await;
    assert_eq!(code, 2, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "no Redis at {url}, and redis-server is not installed"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("apt-get install redis-server"), "{stderr}");
    assert!(stderr.contains("brew install redis"), "{stderr}");
    assert!(!dir.join("redis/appendonlydir").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
