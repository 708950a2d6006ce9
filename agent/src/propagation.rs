//! W3C Trace Context (`traceparent`) and Baggage (`baggage`) for any carrier.
//!
//! Besides the trace, the baggage carries the business transaction (`bt`) and the caller's
//! service and operation (`sl.caller`, `sl.caller_op`), so the next service's entry span knows
//! which BT it serves and which edge of the topology it is, without a join.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

use crate::{
    agent,
    span::{self, Current, Span},
};

/// The W3C Trace Context header: trace id, parent span id, sampled flag.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C Baggage header: Sightline puts the BT and the caller's service and operation here.
pub const BAGGAGE: &str = "baggage";
const BT_KEY: &str = "bt";
const CALLER_KEY: &str = "sl.caller";
const CALLER_OP_KEY: &str = "sl.caller_op";

/// Characters a baggage value may not carry unencoded.
const BAGGAGE_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b',')
    .add(b';')
    .add(b'\\')
    .add(b'%')
    .add(b'=');

/// What arrived from the calling service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteContext {
    /// The trace this service's work continues.
    pub trace_id: u128,
    /// The caller's span (its client span) that this service's entry span is a child of.
    pub parent_span_id: u64,
    /// Whether the caller records this trace; followed, so a trace is whole or absent.
    pub sampled: bool,
    /// The business transaction the caller serves (baggage `bt`).
    pub bt: Option<String>,
    /// The calling service (baggage `sl.caller`): one side of a topology edge.
    pub caller_service: Option<String>,
    /// The caller's entry operation (baggage `sl.caller_op`).
    pub caller_operation: Option<String>,
}

/// Reads `traceparent` and `baggage` through `get` (header lookup, metadata lookup, ...).
/// `None` when there is no valid `traceparent`.
pub fn extract<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<RemoteContext> {
    let parent = get(TRACEPARENT)?.trim();
    let mut parts = parent.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace_id = u128::from_str_radix(trace, 16).ok().filter(|&t| t != 0)?;
    let parent_span_id = u64::from_str_radix(span, 16).ok().filter(|&s| s != 0)?;
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    let mut remote = RemoteContext {
        trace_id,
        parent_span_id,
        sampled,
        bt: None,
        caller_service: None,
        caller_operation: None,
    };
    for member in get(BAGGAGE).unwrap_or("").split(',') {
        let Some((key, value)) = member.split(';').next().and_then(|kv| kv.split_once('=')) else {
            continue;
        };
        let value = percent_decode_str(value.trim()).decode_utf8_lossy().into_owned();
        match key.trim() {
            BT_KEY => remote.bt = Some(value),
            CALLER_KEY => remote.caller_service = Some(value),
            CALLER_OP_KEY => remote.caller_operation = Some(value),
            _ => {}
        }
    }
    Some(remote)
}

/// Writes `traceparent` and `baggage` for the current span through `set`. Does nothing outside
/// a span.
pub fn inject(set: impl FnMut(&'static str, String)) {
    if let Some(current) = span::current_context() {
        write(&current, set);
    }
}

/// Writes `traceparent` and `baggage` naming `span` as the parent: for a client span that is
/// not (or not yet) current, such as a call made by a middleware.
pub fn inject_from(span: &Span, set: impl FnMut(&'static str, String)) {
    if let Some(current) = span.current() {
        write(&current, set);
    }
}

fn write(current: &Current, mut set: impl FnMut(&'static str, String)) {
    let flags = if current.trace.sampled { "01" } else { "00" };
    set(
        TRACEPARENT,
        format!("00-{:032x}-{:016x}-{flags}", current.trace.trace_id, current.span_id),
    );
    let encode = |v: &str| utf8_percent_encode(v, BAGGAGE_VALUE).to_string();
    let mut baggage = format!("{BT_KEY}={}", encode(&current.trace.bt));
    if let Some(agent) = agent::get() {
        baggage.push_str(&format!(",{CALLER_KEY}={}", encode(agent.service())));
    }
    baggage.push_str(&format!(",{CALLER_OP_KEY}={}", encode(&current.trace.entry_operation)));
    set(BAGGAGE, baggage);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_traceparent_and_sightline_baggage() {
        let headers = [
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            (
                "baggage",
                "other=1, bt=Accept%20Chat;prop=x, sl.caller=gateway,sl.caller_op=POST%20%2Fchat",
            ),
        ];
        let get = |k: &str| headers.iter().find(|(h, _)| *h == k).map(|(_, v)| *v);
        let remote = extract(get).unwrap();
        assert_eq!(remote.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(remote.parent_span_id, 0xb7ad6b7169203331);
        assert!(remote.sampled);
        assert_eq!(remote.bt.as_deref(), Some("Accept Chat"));
        assert_eq!(remote.caller_service.as_deref(), Some("gateway"));
        assert_eq!(remote.caller_operation.as_deref(), Some("POST /chat"));
    }

    #[test]
    fn refuses_malformed_traceparents() {
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            "garbage",
        ] {
            assert_eq!(extract(|k| (k == TRACEPARENT).then_some(bad)), None, "{bad}");
        }
    }
}
