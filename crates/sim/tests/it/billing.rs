//! The billing ledger: one charge per succeeded run, none for failures, balance and 402.

use std::collections::HashSet;

use klingq_sim::SimConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{eventually, fast, harness, input};

#[tokio::test]
async fn each_succeeded_run_is_charged_exactly_once_under_concurrent_reads() {
    let h = fast().await;
    let mut ids = Vec::new();
    for index in 0..5 {
        let body = json!({"input": input(&format!("clip {index}")), "metadata": {"job_id": format!("job-{index}")}});
        ids.push(h.create_body(body).await["id"].as_str().unwrap().to_owned());
    }
    let h = std::sync::Arc::new(h);
    let mut readers = Vec::new();
    for reader in 0..16 {
        let h = std::sync::Arc::clone(&h);
        let ids = ids.clone();
        readers.push(tokio::spawn(async move {
            for id in &ids {
                if reader % 2 == 0 {
                    h.wait_terminal(id).await;
                } else {
                    h.admin("/__sim/charges").await;
                    h.get("/v1/billing/balance").send().await.unwrap();
                }
            }
        }));
    }
    for reader in readers {
        reader.await.unwrap();
    }
    let charges = h.sim.charges();
    assert_eq!(charges.len(), 5);
    let charged: HashSet<_> = charges
        .iter()
        .map(|charge| charge.run_id.to_string())
        .collect();
    assert_eq!(charged, ids.iter().cloned().collect());
    for charge in &charges {
        assert_eq!(charge.usd_micros, 700_000);
        assert!((charge.usd - 0.70).abs() < 1e-9);
        assert_eq!(charge.duration_secs, 5);
        assert!(charge.job_id.as_deref().unwrap().starts_with("job-"));
    }
    assert_eq!(h.sim.stats().charges, 5);
    let over_http = h.admin("/__sim/charges").await;
    assert_eq!(over_http.as_array().unwrap().len(), 5);
    assert!(over_http[0]["run_id"].is_string());
    assert!(over_http[0]["usd"].is_number());
    assert!(over_http[0].get("client_ref").is_some());
    assert!(over_http[0]["charged_at"].is_string());
}

#[tokio::test]
async fn charges_appear_even_if_nobody_polls() {
    let h = fast().await;
    let id = h
        .create_body(json!({"input": input("unwatched"), "client_ref": "c:1"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let charges = eventually("a charge", || async {
        Some(h.sim.charges()).filter(|c| !c.is_empty())
    })
    .await;
    assert_eq!(charges[0].run_id.to_string(), id);
    assert_eq!(charges[0].client_ref.as_deref(), Some("c:1"));
    assert_eq!(h.sim.stats().polls, 0);
    // The charge time is the computed success time, not the time of the read.
    let record = h.record(&id).unwrap();
    assert_eq!(Some(charges[0].charged_at), record.completed_at);
    assert!(record.charged);
}

#[tokio::test]
async fn failed_runs_are_never_charged() {
    let h = fast().await;
    for token in ["moderation", "output-moderation", "provider-timeout"] {
        let run = h
            .wait_terminal(&h.create(input(&format!("[[sim:{token}]]"))).await)
            .await;
        assert_eq!(run["status_code"], "failed");
    }
    assert!(h.sim.charges().is_empty());
    assert!(h.sim.runs().iter().all(|run| !run.charged));
    let balance: Value = h
        .get("/v1/billing/balance")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(balance["balance_cents"], 100_000);
}

#[tokio::test]
async fn price_follows_duration_and_the_configured_rate() {
    let h = harness(SimConfig {
        rate_usd_per_second: 0.112,
        ..SimConfig::fast()
    })
    .await;
    let id = h
        .create(json!({"prompt": "p", "start_image_url": "https://e.com/a.png", "duration": "3"}))
        .await;
    let run = h.wait_terminal(&id).await;
    assert_eq!(run["cost"], "0.336");
    assert_eq!(h.sim.charges()[0].usd_micros, 336_000);
}

#[tokio::test]
async fn insufficient_balance_gets_402_and_charges_reduce_the_balance() {
    let h = harness(SimConfig {
        balance_usd: 1.0,
        ..SimConfig::fast()
    })
    .await;
    let ten = json!({"input": {"prompt": "p", "start_image_url": "https://e.com/a.png", "duration": "10"}});
    let response = h.post_create(&ten).await;
    assert_eq!(response.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "INSUFFICIENT_CREDIT"
    );

    let id = h.create(input("affordable")).await;
    h.wait_terminal(&id).await;
    let balance: Value = h
        .get("/v1/billing/balance")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(balance["balance_cents"], 30);
    assert_eq!(
        h.post_create(&json!({"input": input("too much now")}))
            .await
            .status(),
        StatusCode::PAYMENT_REQUIRED
    );

    let response = h
        .http
        .post(h.url("/__sim/config"))
        .json(&json!({"balance_usd": 5.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!((h.sim.balance_usd() - 5.0).abs() < 1e-9);
    assert_eq!(h.post_create(&ten).await.status(), StatusCode::CREATED);
    assert!(h.sim.runs().len() == 2 && h.sim.charges().len() == 1);
}
