//! Alerts against a running collector and a real webhook receiver, replaying the incidents
//! Sightline exists for: logins that stop arriving, logins stuck on a cache, a latency SLO
//! burning its budget, and the monitor itself stopping. Each alert must fire in time, reach the
//! webhook, and resolve once its cause ends.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{collector::trace::v1::trace_service_client::TraceServiceClient, trace::v1::Span};
use sightline_collector::{
    alerts::notify::WebhookConfig, alerts::slo::SloDefinition, store::launcher::ClickHouseServer, Collector, Config,
};
use sightline_tests::{
    browser_test, dashboard_dir, eventually, get, metric,
    otlp::{kv, now_ns, request, trace_id},
    request as http_request, testing, webhook,
};

/// Alerts evaluated every 2 s; a resolved condition clears after 10 s (not 2 minutes).
fn alerting_config(test: &str, hook: &str) -> Config {
    let mut config = testing::config(test);
    config.alerts.interval_secs = 2;
    config.alerts.baseline.clear_after_secs = 10;
    config.alerts.webhooks = vec![WebhookConfig {
        url: hook.to_string(),
        format: Default::default(),
    }];
    config
}

/// Login server spans of `auth` starting at `start_ns`, `slow` of them taking 400 ms, the
/// rest 20 ms.
fn logins(start_ns: u64, count: u64, slow: u64) -> Vec<Span> {
    (0..count)
        .map(|i| {
            let start = start_ns + i * 1_000_000;
            let ms = if i < slow { 400 } else { 20 };
            Span {
                trace_id: trace_id(),
                span_id: (i + 1).to_be_bytes().to_vec(),
                name: "POST /login".into(),
                kind: 2,
                start_time_unix_nano: start,
                end_time_unix_nano: start + ms * 1_000_000,
                attributes: vec![kv("sightline.bt", "Login"), kv("http.route", "/login")],
                ..Span::default()
            }
        })
        .collect()
}

/// `per_second` Logins a second over the last `minutes` minutes (the history a baseline or an
/// SLO window needs), `slow_per_second` of each second's slow.
async fn backfill(grpc: &str, minutes: u64, per_second: u64, slow_per_second: u64) {
    let mut client = TraceServiceClient::connect(grpc.to_string()).await.unwrap();
    let now_s = now_ns() / 1_000_000_000;
    let mut spans = Vec::new();
    for second in (now_s - minutes * 60)..now_s {
        spans.extend(logins(second * 1_000_000_000, per_second, slow_per_second));
        if spans.len() >= 4000 {
            client
                .export(request("auth", std::mem::take(&mut spans)))
                .await
                .unwrap();
        }
    }
    client.export(request("auth", spans)).await.unwrap();
}

/// Sends Logins every second from now on, at the rate in `per_second` (changeable).
fn live_logins(
    grpc: String,
    per_second: Arc<AtomicU64>,
    slow_per_second: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = TraceServiceClient::connect(grpc).await.unwrap();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let (n, slow) = (
                per_second.load(Ordering::SeqCst),
                slow_per_second.load(Ordering::SeqCst),
            );
            // Started a second ago: inside the current 10-second window, never in the future.
            let start = now_ns() - 1_000_000_000;
            if n > 0 {
                client.export(request("auth", logins(start, n, slow))).await.unwrap();
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ninety_percent_login_drop_is_critical_within_two_minutes_and_resolves() {
    let (hook, inbox) = webhook::start().await;
    let collector = Collector::start(alerting_config("rate_drop", &hook)).await.unwrap();
    let grpc = format!("http://{}", collector.grpc_addr);
    // An hour of 10 logins a second: the rolling baseline (no earlier days here).
    backfill(&grpc, 65, 10, 0).await;
    let (rate, slow) = (Arc::new(AtomicU64::new(10)), Arc::new(AtomicU64::new(0)));
    let load = live_logins(grpc, rate.clone(), slow);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        inbox.find("firing", "rate_drop", |_| true).is_none(),
        "no drop, no alert: {:?}",
        inbox.events()
    );

    rate.store(1, Ordering::SeqCst);
    let dropped_at = Instant::now();
    let alert = eventually(
        "a critical Login rate-drop alert at the webhook",
        Duration::from_secs(150),
        || async {
            inbox.events().into_iter().find_map(|(_, a)| {
                (a["kind"] == "rate_drop" && a["subject"] == "Login" && a["severity"] == "critical").then_some(a)
            })
        },
    )
    .await;
    let took = dropped_at.elapsed();
    println!(
        "rate drop: critical alert {took:?} after the drop: {}",
        alert["summary"]
    );
    assert!(took <= Duration::from_secs(120), "took {took:?}");
    assert_eq!(alert["service"], "auth");
    assert!(alert["summary"].as_str().unwrap().contains("expected 600"), "{alert}");

    rate.store(10, Ordering::SeqCst);
    let restored_at = Instant::now();
    eventually("the rate-drop alert resolved", Duration::from_secs(150), || async {
        inbox.find("resolved", "rate_drop", |a| a["subject"] == "Login")
    })
    .await;
    println!(
        "rate drop: resolved {:?} after the rate came back",
        restored_at.elapsed()
    );
    let alerts = get(&format!("http://{}/api/v1/alerts", collector.api_addr))
        .await
        .json();
    assert!(
        alerts["active"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["kind"] != "rate_drop"),
        "{alerts:#}"
    );
    assert!(alerts["recent"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["kind"] == "rate_drop"));
    load.abort();
    collector.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_slo_burning_at_twenty_times_pages_and_resolves_when_the_burn_stops() {
    let (hook, inbox) = webhook::start().await;
    let mut config = alerting_config("slo_burn", &hook);
    config.alerts.slos = vec![SloDefinition {
        name: "login-latency".into(),
        service: "auth".into(),
        bt: "Login".into(),
        operation: String::new(),
        latency_ms: Some(300.0),
        latency_objective: Some(0.99),
        availability_objective: None,
        window_days: 30,
    }];
    let collector = Collector::start(config).await.unwrap();
    let (grpc, api) = (
        format!("http://{}", collector.grpc_addr),
        format!("http://{}", collector.api_addr),
    );
    // An hour where 2 of every 10 logins took 400 ms: 20% slow against a 1% budget, 20x.
    backfill(&grpc, 61, 10, 2).await;
    let (rate, slow) = (Arc::new(AtomicU64::new(10)), Arc::new(AtomicU64::new(2)));
    let load = live_logins(grpc, rate, slow.clone());
    let page = eventually("the SLO page at the webhook", Duration::from_secs(30), || async {
        inbox.find("firing", "slo_burn", |a| a["severity"] == "critical")
    })
    .await;
    println!("slo: {}", page["summary"]);
    assert!(page["summary"].as_str().unwrap().contains("login-latency"), "{page}");
    let burn = page["details"]["burn_rates"]["last_1h"].as_f64().unwrap();
    assert!(
        (burn - 20.0).abs() < 2.0,
        "20% slow against a 1% budget burns at 20x, got {burn}"
    );
    // SLOs through the API: checked, stored, listed, deleted; the config's are read-only.
    let put = |name: &str, body: serde_json::Value| {
        let url = format!("{api}/api/v1/slos/{name}");
        async move { http_request("PUT", &url, Some("application/json"), body.to_string().into_bytes()).await }
    };
    let refused = put(
        "login-latency",
        serde_json::json!({"service": "auth", "bt": "Login", "availability_objective": 0.99}),
    )
    .await;
    assert_eq!(refused.status, 409, "{}", String::from_utf8_lossy(&refused.body));
    let bad = put(
        "x",
        serde_json::json!({"service": "auth", "bt": "Login", "availability_objective": 99}),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().unwrap().contains("between 0 and 1"));
    let created = put(
        "login-errors",
        serde_json::json!({"service": "auth", "bt": "Login", "availability_objective": 0.999}),
    )
    .await;
    assert_eq!(created.status, 200, "{}", String::from_utf8_lossy(&created.body));
    let one = get(&format!("{api}/api/v1/slos/login-errors")).await.json();
    assert_eq!(one["source"], "api");
    assert_eq!(one["objectives"][0]["objective"], "availability");
    let slos = get(&format!("{api}/api/v1/slos")).await.json();
    assert_eq!(slos["slos"].as_array().unwrap().len(), 2, "{slos:#}");
    let deleted = http_request("DELETE", &format!("{api}/api/v1/slos/login-errors"), None, Vec::new()).await;
    assert_eq!(deleted.status, 204);
    assert_eq!(get(&format!("{api}/api/v1/slos/login-errors")).await.status, 404);

    let slos = get(&format!("{api}/api/v1/slos")).await.json();
    let objective = &slos["slos"][0]["objectives"][0];
    assert_eq!(objective["alert"], "critical", "{slos:#}");
    assert!(objective["budget_remaining"].as_f64().unwrap() < 0.0, "{slos:#}");

    // The slow dependency is fixed: the last 5 minutes drop under 14.4x, the page resolves.
    slow.store(0, Ordering::SeqCst);
    let fixed_at = Instant::now();
    eventually("the SLO page resolved", Duration::from_secs(180), || async {
        inbox.find("resolved", "slo_burn", |_| true)
    })
    .await;
    println!("slo: resolved {:?} after the burn stopped", fixed_at.elapsed());
    load.abort();
    collector.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_stuck_on_a_cache_raise_an_alert_naming_it_and_a_webhook_that_is_down_loses_nothing() {
    let (hook, inbox) = webhook::start().await;
    inbox.down.store(true, Ordering::SeqCst);
    let mut config = alerting_config("stuck_alert", &hook);
    config.api.dashboard_dir = Some(dashboard_dir());
    config.agents.silent_after_secs = 3;
    let collector = Collector::start(config).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let agent = sightline::init(sightline::Config {
        service: "auth".into(),
        version: "1.4.2".into(),
        instance: "auth-7".into(),
        collector: format!("http://{}", collector.grpc_addr),
        flush_interval: Duration::from_millis(100),
        heartbeat_interval: Duration::from_millis(500),
        ..Default::default()
    })
    .unwrap();

    let handlers: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(|| {
                let _login = sightline::transaction("Login").operation("POST /login").entered();
                let _cache = sightline::span("GET session").client("cache", "stats-cache").entered();
                std::thread::sleep(Duration::from_secs(25));
            })
        })
        .collect();
    let alert = eventually("the stuck alert in the API", Duration::from_secs(15), || async {
        let alerts = get(&format!("{api}/api/v1/alerts")).await.json();
        alerts["active"]
            .as_array()?
            .iter()
            .find(|a| a["kind"] == "stuck" && a["subject"] == "Login")
            .cloned()
    })
    .await;
    let summary = alert["summary"].as_str().unwrap();
    println!("stuck: {summary}");
    assert!(
        summary.contains("3 stuck") && summary.contains("stats-cache GET session"),
        "{summary}"
    );
    assert_eq!(alert["details"]["current_peer"], "stats-cache");
    // The dashboard shows it: a count in the header, the alert in the alerts view.
    browser_test("alerts", &api).await;

    // The receiver is down: the notifier retries while evaluations go on.
    let metrics = || async { String::from_utf8(get(&format!("{api}/metrics")).await.body.to_vec()).unwrap() };
    let evaluations = metric(&metrics().await, "sightline_alert_evaluations_total{outcome=\"ok\"}");
    eventually("retries and evaluations meanwhile", Duration::from_secs(20), || async {
        let text = metrics().await;
        (inbox.refused.load(Ordering::SeqCst) >= 2
            && metric(&text, "sightline_webhook_messages_total{outcome=\"retried\"}") >= 2.0
            && metric(&text, "sightline_alert_evaluations_total{outcome=\"ok\"}") >= evaluations + 3.0)
            .then_some(())
    })
    .await;
    assert!(inbox.events().is_empty());
    inbox.down.store(false, Ordering::SeqCst);

    for handler in handlers {
        handler.join().unwrap();
    }
    eventually(
        "firing, then resolved, at the webhook",
        Duration::from_secs(60),
        || async { inbox.find("resolved", "stuck", |a| a["subject"] == "Login") },
    )
    .await;
    let stuck_events: Vec<String> = inbox
        .events()
        .into_iter()
        .filter(|(_, a)| a["kind"] == "stuck")
        .map(|(change, _)| change)
        .collect();
    // A warning while under 30 s open; nothing lost, nothing twice, in order.
    assert_eq!(stuck_events, vec!["firing", "resolved"], "{:?}", inbox.events());
    let text = metrics().await;
    assert_eq!(
        metric(&text, "sightline_webhook_messages_total{outcome=\"dropped\"}"),
        0.0
    );

    // The service's only agent stops: nothing watches it any more, which is critical.
    drop(agent);
    let silent = eventually("the silent-agent alert", Duration::from_secs(30), || async {
        inbox.find("firing", "agent_silent", |a| a["service"] == "auth")
    })
    .await;
    println!("silent: {}", silent["summary"]);
    assert_eq!(silent["severity"], "critical");
    assert!(silent["summary"].as_str().unwrap().contains("auth-7"), "{silent}");
    collector.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_evaluation_stops_readyz_fails_and_an_alert_says_so() {
    let (hook, inbox) = webhook::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut server = ClickHouseServer::start(data.path(), "").unwrap();
    let mut config = alerting_config("stalled", &hook);
    config.alerts.interval_secs = 1;
    config.clickhouse.url = server.url();
    let collector = Collector::start(config).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    eventually("ready", Duration::from_secs(10), || async {
        (get(&format!("{api}/readyz")).await.status == 200).then_some(())
    })
    .await;

    server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .unwrap();
    let stalled = eventually("the evaluator-stalled alert", Duration::from_secs(40), || async {
        inbox.find("firing", "evaluator_stalled", |_| true)
    })
    .await;
    println!("stalled: {}", stalled["summary"]);
    assert_eq!(stalled["severity"], "critical");
    let readyz = get(&format!("{api}/readyz")).await;
    assert_eq!(readyz.status, 503);
    let text = String::from_utf8(get(&format!("{api}/metrics")).await.body.to_vec()).unwrap();
    assert!(
        metric(&text, "sightline_alert_evaluation_lag_seconds") >= 15.0,
        "{text}"
    );

    let mut server = tokio::task::spawn_blocking(move || {
        server.restart().unwrap();
        server
    })
    .await
    .unwrap();
    eventually(
        "resolved once evaluations complete again",
        Duration::from_secs(40),
        || async { inbox.find("resolved", "evaluator_stalled", |_| true) },
    )
    .await;
    eventually("ready again", Duration::from_secs(10), || async {
        (get(&format!("{api}/readyz")).await.status == 200).then_some(())
    })
    .await;
    collector.shutdown().await.unwrap();
    tokio::task::spawn_blocking(move || server.stop()).await.unwrap();
}
