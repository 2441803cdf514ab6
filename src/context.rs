//! [`IdempotencyContext`]: what the handler is told about the intent it runs.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::{Fingerprint, scope::push_hex, store::RecordKey};

/// Domain of [`IdempotencyContext::derive`], hashed first.
const DERIVE_DOMAIN: &[u8] = b"tower-idempotency/derive/v1";

/// The intent a protected request carries, put into the request extensions
/// by the layer before it calls the service.
///
/// Side effects outside the request (a charge at a payment provider, a
/// message to another service) are the handler's to make idempotent; the
/// context gives it what it needs:
///
/// - [`derive`](Self::derive): a key for a downstream call, the same on
///   every execution of this intent, so the provider deduplicates a second
///   execution the way this layer deduplicates retries;
/// - [`took_over`](Self::took_over): this execution took the key over from
///   an earlier one that stopped renewing its claim (its process died or
///   stalled), so some of the work may already be done: look for your own
///   earlier write before writing again.
/// - [`fenced`](Self::fenced) and [`is_fenced`](Self::is_fenced), for
///   [`AtMostOnce`](crate::once::AtMostOnce) work: this execution lost its
///   claim while it ran (another took the key over, or the store lost it),
///   so its output will not be recorded: a long task can stop before its
///   side effect.
///
/// ```
/// use axum::{Extension, Json};
/// use tower_idempotency::IdempotencyContext;
///
/// async fn charge(Extension(ctx): Extension<IdempotencyContext>) -> Json<String> {
///     // Sent as the provider's own `Idempotency-Key`.
///     let provider_key = ctx.derive("payment-provider/charge");
///     Json(provider_key)
/// }
/// ```
///
/// With the `axum` feature, `IdempotencyContext` is an extractor by itself
/// (and `Option<IdempotencyContext>` for routes where keys are optional).
#[derive(Clone)]
pub struct IdempotencyContext {
    key: RecordKey,
    fingerprint: Fingerprint,
    took_over: bool,
    /// Cancelled once the claim is lost; `None` where nothing watches it.
    fence: Option<tokio_util::sync::CancellationToken>,
}

impl IdempotencyContext {
    pub(crate) fn new(key: RecordKey, fingerprint: Fingerprint, took_over: bool) -> Self {
        IdempotencyContext {
            key,
            fingerprint,
            took_over,
            fence: None,
        }
    }

    /// The same context, told through `fence` when its claim is lost.
    pub(crate) fn with_fence(mut self, fence: tokio_util::sync::CancellationToken) -> Self {
        self.fence = Some(fence);
        self
    }

    /// Whether this execution has lost its claim: another execution took
    /// the key over, or the store no longer holds the claim. Its output
    /// will not be recorded, and another execution may do, or have done,
    /// the same work. Set for [`AtMostOnce`](crate::once::AtMostOnce) work
    /// when a renewal of its lease is refused; always `false` for HTTP
    /// handlers.
    pub fn is_fenced(&self) -> bool {
        self.fence.as_ref().is_some_and(|f| f.is_cancelled())
    }

    /// Resolves once this execution has lost its claim (see
    /// [`is_fenced`](Self::is_fenced)); never, where nothing watches the
    /// claim. For a long task to stop before its side effect:
    ///
    /// ```no_run
    /// # async fn run(ctx: tower_idempotency::IdempotencyContext) -> Result<u64, String> {
    /// # async fn prepare() {} async fn charge() -> u64 { 1 }
    /// tokio::select! {
    ///     () = ctx.fenced() => Err("lost the claim: not charging".into()),
    ///     () = prepare() => Ok(charge().await),
    /// }
    /// # }
    /// ```
    pub async fn fenced(&self) {
        match &self.fence {
            Some(fence) => fence.cancelled().await,
            None => std::future::pending().await,
        }
    }

    /// The client's idempotency key, unquoted.
    pub fn key(&self) -> &str {
        self.key.key()
    }

    /// The scope the key was looked up in; empty for the shared anonymous
    /// scope.
    pub fn scope(&self) -> &str {
        self.key.scope()
    }

    /// The request's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Whether this execution took over a claim whose holder stopped
    /// renewing it before it finished: the earlier execution may have done
    /// part of the work. A store that lost the lapsed claim before this
    /// request came (evicted, expired past its retention) reports `false`.
    pub fn took_over(&self) -> bool {
        self.took_over
    }

    /// A stable key for a downstream call, derived from this intent: the
    /// same on every execution of it (retries, take-overs, other servers of
    /// the fleet), and different per `label` and per scope.
    ///
    /// 32 lowercase hex characters: the first 16 bytes of SHA-256 over the
    /// ASCII text `tower-idempotency/derive/v1` followed by the scope, the
    /// key and the label, each as its UTF-8 length in 8 big-endian bytes
    /// followed by its bytes.
    ///
    /// ```
    /// # use tower_idempotency::IdempotencyContext;
    /// fn provider_key(ctx: &IdempotencyContext) -> String {
    ///     ctx.derive("stripe/payment_intents")
    /// }
    /// ```
    pub fn derive(&self, label: &str) -> String {
        derive(self.key.scope(), self.key.key(), label)
    }
}

pub(crate) fn derive(scope: &str, key: &str, label: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(DERIVE_DOMAIN);
    for field in [scope, key, label] {
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field.as_bytes());
    }
    let digest = hasher.finalize();
    let mut hex = String::with_capacity(32);
    push_hex(&mut hex, &digest[..16]);
    hex
}

impl fmt::Debug for IdempotencyContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the raw key: logs carry requests' contexts.
        f.debug_struct("IdempotencyContext")
            .field("scope", &self.scope())
            .field("key_len", &self.key().len())
            .field("fingerprint", &self.fingerprint)
            .field("took_over", &self.took_over)
            .finish()
    }
}

#[cfg(feature = "axum")]
mod extract {
    use axum::{
        extract::{FromRequestParts, OptionalFromRequestParts},
        http::{StatusCode, request::Parts},
        response::{IntoResponse, Response},
    };

    use super::IdempotencyContext;

    /// The handler asked for an [`IdempotencyContext`] but the request has
    /// none: the route is not behind the layer, or the request carried no
    /// key (take `Option<IdempotencyContext>` where keys are optional).
    /// Answers 500, since the server is misconfigured.
    #[derive(Debug, Clone, Copy)]
    pub struct MissingContext;

    impl std::fmt::Display for MissingContext {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(
                "no IdempotencyContext: the route is not behind IdempotencyLayer, \
                 or the request carried no idempotency key",
            )
        }
    }

    impl std::error::Error for MissingContext {}

    impl IntoResponse for MissingContext {
        fn into_response(self) -> Response {
            (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
        }
    }

    impl<S: Send + Sync> FromRequestParts<S> for IdempotencyContext {
        type Rejection = MissingContext;

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
            parts
                .extensions
                .get::<IdempotencyContext>()
                .cloned()
                .ok_or(MissingContext)
        }
    }

    impl<S: Send + Sync> OptionalFromRequestParts<S> for IdempotencyContext {
        type Rejection = std::convert::Infallible;

        async fn from_request_parts(
            parts: &mut Parts,
            _: &S,
        ) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<IdempotencyContext>().cloned())
        }
    }
}

#[cfg(feature = "axum")]
pub use extract::MissingContext;

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(scope: &str, key: &str) -> IdempotencyContext {
        IdempotencyContext::new(
            RecordKey::new(scope, key),
            Fingerprint::from_bytes([0; 32]),
            false,
        )
    }

    #[test]
    fn derived_keys_are_stable_and_differ_per_label_scope_and_key() {
        let a = ctx("principal:1", "k");
        assert_eq!(a.derive("charge"), ctx("principal:1", "k").derive("charge"));
        assert_eq!(a.derive("charge").len(), 32);
        assert!(
            a.derive("charge")
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        let others = [
            a.derive("refund"),
            ctx("principal:2", "k").derive("charge"),
            ctx("principal:1", "k2").derive("charge"),
            // Bytes moved between fields give a different key.
            ctx("principal:1k", "").derive("charge"),
            ctx("principal:1", "kc").derive("harge"),
        ];
        for other in &others {
            assert_ne!(&a.derive("charge"), other);
        }
    }

    #[test]
    fn derivation_matches_its_documented_construction() {
        // Written out by hand from the documentation.
        let mut input = Vec::new();
        input.extend_from_slice(b"tower-idempotency/derive/v1");
        for field in ["s", "key-1", "label"] {
            input.extend_from_slice(&(field.len() as u64).to_be_bytes());
            input.extend_from_slice(field.as_bytes());
        }
        let digest = Sha256::digest(&input);
        let expected: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(ctx("s", "key-1").derive("label"), expected);
    }

    #[test]
    fn debug_never_shows_the_key() {
        let shown = format!("{:?}", ctx("s", "secret-key-value"));
        assert!(!shown.contains("secret-key-value"), "{shown}");
    }
}
