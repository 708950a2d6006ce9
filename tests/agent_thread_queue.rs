//! A thread that makes spans faster than the exporter takes them: what waits for the exporter
//! stays within `queue_spans` (the rest is dropped and counted, never waited for), and spans
//! open across the drops (a request's root) still arrive whole, parent of what was kept.

use std::time::Duration;

use sightline_collector::{store, Collector};
use sightline_tests::{eventually, testing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_outrunning_the_exporter_drops_finished_spans_and_keeps_open_ones() {
    let config = testing::config("agent_thread_queue");
    let collector = Collector::start(config.clone()).await.unwrap();
    const QUEUE: usize = 1_000;
    let agent = sightline::init(sightline::Config {
        service: "importer".into(),
        collector: format!("http://{}", collector.grpc_addr),
        queue_spans: QUEUE,
        flush_interval: Duration::from_millis(50),
        ..Default::default()
    })
    .unwrap();

    // Each trace: a root held open while 20,000 children are made in a tight loop (far more
    // than the exporter takes between two of its drains). The next trace starts once this
    // one's root is stored: a finished root waits for the exporter like any span, and one
    // still waiting when the thread's next hand-off finds no room is dropped (counted), which
    // a fixed pause could not rule out on a loaded machine.
    const TRACES: u64 = 5;
    const CHILDREN: u64 = 20_000;
    let (next, go) = std::sync::mpsc::channel::<()>();
    let maker = std::thread::spawn(move || {
        for _ in 0..TRACES {
            {
                let _root = sightline::transaction("Import").operation("POST /import").entered();
                for _ in 0..CHILDREN {
                    let _row = sightline::span("parse row").entered();
                }
            }
            if go.recv().is_err() {
                break;
            }
        }
    });
    let ch = store::client(&config.clickhouse.url, &config.clickhouse.database, &config.clickhouse);
    for trace in 1..=TRACES {
        eventually(&format!("root {trace} stored"), Duration::from_secs(30), || async {
            let roots: u64 = ch
                .query("SELECT count() FROM spans WHERE service = 'importer' AND parent_span_id = 0")
                .fetch_one()
                .await
                .unwrap();
            (roots >= trace).then_some(())
        })
        .await;
        next.send(()).unwrap();
    }
    maker.join().unwrap();
    let dropped = sightline::dropped_spans();
    assert!(
        dropped > 0 && dropped < TRACES * CHILDREN,
        "the thread outran the exporter: {dropped} dropped"
    );

    #[derive(clickhouse::Row, serde::Deserialize, Debug)]
    struct Stored {
        roots: u64,
        children: u64,
        orphans: u64,
    }
    let query = "SELECT countIf(parent_span_id = 0) AS roots, countIf(parent_span_id != 0) AS children, \
                 countIf(parent_span_id != 0 AND (trace_id, parent_span_id) NOT IN \
                   (SELECT trace_id, span_id FROM spans WHERE parent_span_id = 0)) AS orphans \
                 FROM spans WHERE service = 'importer'";
    let stored = eventually("every kept span stored", Duration::from_secs(30), || async {
        let stored: Stored = ch.query(query).fetch_one().await.unwrap();
        (stored.roots + stored.children + dropped == TRACES * (CHILDREN + 1)).then_some(stored)
    })
    .await;
    assert_eq!(
        stored.roots, TRACES,
        "every root, open across the drops, arrives: {stored:?}"
    );
    assert_eq!(stored.orphans, 0, "kept children point at their root: {stored:?}");
    drop(agent);
    collector.shutdown().await.unwrap();
}
