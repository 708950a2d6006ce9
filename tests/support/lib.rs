//! Helpers for Sightline's end-to-end tests: a real HTTP client, waiting for data to appear,
//! reading Prometheus metrics, and the Python interpreter that runs the OpenTelemetry SDK.

use std::{future::Future, path::PathBuf, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

pub use sightline_collector::testing;

/// The response of one HTTP request.
pub struct HttpResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn request(method: &str, url: &str, content_type: Option<&str>, body: Vec<u8>) -> HttpResponse {
    try_request(method, url, content_type, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// A request with extra headers (`authorization`, `cookie`, ...).
pub async fn request_with(method: &str, url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> HttpResponse {
    send(method, url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// Like [`request`], with connection errors returned (for waiting until a server is up).
pub async fn try_request(
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Result<HttpResponse, hyper_util::client::legacy::Error> {
    match content_type {
        Some(ct) => send(method, url, &[("content-type", ct)], body).await,
        None => send(method, url, &[], body).await,
    }
}

async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<HttpResponse, hyper_util::client::legacy::Error> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut builder = http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    // No request in a test may hang it: 30 s is far beyond any answer a test waits for.
    let pending = client.request(builder.body(Full::new(Bytes::from(body))).expect("valid request"));
    let response = tokio::time::timeout(Duration::from_secs(30), pending)
        .await
        .unwrap_or_else(|_| panic!("{method} {url}: no answer within 30 s"))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.expect("body").to_bytes();
    Ok(HttpResponse { status, headers, body })
}

pub async fn get(url: &str) -> HttpResponse {
    request("GET", url, None, vec![]).await
}

/// Calls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of one sample in Prometheus text, e.g.
/// `sightline_rejected_spans_total{reason="invalid_trace_id"}`; 0 when absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().expect("numeric sample"))
}

/// The interpreter with the test requirements (tests/python/requirements.txt) installed.
pub fn python() -> String {
    std::env::var("SIGHTLINE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A file under tests/python.
pub fn python_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python").join(name)
}

/// Building OTLP requests by hand, for inputs an SDK would never send.
pub mod otlp {
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::{any_value::Value, AnyValue, KeyValue},
        resource::v1::Resource,
        trace::v1::{span::SpanKind, ResourceSpans, ScopeSpans, Span},
    };

    pub fn now_ns() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    pub fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(value.into())),
            }),
            ..KeyValue::default()
        }
    }

    /// A random 16-byte trace id.
    pub fn trace_id() -> Vec<u8> {
        (0..16).map(|_| rand::random::<u8>()).collect()
    }

    /// A server span of `duration_ms` that started a second ago.
    pub fn span(trace_id: &[u8], span_id: u64, name: &str, duration_ms: u64, attributes: Vec<KeyValue>) -> Span {
        let start = now_ns() - 1_000_000_000;
        Span {
            trace_id: trace_id.to_vec(),
            span_id: span_id.to_be_bytes().to_vec(),
            name: name.into(),
            kind: SpanKind::Server as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: start + duration_ms * 1_000_000,
            attributes,
            ..Span::default()
        }
    }

    /// A span of any kind in a trace (`parent` 0: a root), starting `start_ms` after five
    /// seconds ago and lasting `ms`.
    pub fn span_in(
        trace: &[u8],
        (id, parent): (u64, u64),
        kind: SpanKind,
        name: &str,
        (start_ms, ms): (u64, u64),
        attributes: Vec<KeyValue>,
    ) -> Span {
        let start = now_ns() - 5_000_000_000 + start_ms * 1_000_000;
        Span {
            trace_id: trace.to_vec(),
            span_id: id.to_be_bytes().to_vec(),
            parent_span_id: if parent == 0 {
                vec![]
            } else {
                parent.to_be_bytes().to_vec()
            },
            name: name.into(),
            kind: kind as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: start + ms * 1_000_000,
            attributes,
            ..Span::default()
        }
    }

    /// The `chat` service's AcceptChat and Login over `blocks` 10-second blocks from
    /// `first_block_s` (Unix seconds), `per_block` requests of each a block, each a server span
    /// with a database call; AcceptChat's call takes `accept_db_ms` (+ a few ms that vary, so
    /// blocks differ), Login's 8 ms.
    pub fn chat_blocks(first_block_s: u64, blocks: u64, per_block: u64, accept_db_ms: u64) -> Vec<Span> {
        let span = |trace: &[u8], id: u64, parent: u64, kind: SpanKind, start: u64, micros: u64, attributes| Span {
            trace_id: trace.to_vec(),
            span_id: u64::to_be_bytes(id).to_vec(),
            parent_span_id: if parent == 0 {
                vec![]
            } else {
                u64::to_be_bytes(parent).to_vec()
            },
            name: "op".into(),
            kind: kind as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: start + micros * 1000,
            attributes,
            ..Span::default()
        };
        let mut spans = Vec::new();
        for block in 0..blocks {
            for i in 0..per_block {
                let start = (first_block_s + block * 10) * 1_000_000_000 + i * 100_000_000;
                let jitter = (block * 7 + i * 13) % 5;
                for (bt, route, db) in [
                    ("AcceptChat", "/chats/{id}/accept", accept_db_ms),
                    ("Login", "/login", 8),
                ] {
                    let t = trace_id();
                    let db_us = (db + jitter) * 1000;
                    let bt = kv("sightline.bt", bt);
                    let server = vec![bt.clone(), kv("http.route", route), kv("http.request.method", "POST")];
                    spans.push(span(&t, 1, 0, SpanKind::Server, start, db_us + 10_000, server));
                    let call = vec![bt, kv("db.system", "postgresql")];
                    spans.push(span(&t, 2, 1, SpanKind::Client, start + 5_000_000, db_us, call));
                }
            }
        }
        spans
    }

    /// Sends `spans` as `service` at `version` over OTLP/gRPC, in requests of 2000.
    pub async fn send_version(
        client: &mut opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient<
            tonic::transport::Channel,
        >,
        service: &str,
        version: &str,
        spans: Vec<Span>,
    ) {
        for chunk in spans.chunks(2000) {
            let mut req = request(service, chunk.to_vec());
            req.resource_spans[0]
                .resource
                .as_mut()
                .unwrap()
                .attributes
                .push(kv("service.version", version));
            client.export(req).await.unwrap();
        }
    }

    pub fn request(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", service)],
                    ..Resource::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        }
    }
}

/// The span of `trace` (`/api/v1/traces/{id}`'s JSON) with this operation and kind; panics
/// showing the trace when there is none.
pub fn span_of<'a>(trace: &'a serde_json::Value, operation: &str, kind: &str) -> &'a serde_json::Value {
    trace["spans"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["operation"] == operation && s["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} {operation} in {trace:#}"))
}

/// Waits until the trace has exactly `spans` spans and returns `/api/v1/traces/{id}`'s JSON.
pub async fn trace_with(api: &str, trace_id: &str, spans: usize) -> serde_json::Value {
    eventually(
        &format!("{spans} spans in trace {trace_id}"),
        Duration::from_secs(20),
        || async {
            let r = get(&format!("{api}/api/v1/traces/{trace_id}")).await;
            (r.status == 200 && r.json()["spans"].as_array().is_some_and(|s| s.len() == spans)).then(|| r.json())
        },
    )
    .await
}

/// Waits until a trace search (`/api/v1/traces?{query}`) finds something; the first hit's id.
pub async fn first_trace(api: &str, query: &str) -> String {
    eventually(&format!("a trace for {query}"), Duration::from_secs(20), || async {
        let r = get(&format!("{api}/api/v1/traces?{query}")).await.json();
        r["traces"]
            .as_array()?
            .first()
            .map(|t| t["trace_id"].as_str().unwrap_or_default().to_string())
    })
    .await
}

/// The built dashboard (`npm --prefix dashboards/web run build`, which `.ci/run` does).
pub fn dashboard_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dashboards/web");
    assert!(
        dir.join("dist/index.html").is_file() && dir.join("node_modules/playwright-core").is_dir(),
        "the dashboard is not built: npm --prefix dashboards/web ci && npm --prefix dashboards/web run build"
    );
    dir.join("dist")
}

/// Runs `dashboards/web/tests/browser.mjs <mode>` (playwright-core driving Debian's Chromium)
/// against the dashboard at `url`; screenshots go to `dashboards/web/test-artifacts/<mode>`.
/// Panics with the script's output when a check fails; returns its output otherwise.
pub async fn browser_test(mode: &str, url: &str) -> String {
    browser_test_with(mode, url, &[]).await
}

/// [`browser_test`] with environment variables for the script.
pub async fn browser_test_with(mode: &str, url: &str, env: &[(&str, &str)]) -> String {
    let web = dashboard_dir().join("..");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).is_file(),
        "no Chromium at {chromium} (apt-get install chromium, or set CHROMIUM)"
    );
    let artifacts = web.join("test-artifacts").join(mode);
    let output = tokio::process::Command::new("node")
        .arg(web.join("tests/browser.mjs"))
        .args([mode, url])
        .arg(&artifacts)
        .env("CHROMIUM", &chromium)
        .envs(env.iter().copied())
        .output()
        .await
        .expect("node runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "browser test {mode} failed:\n{text}\nscreenshots: {}",
        artifacts.display()
    );
    text
}

/// A webhook receiver for alert notifications: a real HTTP server that records every message
/// it accepts, and answers 503 (taking nothing) while told to be down.
pub mod webhook {
    use std::sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    };

    use axum::{extract::State, http::StatusCode, routing::post, Json, Router};

    #[derive(Default)]
    pub struct Inbox {
        pub messages: Mutex<Vec<serde_json::Value>>,
        pub down: AtomicBool,
        /// Requests refused while down.
        pub refused: AtomicU64,
    }

    impl Inbox {
        /// Every event received so far: (change, alert), in arrival order.
        pub fn events(&self) -> Vec<(String, serde_json::Value)> {
            self.messages
                .lock()
                .unwrap()
                .iter()
                .flat_map(|m| m["events"].as_array().cloned().unwrap_or_default())
                .map(|e| (e["change"].as_str().unwrap_or("").to_string(), e["alert"].clone()))
                .collect()
        }

        /// The first event of `kind` with `change` (firing, changed, resolved) whose alert
        /// satisfies `matches`.
        pub fn find(
            &self,
            change: &str,
            kind: &str,
            matches: impl Fn(&serde_json::Value) -> bool,
        ) -> Option<serde_json::Value> {
            self.events()
                .into_iter()
                .find(|(c, a)| c == change && a["kind"] == kind && matches(a))
                .map(|(_, a)| a)
        }
    }

    /// Starts the receiver; its URL is `http://{addr}/hook`.
    pub async fn start() -> (String, Arc<Inbox>) {
        let inbox = Arc::new(Inbox::default());
        let app = Router::new()
            .route(
                "/hook",
                post(
                    |State(inbox): State<Arc<Inbox>>, Json(message): Json<serde_json::Value>| async move {
                        if inbox.down.load(Ordering::SeqCst) {
                            inbox.refused.fetch_add(1, Ordering::SeqCst);
                            return StatusCode::SERVICE_UNAVAILABLE;
                        }
                        inbox.messages.lock().unwrap().push(message);
                        StatusCode::OK
                    },
                ),
            )
            .with_state(inbox.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/hook"), inbox)
    }
}
