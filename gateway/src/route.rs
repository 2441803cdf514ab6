//! What a request is, in the one spelling the gateway matches and forwards.
//!
//! Upstream frameworks route one request under many spellings: most
//! upper-case the method, WSGI and ASGI servers decode the path before
//! routing, Express and ASP.NET Core compare paths case-insensitively,
//! Tomcat and Spring drop `;` parameters, Rails strips a format suffix, and
//! many honour a method override. The gateway reads a request once into a
//! [`Canonical`] form, refuses what it cannot read unambiguously, matches
//! that form against the document ([`Api::decide`](crate::openapi::Api::decide)),
//! and forwards exactly that form:
//!
//! - the method upper-cased (`post` is `POST`, and goes out as `POST`);
//! - the path split on `/`, each segment percent-decoded for matching,
//!   `.` and empty segments dropped and `..` taking the previous segment
//!   away (never above the root, so never above the upstream's base path),
//!   and forwarded as the segments that remain, in their original encoding;
//! - an encoded `/` or `\` (`%2F`, `%5C`), a raw `\`, a malformed `%`
//!   escape, a segment that is not UTF-8 once decoded, or one holding a
//!   control character: refused (400), since servers disagree on what they
//!   mean;
//! - method overrides (`X-HTTP-Method-Override`, `X-HTTP-Method`,
//!   `X-Method-Override`, a `_method` query parameter): matched as the
//!   method they name as well (the stricter protection applies), and
//!   removed before forwarding, so the upstream runs the method that was
//!   matched.

use http::{HeaderMap, HeaderName, Method, StatusCode, Uri};
use percent_encoding::percent_decode_str;

/// The method-override headers frameworks honour.
pub const OVERRIDE_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// The query parameter Rails, Laravel and others read as a method override.
const OVERRIDE_PARAMETER: &str = "_method";

/// A request path, read once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath {
    /// What is forwarded: `/` and the remaining segments in their original
    /// encoding, with a trailing `/` when the request had one.
    pub forwarded: String,
    /// The segments, decoded, for matching.
    pub segments: Vec<PathSegment>,
}

/// One decoded segment of a request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathSegment {
    /// The segment, percent-decoded.
    pub decoded: String,
    /// Where, in `decoded`, the segment's `;` parameters begin (the first
    /// `;`, raw or encoded: Tomcat and Spring read a raw one, and the
    /// stricter reading costs nothing); `None` without any.
    pub params_at: Option<usize>,
}

impl PathSegment {
    /// The segment without its `;` parameters.
    pub fn without_params(&self) -> &str {
        match self.params_at {
            Some(at) => &self.decoded[..at],
            None => &self.decoded,
        }
    }
}

/// A request, as the gateway matches and forwards it.
#[derive(Debug, Clone)]
pub struct Canonical {
    /// The method, upper-cased.
    pub method: Method,
    /// The methods the request's overrides name, upper-cased.
    pub overrides: Vec<Method>,
    /// The path.
    pub path: CanonicalPath,
    /// The query without any `_method` parameter; `None` when nothing is
    /// left of it.
    pub query: Option<String>,
}

impl Canonical {
    /// The URI to forward: the original scheme and authority (if any), the
    /// canonical path and the remaining query; `None` when that is the
    /// original URI already.
    pub fn uri(&self, original: &Uri) -> Result<Option<Uri>, Refusal> {
        if self.path.forwarded == original.path() && self.query.as_deref() == original.query() {
            return Ok(None);
        }
        let mut path_and_query = self.path.forwarded.clone();
        if let Some(query) = &self.query {
            path_and_query.push('?');
            path_and_query.push_str(query);
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = original.scheme().cloned();
        parts.authority = original.authority().cloned();
        parts.path_and_query = Some(
            path_and_query
                .parse()
                .map_err(|_| Refusal::Path("the path cannot be written back as a URI"))?,
        );
        Uri::from_parts(parts)
            .map(Some)
            .map_err(|_| Refusal::Path("the path cannot be written back as a URI"))
    }
}

/// Why a request cannot be read unambiguously: answered 400, never
/// forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A path servers would read in different ways.
    Path(&'static str),
    /// A method override that names no method.
    Override(String),
}

impl Refusal {
    /// The status of the answer: 400.
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }

    /// The problem's `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Path(_) => "path-ambiguous",
            Refusal::Override(_) => "method-override-invalid",
        }
    }

    /// What the client can do about it.
    pub fn detail(&self) -> String {
        match self {
            Refusal::Path(why) => format!(
                "The request path is refused: {why}. Servers read such paths in different ways, so the gateway cannot tell which operation it is; send the path with plain segments."
            ),
            Refusal::Override(value) => format!(
                "The method override {value:?} is not an HTTP method; send the request with the method it means."
            ),
        }
    }
}

/// Reads `method`, `uri` and the override headers of a request.
pub fn canonical(method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<Canonical, Refusal> {
    let method = if method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        upper(method.as_str())?
    } else {
        method.clone()
    };
    let path = canonical_path(uri.path())?;
    let mut overrides = Vec::new();
    for (name, value) in headers {
        if !is_override_header(name) {
            continue;
        }
        let text = value
            .to_str()
            .map_err(|_| Refusal::Override(String::from_utf8_lossy(value.as_bytes()).into()))?;
        for one in text.split(',') {
            overrides.push(upper(one.trim())?);
        }
    }
    // A form may carry `_method` in its body (Rails, Laravel, Symfony
    // honour it on POST): the body is not read here, so the POST is read as
    // each method a form may name.
    if method == Method::POST && is_form(headers) {
        overrides.extend([Method::PUT, Method::PATCH, Method::DELETE]);
    }
    let query = match uri.query() {
        Some(query) => strip_override_parameter(query, &mut overrides)?,
        None => None,
    };
    overrides.retain(|m| *m != method);
    overrides.dedup();
    Ok(Canonical {
        method,
        overrides,
        path,
        query,
    })
}

/// Whether `name` is a method-override header, also spelled with `_` as
/// WSGI, CGI and PHP servers read it (`X_HTTP_Method_Override`).
pub(crate) fn is_override_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    OVERRIDE_HEADERS.iter().any(|known| {
        let known = known.as_str();
        known.len() == name.len()
            && known
                .bytes()
                .zip(name.bytes())
                .all(|(k, n)| k == n || (k == b'-' && n == b'_'))
    })
}

/// Whether the body is a form (URL-encoded or multipart), whose fields a
/// framework may read a `_method` from.
fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::CONTENT_TYPE)
        .iter()
        .any(|value| {
            let value = value.as_bytes().trim_ascii_start();
            let starts = |prefix: &[u8]| {
                value.len() >= prefix.len() && value[..prefix.len()].eq_ignore_ascii_case(prefix)
            };
            starts(b"application/x-www-form-urlencoded") || starts(b"multipart/form-data")
        })
}

/// The method token `text`, upper-cased.
fn upper(text: &str) -> Result<Method, Refusal> {
    let refused = || Refusal::Override(text.to_owned());
    if text.is_empty() {
        return Err(refused());
    }
    if text.bytes().all(|b| !b.is_ascii_lowercase()) {
        return Method::from_bytes(text.as_bytes()).map_err(|_| refused());
    }
    Method::from_bytes(text.to_ascii_uppercase().as_bytes()).map_err(|_| refused())
}

/// The query without `_method` parameters, whose values join `overrides`.
fn strip_override_parameter(
    query: &str,
    overrides: &mut Vec<Method>,
) -> Result<Option<String>, Refusal> {
    // Only a query that names `method` or holds an escape can carry the
    // parameter (`_%6Dethod` is `_method` once decoded).
    let lower = query.to_ascii_lowercase();
    if !lower.contains("method") && !query.contains('%') {
        return Ok(Some(query.to_owned()));
    }
    let mut kept: Vec<&str> = Vec::new();
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode_str(&name.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned();
        if name.eq_ignore_ascii_case(OVERRIDE_PARAMETER) {
            let value = percent_decode_str(&value.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned();
            overrides.push(upper(value.trim())?);
        } else {
            kept.push(pair);
        }
    }
    Ok((!kept.is_empty()).then(|| kept.join("&")))
}

/// Reads a path as described in the module's docs.
pub fn canonical_path(path: &str) -> Result<CanonicalPath, Refusal> {
    if path.contains('\\') {
        return Err(Refusal::Path("it holds a `\\`"));
    }
    let mut raw_segments: Vec<&str> = Vec::new();
    let mut segments: Vec<PathSegment> = Vec::new();
    let mut trailing = path.ends_with('/');
    for raw in path.split('/') {
        let decoded = decode(raw)?;
        trailing = false;
        // Tomcat and Spring drop `;` parameters before they resolve dot
        // segments: `..;x` is `..` to them and a name to others.
        let params_at = decoded.find(';');
        let bare = &decoded[..params_at.unwrap_or(decoded.len())];
        if params_at.is_some() && matches!(bare, "" | "." | "..") {
            return Err(Refusal::Path(
                "a segment is empty or a dot segment once its `;` parameters are dropped",
            ));
        }
        match decoded.as_str() {
            "" => {}
            "." => trailing = true,
            ".." => {
                raw_segments.pop();
                segments.pop();
                trailing = true;
            }
            _ if bare.ends_with('.') => {
                return Err(Refusal::Path(
                    "a segment ends with `.`, which some servers drop",
                ));
            }
            _ => {
                raw_segments.push(raw);
                segments.push(PathSegment { decoded, params_at });
            }
        }
    }
    trailing |= path.ends_with('/');
    let mut forwarded = String::with_capacity(path.len() + 1);
    for raw in &raw_segments {
        forwarded.push('/');
        forwarded.push_str(raw);
    }
    if forwarded.is_empty() || trailing {
        forwarded.push('/');
    }
    Ok(CanonicalPath {
        forwarded,
        segments,
    })
}

/// One raw segment, percent-decoded, or why it is refused.
fn decode(raw: &str) -> Result<String, Refusal> {
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|b| (*b as char).to_digit(16)),
                bytes.get(i + 2).and_then(|b| (*b as char).to_digit(16)),
            ) else {
                return Err(Refusal::Path("a `%` is not followed by two hex digits"));
            };
            match hi * 16 + lo {
                0x2F => return Err(Refusal::Path("it holds an encoded `/` (%2F)")),
                0x5C => return Err(Refusal::Path("it holds an encoded `\\` (%5C)")),
                0x25 if bytes.get(i + 3).is_some_and(u8::is_ascii_hexdigit)
                    && bytes.get(i + 4).is_some_and(u8::is_ascii_hexdigit) =>
                {
                    return Err(Refusal::Path(
                        "it is encoded twice (`%25` before two hex digits)",
                    ));
                }
                _ => {}
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| Refusal::Path("a segment is not UTF-8 once decoded"))?;
    if decoded.chars().any(char::is_control) {
        return Err(Refusal::Path("it holds a control character"));
    }
    Ok(decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(path: &str) -> String {
        canonical_path(path).unwrap().forwarded
    }

    fn decoded(path: &str) -> Vec<String> {
        canonical_path(path)
            .unwrap()
            .segments
            .into_iter()
            .map(|s| s.decoded)
            .collect()
    }

    #[test]
    fn dot_segments_never_climb_above_the_root() {
        for (path, expected) in [
            ("/../v2/appointments", "/v2/appointments"),
            ("/%2e%2e/v2/appointments", "/v2/appointments"),
            ("/.%2E/.%2e/x", "/x"),
            ("/a/./b/../c", "/a/c"),
            ("/a/b/..", "/a/"),
            ("//a//b/", "/a/b/"),
            ("/", "/"),
            ("", "/"),
            ("/..", "/"),
            ("/appointments;jsessionid=1", "/appointments;jsessionid=1"),
            ("/appoint%6Dents", "/appoint%6Dents"),
        ] {
            assert_eq!(forwarded(path), expected, "{path}");
        }
        assert_eq!(decoded("/appoint%6Dents/%34%32"), ["appointments", "42"]);
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for path in [
            "/appointments%2F42",
            "/api%2fpayments",
            "/a%5Cb",
            "/a\\b",
            "/a%zz",
            "/a%4",
            "/a%",
            "/a%C0%AE",
            "/a%00b",
            "/a%0Ab",
            "/appointments/..;/appointments",
            "/;/appointments",
            "/a/.;x",
            "/a%3B/..%3B/b",
            "/appointments.",
            "/reports/2024-01.pdf.",
            "/%2561ppointments",
            "/a%252F",
        ] {
            assert!(
                matches!(canonical_path(path), Err(Refusal::Path(_))),
                "{path}"
            );
        }
    }

    #[test]
    fn params_begin_at_the_first_semicolon_raw_or_encoded() {
        let path = canonical_path("/appointments;jsessionid=1/a%3Bb").unwrap();
        assert_eq!(path.segments[0].without_params(), "appointments");
        assert_eq!(path.segments[1].without_params(), "a");
    }

    #[test]
    fn methods_are_upper_cased_and_overrides_collected_and_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(&OVERRIDE_HEADERS[0], "delete".parse().unwrap());
        let uri: Uri = "/appointments/42?a=1&_method=put&b=2".parse().unwrap();
        let method = Method::from_bytes(b"post").unwrap();
        let c = canonical(&method, &uri, &headers).unwrap();
        assert_eq!(c.method, Method::POST);
        assert_eq!(c.overrides, [Method::DELETE, Method::PUT]);
        assert_eq!(c.query.as_deref(), Some("a=1&b=2"));
        assert_eq!(c.uri(&uri).unwrap().unwrap(), "/appointments/42?a=1&b=2");
        let plain: Uri = "/appointments/42?a=1".parse().unwrap();
        let same = canonical(&Method::POST, &plain, &HeaderMap::new()).unwrap();
        assert_eq!(same.uri(&plain).unwrap(), None);
        for encoded in ["/x?_%6Dethod=DELETE", "/x?%5f%6d%65%74%68%6f%64=DELETE"] {
            let encoded: Uri = encoded.parse().unwrap();
            let c = canonical(&Method::POST, &encoded, &HeaderMap::new()).unwrap();
            assert_eq!(c.overrides, [Method::DELETE], "{encoded}");
        }
        let encoded: Uri = "/x?%5Fmethod=DELETE".parse().unwrap();
        let c = canonical(&Method::POST, &encoded, &HeaderMap::new()).unwrap();
        assert_eq!(c.overrides, [Method::DELETE]);
        assert_eq!(c.query, None);
        headers.insert(&OVERRIDE_HEADERS[1], "DE LETE".parse().unwrap());
        assert!(matches!(
            canonical(&Method::POST, &uri, &headers),
            Err(Refusal::Override(_))
        ));
    }
}
