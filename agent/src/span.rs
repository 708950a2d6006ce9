//! Spans: RAII guards on the hot path.
//!
//! Starting a span reads the fast clock and takes an id; ending it pushes a record onto this
//! thread's buffer. The buffer goes to the exporter in one hand-off when the thread leaves
//! instrumented code (its stack of entered spans is empty) or holds [`FLUSH_AT`] spans. No lock,
//! no I/O, no allocation beyond the record. Whether a trace is recorded is decided once, at its
//! root, before any attribute exists; inside an unsampled trace a child span is a no-op.

use std::{borrow::Cow, cell::RefCell, sync::Arc};

use crate::{
    agent,
    clock::{self, ids},
    inflight::{self, InflightSlot},
    propagation::RemoteContext,
};

/// Names: static strings cost nothing, owned ones are kept as they are.
pub type Name = Cow<'static, str>;

/// Spans buffered per thread before a hand-off even when the thread stays busy.
pub const FLUSH_AT: usize = 128;

/// What kind of work a span measures (OpenTelemetry's span kinds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Internal = 1,
    /// Work entering the service: an HTTP route, an RPC method.
    Server = 2,
    /// A call out: database, cache, another service.
    Client = 3,
    Producer = 4,
    Consumer = 5,
}

/// A name every span of a trace shares: free to clone when static (the usual case: a BT or
/// route named in code), a reference count otherwise. Compared and hashed by its text.
#[derive(Clone, Debug)]
pub(crate) enum SharedName {
    Static(&'static str),
    Shared(Arc<str>),
}

impl SharedName {
    fn new(name: &Name) -> Self {
        match name {
            Cow::Borrowed(s) => Self::Static(s),
            Cow::Owned(s) => Self::Shared(Arc::from(s.as_str())),
        }
    }
}

impl std::ops::Deref for SharedName {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Self::Static(s) => s,
            Self::Shared(s) => s,
        }
    }
}

impl PartialEq for SharedName {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for SharedName {}

impl std::hash::Hash for SharedName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

/// The context children inherit: trace, parent, sampling, business transaction.
#[derive(Clone, Debug)]
pub(crate) struct Current {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
    pub bt: SharedName,
    /// The operation of this thread's entry span: the "caller operation" downstream.
    pub entry_operation: SharedName,
    /// The open transaction this span belongs to, for in-flight snapshots.
    pub inflight: Option<Arc<InflightSlot>>,
}

/// A finished span on its way to the exporter.
#[derive(Debug)]
pub(crate) struct Finished {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_span_id: u64,
    pub operation: Name,
    pub kind: Kind,
    pub component: Name,
    pub peer: Name,
    pub bt: SharedName,
    pub start_unix_ns: u64,
    pub duration_ns: u64,
    pub error: Option<Box<(Name, String)>>,
    pub attributes: Vec<(Name, String)>,
    pub caller: Option<Box<(String, String)>>,
    /// Unsampled entry spans travel too, for exact RED, but are not stored as spans.
    pub sampled: bool,
}

#[derive(Default)]
struct Local {
    stack: Vec<Current>,
    buffer: Vec<Finished>,
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local::default());
}

fn current() -> Option<Current> {
    LOCAL.with(|l| l.borrow().stack.last().cloned())
}

/// Describes a span before it starts. Made by [`crate::transaction`] and [`crate::span`].
#[must_use = "a builder does nothing until started"]
pub struct SpanBuilder {
    operation: Name,
    kind: Kind,
    component: Name,
    peer: Name,
    bt: Option<Name>,
    remote: Option<RemoteContext>,
    /// A parent given explicitly instead of this thread's current span.
    parent: Option<Current>,
}

impl SpanBuilder {
    pub(crate) fn new(operation: Name, kind: Kind, bt: Option<Name>) -> Self {
        Self {
            operation,
            kind,
            component: Cow::Borrowed(""),
            peer: Cow::Borrowed(""),
            bt,
            remote: None,
            parent: None,
        }
    }

    /// The operation, when it differs from the name given: a route template, never a raw URL.
    pub fn operation(mut self, operation: impl Into<Name>) -> Self {
        self.operation = operation.into();
        self
    }

    pub fn kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }

    /// A call to `peer` (`redis`, `postgres:orders`, `auth`) through `component` (`db`,
    /// `cache`, `mq`, `http`, `grpc`).
    pub fn client(mut self, component: impl Into<Name>, peer: impl Into<Name>) -> Self {
        self.kind = Kind::Client;
        self.component = component.into();
        self.peer = peer.into();
        self
    }

    /// Names the business transaction this span starts (for an entry span). Ignored when the
    /// caller already named one in baggage: downstream services serve the caller's BT.
    pub fn business_transaction(mut self, name: impl Into<Name>) -> Self {
        self.bt = Some(name.into());
        self
    }

    /// Starts the span under `parent` rather than under this thread's current span.
    #[cfg_attr(not(feature = "tracing-layer"), allow(dead_code))]
    pub(crate) fn parent(mut self, parent: Option<Current>) -> Self {
        self.parent = parent;
        self
    }

    /// Continues a trace that came from another service (see [`crate::propagation::extract`]).
    pub fn child_of(mut self, remote: Option<RemoteContext>) -> Self {
        self.remote = remote;
        self
    }

    /// Starts the span without entering it: for async work (see [`Span::instrument`]) or when
    /// the guard moves across threads.
    pub fn start(mut self) -> Span {
        let Some(agent) = agent::get() else {
            return Span { data: None };
        };
        // One look at this thread's stack: inside an unsampled trace a child is a no-op.
        let remote_given = self.remote.is_some();
        let parent = match self.parent.take() {
            Some(p) if !p.sampled => Err(()),
            Some(p) => Ok(Some(p)),
            None => LOCAL.with(|l| match l.borrow().stack.last() {
                Some(c) if !c.sampled && !remote_given => Err(()),
                other => Ok(other.cloned()),
            }),
        };
        let Ok(parent) = parent else { return Span { data: None } };
        let (trace_id, parent_span_id, sampled, bt, entry_operation, caller, entry) = match (&parent, self.remote) {
            (Some(p), _) => (
                p.trace_id,
                p.span_id,
                p.sampled,
                p.bt.clone(),
                p.entry_operation.clone(),
                None,
                false,
            ),
            (None, Some(remote)) => {
                let bt = match (&self.bt, remote.bt) {
                    (_, Some(inherited)) => SharedName::Shared(inherited.into()),
                    (Some(named), None) => SharedName::new(named),
                    (None, None) => SharedName::new(&self.operation),
                };
                let caller = match (remote.caller_service, remote.caller_operation) {
                    (Some(s), o) => Some(Box::new((s, o.unwrap_or_default()))),
                    _ => None,
                };
                (
                    remote.trace_id,
                    remote.parent_span_id,
                    remote.sampled,
                    bt,
                    SharedName::new(&self.operation),
                    caller,
                    true,
                )
            }
            (None, None) => {
                let bt = SharedName::new(self.bt.as_ref().unwrap_or(&self.operation));
                let sampled = ids::sample(agent.sampling_ratio());
                (
                    ids::trace_id(),
                    0,
                    sampled,
                    bt,
                    SharedName::new(&self.operation),
                    None,
                    true,
                )
            }
        };
        if !sampled && !entry {
            return Span { data: None };
        }
        let span_id = ids::next_u64();
        let start_raw = clock::now_raw();
        let inflight = if entry {
            let slot = Arc::new(InflightSlot {
                trace_id,
                span_id,
                bt: bt.clone(),
                operation: entry_operation.clone(),
                start_unix_ns: clock::unix_ns(start_raw),
                current_call: std::sync::Mutex::new(None),
            });
            inflight::register(slot.clone());
            Some(slot)
        } else {
            let slot = parent.and_then(|p| p.inflight);
            if let (Kind::Client, Some(slot)) = (self.kind, &slot) {
                if let Ok(mut call) = slot.current_call.lock() {
                    *call = Some((self.operation.clone(), self.peer.clone()));
                }
            }
            slot
        };
        Span {
            data: Some(SpanData {
                current: Current {
                    trace_id,
                    span_id,
                    sampled,
                    bt,
                    entry_operation,
                    inflight,
                },
                parent_span_id,
                operation: self.operation,
                kind: self.kind,
                component: self.component,
                peer: self.peer,
                start_raw,
                attributes: Vec::new(),
                error: None,
                caller,
                entry,
            }),
        }
    }

    /// Starts the span and makes it the current one on this thread until the guard drops: for
    /// synchronous code.
    pub fn entered(self) -> EnteredSpan {
        let span = self.start();
        if let Some(data) = &span.data {
            LOCAL.with(|l| l.borrow_mut().stack.push(data.current.clone()));
        }
        EnteredSpan { span }
    }
}

struct SpanData {
    current: Current,
    parent_span_id: u64,
    operation: Name,
    kind: Kind,
    component: Name,
    peer: Name,
    start_raw: u64,
    attributes: Vec<(Name, String)>,
    error: Option<Box<(Name, String)>>,
    caller: Option<Box<(String, String)>>,
    /// The entry span of its service: registered as an open transaction while it runs.
    entry: bool,
}

/// A running span; it ends when dropped. Disabled (free) when the agent is not running or the
/// trace is not sampled.
pub struct Span {
    data: Option<SpanData>,
}

impl Span {
    /// Whether this span is recorded.
    pub fn is_recording(&self) -> bool {
        self.data.as_ref().is_some_and(|d| d.current.sampled)
    }

    /// Adds an attribute; costs nothing when the span is not recorded.
    pub fn set_attribute(&mut self, key: impl Into<Name>, value: impl ToString) {
        if let Some(data) = self.data.as_mut().filter(|d| d.current.sampled) {
            data.attributes.push((key.into(), value.to_string()));
        }
    }

    /// Marks the span failed, with an error type (`Timeout`, `sqlx::Error`) and message.
    pub fn set_error(&mut self, error_type: impl Into<Name>, message: impl ToString) {
        if let Some(data) = self.data.as_mut() {
            data.error = Some(Box::new((error_type.into(), message.to_string())));
        }
    }

    /// The business transaction this span serves, if it is running.
    pub fn business_transaction(&self) -> Option<&str> {
        self.data.as_ref().map(|d| &*d.current.bt)
    }

    /// The trace id, as 32 hex digits.
    pub fn trace_id(&self) -> Option<String> {
        self.data.as_ref().map(|d| format!("{:032x}", d.current.trace_id))
    }

    pub(crate) fn current(&self) -> Option<&Current> {
        self.data.as_ref().map(|d| &d.current)
    }

    /// Runs `f` with this span current on this thread: spans started inside are its children.
    pub fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        let entered = self.current().map(|c| {
            push(c.clone());
            c.span_id
        });
        let result = f();
        if let Some(id) = entered {
            pop(id);
        }
        result
    }

    /// Runs `future` with this span current on every poll, and ends the span when the future
    /// completes or is dropped.
    pub fn instrument<F: std::future::Future>(self, future: F) -> crate::future::Instrumented<F> {
        crate::future::Instrumented::new(self, future)
    }

    /// Ends the span now.
    pub fn end(self) {}
}

impl Drop for Span {
    fn drop(&mut self) {
        let Some(data) = self.data.take() else { return };
        let end_raw = clock::now_raw();
        if data.entry {
            inflight::unregister(data.current.span_id);
        } else if let (Kind::Client, Some(slot)) = (data.kind, &data.current.inflight) {
            if let Ok(mut call) = slot.current_call.lock() {
                *call = None;
            }
        }
        let finished = Finished {
            trace_id: data.current.trace_id,
            span_id: data.current.span_id,
            parent_span_id: data.parent_span_id,
            operation: data.operation,
            kind: data.kind,
            component: data.component,
            peer: data.peer,
            bt: data.current.bt,
            start_unix_ns: clock::unix_ns(data.start_raw),
            duration_ns: clock::delta_ns(data.start_raw, end_raw),
            error: data.error,
            attributes: data.attributes,
            caller: data.caller,
            sampled: data.current.sampled,
        };
        LOCAL.with(|l| {
            let mut local = l.borrow_mut();
            local.buffer.push(finished);
            if local.stack.is_empty() || local.buffer.len() >= FLUSH_AT {
                flush(&mut local.buffer);
            }
        });
    }
}

/// A span that is current on this thread; ends (and stops being current) when dropped.
pub struct EnteredSpan {
    span: Span,
}

impl std::ops::Deref for EnteredSpan {
    type Target = Span;
    fn deref(&self) -> &Span {
        &self.span
    }
}

impl std::ops::DerefMut for EnteredSpan {
    fn deref_mut(&mut self) -> &mut Span {
        &mut self.span
    }
}

impl Drop for EnteredSpan {
    fn drop(&mut self) {
        if let Some(current) = self.span.current() {
            pop(current.span_id);
        }
        // The span itself ends right after, in Span's Drop.
    }
}

pub(crate) fn push(current: Current) {
    LOCAL.with(|l| l.borrow_mut().stack.push(current));
}

/// Removes `span_id` from this thread's stack (normally the top); flushes when the thread
/// leaves instrumented code.
pub(crate) fn pop(span_id: u64) {
    LOCAL.with(|l| {
        let mut local = l.borrow_mut();
        if let Some(i) = local.stack.iter().rposition(|c| c.span_id == span_id) {
            local.stack.remove(i);
        }
        if local.stack.is_empty() && !local.buffer.is_empty() {
            flush(&mut local.buffer);
        }
    });
}

/// The context to propagate: the current span on this thread.
pub(crate) fn current_context() -> Option<Current> {
    current()
}

fn flush(buffer: &mut Vec<Finished>) {
    match agent::get() {
        Some(agent) => {
            // A recycled buffer: growing a fresh one per hand-off cost more than the spans.
            let batch = std::mem::replace(buffer, agent.spare_buffer());
            agent.hand_off(batch);
        }
        None => buffer.clear(),
    }
}
