//! The native stream's batches, encoded straight from the exporter's spans into message bytes.
//!
//! Building a `sightline.v1.Span` struct per span (its trace id, attribute and message
//! vectors), encoding it and dropping it was most of the exporter's work
//! (`benches/scripts/instructions-per-request.sh`). Spans are written here field by field with
//! prost's encoding functions, in the layout of `proto/sightline/v1/agent.proto`; the rest of a
//! batch (resource, histograms, new strings) goes through the generated types. Protobuf
//! readers take fields in any order, so a batch's new strings follow the spans that named them.
//! A test decodes what is written here with the generated types.

use prost::{
    bytes::{Buf, BufMut},
    encoding::{self, encode_key, encode_varint, encoded_len_varint, key_len, DecodeContext, WireType},
    DecodeError, Message,
};

/// Bytes of a message encoded ahead, sent as they are (tonic's prost codec copies them into its
/// frame).
#[derive(Debug, Default, Clone)]
pub(crate) struct Encoded {
    bytes: Vec<u8>,
    /// Where the message starts in `bytes` (room is kept ahead for a length prefix).
    start: usize,
}

impl Encoded {
    /// A message built with the generated types.
    pub(crate) fn of(message: &impl Message) -> Self {
        Self {
            bytes: message.encode_to_vec(),
            start: 0,
        }
    }
}

impl Message for Encoded {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.bytes[self.start..]);
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
        self.bytes.len() - self.start
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.start = 0;
    }
}

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

/// Writes an `AgentMessage { batch }`: [`BatchWriter::span`] per span, then
/// [`BatchWriter::finish`] with the rest of the batch.
pub(crate) struct BatchWriter {
    bytes: Vec<u8>,
}

impl BatchWriter {
    /// Room for `spans` spans and `buckets` histogram buckets in all: growing the buffer later
    /// copies every span written so far.
    pub(crate) fn new(spans: usize, buckets: usize) -> Self {
        let mut bytes = Vec::with_capacity(HEADER_ROOM + spans * 96 + buckets * 8 + 1024);
        bytes.resize(HEADER_ROOM, 0);
        Self { bytes }
    }

    /// One span (`Batch.spans`, field 4) with its attributes (key id, value).
    ///
    /// The fixed-size fields are put together in a stack buffer and appended with one copy:
    /// through prost's functions on the `Vec`, each byte was a capacity check and each field
    /// a call (~850 instructions a span, `instructions-per-request.sh`). Field order differs
    /// from the numbering (the error message and attributes last), which protobuf allows.
    pub(crate) fn span<'v>(&mut self, span: &SpanFields<'_>, attributes: impl Iterator<Item = (u32, &'v str)> + Clone) {
        // The fixed fields, and the HTTP status (most server and client spans have one), after
        // room for the span's key and length.
        let mut scratch = Scratch::at(SPAN_HEADER_ROOM);
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
        let mut header = Scratch::default();
        header.key(4, WireType::LengthDelimited);
        header.raw_varint(len as u64);
        let start = SPAN_HEADER_ROOM - header.len;
        scratch.buf[start..SPAN_HEADER_ROOM].copy_from_slice(header.written());
        let buf = &mut self.bytes;
        buf.reserve(header.len + len);
        buf.extend_from_slice(&scratch.buf[start..scratch.len]);
        if !span.error_message.is_empty() {
            bytes(13, span.error_message.as_bytes(), buf);
        }
        for (key, value) in attributes {
            let mut attribute = Scratch::default();
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

    /// The batch's id, the strings new on this stream, its resource and histograms; the
    /// message, ready to send.
    pub(crate) fn finish(
        mut self,
        batch_id: u64,
        new_strings: &[String],
        resource: &sightline_proto::v1::Resource,
        histograms: &[sightline_proto::v1::LatencyHistogram],
    ) -> Encoded {
        let buf = &mut self.bytes;
        varint(1, batch_id, buf);
        for string in new_strings {
            encoding::string::encode(2, string, buf);
        }
        encoding::message::encode(3, resource, buf);
        for histogram in histograms {
            encoding::message::encode(5, histogram, buf);
        }
        // AgentMessage.batch (field 1) and the batch's length, just ahead of the batch.
        let batch_len = (self.bytes.len() - HEADER_ROOM) as u64;
        let mut header = Vec::with_capacity(HEADER_ROOM);
        encode_key(1, WireType::LengthDelimited, &mut header);
        encode_varint(batch_len, &mut header);
        let start = HEADER_ROOM - header.len();
        self.bytes[start..HEADER_ROOM].copy_from_slice(&header);
        Encoded {
            bytes: self.bytes,
            start,
        }
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
/// 16-byte trace id; 122 bytes at most) and the HTTP status attribute (15 at most).
const SCRATCH_BYTES: usize = 160;

/// Protobuf written into a stack buffer, to be appended in one copy.
struct Scratch {
    buf: [u8; SCRATCH_BYTES],
    len: usize,
}

impl Default for Scratch {
    fn default() -> Self {
        Self {
            buf: [0; SCRATCH_BYTES],
            len: 0,
        }
    }
}

impl Scratch {
    /// Empty, writing from `offset` on.
    fn at(offset: usize) -> Self {
        Self {
            buf: [0; SCRATCH_BYTES],
            len: offset,
        }
    }

    fn written(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    #[inline(always)]
    fn raw_varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.buf[self.len] = value as u8 | 0x80;
            self.len += 1;
            value >>= 7;
        }
        self.buf[self.len] = value as u8;
        self.len += 1;
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
        let mut writer = BatchWriter::new(spans.len(), 2);
        for (span, attributes) in spans.iter().zip(attributes) {
            writer.span(span, attributes.iter().copied());
        }
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
        let encoded = writer.finish(u64::MAX - 1, &strings, &resource, std::slice::from_ref(&histogram));

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
