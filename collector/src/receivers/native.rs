//! The native agent receiver: `sightline.v1.Agent/Stream` on the gRPC port.
//!
//! One bidirectional stream per agent process. Batches are acknowledged once durable in the
//! spool (a per-stream task waits for each in turn, so reading the stream never waits on the
//! disk); a batch that is invalid as a whole is acknowledged too (sending it again would not
//! help, and it must not block the batches behind it). When the collector is busy or its spool
//! is full the agent is told to back off and the stream ends; the agent reconnects and sends
//! again what was not acknowledged. A batch that breaks the stream's dictionary ends the stream with
//! INVALID_ARGUMENT. The collector's sampling ratio for the agent's service goes back on the
//! stream once the service is known (its first batch) and whenever the policy changes.

use std::pin::Pin;

use sightline_proto::v1::{
    agent_message,
    agent_server::{Agent, AgentServer},
    collector_message, Ack, AgentConfig, AgentMessage, Backpressure, CollectorMessage,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::{
    metrics::AgentLabels,
    pipeline::{native::Dictionary, IngestError, NativeError, Pipeline, Taken},
    sampling::SamplingPolicy,
    store::rows::HeartbeatRow,
};

const RECEIVER: &str = "native";

pub struct NativeAgentService {
    pipeline: Pipeline,
    stopping: watch::Receiver<bool>,
    sampling: watch::Receiver<SamplingPolicy>,
}

impl NativeAgentService {
    /// The service, with the collector's request size limit on each message. Streams end when
    /// `stopping` turns true: an agent's stream never ends by itself, and a graceful shutdown
    /// waits for every stream. `sampling` is the policy pushed to agents.
    pub fn server(
        pipeline: Pipeline,
        stopping: watch::Receiver<bool>,
        sampling: watch::Receiver<SamplingPolicy>,
    ) -> AgentServer<Self> {
        let max = pipeline.limits().max_request_bytes;
        AgentServer::new(Self {
            pipeline,
            stopping,
            sampling,
        })
        .max_decoding_message_size(max)
    }
}

type Outbound = Pin<Box<dyn Stream<Item = Result<CollectorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for NativeAgentService {
    type StreamStream = Outbound;

    async fn stream(&self, request: Request<Streaming<AgentMessage>>) -> Result<Response<Outbound>, Status> {
        let offered = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::bearer_value);
        if !self.pipeline.ingest_token().allows(offered) {
            self.pipeline.metrics().reject_request(RECEIVER, "unauthenticated");
            return Err(Status::unauthenticated(super::otlp_grpc::UNAUTHENTICATED));
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<CollectorMessage, Status>>(64);
        let (acks, to_ack) = mpsc::channel::<(u64, Taken)>(256);
        tokio::spawn(acknowledge(to_ack, tx.clone()));
        let pipeline = self.pipeline.clone();
        let mut stopping = self.stopping.clone();
        let mut sampling = self.sampling.clone();
        tokio::spawn(async move {
            let mut dictionary = Dictionary::default();
            let reply = |body| Ok(CollectorMessage { body: Some(body) });
            // The agent's service (from its first batch) and the ratio it was last told.
            let mut service: Option<String> = None;
            let mut told: Option<f64> = None;
            loop {
                let next = tokio::select! {
                    next = inbound.message() => Next::Message(next),
                    _ = stopping.wait_for(|stop| *stop) => Next::Stop,
                    changed = sampling.changed() => Next::Policy(changed.is_ok()),
                };
                let message = match next {
                    Next::Stop | Next::Policy(false) => return,
                    Next::Policy(true) => {
                        if let Some(config) = sampling_update(&sampling, service.as_deref(), &mut told) {
                            if tx.send(reply(config)).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    Next::Message(Ok(Some(message))) => message,
                    Next::Message(Ok(None)) => return,
                    Next::Message(Err(status)) => {
                        debug!("agent stream ended: {status}");
                        return;
                    }
                };
                match message.body {
                    Some(agent_message::Body::Batch(batch)) => {
                        let batch_id = batch.batch_id;
                        let service_id = batch.resource.as_ref().map(|r| r.service);
                        let result = pipeline.ingest_native(RECEIVER, batch, &mut dictionary);
                        if service.is_none() {
                            service = service_id
                                .and_then(|id| dictionary.get(id).ok())
                                .filter(|s| !s.is_empty())
                                .map(str::to_string);
                            if let Some(config) = sampling_update(&sampling, service.as_deref(), &mut told) {
                                if tx.send(reply(config)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        match result {
                            Ok(taken) => {
                                if acks.send((batch_id, taken)).await.is_err() {
                                    return;
                                }
                            }
                            Err(NativeError::Ingest(IngestError::Invalid(_))) => {
                                let ack = collector_message::Body::Ack(Ack { batch_id });
                                if tx.send(reply(ack)).await.is_err() {
                                    return;
                                }
                            }
                            Err(NativeError::Ingest(refused)) => {
                                back_off(&tx, refused).await;
                                return;
                            }
                            Err(NativeError::BrokenStream(message)) => {
                                let _ = tx.send(Err(Status::invalid_argument(message))).await;
                                return;
                            }
                        }
                    }
                    Some(agent_message::Body::Heartbeat(heartbeat)) => {
                        let metrics = pipeline.metrics();
                        metrics.agent_heartbeats.inc();
                        // Before its first batch an agent's heartbeat names no one (its strings
                        // come in batches): nothing to record about an unnamed agent.
                        let Some(resource) = heartbeat.resource else { continue };
                        let name = |i| dictionary.get(i).unwrap_or_default().to_string();
                        let labels = AgentLabels {
                            service: name(resource.service),
                            instance: name(resource.instance),
                        };
                        metrics
                            .agent_dropped_spans
                            .get_or_create(&labels)
                            .set(heartbeat.dropped_spans as i64);
                        metrics
                            .agent_queue_depth
                            .get_or_create(&labels)
                            .set(heartbeat.queue_depth as i64);
                        pipeline.ingest_heartbeat(HeartbeatRow {
                            time: (heartbeat.unix_millis / 1000) as u32,
                            service: labels.service,
                            service_version: name(resource.service_version),
                            instance: labels.instance,
                            queue_depth: heartbeat.queue_depth,
                            dropped_spans: heartbeat.dropped_spans,
                            sent_spans: heartbeat.sent_spans,
                        });
                    }
                    None => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Acknowledges each batch of a stream once it is durable, in the order received. A batch the
/// spool refused ends the stream with a back-off: the agent sends it again later.
async fn acknowledge(mut to_ack: mpsc::Receiver<(u64, Taken)>, tx: mpsc::Sender<Result<CollectorMessage, Status>>) {
    while let Some((batch_id, taken)) = to_ack.recv().await {
        match taken.durable().await {
            Ok(_) => {
                let ack = collector_message::Body::Ack(Ack { batch_id });
                if tx.send(Ok(CollectorMessage { body: Some(ack) })).await.is_err() {
                    return;
                }
            }
            Err(refused) => {
                back_off(&tx, refused).await;
                return;
            }
        }
    }
}

/// Tells the agent to back off (it honours the delay before it reconnects), then ends the
/// stream with the matching status.
async fn back_off(tx: &mpsc::Sender<Result<CollectorMessage, Status>>, refused: IngestError) {
    let (retry_after, reason) = match &refused {
        IngestError::Busy(delay) => (*delay, "write queue full".to_string()),
        IngestError::Exhausted { retry, message } => (*retry, message.clone()),
        IngestError::Invalid(message) => (std::time::Duration::ZERO, message.clone()),
    };
    let backpressure = collector_message::Body::Backpressure(Backpressure {
        retry_after_millis: retry_after.as_millis() as u64,
        reason,
    });
    let _ = tx
        .send(Ok(CollectorMessage {
            body: Some(backpressure),
        }))
        .await;
    let _ = tx.send(Err(crate::receivers::ingest_status(refused))).await;
}

/// What a stream waits for.
enum Next {
    Message(Result<Option<AgentMessage>, Status>),
    Stop,
    /// The sampling policy changed (false: its sender is gone, the collector is stopping).
    Policy(bool),
}

/// The configuration to send when the policy's ratio for `service` differs from what the agent
/// was last told.
fn sampling_update(
    policy: &watch::Receiver<SamplingPolicy>,
    service: Option<&str>,
    told: &mut Option<f64>,
) -> Option<collector_message::Body> {
    let ratio = policy.borrow().ratio_for(service?)?;
    if *told == Some(ratio) {
        return None;
    }
    *told = Some(ratio);
    Some(collector_message::Body::Config(AgentConfig {
        sampling_ratio: Some(ratio),
        ..AgentConfig::default()
    }))
}
