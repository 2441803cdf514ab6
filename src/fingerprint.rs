//! The fingerprint: what makes two requests "the same request".
//!
//! SHA-256 over the method, path, query, `Content-Type`, any extra headers the
//! layer is configured with, and the body. Every field is length-prefixed and
//! optional fields carry a presence byte, so no two different requests can
//! produce the same input by moving bytes from one field to the next.

use std::fmt;

use http::{HeaderMap, HeaderName, request};
use sha2::{Digest, Sha256};

/// Version tag hashed first, so a change to the layout changes every
/// fingerprint rather than silently matching old records.
const DOMAIN: &[u8] = b"tower-idempotency/fingerprint/v1";

/// A SHA-256 digest identifying a request's content.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Wraps a digest read back from a store.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Fingerprint(bytes)
    }

    /// The 32 digest bytes, for a store to persist.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Computes the fingerprint of a request from its head and buffered body.
    ///
    /// `extra_headers` names headers whose values (all of them, in order) are
    /// part of the request's identity.
    pub fn compute(parts: &request::Parts, extra_headers: &[HeaderName], body: &[u8]) -> Self {
        let mut hasher = Hasher(Sha256::new());
        hasher.0.update(DOMAIN);
        hasher.field(parts.method.as_str().as_bytes());
        hasher.field(parts.uri.path().as_bytes());
        hasher.optional(parts.uri.query().map(str::as_bytes));
        hasher.optional(
            parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
        );
        hasher.headers(&parts.headers, extra_headers);
        hasher.field(body);
        Fingerprint(hasher.0.finalize().into())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("..)")
    }
}

struct Hasher(Sha256);

impl Hasher {
    fn len(&mut self, len: usize) {
        self.0.update((len as u64).to_be_bytes());
    }

    fn field(&mut self, bytes: &[u8]) {
        self.len(bytes.len());
        self.0.update(bytes);
    }

    fn optional(&mut self, bytes: Option<&[u8]>) {
        match bytes {
            None => self.0.update([0]),
            Some(bytes) => {
                self.0.update([1]);
                self.field(bytes);
            }
        }
    }

    fn headers(&mut self, headers: &HeaderMap, names: &[HeaderName]) {
        self.len(names.len());
        for name in names {
            self.field(name.as_str().as_bytes());
            let values = headers.get_all(name);
            self.len(values.iter().count());
            for value in values {
                self.field(value.as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn fp(req: Request<()>, extra: &[HeaderName], body: &[u8]) -> Fingerprint {
        let (parts, ()) = req.into_parts();
        Fingerprint::compute(&parts, extra, body)
    }

    fn post(uri: &str) -> http::request::Builder {
        Request::post(uri)
    }

    #[test]
    fn identical_requests_match() {
        let a = fp(post("/a?x=1").body(()).unwrap(), &[], b"body");
        let b = fp(post("/a?x=1").body(()).unwrap(), &[], b"body");
        assert_eq!(a, b);
    }

    #[test]
    fn each_part_changes_the_fingerprint() {
        let base = fp(post("/a?x=1").body(()).unwrap(), &[], b"body");
        let variants = [
            fp(Request::patch("/a?x=1").body(()).unwrap(), &[], b"body"),
            fp(post("/b?x=1").body(()).unwrap(), &[], b"body"),
            fp(post("/a?x=2").body(()).unwrap(), &[], b"body"),
            fp(post("/a").body(()).unwrap(), &[], b"body"),
            fp(
                post("/a?x=1")
                    .header("content-type", "text/plain")
                    .body(())
                    .unwrap(),
                &[],
                b"body",
            ),
            fp(post("/a?x=1").body(()).unwrap(), &[], b"bodY"),
        ];
        for v in variants {
            assert_ne!(base, v);
        }
    }

    #[test]
    fn empty_query_differs_from_no_query() {
        let none = fp(post("/a").body(()).unwrap(), &[], b"");
        let empty = fp(post("/a?").body(()).unwrap(), &[], b"");
        assert_ne!(none, empty);
    }

    #[test]
    fn moving_bytes_between_fields_changes_the_fingerprint() {
        let a = fp(post("/ab?c").body(()).unwrap(), &[], b"d");
        let b = fp(post("/a?bc").body(()).unwrap(), &[], b"d");
        let c = fp(post("/ab?").body(()).unwrap(), &[], b"cd");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(b, c);
    }

    #[test]
    fn extra_headers_count_only_when_configured() {
        let tenant = HeaderName::from_static("x-tenant");
        let with = |v: &str, extra: &[HeaderName]| {
            fp(
                post("/a").header("x-tenant", v).body(()).unwrap(),
                extra,
                b"",
            )
        };
        assert_eq!(with("1", &[]), with("2", &[]));
        assert_ne!(
            with("1", std::slice::from_ref(&tenant)),
            with("2", std::slice::from_ref(&tenant))
        );
        let absent = fp(
            post("/a").body(()).unwrap(),
            std::slice::from_ref(&tenant),
            b"",
        );
        assert_ne!(absent, with("", std::slice::from_ref(&tenant)));
    }
}
