//! Bad input gets a clear status and a counter, and never blocks the next good request.

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use prost::Message;
use sightline_collector::{
    receivers::otlp_grpc::{PassThrough, EXPORT_PATH},
    Collector,
};
use sightline_tests::{
    eventually, get, metric,
    otlp::{kv, request, span, trace_id},
    testing,
};
use std::time::Duration;
use tonic::Code;

const LIMIT: usize = 64 * 1024;

async fn metrics(api: &str) -> String {
    String::from_utf8(get(&format!("{api}/metrics")).await.body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_refuses_bad_input_with_a_status_and_a_counter_and_takes_the_next_good_request() {
    let mut config = testing::config("bad_grpc");
    config.limits.max_request_bytes = LIMIT;
    let collector = Collector::start(config).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let url = format!("http://{}", collector.grpc_addr);
    let mut client = TraceServiceClient::connect(url.clone()).await.unwrap();

    // Garbage bytes, sent raw.
    let channel = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = tonic::client::Grpc::new(channel);
    raw.ready().await.unwrap();
    let garbage = Bytes::from_static(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01");
    let status = raw
        .unary::<Bytes, Bytes, _>(tonic::Request::new(garbage), EXPORT_PATH.parse().unwrap(), PassThrough)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("cannot decode"), "{}", status.message());

    // Larger than the limit: refused whole, permanently (not OUT_OF_RANGE, which exporters retry).
    let big = "x".repeat(LIMIT);
    let oversized = request("auth", vec![span(&trace_id(), 1, "GET /", 1, vec![kv("blob", &big)])]);
    let status = client.export(oversized).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("too large"), "{}", status.message());

    // Zero and short trace ids, a span that ends before it starts.
    let mut zero = span(&[0; 16], 1, "GET /", 1, vec![]);
    let status = client.export(request("auth", vec![zero.clone()])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("trace id must not be all zero"),
        "{}",
        status.message()
    );
    zero.trace_id = vec![1; 8];
    let status = client.export(request("auth", vec![zero])).await.unwrap_err();
    assert!(
        status.message().contains("trace id must be 16 bytes, got 8"),
        "{}",
        status.message()
    );
    let mut backwards = span(&trace_id(), 1, "GET /", 1, vec![]);
    backwards.end_time_unix_nano = backwards.start_time_unix_nano - 1;
    let status = client
        .export(request("auth", vec![backwards.clone()]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("before it starts"), "{}", status.message());

    // A request mixing good and bad spans: the good ones go in, the sender learns of the rest.
    let (mixed_trace, good_trace) = (trace_id(), trace_id());
    let mixed = client
        .export(request(
            "auth",
            vec![span(&mixed_trace, 7, "GET /mixed", 1, vec![]), backwards],
        ))
        .await
        .unwrap()
        .into_inner();
    let partial = mixed.partial_success.expect("partial success");
    assert_eq!(partial.rejected_spans, 1);
    assert!(partial.error_message.contains("before it starts"));
    let good = client
        .export(request("auth", vec![span(&good_trace, 8, "GET /good", 1, vec![])]))
        .await
        .unwrap();
    assert_eq!(good.into_inner().partial_success, None);

    for trace in [&mixed_trace, &good_trace] {
        let id = hex::encode(trace);
        eventually("good spans to be stored", Duration::from_secs(20), || async {
            (get(&format!("{api}/api/v1/traces/{id}")).await.status == 200).then_some(())
        })
        .await;
    }
    let text = metrics(&api).await;
    for (sample, value) in [
        (
            "sightline_rejected_requests_total{receiver=\"otlp_grpc\",reason=\"malformed\"}",
            1.0,
        ),
        (
            "sightline_rejected_requests_total{receiver=\"otlp_grpc\",reason=\"too_large\"}",
            1.0,
        ),
        (
            "sightline_rejected_requests_total{receiver=\"otlp_grpc\",reason=\"all_spans_invalid\"}",
            3.0,
        ),
        ("sightline_rejected_spans_total{reason=\"invalid_trace_id\"}", 2.0),
        ("sightline_rejected_spans_total{reason=\"end_before_start\"}", 2.0),
        ("sightline_received_spans_total{receiver=\"otlp_grpc\"}", 2.0),
        ("sightline_written_rows_total{table=\"spans\"}", 2.0),
    ] {
        assert_eq!(metric(&text, sample), value, "{sample}\n{text}");
    }
    collector.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_refuses_bad_input_with_a_4xx_and_a_counter_and_takes_the_next_good_request() {
    let mut config = testing::config("bad_http");
    config.limits.max_request_bytes = LIMIT;
    let collector = Collector::start(config).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let traces = format!("http://{}/v1/traces", collector.http_addr);
    let post = |content_type: &'static str, body: Vec<u8>| {
        let traces = traces.clone();
        async move { sightline_tests::request("POST", &traces, Some(content_type), body).await }
    };

    let response = post("application/json", b"{\"resourceSpans\": [{".to_vec()).await;
    assert_eq!(response.status, 400);
    assert!(response.json()["message"].as_str().unwrap().contains("cannot decode"));

    let response = post(
        "application/x-protobuf",
        b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01".to_vec(),
    )
    .await;
    assert_eq!(response.status, 400);
    let status = tonic_types::Status::decode(response.body.clone()).expect("a google.rpc.Status body");
    assert_eq!(status.code, Code::InvalidArgument as i32);
    assert!(status.message.contains("cannot decode"), "{}", status.message);

    let big = "x".repeat(LIMIT);
    let oversized = request("web", vec![span(&trace_id(), 1, "GET /", 1, vec![kv("blob", &big)])]);
    let response = post("application/x-protobuf", oversized.encode_to_vec()).await;
    assert_eq!(response.status, 413);

    let response = post("text/plain", b"hello".to_vec()).await;
    assert_eq!(response.status, 415);
    assert!(response.json()["error"].as_str().unwrap().contains("application/json"));

    // OTLP/JSON with an empty trace id (zero length, as the JSON encoding spells a missing id).
    let json = r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"web"}}]},
        "scopeSpans":[{"spans":[{"traceId":"","spanId":"0102030405060708","name":"GET /","kind":2,
        "startTimeUnixNano":"1700000000000000000","endTimeUnixNano":"1700000000001000000"}]}]}]}"#;
    let response = post("application/json", json.as_bytes().to_vec()).await;
    assert_eq!(response.status, 400);
    assert!(response.json()["message"]
        .as_str()
        .unwrap()
        .contains("trace id must be 16 bytes, got 0"));

    // And a good OTLP/JSON request still goes through.
    let good_trace = trace_id();
    let good = serde_json::to_vec(&request("web", vec![span(&good_trace, 9, "GET /ok", 3, vec![])])).unwrap();
    let response = post("application/json", good).await;
    assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
    let id = hex::encode(&good_trace);
    let trace = eventually("the good span", Duration::from_secs(20), || async {
        let r = get(&format!("{api}/api/v1/traces/{id}")).await;
        (r.status == 200).then(|| r.json())
    })
    .await;
    assert_eq!(trace["spans"][0]["operation"], "GET /ok");
    assert_eq!(trace["spans"][0]["duration_us"], 3000);

    let text = metrics(&api).await;
    for (sample, value) in [
        (
            "sightline_rejected_requests_total{receiver=\"otlp_http\",reason=\"malformed\"}",
            2.0,
        ),
        (
            "sightline_rejected_requests_total{receiver=\"otlp_http\",reason=\"too_large\"}",
            1.0,
        ),
        (
            "sightline_rejected_requests_total{receiver=\"otlp_http\",reason=\"unsupported_media_type\"}",
            1.0,
        ),
        ("sightline_rejected_spans_total{reason=\"invalid_trace_id\"}", 1.0),
        ("sightline_received_spans_total{receiver=\"otlp_http\"}", 1.0),
    ] {
        assert_eq!(metric(&text, sample), value, "{sample}\n{text}");
    }
    collector.shutdown().await.unwrap();
}
