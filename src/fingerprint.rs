//! The fingerprint: what makes two requests "the same request".
//!
//! SHA-256 over the method, the authority (`Host`), the full path and query,
//! every `Content-Type` value, any extra headers the layer is configured
//! with, the body and its trailers, so a replay never crosses hosts or
//! routes. Every field is
//! length-prefixed and optional fields carry a presence byte, so no two
//! different requests can produce the same input by moving bytes from one
//! field to the next.

use std::fmt;

use http::{HeaderMap, HeaderName, request};
use sha2::{Digest, Sha256};

/// Version tag hashed first, so a change to the layout changes every
/// fingerprint rather than silently matching old records.
const DOMAIN: &[u8] = b"tower-idempotency/fingerprint/v2";

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
    /// The authority is the URI's (HTTP/2 `:authority`, or an absolute-form
    /// HTTP/1 target), else the `Host` header, compared without regard to
    /// ASCII case. The path and query are the request's full ones: with the
    /// `axum` feature, those of axum's `OriginalUri` when a router nested
    /// the service under a prefix it stripped.
    ///
    /// `extra_headers` names headers whose values (all of them, in order) are
    /// part of the request's identity. Every `Content-Type` value counts, in
    /// order.
    pub fn compute(parts: &request::Parts, extra_headers: &[HeaderName], body: &[u8]) -> Self {
        Self::compute_with_trailers(parts, extra_headers, body, None)
    }

    /// [`compute`](Self::compute), for a request whose body ended with
    /// `trailers`: every trailer field, in order, is part of its identity.
    ///
    /// A request with one `Content-Type` (or none) and no trailers has the
    /// fingerprint it had before trailers and further `Content-Type` values
    /// counted, so records written by earlier releases still match.
    pub fn compute_with_trailers(
        parts: &request::Parts,
        extra_headers: &[HeaderName],
        body: &[u8],
        trailers: Option<&HeaderMap>,
    ) -> Self {
        let uri = full_uri(parts);
        let mut hasher = Hasher(Sha256::new());
        hasher.0.update(DOMAIN);
        hasher.field(parts.method.as_str().as_bytes());
        hasher.authority(authority(parts));
        hasher.field(uri.path().as_bytes());
        hasher.optional(uri.query().map(str::as_bytes));
        let content_types = parts.headers.get_all(http::header::CONTENT_TYPE);
        hasher.optional(content_types.iter().next().map(|v| v.as_bytes()));
        hasher.headers(&parts.headers, extra_headers);
        hasher.field(body);
        // Appended only when present: every field before is self-delimiting,
        // so a request with them never hashes the same input as one without.
        let trailers = trailers.filter(|t| !t.is_empty());
        let more_types = content_types.iter().count().saturating_sub(1);
        if more_types > 0 || trailers.is_some() {
            hasher.field(b"more");
            hasher.len(more_types);
            for value in content_types.iter().skip(1) {
                hasher.field(value.as_bytes());
            }
            hasher.len(trailers.map_or(0, HeaderMap::len));
            for (name, value) in trailers.into_iter().flatten() {
                hasher.field(name.as_str().as_bytes());
                hasher.field(value.as_bytes());
            }
        }
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

/// The URI the client sent, before any router stripped a prefix from it.
fn full_uri(parts: &request::Parts) -> &http::Uri {
    #[cfg(feature = "axum")]
    if let Some(original) = parts.extensions.get::<axum::extract::OriginalUri>() {
        return &original.0;
    }
    &parts.uri
}

fn authority(parts: &request::Parts) -> Option<&[u8]> {
    match parts.uri.authority() {
        Some(authority) => Some(authority.as_str().as_bytes()),
        None => parts.headers.get(http::header::HOST).map(|v| v.as_bytes()),
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

    /// An optional field hashed in ASCII lowercase, without allocating.
    fn authority(&mut self, authority: Option<&[u8]>) {
        let Some(authority) = authority else {
            self.0.update([0]);
            return;
        };
        self.0.update([1]);
        self.len(authority.len());
        let mut buf = [0u8; 64];
        for chunk in authority.chunks(buf.len()) {
            let lower = &mut buf[..chunk.len()];
            lower.copy_from_slice(chunk);
            lower.make_ascii_lowercase();
            self.0.update(lower);
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
    fn hosts_differ_but_not_by_case_and_the_uri_authority_counts() {
        let on = |host: &str| fp(post("/a").header("host", host).body(()).unwrap(), &[], b"");
        assert_ne!(on("a.example"), on("b.example"));
        assert_eq!(on("A.Example"), on("a.example"));
        assert_ne!(on("a.example"), fp(post("/a").body(()).unwrap(), &[], b""));
        let h2 = fp(post("https://a.example/a").body(()).unwrap(), &[], b"");
        assert_eq!(h2, on("a.example"));
        let long = "x".repeat(200);
        assert_eq!(on(&long.to_uppercase()), on(&long));
    }

    #[cfg(feature = "axum")]
    #[test]
    fn a_nested_route_is_fingerprinted_by_its_full_path() {
        let nested = |prefix: &str| {
            let (mut parts, ()) = post("/book").body(()).unwrap().into_parts();
            let original = format!("{prefix}/book").parse().unwrap();
            parts
                .extensions
                .insert(axum::extract::OriginalUri(original));
            Fingerprint::compute(&parts, &[], b"")
        };
        assert_ne!(nested("/v1"), nested("/v2"));
        assert_eq!(nested(""), fp(post("/book").body(()).unwrap(), &[], b""));
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

    #[test]
    fn every_content_type_value_counts() {
        let typed = |values: &[&str]| {
            let mut req = post("/a");
            for v in values {
                req = req.header("content-type", *v);
            }
            fp(req.body(()).unwrap(), &[], b"")
        };
        assert_ne!(typed(&["a/b", "c/d"]), typed(&["a/b", "e/f"]));
        assert_ne!(typed(&["a/b", "c/d"]), typed(&["a/b"]));
        assert_ne!(typed(&["a/b", "c/d"]), typed(&["c/d", "a/b"]));
    }

    #[test]
    fn trailers_count_and_none_is_the_fingerprint_without_them() {
        let (parts, ()) = post("/a").body(()).unwrap().into_parts();
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut trailers = HeaderMap::new();
            for (name, value) in pairs {
                trailers.append(*name, http::HeaderValue::from_static(value));
            }
            Fingerprint::compute_with_trailers(&parts, &[], b"x", Some(&trailers))
        };
        let plain = Fingerprint::compute(&parts, &[], b"x");
        assert_eq!(with(&[]), plain, "empty trailers are no trailers");
        assert_ne!(with(&[("x-sum", "1")]), plain);
        assert_ne!(with(&[("x-sum", "1")]), with(&[("x-sum", "2")]));
        assert_ne!(with(&[("x-sum", "1")]), with(&[("x-sun", "1")]));
    }

    /// Records written before trailers and further content types counted
    /// keep matching: a request with neither hashes as it did.
    #[test]
    fn the_common_fingerprint_is_unchanged() {
        let (parts, ()) = post("http://a.example/book?x=1")
            .header("content-type", "application/json")
            .body(())
            .unwrap()
            .into_parts();
        let mut hasher = Sha256::new();
        hasher.update(DOMAIN);
        for field in [&b"POST"[..], b"a.example", b"/book"] {
            if field == b"a.example" {
                hasher.update([1]);
            }
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field);
        }
        for optional in [&b"x=1"[..], b"application/json"] {
            hasher.update([1]);
            hasher.update((optional.len() as u64).to_be_bytes());
            hasher.update(optional);
        }
        hasher.update(0u64.to_be_bytes());
        hasher.update(4u64.to_be_bytes());
        hasher.update(b"body");
        let expected: [u8; 32] = hasher.finalize().into();
        assert_eq!(Fingerprint::compute(&parts, &[], b"body").0, expected);
    }
}
