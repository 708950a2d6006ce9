//! A minimal axum service for overhead measurements: `GET /users/{id}` does a little CPU work
//! inside a child span. With `--collector`, the agent and its server layer are on; without,
//! the same service runs bare. See benches/src/overhead.rs.

use std::net::SocketAddr;

use axum::{routing, Router};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    /// Instrument with the agent, sending to this collector.
    #[arg(long)]
    collector: Option<String>,
    /// Share of transactions whose call chain is recorded.
    #[arg(long, default_value_t = 1.0)]
    sampling_ratio: f64,
}

async fn user(axum::extract::Path(id): axum::extract::Path<u64>) -> String {
    let _lookup = sightline::span("SELECT users").client("db", "postgres:users").entered();
    // ~20 us of work standing in for a handler's own code.
    let mut x = id;
    for i in 0..20_000u64 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
    }
    format!("{x}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = Router::new().route("/users/{id}", routing::get(user));
    let _agent = match &args.collector {
        Some(collector) => Some(sightline::init(sightline::Config {
            service: "hello".into(),
            collector: collector.clone(),
            sampling_ratio: args.sampling_ratio,
            ..Default::default()
        })?),
        None => None,
    };
    let app = if args.collector.is_some() {
        app.layer(sightline::tower::ServerLayer::new())
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
