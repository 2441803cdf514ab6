//! gRPC: statuses for rejections, and a record policy that reads the status
//! in the trailers.
//!
//! A gRPC call is an HTTP/2 `POST` to `/package.Service/Method` whose
//! outcome travels in `grpc-status`: in the trailers after the response
//! messages, or in the headers of a *trailers-only* response (how servers
//! answer most errors). The layer treats it like any request (key from the
//! `idempotency-key` metadata, fingerprint over method, authority, path and
//! the request message bytes), with three differences that
//! [`IdempotencyLayer::with_grpc`](crate::IdempotencyLayer::with_grpc) sets
//! up in one call:
//!
//! - **Which calls.** Only the methods named are protected, and they should
//!   be unary. The layer reads a request's whole body before it calls the
//!   service and records a response up to its limit, so a client-streaming
//!   or bidirectional call would not reach its handler until the client
//!   half-closed (a bidirectional client that waits for the server's first
//!   message waits until its deadline), and a long server stream would be
//!   recorded only as "not retained". A streaming method is protected only
//!   when it is named too, which says its streams are short and finite.
//! - **What is recorded.** [`GrpcRecordPolicy`] waits for the end of the
//!   response to read `grpc-status` and releases the key (a retry executes)
//!   for `UNAVAILABLE`, `RESOURCE_EXHAUSTED`, `ABORTED` and
//!   `DEADLINE_EXCEEDED`, the gRPC counterparts of HTTP 503, 429, 409 and
//!   408: the server says the call was not done, try again. Every other
//!   status is recorded and replayed, `OK` and errors alike.
//! - **Rejections** are gRPC statuses ([`GrpcRejections`]), as trailers-only
//!   responses with `grpc-status`, `grpc-message` (starting with the stable
//!   code, such as `request-in-flight`) and `idempotency-rejection` (the
//!   code alone), without any dependency on tonic:
//!
//! | case | HTTP | gRPC status | why |
//! |---|---|---|---|
//! | `missing-key`, `invalid-key` | 400 | `INVALID_ARGUMENT` (3) | the request itself is wrong, whatever the server's state |
//! | `key-reused` | 400 / 422 | `FAILED_PRECONDITION` (9) | the key is valid but already belongs to another request: wrong for the server's current state, and not to be retried as is (a new intent needs a new key) |
//! | `anonymous-request` | 401 | `UNAUTHENTICATED` (16) | no caller to scope the key by |
//! | `request-in-flight` | 409 | `ABORTED` (10) | a concurrency conflict; retry the same call later (`grpc-retry-pushback-ms` carries the hint) |
//! | `body-too-large` | 413 | `RESOURCE_EXHAUSTED` (8) | the message is over the layer's limit |
//! | `body-unreadable` | 400 | `INVALID_ARGUMENT` (3) | the request stream broke before its end; nothing was claimed |
//! | `response-not-retained` | 410 | `FAILED_PRECONDITION` (9) | it ran, but its response was too large to keep; do not retry |
//! | `store-unavailable` | 503 | `UNAVAILABLE` (14) | transient; nothing ran; retry (`grpc-retry-pushback-ms` carries the hint) |
//! | `audit-unavailable` | 503 | `UNAVAILABLE` (14) | transient; nothing ran; retry |
//! | `overloaded` | 503 | `UNAVAILABLE` (14) | too many request bodies buffered at once; nothing ran; retry |
//! | `outcome-unknown` | 500 | `UNKNOWN` (2) | stopped past the maximum execution time; it may have taken effect and will not run again under this key |
//!
//! A replay carries the recorded response as it was: initial metadata plus
//! `idempotent-replayed: true`, the response messages byte for byte, and
//! the trailers (`grpc-status`, `grpc-message`, any custom trailer).

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header, response};

use crate::{Rejection, RejectionKind, RejectionResponse, policy::RecordPolicy};

/// A gRPC status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum GrpcCode {
    /// 0
    Ok,
    /// 1
    Cancelled,
    /// 2
    Unknown,
    /// 3
    InvalidArgument,
    /// 4
    DeadlineExceeded,
    /// 5
    NotFound,
    /// 6
    AlreadyExists,
    /// 7
    PermissionDenied,
    /// 8
    ResourceExhausted,
    /// 9
    FailedPrecondition,
    /// 10
    Aborted,
    /// 11
    OutOfRange,
    /// 12
    Unimplemented,
    /// 13
    Internal,
    /// 14
    Unavailable,
    /// 15
    DataLoss,
    /// 16
    Unauthenticated,
}

impl GrpcCode {
    const ALL: [GrpcCode; 17] = [
        GrpcCode::Ok,
        GrpcCode::Cancelled,
        GrpcCode::Unknown,
        GrpcCode::InvalidArgument,
        GrpcCode::DeadlineExceeded,
        GrpcCode::NotFound,
        GrpcCode::AlreadyExists,
        GrpcCode::PermissionDenied,
        GrpcCode::ResourceExhausted,
        GrpcCode::FailedPrecondition,
        GrpcCode::Aborted,
        GrpcCode::OutOfRange,
        GrpcCode::Unimplemented,
        GrpcCode::Internal,
        GrpcCode::Unavailable,
        GrpcCode::DataLoss,
        GrpcCode::Unauthenticated,
    ];

    /// The code's number, as `grpc-status` carries it.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The code with this number, if it is one.
    pub fn from_u8(code: u8) -> Option<GrpcCode> {
        Self::ALL.get(usize::from(code)).copied()
    }

    /// The code in a `grpc-status` value; `None` when it is not a number of
    /// one.
    pub fn from_header(value: &HeaderValue) -> Option<GrpcCode> {
        let text = value.to_str().ok()?;
        if text.is_empty() || text.len() > 2 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Self::from_u8(text.parse().ok()?)
    }

    /// The code for a rejection, as the table in the [module docs](self)
    /// gives it.
    pub const fn for_rejection(kind: RejectionKind) -> GrpcCode {
        match kind {
            RejectionKind::MissingKey | RejectionKind::InvalidKey => GrpcCode::InvalidArgument,
            RejectionKind::KeyReused => GrpcCode::FailedPrecondition,
            RejectionKind::AnonymousRequest => GrpcCode::Unauthenticated,
            RejectionKind::RequestInFlight => GrpcCode::Aborted,
            RejectionKind::BodyTooLarge => GrpcCode::ResourceExhausted,
            RejectionKind::BodyUnreadable => GrpcCode::InvalidArgument,
            RejectionKind::ResponseNotRetained => GrpcCode::FailedPrecondition,
            RejectionKind::StoreUnavailable
            | RejectionKind::AuditUnavailable
            | RejectionKind::Overloaded => GrpcCode::Unavailable,
            RejectionKind::OutcomeUnknown => GrpcCode::Unknown,
        }
    }

    fn header_value(self) -> HeaderValue {
        HeaderValue::from(u16::from(self.as_u8()))
    }
}

/// The `grpc-status` header or trailer.
pub const GRPC_STATUS: &str = "grpc-status";

/// The `grpc-message` header or trailer.
pub const GRPC_MESSAGE: &str = "grpc-message";

/// The metadata of a rejection that holds its stable code alone
/// (`request-in-flight`, ...).
pub const IDEMPOTENCY_REJECTION: &str = "idempotency-rejection";

/// Rejections as gRPC statuses: trailers-only responses (HTTP 200,
/// `content-type: application/grpc`, `grpc-status`, `grpc-message`) that
/// every gRPC client reads as a failed call. The codes are those of
/// [`GrpcCode::for_rejection`]; `grpc-message` is the stable code, a colon
/// and the detail (percent-encoded as gRPC requires), and
/// `idempotency-rejection` the code alone, for clients that match on it.
/// `request-in-flight` and `store-unavailable` also carry
/// `grpc-retry-pushback-ms`, the wait a gRPC retry policy honours.
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, grpc::GrpcRejections};
///
/// let layer = IdempotencyLayer::new(MemoryStore::default())
///     .with_rejection_response(GrpcRejections);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcRejections;

impl RejectionResponse for GrpcRejections {
    fn response(&self, rejection: &Rejection) -> Response<Bytes> {
        let kind = rejection.kind();
        let mut response = Response::new(Bytes::new());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(GRPC_STATUS, GrpcCode::for_rejection(kind).header_value());
        let message = percent_encode(&format!("{}: {}", kind.code(), rejection.detail()));
        if let Ok(message) = HeaderValue::from_str(&message) {
            headers.insert(GRPC_MESSAGE, message);
        }
        headers.insert(IDEMPOTENCY_REJECTION, HeaderValue::from_static(kind.code()));
        if let Some(seconds) = rejection.retry_after() {
            headers.insert(
                "grpc-retry-pushback-ms",
                HeaderValue::from(seconds.saturating_mul(1000)),
            );
        }
        response
    }
}

/// `grpc-message` is percent-encoded: every byte outside printable ASCII,
/// and `%` itself.
fn percent_encode(text: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
    out
}

/// The record policy for gRPC: decides from `grpc-status`, in the headers
/// of a trailers-only response or, for a response with messages, in the
/// trailers once the body has ended.
///
/// It releases the key (a retry executes) for the codes it is built with,
/// by default `UNAVAILABLE`, `RESOURCE_EXHAUSTED`, `ABORTED` and
/// `DEADLINE_EXCEEDED`, and records every other status. A response that is
/// not a gRPC answer (an HTTP status other than 200, or neither an
/// `application/grpc` content type nor a `grpc-status`) is decided as HTTP
/// is by default (408, 429 and 503 released). gRPC-Web responses carry
/// their status in the body, which this policy does not read: they are
/// recorded unless their head says otherwise. A gRPC
/// response whose body ends without a `grpc-status` is recorded: the call
/// may have taken effect.
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
/// use tower_idempotency::grpc::{GrpcCode, GrpcRecordPolicy};
///
/// // Also let clients retry calls that ended in INTERNAL.
/// let policy = GrpcRecordPolicy::releasing([
///     GrpcCode::Unavailable,
///     GrpcCode::ResourceExhausted,
///     GrpcCode::Aborted,
///     GrpcCode::DeadlineExceeded,
///     GrpcCode::Internal,
/// ]);
/// let layer = IdempotencyLayer::new(MemoryStore::default()).with_record_policy(policy);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcRecordPolicy {
    /// Bit `n` set: release code `n`.
    released: u32,
}

impl Default for GrpcRecordPolicy {
    fn default() -> Self {
        Self::releasing([
            GrpcCode::Unavailable,
            GrpcCode::ResourceExhausted,
            GrpcCode::Aborted,
            GrpcCode::DeadlineExceeded,
        ])
    }
}

impl GrpcRecordPolicy {
    /// A policy that releases exactly `codes` and records every other
    /// status.
    pub fn releasing(codes: impl IntoIterator<Item = GrpcCode>) -> Self {
        GrpcRecordPolicy {
            released: codes
                .into_iter()
                .fold(0, |bits, code| bits | 1 << code.as_u8()),
        }
    }

    /// Whether a call that ended with `code` is recorded.
    pub fn records(&self, code: GrpcCode) -> bool {
        self.released & (1 << code.as_u8()) == 0
    }

    /// The decision for a `grpc-status` value; an unreadable one is
    /// recorded (the call may have taken effect).
    fn records_status(&self, value: &HeaderValue) -> bool {
        GrpcCode::from_header(value).is_none_or(|code| self.records(code))
    }
}

/// A gRPC response over HTTP/2: status 200 and `application/grpc` (with or
/// without `+proto` and the like). gRPC-Web, which carries its status in
/// the body, is not one.
fn is_grpc(parts: &response::Parts) -> bool {
    parts.status == StatusCode::OK
        && parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.starts_with("application/grpc") && !v.starts_with("application/grpc-web")
            })
}

impl RecordPolicy for GrpcRecordPolicy {
    fn should_record(&self, parts: &response::Parts) -> bool {
        if parts.status != StatusCode::OK {
            // Not a gRPC answer (a proxy's 503, say): HTTP's rule.
            return crate::RecordUnlessRetryable.should_record(parts);
        }
        match parts.headers.get(GRPC_STATUS) {
            // Trailers-only: the status is already here.
            Some(status) => self.records_status(status),
            None if is_grpc(parts) => true,
            None => crate::RecordUnlessRetryable.should_record(parts),
        }
    }

    fn decides_at_end(&self, parts: &response::Parts) -> bool {
        !parts.headers.contains_key(GRPC_STATUS) && is_grpc(parts)
    }

    fn should_record_at_end(&self, _status: StatusCode, trailers: Option<&HeaderMap>) -> bool {
        trailers
            .and_then(|t| t.get(GRPC_STATUS))
            .is_none_or(|status| self.records_status(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&'static str, &'static str)]) -> response::Parts {
        let mut builder = Response::builder();
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn codes_round_trip_and_odd_values_are_none() {
        for code in GrpcCode::ALL {
            assert_eq!(GrpcCode::from_header(&code.header_value()), Some(code));
        }
        for bad in ["", "17", "-1", "x", "1 ", "007"] {
            assert_eq!(
                GrpcCode::from_header(&HeaderValue::from_static(bad)),
                None,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_policy_reads_the_head_then_the_trailers() {
        let policy = GrpcRecordPolicy::default();
        let grpc = head(&[("content-type", "application/grpc")]);
        assert!(policy.should_record(&grpc) && policy.decides_at_end(&grpc));
        let mut trailers = HeaderMap::new();
        for (code, recorded) in [
            ("0", true),
            ("14", false),
            ("8", false),
            ("10", false),
            ("4", false),
            ("13", true),
            ("5", true),
        ] {
            trailers.insert(GRPC_STATUS, HeaderValue::from_static(code));
            assert_eq!(
                policy.should_record_at_end(StatusCode::OK, Some(&trailers)),
                recorded,
                "{code}"
            );
        }
        assert!(
            policy.should_record_at_end(StatusCode::OK, None),
            "no status: recorded"
        );

        let trailers_only = head(&[("content-type", "application/grpc"), ("grpc-status", "14")]);
        assert!(!policy.should_record(&trailers_only));
        assert!(!policy.decides_at_end(&trailers_only));
        let failed = head(&[("content-type", "application/grpc"), ("grpc-status", "3")]);
        assert!(policy.should_record(&failed));

        let mut proxy = head(&[("content-type", "application/grpc")]);
        proxy.status = StatusCode::SERVICE_UNAVAILABLE;
        assert!(!policy.should_record(&proxy) && !policy.decides_at_end(&proxy));
        let web = head(&[("content-type", "application/grpc-web+proto")]);
        assert!(policy.should_record(&web) && !policy.decides_at_end(&web));

        let mut http = head(&[("content-type", "application/json")]);
        assert!(policy.should_record(&http) && !policy.decides_at_end(&http));
        http.status = StatusCode::SERVICE_UNAVAILABLE;
        assert!(!policy.should_record(&http));
    }

    #[test]
    fn rejections_are_trailers_only_with_the_code_in_the_message() {
        for (kind, code) in [
            (RejectionKind::MissingKey, "3"),
            (RejectionKind::KeyReused, "9"),
            (RejectionKind::RequestInFlight, "10"),
            (RejectionKind::StoreUnavailable, "14"),
            (RejectionKind::AuditUnavailable, "14"),
            (RejectionKind::Overloaded, "14"),
            (RejectionKind::BodyTooLarge, "8"),
            (RejectionKind::ResponseNotRetained, "9"),
            (RejectionKind::OutcomeUnknown, "2"),
            (RejectionKind::AnonymousRequest, "16"),
        ] {
            let rejection = Rejection::new(kind, StatusCode::BAD_REQUEST, "100% sure: naïve")
                .with_retry_after(2);
            let response = GrpcRejections.response(&rejection);
            assert_eq!(response.status(), StatusCode::OK);
            assert!(response.body().is_empty());
            let h = response.headers();
            assert_eq!(h["content-type"], "application/grpc");
            assert_eq!(h[GRPC_STATUS], code, "{kind}");
            assert_eq!(h[IDEMPOTENCY_REJECTION], kind.code());
            assert_eq!(
                h[GRPC_MESSAGE],
                format!("{}: 100%25 sure: na%C3%AFve", kind.code()).as_str()
            );
            assert_eq!(h["grpc-retry-pushback-ms"], "2000");
        }
    }
}
