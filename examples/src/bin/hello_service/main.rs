//! A minimal axum service for overhead measurements and the gate's end-to-end test.
//!
//! `GET /users/{id}` (BT GetUser) does a little CPU work inside a db client span; `POST /orders`
//! (BT PlaceOrder) waits on a simulated database call. With `--collector`, the agent and its
//! server layer are on; without, the same service runs bare. `--db-ms` adds a simulated
//! database wait to both; `--slow-bt` with `--db-slowdown` makes one BT's database calls
//! slower, as a regression in a candidate version would. See benches/src/overhead.rs and
//! examples/tests/gate_end_to_end.rs. With `--peer`, fastrace or the OpenTelemetry SDK traces
//! it instead (peers.rs), for comparing what each costs the same service.

mod peers;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{extract::State, routing, Router};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    /// Instrument with the agent, sending to this collector.
    #[arg(long)]
    collector: Option<String>,
    /// Share of transactions whose call chain is recorded (by the agent, or the peer).
    #[arg(long, default_value_t = 1.0)]
    sampling_ratio: f64,
    /// The version this process reports.
    #[arg(long, default_value = "1.0.0")]
    service_version: String,
    /// Simulated database time per call, ms.
    #[arg(long, default_value_t = 0.0)]
    db_ms: f64,
    /// The BT whose database calls are slower (GetUser or PlaceOrder).
    #[arg(long)]
    slow_bt: Option<String>,
    /// How much slower: 1.15 = 15%.
    #[arg(long, default_value_t = 1.0)]
    db_slowdown: f64,
    /// Without the agent, a layer that does nothing, put on the router as the agent's is: what
    /// any per-route middleware costs in axum (a boxed clone of the route and a boxed future a
    /// request), apart from what the agent's own layer does.
    #[arg(long, conflicts_with = "collector")]
    identity_layer: bool,
    /// With the agent, trace each handler (`ServerLayer::handler`) instead of layering the
    /// router: no per-route boxed service.
    #[arg(long, requires = "collector")]
    traced_handlers: bool,
    /// Traced by this peer instead of the agent (its spans discarded, not exported).
    #[arg(long, value_enum, conflicts_with_all = ["collector", "identity_layer"])]
    peer: Option<peers::Peer>,
    /// Rounds of the handler's own CPU work in `GET /users/{id}` (20,000: ~20 us here): the
    /// request's weight, against which a tracer's fixed cost a request is measured.
    #[arg(long, default_value_t = 20_000)]
    work_rounds: u64,
}

struct Database {
    wait: Duration,
    slow_bt: Option<String>,
    slowdown: f64,
    /// Who makes the handler's db span: the agent (`None`) or a peer.
    tracer: Option<peers::Peer>,
    /// Rounds of CPU work a `GET /users/{id}` does.
    work_rounds: u64,
}

impl Database {
    /// A database call of `bt`, timed as a client span.
    async fn query(&self, bt: &str, statement: &'static str) {
        let factor = if self.slow_bt.as_deref() == Some(bt) {
            self.slowdown
        } else {
            1.0
        };
        let wait = self.wait.mul_f64(factor);
        if !wait.is_zero() {
            let call = sightline::span(statement).client("db", "postgres:shop").start();
            call.instrument(tokio::time::sleep(wait)).await;
        }
    }
}

async fn user(State(db): State<Arc<Database>>, axum::extract::Path(id): axum::extract::Path<u64>) -> String {
    db.query("GetUser", "SELECT users").await;
    let _lookup = peers::db_span(db.tracer, "SELECT users", "postgres:users");
    // Work standing in for a handler's own code (~20 us at the default 20,000 rounds).
    let mut x = id;
    for i in 0..db.work_rounds {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
    }
    format!("{x}")
}

async fn order(State(db): State<Arc<Database>>) -> &'static str {
    db.query("PlaceOrder", "INSERT orders").await;
    "ok"
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let database = Arc::new(Database {
        wait: Duration::from_secs_f64(args.db_ms / 1000.0),
        slow_bt: args.slow_bt.clone(),
        slowdown: args.db_slowdown,
        tracer: args.peer,
        work_rounds: args.work_rounds,
    });
    let _peer = args.peer.map(|peer| peers::start(peer, args.sampling_ratio));
    let _agent = match &args.collector {
        Some(collector) => Some(sightline::init(sightline::Config {
            service: "hello".into(),
            version: args.service_version.clone(),
            collector: collector.clone(),
            sampling_ratio: args.sampling_ratio,
            ..Default::default()
        })?),
        None => None,
    };
    let traced = sightline::tower::ServerLayer::new().naming(|operation| match operation {
        "GET /users/{id}" => Some("GetUser".into()),
        "POST /orders" => Some("PlaceOrder".into()),
        _ => None,
    });
    let app = if args.traced_handlers {
        Router::new()
            .route("/users/{id}", routing::get(traced.handler(user)))
            .route("/orders", routing::post(traced.handler(order)))
    } else {
        Router::new()
            .route("/users/{id}", routing::get(user))
            .route("/orders", routing::post(order))
    };
    let app = app.with_state(database);
    let app = if args.collector.is_some() && !args.traced_handlers {
        app.layer(traced)
    } else if let Some(peer) = args.peer {
        peers::layer(app, peer)
    } else if args.identity_layer {
        app.layer(tower::layer::util::Identity::new())
    } else {
        app
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
