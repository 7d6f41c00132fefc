//! The operator routes over real HTTP: statistics, the searchable job list, batch pages,
//! webhook deliveries (list, read, replay) and endpoint health (list, enable), and the
//! dashboard's static files.

use std::time::Duration;

use axum::Router;
use axum::http::StatusCode as AxumStatus;
use axum::routing::post;
use klingq_events::{WebhookConfig, WebhookSecret};
use klingq_testkit::wait_for;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::TestWorker;
use crate::api::Server;

const UNKNOWN_ID: &str = "01a20b46-0000-7000-8000-000000000000";

fn job(n: usize, customer: &str) -> Value {
    json!({
        "start_image_url": format!("https://example.com/{n}.png"),
        "prompt": format!("prompt {n}"),
        "metadata": {"n": n, "customer": customer},
    })
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_job_search_and_batch_pages() {
    let server = Server::start("api-ops").await;
    let (status, batch) = server
        .post_json(
            "/v1/batches",
            &json!([
                job(1, "Acme Corp"),
                job(2, "Acme Corp"),
                job(3, "Acme Corp")
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{batch}");
    let batch_id = batch["id"].as_str().unwrap().to_owned();
    let (status, single) = server.post_json("/v1/jobs", &job(4, "Globex")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{single}");
    let single_id = single["id"].as_str().unwrap().to_owned();

    // Statistics before any worker: everything waits.
    let (status, stats) = server.get_json("/v1/stats").await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert_eq!(stats["videos"]["queue"], "videos");
    assert_eq!(stats["videos"]["waiting"], 4);
    assert_eq!(stats["videos"]["in_flight"], 0);
    assert_eq!(stats["webhooks"]["queue"], "webhooks");
    assert_eq!(stats["finished"]["succeeded"], 0);
    assert_eq!(stats["finished"]["dead"], 0);
    assert_eq!(stats["provider"]["name"], "provider");
    assert_eq!(stats["provider"]["in_use"], 0);
    assert_eq!(stats["provider"]["max"], 10);
    assert_eq!(stats["spend"]["daily_budget_usd"], Value::Null);
    assert!(stats["at_ms"].as_u64().unwrap() > 0);

    // The job list: newest first, with step timings, filtered and paged.
    let (status, page) = server.get_json("/v1/jobs").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let all = ids(&page);
    assert_eq!(all.len(), 4);
    assert_eq!(all[0], single_id);
    assert!(page["items"][0]["step_ms"].is_object());
    assert_eq!(page["items"][0]["state"], "queued");
    assert_eq!(page["next_offset"], Value::Null);
    let (_, page) = server.get_json("/v1/jobs?q=globex").await;
    assert_eq!(ids(&page), vec![single_id.clone()]);
    let (_, page) = server.get_json("/v1/jobs?q=ACME%20corp").await;
    assert_eq!(ids(&page).len(), 3);
    // UUIDv7 ids made in the same millisecond share their first ~23 characters (time and
    // counter): only a longer prefix names one job.
    let prefix = &single_id[..32];
    let (_, page) = server.get_json(&format!("/v1/jobs?q={prefix}")).await;
    assert_eq!(ids(&page), vec![single_id.clone()]);
    let (_, page) = server
        .get_json(&format!("/v1/jobs?batch_id={batch_id}"))
        .await;
    assert_eq!(ids(&page).len(), 3);
    assert!(!ids(&page).contains(&single_id));
    let (_, page) = server.get_json("/v1/jobs?state=queued&limit=2").await;
    assert_eq!(ids(&page), all[..2].to_vec());
    assert_eq!(page["next_offset"], 2);
    let (_, page) = server.get_json("/v1/jobs?state=queued&offset=2").await;
    assert_eq!(ids(&page), all[2..].to_vec());
    assert_eq!(page["next_offset"], Value::Null);
    let (_, page) = server.get_json("/v1/jobs?state=succeeded").await;
    assert!(ids(&page).is_empty());
    for (query, status) in [
        ("state=bogus", StatusCode::UNPROCESSABLE_ENTITY),
        ("batch_id=nope", StatusCode::UNPROCESSABLE_ENTITY),
        ("limit=0", StatusCode::UNPROCESSABLE_ENTITY),
        ("limit=501", StatusCode::UNPROCESSABLE_ENTITY),
        ("offset=-1", StatusCode::UNPROCESSABLE_ENTITY),
        ("other=1", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let (got, body) = server.get_json(&format!("/v1/jobs?{query}")).await;
        assert_eq!(got, status, "{query}: {body}");
    }
    let (status, _) = server
        .get_json(&format!("/v1/jobs?batch_id={UNKNOWN_ID}"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A worker finishes them; the counters and the batch follow.
    let worker = TestWorker::spawn(server.producer.queue());
    wait_for("the jobs to finish", Duration::from_secs(15), || async {
        let (_, stats) = server.get_json("/v1/stats").await;
        (stats["finished"]["succeeded"] == 4).then_some(())
    })
    .await
    .unwrap();
    worker.stop().await;
    let (_, stats) = server.get_json("/v1/stats").await;
    assert_eq!(stats["videos"]["waiting"], 0);
    let (_, page) = server.get_json("/v1/jobs?state=succeeded").await;
    assert_eq!(ids(&page).len(), 4);
    assert!(page["items"][0]["finished_at"].is_string());

    let (status, page) = server.get_json("/v1/batches").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(ids(&page), vec![batch_id.clone()]);
    assert_eq!(page["items"][0]["done"], true);
    assert_eq!(page["items"][0]["terminal"], 3);
    assert_eq!(page["next_offset"], Value::Null);
    let (status, second) = server.post_json("/v1/batches", &json!([job(5, "x")])).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (_, page) = server.get_json("/v1/batches?limit=1").await;
    assert_eq!(ids(&page), vec![second["id"].as_str().unwrap().to_owned()]);
    assert_eq!(page["next_offset"], 1);
    let (_, page) = server.get_json("/v1/batches?offset=1&limit=1").await;
    assert_eq!(ids(&page), vec![batch_id]);
    for query in ["limit=0", "limit=201", "offset=2000000000", "x=1"] {
        let (status, _) = server.get_json(&format!("/v1/batches?{query}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_served_without_a_token() {
    let server = Server::start("api-dashboard").await;
    for (path, kind, needle) in [
        ("/", "text/html", "/dashboard/app.js"),
        ("/", "text/html", "id=\"tenants\""),
        ("/dashboard/app.js", "text/javascript", "/v1/events"),
        ("/dashboard/app.js", "text/javascript", "/v1/tenants"),
        ("/dashboard/style.css", "text/css", ".progress"),
    ] {
        let response = server.client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        // Scripts, styles and data from this origin only; the video (served by the S3
        // endpoint) and the request's images may come from other origins.
        let policy = response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        for directive in [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "media-src 'self' http: https:",
            "img-src 'self' data: http: https:",
            "frame-ancestors 'none'",
        ] {
            assert!(
                policy.split(';').any(|d| d.trim() == directive),
                "{path}: {policy} lacks {directive}"
            );
        }
        assert!(response.text().await.unwrap().contains(needle), "{path}");
    }
    // The data behind it is not public.
    let response = server
        .client
        .get(server.url("/v1/stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    server.stop().await;
}

/// A webhook receiver: `/ok` accepts, `/gone` answers 410, `/fail` answers 500.
async fn receiver() -> (String, oneshot::Sender<()>) {
    let app = Router::new()
        .route("/ok", post(|| async { AxumStatus::NO_CONTENT }))
        .route("/gone", post(|| async { AxumStatus::GONE }))
        .route(
            "/fail",
            post(|| async { AxumStatus::INTERNAL_SERVER_ERROR }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (base, stop)
}

/// The deliveries of a page, as `(id, endpoint path, status)`.
fn deliveries(page: &Value) -> Vec<(String, String, String)> {
    page["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let endpoint = d["endpoint"].as_str().unwrap();
            (
                d["id"].as_str().unwrap().to_owned(),
                endpoint.rsplit('/').next().unwrap().to_owned(),
                d["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn find<'a>(list: &'a [(String, String, String)], path: &str) -> &'a (String, String, String) {
    list.iter().find(|d| d.1 == path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_deliveries_replays_and_endpoint_health() {
    let server = Server::start("api-webhooks").await;
    let (receiver_base, stop_receiver) = receiver().await;
    let config = WebhookConfig {
        secret: WebhookSecret::generate().to_whsec(),
        allow_cidrs: vec!["127.0.0.1/32".into()],
        retry_schedule: vec!["1s".into()],
        timeout_secs: 5,
        concurrency: 8,
        ..WebhookConfig::default()
    };
    let (stop_webhooks, webhooks_stopped) = oneshot::channel::<()>();
    let webhooks = tokio::spawn(klingq_events::run_webhooks(
        server.producer.queue().clone(),
        config,
        async move {
            let _ = webhooks_stopped.await;
        },
    ));
    let worker = TestWorker::spawn(server.producer.queue());
    for (n, path) in ["ok", "gone", "fail"].iter().enumerate() {
        let mut body = job(n, "hooks");
        body["webhook_url"] = json!(format!("{receiver_base}/{path}"));
        let (status, _) = server.post_json("/v1/jobs", &body).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let list = wait_for("deliveries to end", Duration::from_secs(30), || async {
        let (_, page) = server.get_json("/v1/webhooks/deliveries").await;
        let list = deliveries(&page);
        let ended = |path: &str, status: &str| list.iter().any(|d| d.1 == path && d.2 == status);
        (ended("ok", "succeeded") && ended("gone", "failed") && ended("fail", "exhausted"))
            .then_some(list)
    })
    .await
    .unwrap();
    worker.stop().await;
    let ok = find(&list, "ok").0.clone();
    let exhausted = find(&list, "fail").0.clone();

    // Filters and paging.
    let (status, page) = server
        .get_json("/v1/webhooks/deliveries?status=succeeded")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(deliveries(&page).len(), 1);
    let (_, page) = server
        .get_json("/v1/webhooks/deliveries?status=exhausted")
        .await;
    assert_eq!(deliveries(&page)[0].0, exhausted);
    let (_, page) = server.get_json("/v1/webhooks/deliveries?limit=1").await;
    assert_eq!(deliveries(&page).len(), 1);
    assert_eq!(page["next_offset"], 1);
    for query in ["status=bogus", "limit=0", "limit=501", "offset=-1", "x=1"] {
        let (status, _) = server
            .get_json(&format!("/v1/webhooks/deliveries?{query}"))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}");
    }

    // One delivery with its attempts.
    let (status, detail) = server
        .get_json(&format!("/v1/webhooks/deliveries/{exhausted}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_eq!(detail["status"], "exhausted");
    assert_eq!(detail["attempts_log"].as_array().unwrap().len(), 2);
    assert_eq!(detail["attempts_log"][0]["status_code"], 500);
    for id in [UNKNOWN_ID, "nope"] {
        let (status, _) = server
            .get_json(&format!("/v1/webhooks/deliveries/{id}"))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{id}");
    }

    // Replays: a succeeded delivery is copied, an exhausted one re-driven; a delivery not yet
    // finished is a conflict.
    let (status, outcome) = server
        .post_json(&format!("/v1/webhooks/deliveries/{ok}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{outcome}");
    assert_eq!(outcome["mode"], "copied");
    assert_eq!(outcome["replay_of"], json!(ok));
    assert_ne!(outcome["delivery_id"], json!(ok));
    let (status, outcome) = server
        .post_json(
            &format!("/v1/webhooks/deliveries/{exhausted}/replay"),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{outcome}");
    assert_eq!(outcome["mode"], "redriven");
    let (status, body) = server
        .post_json(
            &format!("/v1/webhooks/deliveries/{exhausted}/replay"),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "conflict");
    let (status, _) = server
        .post_json(
            &format!("/v1/webhooks/deliveries/{UNKNOWN_ID}/replay"),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Endpoint health: counts per endpoint, the one that answered 410 disabled until enabled.
    let (status, list) = server.get_json("/v1/webhooks/endpoints").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let endpoints = list["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 3, "{list}");
    let by_path = |path: &str| {
        endpoints
            .iter()
            .find(|e| e["endpoint"].as_str().unwrap().ends_with(path))
            .unwrap()
            .clone()
    };
    let ok_endpoint = by_path("/ok");
    assert!(ok_endpoint["counts"]["succeeded"].as_u64().unwrap() >= 1);
    assert_eq!(ok_endpoint["disabled"], false);
    let gone = by_path("/gone");
    assert_eq!(gone["disabled"], true, "{gone}");
    assert!(gone["disabled_reason"].is_string());
    let gone_id = gone["endpoint_id"].as_str().unwrap().to_owned();
    let (status, enabled) = server
        .post_json(
            &format!("/v1/webhooks/endpoints/{gone_id}/enable"),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{enabled}");
    assert_eq!(enabled["was_disabled"], true);
    let (_, enabled) = server
        .post_json(
            &format!("/v1/webhooks/endpoints/{gone_id}/enable"),
            &json!({}),
        )
        .await;
    assert_eq!(enabled["was_disabled"], false);
    let (_, list) = server.get_json("/v1/webhooks/endpoints").await;
    let gone = list["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["endpoint_id"] == json!(gone_id))
        .unwrap()
        .clone();
    assert_eq!(gone["disabled"], false);
    let (status, _) = server
        .post_json("/v1/webhooks/endpoints/not-an-id/enable", &json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let _ = stop_webhooks.send(());
    webhooks.await.unwrap().unwrap();
    let _ = stop_receiver.send(());
    server.stop().await;
}
