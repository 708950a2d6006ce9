//! Checks every receiver applies to a span's times, whatever the protocol.

use crate::config::Limits;

/// Spans earlier than 2000-01-01 are clock errors, not data.
const EARLIEST_START_NS: u64 = 946_684_800 * 1_000_000_000;

/// The accepted time range for one request.
pub struct TimeBounds {
    latest_start_ns: u64,
    max_duration_ns: u64,
}

impl TimeBounds {
    pub fn new(limits: &Limits, now_ns: u64) -> Self {
        Self {
            latest_start_ns: now_ns.saturating_add(limits.max_future_skew_secs * 1_000_000_000),
            max_duration_ns: limits.max_duration_secs.saturating_mul(1_000_000_000),
        }
    }

    /// Ok, or the rejection reason (a metric label) and a message for the sender.
    pub fn check(&self, span_id: u64, start_ns: u64, end_ns: u64) -> Result<(), (&'static str, String)> {
        if end_ns < start_ns {
            return Err((
                "end_before_start",
                format!("span {span_id:016x} ends ({end_ns}) before it starts ({start_ns})"),
            ));
        }
        if !(EARLIEST_START_NS..=self.latest_start_ns).contains(&start_ns) {
            return Err((
                "timestamp_out_of_range",
                format!("span {span_id:016x} starts at {start_ns} ns since 1970, outside the accepted range"),
            ));
        }
        if end_ns - start_ns > self.max_duration_ns {
            return Err((
                "duration_too_long",
                format!(
                    "span {span_id:016x} lasts {} s, more than {} s",
                    (end_ns - start_ns) / 1_000_000_000,
                    self.max_duration_ns / 1_000_000_000
                ),
            ));
        }
        Ok(())
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, counting each cut.
pub fn bound(mut s: String, max: usize, truncated: &mut u64) -> String {
    if s.len() > max {
        let cut = (0..=max).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(cut);
        *truncated += 1;
    }
    s
}
