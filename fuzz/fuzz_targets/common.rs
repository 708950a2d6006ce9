//! One pipeline per fuzzing process, as the collector builds it, with a real spool in a
//! temporary folder (bounded: once full, batches are refused after every step but the write).

use std::sync::{Arc, OnceLock};

use sightline_collector::{
    auth::Token,
    config::{EdgesConfig, Limits, SpoolConfig},
    metrics::Metrics,
    pipeline::Pipeline,
    store::appender::{self, SpoolFeed},
};

pub fn pipeline() -> &'static Pipeline {
    static PIPELINE: OnceLock<(Pipeline, SpoolFeed, tempfile::TempDir)> = OnceLock::new();
    &PIPELINE
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temporary folder");
            let metrics = Arc::new(Metrics::new());
            let config = SpoolConfig {
                max_bytes: 64 << 20,
                ..SpoolConfig::default()
            };
            let (spool, feed) = appender::start(dir.path(), &config, 1024, metrics.clone()).expect("spool");
            let pipeline = Pipeline::new(
                Limits::default(),
                &EdgesConfig::default(),
                metrics,
                spool,
                Token::default(),
            );
            (pipeline, feed, dir)
        })
        .0
}
