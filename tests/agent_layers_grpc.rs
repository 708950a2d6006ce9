//! A tonic service and its client, instrumented only through the crate's tower layers
//! (`Server::builder().layer(ServerLayer)`, `ClientLayer::grpc` around the channel): the call
//! and the server's entry are linked, named after the gRPC method, and carry the caller's BT.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_client::TraceServiceClient,
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use serde_json::Value;
use sightline::tower::{ClientLayer, ServerLayer};
use sightline_collector::Collector;
use sightline_tests::{testing, trace_with};

/// A gRPC service whose handler does a database call.
struct Sessions;

#[tonic::async_trait]
impl TraceService for Sessions {
    async fn export(
        &self,
        _request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _lookup = sightline::span("SELECT sessions")
            .client("db", "postgres:sessions")
            .entered();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_call_and_server_are_one_trace() {
    let collector = Collector::start(testing::config("agent_layers_grpc")).await.unwrap();
    let api = format!("http://{}", collector.api_addr);
    let agent = sightline::init(sightline::Config {
        service: "workspace".into(),
        collector: format!("http://{}", collector.grpc_addr),
        flush_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(ServerLayer::new())
            .add_service(TraceServiceServer::new(Sessions))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = TraceServiceClient::new(
        tower::ServiceBuilder::new()
            .layer(ClientLayer::grpc("sessions"))
            .service(channel),
    );

    let transaction = sightline::transaction("AcceptChat")
        .operation("POST /chats/{id}/accept")
        .start();
    let trace_id = transaction.trace_id().unwrap();
    transaction
        .instrument(async move {
            client.export(ExportTraceServiceRequest::default()).await.unwrap();
        })
        .await;

    let trace: Value = trace_with(&api, &trace_id, 4).await;
    let spans = trace["spans"].as_array().unwrap();
    let method = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
    let find = |kind: &str, op: &str| -> &Value {
        spans
            .iter()
            .find(|s| s["kind"] == kind && s["operation"] == op)
            .unwrap_or_else(|| panic!("{kind} {op} in {trace:#}"))
    };
    let root = find("server", "POST /chats/{id}/accept");
    let call = find("client", method);
    let entry = find("server", method);
    let lookup = find("client", "SELECT sessions");
    assert_eq!(call["parent_span_id"], root["span_id"]);
    assert_eq!(entry["parent_span_id"], call["span_id"]);
    assert_eq!(lookup["parent_span_id"], entry["span_id"]);
    assert_eq!(
        (call["component"].as_str(), call["peer"].as_str()),
        (Some("grpc"), Some("sessions"))
    );
    assert!(spans.iter().all(|s| s["bt"] == "AcceptChat"), "{trace:#}");
    assert!(spans.iter().all(|s| s["status"] != "error"));
    drop(agent);
    collector.shutdown().await.unwrap();
}
