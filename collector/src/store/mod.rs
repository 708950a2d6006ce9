//! ClickHouse and the way in: the private server launcher, the schema, the spool (files and
//! the appender thread that owns them) and the writer that takes batches from the spool into
//! ClickHouse. Reads go through `crate::query`.

pub mod appender;
pub mod launcher;
pub mod retention;
pub mod rows;
pub mod schema;
pub mod spool;
pub mod writer;

use clickhouse::{Client, Compression};

use crate::config::ClickHouseConfig;

/// A client for `url` and `database`, set up for every server generation Sightline supports:
/// no schema validation (18.16 does not know the setting and format it needs) and values bound
/// client-side with `?`. Inserts are LZ4-compressed only when the server is remote: on
/// loopback compression costs both sides CPU and saves nothing.
pub fn client(url: &str, database: &str, config: &ClickHouseConfig) -> Client {
    with_settings(Client::default(), url, database, config)
}

fn with_settings(client: Client, url: &str, database: &str, config: &ClickHouseConfig) -> Client {
    let compression = if is_loopback(url) {
        Compression::None
    } else {
        Compression::Lz4
    };
    client
        .with_compression(compression)
        .with_url(url)
        .with_database(database)
        .with_user(&config.user)
        .with_password(&config.password)
        .with_validation(false)
}

/// [`client`] for the writer: a connection per INSERT, none kept idle. ClickHouse's graceful
/// stop waits `shutdown_wait_unfinished` (5 s) for open connections, serving new requests on
/// them meanwhile, then exits in the middle of whatever INSERT runs; an INSERT cut between its
/// views leaves rows without their ledger row, and its retry writes them twice. Without idle
/// connections, an INSERT cannot start once the stop began (connects are refused) and one
/// already running has those seconds to finish.
pub fn writer_client(url: &str, database: &str, config: &ClickHouseConfig) -> Client {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
    with_settings(Client::with_http_client(http), url, database, config)
}

fn is_loopback(url: &str) -> bool {
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split(['/', '@'])
        .find(|p| !p.is_empty())
        .unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    host == "localhost" || host == "[::1]" || host.starts_with("127.")
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_urls() {
        for url in [
            "http://127.0.0.1:8123",
            "http://localhost:8123/",
            "http://[::1]:8123",
            "http://127.0.0.5",
        ] {
            assert!(super::is_loopback(url), "{url}");
        }
        for url in [
            "http://clickhouse:8123",
            "https://ch.example.com",
            "http://10.0.0.1:8123",
        ] {
            assert!(!super::is_loopback(url), "{url}");
        }
    }
}
