//! Helpers for tests of the collector and of things built on it: one private ClickHouse server
//! per test process (started on first use, killed with the process), one database per test.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU32, Ordering},
        OnceLock,
    },
};

use crate::{config::Config, store::launcher::ClickHouseServer};

static SERVER: OnceLock<ClickHouseServer> = OnceLock::new();
static DATABASES: AtomicU32 = AtomicU32::new(0);

/// The test process's ClickHouse server. Panics with the launcher's message when none can run.
pub fn clickhouse() -> &'static ClickHouseServer {
    SERVER.get_or_init(|| {
        let root = std::env::temp_dir().join("sightline-tests");
        remove_stale_dirs(&root);
        let dir = root.join(format!("clickhouse-{}", std::process::id()));
        // Every query logged: tests check which queries the API ran (tests/api_queries.rs).
        ClickHouseServer::start_logging_queries(&dir, "")
            .unwrap_or_else(|e| panic!("cannot start test ClickHouse: {e:#}"))
    })
}

/// A database name no other test in this process uses.
pub fn fresh_database(prefix: &str) -> String {
    let clean: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(40)
        .collect();
    format!("t_{clean}_{}", DATABASES.fetch_add(1, Ordering::Relaxed))
}

/// A collector config for tests: the shared server, a fresh database, its own spool folder
/// (removed with the test process's folder), ports chosen by the OS, and short flush
/// intervals.
pub fn config(test_name: &str) -> Config {
    let mut config = Config::default();
    let server = clickhouse();
    config.clickhouse.url = server.url();
    config.clickhouse.database = fresh_database(test_name);
    config.data_dir = server.data_dir().join("collectors").join(&config.clickhouse.database);
    config.receivers.grpc_listen = ([127, 0, 0, 1], 0).into();
    config.receivers.http_listen = ([127, 0, 0, 1], 0).into();
    config.api.listen = ([127, 0, 0, 1], 0).into();
    config.writer.flush_interval_ms = 100;
    config
}

/// Data folders of test processes that are gone (killed before they could clean up).
fn remove_stale_dirs(root: &PathBuf) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("clickhouse-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
