//! [`Idempotency`]: the request path.

use std::{
    fmt,
    future::poll_fn,
    pin::{Pin, pin},
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, request};
use http_body::Body;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::{
    Anonymous, Fingerprint, IdempotencyContext, KeyError, Outcome, Rejection, RejectionKind,
    RequestBody, ResponseBody, ResponseFuture, Scope,
    background::Lifeline,
    body::{Recording, Tee, detach_tee},
    budget::Reservation,
    claim::{Finish, Held, HeldClaim, KeyHash, ScopeHash, bounded},
    key,
    layer::{Config, IDEMPOTENT_REPLAYED, Lapse},
    record::{self, RecordBuilder},
    rejection,
    store::{Claim, RecordKey, Store},
    trail::Trail,
};

/// Makes retried writes safe: see [`IdempotencyLayer`](crate::IdempotencyLayer),
/// which builds it.
pub struct Idempotency<S, St> {
    inner: S,
    config: Arc<Config<St>>,
}

impl<S: Clone, St> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Idempotency {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug, St> fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, St> Idempotency<S, St> {
    pub(crate) fn from_config(inner: S, config: Arc<Config<St>>) -> Self {
        Idempotency { inner, config }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, St, ReqB, ResB> Service<Request<ReqB>> for Idempotency<S, St>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    ReqB: Body + Send + 'static,
    ReqB::Data: Send,
    ReqB::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResB: Body + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Send + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let config = &self.config;
        if !config.protects(&req) {
            return ResponseFuture::passthrough(self.inner.call(req.map(RequestBody::streaming)));
        }
        if !req.headers().contains_key(&config.header) {
            if config.require_key {
                let mut response = reject(config, rejection::missing_key(&config.header));
                count(config, &req.into_parts().0, &response);
                note(config, None, None, &mut response);
                return ResponseFuture::ready(response);
            }
            return ResponseFuture::passthrough(self.inner.call(req.map(RequestBody::streaming)));
        }
        self.call_keyed(req)
    }
}

impl<S, St> Idempotency<S, St>
where
    S: Clone,
    St: Store,
{
    /// The request carries a key: check it, then start the protected path.
    /// Kept out of `call` so requests that pass through stay lean.
    #[inline(never)]
    fn call_keyed<ReqB, ResB>(
        &mut self,
        req: Request<ReqB>,
    ) -> ResponseFuture<S::Future, ResB, S::Error>
    where
        S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqB: Body + Send + 'static,
        ReqB::Data: Send,
        ReqB::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        ResB: Body + Send + 'static,
        ResB::Data: Send,
        ResB::Error: Send + 'static,
    {
        let config = &self.config;
        let (parts, body) = req.into_parts();
        let mut values = parts.headers.get_all(&config.header).iter();
        let key = match (values.next(), values.next()) {
            (Some(value), None) => key::parse_borrowed(value.as_bytes()),
            _ => Err(KeyError::Repeated),
        };
        let early = |rejection: Rejection, scope: Option<&str>, key: Option<&str>| {
            let mut response = reject(config, rejection);
            count(config, &parts, &response);
            note(config, scope, key, &mut response);
            ResponseFuture::ready(response)
        };
        let key = match key {
            Ok(key) => key,
            Err(err) => return early(rejection::invalid_key(&config.header, err), None, None),
        };
        let scope = match config.scope.scope(&parts) {
            Some(scope) => scope,
            None => match anonymous_scope(config) {
                Some(scope) => scope,
                None => return early(rejection::anonymous(&config.header), None, Some(&key)),
            },
        };
        if body.size_hint().lower() > config.request_body_limit as u64 {
            return early(
                rejection::body_too_large(config.request_body_limit),
                Some(scope.as_str()),
                Some(&key),
            );
        }
        // The request's trail in the audit chain; its place in the queue is
        // taken once its body is read, before anything can run.
        let trail = config.loose_trail(Some(scope.as_str()), Some(&key));
        let receipt = trail.as_ref().and_then(Trail::receipt);
        #[cfg(feature = "metrics")]
        let route = (config.metrics_route)(&parts);
        let record_key = RecordKey::new(scope.as_str(), &key);
        let record_key_for_span = record_key.clone();
        // The clone that `poll_ready` did not reserve stays behind for the
        // next call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        // The head is boxed: it would otherwise sit in the request path's
        // state twice over, pushing that state out of the allocator's fast
        // size classes.
        let lifeline = Arc::new(Lifeline::default());
        let path = keyed(
            config.clone(),
            inner,
            Box::new(parts),
            body,
            record_key,
            lifeline.clone(),
            trail,
        );
        // One span per protected request, with hashes of key and scope and,
        // where the path ends (in the background too when the client has
        // gone), its outcome, which is also counted.
        let span = tracing::info_span!(
            "idempotency",
            key = %KeyHash(&record_key_for_span),
            scope = %ScopeHash(record_key_for_span.scope()),
            outcome = tracing::field::Empty,
        );
        let path = tracing::Instrument::instrument(
            async move {
                let mut result = path.await;
                if let (Some(receipt), Ok(response)) = (&receipt, &mut result) {
                    let status = response.status().as_u16();
                    receipt.stamp(status, response.headers_mut());
                }
                if let Ok(response) = &result {
                    let outcome = response.extensions().get::<Outcome>();
                    if let Some(outcome) = outcome {
                        tracing::Span::current()
                            .record("outcome", crate::metrics::outcome_label(outcome));
                    }
                    #[cfg(feature = "metrics")]
                    crate::metrics::request(outcome, route);
                }
                result
            },
            span,
        );
        ResponseFuture::keyed(Box::pin(path), lifeline, config.background.clone())
    }
}

/// Writes the audit entry of a request answered before its protected path
/// started, where there is room for it.
fn note<St, B>(
    config: &Config<St>,
    scope: Option<&str>,
    key: Option<&str>,
    response: &mut Response<B>,
) {
    if let Ok(Some(trail)) = config.trail(scope, key) {
        let receipt = trail.receipt();
        answered(Some(trail), response);
        if let Some(receipt) = receipt {
            let status = response.status().as_u16();
            receipt.stamp(status, response.headers_mut());
        }
    }
}

/// Writes the entry of a request answered with `response` (a replay or a
/// rejection), by its outcome.
fn answered<B>(trail: Option<Trail>, response: &Response<B>) {
    let Some(trail) = trail else { return };
    let decision = match response.extensions().get::<Outcome>() {
        Some(outcome) => crate::metrics::outcome_label(outcome),
        None => "executed",
    };
    trail.record(decision, Some(response.status().as_u16()), None);
}

/// Counts a request answered before its protected path started.
#[inline]
fn count<St, B>(config: &Config<St>, parts: &request::Parts, response: &Response<B>) {
    #[cfg(feature = "metrics")]
    crate::metrics::request(
        response.extensions().get::<Outcome>(),
        (config.metrics_route)(parts),
    );
    #[cfg(not(feature = "metrics"))]
    let _ = (config, parts, response);
}

/// Why a request body could not be buffered.
enum Buffering<E> {
    TooLarge,
    /// The layer's bound on buffered bytes has no room for it.
    Overloaded,
    Unreadable(E),
}

/// Reads a request body to its end, up to `limit` bytes, holding in
/// `reserved` what its buffer takes (allocated room, not only the bytes
/// received) before it is taken. A body that arrives in one frame is kept
/// as it is, without a copy; one of known length is gathered into one
/// buffer of that length.
async fn buffer<B: Body>(
    body: B,
    limit: usize,
    reserved: &mut Reservation,
) -> Result<(Bytes, Option<Box<HeaderMap>>), Buffering<B::Error>> {
    let expected = body
        .size_hint()
        .exact()
        .and_then(|len| usize::try_from(len).ok())
        .filter(|len| *len <= limit);
    let mut body = pin!(body);
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut trailers: Option<Box<HeaderMap>> = None;
    let mut len = 0usize;
    while let Some(frame) = poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(Buffering::Unreadable)?;
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(more) = frame.into_trailers() {
                    trailers.get_or_insert_default().extend(more);
                }
                continue;
            }
        };
        len = len.saturating_add(data.remaining());
        if len > limit {
            return Err(Buffering::TooLarge);
        }
        match (&mut joined, first.take()) {
            (Some(joined), _) => {
                if len > joined.capacity() {
                    // Grown by hand, so that the room held is what the
                    // budget was asked for, and never past the limit.
                    let room = len.max(joined.capacity().saturating_mul(2)).min(limit);
                    if !reserved.grow_to(room) {
                        return Err(Buffering::Overloaded);
                    }
                    let mut grown = BytesMut::with_capacity(room);
                    grown.put(joined.split());
                    *joined = grown;
                }
                joined.put(data);
            }
            (None, None) => {
                if !reserved.grow_to(data.remaining()) {
                    return Err(Buffering::Overloaded);
                }
                first = Some(data.copy_to_bytes(data.remaining()));
            }
            (None, Some(earlier)) => {
                let room = expected
                    .filter(|expected| *expected >= len)
                    .unwrap_or_else(|| len.max(earlier.len() * 2).min(limit));
                if !reserved.grow_to(room) {
                    return Err(Buffering::Overloaded);
                }
                let mut buf = BytesMut::with_capacity(room);
                buf.put(earlier);
                buf.put(data);
                joined = Some(buf);
            }
        }
    }
    let data = match joined {
        Some(joined) => joined.freeze(),
        None => first.unwrap_or_default(),
    };
    Ok((data, trailers))
}

/// The path of a request that carries a valid key.
async fn keyed<S, St, ReqB, ResB>(
    config: Arc<Config<St>>,
    mut inner: S,
    mut parts: Box<request::Parts>,
    body: ReqB,
    record_key: RecordKey,
    lifeline: Arc<Lifeline>,
    mut trail: Option<Trail>,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    St: Store,
    ReqB: Body,
    ReqB::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResB: Body + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Send + 'static,
{
    let mut reserved = Reservation::new(config.buffered.clone());
    let (body, trailers) = match buffer(body, config.request_body_limit, &mut reserved).await {
        Ok(buffered) => buffered,
        Err(Buffering::TooLarge) => {
            let response = reject(
                &config,
                rejection::body_too_large(config.request_body_limit),
            );
            answered(trail, &response);
            return Ok(response);
        }
        Err(Buffering::Overloaded) => {
            tracing::warn!(key = %KeyHash(&record_key), "request bodies buffered at the layer's bound; rejecting");
            let response = reject(&config, rejection::overloaded());
            answered(trail, &response);
            return Ok(response);
        }
        Err(Buffering::Unreadable(err)) => {
            let err = err.into();
            tracing::debug!(key = %KeyHash(&record_key), error = %err, "request body unreadable");
            let response = reject(&config, rejection::body_unreadable());
            answered(trail, &response);
            return Ok(response);
        }
    };
    let fingerprint = Fingerprint::compute_with_trailers(
        &parts,
        &config.fingerprint_headers,
        &body,
        trailers.as_deref(),
    );
    if let Some(trail) = &mut trail {
        // The place in the audit queue, taken now that the body is read:
        // an upload that takes its time holds none.
        if trail.reserve().is_err() {
            // Counted as lost already: no second entry is attempted.
            return Ok(reject(&config, rejection::audit_unavailable()));
        }
        trail.fingerprint(&fingerprint);
    }

    let (token, took_over) = match claim(&config, &record_key, fingerprint, &lifeline).await {
        Claimed::Acquired { token, took_over } => (token, took_over),
        Claimed::Answered(response) => {
            answered(trail, &response);
            return Ok(response);
        }
        Claimed::FailOpen => {
            // Unprotected, but the handler's own downstream keys still hold.
            let context = IdempotencyContext::new(record_key, fingerprint, false);
            parts.extensions.insert(context);
            let req = Request::from_parts(
                *parts,
                RequestBody::buffered(body, trailers, Some(reserved)),
            );
            let result = inner.call(req).await;
            if let Some(trail) = trail {
                let status = result.as_ref().ok().map(|r| r.status().as_u16());
                trail.record("failed_open", status, None);
            }
            let mut response = result?.map(ResponseBody::inner);
            response.extensions_mut().insert(Outcome::FailedOpen);
            return Ok(response);
        }
    };
    tracing::debug!(key = %KeyHash(&record_key), took_over, "key claimed; executing");
    if took_over {
        crate::metrics::lease_taken_over();
        // The take-over is a decision of its own, before the execution's.
        if let Some(mut held_trail) = trail.take() {
            match held_trail.another() {
                Ok(execution) => {
                    held_trail.record("taken_over", None, None);
                    trail = Some(execution);
                }
                Err(()) => {
                    // No room for the execution's entry: it does not run,
                    // and the place held records the take-over.
                    let mut held = Held::new(config.clone(), record_key, token, None);
                    HeldClaim::release(&mut held, None).await;
                    let response = reject(&config, rejection::audit_unavailable());
                    held_trail.record("taken_over", Some(response.status().as_u16()), None);
                    return Ok(response);
                }
            }
        }
    }

    let mut held: Box<dyn HeldClaim> =
        Box::new(Held::new(config.clone(), record_key.clone(), token, trail));
    if took_over && config.lapse == Lapse::Settle {
        // The earlier holder stopped for longer than it may run: whether
        // its work took effect is unknown, and nothing runs again.
        return Ok(settle(&config, held, rejection::outcome_unknown_lapsed()).await);
    }
    if lifeline.must_settle() {
        // A drain's deadline passed while the key was being claimed: the
        // handler never started, so nothing is settled. The key is freed
        // for the retry.
        config.background.released_unstarted();
        tracing::warn!(
            key = %KeyHash(&record_key),
            "request reached a drain's deadline before its handler started; claim released"
        );
        let response = reject(&config, rejection::shutting_down());
        held.release(Some(response.status().as_u16())).await;
        return Ok(response);
    }
    let context = IdempotencyContext::new(record_key, fingerprint, took_over);
    parts.extensions.insert(context);
    // The body holds the reservation from here: given back once the
    // service has taken the data, not once it answers.
    let req = Request::from_parts(
        *parts,
        RequestBody::buffered(body, trailers, Some(reserved)),
    );
    let result = {
        let mut call = pin!(inner.call(req));
        // Boxed, and only once the service makes us wait: see `bounded`.
        let mut timer: Option<Pin<Box<Sleep>>> = None;
        poll_fn(|cx| {
            if lifeline.must_settle() {
                return Poll::Ready(None);
            }
            if let Poll::Ready(result) = call.as_mut().poll(cx) {
                return Poll::Ready(Some(result));
            }
            held.keep_alive();
            let deadline = held.deadline();
            let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            match timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
        // The service's future is dropped here: a handler past its time
        // stops before its key is settled.
    };
    let Some(result) = result else {
        config.background.settled_unfinished(lifeline.must_settle());
        if lifeline.must_settle() {
            tracing::warn!("request stopped at the drain deadline; recorded as outcome-unknown");
        } else {
            tracing::warn!(
                "request stopped past its maximum execution time; recorded as outcome-unknown"
            );
        }
        return Ok(settle(&config, held, rejection::outcome_unknown()).await);
    };

    let (mut parts, body) = match result {
        Ok(response) => response.into_parts(),
        Err(err) => {
            held.release(None).await;
            return Err(err);
        }
    };
    parts.extensions.insert(Outcome::Executed);
    // An informational status is no final answer to replay (and no record
    // holds one): the key is freed, as for a response the policy declines.
    if parts.status.is_informational() || !config.record.should_record(&parts) {
        held.release(Some(parts.status.as_u16())).await;
        return Ok(Response::from_parts(parts, ResponseBody::inner(body)));
    }
    let expected = body.size_hint().exact().unwrap_or(0);
    let builder = RecordBuilder::new(
        parts.status,
        &parts.headers,
        config.replay_set_cookie,
        config.response_body_limit,
        usize::try_from(expected).unwrap_or(usize::MAX),
    );
    let deferred = config
        .record
        .decides_at_end(&parts)
        .then(|| (config.record.clone(), parts.status));
    let recording = Recording::new(held, builder, deferred, parts.status);
    let mut tee = Tee::new(body, recording, detach_tee::<ResB>);
    if let Some(mut state) = tee.state() {
        poll_fn(|cx| state.as_mut().poll_prefetch(cx)).await;
    }
    Ok(Response::from_parts(parts, ResponseBody::teed(tee)))
}

// A transient return value, moved once: boxing the response would cost an
// allocation on every replay.
#[allow(clippy::large_enum_variant)]
enum Claimed<B> {
    Acquired {
        token: crate::store::Token,
        took_over: bool,
    },
    Answered(Response<ResponseBody<B>>),
    FailOpen,
}

/// The request ran past the maximum execution time, or past a drain's
/// deadline, and its service was stopped, or it found a claim lapsed past
/// that time under [`Lapse::Settle`]: record `rejection` (an
/// `outcome-unknown`), so that neither this client nor any retry sees the
/// intent run again, and answer with it.
async fn settle<St: Store, B>(
    config: &Config<St>,
    mut held: Box<dyn HeldClaim>,
    rejection: Rejection,
) -> Response<ResponseBody<B>> {
    let (mut parts, body) = config.responder.response(&rejection).into_parts();
    let mut builder = RecordBuilder::new(
        parts.status,
        &parts.headers,
        config.replay_set_cookie,
        config.response_body_limit,
        body.len(),
    );
    builder.push(&body);
    let finish = Finish {
        settled: true,
        status: parts.status.as_u16(),
        response: None,
    };
    held.complete(builder.finish(None), finish).await;
    parts
        .extensions
        .insert(Outcome::Rejected(RejectionKind::OutcomeUnknown));
    Response::from_parts(parts, ResponseBody::buffered(body, None))
}

/// Claims the key, or answers the request from what the store holds: a
/// replay, or a rejection. While a claim is under way the request is
/// detachable: dropped then, it finishes in the background, so a claim
/// that lands is never left behind. Between the claims of wait mode it is
/// not, and dropping it ends it; a request dropped during one of those
/// claims, or told to settle, waits no longer.
async fn claim<St: Store, B>(
    config: &Config<St>,
    key: &RecordKey,
    fingerprint: Fingerprint,
    lifeline: &Lifeline,
) -> Claimed<B> {
    let mut waited: Option<(Instant, Duration)> = None;
    loop {
        lifeline.set_detachable(true);
        let op = config.store.claim(key, fingerprint, config.claim_lease());
        let found = match bounded(op, config.store_timeout, ("claim", config.store.name())).await {
            Ok(found) => found,
            Err(err) if config.fail_open => {
                tracing::error!(key = %KeyHash(key), error = %err, "store failed; executing unprotected (fail-open)");
                return Claimed::FailOpen;
            }
            Err(err) => {
                tracing::error!(key = %KeyHash(key), error = %err, "store failed; rejecting");
                return Claimed::Answered(reject(config, rejection::store_unavailable()));
            }
        };
        let rejection = match found {
            Claim::Acquired { token, took_over } => {
                return Claimed::Acquired { token, took_over };
            }
            Claim::InFlight {
                fingerprint: held, ..
            }
            | Claim::Completed {
                fingerprint: held, ..
            } if held != fingerprint => rejection::key_reused(config.mismatch_status),
            Claim::Completed { record, .. } => {
                return Claimed::Answered(replay(config, key, record));
            }
            Claim::InFlight {
                lease_remaining, ..
            } => {
                // Nobody waits for the answer once the request was dropped,
                // and nothing starts past a drain's deadline: stop waiting.
                let gone = lifeline.is_detached() || lifeline.must_settle();
                if let Some(bound) = config.wait.filter(|_| !gone) {
                    let (start, backoff) =
                        waited.get_or_insert((Instant::now(), Duration::from_millis(5)));
                    let left = bound.saturating_sub(start.elapsed());
                    if !left.is_zero() {
                        lifeline.set_detachable(false);
                        // Boxed to keep a timer out of every request's state.
                        Box::pin(tokio::time::sleep((*backoff).min(left))).await;
                        *backoff = (*backoff * 2).min(Duration::from_millis(250));
                        continue;
                    }
                }
                rejection::in_flight(config.in_flight_retry_after, lease_remaining)
            }
        };
        tracing::debug!(key = %KeyHash(key), rejection = %rejection.kind(), "rejected");
        return Claimed::Answered(reject(config, rejection));
    }
}

/// Rebuilds the recorded response, marked as a replay.
fn replay<St, B>(config: &Config<St>, key: &RecordKey, record: Bytes) -> Response<ResponseBody<B>> {
    let recorded = match record::decode(record) {
        Ok(recorded) => recorded,
        Err(why) => {
            tracing::error!(key = %KeyHash(key), reason = %why, "stored record is unreadable");
            return reject(config, rejection::store_unavailable());
        }
    };
    let Some(body) = recorded.body else {
        return reject(config, rejection::not_retained(recorded.status));
    };
    tracing::debug!(key = %KeyHash(key), "replaying recorded response");
    let mut response = Response::new(ResponseBody::buffered(body, recorded.trailers));
    *response.status_mut() = recorded.status;
    *response.headers_mut() = recorded.headers;
    let marked = response
        .headers_mut()
        .try_insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    if marked.is_err() {
        // The decoder left room for it; a head without room is unreadable.
        tracing::error!(key = %KeyHash(key), "stored record has no room for the replay header");
        return reject(config, rejection::store_unavailable());
    }
    response.extensions_mut().insert(Outcome::Replayed);
    response
}

fn reject<St, B>(config: &Config<St>, rejection: Rejection) -> Response<ResponseBody<B>> {
    let mut response = config
        .responder
        .response(&rejection)
        .map(|body| ResponseBody::buffered(body, None));
    response
        .extensions_mut()
        .insert(Outcome::Rejected(rejection.kind()));
    response
}

/// The scope of a request without one, when the policy allows it.
fn anonymous_scope<St>(config: &Config<St>) -> Option<Scope> {
    match config.anonymous {
        Anonymous::Reject => None,
        Anonymous::Shared => {
            // Read first: after the one warning, no request writes the flag.
            let warned = &config.anonymous_warned;
            if !warned.load(std::sync::atomic::Ordering::Relaxed)
                && !warned.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!(
                    "a keyed request without a principal or credential was put into the \
                     shared anonymous scope (`with_anonymous(Anonymous::Shared)`): any caller \
                     who sends its key and body receives its response"
                );
            }
            Some(Scope::global())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use http_body::Frame;

    use super::*;
    use crate::budget::Budget;

    /// A body of `n` frames of `size` bytes, of unknown length.
    fn frames(n: usize, size: usize) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = (0..n)
            .map(|_| Ok(Frame::data(Bytes::from(vec![7u8; size]))))
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    /// What a buffered body holds is what its reservation says, room
    /// included, and never more than the limit.
    #[tokio::test]
    async fn the_reservation_covers_the_buffers_room() {
        let budget = Arc::new(Budget::new(usize::MAX));
        for (n, size, limit) in [
            (1, 1000, 4096),
            (3, 1000, 4096),
            (40, 100, 4096),
            (33, 124, 4096),
        ] {
            let mut reserved = Reservation::new(budget.clone());
            let Ok((data, _)) = buffer(frames(n, size), limit, &mut reserved).await else {
                panic!("{n} x {size} fits");
            };
            assert_eq!(data.len(), n * size);
            let held = budget.used();
            assert!(held >= n * size, "{n} x {size}: {held} held");
            assert!(
                held <= limit.max(size),
                "{n} x {size}: {held} held, over the limit"
            );
            drop(reserved);
            assert_eq!(budget.used(), 0);
        }
        // A body of known length is gathered into exactly that room.
        let mut reserved = Reservation::new(budget.clone());
        let known = http_body_util::Full::new(Bytes::from(vec![1u8; 3000]));
        let _ = buffer(known, 4096, &mut reserved).await;
        assert_eq!(budget.used(), 3000);
    }
}
