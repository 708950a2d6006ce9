//! Query-parameter parsing shared by the API's handlers: each bad value gets its own message.

use std::collections::HashMap;

use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use super::ApiError;
use crate::query::{TopologyFilter, TraceFilter, Window};

/// The window when `from`/`to` are not given.
pub const DEFAULT_WINDOW_US: u64 = 15 * 60 * 1_000_000;
/// Bounds for any time a user sends: 2000-01-01 to 2200-01-01.
const EARLIEST_US: u64 = 946_684_800 * 1_000_000;
const LATEST_US: u64 = 7_258_118_400 * 1_000_000;
pub const MAX_LIMIT: u64 = 1000;
const DEFAULT_LIMIT: u64 = 20;
const MAX_NAME_BYTES: usize = 256;

/// A time as RFC 3339 or Unix milliseconds, in Unix microseconds.
pub fn parse_time(name: &str, value: &str) -> Result<u64, ApiError> {
    let micros = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        value.parse::<u64>().ok().and_then(|ms| ms.checked_mul(1000))
    } else {
        OffsetDateTime::parse(value, &Rfc3339)
            .ok()
            .and_then(|t| u64::try_from(t.unix_timestamp_nanos() / 1000).ok())
    };
    match micros {
        Some(us) if (EARLIEST_US..=LATEST_US).contains(&us) => Ok(us),
        Some(_) => Err(ApiError::bad_request(format!(
            "{name} is outside 2000-01-01..2200-01-01"
        ))),
        None => Err(ApiError::bad_request(format!(
            "{name} must be RFC 3339 (2024-05-01T12:00:00Z) or Unix milliseconds, got {value:?}"
        ))),
    }
}

/// `from` and `to`, defaulting to the last 15 minutes.
pub fn parse_window(params: &HashMap<String, String>) -> Result<Window, ApiError> {
    let now_us = OffsetDateTime::now_utc().unix_timestamp_nanos() as u64 / 1000;
    let to_us = params
        .get("to")
        .map(|v| parse_time("to", v))
        .transpose()?
        .unwrap_or(now_us);
    let from_us = params
        .get("from")
        .map(|v| parse_time("from", v))
        .transpose()?
        .unwrap_or(to_us.saturating_sub(DEFAULT_WINDOW_US));
    if from_us >= to_us {
        return Err(ApiError::bad_request("from must be before to"));
    }
    Ok(Window { from_us, to_us })
}

fn name(params: &HashMap<String, String>, key: &str) -> Result<Option<String>, ApiError> {
    match params.get(key) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) if v.len() > MAX_NAME_BYTES => Err(ApiError::bad_request(format!(
            "{key} is longer than {MAX_NAME_BYTES} bytes"
        ))),
        Some(v) => Ok(Some(v.clone())),
    }
}

/// A required name parameter.
pub fn required(params: &HashMap<String, String>, key: &str) -> Result<String, ApiError> {
    name(params, key)?.ok_or_else(|| ApiError::bad_request(format!("{key} is required")))
}

/// `block`: `10s` or `1m`; by default 10 s for windows up to two hours that the 10-second
/// aggregates still cover, a minute otherwise.
pub fn block_seconds(params: &HashMap<String, String>, window: &Window) -> Result<u32, ApiError> {
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let fine_from = now_us.saturating_sub(u64::from(crate::store::schema::FINE_RETENTION_DAYS) * 86_400 * 1_000_000);
    let short = window.to_us - window.from_us <= 2 * 3600 * 1_000_000;
    match params.get("block").map(String::as_str) {
        None | Some("") => Ok(if short && window.from_us >= fine_from { 10 } else { 60 }),
        Some("10s") => Ok(10),
        Some("1m" | "60s") => Ok(60),
        Some(other) => Err(ApiError::bad_request(format!("block must be 10s or 1m, got {other:?}"))),
    }
}

/// The optional `service` parameter.
pub fn service(params: &HashMap<String, String>) -> Result<Option<String>, ApiError> {
    name(params, "service")
}

pub fn topology_filter(params: &HashMap<String, String>) -> Result<TopologyFilter, ApiError> {
    Ok(TopologyFilter {
        bt: name(params, "bt")?,
        version: name(params, "version")?,
    })
}

pub fn trace_filter(params: &HashMap<String, String>) -> Result<TraceFilter, ApiError> {
    let min_duration_us = match params.get("min_duration_ms") {
        None => None,
        Some(v) => match v.parse::<f64>() {
            Ok(ms) if ms.is_finite() && ms >= 0.0 => Some((ms * 1000.0).round() as u64),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "min_duration_ms must be a non-negative number, got {v:?}"
                )))
            }
        },
    };
    let error = match params.get("error").map(String::as_str) {
        None | Some("") => None,
        Some("true" | "1") => Some(true),
        Some("false" | "0") => Some(false),
        Some(v) => return Err(ApiError::bad_request(format!("error must be true or false, got {v:?}"))),
    };
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "limit must be 1..={MAX_LIMIT}, got {v:?}"
                )))
            }
        },
    };
    Ok(TraceFilter {
        service: name(params, "service")?,
        bt: name(params, "bt")?,
        min_duration_us,
        error,
        limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_ten_seconds_for_short_recent_windows_and_a_minute_otherwise() {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        let hour = 3600 * 1_000_000;
        let none = HashMap::new();
        let window = |from_us: u64, to_us: u64| Window { from_us, to_us };
        assert_eq!(block_seconds(&none, &window(now_us - hour, now_us)).unwrap(), 10);
        assert_eq!(block_seconds(&none, &window(now_us - 5 * hour, now_us)).unwrap(), 60);
        // Older than the 10-second aggregates are kept.
        assert_eq!(
            block_seconds(&none, &window(now_us - 100 * hour, now_us - 99 * hour)).unwrap(),
            60
        );
        let asked = HashMap::from([("block".to_string(), "1m".to_string())]);
        assert_eq!(block_seconds(&asked, &window(now_us - hour, now_us)).unwrap(), 60);
    }

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn times_are_rfc3339_or_unix_millis() {
        assert_eq!(parse_time("from", "1700000000000").unwrap(), 1_700_000_000_000_000);
        assert_eq!(
            parse_time("from", "2023-11-14T22:13:20Z").unwrap(),
            1_700_000_000_000_000
        );
        assert_eq!(
            parse_time("from", "2023-11-14T23:13:20.5+01:00").unwrap(),
            1_700_000_000_500_000
        );
        for bad in [
            "yesterday",
            "",
            "1e12",
            "2023-13-01T00:00:00Z",
            "5",
            "'; DROP TABLE spans; --",
        ] {
            assert!(parse_time("from", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn window_defaults_and_order() {
        let w = parse_window(&params(&[("to", "1700000000000")])).unwrap();
        assert_eq!(w.to_us - w.from_us, DEFAULT_WINDOW_US);
        assert!(parse_window(&params(&[("from", "1700000000000"), ("to", "1600000000000")])).is_err());
    }

    #[test]
    fn filters_are_checked() {
        let f = trace_filter(&params(&[
            ("service", "auth"),
            ("min_duration_ms", "1.5"),
            ("error", "true"),
            ("limit", "5"),
        ]))
        .unwrap();
        assert_eq!(
            (f.service.as_deref(), f.min_duration_us, f.error, f.limit),
            (Some("auth"), Some(1500), Some(true), 5)
        );
        for bad in [
            ("min_duration_ms", "-1"),
            ("min_duration_ms", "NaN"),
            ("error", "maybe"),
            ("limit", "0"),
            ("limit", "100000"),
        ] {
            assert!(trace_filter(&params(&[bad])).is_err(), "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Any text in any parameter is a value or a 400, never a panic; an accepted window is
        /// ordered.
        #[test]
        fn any_parameter_text_is_parsed_or_refused(from in "\\PC{0,24}", to in "\\PC{0,24}", other in "\\PC{0,300}") {
            let _ = parse_time("from", &from);
            let query = params(&[("from", &from), ("to", &to), ("limit", &other), ("min_duration_ms", &other), ("error", &other), ("block", &other), ("service", &other)]);
            if let Ok(window) = parse_window(&query) {
                proptest::prop_assert!(window.from_us < window.to_us);
                let _ = block_seconds(&query, &window);
            }
            let _ = trace_filter(&query);
            let _ = topology_filter(&query);
            let _ = service(&query);
        }
    }
}
