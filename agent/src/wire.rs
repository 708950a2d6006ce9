//! The native stream's batches, encoded straight from the threads' span records into message
//! bytes.
//!
//! The exporter writes each sampled span here as it takes it from a thread ([`write_span`]);
//! those bytes are what it holds until the collector acknowledges them, and what every send of
//! the batch shares ([`batch_message`]). Building a `sightline.v1.Span` struct per span (its trace id, attribute and message
//! vectors), encoding it and dropping it was most of the exporter's work
//! (`benches/scripts/instructions-per-request.sh`). Spans are written here field by field with
//! prost's encoding functions, in the layout of `proto/sightline/v1/agent.proto`; the rest of a
//! batch (resource, histograms, new strings) goes through the generated types. Protobuf
//! readers take fields in any order, so a batch's new strings follow the spans that named them.
//! A test decodes what is written here with the generated types.

use prost::{
    bytes::{Buf, BufMut, Bytes},
    encoding::{self, encode_key, encode_varint, encoded_len_varint, key_len, DecodeContext, WireType},
    DecodeError, Message,
};

/// Bytes of a message encoded ahead, sent as they are (tonic's prost codec copies them into its
/// frame). A batch's spans are shared with its pending copy, not copied into the message.
#[derive(Debug, Default, Clone)]
pub(crate) struct Encoded {
    /// The message's start: for a batch, `AgentMessage.batch`'s key and length.
    head: Vec<u8>,
    spans: Bytes,
    tail: Vec<u8>,
}

impl Encoded {
    /// A message built with the generated types.
    pub(crate) fn of(message: &impl Message) -> Self {
        Self {
            tail: message.encode_to_vec(),
            ..Self::default()
        }
    }
}

impl Message for Encoded {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.head);
        buf.put_slice(&self.spans);
        buf.put_slice(&self.tail);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        // Only ever sent, never read.
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.head.len() + self.spans.len() + self.tail.len()
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// An `AgentMessage { batch }` of spans already written (by [`write_span`]), the batch's id, the
/// strings new on the stream, its resource and histograms. Protobuf readers take fields in any
/// order, so the strings may follow the spans that name them.
pub(crate) fn batch_message(
    batch_id: u64,
    spans: Bytes,
    new_strings: &[String],
    resource: &sightline_proto::v1::Resource,
    histograms: &[sightline_proto::v1::LatencyHistogram],
) -> Encoded {
    let mut tail = Vec::with_capacity(
        16 + new_strings.iter().map(|s| s.len() + 4).sum::<usize>()
            + histograms.len() * 64
            + histograms.iter().map(|h| h.bucket_micros.len() * 8).sum::<usize>(),
    );
    varint(1, batch_id, &mut tail);
    for string in new_strings {
        encoding::string::encode(2, string, &mut tail);
    }
    encoding::message::encode(3, resource, &mut tail);
    for histogram in histograms {
        encoding::message::encode(5, histogram, &mut tail);
    }
    let mut head = Vec::with_capacity(HEADER_ROOM);
    encode_key(1, WireType::LengthDelimited, &mut head);
    encode_varint((spans.len() + tail.len()) as u64, &mut head);
    Encoded { head, spans, tail }
}

/// Where each span written by [`write_span`] ends in `spans`, in order. Stops at the first
/// field that is not a whole span (none: this module wrote them).
pub(crate) fn span_ends(spans: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let mut rest = spans.get(at..)?;
        let before = rest.len();
        if rest.is_empty() || rest[0] != SPAN_KEY {
            return None;
        }
        rest.advance(1);
        let len = prost::encoding::decode_varint(&mut rest).ok()? as usize;
        let end = at + (before - rest.len()) + len;
        (end <= spans.len()).then(|| {
            at = end;
            end
        })
    })
}

/// `Batch.spans` (field 4, length-delimited): one byte.
const SPAN_KEY: u8 = 4 << 3 | WireType::LengthDelimited as u8;

/// A span's fields as they go on the wire: names already turned into dictionary ids.
pub(crate) struct SpanFields<'a> {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_span_id: u64,
    pub operation: u32,
    pub kind: i32,
    pub component: u32,
    pub peer: u32,
    pub business_transaction: u32,
    pub start_unix_nanos: u64,
    pub duration_nanos: u64,
    pub status: i32,
    pub error_type: u32,
    pub error_message: &'a str,
    pub caller_service: u32,
    pub caller_operation: u32,
    /// Sent as the first attribute when not 0, under the key `http_status_key`.
    pub http_status: u16,
    pub http_status_key: u32,
}

/// Room kept ahead of a batch for the `AgentMessage` field key and the batch's length.
const HEADER_ROOM: usize = 1 + 5;

/// One span as a `Batch.spans` field (4), with its attributes (key id, value), appended to
/// `buf`.
///
/// The fixed-size fields are put together in a stack buffer and appended with one copy:
/// through prost's functions on the `Vec`, each byte was a capacity check and each field
/// a call (~850 instructions a span, `instructions-per-request.sh`). Field order differs
/// from the numbering (the error message and attributes last), which protobuf allows.
pub(crate) fn write_span<'v>(
    buf: &mut Vec<u8>,
    span: &SpanFields<'_>,
    attributes: impl Iterator<Item = (u32, &'v str)> + Clone,
) {
    // The fixed fields, and the HTTP status (most server and client spans have one), after
    // room for the span's key and length.
    let mut scratch = Scratch::<SCRATCH_BYTES>::at(SPAN_HEADER_ROOM);
    scratch.bytes(1, &span.trace_id.to_be_bytes());
    scratch.fixed64(2, span.span_id);
    scratch.fixed64(3, span.parent_span_id);
    scratch.varint(4, u64::from(span.operation));
    scratch.varint(5, span.kind as u64);
    scratch.varint(6, u64::from(span.component));
    scratch.varint(7, u64::from(span.peer));
    scratch.varint(8, u64::from(span.business_transaction));
    scratch.fixed64(9, span.start_unix_nanos);
    scratch.varint(10, span.duration_nanos);
    scratch.varint(11, span.status as u64);
    scratch.varint(12, u64::from(span.error_type));
    scratch.varint(15, u64::from(span.caller_service));
    scratch.varint(16, u64::from(span.caller_operation));
    if span.http_status != 0 {
        let mut digits = [0u8; 5];
        let status = decimal(span.http_status, &mut digits);
        scratch.key(14, WireType::LengthDelimited);
        scratch.raw_varint((varint_len(1, u64::from(span.http_status_key)) + 2 + status.len()) as u64);
        scratch.varint(1, u64::from(span.http_status_key));
        scratch.key(2, WireType::LengthDelimited);
        scratch.raw_varint(status.len() as u64);
        scratch.buf[scratch.len..scratch.len + status.len()].copy_from_slice(status);
        scratch.len += status.len();
    }
    let attributes_len: usize = attributes
        .clone()
        .map(|(key, value)| {
            let len = attribute_len(key, value);
            key_len(14) + encoded_len_varint(len as u64) + len
        })
        .sum();
    let len = scratch.len - SPAN_HEADER_ROOM + string_len(13, span.error_message) + attributes_len;
    let mut header = Scratch::<16>::default();
    header.key(4, WireType::LengthDelimited);
    header.raw_varint(len as u64);
    let start = SPAN_HEADER_ROOM - header.len;
    scratch.buf[start..SPAN_HEADER_ROOM].copy_from_slice(header.written());
    buf.reserve(header.len + len);
    buf.extend_from_slice(&scratch.buf[start..scratch.len]);
    if !span.error_message.is_empty() {
        bytes(13, span.error_message.as_bytes(), buf);
    }
    for (key, value) in attributes {
        let mut attribute = Scratch::<32>::default();
        attribute.key(14, WireType::LengthDelimited);
        attribute.raw_varint(attribute_len(key, value) as u64);
        attribute.varint(1, u64::from(key));
        if !value.is_empty() {
            attribute.key(2, WireType::LengthDelimited);
            attribute.raw_varint(value.len() as u64);
        }
        buf.extend_from_slice(attribute.written());
        buf.extend_from_slice(value.as_bytes());
    }
}

/// `value` in decimal ASCII digits, in `digits`.
fn decimal(mut value: u16, digits: &mut [u8; 5]) -> &[u8] {
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    &digits[start..]
}

/// A span's key and length (1 + at most 5 bytes) go just ahead of its fields in the scratch.
const SPAN_HEADER_ROOM: usize = 8;

/// The room, its fixed-size fields (14 at most: keys of 1-2 bytes, varints of up to 10, the
/// 16-byte trace id; 122 bytes at most), the HTTP status attribute (15 at most) and the slack a
/// varint's whole-width store needs past the end (9).
const SCRATCH_BYTES: usize = 160;

/// Protobuf written into a stack buffer of `N` bytes, to be appended in one copy.
struct Scratch<const N: usize = SCRATCH_BYTES> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for Scratch<N> {
    fn default() -> Self {
        Self { buf: [0; N], len: 0 }
    }
}

impl<const N: usize> Scratch<N> {
    /// Empty, writing from `offset` on.
    fn at(offset: usize) -> Self {
        Self {
            buf: [0; N],
            len: offset,
        }
    }

    fn written(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Most varints here are one byte (keys, ids); a longer one is made in a register-sized
    /// array and stored whole (its bytes past the varint are overwritten by what follows).
    #[inline(always)]
    fn raw_varint(&mut self, mut value: u64) {
        let at = self.len;
        if value < 0x80 {
            self.buf[at] = value as u8;
            self.len = at + 1;
            return;
        }
        let mut bytes = [0u8; 10];
        let mut len = 0;
        while value >= 0x80 {
            bytes[len] = value as u8 | 0x80;
            len += 1;
            value >>= 7;
        }
        bytes[len] = value as u8;
        self.buf[at..at + 10].copy_from_slice(&bytes);
        self.len = at + len + 1;
    }

    #[inline(always)]
    fn key(&mut self, tag: u32, wire_type: WireType) {
        self.raw_varint(u64::from(tag << 3 | wire_type as u32));
    }

    /// A proto3 scalar is left out when it is 0.
    #[inline(always)]
    fn varint(&mut self, tag: u32, value: u64) {
        if value != 0 {
            self.key(tag, WireType::Varint);
            self.raw_varint(value);
        }
    }

    #[inline(always)]
    fn fixed64(&mut self, tag: u32, value: u64) {
        if value != 0 {
            self.key(tag, WireType::SixtyFourBit);
            self.buf[self.len..self.len + 8].copy_from_slice(&value.to_le_bytes());
            self.len += 8;
        }
    }

    #[inline(always)]
    fn bytes(&mut self, tag: u32, value: &[u8; 16]) {
        self.key(tag, WireType::LengthDelimited);
        self.raw_varint(value.len() as u64);
        self.buf[self.len..self.len + 16].copy_from_slice(value);
        self.len += 16;
    }
}

/// A length-delimited field: bytes or a string.
fn bytes(tag: u32, value: &[u8], buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.put_slice(value);
}

/// A proto3 scalar is left out when it is 0.
fn varint(tag: u32, value: u64, buf: &mut Vec<u8>) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

fn varint_len(tag: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(value)
    }
}

fn string_len(tag: u32, value: &str) -> usize {
    if value.is_empty() {
        0
    } else {
        key_len(tag) + encoded_len_varint(value.len() as u64) + value.len()
    }
}

fn attribute_len(key: u32, value: &str) -> usize {
    varint_len(1, u64::from(key)) + string_len(2, value)
}

#[cfg(test)]
mod tests {
    use sightline_proto::v1::{agent_message, AgentMessage, Attribute, LatencyHistogram, Resource, Span};

    use super::*;

    #[test]
    fn a_batch_written_here_decodes_as_the_protocol_says() {
        let spans = [
            SpanFields {
                trace_id: u128::MAX - 5,
                span_id: 7,
                parent_span_id: 0,
                operation: 3,
                kind: 2,
                component: 0,
                peer: 0,
                business_transaction: 300,
                start_unix_nanos: 1_764_000_000_000_000_000,
                duration_nanos: 1_234_567,
                status: 0,
                error_type: 0,
                error_message: "",
                caller_service: 20_000,
                caller_operation: 21,
                http_status: 503,
                http_status_key: 10,
            },
            SpanFields {
                trace_id: 1,
                span_id: u64::MAX,
                parent_span_id: 7,
                operation: 4,
                kind: 3,
                component: 5,
                peer: 6,
                business_transaction: 300,
                start_unix_nanos: 1,
                duration_nanos: 0,
                status: 2,
                error_type: 9,
                error_message: &"x".repeat(200),
                caller_service: 0,
                caller_operation: 0,
                http_status: 0,
                http_status_key: 0,
            },
            // Every field at its longest: the stack scratch must hold them.
            SpanFields {
                trace_id: u128::MAX,
                span_id: u64::MAX,
                parent_span_id: u64::MAX,
                operation: u32::MAX,
                kind: i32::MIN,
                component: u32::MAX,
                peer: u32::MAX,
                business_transaction: u32::MAX,
                start_unix_nanos: u64::MAX,
                duration_nanos: u64::MAX,
                status: i32::MIN,
                error_type: u32::MAX,
                error_message: "timeout",
                caller_service: u32::MAX,
                caller_operation: u32::MAX,
                http_status: u16::MAX,
                http_status_key: u32::MAX,
            },
        ];
        let attributes: [&[(u32, &str)]; 3] = [&[(13, "GET")], &[(11, ""), (12, "SELECT 1")], &[(u32::MAX, "x")]];
        let mut written = Vec::new();
        let mut ends = Vec::new();
        for (span, attributes) in spans.iter().zip(attributes) {
            write_span(&mut written, span, attributes.iter().copied());
            ends.push(written.len());
        }
        assert_eq!(span_ends(&written).collect::<Vec<_>>(), ends, "spans found again");
        let resource = Resource {
            service: 1,
            service_version: 2,
            instance: 0,
        };
        let histogram = LatencyHistogram {
            window_unix_seconds: 1_764_000_000,
            calls: 3,
            bucket_micros: vec![10, 20],
            bucket_counts: vec![1, 2],
            ..Default::default()
        };
        let strings = vec!["GET /a".to_string(), "Login".to_string()];
        let encoded = batch_message(
            u64::MAX - 1,
            Bytes::from(written),
            &strings,
            &resource,
            std::slice::from_ref(&histogram),
        );

        let decoded = AgentMessage::decode(encoded.encode_to_vec().as_slice()).unwrap();
        let Some(agent_message::Body::Batch(batch)) = decoded.body else {
            panic!("not a batch: {decoded:?}")
        };
        assert_eq!(batch.batch_id, u64::MAX - 1);
        assert_eq!(batch.new_strings, strings);
        assert_eq!(batch.resource, Some(resource));
        assert_eq!(batch.histograms, vec![histogram]);
        let expected: Vec<Span> = spans
            .iter()
            .zip(attributes)
            .map(|(s, attributes)| Span {
                trace_id: s.trace_id.to_be_bytes().to_vec(),
                span_id: s.span_id,
                parent_span_id: s.parent_span_id,
                operation: s.operation,
                kind: s.kind,
                component: s.component,
                peer: s.peer,
                business_transaction: s.business_transaction,
                start_unix_nanos: s.start_unix_nanos,
                duration_nanos: s.duration_nanos,
                status: s.status,
                error_type: s.error_type,
                error_message: s.error_message.to_string(),
                attributes: (s.http_status != 0)
                    .then(|| (s.http_status_key, s.http_status.to_string()))
                    .into_iter()
                    .chain(attributes.iter().map(|&(key, value)| (key, value.to_string())))
                    .map(|(key, value)| Attribute { key, value })
                    .collect(),
                caller_service: s.caller_service,
                caller_operation: s.caller_operation,
            })
            .collect();
        assert_eq!(batch.spans, expected);
    }
}
