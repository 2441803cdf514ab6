//! Idempotency keys for tower, axum and hyper servers: a client's retried
//! write executes once, and every retry gets the recorded response.
//!
//! A client sends a booking; the server commits it, but the response arrives
//! after the client's timeout, and the client tries again. Without protection
//! the booking happens twice. With this layer the client sends an
//! `Idempotency-Key` chosen once per operation: the first request executes,
//! every retry with the key replays the recorded response (with
//! `Idempotent-Replayed: true`), and a key reused for a different request is
//! rejected.
//!
//! ```no_run
//! use axum::{Router, extract::Request, middleware::{self, Next}, response::Response, routing::post};
//! use tower_idempotency::{IdempotencyLayer, MemoryStore, Principal};
//!
//! async fn book() -> &'static str {
//!     "booked"
//! }
//!
//! /// Your authentication: it decides who the caller is.
//! async fn authenticate(mut req: Request, next: Next) -> Response {
//!     req.extensions_mut().insert(Principal::new("user-42"));
//!     next.run(req).await
//! }
//!
//! # async fn run() {
//! let app = Router::new()
//!     .route("/appointments", post(book))
//!     // Layers added later run first: authentication, then idempotency.
//!     .layer(IdempotencyLayer::new(MemoryStore::default()).with_required_key(true))
//!     .layer(middleware::from_fn(authenticate));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await.unwrap();
//! axum::serve(listener, app).await.unwrap();
//! # }
//! ```
//!
//! # A request's path
//!
//! 1. Methods not protected (by default all but `POST` and `PATCH`) pass
//!    through untouched, and so do requests without a key unless keys are
//!    required.
//! 2. The key is parsed: `"abc"` (RFC 8941 string) and `abc` are the same key.
//! 3. The scope is chosen by the server (see [Scopes](#scopes)), so callers
//!    never see each other's records.
//! 4. The body is buffered (up to a limit) and the request fingerprinted:
//!    SHA-256 of method, host, full path, query, `Content-Type`, body, and
//!    any headers you add.
//! 5. `(scope, key)` is claimed in the [`Store`] in one atomic step.
//! 6. The first request runs, with an [`IdempotencyContext`] in its
//!    extensions. Its response streams to the client while a copy goes into
//!    the record, completed when the stream ends. If the client goes away
//!    mid-request, the request still runs to its end in the background and
//!    is recorded: the retry replays it.
//!
//! # Scopes
//!
//! The client picks the key; the server picks the namespace it is looked up
//! in. The default, [`DefaultScope`], takes in order:
//!
//! 1. a [`Scope`] the application put into the request extensions
//!    (prefixed with `scope:`, so it never equals a hashed one);
//! 2. a [`Principal`] an authentication layer put there: the caller's
//!    stable identity. Put the idempotency layer *inside* the
//!    authentication layer (added before it with axum's `Router::layer`, or
//!    after it in a `tower::ServiceBuilder`), so it runs second;
//! 3. the `Authorization` header's value;
//! 4. else the request is anonymous, and the [`Anonymous`] policy decides:
//!    [`Reject`](Anonymous::Reject) (the default: 401 `anonymous-request`)
//!    or [`Shared`](Anonymous::Shared) (one global scope, for a public
//!    endpoint, with a warning logged the first time).
//!
//! Anonymous requests are rejected by default because a shared namespace
//! lets anyone who learns a key and body (from a log, a proxy, a browser
//! history) receive the response it recorded: a receipt, a card's last
//! digits, a patient's booking. An app that authenticates by cookie, mTLS
//! or API key and forgets to tell the layer would otherwise leak silently;
//! with the default it fails loudly on its first keyed request.
//!
//! A scope taken from the credential changes when the credential does: a
//! client whose OAuth token is refreshed between two retries lands in a new
//! scope and executes again. A principal does not change. Principals and
//! credentials are stored only as 128 bits of a hash, a keyed one
//! (HMAC-SHA-256) with [`DefaultScope::with_secret`], so that someone who
//! reads the store cannot test guessed credentials against it.
//!
//! The fingerprint includes the host (`Host`, or the URI's authority) and,
//! with the `axum` feature, the full path of a nested route (from axum's
//! `OriginalUri`): a replay never crosses hosts or routes. Every server of
//! a fleet must therefore see the same host, as they do behind one load
//! balancer.
//!
//! # The handler's side
//!
//! The layer protects the request. Side effects the handler makes elsewhere
//! (a charge at a payment provider, a message to another service) are the
//! handler's to make idempotent, and [`IdempotencyContext`] gives it what it
//! needs: [`derive`](IdempotencyContext::derive) makes a key for each
//! downstream call that is the same on every execution of the intent, and
//! [`took_over`](IdempotencyContext::took_over) says this execution took
//! the key over from one that stopped renewing its claim, so part of the
//! work may be done: look for your own earlier write first.
//!
//! # Rejections
//!
//! Each is an RFC 9457 `application/problem+json` body whose `type` ends with
//! the case's code (see [`RejectionKind::code`]); the layer can be told to
//! answer differently ([`IdempotencyLayer::with_rejection_response`]).
//!
//! #### missing-key
//! 400: keys are required and the request had none.
//! #### invalid-key
//! 400: empty, longer than 255 characters, not visible ASCII, broken
//! quoting, or the header sent twice.
//! #### key-reused
//! 400 (or 422 by option): the key belongs to a different request.
//! #### anonymous-request
//! 401: the request has a key but no principal or credential to scope it
//! by, and the [`Anonymous`] policy is to reject it.
//! #### request-in-flight
//! 409 with `Retry-After` (1 second by default, never past the holder's
//! lease): the key's first request is still running.
//! #### body-too-large
//! 413: the request body is over the limit.
//! #### body-unreadable
//! 400: the request body failed before its end.
//! #### response-not-retained
//! 410: the key's request ran, but its response was too large to keep.
//! #### store-unavailable
//! 503 with `Retry-After`: the store failed, timed out, or holds an
//! unreadable record. Nothing was executed. The store's error goes to the
//! log, never to the client.
//!
//! # Runtime
//!
//! Protected requests need a tokio runtime with its time driver (for lease
//! renewal, store timeouts and background completion), as every axum and
//! hyper-on-tokio server has.
//!
//! # What it cannot do
//!
//! It cannot give exactly-once across the client's own crashes: the client
//! must keep its key for as long as it may retry. And it protects the
//! request, not side effects a handler starts outside it (a queued job, a
//! call to another service): those need their own idempotency, which the
//! [`IdempotencyContext`]'s derived keys and take-over flag help with, or a
//! transaction in the handler.
//!
//! # Features
//!
//! - `axum`: the full path of nested routes in the fingerprint, and
//!   [`IdempotencyContext`] as an extractor (`Option<IdempotencyContext>`
//!   where keys are optional).
//! - `redis`, `postgres`: the [`RedisStore`](store::RedisStore) and
//!   [`PostgresStore`](store::PostgresStore).
//! - `test-util`: the store [`conformance`](store::conformance) suite, a
//!   [`FaultyStore`](store::FaultyStore) that fails, stalls or corrupts on
//!   command, and a [`ManualClock`](store::ManualClock).

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "audit")]
#[cfg_attr(docsrs, doc(cfg(feature = "audit")))]
pub mod audit;
pub mod client;
mod context;
mod fingerprint;
pub mod grpc;
mod key;
mod metrics;
pub mod once;
mod outcome;
mod policy;
mod record;
mod rejection;
mod scope;
mod server;
pub mod store;
mod trail;

use server::{background, body, budget, claim, future, layer, service};

pub use background::{BackgroundStats, Drained};
pub use body::{RequestBody, ResponseBody};
pub use context::IdempotencyContext;
#[cfg(feature = "axum")]
pub use context::MissingContext;
pub use fingerprint::Fingerprint;
pub use future::ResponseFuture;
pub use key::{IdempotencyKey, KeyError, MAX_KEY_LEN};
pub use layer::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, IdempotencyLayer, Lapse};
pub use outcome::Outcome;
pub use policy::{RecordPolicy, RecordUnlessRetryable};
pub use rejection::{PROBLEM_TYPE_BASE, ProblemJson, Rejection, RejectionKind, RejectionResponse};
pub use scope::{Anonymous, DefaultScope, Principal, Scope, ScopeExtractor};
pub use service::Idempotency;
pub use store::{BoxStore, MemoryStore, Store};

/// 64 random bits from the standard library's per-process hash seed, mixed
/// with a counter: enough to tell this process's tokens from another's.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}
