//! Scopes: the server-side namespace of a key.
//!
//! The client chooses the key; the server chooses the scope, from something
//! the client cannot forge (its credentials, its tenant). The record is looked
//! up by `(scope, key)`, so two callers who pick the same key never see each
//! other's responses.

use std::fmt;

use http::{header, request};
use sha2::{Digest, Sha256};

/// A scope, as a string. The empty scope is global.
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

/// Chooses the scope of a request from its head (method, URI, headers and
/// extensions, such as an authenticated user put there by an earlier layer).
///
/// Implemented for closures `Fn(&request::Parts) -> Scope`:
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Scope};
///
/// let layer = IdempotencyLayer::new(MemoryStore::default()).with_scope(
///     |parts: &http::request::Parts| match parts.headers.get("x-tenant-id") {
///         Some(tenant) => Scope::new(String::from_utf8_lossy(tenant.as_bytes())),
///         None => Scope::global(),
///     },
/// );
/// ```
pub trait ScopeExtractor: Send + Sync + 'static {
    /// The scope of the request whose head is `parts`.
    fn scope(&self, parts: &request::Parts) -> Scope;
}

impl<F> ScopeExtractor for F
where
    F: Fn(&request::Parts) -> Scope + Send + Sync + 'static,
{
    fn scope(&self, parts: &request::Parts) -> Scope {
        self(parts)
    }
}

/// The default scope: a hash of the `Authorization` header when the request
/// has one, else global.
///
/// The credential itself is never stored, only `auth:` and the first 16 bytes
/// of its SHA-256 in hex.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthorizationScope;

impl ScopeExtractor for AuthorizationScope {
    fn scope(&self, parts: &request::Parts) -> Scope {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Scope::global();
        };
        let digest = Sha256::digest(value.as_bytes());
        let mut name = String::with_capacity(5 + 32);
        name.push_str("auth:");
        push_hex(&mut name, &digest[..16]);
        Scope(name)
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

    fn scope_of(auth: Option<&str>) -> Scope {
        let mut req = http::Request::post("/");
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        let (parts, ()) = req.body(()).unwrap().into_parts();
        AuthorizationScope.scope(&parts)
    }

    #[test]
    fn authorization_scopes_differ_and_hide_the_credential() {
        let alice = scope_of(Some("Bearer alice"));
        let bob = scope_of(Some("Bearer bob"));
        assert_ne!(alice, bob);
        assert_eq!(alice, scope_of(Some("Bearer alice")));
        assert!(!alice.as_str().contains("alice"));
        assert!(alice.as_str().starts_with("auth:"));
        assert_eq!(scope_of(None), Scope::global());
    }
}
