//! [`ResponseFuture`].

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::Response;
use pin_project_lite::pin_project;

use crate::{
    ResponseBody,
    background::{Background, Lifeline},
    claim::BoxFuture,
};

type KeyedFuture<B, E> = BoxFuture<Result<Response<ResponseBody<B>>, E>>;

pin_project! {
    /// The future returned by [`Idempotency`](crate::Idempotency).
    ///
    /// Requests the layer does not protect poll the inner future directly.
    /// A protected request, once it has started claiming its key, runs to
    /// completion even if this future is dropped (the client went away): the
    /// rest of the work moves into a background task (bounded by the maximum
    /// execution time, and drained on shutdown), and its response is recorded
    /// for the retry that will follow. Dropped before that (while its body is
    /// read, or while it waits for another request with its key), it simply
    /// ends; dropped while a claim is under way, it ends once that claim
    /// finds the key taken (in wait mode too), and a claim that lands at a
    /// drain's deadline is released unrun.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Passthrough { #[pin] future: F },
        Ready { response: Option<Box<Response<ResponseBody<B>>>> },
        Keyed { keyed: Keyed<B, E> },
    }
}

/// The boxed request path of a protected request; moves into a task if
/// dropped once its key is being claimed.
struct Keyed<B, E> {
    future: Option<KeyedFuture<B, E>>,
    lifeline: Arc<Lifeline>,
    background: Arc<Background>,
    detach: fn(KeyedFuture<B, E>, Arc<Lifeline>, &Arc<Background>),
}

impl<B, E> Keyed<B, E> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<ResponseBody<B>>, E>> {
        // Out of `self` while it is polled: if it panics, it is dropped as
        // the panic unwinds (releasing its claim), and is never polled
        // again, even when an outer layer such as tower-http's
        // `CatchPanicLayer` catches the panic and drops this future later.
        let mut future = self
            .future
            .take()
            .expect("ResponseFuture polled after completion");
        let poll = future.as_mut().poll(cx);
        if poll.is_pending() {
            self.future = Some(future);
        }
        poll
    }
}

impl<B, E> Drop for Keyed<B, E> {
    fn drop(&mut self) {
        // Still here only if it never panicked: a panicking future is
        // dropped by `poll` as the panic unwinds.
        if let Some(future) = self.future.take()
            && self.lifeline.is_detachable()
        {
            self.lifeline.detach();
            (self.detach)(future, self.lifeline.clone(), &self.background);
        }
    }
}

/// Finishes an abandoned request in the background. Its response is dropped
/// there, which in turn drains and records a teed body.
fn detach_keyed<B, E>(
    mut future: KeyedFuture<B, E>,
    lifeline: Arc<Lifeline>,
    background: &Arc<Background>,
) where
    B: Send + 'static,
    E: Send + 'static,
{
    let shared = background.clone();
    let work = async move {
        tokio::select! {
            biased;
            _ = &mut future => return,
            () = shared.abandoned() => {}
        }
        // Past a drain's deadline: polled once more, the path sees it and
        // settles.
        lifeline.settle();
        let _ = future.await;
    };
    if !background.spawn_detached(work) {
        tracing::warn!("request dropped outside a tokio runtime; its claim ends with its lease");
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(future: F) -> Self {
        ResponseFuture {
            kind: Kind::Passthrough { future },
        }
    }

    pub(crate) fn ready(response: Response<ResponseBody<B>>) -> Self {
        ResponseFuture {
            kind: Kind::Ready {
                // Boxed: rejections are rare, and an unboxed response would
                // make every pass-through future larger.
                response: Some(Box::new(response)),
            },
        }
    }

    pub(crate) fn keyed(
        future: KeyedFuture<B, E>,
        lifeline: Arc<Lifeline>,
        background: Arc<Background>,
    ) -> Self
    where
        B: Send + 'static,
        E: Send + 'static,
    {
        ResponseFuture {
            kind: Kind::Keyed {
                keyed: Keyed {
                    future: Some(future),
                    lifeline,
                    background,
                    detach: detach_keyed::<B, E>,
                },
            },
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match &self.kind {
            Kind::Passthrough { .. } => "ResponseFuture::Passthrough",
            Kind::Ready { .. } => "ResponseFuture::Ready",
            Kind::Keyed { .. } => "ResponseFuture::Keyed",
        })
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => future
                .poll(cx)
                .map(|result| result.map(|response| response.map(ResponseBody::inner))),
            KindProj::Ready { response } => Poll::Ready(Ok(*response
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::Keyed { keyed } => keyed.poll(cx),
        }
    }
}
