//! Async support: a span current on whichever thread polls the future.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use crate::span::Span;

pin_project_lite::pin_project! {
    /// A future running inside a span; see [`Span::instrument`].
    pub struct Instrumented<F> {
        #[pin]
        future: F,
        span: Option<Span>,
    }
}

impl<F> Instrumented<F> {
    pub(crate) fn new(span: Span, future: F) -> Self {
        Self {
            future,
            span: Some(span),
        }
    }
}

impl<F: Future> Future for Instrumented<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // The span ends as soon as its work is done, not when the wrapper is dropped.
        Span::poll_in_scope(this.span, || this.future.poll(cx), |_, _| {})
    }
}
