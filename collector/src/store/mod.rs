//! ClickHouse: the private server launcher, the schema, and the writer that owns rows on their
//! way in. Reads go through `crate::query`.

pub mod launcher;
pub mod rows;
pub mod schema;
pub mod writer;

use clickhouse::Client;

use crate::config::ClickHouseConfig;

/// A client for `url` and `database`, set up for every server generation Sightline supports:
/// no schema validation (18.16 does not know the setting and format it needs) and values bound
/// client-side with `?`.
pub fn client(url: &str, database: &str, config: &ClickHouseConfig) -> Client {
    Client::default()
        .with_url(url)
        .with_database(database)
        .with_user(&config.user)
        .with_password(&config.password)
        .with_validation(false)
}
