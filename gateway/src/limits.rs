//! What clients may hold of the gateway at once: requests in progress and
//! bytes of keyed bodies read whole, past either of which a request is
//! answered 503 at once (never queued, never dropped) and nothing is
//! forwarded; and how long a body may take.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};

use crate::forward::{BoxError, GatewayBody, problem};

/// Bytes are reserved in units of this many.
const UNIT: usize = 1024;

/// The gateway's bounds, shared by every connection.
#[derive(Debug)]
pub(crate) struct Limits {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_units: usize,
    body_limit: usize,
}

/// What a request holds until its response head is ready.
#[derive(Debug)]
pub(crate) struct Held {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Limits {
    pub(crate) fn new(max_requests: usize, max_buffered_bytes: usize, body_limit: usize) -> Self {
        let max_units = max_buffered_bytes
            .div_ceil(UNIT)
            .min(Semaphore::MAX_PERMITS)
            .min(u32::MAX as usize);
        Limits {
            requests: Arc::new(Semaphore::new(max_requests.min(Semaphore::MAX_PERMITS))),
            bytes: Arc::new(Semaphore::new(max_units)),
            max_units,
            body_limit,
        }
    }

    /// A place for one request, and for a keyed one (`buffered`) room for
    /// its body: its `Content-Length`, or the body limit without one.
    pub(crate) fn admit(&self, headers: &HeaderMap, buffered: bool) -> Result<Held, Overloaded> {
        let request = self
            .requests
            .clone()
            .try_acquire_owned()
            .map_err(|_| Overloaded::Requests)?;
        let bytes = if buffered {
            let length = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(self.body_limit)
                .min(self.body_limit);
            // Larger than the limit is the layer's 413; at least one unit.
            let units = length.div_ceil(UNIT).clamp(1, self.max_units.max(1));
            let units = u32::try_from(units).unwrap_or(u32::MAX);
            Some(
                self.bytes
                    .clone()
                    .try_acquire_many_owned(units)
                    .map_err(|_| Overloaded::Bytes)?,
            )
        } else {
            None
        };
        Ok(Held {
            _request: request,
            _bytes: bytes,
        })
    }
}

/// Which bound a request met.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Overloaded {
    Requests,
    Bytes,
}

impl Overloaded {
    /// 503 `overloaded`, `Retry-After: 1`: nothing was forwarded, and a
    /// retry with the same key is safe.
    pub(crate) fn response(self) -> http::Response<GatewayBody> {
        let detail = match self {
            Overloaded::Requests => {
                "The gateway has as many requests in progress as it accepts; nothing was forwarded. Retry shortly (with the same key)."
            }
            Overloaded::Bytes => {
                "The gateway holds as many request bodies as it accepts; nothing was forwarded. Retry shortly (with the same key)."
            }
        };
        let mut response = problem(StatusCode::SERVICE_UNAVAILABLE, "overloaded", detail);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        response
    }
}

pin_project_lite::pin_project! {
    /// A request body that must keep coming: cut (with an error, so nothing
    /// is forwarded as if it had ended) when no frame arrives for `idle`,
    /// and, for a body read whole (a keyed one), when it has not ended
    /// `idle` after the request began. The timer is made only once the body
    /// makes us wait.
    #[derive(Debug)]
    pub(crate) struct Deadline<B> {
        #[pin]
        inner: B,
        idle: Duration,
        last: Instant,
        whole_by: Option<Instant>,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

/// The error a cut body ends with.
#[derive(Debug)]
pub(crate) struct BodyTimedOut(Duration);

impl fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the request body did not arrive within {:?}", self.0)
    }
}

impl std::error::Error for BodyTimedOut {}

impl<B> Deadline<B> {
    pub(crate) fn new(inner: B, idle: Duration, whole: bool) -> Self {
        let now = Instant::now();
        Deadline {
            inner,
            idle,
            last: now,
            whole_by: whole.then(|| now + idle),
            timer: None,
        }
    }

    fn due(last: Instant, idle: Duration, whole_by: Option<Instant>) -> Instant {
        let idle_by = last + idle;
        whole_by.map_or(idle_by, |whole| whole.min(idle_by))
    }
}

impl<B> Body for Deadline<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            if this.timer.is_some() {
                *this.last = Instant::now();
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.timer.is_none() {
            // The first wait: the idle time counts from now.
            *this.last = Instant::now();
        }
        let due = Self::due(*this.last, *this.idle, *this.whole_by);
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        // Reset to the latest due time before each poll: ready means it
        // passed with no frame since.
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut(*this.idle))))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
