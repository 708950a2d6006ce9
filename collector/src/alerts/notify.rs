//! Webhook notifications. Each evaluation's events are grouped by service into one message
//! per service and queued for every configured webhook; each webhook has its own sender task
//! that delivers its queue in order and retries a failed delivery with backoff until it lands.
//! Queuing never waits: the evaluator must not stall on a receiver that is down. A queue holds
//! at most `capacity` messages; past it the oldest is dropped and counted.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::{sync::Notify, task::JoinSet};
use tracing::warn;

use super::book::{Change, Event};
use crate::metrics::{Metrics, OutcomeLabel};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` URL the messages are POSTed to.
    pub url: String,
    #[serde(default)]
    pub format: WebhookFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// `{"service", "events": [{"change", "alert"}], "sent_at"}`.
    #[default]
    Json,
    /// Slack's incoming-webhook form: `{"text": "..."}` in Slack markup.
    Slack,
}

/// One message: a service's alert changes from one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notification {
    #[serde(skip)]
    seq: u64,
    pub service: String,
    pub events: Vec<Event>,
    /// Unix seconds of the evaluation.
    pub sent_at: u64,
}

struct Queue {
    pending: Mutex<VecDeque<Notification>>,
    wake: Notify,
}

/// The sending side the evaluator holds.
#[derive(Clone)]
pub struct Notifier {
    queues: Vec<Arc<Queue>>,
    capacity: usize,
    metrics: Arc<Metrics>,
    next_seq: Arc<std::sync::atomic::AtomicU64>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(60);
const TIMEOUT: Duration = Duration::from_secs(10);
/// A receiver that refuses a message as bad (4xx other than 408/429) this many times gets no
/// more tries of it.
const MAX_REFUSALS: u32 = 5;

impl Notifier {
    /// Starts one sender task per webhook in `tasks`.
    pub fn start(webhooks: &[WebhookConfig], capacity: usize, metrics: Arc<Metrics>, tasks: &mut JoinSet<()>) -> Self {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .expect("an HTTP client without TLS builds");
        let mut queues = Vec::new();
        for hook in webhooks {
            let queue = Arc::new(Queue {
                pending: Mutex::new(VecDeque::new()),
                wake: Notify::new(),
            });
            tasks.spawn(deliver(queue.clone(), hook.clone(), client.clone(), metrics.clone()));
            queues.push(queue);
        }
        Self {
            queues,
            capacity: capacity.max(1),
            metrics,
            next_seq: Arc::default(),
        }
    }

    /// Queues `events` for every webhook, one message per service. Never waits.
    pub fn send(&self, sent_at: u64, events: &[Event]) {
        let mut by_service: std::collections::BTreeMap<&str, Vec<Event>> = Default::default();
        for event in events {
            by_service.entry(&event.alert.service).or_default().push(event.clone());
        }
        for (service, events) in by_service {
            let seq = self.next_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let message = Notification {
                seq,
                service: service.to_string(),
                events,
                sent_at,
            };
            for queue in &self.queues {
                let mut pending = queue.pending.lock().expect("webhook queue");
                if pending.len() >= self.capacity {
                    pending.pop_front();
                    self.metrics.webhook_queue.dec();
                    self.metrics
                        .webhook_messages
                        .get_or_create(&OutcomeLabel { outcome: "dropped" })
                        .inc();
                }
                pending.push_back(message.clone());
                self.metrics.webhook_queue.inc();
                drop(pending);
                queue.wake.notify_one();
            }
        }
    }
}

/// Delivers a webhook's queue in order, each message until it lands.
async fn deliver(queue: Arc<Queue>, hook: WebhookConfig, client: reqwest::Client, metrics: Arc<Metrics>) {
    let count = |outcome: &'static str| metrics.webhook_messages.get_or_create(&OutcomeLabel { outcome }).inc();
    loop {
        let wake = queue.wake.notified();
        let next = queue.pending.lock().expect("webhook queue").front().cloned();
        let Some(message) = next else {
            wake.await;
            continue;
        };
        let body = render(hook.format, &message);
        let (mut attempt, mut refusals) = (0u32, 0u32);
        let delivered = loop {
            attempt += 1;
            let outcome = client
                .post(&hook.url)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            let problem = match outcome {
                Ok(response) if response.status().is_success() => break true,
                Ok(response) => {
                    let status = response.status();
                    if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
                        refusals += 1;
                        if refusals >= MAX_REFUSALS {
                            warn!(url = hook.url, %status, "webhook refuses the message; giving it up");
                            break false;
                        }
                    }
                    format!("HTTP {status}")
                }
                Err(e) => e.to_string(),
            };
            count("retried");
            let wait = Duration::from_millis(500 << attempt.min(7)).min(MAX_BACKOFF);
            warn!(
                url = hook.url,
                attempt,
                ?wait,
                "webhook delivery failed, retrying: {problem}"
            );
            tokio::time::sleep(wait).await;
        };
        count(if delivered { "delivered" } else { "refused" });
        let mut pending = queue.pending.lock().expect("webhook queue");
        // Unless the queue overflowed meanwhile and dropped it, the message is still first.
        if pending.front().is_some_and(|m| m.seq == message.seq) {
            pending.pop_front();
            metrics.webhook_queue.dec();
        }
    }
}

/// The message body in the webhook's format.
pub fn render(format: WebhookFormat, message: &Notification) -> String {
    match format {
        WebhookFormat::Json => serde_json::to_string(message).expect("alerts serialize"),
        WebhookFormat::Slack => {
            let lines: Vec<String> = message
                .events
                .iter()
                .map(|event| {
                    let alert = &event.alert;
                    let state = match event.change {
                        Change::Firing => format!("FIRING {:?}", alert.severity).to_uppercase(),
                        Change::Changed => format!("NOW {:?}", alert.severity).to_uppercase(),
                        Change::Resolved => "RESOLVED".to_string(),
                    };
                    format!("*[{state}]* `{}` {}", alert.kind.name(), alert.summary)
                })
                .collect();
            json!({ "text": format!("*Sightline: {}*\n{}", message.service, lines.join("\n")) }).to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::{
        book::{Alert, State},
        Kind, Severity,
    };

    #[test]
    fn slack_form_is_one_text_field_naming_each_change() {
        let alert = Alert {
            id: 1,
            key: "stuck/auth/Login".into(),
            service: "auth".into(),
            subject: "Login".into(),
            kind: Kind::Stuck,
            severity: Severity::Critical,
            peak: Severity::Critical,
            state: State::Firing,
            summary: "Login (auth): 3 stuck now, the longest open 14 s, in stats-cache GET session".into(),
            details: serde_json::Value::Null,
            started_at: 100,
            updated_at: 100,
            resolved_at: None,
        };
        let message = Notification {
            seq: 0,
            service: "auth".into(),
            events: vec![
                Event {
                    change: Change::Firing,
                    alert: alert.clone(),
                },
                Event {
                    change: Change::Resolved,
                    alert,
                },
            ],
            sent_at: 160,
        };
        let slack: serde_json::Value = serde_json::from_str(&render(WebhookFormat::Slack, &message)).unwrap();
        let text = slack["text"].as_str().unwrap();
        assert_eq!(slack.as_object().unwrap().len(), 1, "{slack}");
        assert!(text.starts_with("*Sightline: auth*\n"), "{text}");
        assert!(
            text.contains("*[FIRING CRITICAL]* `stuck` Login (auth): 3 stuck"),
            "{text}"
        );
        assert!(text.contains("*[RESOLVED]* `stuck`"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&render(WebhookFormat::Json, &message)).unwrap();
        assert_eq!(json["service"], "auth");
        assert_eq!(json["events"][0]["change"], "firing");
        assert_eq!(json["events"][1]["alert"]["kind"], "stuck");
    }
}
