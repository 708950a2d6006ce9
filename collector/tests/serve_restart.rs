//! `sightline serve` as a user runs it: a private ClickHouse in the data folder, data that
//! survives a restart, and a clean stop on SIGTERM.

mod common;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::free_port;

struct Serve {
    child: Child,
    http: u16,
    api: u16,
}

impl Serve {
    fn start(data_dir: &Path) -> Self {
        let (grpc, http, api) = (free_port(), free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_sightline"))
            .arg("serve")
            .env("SIGHTLINE_DATA_DIR", data_dir)
            .env("SIGHTLINE_RECEIVERS__GRPC_LISTEN", format!("127.0.0.1:{grpc}"))
            .env("SIGHTLINE_RECEIVERS__HTTP_LISTEN", format!("127.0.0.1:{http}"))
            .env("SIGHTLINE_API__LISTEN", format!("127.0.0.1:{api}"))
            .env("SIGHTLINE_WRITER__FLUSH_INTERVAL_MS", "100")
            .stdout(Stdio::null())
            .spawn()
            .expect("sightline runs");
        Self { child, http, api }
    }

    fn stop(mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "sightline serve exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "sightline serve did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

async fn http(method: &str, url: &str, body: &str) -> Option<(u16, String)> {
    common::http(method, url, "application/json", body.as_bytes().to_vec()).await
}

async fn wait_for(url: &str, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((s, body)) = http("GET", url, "").await {
            if s == status {
                return body;
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for {status} from {url}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn otlp_json(trace_id: &str, name: &str) -> String {
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        - 1_000_000_000;
    format!(
        r#"{{"resourceSpans":[{{"resource":{{"attributes":[{{"key":"service.name","value":{{"stringValue":"chat"}}}}]}},
        "scopeSpans":[{{"spans":[{{"traceId":"{trace_id}","spanId":"0102030405060708","name":"{name}","kind":2,
        "startTimeUnixNano":"{start}","endTimeUnixNano":"{}"}}]}}]}}]}}"#,
        start + 2_000_000
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_a_restart_with_the_same_data_folder() {
    let data = tempfile::tempdir().unwrap();
    let (first, second) = ("11111111111111111111111111111111", "22222222222222222222222222222222");

    let serve = Serve::start(data.path());
    wait_for(&format!("http://127.0.0.1:{}/readyz", serve.api), 200).await;
    let (status, body) = http(
        "POST",
        &format!("http://127.0.0.1:{}/v1/traces", serve.http),
        &otlp_json(first, "AcceptChat"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    wait_for(&format!("http://127.0.0.1:{}/api/v1/traces/{first}", serve.api), 200).await;
    serve.stop();
    assert!(
        data.path().join("clickhouse").join("data").is_dir(),
        "ClickHouse data lives in the data folder"
    );

    let serve = Serve::start(data.path());
    let trace = wait_for(&format!("http://127.0.0.1:{}/api/v1/traces/{first}", serve.api), 200).await;
    assert!(trace.contains("\"operation\":\"AcceptChat\""), "{trace}");
    let (status, _) = http(
        "POST",
        &format!("http://127.0.0.1:{}/v1/traces", serve.http),
        &otlp_json(second, "SendMessage"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    wait_for(&format!("http://127.0.0.1:{}/api/v1/traces/{second}", serve.api), 200).await;
    serve.stop();
}

#[test]
fn a_missing_clickhouse_binary_is_a_clear_error() {
    let data = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_sightline"))
        .arg("serve")
        .env("SIGHTLINE_DATA_DIR", data.path())
        .env("SIGHTLINE_CLICKHOUSE__BINARY", "/nonexistent/clickhouse-server")
        .env("SIGHTLINE_API__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("clickhouse.binary \"/nonexistent/clickhouse-server\" is not a file"),
        "{stderr}"
    );
}

#[test]
fn help_explains_serve_and_its_configuration() {
    let output = Command::new(env!("CARGO_BIN_EXE_sightline"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "4317",
        "8480",
        "private ClickHouse",
        "SIGHTLINE_CLICKHOUSE__URL",
        "--config",
    ] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
}
