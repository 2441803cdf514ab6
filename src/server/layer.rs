use std::{
    fmt,
    future::Future,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use http::{HeaderName, Method, StatusCode};
use tower_layer::Layer;

use crate::{
    Anonymous, BackgroundStats, DefaultScope, Drained, Idempotency, ProblemJson, RejectionResponse,
    ScopeExtractor,
    background::Background,
    policy::{RecordPolicy, RecordUnlessRetryable},
};

/// The default bound on request bytes buffered at once.
const DEFAULT_MAX_BUFFERED: usize = 64 * 1024 * 1024;

/// The default header carrying the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The header added to every replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// What a request does when it finds its key claimed by an earlier request
/// whose lease ran out (SPEC 3.8): the holder stopped renewing, because its
/// process died, stalled, or lost the store for longer than the lease.
///
/// A holder that only stalled is still running the work, and may finish
/// it; an application chooses which risk it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Lapse {
    /// Take the claim over and execute again, telling the handler
    /// ([`IdempotencyContext::took_over`](crate::IdempotencyContext::took_over)),
    /// which should check what the earlier execution left behind. The
    /// earlier holder is fenced: its late response is not recorded. The
    /// default: a dead holder's key is free again after one lease.
    #[default]
    TakeOver,
    /// Never execute a key a second time. A claim is held for the whole
    /// [maximum execution time](IdempotencyLayer::with_max_execution) plus
    /// one lease (renewed as usual while the holder runs), so retries are
    /// answered 409 in flight while the first execution may still finish,
    /// and its late response still records. Only a claim whose holder
    /// stopped for longer than that is taken, and then nothing executes:
    /// the key is settled as `outcome-unknown` (a 500 problem to this and
    /// every later retry). For handlers that cannot read the context, and
    /// for proxies whose upstream cannot be told.
    Settle,
}

#[derive(Clone)]
pub(crate) struct Config<St> {
    pub(crate) store: St,
    pub(crate) header: HeaderName,
    pub(crate) methods: Vec<Method>,
    /// The exact paths protected; every path when `None`.
    pub(crate) paths: Option<Arc<[Box<str>]>>,
    pub(crate) require_key: bool,
    pub(crate) scope: Arc<dyn ScopeExtractor>,
    pub(crate) anonymous: Anonymous,
    /// Set once the shared anonymous scope has been warned about.
    pub(crate) anonymous_warned: Arc<AtomicBool>,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) request_body_limit: usize,
    /// Request bytes buffered at once, by every request of the layer.
    pub(crate) buffered: Arc<crate::budget::Budget>,
    pub(crate) response_body_limit: usize,
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) lapse: Lapse,
    pub(crate) record: Arc<dyn RecordPolicy>,
    pub(crate) mismatch_status: StatusCode,
    pub(crate) wait: Option<Duration>,
    pub(crate) in_flight_retry_after: Duration,
    pub(crate) store_timeout: Duration,
    pub(crate) responder: Arc<dyn RejectionResponse>,
    pub(crate) replay_set_cookie: bool,
    pub(crate) fail_open: bool,
    pub(crate) max_execution: Duration,
    pub(crate) completion_retry: Duration,
    /// Shared by every clone of the layer and every service it built.
    pub(crate) background: Arc<Background>,
    /// The `route` label of a request's metrics.
    #[cfg(feature = "metrics")]
    pub(crate) metrics_route: Arc<dyn Fn(&http::request::Parts) -> String + Send + Sync>,
    /// Where every decision is written.
    #[cfg(feature = "audit")]
    pub(crate) audit: Option<crate::audit::AuditLog>,
}

/// The default `route` label: axum's matched route template where the
/// layer runs inside the router (feature `axum`), else `other`.
#[cfg(feature = "metrics")]
fn default_route(parts: &http::request::Parts) -> String {
    #[cfg(feature = "axum")]
    if let Some(path) = parts.extensions.get::<axum::extract::MatchedPath>() {
        return path.as_str().to_owned();
    }
    let _ = parts;
    "other".to_owned()
}

impl<St> Config<St> {
    /// The lease a claim is taken and renewed with: one lease, or, when a
    /// lapsed claim is never taken over, the maximum execution time plus
    /// one lease.
    pub(crate) fn claim_lease(&self) -> Duration {
        match self.lapse {
            Lapse::TakeOver => self.lease,
            Lapse::Settle => self.max_execution.saturating_add(self.lease),
        }
    }

    /// A request's place in the audit chain: `Ok(None)` without an audit
    /// log, `Err` when there is no room and the request must not run.
    #[inline]
    pub(crate) fn trail(
        &self,
        scope: Option<&str>,
        key: Option<&str>,
    ) -> Result<Option<crate::trail::Trail>, ()> {
        #[cfg(feature = "audit")]
        if let Some(audit) = &self.audit {
            return audit.trail(scope, key).map(Some);
        }
        let _ = (scope, key);
        Ok(None)
    }

    /// A request's trail with no place reserved yet (`None` without an
    /// audit log): the keyed path reserves it once the body is read.
    #[inline]
    pub(crate) fn loose_trail(
        &self,
        scope: Option<&str>,
        key: Option<&str>,
    ) -> Option<crate::trail::Trail> {
        #[cfg(feature = "audit")]
        if let Some(audit) = &self.audit {
            return Some(audit.loose_trail(scope, key));
        }
        let _ = (scope, key);
        None
    }

    pub(crate) fn protects<B>(&self, req: &http::Request<B>) -> bool {
        self.methods.iter().any(|m| m == req.method())
            && self
                .paths
                .as_ref()
                .is_none_or(|paths| paths.iter().any(|p| **p == *req.uri().path()))
    }
}

/// Applies [`Idempotency`] to a service: requests with an `Idempotency-Key`
/// execute once, and retries get the recorded response.
///
/// Every `with_*` method consumes the layer and returns it changed; the
/// defaults follow the crate's behaviour contract:
///
/// | setting | default |
/// |---|---|
/// | header | `Idempotency-Key` |
/// | methods | `POST`, `PATCH` |
/// | keys | optional |
/// | scope | [`DefaultScope`]: a [`Principal`](crate::Principal) from the auth layer, else a hash of `Authorization` |
/// | anonymous keyed requests | rejected (401), see [`Anonymous`] |
/// | fingerprint | method, host, full path, query, `Content-Type`, body |
/// | request / response body limit | 1 MiB / 1 MiB |
/// | TTL of a completed record | 24 hours |
/// | lease of an in-flight claim | 30 seconds, renewed every 10 while the request runs |
/// | a claim whose lease ran out | taken over, the handler told ([`Lapse`]) |
/// | recorded responses | all but 408, 429, 503 |
/// | key reused for a different request | 400 |
/// | duplicate while in flight | 409 at once, `Retry-After: 1` |
/// | store timeout | 5 seconds |
/// | `Set-Cookie` replayed | no |
/// | store failure | 503 (fail closed) |
/// | maximum execution time | 5 minutes, then the key is settled as `outcome-unknown` |
/// | completion retried after a store failure | for up to 1 hour |
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// let layer = IdempotencyLayer::new(MemoryStore::default())
///     .with_required_key(true)
///     .with_ttl(Duration::from_secs(60 * 60))
///     .with_wait(Duration::from_secs(5));
/// ```
#[derive(Clone)]
#[must_use]
pub struct IdempotencyLayer<St> {
    config: Arc<Config<St>>,
}

impl<St> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("IdempotencyLayer")
            .field("header", &c.header)
            .field("methods", &c.methods)
            .field("require_key", &c.require_key)
            .field("ttl", &c.ttl)
            .field("lease", &c.lease)
            .field("lapse", &c.lapse)
            .finish_non_exhaustive()
    }
}

impl<St> IdempotencyLayer<St> {
    /// A layer keeping its records in `store`, with the defaults above.
    pub fn new(store: St) -> Self {
        IdempotencyLayer {
            config: Arc::new(Config {
                store,
                header: IDEMPOTENCY_KEY,
                methods: vec![Method::POST, Method::PATCH],
                paths: None,
                require_key: false,
                scope: Arc::new(DefaultScope::new()),
                anonymous: Anonymous::Reject,
                anonymous_warned: Arc::new(AtomicBool::new(false)),
                fingerprint_headers: Vec::new(),
                request_body_limit: 1024 * 1024,
                buffered: Arc::new(crate::budget::Budget::new(DEFAULT_MAX_BUFFERED)),
                response_body_limit: 1024 * 1024,
                ttl: Duration::from_secs(24 * 60 * 60),
                lease: Duration::from_secs(30),
                lapse: Lapse::TakeOver,
                record: Arc::new(RecordUnlessRetryable),
                mismatch_status: StatusCode::BAD_REQUEST,
                wait: None,
                in_flight_retry_after: Duration::from_secs(1),
                store_timeout: Duration::from_secs(5),
                responder: Arc::new(ProblemJson),
                replay_set_cookie: false,
                fail_open: false,
                max_execution: Duration::from_secs(5 * 60),
                completion_retry: Duration::from_secs(60 * 60),
                background: Arc::default(),
                #[cfg(feature = "metrics")]
                metrics_route: Arc::new(default_route),
                #[cfg(feature = "audit")]
                audit: None,
            }),
        }
    }
}

impl<St> IdempotencyLayer<St> {
    /// The layer's background work right now: requests finishing after their
    /// client went away, completions being retried, and what was given up.
    /// Cheap (a few atomic loads), for a metrics layer or a health check.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default());
    /// assert_eq!(layer.stats().detached_running, 0);
    /// ```
    pub fn stats(&self) -> BackgroundStats {
        self.config.background.stats()
    }

    /// Waits for the layer's background work to finish, for a graceful
    /// shutdown: call it after the server has stopped accepting connections
    /// and its open connections are done (with axum, once
    /// `axum::serve(...).with_graceful_shutdown(...)` has returned).
    ///
    /// Resolves when every detached request (one whose client went away
    /// after its key was claimed) and every completion being retried has
    /// finished, or once `within` has passed. Then, every detached request
    /// still running is stopped and settled as the
    /// [maximum execution time](Self::with_max_execution) settles it; one
    /// whose handler had not started (its claim was still under way) is
    /// released instead, since nothing ran; one waiting for another request
    /// with its key stops waiting. The store gets up to the
    /// [store timeout](Self::with_store_timeout) to take those records. The result says what was settled and what was
    /// abandoned; abandoned keys end as lapsed claims, which only the same
    /// request may take over (its handler then sees
    /// [`IdempotencyContext::took_over`](crate::IdempotencyContext::took_over)).
    ///
    /// Call it once per process: a drained layer keeps serving, but does not
    /// wait for work that starts afterwards, and settles it at once.
    ///
    /// ```no_run
    /// # async fn run(listener: tokio::net::TcpListener, app: axum::Router) {
    /// # use std::time::Duration;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default());
    /// let app = app.layer(layer.clone());
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(async { tokio::signal::ctrl_c().await.unwrap() })
    ///     .await
    ///     .unwrap();
    /// let drained = layer.drain(Duration::from_secs(20)).await;
    /// println!("{drained}");
    /// # }
    /// ```
    pub fn drain(&self, within: Duration) -> impl Future<Output = Drained> + Send + 'static {
        let background = self.config.background.clone();
        background.drain(within, self.config.store_timeout)
    }
}

impl<St: Clone> IdempotencyLayer<St> {
    fn with(mut self, change: impl FnOnce(&mut Config<St>)) -> Self {
        change(Arc::make_mut(&mut self.config));
        self
    }

    /// The header carrying the key (default `Idempotency-Key`).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_header(http::HeaderName::from_static("x-request-key"));
    /// ```
    pub fn with_header(self, header: HeaderName) -> Self {
        self.with(|c| c.header = header)
    }

    /// The methods the layer protects (default `POST` and `PATCH`); requests
    /// with other methods pass through untouched.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// use http::Method;
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_methods([Method::POST, Method::PUT, Method::PATCH, Method::DELETE]);
    /// ```
    pub fn with_methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.with(|c| c.methods = methods.into_iter().collect())
    }

    /// Protects only requests to these exact paths (default: every path);
    /// requests to other paths pass through untouched, like requests with
    /// unprotected methods. The path is the request's URI path as the layer
    /// sees it (under a router that strips a prefix, without it). Each call
    /// replaces the list; an empty list protects nothing.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_paths(["/payments", "/refunds"]);
    /// ```
    pub fn with_paths(self, paths: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let paths: Arc<[Box<str>]> = paths
            .into_iter()
            .map(|p| p.into().into_boxed_str())
            .collect();
        self.with(|c| c.paths = Some(paths))
    }

    /// Sets the layer up for a gRPC service in one call (see the
    /// [`grpc`](crate::grpc) module): protects `POST` calls to exactly the
    /// `methods` given (full paths, `/package.Service/Method`; name unary
    /// methods, since a request stream is read whole before the service is
    /// called, and a response stream is kept only up to the response
    /// limit), decides what
    /// to record from `grpc-status` ([`GrpcRecordPolicy`](crate::grpc::GrpcRecordPolicy))
    /// and answers rejections with gRPC statuses
    /// ([`GrpcRejections`](crate::grpc::GrpcRejections)). The key comes from
    /// the `idempotency-key` metadata (the layer's header, lowercase as gRPC
    /// metadata is). Calls to any other method pass through unprotected.
    /// It sets methods, paths, record policy and rejection responses: a
    /// later `with_methods`, `with_paths`, `with_record_policy` or
    /// `with_rejection_response` replaces that part.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_grpc(["/booking.v1.Bookings/Book"])
    ///     .with_required_key(true);
    /// ```
    pub fn with_grpc(self, methods: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.with_methods([Method::POST])
            .with_paths(methods)
            .with_record_policy(crate::grpc::GrpcRecordPolicy::default())
            .with_rejection_response(crate::grpc::GrpcRejections)
    }

    /// Whether a protected request without a key is rejected with 400
    /// `missing-key` (`true`) or passed through unprotected (`false`, the
    /// default).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_required_key(true);
    /// ```
    pub fn with_required_key(self, required: bool) -> Self {
        self.with(|c| c.require_key = required)
    }

    /// How to choose a request's scope (default [`DefaultScope`]: a
    /// [`Scope`](crate::Scope) or [`Principal`](crate::Principal) an
    /// authentication layer put into the extensions, else a hash of
    /// `Authorization`). A request the extractor finds no scope for is
    /// anonymous, and [`with_anonymous`](Self::with_anonymous) decides.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore, Scope};
    /// #[derive(Clone)]
    /// struct TenantId(String);
    ///
    /// // Scope by the tenant an earlier layer put in the extensions.
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_scope(
    ///     |parts: &http::request::Parts| {
    ///         let tenant = parts.extensions.get::<TenantId>()?;
    ///         Some(Scope::new(format!("tenant:{}", tenant.0)))
    ///     },
    /// );
    /// ```
    pub fn with_scope(self, scope: impl ScopeExtractor) -> Self {
        let scope: Arc<dyn ScopeExtractor> = Arc::new(scope);
        self.with(|c| c.scope = scope)
    }

    /// What to do with a keyed request that has no scope (default
    /// [`Anonymous::Reject`]: 401 `anonymous-request`).
    ///
    /// ```
    /// # use tower_idempotency::{Anonymous, IdempotencyLayer, MemoryStore};
    /// // A public endpoint with nothing private in its answers.
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_anonymous(Anonymous::Shared);
    /// ```
    pub fn with_anonymous(self, policy: Anonymous) -> Self {
        self.with(|c| c.anonymous = policy)
    }

    /// Adds headers whose values are part of a request's fingerprint, beside
    /// method, host, full path, query, `Content-Type` and body.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_fingerprint_headers([http::HeaderName::from_static("x-account")]);
    /// ```
    pub fn with_fingerprint_headers(self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        self.with(|c| c.fingerprint_headers.extend(headers))
    }

    /// The largest request body buffered for fingerprinting (default 1 MiB).
    /// Larger bodies get 413 `body-too-large` and the service is not called.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_request_body_limit(64 * 1024);
    /// ```
    pub fn with_request_body_limit(self, bytes: usize) -> Self {
        self.with(|c| c.request_body_limit = bytes)
    }

    /// The most request bytes the layer holds buffered at once, across all
    /// its requests (default 64 MiB: 64 bodies at the default body limit).
    /// A keyed request whose body would pass it gets 503 `overloaded` with
    /// `Retry-After`, and nothing runs; its retry is welcome. What a body's
    /// buffer takes is counted as it arrives (its allocated room, not only
    /// the bytes received: a body of known length takes its length at
    /// once) and given back once the service has taken the body (or
    /// dropped it), so slow uploads cannot hold more memory than this, and
    /// a slow handler does not keep others out. There is no share per
    /// caller: one caller's stalled uploads can hold the whole bound until
    /// the server's own body timeout ends them. Keep it at least the
    /// [request body limit](Self::with_request_body_limit), or such bodies
    /// never fit.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_max_buffered_bytes(256 * 1024 * 1024);
    /// ```
    pub fn with_max_buffered_bytes(self, bytes: usize) -> Self {
        self.with(|c| c.buffered = Arc::new(crate::budget::Budget::new(bytes)))
    }

    /// The largest response body recorded (default 1 MiB). A larger response
    /// still streams to the client in full; its record keeps status and
    /// headers only, and a retry gets 410 `response-not-retained`.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_response_body_limit(256 * 1024);
    /// ```
    pub fn with_response_body_limit(self, bytes: usize) -> Self {
        self.with(|c| c.response_body_limit = bytes)
    }

    /// How long a completed record is kept (default 24 hours). After that the
    /// key is new again.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// # use std::time::Duration;
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_ttl(Duration::from_secs(3600));
    /// ```
    pub fn with_ttl(self, ttl: Duration) -> Self {
        self.with(|c| c.ttl = ttl)
    }

    /// How long an in-flight claim is honoured without renewal before another
    /// request may take it over (default 30 seconds). The layer renews it
    /// every third of the lease while the request runs, so only a holder that
    /// died (or stopped being polled) loses it. Clamped to at least one
    /// millisecond.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// # use std::time::Duration;
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_lease(Duration::from_secs(10));
    /// ```
    pub fn with_lease(self, lease: Duration) -> Self {
        self.with(|c| c.lease = lease.max(Duration::from_millis(1)))
    }

    /// What a retry does with a claim whose holder stopped renewing it
    /// (default [`Lapse::TakeOver`]); see [`Lapse`].
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, Lapse, MemoryStore};
    /// // The handler cannot check what a stalled first execution did:
    /// // never run it twice, settle the key as outcome-unknown instead.
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_lapse(Lapse::Settle);
    /// ```
    pub fn with_lapse(self, lapse: Lapse) -> Self {
        self.with(|c| c.lapse = lapse)
    }

    /// Which final responses are recorded (default
    /// [`RecordUnlessRetryable`]). A response that is not recorded releases
    /// the claim, so the next request with the key executes.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// // Let clients retry server errors too.
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_record_policy(|parts: &http::response::Parts| !parts.status.is_server_error());
    /// ```
    pub fn with_record_policy(self, policy: impl RecordPolicy) -> Self {
        let policy: Arc<dyn RecordPolicy> = Arc::new(policy);
        self.with(|c| c.record = policy)
    }

    /// Answer a key reused for a different request with 422 Unprocessable
    /// Content (as the IETF draft suggests) instead of 400.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_mismatch_422(true);
    /// ```
    pub fn with_mismatch_422(self, enabled: bool) -> Self {
        let status = if enabled {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        self.with(|c| c.mismatch_status = status)
    }

    /// Instead of answering a duplicate of an in-flight request with 409 at
    /// once, wait up to `bound` for the first request to finish and replay
    /// its response (409 if it is still running then).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// # use std::time::Duration;
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_wait(Duration::from_secs(3));
    /// ```
    pub fn with_wait(self, bound: Duration) -> Self {
        self.with(|c| c.wait = Some(bound))
    }

    /// The `Retry-After` sent with 409 `request-in-flight` (default 1
    /// second): a short hint, never past the end of the holder's lease, and
    /// at least 1 (the header counts whole seconds).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// # use std::time::Duration;
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_in_flight_retry_after(Duration::from_secs(2));
    /// ```
    pub fn with_in_flight_retry_after(self, hint: Duration) -> Self {
        self.with(|c| c.in_flight_retry_after = hint)
    }

    /// How long one store operation may take before the layer gives up on it
    /// (default 5 seconds). A claim that times out is a 503
    /// `store-unavailable`.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// # use std::time::Duration;
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_store_timeout(Duration::from_millis(250));
    /// ```
    pub fn with_store_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.store_timeout = timeout)
    }

    /// Replaces the problem+json rejections, for example with gRPC statuses.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore, Rejection, RejectionKind};
    /// use bytes::Bytes;
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_rejection_response(
    ///     |rejection: &Rejection| {
    ///         let code = match rejection.kind() {
    ///             RejectionKind::RequestInFlight => "10", // ABORTED
    ///             RejectionKind::StoreUnavailable => "14", // UNAVAILABLE
    ///             RejectionKind::AnonymousRequest => "16", // UNAUTHENTICATED
    ///             _ => "3",                                // INVALID_ARGUMENT
    ///         };
    ///         http::Response::builder()
    ///             .header("content-type", "application/grpc")
    ///             .header("grpc-status", code)
    ///             .header("grpc-message", rejection.kind().code())
    ///             .body(Bytes::new())
    ///             .unwrap()
    ///     },
    /// );
    /// ```
    pub fn with_rejection_response(self, responder: impl RejectionResponse) -> Self {
        let responder: Arc<dyn RejectionResponse> = Arc::new(responder);
        self.with(|c| c.responder = responder)
    }

    /// Replay `Set-Cookie` headers (default: dropped from records, since they
    /// may carry a session minted for the first caller).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_replay_set_cookie(true);
    /// ```
    pub fn with_replay_set_cookie(self, enabled: bool) -> Self {
        self.with(|c| c.replay_set_cookie = enabled)
    }

    /// The longest a request may run, from the moment its key is claimed
    /// until its response is recorded (default 5 minutes).
    ///
    /// A handler still running then is stopped (its future dropped) and the
    /// key is settled: its record becomes a 500 problem of type
    /// `outcome-unknown`, which the client (if still connected) and every
    /// retry receive. The intent is never executed a second time: the
    /// handler may or may not have taken effect, and the client is told to
    /// check before starting a new intent with a new key. A response whose
    /// body is still streaming to a client that went away is cut at the same
    /// moment and recorded with status and headers only (retries get 410
    /// `response-not-retained`, naming the status). A body streaming to a
    /// connected client is the client's to end and is not cut.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// # use std::time::Duration;
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_max_execution(Duration::from_secs(60));
    /// ```
    pub fn with_max_execution(self, limit: Duration) -> Self {
        self.with(|c| c.max_execution = limit)
    }

    /// How long a completion is retried after the store failed to take the
    /// record (default 1 hour). Until it lands, the lease is renewed between
    /// attempts and retries of the key are answered 409 in flight; past the
    /// limit the record is given up (logged, and counted in
    /// [`BackgroundStats::completions_abandoned`](crate::BackgroundStats::completions_abandoned))
    /// and the key ends as a lapsed claim.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// # use std::time::Duration;
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_completion_retry_limit(Duration::from_secs(10 * 60));
    /// ```
    pub fn with_completion_retry_limit(self, limit: Duration) -> Self {
        self.with(|c| c.completion_retry = limit)
    }

    /// The `route` label of the layer's request metrics (feature
    /// `metrics`; default: axum's matched route template when the layer
    /// runs inside the router, as a `route_layer`, else `other`). Keep its
    /// values few: a template or a name, never the key or the raw path.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_metrics_route(|parts: &http::request::Parts| {
    ///         if parts.uri.path().starts_with("/payments") { "payments" } else { "other" }.to_owned()
    ///     });
    /// ```
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn with_metrics_route(
        self,
        route: impl Fn(&http::request::Parts) -> String + Send + Sync + 'static,
    ) -> Self {
        let route: Arc<dyn Fn(&http::request::Parts) -> String + Send + Sync> = Arc::new(route);
        self.with(|c| c.metrics_route = route)
    }

    /// Writes every decision into `audit`'s tamper-evident chain (feature
    /// `audit`): see [`audit`](crate::audit) for the entries and what happens
    /// when they cannot be written.
    ///
    /// ```
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = std::env::temp_dir().join(format!("audit-layer-doc-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore, audit::{AuditLog, AuditSigner, JsonlSink}};
    ///
    /// let signer = AuditSigner::generate("api-audit")?;
    /// let audit = AuditLog::builder("api-1", signer)
    ///     .start(JsonlSink::open(dir.join("audit.jsonl"))?)
    ///     .await?;
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_audit(audit);
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "audit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "audit")))]
    pub fn with_audit(self, audit: crate::audit::AuditLog) -> Self {
        self.with(|c| c.audit = Some(audit))
    }

    /// **Unsafe for writes that must not repeat.** When the store fails, call
    /// the service anyway, unprotected, instead of answering 503. A retry
    /// during a store outage may then execute twice. The response carries
    /// [`Outcome::FailedOpen`](crate::Outcome::FailedOpen).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_fail_open(true);
    /// ```
    pub fn with_fail_open(self, enabled: bool) -> Self {
        self.with(|c| c.fail_open = enabled)
    }
}

impl<S, St> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::from_config(inner, self.config.clone())
    }
}
