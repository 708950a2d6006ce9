//! One service of `sightline demo`'s chat / customer-service app, chosen by `--role`:
//!
//! - `gateway`: the entry point. `POST /login` (BT Login) calls auth, `POST
//!   /chats/{id}/messages` (SendMessage) calls messages, `POST /chats/{id}/accept` (AcceptChat)
//!   calls the agent workspace, round-robin over every `--workspace` instance (a canary beside
//!   production).
//! - `auth`: reads the session from its cache (redis:sessions), the user from its database on a
//!   miss. `POST /admin/stall?seconds=N` makes the cache hang for N seconds (0 ends it); calls
//!   give up after `--cache-timeout-ms` with an error, as a pooled client would.
//! - `messages`: stores the message (postgres:chat) and pushes it to the external push API.
//! - `workspace`: the agent workspace; accepting a chat updates it in the database. With
//!   `--db-lock-ms` the update waits on a lock first (the 1.5.0 regression).
//! - `push-provider`: the external push API, not instrumented (it shows up as an external node).
//!
//! Databases and caches are simulated by waits inside client spans: what the demo shows is the
//! agent's view of them, which is the same as for a real client library.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use axum::{
    extract::{Query, State},
    http::StatusCode,
    routing, Router,
};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rand::Rng;
use sightline::tower::{ClientLayer, ServerLayer};
use tower::{Layer, ServiceExt};

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Role {
    Gateway,
    Auth,
    Messages,
    Workspace,
    PushProvider,
}

#[derive(Parser)]
#[command(about = "A service of the Sightline demo's chat app")]
struct Args {
    #[arg(long, value_enum)]
    role: Role,
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Sightline collector (gRPC).
    #[arg(long, default_value = "http://127.0.0.1:4317")]
    collector: String,
    /// The version this process reports.
    #[arg(long, default_value = "1.0.0")]
    version: String,
    /// gateway: the auth service's URL.
    #[arg(long)]
    auth: Option<String>,
    /// gateway: the messages service's URL.
    #[arg(long)]
    messages: Option<String>,
    /// gateway: a workspace instance's URL (repeat for several).
    #[arg(long)]
    workspace: Vec<String>,
    /// messages: the push API's URL.
    #[arg(long)]
    push: Option<String>,
    /// auth: how long a cache call waits before giving up.
    #[arg(long, default_value_t = 8000)]
    cache_timeout_ms: u64,
    /// workspace: extra wait on a row lock inside the database update.
    #[arg(long, default_value_t = 0)]
    db_lock_ms: u64,
}

#[derive(Clone)]
struct Downstreams {
    auth: String,
    messages: String,
    workspaces: Arc<Vec<String>>,
    next_workspace: Arc<AtomicUsize>,
}

/// auth's session cache: stalled until this Unix ms (0: healthy).
#[derive(Clone)]
struct Cache {
    stalled_until_ms: Arc<AtomicU64>,
    timeout: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    if args.role == Role::PushProvider {
        let app = Router::new().route(
            "/v1/push",
            routing::post(|| async {
                wait(3.0).await;
                StatusCode::ACCEPTED
            }),
        );
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
        return Ok(());
    }
    let service = match args.role {
        Role::Gateway => "gateway",
        Role::Auth => "auth",
        Role::Messages => "messages",
        Role::Workspace => "workspace",
        Role::PushProvider => unreachable!("handled above"),
    };
    let _agent = sightline::init(sightline::Config {
        service: service.into(),
        version: args.version.clone(),
        collector: args.collector.clone(),
        flush_interval: Duration::from_millis(500),
        ..Default::default()
    })?;
    let app = match args.role {
        Role::Gateway => {
            let downstreams = Downstreams {
                auth: args.auth.context("--auth is required")?,
                messages: args.messages.context("--messages is required")?,
                workspaces: Arc::new(args.workspace),
                next_workspace: Arc::default(),
            };
            anyhow::ensure!(!downstreams.workspaces.is_empty(), "--workspace is required");
            Router::new()
                .route("/login", routing::post(login))
                .route("/chats/{id}/messages", routing::post(send_message))
                .route("/chats/{id}/accept", routing::post(accept_chat))
                .with_state(downstreams)
                .layer(ServerLayer::new().naming(|operation| {
                    Some(
                        match operation {
                            "POST /login" => "Login",
                            "POST /chats/{id}/messages" => "SendMessage",
                            "POST /chats/{id}/accept" => "AcceptChat",
                            _ => return None,
                        }
                        .into(),
                    )
                }))
        }
        Role::Auth => {
            let cache = Cache {
                stalled_until_ms: Arc::default(),
                timeout: Duration::from_millis(args.cache_timeout_ms),
            };
            let admin = Router::new()
                .route("/admin/stall", routing::post(stall))
                .with_state(cache.clone());
            Router::new()
                .route("/sessions", routing::post(authenticate))
                .with_state(cache)
                .layer(ServerLayer::new())
                .merge(admin)
        }
        Role::Messages => {
            let push = args.push.context("--push is required")?;
            Router::new()
                .route("/chats/{id}/messages", routing::post(store_message))
                .with_state(push)
                .layer(ServerLayer::new())
        }
        Role::Workspace => Router::new()
            .route("/chats/{id}/accept", routing::post(accept))
            .with_state(args.db_lock_ms)
            .layer(ServerLayer::new()),
        Role::PushProvider => unreachable!("handled above"),
    };
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

/// Waits around `mean_ms`: a lognormal spread, as real calls have.
async fn wait(mean_ms: f64) {
    let factor = (rand::rng().random_range(-0.5..0.5f64) + rand::rng().random_range(-0.5..0.5f64)).exp();
    tokio::time::sleep(Duration::from_secs_f64(mean_ms * factor / 1000.0)).await;
}

/// A POST to another service through the agent's client layer (a client span, context
/// injected).
async fn post(peer: &'static str, url: String) -> StatusCode {
    let client = ClientLayer::new()
        .peer(peer)
        .layer(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let request = http::Request::post(url)
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    match client.oneshot(request).await {
        Ok(response) => response.status(),
        Err(_) => StatusCode::BAD_GATEWAY,
    }
}

/// A simulated database or cache call: a client span around a wait.
async fn call(operation: &'static str, component: &'static str, peer: &'static str, mean_ms: f64) {
    let span = sightline::span(operation).client(component, peer).start();
    wait(mean_ms).await;
    drop(span);
}

async fn login(State(d): State<Downstreams>) -> StatusCode {
    wait(0.5).await;
    post("auth", format!("{}/sessions", d.auth)).await
}

async fn send_message(State(d): State<Downstreams>, axum::extract::Path(chat): axum::extract::Path<u64>) -> StatusCode {
    post("messages", format!("{}/chats/{chat}/messages", d.messages)).await
}

async fn accept_chat(State(d): State<Downstreams>, axum::extract::Path(chat): axum::extract::Path<u64>) -> StatusCode {
    let i = d.next_workspace.fetch_add(1, Ordering::Relaxed) % d.workspaces.len();
    post("workspace", format!("{}/chats/{chat}/accept", d.workspaces[i])).await
}

#[derive(serde::Deserialize)]
struct StallParams {
    seconds: u64,
}

/// auth's admin switch: the session cache hangs for `seconds` from now.
async fn stall(State(cache): State<Cache>, Query(p): Query<StallParams>) -> StatusCode {
    let until = if p.seconds == 0 { 0 } else { now_ms() + p.seconds * 1000 };
    cache.stalled_until_ms.store(until, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// auth: session from the cache; the user from the database on a miss.
async fn authenticate(State(cache): State<Cache>) -> StatusCode {
    let mut get = sightline::span("GET session").client("cache", "redis:sessions").start();
    get.set_attribute("db.operation.name", "GET");
    let stalled_until = cache.stalled_until_ms.load(Ordering::Relaxed);
    if stalled_until > now_ms() {
        // The cache does not answer: the call hangs until the client's timeout.
        tokio::time::sleep(cache.timeout).await;
        get.set_error(
            "timeout",
            format!("redis GET timed out after {} ms", cache.timeout.as_millis()),
        );
        drop(get);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    wait(1.0).await;
    drop(get);
    if rand::rng().random_bool(0.2) {
        call("SELECT users", "db", "postgres:users", 4.0).await;
        call("SET session", "cache", "redis:sessions", 1.0).await;
    }
    StatusCode::OK
}

/// messages: store, then push to the recipient's devices.
async fn store_message(State(push): State<String>) -> StatusCode {
    call("INSERT messages", "db", "postgres:chat", 3.0).await;
    match post("push.example.com", format!("{push}/v1/push")).await {
        s if s.is_success() => StatusCode::CREATED,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// workspace: assign the chat to the agent.
async fn accept(State(db_lock_ms): State<u64>) -> StatusCode {
    wait(1.0).await;
    let update = sightline::span("UPDATE chats").client("db", "postgres:chat").start();
    if db_lock_ms > 0 {
        // 1.5.0's migration left a lock on the chats row: every accept waits on it.
        wait(db_lock_ms as f64).await;
    }
    wait(5.0).await;
    drop(update);
    StatusCode::OK
}
