//! `tracing` spans as Sightline spans (feature `tracing-layer`).
//!
//! Each `tracing` span becomes a span under its `tracing` parent (or, for a root, under the
//! thread's current Sightline span, such as the transaction a server layer started). Entering
//! it makes it current, so Sightline spans created inside attach to it. Fields with meaning:
//! `bt` names the business transaction, `component` and `peer` make it a call out, `otel.kind`
//! (`server`, `client`, `producer`, `consumer`) sets the kind; the rest become attributes. An
//! ERROR event inside marks the span failed.
//!
//! ```no_run
//! use tracing_subscriber::layer::SubscriberExt;
//! tracing::subscriber::set_global_default(tracing_subscriber::registry().with(sightline::tracing_layer::SightlineLayer))
//!     .unwrap();
//! ```

use std::fmt::Debug;

use tracing::{
    field::{Field, Visit},
    span::{Attributes, Id},
    Event, Level, Subscriber,
};
use tracing_subscriber::{layer::Context, registry::LookupSpan, Layer};

use crate::span::{self, Kind, Name, Span, SpanBuilder};

/// The layer; add it to a `tracing_subscriber::registry()`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SightlineLayer;

/// What a span's fields say.
#[derive(Default)]
struct Fields {
    bt: Option<String>,
    component: Option<String>,
    peer: Option<String>,
    kind: Option<Kind>,
    attributes: Vec<(Name, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.record(field, format!("{value:?}"));
    }
}

impl Fields {
    fn record(&mut self, field: &Field, value: String) {
        match field.name() {
            "bt" => self.bt = Some(value),
            "component" => self.component = Some(value),
            "peer" => self.peer = Some(value),
            "otel.kind" => {
                self.kind = match value.as_str() {
                    "server" => Some(Kind::Server),
                    "client" => Some(Kind::Client),
                    "producer" => Some(Kind::Producer),
                    "consumer" => Some(Kind::Consumer),
                    _ => Some(Kind::Internal),
                }
            }
            name => self.attributes.push((Name::Borrowed(name), value)),
        }
    }
}

/// Stored in the `tracing` span's extensions: the Sightline span it stands for.
struct Mirrored(Span);

/// The message of an ERROR event.
#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S> Layer<S> for SightlineLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span_ref) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attributes.record(&mut fields);
        let parent = span_ref
            .parent()
            .and_then(|p| p.extensions().get::<Mirrored>().and_then(|m| m.0.current()));
        let kind = fields.kind.unwrap_or(if fields.peer.is_some() {
            Kind::Client
        } else {
            Kind::Internal
        });
        let mut builder = SpanBuilder::new(Name::Borrowed(span_ref.name()), kind, None).parent(parent);
        if let (Some(component), Some(peer)) = (fields.component, fields.peer) {
            builder = builder.client(component, peer);
        }
        if let Some(bt) = fields.bt {
            builder = builder.business_transaction(bt);
        }
        let mut mirrored = builder.start();
        for (key, value) in fields.attributes {
            mirrored.set_attribute(key, value);
        }
        span_ref.extensions_mut().insert(Mirrored(mirrored));
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(span_ref) = ctx.span(id) {
            if let Some(current) = span_ref.extensions().get::<Mirrored>().and_then(|m| m.0.current()) {
                span::push_frame(current.span_id, &current.trace);
            }
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(span_ref) = ctx.span(id) {
            if let Some(span_id) = span_ref
                .extensions()
                .get::<Mirrored>()
                .and_then(|m| m.0.current().map(|c| c.span_id))
            {
                span::pop(span_id);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        if *event.metadata().level() != Level::ERROR {
            return;
        }
        let Some(span_ref) = ctx.event_span(event) else { return };
        let mut message = Message::default();
        event.record(&mut message);
        let mut extensions = span_ref.extensions_mut();
        if let Some(mirrored) = extensions.get_mut::<Mirrored>() {
            mirrored.0.set_error("error", message.0);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span_ref) = ctx.span(&id) {
            // Dropping the Sightline span ends it.
            span_ref.extensions_mut().remove::<Mirrored>();
        }
    }
}
