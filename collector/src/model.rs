//! The span model every receiver maps into and the store writes out (DESIGN.md, data model).

use serde::{Deserialize, Serialize};

/// One timed operation of one service.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Span {
    pub trace_id: [u8; 16],
    /// Never zero.
    pub span_id: u64,
    /// Zero for a root span.
    pub parent_span_id: u64,
    pub service: String,
    pub service_version: String,
    pub instance: String,
    /// Route template, RPC method or statement kind: never a raw URL.
    pub operation: String,
    pub kind: SpanKind,
    /// http, grpc, db, cache, mq, ... (empty for in-process work).
    pub component: String,
    /// The remote service or system a client span calls: `redis`, `postgres:orders`, `auth`.
    pub peer: String,
    /// The business transaction this span serves.
    pub bt: String,
    pub start_ns: u64,
    pub duration_ns: u64,
    pub status: SpanStatus,
    pub error_type: String,
    pub error_message: String,
    pub attributes: Vec<(String, String)>,
}

/// Same numbering as OTLP and sightline.v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[repr(u8)]
pub enum SpanKind {
    #[default]
    Unspecified = 0,
    Internal = 1,
    Server = 2,
    Client = 3,
    Producer = 4,
    Consumer = 5,
}

/// Same numbering as OTLP and sightline.v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[repr(u8)]
pub enum SpanStatus {
    #[default]
    Unset = 0,
    Ok = 1,
    Error = 2,
}

impl SpanKind {
    pub fn from_otlp(kind: i32) -> Self {
        match kind {
            1 => Self::Internal,
            2 => Self::Server,
            3 => Self::Client,
            4 => Self::Producer,
            5 => Self::Consumer,
            _ => Self::Unspecified,
        }
    }

    /// Whether a span of this kind starts work in its service (an entry point).
    pub fn is_entry(self) -> bool {
        matches!(self, Self::Server | Self::Consumer)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Internal => "internal",
            Self::Server => "server",
            Self::Client => "client",
            Self::Producer => "producer",
            Self::Consumer => "consumer",
        }
    }
}

impl SpanStatus {
    pub fn from_otlp(code: i32) -> Self {
        match code {
            1 => Self::Ok,
            2 => Self::Error,
            _ => Self::Unset,
        }
    }
}

/// Lower-case hex of a trace id, as the API and W3C traceparent spell it.
pub fn trace_id_hex(id: &[u8; 16]) -> String {
    hex::encode(id)
}

/// Lower-case 16-digit hex of a span id.
pub fn span_id_hex(id: u64) -> String {
    format!("{id:016x}")
}
