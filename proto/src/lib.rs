//! Sightline's wire contract: the `sightline.v1` agent protocol (generated from
//! `proto/sightline/v1/agent.proto`) and the latency-histogram layout that agent, collector
//! and gate share.

/// Generated `sightline.v1` messages, client and server.
pub mod v1 {
    tonic::include_proto!("sightline.v1");
}

pub mod histogram;
