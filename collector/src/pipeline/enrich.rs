//! Business transactions for spans that arrive without one.
//!
//! A span carries its BT when the entry service named it (`sightline.bt`) or propagated it in
//! baggage (`bt`, copied onto spans by the SDK's baggage span processor). Any other span takes
//! the BT of its nearest ancestor in the same request, and a span with no ancestor here (the
//! service's entry point) is named after its own operation.

use std::collections::HashMap;

use crate::model::Span;

/// Parent chains longer than this are cut (and malformed cycles end).
const MAX_DEPTH: usize = 64;

pub fn fill_business_transactions(spans: &mut [Span]) {
    if spans.iter().all(|s| !s.bt.is_empty()) {
        return;
    }
    let index: HashMap<(&[u8; 16], u64), usize> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| ((&s.trace_id, s.span_id), i))
        .collect();
    let mut resolved: Vec<Option<String>> = spans.iter().map(|s| (!s.bt.is_empty()).then(|| s.bt.clone())).collect();
    for start in 0..spans.len() {
        if resolved[start].is_some() {
            continue;
        }
        // Walk up to the nearest span that knows its BT, or to the local root.
        let mut chain = vec![start];
        let mut current = start;
        let bt = loop {
            if let Some(bt) = &resolved[current] {
                break bt.clone();
            }
            let span = &spans[current];
            match index.get(&(&span.trace_id, span.parent_span_id)) {
                Some(&parent) if span.parent_span_id != 0 && chain.len() < MAX_DEPTH && !chain.contains(&parent) => {
                    chain.push(parent);
                    current = parent;
                }
                _ => break span.operation.clone(),
            }
        };
        for i in chain {
            resolved[i] = Some(bt.clone());
        }
    }
    drop(index);
    for (span, bt) in spans.iter_mut().zip(resolved) {
        if span.bt.is_empty() {
            span.bt = bt.unwrap_or_default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: u64, parent: u64, operation: &str, bt: &str) -> Span {
        Span {
            trace_id: [1; 16],
            span_id: id,
            parent_span_id: parent,
            operation: operation.into(),
            bt: bt.into(),
            ..Span::default()
        }
    }

    #[test]
    fn children_inherit_and_entries_name_themselves() {
        let mut spans = vec![
            span(3, 2, "SELECT users", ""),
            span(2, 1, "GET session", ""),
            span(1, 0, "POST /login", "Login"),
            span(10, 99, "GET /inbox", ""), // entry of a downstream service, parent elsewhere
            span(11, 10, "SELECT messages", ""),
            span(20, 21, "loop a", ""), // a cycle must end
            span(21, 20, "loop b", ""),
        ];
        fill_business_transactions(&mut spans);
        let bts: Vec<_> = spans.iter().map(|s| s.bt.as_str()).collect();
        assert_eq!(bts[..5], ["Login", "Login", "Login", "GET /inbox", "GET /inbox"]);
        assert!(spans[5].bt.starts_with("loop") && spans[6].bt.starts_with("loop"));
    }
}
