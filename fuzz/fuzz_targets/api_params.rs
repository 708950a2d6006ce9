//! Arbitrary query strings through the API's parameter parsing: every parser answers a value
//! or a 4xx, never panics, and a window it accepts is ordered.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use sightline_collector::api::params;

fuzz_target!(|data: &[u8]| {
    let Ok(query) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(data) else {
        return;
    };
    let query: HashMap<String, String> = query.into_iter().collect();
    if let Ok(window) = params::parse_window(&query) {
        assert!(window.from_us < window.to_us);
        let _ = params::block_seconds(&query, &window);
    }
    let _ = params::trace_filter(&query);
    let _ = params::topology_filter(&query);
    let _ = params::service(&query);
    let _ = params::required(&query, "service");
    for (key, value) in &query {
        let _ = params::parse_time(key, value);
    }
});
