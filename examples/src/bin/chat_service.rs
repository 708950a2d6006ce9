//! One service of the example chat app, chosen by `--role`:
//!
//! - `gateway` (axum): `GET /send/{chat}` calls `messages` over HTTP. BT `SendMessage`.
//! - `messages` (axum): `POST /chats/{id}/messages` reads the session cache (redis), checks the
//!   session with `sessions` over gRPC, and writes the message (postgres).
//! - `sessions` (tonic): `chat.v1.Sessions/Check` reads the sessions table (postgres).
//!
//! Each is instrumented only through `sightline::tower`'s layers (plus explicit spans for the
//! cache and database calls, which have no client library here).

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use axum::{extract::State, http::StatusCode, routing, Router};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use sightline::tower::{ClientLayer, ServerLayer};
use sightline_examples::chat::{
    sessions_client::SessionsClient,
    sessions_server::{Sessions, SessionsServer},
    CheckReply, CheckRequest,
};
use tower::{Layer, ServiceExt};

#[derive(Clone, Copy, ValueEnum)]
enum Role {
    Gateway,
    Messages,
    Sessions,
}

#[derive(Parser)]
#[command(about = "A service of Sightline's example chat app")]
struct Args {
    #[arg(long, value_enum)]
    role: Role,
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Sightline collector (gRPC).
    #[arg(long, default_value = "http://127.0.0.1:4317")]
    collector: String,
    /// The service this one calls: messages for the gateway, sessions for messages.
    #[arg(long)]
    next: Option<String>,
    /// The version this process reports.
    #[arg(long, default_value = "1.0.0")]
    version: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let service = match args.role {
        Role::Gateway => "gateway",
        Role::Messages => "messages",
        Role::Sessions => "sessions",
    };
    let _agent = sightline::init(sightline::Config {
        service: service.into(),
        version: args.version.clone(),
        collector: args.collector.clone(),
        flush_interval: Duration::from_millis(200),
        ..Default::default()
    })?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match args.role {
        Role::Gateway => {
            let next = args.next.context("--next (the messages service's URL) is required")?;
            let app = Router::new()
                .route("/send/{chat}", routing::get(send))
                .with_state(next)
                .layer(ServerLayer::new().naming(|op| (op == "GET /send/{chat}").then(|| "SendMessage".into())));
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
        }
        Role::Messages => {
            let next = args.next.context("--next (the sessions service's URL) is required")?;
            let channel = tonic::transport::Channel::from_shared(next)?.connect_lazy();
            let sessions = SessionsClient::new(
                tower::ServiceBuilder::new()
                    .layer(ClientLayer::grpc("sessions"))
                    .service(channel),
            );
            let app = Router::new()
                .route("/chats/{id}/messages", routing::post(post_message))
                .with_state(sessions)
                .layer(ServerLayer::new());
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
        }
        Role::Sessions => {
            tonic::transport::Server::builder()
                .layer(ServerLayer::new())
                .add_service(SessionsServer::new(SessionStore))
                .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
                .await?;
        }
    }
    Ok(())
}

/// gateway: forwards the message to the messages service.
async fn send(State(messages): State<String>, axum::extract::Path(chat): axum::extract::Path<u64>) -> StatusCode {
    let client = ClientLayer::new()
        .peer("messages")
        .layer(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let request = http::Request::post(format!("{messages}/chats/{chat}/messages")).body(Full::new(Bytes::new()));
    match client.oneshot(request.expect("valid request")).await {
        Ok(response) => response.status(),
        Err(_) => StatusCode::BAD_GATEWAY,
    }
}

type SessionsApi = SessionsClient<sightline::tower::ClientService<tonic::transport::Channel>>;

/// messages: session cache, session check over gRPC, then the database write.
async fn post_message(State(mut sessions): State<SessionsApi>) -> StatusCode {
    {
        let mut cache = sightline::span("GET session").client("cache", "redis").entered();
        cache.set_attribute("db.operation.name", "GET");
    }
    let check = sessions.check(CheckRequest { session: "s-1".into() }).await;
    if !check.is_ok_and(|r| r.into_inner().valid) {
        return StatusCode::UNAUTHORIZED;
    }
    let mut insert = sightline::span("INSERT messages")
        .client("db", "postgres:chat")
        .entered();
    insert.set_attribute("db.query.text", "INSERT INTO messages (chat_id, body) VALUES ($1, $2)");
    StatusCode::CREATED
}

/// sessions: looks the session up.
struct SessionStore;

#[tonic::async_trait]
impl Sessions for SessionStore {
    async fn check(
        &self,
        _request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckReply>, tonic::Status> {
        let _select = sightline::span("SELECT sessions")
            .client("db", "postgres:sessions")
            .entered();
        Ok(tonic::Response::new(CheckReply {
            valid: true,
            user: "u-7".into(),
        }))
    }
}
