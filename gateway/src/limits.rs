//! What clients may hold of the gateway at once: requests in progress and
//! bytes of keyed bodies read whole. Past either, a request is answered
//! 503 at once (never queued, never dropped) and nothing is forwarded.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::forward::{GatewayBody, problem};

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
    pub(crate) fn admit(
        &self,
        headers: &HeaderMap,
        buffered: bool,
    ) -> Result<Held, overload::Overloaded> {
        let request = self
            .requests
            .clone()
            .try_acquire_owned()
            .map_err(|_| overload::Overloaded::Requests)?;
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
                    .map_err(|_| overload::Overloaded::Bytes)?,
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

pub(crate) mod overload {
    //! The refusal.
    use super::*;

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
}
