//! The one background exporter: a thread with its own small runtime, so the application's
//! executor never runs export work.
//!
//! It drains the hand-off queue every `flush_interval` (sooner when a thread's ring fills up),
//! folds every finished span into RED histograms (exact: unsampled transactions count too),
//! encodes each sampled span into protobuf right away (names as ids of the [`Dictionary`]),
//! and sends those bytes in batches on a `sightline.v1` stream. Batches stay pending, as bytes,
//! until the collector acknowledges them and are sent again on a new stream after a
//! reconnect; past `max_pending_spans` or `max_pending_bytes` the oldest spans are dropped and
//! counted. Heartbeats report queue depth and drops.

use std::{
    collections::VecDeque,
    hash::{Hash, Hasher},
    sync::atomic::Ordering,
    time::Duration,
};

use prost::bytes::Bytes;
use rustc_hash::FxHashMap;
use sightline_proto::v1::{
    agent_message, collector_message, AgentMessage, Batch, CollectorMessage, Heartbeat, InflightTransaction,
    LatencyHistogram, Resource, SpanKind, Status as WireStatus,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::{
    agent::Agent,
    clock::{self, TickScale},
    config::{Config, Protocol},
    dictionary::Dictionary,
    inflight, otlp,
    recent::Recent,
    red::{self, DenseCounts, RedValue},
    span::{self, Kind, Name, Record, SharedName},
    wire::{self, Encoded, SpanFields},
};

/// A periodic task of the exporter's. All of them share one timer, and each wake-up does what
/// is due: every wake-up of the exporter's thread cost ~60 us of CPU on the benchmark's virtual
/// machine (benches/README.md), more than a thousand spans' work, and separate timers (the
/// drain's, the flush's) woke it apart, twice as often.
struct Due {
    at: tokio::time::Instant,
    every: Duration,
}

impl Due {
    /// First due now.
    fn new(every: Duration, now: tokio::time::Instant) -> Self {
        Self {
            at: now,
            every: every.max(Duration::from_millis(1)),
        }
    }

    /// Whether it is due at `now`; if so, the next time is set (missed times are skipped).
    fn take(&mut self, now: tokio::time::Instant) -> bool {
        if now < self.at {
            return false;
        }
        self.at += self.every;
        if self.at <= now {
            self.at = now + self.every;
        }
        true
    }
}

/// The least time between two drains of the threads' rings, however often filling rings ask:
/// as often as a fixed 100-ms timer drained them before, never more (each drain is a wake-up).
const MIN_DRAIN_GAP: Duration = Duration::from_millis(100);

/// When the threads' rings are emptied: at every flush, and early when a thread's ring fills
/// up (`Agent::exporter_wake`): at once, or at the end of [`MIN_DRAIN_GAP`] after the last drain.
struct Drains {
    flush: Due,
    not_before: tokio::time::Instant,
    /// A thread asked within the gap.
    asked: bool,
}

/// What is due at a wake-up of the exporter's timer.
#[derive(Debug, PartialEq)]
enum Drain {
    /// Drain and send.
    Flush,
    /// Drain (and, on the native stream, send), asked by a filling ring.
    Early,
    None,
}

impl Drains {
    fn new(flush_interval: Duration, now: tokio::time::Instant) -> Self {
        Self {
            flush: Due::new(flush_interval, now),
            not_before: now,
            asked: false,
        }
    }

    /// The next time something is due.
    fn next(&self) -> tokio::time::Instant {
        match self.asked {
            true => self.flush.at.min(self.not_before),
            false => self.flush.at,
        }
    }

    /// What is due at `now`; a drain it returns counts as done.
    fn at(&mut self, now: tokio::time::Instant) -> Drain {
        let due = if self.flush.take(now) {
            Drain::Flush
        } else if self.asked && now >= self.not_before {
            Drain::Early
        } else {
            return Drain::None;
        };
        self.drained(now);
        due
    }

    /// A thread's ring is filling up: whether to drain now (counted as done).
    fn asked(&mut self, now: tokio::time::Instant) -> bool {
        if now < self.not_before {
            self.asked = true;
            return false;
        }
        self.drained(now);
        true
    }

    fn drained(&mut self, now: tokio::time::Instant) {
        self.not_before = now + MIN_DRAIN_GAP;
        self.asked = false;
    }
}

/// RED goes with the first flush this long after the last that carried it: every key's
/// histogram sorted and encoded at every 100-ms flush was up to a fifth of the exporter's
/// instructions a request at 2,000 requests/s (`instructions-per-request.sh`), and a second is
/// far inside what the collector's 10-second aggregates resolve.
const RED_SEND_INTERVAL: Duration = Duration::from_secs(1);
/// The native stream's method.
const STREAM_PATH: &str = "/sightline.v1.Agent/Stream";
/// The attribute a span's HTTP status is exported as.
const HTTP_STATUS_KEY: &str = "http.response.status_code";
/// Spans per batch: ~1 MB on the wire, far under the collector's request limit.
const MAX_BATCH_SPANS: usize = 8192;

/// What one span takes encoded, about (a server or client span with its HTTP status, no other
/// attribute: 70-90 bytes): room for a drain's spans is made once from it.
const SPAN_BYTES_GUESS: usize = 96;

/// Spans (encoded as `Batch.spans` fields, [`wire::write_span`]) and RED not yet acknowledged;
/// `batch_id` 0 while not yet cut into a batch. What it holds in memory is `spans.len()`.
struct Pending {
    batch_id: u64,
    spans: Bytes,
    span_count: usize,
    histograms: Vec<(RedKey, RedValue)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RedKey {
    window: u64,
    bt: SharedName,
    operation: Name,
    kind: Kind,
    stage: &'static str,
    error: bool,
}

/// RED per key. Keys are found by a fingerprint of their parts, so that a span whose key exists
/// (nearly every span) costs a hash and a compare, no allocation: building an owned key per span
/// showed in the exporter's profile. Before that, a key of static names is looked up by the
/// names' addresses in a direct-mapped slot: no hashing or comparing of text for the few keys
/// that make most spans.
struct RedTable {
    entries: Vec<(RedKey, RedValue)>,
    /// Fingerprint to indices into `entries`.
    by_fingerprint: FxHashMap<u64, Vec<u32>>,
    /// Keys of static names, by their names' addresses.
    recent: Recent<StaticIdentity, u32, RECENT_RED_SLOTS>,
    scale: TickScale,
    scratch: DenseCounts,
}

impl Default for RedTable {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            by_fingerprint: FxHashMap::default(),
            recent: Recent::default(),
            scale: TickScale::get(),
            scratch: DenseCounts::default(),
        }
    }
}

const RECENT_RED_SLOTS: usize = 64;

/// A RED key's parts as a span gives them, borrowed.
#[derive(Clone, Copy)]
struct KeyParts<'a> {
    window: u64,
    bt: &'a SharedName,
    operation: &'a Name,
    kind: Kind,
    stage: &'static str,
    error: bool,
}

impl KeyParts<'_> {
    fn fingerprint(&self) -> u64 {
        let mut hasher = rustc_hash::FxHasher::default();
        (
            self.window,
            &**self.bt,
            self.operation.as_ref(),
            self.kind,
            self.stage,
            self.error,
        )
            .hash(&mut hasher);
        hasher.finish()
    }

    fn matches(&self, key: &RedKey) -> bool {
        key.window == self.window
            && key.kind == self.kind
            && key.stage == self.stage
            && key.error == self.error
            && *key.bt == **self.bt
            && key.operation == *self.operation
    }

    fn to_key(self) -> RedKey {
        RedKey {
            window: self.window,
            bt: self.bt.clone(),
            operation: self.operation.clone(),
            kind: self.kind,
            stage: self.stage,
            error: self.error,
        }
    }
}

impl RedKey {
    fn parts(&self) -> KeyParts<'_> {
        KeyParts {
            window: self.window,
            bt: &self.bt,
            operation: &self.operation,
            kind: self.kind,
            stage: self.stage,
            error: self.error,
        }
    }
}

/// A key whose names are all static, by the names' addresses.
#[derive(Clone, Copy, PartialEq, Eq)]
struct StaticIdentity {
    window: u64,
    bt: (usize, usize),
    operation: (usize, usize),
    stage: usize,
    kind: Kind,
    error: bool,
}

impl StaticIdentity {
    fn of(key: KeyParts<'_>) -> Option<Self> {
        let (SharedName::Static(bt), Name::Borrowed(operation)) = (key.bt, key.operation) else {
            return None;
        };
        Some(Self {
            window: key.window,
            bt: (bt.as_ptr() as usize, bt.len()),
            operation: (operation.as_ptr() as usize, operation.len()),
            stage: key.stage.as_ptr() as usize,
            kind: key.kind,
            error: key.error,
        })
    }

    /// Its parts mixed, for [`RedTable::recent`].
    fn hash(&self) -> u64 {
        (self.bt.0 ^ self.operation.0.rotate_left(17) ^ self.stage.rotate_left(31)) as u64
            ^ self.window
            ^ ((self.kind as u64) << 1)
            ^ u64::from(self.error)
    }
}

impl RedTable {
    fn record(&mut self, key: KeyParts<'_>, micros: u64) {
        let identity = StaticIdentity::of(key).map(|identity| (identity.hash(), identity));
        if let Some((hash, identity)) = &identity {
            if let Some(index) = self.recent.get(*hash, identity) {
                self.entries[index as usize].1.record(micros, key.error);
                return;
            }
        }
        let index = self.index_of(key);
        self.entries[index as usize].1.record(micros, key.error);
        if let Some((hash, identity)) = identity {
            self.recent.put(hash, identity, index);
        }
    }

    /// Adds RED taken out earlier (a dropped batch's) back in.
    fn add(&mut self, key: RedKey, value: RedValue) {
        let index = self.index_of(key.parts());
        self.entries[index as usize].1.add(&value);
    }

    /// Records the durations (raw clock ticks) of one key gathered by an application thread.
    fn record_all(&mut self, key: KeyParts<'_>, durations: &[u64]) {
        let index = self.index_of(key);
        let value = &mut self.entries[index as usize].1;
        value.record_ticks(durations, key.error, self.scale, &mut self.scratch);
    }

    /// The entry of `key`, made empty if it is new.
    fn index_of(&mut self, key: KeyParts<'_>) -> u32 {
        let slot = self.by_fingerprint.entry(key.fingerprint()).or_default();
        if let Some(&i) = slot.iter().find(|&&i| key.matches(&self.entries[i as usize].0)) {
            return i;
        }
        self.entries.push((key.to_key(), RedValue::default()));
        let i = (self.entries.len() - 1) as u32;
        slot.push(i);
        i
    }

    fn drain(&mut self) -> Vec<(RedKey, RedValue)> {
        self.by_fingerprint.clear();
        self.recent.clear();
        std::mem::take(&mut self.entries)
    }

    fn clear(&mut self) {
        self.drain();
    }
}

pub(crate) struct Exporter {
    config: Config,
    agent: &'static Agent,
    pending: VecDeque<Pending>,
    pending_spans: usize,
    pending_bytes: usize,
    red: RedTable,
    /// When RED next goes with a flush.
    red_due: std::time::Instant,
    dictionary: Dictionary,
    next_batch_id: u64,
    sent_spans: u64,
}

impl Exporter {
    pub(crate) fn new(config: Config, agent: &'static Agent) -> Self {
        let next_batch_id = crate::clock::ids::next_u64() & 0xFFFF_FFFF_0000_0000;
        Self {
            config,
            agent,
            pending: VecDeque::new(),
            pending_spans: 0,
            pending_bytes: 0,
            red: RedTable::default(),
            red_due: std::time::Instant::now(),
            dictionary: Dictionary::default(),
            next_batch_id,
            sent_spans: 0,
        }
    }

    /// Runs until `stop` fires, then sends what is left (waiting up to 5 s for the collector).
    pub(crate) async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        if self.config.protocol == Protocol::Otlp {
            return self.run_otlp(stop).await;
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.session(&mut stop).await {
                Ok(()) => return,
                Err(e) => {
                    debug!("sightline exporter: {e}; reconnecting in {backoff:?}");
                    // Keep draining while away, so the hand-off queue stays short and the
                    // pending cap (not the queue) bounds what is held.
                    let reconnect = tokio::time::sleep(backoff);
                    tokio::pin!(reconnect);
                    let mut drains = Drains::new(self.config.flush_interval, tokio::time::Instant::now());
                    loop {
                        tokio::select! {
                            _ = &mut reconnect => break,
                            _ = tokio::time::sleep_until(drains.next()) => {
                                if drains.at(tokio::time::Instant::now()) != Drain::None {
                                    self.collect();
                                }
                            }
                            _ = self.agent.exporter_wake.notified() => {
                                if drains.asked(tokio::time::Instant::now()) {
                                    self.collect();
                                }
                            }
                            _ = &mut stop => return,
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// The OTLP option: the same draining, pending cap and drop counting; every flush sends the
    /// pending spans oldest first, one request per batch, and a batch leaves only once the
    /// receiver accepted it. RED histograms and in-flight snapshots have no place in OTLP
    /// traces and are discarded.
    async fn run_otlp(mut self, mut stop: oneshot::Receiver<()>) {
        let mut client = None;
        let mut drains = Drains::new(self.config.flush_interval, tokio::time::Instant::now());
        let mut backoff = Duration::ZERO;
        let mut retry_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                // A thread's ring filling up: emptied (sent at the flush).
                _ = self.agent.exporter_wake.notified() => {
                    if drains.asked(tokio::time::Instant::now()) {
                        self.collect();
                    }
                }
                _ = tokio::time::sleep_until(drains.next()) => {
                    let due = drains.at(tokio::time::Instant::now());
                    if due != Drain::None {
                        self.collect();
                    }
                    if due != Drain::Flush || tokio::time::Instant::now() < retry_at {
                        continue;
                    }
                    match self.export_otlp(&mut client).await {
                        Ok(()) => backoff = Duration::ZERO,
                        Err(e) => {
                            backoff = (backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(10));
                            retry_at = tokio::time::Instant::now() + backoff;
                            debug!("sightline OTLP export: {e}; again in {backoff:?}");
                        }
                    }
                }
                _ = &mut stop => {
                    self.collect();
                    let deadline = Duration::from_secs(5);
                    if tokio::time::timeout(deadline, self.export_otlp(&mut client)).await.is_err()
                        || !self.pending.is_empty()
                    {
                        warn!(batches = self.pending.len(), "sightline: shutting down with unsent spans");
                    }
                    return;
                }
            }
        }
    }

    async fn export_otlp(&mut self, client: &mut Option<otlp::OtlpClient>) -> Result<(), String> {
        self.red.clear();
        self.cut_batches(false);
        while let Some(batch) = self.pending.front() {
            if batch.span_count > 0 {
                if client.is_none() {
                    *client = Some(otlp::OtlpClient::connect(self.config.collector.clone(), &self.config.token).await?);
                }
                let identity = otlp::Identity {
                    service: self.agent.service(),
                    version: &self.agent.version,
                    instance: &self.agent.instance,
                };
                let request = otlp::request(&identity, &batch.spans, &self.dictionary)?;
                let sent = client.as_mut().expect("connected above").export(request).await;
                if let Err(e) = sent {
                    *client = None;
                    return Err(e);
                }
            }
            let done = self.pending.pop_front().expect("front exists");
            self.pending_spans -= done.span_count;
            self.pending_bytes -= done.spans.len();
        }
        Ok(())
    }

    /// One stream to the collector. Ok when stopped, Err when the stream broke.
    async fn session(&mut self, stop: &mut oneshot::Receiver<()>) -> Result<(), String> {
        let channel = tonic::transport::Channel::from_shared(self.config.collector.clone())
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let mut client = tonic::client::Grpc::new(channel);
        client.ready().await.map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel::<Encoded>(64);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(value) = crate::otlp::authorization(&self.config.token)? {
            request.metadata_mut().insert("authorization", value);
        }
        // Messages go out as `wire` encoded them; the collector's come back through prost.
        let codec = tonic_prost::ProstCodec::<Encoded, CollectorMessage>::default();
        let path = http::uri::PathAndQuery::from_static(STREAM_PATH);
        let mut inbound = client
            .streaming(request, path, codec)
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        self.dictionary.start_stream();
        // Everything not yet acknowledged goes again on this stream, oldest first.
        for i in 0..self.pending.len() {
            if self.pending[i].batch_id == 0 {
                continue; // not cut into a batch yet
            }
            let message = self.batch_message(i);
            tx.send(message).await.map_err(|_| "stream closed")?;
        }
        let now = tokio::time::Instant::now();
        let mut drains = Drains::new(self.config.flush_interval, now);
        let mut inflight_check = Due::new(self.config.inflight_interval, now);
        let mut heartbeat = Due::new(self.config.heartbeat_interval, now);
        let mut paused_until = now;
        loop {
            let wake_at = drains.next().min(inflight_check.at).min(heartbeat.at);
            tokio::select! {
                _ = tokio::time::sleep_until(wake_at) => {
                    let now = tokio::time::Instant::now();
                    let due = drains.at(now);
                    if due != Drain::None {
                        self.collect_and_send(&tx, now >= paused_until, due == Drain::Flush).await?;
                    }
                    if inflight_check.take(now) {
                        if let Some(message) = self.inflight_snapshot() {
                            tx.send(message).await.map_err(|_| "stream closed")?;
                        }
                    }
                    if heartbeat.take(now) {
                        let message = self.heartbeat();
                        tx.send(message).await.map_err(|_| "stream closed")?;
                    }
                }
                // A thread's ring filling up: emptied and sent.
                _ = self.agent.exporter_wake.notified() => {
                    let now = tokio::time::Instant::now();
                    if drains.asked(now) {
                        self.collect_and_send(&tx, now >= paused_until, false).await?;
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => match message.body {
                        Some(collector_message::Body::Ack(ack)) => self.acknowledge(ack.batch_id),
                        Some(collector_message::Body::Config(config)) => {
                            if let Some(ratio) = config.sampling_ratio.filter(|r| (0.0..=1.0).contains(r)) {
                                self.agent.set_sampling_ratio(ratio);
                            }
                        }
                        Some(collector_message::Body::Backpressure(bp)) => {
                            paused_until = tokio::time::Instant::now() + Duration::from_millis(bp.retry_after_millis);
                        }
                        _ => {}
                    },
                    Ok(None) => return Err("collector closed the stream".into()),
                    Err(status) => return Err(format!("stream failed: {status}")),
                },
                _ = &mut *stop => {
                    self.collect();
                    for i in self.cut_batches(true) {
                        let message = self.batch_message(i);
                        let _ = tx.send(message).await;
                    }
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                    while !self.pending.is_empty() {
                        match tokio::time::timeout_at(deadline, inbound.message()).await {
                            Ok(Ok(Some(message))) => {
                                if let Some(collector_message::Body::Ack(ack)) = message.body {
                                    self.acknowledge(ack.batch_id);
                                }
                            }
                            _ => break,
                        }
                    }
                    if !self.pending.is_empty() {
                        warn!(batches = self.pending.len(), "sightline: shutting down with unacknowledged batches");
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Drains the threads' rings and, unless sending is paused (`send` false), sends what
    /// waits: at a flush all of it, at an early drain only half a ring's notification or more
    /// (`Agent::early_send_spans`).
    /// Draining goes on while sending is paused (backpressure): the pending cap, not the
    /// threads' rings, bounds what is held.
    async fn collect_and_send(&mut self, tx: &mpsc::Sender<Encoded>, send: bool, flush: bool) -> Result<(), String> {
        self.collect();
        if send && (flush || self.unsent_spans() >= self.agent.early_send_spans()) {
            self.send_drained(tx).await?;
        }
        Ok(())
    }

    /// Spans drained and not yet cut into a batch.
    fn unsent_spans(&self) -> usize {
        self.pending
            .iter()
            .rev()
            .take_while(|p| p.batch_id == 0)
            .map(|p| p.span_count)
            .sum()
    }

    /// Cuts what was drained and not yet sent into batches, with the RED so far when it is
    /// due, and sends them on the stream.
    async fn send_drained(&mut self, tx: &mpsc::Sender<Encoded>) -> Result<(), String> {
        let with_red = std::time::Instant::now() >= self.red_due;
        for i in self.cut_batches(with_red) {
            let message = self.batch_message(i);
            tx.send(message).await.map_err(|_| "stream closed")?;
        }
        Ok(())
    }

    /// Takes everything the application threads handed off: RED for all, spans encoded and
    /// kept when sampled.
    fn collect(&mut self) {
        let mut written: Vec<u8> = Vec::new();
        let mut span_count = 0;
        // A trace's BT id, looked up once per hand-off (u32::MAX: not yet).
        let mut bt_ids: Vec<u32> = Vec::new();
        // With no room for pending spans every sampled span is dropped: not encoded first.
        let keep = self.config.max_pending_spans > 0 && self.config.max_pending_bytes > 0;
        let mut dropped = 0;
        let (red, dictionary) = (&mut self.red, &mut self.dictionary);
        self.agent.drain(|records, batch: &mut span::Batch| {
            // Room for every record of the drain (sampled or not), made once; what is not used
            // is given back below.
            if written.capacity() == 0 {
                written.reserve_exact(if keep { records * SPAN_BYTES_GUESS } else { 0 });
            }
            // What the thread folded itself (spans of unsampled traces), key by key.
            if let Some(folded) = batch.red.as_deref_mut() {
                folded.take(|key, latencies| {
                    let (bt, operation) = (SharedName::Static(key.bt), Name::Borrowed(key.operation));
                    let parts = KeyParts {
                        window: key.window,
                        bt: &bt,
                        operation: &operation,
                        kind: key.kind,
                        stage: key.stage(),
                        error: false,
                    };
                    red.record_all(parts, latencies);
                });
            }
            bt_ids.clear();
            bt_ids.resize(batch.traces.len(), u32::MAX);
            // Holes (span id 0) are spans that were still open and moved to a later batch, or
            // folded by their thread. Read in place (moving each 128-byte record out cost more
            // than reading it); the drain clears the buffer after.
            for span in batch.records().iter().filter(|r| r.span_id != 0) {
                // A span its thread left open when it ended has no trace yet (span.rs).
                let Some(trace) = batch.traces.get(span.trace as usize) else {
                    continue;
                };
                let start_unix_ns = clock::unix_ns(span.start_raw);
                let duration_ns = clock::delta_ns(span.start_raw, span.end_raw);
                let error = span.detail.as_ref().is_some_and(|d| d.error.is_some());
                let key = KeyParts {
                    window: red::window_at(start_unix_ns),
                    bt: &trace.bt,
                    operation: &span.operation,
                    kind: span.kind,
                    stage: red::stage(span.kind, &span.component),
                    error,
                };
                red.record(key, duration_ns.div_ceil(1000));
                if trace.sampled && !keep {
                    dropped += 1;
                } else if trace.sampled {
                    let bt = &mut bt_ids[span.trace as usize];
                    if *bt == u32::MAX {
                        *bt = dictionary.id_shared(&trace.bt);
                    }
                    let times = (start_unix_ns, duration_ns);
                    write_span(&mut written, dictionary, span, trace.trace_id, *bt, times);
                    span_count += 1;
                }
            }
        });
        self.agent.dropped_spans.fetch_add(dropped, Ordering::Relaxed);
        if span_count == 0 {
            return;
        }
        // Held for as long as the collector is away: no spare capacity (shrinking in place
        // copies nothing).
        written.shrink_to_fit();
        self.pending_spans += span_count;
        self.pending_bytes += written.len();
        self.pending.push_back(Pending {
            batch_id: 0,
            spans: Bytes::from(written),
            span_count,
            histograms: Vec::new(),
        });
        // Over a cap: exactly the excess goes, oldest spans first. RED is never dropped: a
        // discarded batch's histograms go back to be sent again.
        let (max_spans, max_bytes) = (self.config.max_pending_spans, self.config.max_pending_bytes);
        while self.pending_spans > max_spans || self.pending_bytes > max_bytes {
            let excess_spans = self.pending_spans.saturating_sub(max_spans);
            let excess_bytes = self.pending_bytes.saturating_sub(max_bytes);
            let Some(oldest) = self.pending.front_mut() else { break };
            let (mut cut, mut cut_bytes) = (0, 0);
            for end in wire::span_ends(&oldest.spans) {
                if cut >= excess_spans && cut_bytes >= excess_bytes {
                    break;
                }
                cut += 1;
                cut_bytes = end;
            }
            // A copy of what stays, so that what goes is freed now.
            oldest.spans = Bytes::copy_from_slice(&oldest.spans[cut_bytes..]);
            oldest.span_count -= cut;
            self.pending_spans -= cut;
            self.pending_bytes -= cut_bytes;
            self.agent.dropped_spans.fetch_add(cut as u64, Ordering::Relaxed);
            if oldest.span_count == 0 {
                let emptied = self.pending.pop_front().expect("front exists");
                for (key, value) in emptied.histograms {
                    self.red.add(key, value);
                }
            } else if cut == 0 {
                break; // nothing to cut (cannot happen: every span was written by `wire`)
            }
        }
    }

    /// Cuts the not-yet-sent pending spans (batch id 0), and `with_red` the RED so far, into
    /// batches of at most [`MAX_BATCH_SPANS`] spans (well under the collector's message limit);
    /// returns where they are in `pending` (at its end).
    fn cut_batches(&mut self, with_red: bool) -> std::ops::Range<usize> {
        let mut unsent = Vec::new();
        while self.pending.back().is_some_and(|p| p.batch_id == 0) {
            unsent.push(self.pending.pop_back().expect("checked"));
        }
        let first = self.pending.len();
        for drained in unsent.into_iter().rev() {
            if drained.span_count <= MAX_BATCH_SPANS {
                // The usual case, one drain's spans: they are the batch, unmoved.
                self.push_batch(drained.spans, drained.span_count);
                continue;
            }
            let (mut start, mut count) = (0, 0);
            let ends: Vec<usize> = wire::span_ends(&drained.spans).collect();
            for (i, end) in ends.iter().enumerate() {
                count += 1;
                if count == MAX_BATCH_SPANS || i + 1 == ends.len() {
                    self.push_batch(drained.spans.slice(start..*end), count);
                    (start, count) = (*end, 0);
                }
            }
        }
        if !with_red {
            return first..self.pending.len();
        }
        self.red_due = std::time::Instant::now() + RED_SEND_INTERVAL;
        let histograms = self.red.drain();
        if !histograms.is_empty() {
            if self.pending.len() == first {
                self.push_batch(Bytes::new(), 0);
            }
            self.pending.back_mut().expect("one at least").histograms = histograms;
        }
        first..self.pending.len()
    }

    fn push_batch(&mut self, spans: Bytes, span_count: usize) {
        self.next_batch_id += 1;
        self.sent_spans += span_count as u64;
        self.pending.push_back(Pending {
            batch_id: self.next_batch_id,
            spans,
            span_count,
            histograms: Vec::new(),
        });
    }

    fn acknowledge(&mut self, batch_id: u64) {
        if let Some(i) = self.pending.iter().position(|p| p.batch_id == batch_id) {
            let done = self.pending.remove(i).expect("found");
            self.pending_spans -= done.span_count;
            self.pending_bytes -= done.spans.len();
        }
    }

    fn resource(&mut self) -> Resource {
        let dictionary = &mut self.dictionary;
        Resource {
            service: dictionary.id(self.agent.service()),
            service_version: dictionary.id(&self.agent.version),
            instance: dictionary.id(&self.agent.instance),
        }
    }

    /// The message of pending batch `index`, for the current stream.
    fn batch_message(&mut self, index: usize) -> Encoded {
        let resource = self.resource();
        let batch = &self.pending[index];
        let dictionary = &mut self.dictionary;
        let histograms: Vec<LatencyHistogram> = batch
            .histograms
            .iter()
            .map(|(k, v)| {
                let (bucket_micros, bucket_counts) = v.sorted_buckets();
                LatencyHistogram {
                    window_unix_seconds: k.window,
                    business_transaction: dictionary.id_shared(&k.bt),
                    operation: dictionary.id_name(&k.operation),
                    kind: kind(k.kind) as i32,
                    stage: dictionary.id_static(k.stage),
                    status: if k.error { WireStatus::Error } else { WireStatus::Unset } as i32,
                    calls: v.calls,
                    errors: v.errors,
                    bucket_micros,
                    bucket_counts,
                    sum_micros: v.sum_micros,
                }
            })
            .collect();
        wire::batch_message(
            batch.batch_id,
            batch.spans.clone(),
            dictionary.unsent(),
            &resource,
            &histograms,
        )
    }

    /// Transactions open longer than the threshold, with the call each is inside. Sent once and
    /// not kept: a snapshot is about now, and an old one must not be resent after a reconnect.
    fn inflight_snapshot(&mut self) -> Option<Encoded> {
        let threshold = clock::ticks_in_ns(self.config.inflight_threshold.as_nanos() as u64);
        let stuck = inflight::older_than(clock::now_raw().saturating_sub(threshold));
        if stuck.is_empty() {
            return None;
        }
        let resource = self.resource();
        let dictionary = &mut self.dictionary;
        let inflight = stuck
            .iter()
            .map(|(trace, call)| InflightTransaction {
                trace_id: trace.trace_id.to_be_bytes().to_vec(),
                span_id: trace.entry_span_id,
                business_transaction: dictionary.id(&trace.bt),
                operation: dictionary.id(&trace.entry_operation),
                start_unix_nanos: clock::unix_ns(trace.start_raw),
                current_span_operation: call.as_ref().map_or(0, |c| dictionary.id(&c.0)),
                current_span_peer: call.as_ref().map_or(0, |c| dictionary.id(&c.1)),
            })
            .collect();
        // An id of its own, never pending: its acknowledgement matches nothing.
        self.next_batch_id += 1;
        Some(Encoded::of(&AgentMessage {
            body: Some(agent_message::Body::Batch(Batch {
                batch_id: self.next_batch_id,
                new_strings: dictionary.unsent().to_vec(),
                resource: Some(resource),
                spans: vec![],
                histograms: vec![],
                inflight,
            })),
        }))
    }

    fn heartbeat(&mut self) -> Encoded {
        // Heartbeats add no strings: the resource goes only once a batch told the stream its
        // strings.
        let resource = self.resource();
        let told = [resource.service, resource.service_version, resource.instance]
            .into_iter()
            .all(|id| self.dictionary.is_sent(id));
        Encoded::of(&AgentMessage {
            body: Some(agent_message::Body::Heartbeat(Heartbeat {
                resource: told.then_some(resource),
                unix_millis: crate::clock::unix_ns(crate::clock::now_raw()) / 1_000_000,
                queue_depth: self.agent.queued_batches() as u64,
                dropped_spans: self.agent.dropped_spans.load(Ordering::Relaxed),
                sent_spans: self.sent_spans,
            })),
        })
    }
}

/// One sampled span appended to `buf` as a `Batch.spans` field, its names as dictionary ids.
fn write_span(
    buf: &mut Vec<u8>,
    dictionary: &mut Dictionary,
    span: &Record,
    trace_id: u128,
    bt: u32,
    (start_unix_ns, duration_ns): (u64, u64),
) {
    let detail = span.detail.as_deref();
    let error = detail.and_then(|d| d.error.as_ref());
    let caller = detail.and_then(|d| d.caller.as_ref());
    let fields = SpanFields {
        trace_id,
        span_id: span.span_id,
        parent_span_id: span.parent_span_id,
        operation: dictionary.id_name(&span.operation),
        kind: kind(span.kind) as i32,
        component: dictionary.id_name(&span.component),
        peer: dictionary.id_name(&span.peer),
        business_transaction: bt,
        start_unix_nanos: start_unix_ns,
        duration_nanos: duration_ns,
        status: if error.is_some() {
            WireStatus::Error
        } else {
            WireStatus::Unset
        } as i32,
        error_type: error.map_or(0, |e| dictionary.id_name(&e.0)),
        error_message: error.map_or("", |e| e.1.as_str()),
        caller_service: caller.map_or(0, |c| dictionary.id(&c.0)),
        caller_operation: caller.map_or(0, |c| dictionary.id(&c.1)),
        http_status: span.http_status,
        http_status_key: if span.http_status == 0 {
            0
        } else {
            dictionary.id_static(HTTP_STATUS_KEY)
        },
    };
    // Keys get their ids first: the writer goes over the attributes twice.
    let attributes = detail.map_or(&[][..], |d| &d.attributes[..]);
    for (key, _) in attributes {
        dictionary.id_name(key);
    }
    let known: &Dictionary = dictionary;
    wire::write_span(
        buf,
        &fields,
        attributes.iter().map(|(key, value)| (known.known(key), value.as_str())),
    );
}

fn kind(kind: Kind) -> SpanKind {
    match kind {
        Kind::Internal => SpanKind::Internal,
        Kind::Server => SpanKind::Server,
        Kind::Client => SpanKind::Client,
        Kind::Producer => SpanKind::Producer,
        Kind::Consumer => SpanKind::Consumer,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prost::Message;

    use super::*;
    use crate::span::{Batch as Handoff, Detail, Record, TraceCtx};

    #[test]
    fn filling_rings_drain_early_but_at_most_once_a_gap() {
        let start = tokio::time::Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut drains = Drains::new(Duration::from_secs(1), start);
        assert_eq!(drains.at(at(0)), Drain::Flush, "the first flush is at once");
        assert_eq!(drains.next(), at(1000), "nothing else is due before the next flush");
        assert!(!drains.asked(at(10)), "asked within the gap after a drain: deferred");
        assert_eq!(drains.next(), at(100), "the deferred drain is due at the gap's end");
        assert_eq!(drains.at(at(50)), Drain::None);
        assert_eq!(drains.at(at(100)), Drain::Early);
        assert_eq!(drains.next(), at(1000), "done: the flush is next");
        assert!(drains.asked(at(300)), "asked past the gap: drained at once");
        assert_eq!(drains.at(at(1000)), Drain::Flush);
        assert_eq!(drains.at(at(3500)), Drain::Flush, "a late wake-up still flushes");
        assert_eq!(
            drains.next(),
            at(4500),
            "missed flushes are skipped, not run in a burst"
        );
    }

    #[test]
    fn red_counts_every_span_under_its_own_key_static_names_or_not() {
        let mut red = RedTable::default();
        let operations: Vec<Name> = (0..200)
            .map(|i| {
                if i % 2 == 0 {
                    Name::Borrowed(Box::leak(format!("GET /red/{i}").into_boxed_str()))
                } else {
                    Name::Owned(format!("GET /red/{i}"))
                }
            })
            .collect();
        let bt = SharedName::Static("Login");
        // Keys by the hundred (more than the cache's slots), each recorded window by window.
        for round in 0..3u64 {
            for window in [10, 20] {
                for (i, operation) in operations.iter().enumerate() {
                    let error = i % 3 == 0;
                    let key = KeyParts {
                        window,
                        bt: &bt,
                        operation,
                        kind: Kind::Server,
                        stage: "own",
                        error,
                    };
                    red.record(key, 100 + round);
                }
            }
        }
        // The same text as an owned and as a static name is one key.
        let shared = SharedName::Shared("Login".into());
        let key = KeyParts {
            window: 10,
            bt: &shared,
            operation: &operations[0],
            kind: Kind::Server,
            stage: "own",
            error: true,
        };
        red.record(key, 1);
        let drained = red.drain();
        assert_eq!(drained.len(), 400, "one key per window and operation");
        for (key, value) in &drained {
            let first = key.window == 10 && key.operation == operations[0];
            assert_eq!(value.calls, if first { 4 } else { 3 }, "{key:?}");
            assert_eq!(value.errors, if key.error { value.calls } else { 0 });
        }
        assert!(red.drain().is_empty(), "drained once");
    }

    /// An agent of its own (not the process's), and `spans` sampled spans of `attribute_bytes`
    /// each handed to it from one thread.
    fn handed_off(spans: u64, attribute_bytes: usize) -> &'static Agent {
        let agent: &'static Agent = Box::leak(Box::new(Agent::new(
            "test".into(),
            "1".into(),
            "test-1".into(),
            100_000,
            1.0,
        )));
        let mut ring = agent.new_ring();
        let trace = Arc::new(TraceCtx {
            trace_id: 7,
            sampled: true,
            bt: SharedName::Static("Import"),
            entry_operation: SharedName::Static("POST /import"),
            entry_span_id: 1,
            start_raw: 0,
            current_call: Default::default(),
            inflight_slot: Default::default(),
        });
        let mut batch = Handoff::default();
        batch.traces.push(trace);
        for span_id in 1..=spans {
            batch.push(Record {
                trace: 0,
                kind: Kind::Client,
                entry: false,
                span_id,
                parent_span_id: 0,
                start_raw: crate::clock::now_raw(),
                end_raw: crate::clock::now_raw(),
                http_status: 0,
                operation: Name::Borrowed("INSERT row"),
                component: Name::Borrowed("db"),
                peer: Name::Borrowed("postgres"),
                detail: Some(Box::new(Detail {
                    attributes: vec![(Name::Borrowed("db.query.text"), "x".repeat(attribute_bytes))],
                    ..Detail::default()
                })),
            });
        }
        ring.send(batch, agent);
        agent
    }

    #[test]
    fn pending_spans_stay_under_the_byte_cap_dropping_the_oldest() {
        let agent = handed_off(1000, 1000);
        let config = Config {
            max_pending_bytes: 100_000,
            ..Config::default()
        };
        let mut exporter = Exporter::new(config, agent);
        exporter.collect();
        assert!(
            exporter.pending_bytes <= 100_000,
            "{} bytes held",
            exporter.pending_bytes
        );
        assert!(
            exporter.pending_bytes > 90_000,
            "only the excess goes: {}",
            exporter.pending_bytes
        );
        let kept: Vec<u64> = exporter.pending.iter().flat_map(|p| span_ids(&p.spans)).collect();
        let dropped = agent.dropped_spans.load(Ordering::Relaxed);
        assert_eq!(dropped + kept.len() as u64, 1000);
        assert_eq!(kept.first(), Some(&(dropped + 1)), "the newest are kept");
        assert_eq!(kept.last(), Some(&1000));
        // RED counts every span, dropped or not.
        let calls: u64 = exporter.red.drain().iter().map(|(_, v)| v.calls).sum();
        assert_eq!(calls, 1000);
    }

    #[test]
    fn the_span_cap_and_the_byte_cap_both_hold() {
        let agent = handed_off(500, 10);
        let config = Config {
            max_pending_spans: 100,
            ..Config::default()
        };
        let mut exporter = Exporter::new(config, agent);
        exporter.collect();
        assert_eq!(exporter.pending_spans, 100);
        assert_eq!(agent.dropped_spans.load(Ordering::Relaxed), 400);
        let bytes: usize = exporter.pending.iter().map(|p| p.spans.len()).sum();
        assert_eq!(exporter.pending_bytes, bytes, "the byte count follows what is held");
        let kept: Vec<u64> = exporter.pending.iter().flat_map(|p| span_ids(&p.spans)).collect();
        assert_eq!(kept, (401..=500).collect::<Vec<_>>(), "the newest, whole");
    }

    #[test]
    fn with_no_room_every_sampled_span_is_dropped_and_counted_and_red_kept() {
        let agent = handed_off(300, 10);
        let config = Config {
            max_pending_spans: 0,
            ..Config::default()
        };
        let mut exporter = Exporter::new(config, agent);
        exporter.collect();
        assert!(exporter.pending.is_empty());
        assert_eq!((exporter.pending_spans, exporter.pending_bytes), (0, 0));
        assert_eq!(agent.dropped_spans.load(Ordering::Relaxed), 300);
        let calls: u64 = exporter.red.drain().iter().map(|(_, v)| v.calls).sum();
        assert_eq!(calls, 300);
    }

    #[test]
    fn a_large_drain_is_cut_into_bounded_batches_in_order_with_red_once() {
        let agent = handed_off(20_000, 10);
        let mut exporter = Exporter::new(Config::default(), agent);
        exporter.collect();
        let cut = exporter.cut_batches(true);
        assert_eq!(cut, 0..3);
        let counts: Vec<usize> = exporter.pending.iter().map(|p| p.span_count).collect();
        assert_eq!(counts, [MAX_BATCH_SPANS, MAX_BATCH_SPANS, 20_000 - 2 * MAX_BATCH_SPANS]);
        let ids: Vec<u64> = exporter.pending.iter().flat_map(|p| span_ids(&p.spans)).collect();
        assert_eq!(ids, (1..=20_000).collect::<Vec<_>>());
        let histograms: Vec<usize> = exporter.pending.iter().map(|p| p.histograms.len()).collect();
        assert_eq!(histograms, [0, 0, 1], "RED goes once, with the last batch");
        // Each message carries its batch's spans, and the first the strings they name.
        let first = exporter.batch_message(0).encode_to_vec();
        let second = exporter.batch_message(1).encode_to_vec();
        let decode = |bytes: &[u8]| match AgentMessage::decode(bytes).unwrap().body {
            Some(agent_message::Body::Batch(batch)) => batch,
            other => panic!("not a batch: {other:?}"),
        };
        let (first, second) = (decode(&first), decode(&second));
        assert_eq!(first.spans.len(), MAX_BATCH_SPANS);
        assert!(
            first.new_strings.contains(&"INSERT row".to_string()),
            "{:?}",
            first.new_strings
        );
        assert!(second.new_strings.is_empty(), "told once a stream");
        assert_eq!(second.spans[0].operation, first.spans[0].operation);
        assert_eq!(exporter.sent_spans, 20_000);
    }

    fn span_ids(spans: &[u8]) -> Vec<u64> {
        let batch = Batch::decode(spans).expect("pending spans decode");
        batch.spans.iter().map(|s| s.span_id).collect()
    }
}
