//! Example services for Sightline: a small chat / customer-service app whose parts run as
//! separate processes, instrumented only through the `sightline` crate's layers.

/// The sessions service's generated gRPC code.
pub mod chat {
    tonic::include_proto!("chat.v1");
}
