//! Scopes: the server-side namespace of a key.
//!
//! The client chooses the key; the server chooses the scope, from something
//! the client cannot forge (who the authentication layer says it is, its
//! credential). The record is looked up by `(scope, key)`, so two callers who
//! pick the same key never see each other's responses.

use std::{fmt, sync::Arc};

use hmac::{Hmac, Mac};
use http::{header, request};
use sha2::{Digest, Sha256};

/// A scope, as a string. The empty scope is global.
///
/// An application that knows the namespace itself (a tenant, an account)
/// can put a `Scope` into the request extensions before the layer runs; the
/// [`DefaultScope`] uses it, prefixed with `scope:`.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Scope(String);

impl Scope {
    /// The scope shared by every request: keys are global.
    pub fn global() -> Self {
        Scope(String::new())
    }

    /// A scope with this name.
    pub fn new(name: impl Into<String>) -> Self {
        Scope(name.into())
    }

    /// The scope's name; empty for the global scope.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Scope").field(&self.0).finish()
    }
}

/// Who the caller is, as the application's authentication layer decided:
/// a user id, an API client id, a certificate subject.
///
/// Insert it into the request extensions in the authentication middleware,
/// and put the idempotency layer *inside* that middleware (so it runs after
/// it). The [`DefaultScope`] then scopes keys by principal, which stays the
/// same when the caller's token is refreshed between two retries.
///
/// ```
/// use axum::{Router, extract::Request, middleware::{self, Next}, response::Response, routing::post};
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Principal};
///
/// async fn authenticate(mut req: Request, next: Next) -> Response {
///     // Look the session cookie, API key or token up; here, a fixed user.
///     req.extensions_mut().insert(Principal::new("user-42"));
///     next.run(req).await
/// }
///
/// let app: Router = Router::new()
///     .route("/payments", post(|| async { "paid" }))
///     // Layers added later wrap the earlier ones: authentication runs first.
///     .layer(IdempotencyLayer::new(MemoryStore::default()))
///     .layer(middleware::from_fn(authenticate));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Principal(Arc<str>);

impl Principal {
    /// The principal with this stable id.
    pub fn new(id: impl Into<String>) -> Self {
        Principal(Arc::from(id.into()))
    }

    /// The principal's id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Principal").field(&&*self.0).finish()
    }
}

/// Chooses the scope of a request from its head (method, URI, headers and
/// extensions, such as a [`Principal`] an authentication layer put there).
///
/// `None` means the request is anonymous: the layer then applies its
/// [`Anonymous`] policy (by default, it rejects the request).
///
/// Implemented for closures `Fn(&request::Parts) -> Option<Scope>`. Build
/// the scope from what the server established (never from a header the
/// client chooses freely):
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Scope};
///
/// /// Put into the extensions by the app's authentication.
/// #[derive(Clone)]
/// struct Account(u64);
///
/// let layer = IdempotencyLayer::new(MemoryStore::default()).with_scope(
///     |parts: &http::request::Parts| {
///         let account = parts.extensions.get::<Account>()?;
///         Some(Scope::new(format!("account:{}", account.0)))
///     },
/// );
/// ```
pub trait ScopeExtractor: Send + Sync + 'static {
    /// The scope of the request whose head is `parts`, or `None` when the
    /// request is anonymous.
    fn scope(&self, parts: &request::Parts) -> Option<Scope>;
}

impl<F> ScopeExtractor for F
where
    F: Fn(&request::Parts) -> Option<Scope> + Send + Sync + 'static,
{
    fn scope(&self, parts: &request::Parts) -> Option<Scope> {
        self(parts)
    }
}

/// What the layer does with a keyed request that has no scope: no
/// principal, no credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Anonymous {
    /// Answer 401 `anonymous-request` and run nothing (the default). An
    /// endpoint that moves money or books a slot has callers it knows; a
    /// keyed request that reaches it without an identity means the layer
    /// sits outside the authentication layer, or the route was left open by
    /// mistake, and sharing one namespace would let any caller who learns
    /// another's key and body receive that caller's response.
    #[default]
    Reject,
    /// Put every anonymous request into one global scope. Right only for an
    /// endpoint that is public by design and whose responses hold nothing
    /// private. The layer logs one warning the first time it does so.
    Shared,
}

/// The default scope, in this order:
///
/// 1. a [`Scope`] in the request extensions: `scope:` and its name;
/// 2. a [`Principal`] in the request extensions: `principal:` and a hash of
///    its id;
/// 3. the `Authorization` header (or the [header](Self::with_header)
///    given): `credential:` and a hash of its value;
/// 4. else none: the request is anonymous (see [`Anonymous`]).
///
/// Ids and credentials are never stored, only 128 bits of their hash. With a
/// [secret](Self::with_secret) the hash is HMAC-SHA-256, so someone who can
/// read the store cannot test guessed passwords or tokens against it;
/// without one it is plain SHA-256.
///
/// A scope taken from the credential changes when the credential does: a
/// client whose token is refreshed between two retries of one payment lands
/// in a new scope, and the retry executes again. A principal from the
/// authentication layer does not change; prefer it.
#[derive(Clone)]
pub struct DefaultScope {
    /// HMAC-SHA-256 already keyed with the secret: each request clones it
    /// rather than hashing the key again.
    keyed: Option<Hmac<Sha256>>,
    /// The header carrying the credential.
    header: header::HeaderName,
}

impl Default for DefaultScope {
    fn default() -> Self {
        DefaultScope {
            keyed: None,
            header: header::AUTHORIZATION,
        }
    }
}

impl DefaultScope {
    /// The default scope, hashing without a secret.
    pub fn new() -> Self {
        DefaultScope::default()
    }

    /// Hash principals and credentials with HMAC-SHA-256 under `secret`
    /// (32 random bytes or more, kept like any other server secret and the
    /// same on every server sharing a store).
    ///
    /// ```
    /// use tower_idempotency::{DefaultScope, IdempotencyLayer, MemoryStore};
    ///
    /// let secret = std::env::var("IDEMPOTENCY_SCOPE_SECRET").unwrap_or_default();
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_scope(DefaultScope::new().with_secret(secret));
    /// ```
    #[must_use]
    pub fn with_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.keyed = Some(
            <Hmac<Sha256> as Mac>::new_from_slice(secret.as_ref())
                .expect("HMAC takes a key of any length"),
        );
        self
    }

    /// Take the credential from `header` instead of `Authorization`, for an
    /// API whose clients send a key in, say, `X-Api-Key`. Only that header
    /// counts: a request without it is anonymous even if it carries
    /// `Authorization`.
    ///
    /// ```
    /// use tower_idempotency::{DefaultScope, IdempotencyLayer, MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_scope(
    ///     DefaultScope::new().with_header(http::HeaderName::from_static("x-api-key")),
    /// );
    /// ```
    #[must_use]
    pub fn with_header(mut self, header: header::HeaderName) -> Self {
        self.header = header;
        self
    }

    fn hashed(&self, prefix: &str, value: &[u8]) -> Scope {
        self.hashed_parts(prefix, &[value])
    }

    fn hashed_parts(&self, prefix: &str, value: &[&[u8]]) -> Scope {
        let digest: [u8; 32] = match &self.keyed {
            Some(keyed) => {
                let mut mac = keyed.clone();
                mac.update(prefix.as_bytes());
                value.iter().for_each(|part| mac.update(part));
                mac.finalize().into_bytes().into()
            }
            None => {
                let mut hasher = Sha256::new();
                hasher.update(prefix.as_bytes());
                value.iter().for_each(|part| hasher.update(part));
                hasher.finalize().into()
            }
        };
        let mut name = String::with_capacity(prefix.len() + 32);
        name.push_str(prefix);
        push_hex(&mut name, &digest[..16]);
        Scope(name)
    }
}

impl fmt::Debug for DefaultScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DefaultScope")
            .field("secret", &self.keyed.as_ref().map(|_| "<set>"))
            .field("header", &self.header)
            .finish()
    }
}

impl ScopeExtractor for DefaultScope {
    fn scope(&self, parts: &request::Parts) -> Option<Scope> {
        if let Some(scope) = parts.extensions.get::<Scope>() {
            // Prefixed, so no app scope can equal a hashed one.
            return Some(Scope(format!("scope:{}", scope.0)));
        }
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Some(self.hashed("principal:", principal.as_str().as_bytes()));
        }
        let credential = parts.headers.get(&self.header)?.as_bytes().trim_ascii();
        if credential.is_empty() {
            return None;
        }
        // `Authorization: <scheme> <credentials>`: the scheme is
        // case-insensitive (RFC 9110, section 11.1), so `bearer x` and
        // `Bearer  x` are one caller.
        let authorization =
            self.header == header::AUTHORIZATION || self.header == header::PROXY_AUTHORIZATION;
        if authorization && let Some(space) = credential.iter().position(|b| *b == b' ') {
            let rest = credential[space..].trim_ascii_start();
            // Schemes are short (`bearer`, `basic`): lower-cased on the
            // stack, without an allocation per request.
            let mut short = [0u8; 32];
            let long;
            let scheme: &[u8] = match short.get_mut(..space) {
                Some(buffer) => {
                    buffer.copy_from_slice(&credential[..space]);
                    buffer.make_ascii_lowercase();
                    buffer
                }
                None => {
                    long = credential[..space].to_ascii_lowercase();
                    &long
                }
            };
            return Some(self.hashed_parts("credential:", &[scheme, b" ", rest]));
        }
        Some(self.hashed("credential:", credential))
    }
}

pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(auth: Option<&str>, principal: Option<&str>) -> request::Parts {
        let mut req = http::Request::post("/");
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        let (mut parts, ()) = req.body(()).unwrap().into_parts();
        if let Some(id) = principal {
            parts.extensions.insert(Principal::new(id));
        }
        parts
    }

    fn scope_of(auth: Option<&str>) -> Option<Scope> {
        DefaultScope::new().scope(&parts(auth, None))
    }

    #[test]
    fn a_configured_header_replaces_authorization() {
        let by_key = DefaultScope::new().with_header(header::HeaderName::from_static("x-api-key"));
        // Authorization alone does not count any more.
        assert_eq!(by_key.scope(&parts(Some("Bearer alice"), None)), None);
        let mut with_key = parts(None, None);
        with_key
            .headers
            .insert("x-api-key", http::HeaderValue::from_static("k-alice"));
        let scope = by_key.scope(&with_key).unwrap();
        assert!(scope.as_str().starts_with("credential:"));
        assert!(!scope.as_str().contains("k-alice"));
        let mut other = parts(None, None);
        other
            .headers
            .insert("x-api-key", http::HeaderValue::from_static("k-bob"));
        assert_ne!(by_key.scope(&other), Some(scope));
    }

    #[test]
    fn an_authorization_scheme_is_case_insensitive_and_an_empty_credential_is_none() {
        let alice = scope_of(Some("Bearer alice")).unwrap();
        for same in [
            "bearer alice",
            "BEARER alice",
            "Bearer   alice",
            " Bearer alice ",
        ] {
            assert_eq!(scope_of(Some(same)), Some(alice.clone()), "{same:?}");
        }
        assert_ne!(scope_of(Some("Bearer Alice")), Some(alice));
        let long = "X".repeat(40);
        assert_eq!(
            scope_of(Some(&format!("{long} t"))),
            scope_of(Some(&format!("{} t", long.to_lowercase())))
        );
        assert_eq!(scope_of(Some("")), None);
        assert_eq!(scope_of(Some("   ")), None);
    }

    #[test]
    fn credential_scopes_differ_and_hide_the_credential() {
        let alice = scope_of(Some("Bearer alice")).unwrap();
        let bob = scope_of(Some("Bearer bob")).unwrap();
        assert_ne!(alice, bob);
        assert_eq!(Some(&alice), scope_of(Some("Bearer alice")).as_ref());
        assert!(!alice.as_str().contains("alice"));
        assert!(alice.as_str().starts_with("credential:"));
        assert_eq!(scope_of(None), None);
    }

    #[test]
    fn a_principal_wins_over_the_credential_and_an_explicit_scope_over_both() {
        let scope = DefaultScope::new();
        let v1 = scope.scope(&parts(Some("Bearer alice.v1"), Some("alice")));
        let v2 = scope.scope(&parts(Some("Bearer alice.v2"), Some("alice")));
        let none = scope.scope(&parts(None, Some("alice")));
        assert_eq!(v1, v2);
        assert_eq!(v1, none);
        let id = v1.unwrap();
        assert!(id.as_str().starts_with("principal:"));
        assert!(!id.as_str().contains("alice"));
        assert_ne!(Some(id), scope.scope(&parts(None, Some("bob"))));

        let mut explicit = parts(Some("Bearer x"), Some("alice"));
        explicit.extensions.insert(Scope::new("tenant-7"));
        assert_eq!(scope.scope(&explicit), Some(Scope::new("scope:tenant-7")));
    }

    #[test]
    fn a_secret_changes_every_hash_and_is_not_printed() {
        let plain = DefaultScope::new();
        let keyed = DefaultScope::new().with_secret("s3cret");
        let other = DefaultScope::new().with_secret("other");
        for request in [parts(Some("Bearer a"), None), parts(None, Some("a"))] {
            let (p, k, o) = (
                plain.scope(&request).unwrap(),
                keyed.scope(&request).unwrap(),
                other.scope(&request).unwrap(),
            );
            assert_ne!(p, k);
            assert_ne!(k, o);
            assert_eq!(k.as_str().len(), p.as_str().len());
        }
        assert!(!format!("{keyed:?}").contains("s3cret"));
    }

    #[test]
    fn a_principal_and_a_credential_with_the_same_text_differ() {
        let scope = DefaultScope::new();
        assert_ne!(
            scope.scope(&parts(Some("alice"), None)),
            scope.scope(&parts(None, Some("alice")))
        );
    }
}
