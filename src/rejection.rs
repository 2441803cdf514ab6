//! Rejections: the responses the layer gives instead of calling the service.
//!
//! Each is an RFC 9457 `application/problem+json` document with a stable
//! `type` per case. Replace them with
//! [`IdempotencyLayer::with_rejection_response`](crate::IdempotencyLayer::with_rejection_response),
//! for example to answer a gRPC client with a gRPC status.

use std::{borrow::Cow, fmt, time::Duration};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};

use crate::key::KeyError;

/// Which rule a request broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectionKind {
    /// No key, and the layer requires one. 400.
    MissingKey,
    /// The key header is not a valid key. 400.
    InvalidKey,
    /// The key was used before for a different request. 400, or 422 by
    /// option.
    KeyReused,
    /// The request has neither a principal nor a credential to scope its key
    /// by, and the layer's [`Anonymous`](crate::Anonymous) policy is to
    /// reject it. 401.
    AnonymousRequest,
    /// The key's first request is still running. 409, with `Retry-After`.
    RequestInFlight,
    /// The request body is over the configured limit. 413.
    BodyTooLarge,
    /// The request body could not be read to its end (the client went away or
    /// sent a malformed body). 400.
    BodyUnreadable,
    /// The key's request completed, but its response was too large to keep.
    /// 410.
    ResponseNotRetained,
    /// The store failed, timed out, or holds an unreadable record. 503, with
    /// `Retry-After`.
    StoreUnavailable,
    /// The key's request ran past the layer's maximum execution time (or
    /// past a shutdown's drain deadline) and was stopped: it may or may not
    /// have taken effect, and it will not run again under this key. 500. It
    /// is recorded, so every retry gets it too.
    OutcomeUnknown,
    /// The audit chain could not take the request's entry (its queue is
    /// full, or its sink is failing), and the policy is that nothing runs
    /// without one. 503, with `Retry-After`.
    AuditUnavailable,
    /// The layer holds as many buffered request bodies as its bound allows
    /// ([`with_max_buffered_bytes`](crate::IdempotencyLayer::with_max_buffered_bytes)):
    /// nothing ran. 503, with `Retry-After`.
    Overloaded,
}

impl RejectionKind {
    /// The stable short name, also the fragment of the problem `type`:
    /// `missing-key`, `invalid-key`, `key-reused`, `anonymous-request`,
    /// `request-in-flight`,
    /// `body-too-large`, `body-unreadable`, `response-not-retained`,
    /// `store-unavailable`, `outcome-unknown`, `audit-unavailable`,
    /// `overloaded`.
    pub const fn code(self) -> &'static str {
        match self {
            RejectionKind::MissingKey => "missing-key",
            RejectionKind::InvalidKey => "invalid-key",
            RejectionKind::KeyReused => "key-reused",
            RejectionKind::AnonymousRequest => "anonymous-request",
            RejectionKind::RequestInFlight => "request-in-flight",
            RejectionKind::BodyTooLarge => "body-too-large",
            RejectionKind::BodyUnreadable => "body-unreadable",
            RejectionKind::ResponseNotRetained => "response-not-retained",
            RejectionKind::StoreUnavailable => "store-unavailable",
            RejectionKind::OutcomeUnknown => "outcome-unknown",
            RejectionKind::AuditUnavailable => "audit-unavailable",
            RejectionKind::Overloaded => "overloaded",
        }
    }

    /// The problem `title`: the same for every occurrence of the case.
    pub const fn title(self) -> &'static str {
        match self {
            RejectionKind::MissingKey => "Idempotency key required",
            RejectionKind::InvalidKey => "Invalid idempotency key",
            RejectionKind::KeyReused => "Idempotency key reused for a different request",
            RejectionKind::AnonymousRequest => "Caller not identified",
            RejectionKind::RequestInFlight => "Request with this idempotency key is in progress",
            RejectionKind::BodyTooLarge => "Request body too large",
            RejectionKind::BodyUnreadable => "Request body could not be read",
            RejectionKind::ResponseNotRetained => "Original response not retained",
            RejectionKind::StoreUnavailable => "Idempotency store unavailable",
            RejectionKind::OutcomeUnknown => "Outcome of the original request unknown",
            RejectionKind::AuditUnavailable => "Audit log unavailable",
            RejectionKind::Overloaded => "Server overloaded",
        }
    }
}

impl fmt::Display for RejectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Base of every problem `type`; the case's [`RejectionKind::code`] follows.
pub const PROBLEM_TYPE_BASE: &str = "https://docs.rs/tower-idempotency/latest/tower_idempotency/#";

/// One rejected request: what went wrong, with the status and headers the
/// default response uses.
#[derive(Debug, Clone)]
pub struct Rejection {
    kind: RejectionKind,
    status: StatusCode,
    detail: Cow<'static, str>,
    retry_after: Option<u64>,
}

impl Rejection {
    pub(crate) fn new(
        kind: RejectionKind,
        status: StatusCode,
        detail: impl Into<Cow<'static, str>>,
    ) -> Self {
        Rejection {
            kind,
            status,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub(crate) fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }

    /// Which rule was broken.
    pub fn kind(&self) -> RejectionKind {
        self.kind
    }

    /// The status of the default response.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// A sentence a person can act on.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// Seconds the client should wait before retrying, where that applies
    /// (409 and 503).
    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }

    /// The RFC 9457 document: `type`, `title`, `status`, `detail`, and `code`
    /// (the case's short name, for clients that match on it).
    pub fn problem_json(&self) -> Bytes {
        let doc = serde_json::json!({
            "type": format!("{PROBLEM_TYPE_BASE}{}", self.kind.code()),
            "title": self.kind.title(),
            "status": self.status.as_u16(),
            "detail": self.detail,
            "code": self.kind.code(),
        });
        Bytes::from(doc.to_string())
    }

    /// The default response: problem+json, with `Retry-After` where it
    /// applies.
    pub fn to_response(&self) -> Response<Bytes> {
        let mut response = Response::new(self.problem_json());
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.kind,
            self.status.as_u16(),
            self.detail
        )
    }
}

/// Turns a [`Rejection`] into the response sent to the client.
///
/// Implemented for closures `Fn(&Rejection) -> Response<Bytes>`.
pub trait RejectionResponse: Send + Sync + 'static {
    /// The response for `rejection`.
    fn response(&self, rejection: &Rejection) -> Response<Bytes>;
}

impl<F> RejectionResponse for F
where
    F: Fn(&Rejection) -> Response<Bytes> + Send + Sync + 'static,
{
    fn response(&self, rejection: &Rejection) -> Response<Bytes> {
        self(rejection)
    }
}

/// The default: [`Rejection::to_response`], problem+json.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProblemJson;

impl RejectionResponse for ProblemJson {
    fn response(&self, rejection: &Rejection) -> Response<Bytes> {
        rejection.to_response()
    }
}

// The rejections of the request path, each with the detail a client reads.

pub(crate) fn missing_key(header: &HeaderName) -> Rejection {
    Rejection::new(
        RejectionKind::MissingKey,
        StatusCode::BAD_REQUEST,
        format!(
            "This endpoint requires an `{}` header: a unique value (such as a UUID) chosen once per operation and sent again, unchanged, with every retry of it.",
            header
        ),
    )
}

pub(crate) fn invalid_key(header: &HeaderName, err: KeyError) -> Rejection {
    Rejection::new(
        RejectionKind::InvalidKey,
        StatusCode::BAD_REQUEST,
        format!(
            "The `{}` header is invalid: {err}. Send 1 to 255 visible ASCII characters, bare or as a quoted string.",
            header
        ),
    )
}

pub(crate) fn body_too_large(limit: usize) -> Rejection {
    Rejection::new(
        RejectionKind::BodyTooLarge,
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "The request body is larger than the {} bytes this endpoint accepts with an idempotency key.",
            limit
        ),
    )
}

pub(crate) fn overloaded() -> Rejection {
    Rejection::new(
        RejectionKind::Overloaded,
        StatusCode::SERVICE_UNAVAILABLE,
        "The server is holding as many request bodies as it can right now, so this request was not executed. Retry with the same key.",
    )
    .with_retry_after(1)
}

pub(crate) fn body_unreadable() -> Rejection {
    Rejection::new(
        RejectionKind::BodyUnreadable,
        StatusCode::BAD_REQUEST,
        "The request body could not be read to its end. Nothing was executed; send the request again with the same key.",
    )
}

pub(crate) fn anonymous(header: &HeaderName) -> Rejection {
    Rejection::new(
        RejectionKind::AnonymousRequest,
        StatusCode::UNAUTHORIZED,
        format!(
            "A request with an `{}` header must come from an identified caller: authenticate, then send it again with the same key.",
            header
        ),
    )
}

pub(crate) fn key_reused(status: StatusCode) -> Rejection {
    Rejection::new(
        RejectionKind::KeyReused,
        status,
        "This idempotency key was already used for a different request (method, host, path, query, content type or body differ). Use a new key for a new operation, or resend the original request unchanged.",
    )
}

/// 409, with a short `Retry-After` hint: the configured one, but never past
/// the end of the holder's lease (and at least one second, the header's
/// unit).
pub(crate) fn in_flight(retry_after: Duration, lease_remaining: Duration) -> Rejection {
    let wait = retry_after.min(lease_remaining);
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    Rejection::new(
        RejectionKind::RequestInFlight,
        StatusCode::CONFLICT,
        "A request with this idempotency key is still being processed. Retry after the time in Retry-After to get its response.",
    )
    .with_retry_after(seconds)
}

pub(crate) fn not_retained(original: StatusCode) -> Rejection {
    Rejection::new(
        RejectionKind::ResponseNotRetained,
        StatusCode::GONE,
        format!(
            "The request with this idempotency key was already processed and answered with status {}, but its response was too large to keep, so it cannot be replayed. It will not be executed again.",
            original.as_u16()
        ),
    )
}

pub(crate) fn outcome_unknown() -> Rejection {
    Rejection::new(
        RejectionKind::OutcomeUnknown,
        StatusCode::INTERNAL_SERVER_ERROR,
        "The request with this idempotency key ran past the server's time limit and was stopped. It may or may not have taken effect, and it will not be executed again under this key: check the state of what it changes before sending a new request with a new key.",
    )
}

/// A retry found its key's claim lapsed past the maximum execution time,
/// under [`Lapse::Settle`](crate::Lapse::Settle).
pub(crate) fn outcome_unknown_lapsed() -> Rejection {
    Rejection::new(
        RejectionKind::OutcomeUnknown,
        StatusCode::INTERNAL_SERVER_ERROR,
        "The first request with this idempotency key stopped answering before it finished (its server stalled or went away), so it may or may not have taken effect. It will not be executed again under this key: check the state of what it changes before sending a new request with a new key.",
    )
}

/// The audit chain has no room for the request's entry.
pub(crate) fn audit_unavailable() -> Rejection {
    Rejection::new(
        RejectionKind::AuditUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
        "The audit log cannot record this request right now, so it was not executed. Retry with the same key.",
    )
    .with_retry_after(1)
}

/// A detached request's claim landed after a drain's deadline: released,
/// and nothing ran. Nobody reads this answer (the client had gone); it is
/// what the request's span and metrics record.
pub(crate) fn shutting_down() -> Rejection {
    Rejection::new(
        RejectionKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
        "The server was shutting down before this request started, so it was not executed. Retry with the same key.",
    )
    .with_retry_after(1)
}

/// The store's own error goes to the log (with the hashed key), never to the
/// client: it can name hosts, users, tables and driver internals.
pub(crate) fn store_unavailable() -> Rejection {
    Rejection::new(
        RejectionKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
        "Idempotency could not be guaranteed, so the request was not executed. Retry with the same key.",
    )
    .with_retry_after(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_json_has_every_member_and_escapes_detail() {
        let rejection = Rejection::new(
            RejectionKind::RequestInFlight,
            StatusCode::CONFLICT,
            "a \"quoted\" detail",
        )
        .with_retry_after(0);
        let response = rejection.to_response();
        assert_eq!(response.status(), 409);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        assert_eq!(response.headers()["retry-after"], "1");
        let doc: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(doc["status"], 409);
        assert_eq!(doc["code"], "request-in-flight");
        assert_eq!(doc["detail"], "a \"quoted\" detail");
        assert!(
            doc["type"]
                .as_str()
                .unwrap()
                .ends_with("#request-in-flight")
        );
        assert!(!doc["title"].as_str().unwrap().is_empty());
    }
}
