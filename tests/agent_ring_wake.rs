//! The exporter wakes seldom (once a flush interval: each wake-up costs the service CPU), yet a
//! thread that fills its ring faster than that wakes it early: with a flush interval far longer
//! than the test, a busy thread's spans are drained as they come, none dropped, and all of them
//! arrive at the flush on shutdown.

use std::time::Duration;

use sightline_collector::{store, Collector};
use sightline_tests::{eventually, testing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_filling_its_ring_is_drained_before_the_flush() {
    let config = testing::config("agent_ring_wake");
    let collector = Collector::start(config.clone()).await.unwrap();
    // 40 traces of 500 spans: 20,000 spans, two and a half times what the ring holds.
    const QUEUE: usize = 8_192;
    const TRACES: u64 = 40;
    const SPANS: u64 = 500;
    let agent = sightline::init(sightline::Config {
        service: "ingester".into(),
        collector: format!("http://{}", collector.grpc_addr),
        queue_spans: QUEUE,
        flush_interval: Duration::from_secs(600),
        ..Default::default()
    })
    .unwrap();

    std::thread::spawn(|| {
        for _ in 0..TRACES {
            {
                let _root = sightline::transaction("Ingest").operation("POST /ingest").entered();
                for _ in 1..SPANS {
                    let _row = sightline::span("parse row").entered();
                }
            }
            // Time for the exporter, which nothing but the filling ring wakes before the
            // flush (10 minutes away).
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .join()
    .unwrap();
    assert_eq!(
        sightline::dropped_spans(),
        0,
        "the exporter drained the ring as it filled"
    );

    // Shutting the agent down flushes what it drained.
    tokio::task::spawn_blocking(move || drop(agent)).await.unwrap();
    let ch = store::client(&config.clickhouse.url, &config.clickhouse.database, &config.clickhouse);
    eventually("every span stored", Duration::from_secs(30), || async {
        let stored: u64 = ch
            .query("SELECT count() FROM spans WHERE service = 'ingester'")
            .fetch_one()
            .await
            .unwrap();
        (stored == TRACES * SPANS).then_some(())
    })
    .await;
    collector.shutdown().await.unwrap();
}
