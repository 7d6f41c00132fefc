//! The producer commands, run as the built `klingq` binary against the shared Redis, each test
//! in its own namespace: enqueue, batch files (JSON Lines and CSV, good and bad), `--wait`,
//! status, cancel, dead letters, events, tenants, `--json` output and exit codes.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use klingq_core::CostModel;
use klingq_producer::Producer;
use klingq_queue::QueueConfig;
use klingq_testkit::redis::{redis_url, require_shared_redis, unique_namespace};
use serde_json::{Value, json};

struct Cli {
    namespace: String,
    dir: PathBuf,
}

impl Cli {
    async fn new(prefix: &str) -> Self {
        require_shared_redis().await.unwrap();
        let namespace = unique_namespace(prefix);
        let dir = std::env::temp_dir().join(format!("klingq-cli-{namespace}"));
        std::fs::create_dir_all(&dir).unwrap();
        Self { namespace, dir }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_klingq"));
        command
            .args(args)
            .env("KLINGQ_REDIS_URL", redis_url())
            .env("KLINGQ_NAMESPACE", &self.namespace)
            .env("RUST_LOG", "warn")
            .env_remove("KLINGQ_CONFIG")
            .stdin(Stdio::null());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "klingq {args:?} failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let stdout = self.ok(args);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    }

    fn file(&self, name: &str, text: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    async fn producer(&self) -> Producer {
        let config = QueueConfig {
            redis_url: redis_url(),
            namespace: self.namespace.clone(),
            ..QueueConfig::default()
        };
        Producer::connect(config, CostModel::default())
            .await
            .unwrap()
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// No Rust debug dump reaches the user.
fn assert_no_debug_dump(text: &str) {
    for marker in ["panicked", "Error {", "Os {", "kind:", "backtrace"] {
        assert!(!text.contains(marker), "debug output ({marker}) in: {text}");
    }
}

fn job_line(n: usize) -> String {
    json!({"start_image_url": format!("https://example.com/{n}.png"), "prompt": format!("prompt {n}"), "metadata": {"n": n}}).to_string()
}

const JOB_KEYS: [&str; 10] = [
    "id",
    "state",
    "batch_id",
    "attempts",
    "created_at",
    "updated_at",
    "metadata",
    "provider",
    "video",
    "error",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_prints_the_id_and_status_and_cancel_show_the_job() {
    let cli = Cli::new("cli-enqueue").await;
    let id = cli.ok(&[
        "enqueue",
        "--image",
        "https://example.com/cat.png",
        "--prompt",
        "a cat walks",
        "--duration",
        "10",
        "--no-audio",
        "--metadata",
        r#"{"user": 7}"#,
        "--webhook",
        "https://hooks.example.com/x",
    ]);
    let id = id.trim().to_owned();
    assert_eq!(id.len(), 36, "{id}");

    let job = cli.json(&["status", &id, "--json"]);
    for key in JOB_KEYS {
        assert!(job.get(key).is_some(), "{key} missing in {job}");
    }
    assert_eq!(job["id"], json!(id));
    assert_eq!(job["state"], "queued");
    assert_eq!(job["metadata"], json!({"user": 7}));
    assert_eq!(job["request"]["duration"], "10");
    assert_eq!(job["request"]["generate_audio"], false);
    assert_eq!(job["estimated_usd"], 1.4);
    assert_eq!(job["provider"], Value::Null);
    let human = cli.ok(&["status", &id]);
    assert!(
        human.contains("state") && human.contains("queued"),
        "{human}"
    );
    // Without a caller's trace the job has one of its own; TRACEPARENT passes the caller's on.
    let own_trace = job["trace_id"].as_str().unwrap();
    assert!(
        human.contains(&format!("trace         {own_trace}")),
        "{human}"
    );
    let traced = cli
        .command(&[
            "enqueue",
            "--image",
            "https://e.com/t.png",
            "--prompt",
            "traced",
        ])
        .env(
            "TRACEPARENT",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .output()
        .unwrap();
    assert!(traced.status.success(), "{}", stderr(&traced));
    let traced_id = String::from_utf8(traced.stdout).unwrap().trim().to_owned();
    let traced = cli.json(&["status", &traced_id, "--json"]);
    assert_eq!(traced["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_ne!(own_trace, "0af7651916cd43dd8448eb211c80319c");

    // --json FILE takes a nested job; `-` reads a bare request from stdin.
    let file = cli.file(
        "job.json",
        r#"{"request": {"start_image_url": "https://e.com/a.png", "prompt": "p"}, "priority": "high", "idempotency_key": "k-1"}"#,
    );
    let accepted = cli.json(&["enqueue", "--json", &file]);
    assert_eq!(accepted["created"], true);
    let again = cli.json(&["enqueue", "--json", &file]);
    assert_eq!(again["created"], false);
    assert_eq!(again["id"], accepted["id"]);
    let mut child = cli
        .command(&["enqueue", "--json", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(br#"{"start_image_url": "https://e.com/b.png", "prompt": "q"}"#)
            .unwrap();
    }
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let from_stdin: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(from_stdin["estimated_usd"], 0.7);

    let cancelled = cli.json(&["cancel", &id, "--json"]);
    assert_eq!(cancelled["cancelled"], true);
    assert_eq!(cancelled["previous_state"], "queued");
    let again = cli.ok(&["cancel", &id]);
    assert!(again.contains("already cancelled"), "{again}");
    let job = cli.json(&["status", &id, "--json"]);
    assert_eq!(job["error"]["code"], "CANCELLED");

    let missing = cli.run(&["status", "01a20b46-0000-7000-8000-000000000000"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("no job with id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_exit_2_with_every_error() {
    let cli = Cli::new("cli-invalid").await;
    let output = cli.run(&[
        "enqueue",
        "--image",
        "ftp://x",
        "--prompt",
        "",
        "--duration",
        "20",
        "--cfg-scale",
        "2",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    for expected in [
        "--image",
        "--prompt",
        "--duration",
        "--cfg-scale",
        "[url]",
        "[range]",
    ] {
        assert!(text.contains(expected), "{expected} missing in {text}");
    }
    assert_no_debug_dump(&text);
    assert!(output.stdout.is_empty());

    let output = cli.run(&[
        "enqueue",
        "--image",
        "https://e.com/a.png",
        "--prompt",
        "p",
        "--metadata",
        "{oops",
        "--json",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let body: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(body["error"]["code"], "validation_failed");
    assert_eq!(body["error"]["details"][0]["path"], "metadata");

    let file = cli.file("bad.json", r#"{"request": {"prompt": ""}, "colour": 1}"#);
    let output = cli.run(&["enqueue", "--json", &file]);
    assert_eq!(output.status.code(), Some(2));
    let body: Value = serde_json::from_slice(&output.stdout).unwrap();
    let paths: Vec<_> = body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        paths,
        vec!["colour", "request.prompt", "request.start_image_url"]
    );
    let output = cli.run(&["enqueue", "--json", "/nonexistent/job.json"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        cli.producer()
            .await
            .queue()
            .job_ids(0, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_line_json_lines_batch_is_enqueued() {
    let cli = Cli::new("cli-jsonl").await;
    let text: String = (0..1000).map(|n| job_line(n) + "\n").collect();
    let file = cli.file("batch.jsonl", &text);
    let id = cli.ok(&["batch", "submit", &file]);
    let id = id.trim();
    let batch = cli.json(&["batch", "status", id, "--json"]);
    for key in [
        "id",
        "total",
        "counts",
        "done",
        "estimated_usd",
        "charged_usd",
    ] {
        assert!(batch.get(key).is_some(), "{key} missing in {batch}");
    }
    assert_eq!(batch["id"], json!(id));
    assert_eq!(batch["total"], 1000);
    assert_eq!(batch["counts"]["queued"], 1000);
    assert_eq!(batch["done"], false);
    assert_eq!(batch["estimated_usd"], 700.0);
    let human = cli.ok(&["batch", "status", id]);
    assert!(
        human.contains("queued") && human.contains("1000"),
        "{human}"
    );

    let accepted = cli.json(&["batch", "submit", &file, "--json", "--budget-usd", "800"]);
    assert_eq!(accepted["total"], 1000);
    assert_eq!(accepted["budget_usd"], 800.0);
    let producer = cli.producer().await;
    let page = producer.batch_jobs(id, 999, 10).await.unwrap();
    assert_eq!(page.items[0].metadata, Some(json!({"n": 999})));

    let cancelled = cli.json(&["batch", "cancel", id, "--json"]);
    assert_eq!(cancelled["cancelled"], 1000);
    let batch = cli.json(&["batch", "status", id, "--json"]);
    assert_eq!(batch["done"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_batch_is_enqueued() {
    let cli = Cli::new("cli-csv").await;
    let file = cli.file(
        "batch.csv",
        "start_image_url,prompt,duration,cfg_scale,generate_audio,metadata,priority,webhook_url\n\
         https://e.com/a.png,\"a cat, walking\",10,0.7,false,\"{\"\"user\"\": 1}\",high,https://hooks.example.com/a\n\
         https://e.com/b.png,a dog,,,,,,\n",
    );
    let accepted = cli.json(&["batch", "submit", &file, "--json"]);
    assert_eq!(accepted["total"], 2);
    assert_eq!(accepted["estimated_usd"], 2.1);
    let producer = cli.producer().await;
    let page = producer
        .batch_jobs(accepted["id"].as_str().unwrap(), 0, 10)
        .await
        .unwrap();
    let first = &page.items[0];
    assert_eq!(first.metadata, Some(json!({"user": 1})));
    assert_eq!(first.priority, klingq_core::Priority::High);
    let request = first.request.as_ref().unwrap();
    assert_eq!(request["prompt"], "a cat, walking");
    assert_eq!(request["cfg_scale"], 0.7);
    assert_eq!(request["generate_audio"], false);
    assert_eq!(page.items[1].request.as_ref().unwrap()["duration"], "5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_with_bad_lines_is_rejected_naming_lines_and_fields() {
    let cli = Cli::new("cli-bad").await;
    let text = format!(
        "{}\n{}\n{{oops\n\n{}\n",
        job_line(0),
        json!({"start_image_url": "https://e.com/a.png", "prompt": "", "duration": 30}),
        json!({"prompt": "p", "colour": "red"}),
    );
    let file = cli.file("bad.jsonl", &text);
    let output = cli.run(&["batch", "submit", &file]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    for expected in [
        "3 of 4 lines are invalid; nothing was enqueued",
        "line 2: duration:",
        "line 2: prompt: must not be empty [required]",
        "line 3: (line): is not valid JSON",
        "line 5: colour:",
        "line 5: start_image_url:",
    ] {
        assert!(text.contains(expected), "{expected:?} missing in {text}");
    }
    assert_no_debug_dump(&text);
    let producer = cli.producer().await;
    assert!(producer.queue().batch_ids(0, 10).await.unwrap().is_empty());
    assert!(producer.queue().job_ids(0, 10).await.unwrap().is_empty());

    let output = cli.run(&["batch", "submit", &file, "--json"]);
    assert_eq!(output.status.code(), Some(2));
    let body: Value = serde_json::from_slice(&output.stdout).unwrap();
    let lines: Vec<_> = body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, vec![2, 2, 3, 5, 5]);

    // With --partial the good line goes in, and the rest are reported.
    let output = cli.run(&["batch", "submit", &file, "--partial"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("skipped 3 invalid lines (enqueued 1)"));

    let csv = cli.file(
        "bad.csv",
        "start_image_url,prompt,colour\nhttps://e.com/a.png,p,red\n",
    );
    let output = cli.run(&["batch", "submit", &csv]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("line 1: column 3 `colour`"),
        "{}",
        stderr(&output)
    );
    let csv = cli.file(
        "bad-row.csv",
        "start_image_url,prompt,cfg_scale\nhttps://e.com/a.png,p,0.5\nhttps://e.com/b.png,,9\n",
    );
    let output = cli.run(&["batch", "submit", &csv]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(text.contains("1 of 2 lines is invalid"), "{text}");
    assert!(text.contains("line 3: prompt:"), "{text}");
    assert!(text.contains("line 3: cfg_scale:"), "{text}");
    let output = cli.run(&["batch", "submit", &csv, "--budget-usd=-3"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("budget_usd"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_files_exit_2_naming_the_line_and_byte_offset() {
    let cli = Cli::new("cli-binary").await;
    let mut bytes = format!("{}\n{}\n", job_line(0), job_line(1)).into_bytes();
    let offset = bytes.len() + 4;
    bytes.extend_from_slice(b"{\"pr\xff\xfeompt\": 1}\n");
    let path = cli.dir.join("binary.jsonl");
    std::fs::write(&path, &bytes).unwrap();
    let path = path.display().to_string();
    for args in [
        vec!["batch", "submit", path.as_str()],
        vec!["enqueue", "--json", path.as_str()],
    ] {
        let output = cli.run(&args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        let text = stderr(&output);
        assert!(
            text.contains(&format!("line 3: not valid UTF-8 at byte offset {offset}")),
            "{args:?}: {text}"
        );
        assert_no_debug_dump(&text);
    }
    let output = cli.run(&["batch", "submit", &path, "--json"]);
    assert_eq!(output.status.code(), Some(2));
    let body: Value = serde_json::from_slice(&output.stdout).unwrap();
    let detail = &body["error"]["details"][0];
    assert_eq!(
        (detail["line"].clone(), detail["rule"].clone()),
        (json!(3), json!("utf8"))
    );
    // A PNG is not text from its first bytes.
    let png = cli.dir.join("image.png");
    std::fs::write(&png, b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").unwrap();
    let output = cli.run(&[
        "batch",
        "submit",
        &png.display().to_string(),
        "--format",
        "csv",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("line 1: not valid UTF-8 at byte offset 0"),
        "{}",
        stderr(&output)
    );
    let producer = cli.producer().await;
    assert!(producer.queue().job_ids(0, 10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_bad_files_get_short_errors_naming_the_limit() {
    let cli = Cli::new("cli-huge").await;
    // Over the 200,000-job limit: refused for its size alone.
    let over = cli.file("over.jsonl", &"{}\n".repeat(250_000));
    let output = cli.run(&["batch", "submit", &over, "--json"]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(
        text.contains("a batch may have at most 200000 jobs, got 250000 [max_items]"),
        "{text}"
    );
    assert!(text.len() < 1024, "{text}");
    let body: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(body["error"]["details"].as_array().unwrap().len(), 1);
    assert!(output.stdout.len() < 1024);

    // Within it, every line invalid: 200 errors on stderr, the first 1,000 with --json.
    let within = cli.file("within.jsonl", &"{}\n".repeat(150_000));
    let output = cli.run(&["batch", "submit", &within]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(
        text.contains("150000 of 150000 lines are invalid"),
        "{text:.300}"
    );
    assert!(
        text.contains("... and 299800 more errors, 300000 in all (--json lists the first 1000)"),
        "{text:.300}"
    );
    assert!(text.lines().count() < 210);
    let output = cli.run(&["batch", "submit", &within, "--json"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        output.stdout.len() < 256 * 1024,
        "{} bytes",
        output.stdout.len()
    );
    let body: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(body["error"]["details"].as_array().unwrap().len(), 1000);
    assert_eq!(body["error"]["truncated"], true);
    assert_eq!(body["error"]["total_details"], 300_000);
    let producer = cli.producer().await;
    assert!(producer.queue().job_ids(0, 10).await.unwrap().is_empty());
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the command did not end"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_shows_progress_until_the_batch_is_done() {
    let cli = Cli::new("cli-wait").await;
    let text: String = (0..20).map(|n| job_line(n) + "\n").collect();
    let file = cli.file("batch.jsonl", &text);
    let mut child = cli
        .command(&["batch", "submit", &file, "--wait", "--interval", "0.1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut id = String::new();
    stdout.read_line(&mut id).unwrap();
    let id = id.trim().to_owned();
    assert_eq!(id.len(), 36, "{id}");
    // Finishing every job (here by cancelling the batch) ends the wait.
    let cancelled = cli.json(&["batch", "cancel", &id, "--json"]);
    assert_eq!(cancelled["cancelled"], 20);
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(status.success());
    let mut summary = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut summary).unwrap();
    assert!(summary.contains("(done)"), "{summary}");
    assert!(
        summary.contains("cancelled") && summary.contains("20"),
        "{summary}"
    );
    let mut progress = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut progress).unwrap();
    // Not a terminal: plain lines, the last one with every job finished.
    assert!(progress.contains("in flight"), "{progress}");
    assert!(
        progress.lines().last().unwrap().starts_with("20/20"),
        "{progress}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_and_events_from_the_command_line() {
    let cli = Cli::new("cli-events").await;
    let page = cli.json(&["dlq", "list", "--json"]);
    assert_eq!(page["total"], 0);
    assert!(cli.ok(&["dlq", "list"]).contains("no dead jobs"));
    let result = cli.json(&["dlq", "redrive", "--all", "--json"]);
    assert_eq!(result["redriven"], 0);
    let missing = "01a20b46-0000-7000-8000-000000000000";
    let result = cli.json(&["dlq", "redrive", missing, "--json"]);
    assert_eq!(result["not_found"], json!([missing]));
    let output = cli.run(&["dlq", "redrive"]);
    assert_eq!(output.status.code(), Some(2));

    let mut ids = Vec::new();
    for n in 0..3 {
        let id = cli.ok(&[
            "enqueue",
            "--image",
            "https://e.com/a.png",
            "--prompt",
            &format!("p{n}"),
        ]);
        cli.ok(&["cancel", id.trim()]);
        ids.push(id.trim().to_owned());
    }
    let out = cli.ok(&["events", "tail", "--json"]);
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3);
    for (event, id) in events.iter().zip(&ids) {
        assert_eq!(event["type"], "job.cancelled");
        assert_eq!(event["event"]["data"]["job_id"], json!(id));
    }
    let two = cli.ok(&["events", "tail", "-n", "2"]);
    assert_eq!(two.lines().count(), 2);
    assert!(two.contains(&ids[2]) && !two.contains(&ids[0]), "{two}");
    let after = cli.ok(&[
        "events",
        "tail",
        "--from",
        events[0]["cursor"].as_str().unwrap(),
        "--json",
    ]);
    assert_eq!(after.lines().count(), 2);

    // --follow prints new events as they come.
    let mut child = cli
        .command(&["events", "tail", "--follow", "-n", "1", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"]["data"]["job_id"], json!(ids[2]));
    let late = cli.ok(&[
        "enqueue",
        "--image",
        "https://e.com/a.png",
        "--prompt",
        "late",
    ]);
    cli.ok(&["cancel", late.trim()]);
    let next = tokio::task::spawn_blocking(move || lines.next().unwrap().unwrap())
        .await
        .unwrap();
    let next: Value = serde_json::from_str(&next).unwrap();
    assert_eq!(next["event"]["data"]["job_id"], json!(late.trim()));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_names_the_url_and_how_to_start_it() {
    let cli = Cli::new("cli-down").await;
    let output = cli
        .command(&["status", "01a20b46-0000-7000-8000-000000000000"])
        .env("KLINGQ_REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(
        text.starts_with("error: cannot reach Redis at redis://127.0.0.1:1/0"),
        "{text}"
    );
    assert!(text.contains("redis-server"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    // The node is named once, with what went wrong.
    assert_eq!(text.matches("127.0.0.1:1").count(), 1, "{text}");
    assert!(text.contains("(connection refused or lost)"), "{text}");
    assert_no_debug_dump(&text);
    // A bad file is still exit code 2: input is checked before connecting.
    let file = cli.file("bad.jsonl", "{oops\n");
    let output = cli
        .command(&["batch", "submit", &file])
        .env("KLINGQ_REDIS_URL", "redis://127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

/// One HTTP/1.1 GET over a plain socket; returns the status line.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_and_stops_on_sigterm() {
    let cli = Cli::new("cli-serve").await;
    // Without tokens it will not listen beyond loopback.
    let output = cli.run(&["serve", "--bind", "0.0.0.0:0"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("KLINGQ_API_TOKENS"),
        "{}",
        stderr(&output)
    );

    let mut child = cli
        .command(&["serve", "--bind", "127.0.0.1:0", "--log-format", "json"])
        .env("KLINGQ_API_TOKENS", "t1,t2")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut logs = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = logs.next().expect("serve logs where it listens").unwrap();
        let Ok(entry) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if entry["message"] == "api listening" {
            break entry["addr"].as_str().unwrap().to_owned();
        }
    };
    assert!(http_get(&addr, "/healthz").contains("200"));
    assert!(http_get(&addr, "/v1/dead-letters").contains("401"));
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = wait_exit(&mut child, Duration::from_secs(15));
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_show_says_which_redis_mode_and_nodes_were_found() {
    let cli = Cli::new("cli-topology").await;
    let text = cli.ok(&["config", "show"]);
    let line = text
        .lines()
        .find(|line| line.starts_with("# redis: "))
        .unwrap_or_else(|| panic!("no topology line in:\n{text}"));
    let port = redis_url().rsplit(':').next().unwrap().to_owned();
    assert!(
        line.starts_with("# redis: standalone, primaries [127.0.0.1:")
            && line.contains(port.trim_end_matches('/')),
        "{line}"
    );
    // A mode the URL contradicts is named with the field and the rule, password hidden.
    let output = cli
        .command(&["config", "show"])
        .env("KLINGQ_REDIS_URL", "redis://:hunter2@127.0.0.1:1")
        .env("KLINGQ_REDIS_MODE", "sentinel")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("# redis: not reachable: queue.redis_url: must be redis+sentinel://"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}

/// The `# redis:` line of `klingq config show` against `url`, with only the CA file `ca`
/// trusted (rustls reads SSL_CERT_FILE).
fn redis_line_trusting(cli: &Cli, url: &str, ca: &std::path::Path) -> String {
    let output = cli
        .command(&["config", "show"])
        .env("KLINGQ_REDIS_URL", url)
        .env("SSL_CERT_FILE", ca)
        .env_remove("SSL_CERT_DIR")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().find(|l| l.starts_with("# redis: ")).unwrap();
    line.to_owned()
}

/// With only an empty trust store, `url`'s certificate is refused, and the line says so.
fn refused_without_trust(cli: &Cli, url: &str) {
    let empty = cli.file("empty-ca.pem", "");
    let line = redis_line_trusting(cli, url, std::path::Path::new(&empty));
    assert!(line.starts_with("# redis: not reachable: "), "{line}");
    assert!(line.contains("TLS"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_verifies_the_server_certificate() {
    let cli = Cli::new("cli-tls").await;
    let server = klingq_testkit::redis::RedisServer::start_tls()
        .await
        .unwrap();
    let url = server.verified_url().unwrap();
    // Trusting the test CA: connected, over TLS.
    let line = redis_line_trusting(&cli, &url, server.tls_files().unwrap().ca_file().as_ref());
    assert!(
        line.starts_with("# redis: standalone") && line.ends_with(", TLS"),
        "{line}"
    );
    refused_without_trust(&cli, &url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_sentinel_verifies_the_certificates_of_sentinels_and_primary() {
    let cli = Cli::new("cli-tls-sentinel").await;
    let sentinel = klingq_testkit::sentinel::RedisSentinel::start_tls()
        .await
        .unwrap();
    let url = sentinel.verified_url().unwrap();
    assert!(
        url.starts_with("rediss+sentinel://") && !url.contains('#'),
        "{url}"
    );
    // Trusting the test CA: the sentinels name the primary and the CLI connects to it, both
    // over verified TLS (every port of the setup speaks TLS only).
    let line = redis_line_trusting(&cli, &url, sentinel.tls_files().unwrap().ca_file().as_ref());
    let primary = sentinel.primary_port().await.unwrap();
    assert_eq!(
        line,
        format!("# redis: sentinel (service mymaster), primaries [127.0.0.1:{primary}], TLS")
    );
    refused_without_trust(&cli, &url);
}

/// `klingq tenants` lists each tenant's policy (from the settings file), its jobs per state
/// and its spend, as a table and as `GET /v1/tenants`' JSON; `--tenant` puts a job and a batch
/// in a tenant, whose priority cap holds.
#[tokio::test]
async fn tenants_lists_policies_jobs_and_spend() {
    let cli = Cli::new("cli-tenants").await;
    let config = cli.file(
        "tenants.toml",
        "[tenants.acme]\nweight = 3.0\nmax_concurrency = 2\ndaily_budget_usd = 50.0\n\
         priority_cap = \"normal\"\n",
    );
    let run = |args: &[&str]| {
        let mut all = vec!["--config", config.as_str()];
        all.extend_from_slice(args);
        cli.ok(&all)
    };
    let before = run(&["tenants"]);
    assert!(
        before.contains("acme"),
        "a configured tenant is listed: {before}"
    );
    let id = run(&[
        "enqueue",
        "--tenant",
        "acme",
        "--priority",
        "high",
        "--image",
        "https://example.com/a.png",
        "--prompt",
        "a fox runs",
    ]);
    let job = cli.json(&["status", id.trim(), "--json"]);
    assert_eq!(job["tenant"], "acme");
    assert_eq!(job["priority"], "normal", "acme's priority cap: {job}");
    let file = cli.file(
        "globex.jsonl",
        &format!("{}\n{}\n", job_line(1), job_line(2)),
    );
    let accepted = run(&["batch", "submit", &file, "--tenant", "globex", "--json"]);
    let accepted: Value = serde_json::from_str(accepted.trim()).unwrap();
    assert_eq!(accepted["total"], 2, "{accepted}");

    let listed: Value = serde_json::from_str(run(&["tenants", "--json"]).trim()).unwrap();
    let tenants = listed["tenants"].as_array().unwrap();
    let find = |name: &str| {
        tenants
            .iter()
            .find(|t| t["tenant"] == name)
            .unwrap_or_else(|| panic!("{name} missing in {listed}"))
            .clone()
    };
    let acme = find("acme");
    assert_eq!(acme["source"], "file");
    assert_eq!(acme["policy"]["weight"], 3.0);
    assert_eq!(acme["policy"]["max_concurrency"], 2);
    assert_eq!(acme["policy"]["daily_budget_usd"], 50.0);
    assert_eq!(acme["counts"]["enqueued"], 1);
    assert_eq!(acme["in_flight"], 0);
    let globex = find("globex");
    assert_eq!(globex["policy"]["weight"], 1.0);
    assert_eq!(globex["counts"]["enqueued"], 2);
    assert_eq!(globex["spend_today"]["charged_usd"], 0.0);

    let table = run(&["tenants"]);
    let row = |name: &str| {
        table
            .lines()
            .find(|line| line.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} row: {table}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert!(table.starts_with("tenant"), "{table}");
    assert_eq!(row("acme")[1..3], ["3".to_owned(), "2".to_owned()]);
    assert_eq!(row("globex")[1..3], ["1".to_owned(), "-".to_owned()]);
}
