//! At 1% sampling only about 1% of call chains are stored, but the per-BT request and error
//! counts in the collector's latency aggregates equal what was sent, exactly.

use std::time::Duration;

use sightline_collector::{store, Collector};
use sightline_tests::{eventually, testing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn red_counts_are_exact_at_one_percent_sampling() {
    let config = testing::config("agent_sampling");
    let collector = Collector::start(config.clone()).await.unwrap();
    let agent = sightline::init(sightline::Config {
        service: "messages".into(),
        version: "2.0.0".into(),
        collector: format!("http://{}", collector.grpc_addr),
        sampling_ratio: 0.01,
        flush_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .unwrap();

    const REQUESTS: u64 = 20_000;
    let mut errors = 0;
    for i in 0..REQUESTS {
        // Bursts of 1000 requests as fast as the loop goes, then 1 ms: still ~500k requests/s,
        // but no longer a spin that starves the exporter thread of the 2 cores.
        if i % 1000 == 999 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut request = sightline::transaction("SendMessage")
            .operation("POST /messages")
            .entered();
        {
            let _insert = sightline::span("INSERT messages")
                .client("db", "postgres:chat")
                .entered();
        }
        if i % 37 == 0 {
            request.set_error("Conflict", "duplicate message id");
            errors += 1;
        }
    }

    let ch = store::client(&config.clickhouse.url, &config.clickhouse.database, &config.clickhouse);
    #[derive(clickhouse::Row, serde::Deserialize, Debug, PartialEq)]
    struct Red {
        calls: u64,
        errors: u64,
    }
    let red = eventually("all requests counted", Duration::from_secs(30), || async {
        let red: Red = ch
            .query("SELECT sum(calls) AS calls, sum(errors) AS errors FROM latency_1m WHERE bt = 'SendMessage' AND kind = 'server'")
            .fetch_one()
            .await
            .unwrap();
        if red.calls != REQUESTS {
            eprintln!("counted {red:?}, agent dropped {}", sightline::dropped_spans());
        }
        (red.calls == REQUESTS).then_some(red)
    })
    .await;
    assert_eq!(
        red,
        Red {
            calls: REQUESTS,
            errors
        }
    );
    // The database calls too, each request's one (folded by the request's thread when its
    // trace is not sampled, agent/src/red.rs).
    let db_calls = eventually("all database calls counted", Duration::from_secs(30), || async {
        let calls: u64 = ch
            .query("SELECT sum(calls) FROM latency_1m WHERE bt = 'SendMessage' AND kind = 'client' AND operation = 'INSERT messages'")
            .fetch_one()
            .await
            .unwrap();
        (calls >= REQUESTS).then_some(calls)
    })
    .await;
    assert_eq!(db_calls, REQUESTS);
    // Spans and latency rows are separate INSERTs: wait for the sampled chains to land too.
    let (stored, db_spans) = eventually("the sampled call chains", Duration::from_secs(20), || async {
        let count = |kind: &'static str| {
            ch.query("SELECT count() FROM spans WHERE bt = 'SendMessage' AND kind = ?")
                .bind(kind)
                .fetch_one::<u64>()
        };
        let (stored, db_spans) = (count("server").await.unwrap(), count("client").await.unwrap());
        // 1% of 20,000 is 200; a binomial's 5 standard deviations either side is about +-70.
        ((130..=270).contains(&stored) && db_spans == stored).then_some((stored, db_spans))
    })
    .await;
    assert_eq!(db_spans, stored, "children follow their root's sampling decision");
    assert_eq!(sightline::dropped_spans(), 0);
    drop(agent);
    collector.shutdown().await.unwrap();
}
