//! Issue 4's acceptance: two axum services and one tonic service, each its own process and
//! instrumented only through the crate's layers. One request through all three yields one
//! trace with the BT on every span, correct parents, and DB and cache child spans with peers.

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use common::{free_port, Service};

use serde_json::Value;
use sightline_collector::Collector;
use sightline_tests::{eventually, first_trace, testing, trace_with};

fn start(role: &str, port: u16, next: Option<u16>, collector: &str) -> Service {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chat-service"));
    command.args([
        "--role",
        role,
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--collector",
        collector,
    ]);
    if let Some(next) = next {
        command.args(["--next", &format!("http://127.0.0.1:{next}")]);
    }
    Service(command.stdout(Stdio::null()).spawn().expect("chat-service runs"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_through_three_services_is_one_trace() {
    let collector = Collector::start(testing::config("three_services")).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let grpc = format!("http://{}", collector.grpc_addr);
    let (sessions_port, messages_port, gateway_port) = (free_port(), free_port(), free_port());
    let _sessions = start("sessions", sessions_port, None, &grpc);
    let _messages = start("messages", messages_port, Some(sessions_port), &grpc);
    let _gateway = start("gateway", gateway_port, Some(messages_port), &grpc);

    // Wait until the chain answers, then send the request under test.
    eventually("the services to answer", Duration::from_secs(30), || async {
        let url = format!("http://127.0.0.1:{gateway_port}/send/1");
        let r = sightline_tests::try_request("GET", &url, None, vec![]).await;
        r.is_ok_and(|r| r.status == 201).then_some(())
    })
    .await;
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let r = sightline_tests::request("GET", &format!("http://127.0.0.1:{gateway_port}/send/7"), None, vec![]).await;
    assert_eq!(r.status, 201);

    let trace_id = first_trace(&api, &format!("service=gateway&bt=SendMessage&from={since}")).await;
    let trace: Value = trace_with(&api, &trace_id, 8).await;
    let spans = trace["spans"].as_array().unwrap();
    let find = |service: &str, kind: &str, op: &str| -> &Value {
        spans
            .iter()
            .find(|s| s["service"] == service && s["kind"] == kind && s["operation"] == op)
            .unwrap_or_else(|| panic!("{service} {kind} {op} in {trace:#}"))
    };
    let check = "/chat.v1.Sessions/Check";
    let entry = find("gateway", "server", "GET /send/{chat}");
    let to_messages = find("gateway", "client", "POST");
    let messages = find("messages", "server", "POST /chats/{id}/messages");
    let cache = find("messages", "client", "GET session");
    let to_sessions = find("messages", "client", check);
    let sessions = find("sessions", "server", check);
    let select = find("sessions", "client", "SELECT sessions");
    let insert = find("messages", "client", "INSERT messages");
    assert_eq!(entry["parent_span_id"], Value::Null);
    for (child, parent) in [
        (to_messages, entry),
        (messages, to_messages),
        (cache, messages),
        (to_sessions, messages),
        (sessions, to_sessions),
        (select, sessions),
        (insert, messages),
    ] {
        assert_eq!(
            child["parent_span_id"], parent["span_id"],
            "{} -> {}",
            child["operation"], parent["operation"]
        );
    }
    assert!(
        spans.iter().all(|s| s["bt"] == "SendMessage"),
        "BT on every span: {trace:#}"
    );
    for (span, component, peer) in [
        (to_messages, "http", "messages"),
        (cache, "cache", "redis"),
        (to_sessions, "grpc", "sessions"),
        (select, "db", "postgres:sessions"),
        (insert, "db", "postgres:chat"),
    ] {
        assert_eq!(
            (span["component"].as_str(), span["peer"].as_str()),
            (Some(component), Some(peer)),
            "{span}"
        );
    }
    assert_eq!(sessions["attributes"]["sightline.caller.service"], "messages");
    // The agents are still connected: shutdown must end their streams, not wait for them.
    tokio::time::timeout(Duration::from_secs(15), collector.shutdown())
        .await
        .expect("shutdown ends")
        .unwrap();
}
