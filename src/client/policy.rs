//! What to retry, and how long to wait: shared by the tower layer and the
//! reqwest middleware.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::{HeaderMap, Method, StatusCode, header};

/// What an attempt's answer says, for the retry loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Final: return it.
    Done,
    /// Not done, or not known to be done: try again, after the server's
    /// `Retry-After` if it sent one.
    Retry(Option<Duration>),
}

/// Whether an attempt may have reached the server's handler, as its answer
/// (or its lack of one) tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reach {
    /// It says nothing ran: a refused connection, a 429, a 503
    /// `store-unavailable`.
    Nothing,
    /// It may have run: a timeout after sending, a broken connection, a
    /// 409 in flight, a 504, a 500 `outcome-unknown`.
    Maybe,
    /// A final answer about the request: it says what happened.
    Answered,
}

/// A [`RetryPolicy`]'s judgement on one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Judgement {
    /// Final: the answer goes back to the caller. `reach` is what it says
    /// of the handler: [`Reach::Maybe`] for an answer that says the outcome
    /// is unknown (a 500 `outcome-unknown`), so the ending is
    /// [`Ending::OutcomeUnknown`](super::Ending::OutcomeUnknown); anything
    /// else ends [`Ending::Done`](super::Ending::Done).
    Final {
        /// What the answer says of the handler.
        reach: Reach,
    },
    /// Not done, or not known to be done: try again, after `after` when
    /// given (never sooner than the backoff), within the attempts and the
    /// deadline.
    Retry {
        /// The server's wait, usually its `Retry-After`
        /// ([`Answer::retry_after`]).
        after: Option<Duration>,
        /// Whether this attempt may have reached the handler:
        /// [`Reach::Nothing`] for "not processed" (a 503, a 429),
        /// [`Reach::Maybe`] for "still running" (a 409 in flight).
        reach: Reach,
    },
}

impl Judgement {
    /// A final answer about the request.
    pub const fn done() -> Self {
        Judgement::Final {
            reach: Reach::Answered,
        }
    }

    pub(crate) fn verdict(self) -> (Verdict, Reach) {
        match self {
            Judgement::Final { reach } => (Verdict::Done, reach),
            Judgement::Retry { after, reach } => (Verdict::Retry(after), reach),
        }
    }
}

/// One attempt's answer, as a [`RetryPolicy`] sees it: the request's method
/// and whether it carried a key, the answer's status and headers, and its
/// body when the policy asked for it ([`RetryPolicy::reads_body`]).
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    method: &'a Method,
    keyed: bool,
    status: StatusCode,
    headers: &'a HeaderMap,
    body: Option<&'a [u8]>,
}

impl<'a> Answer<'a> {
    /// An answer to judge: for a policy's own tests, or one that judges
    /// something it built.
    pub fn new(
        method: &'a Method,
        keyed: bool,
        status: StatusCode,
        headers: &'a HeaderMap,
        body: Option<&'a [u8]>,
    ) -> Self {
        Answer {
            method,
            keyed,
            status,
            headers,
            body,
        }
    }

    /// The request's method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// Whether the request carried an idempotency key.
    pub fn keyed(&self) -> bool {
        self.keyed
    }

    /// The answer's status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The answer's headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The answer's body, when it was read: whole, at most 64 KiB.
    pub fn body(&self) -> Option<&'a [u8]> {
        self.body
    }

    /// The error code of a JSON body: its `code` member (RFC 9457 problem
    /// documents as this crate's server writes them), else the `code` of
    /// its `error` object (the shape many payment APIs use).
    pub fn code(&self) -> Option<String> {
        let doc: serde_json::Value = serde_json::from_slice(self.body?).ok()?;
        match doc.get("code") {
            Some(code) => code.as_str().map(str::to_owned),
            None => doc.get("error")?.get("code")?.as_str().map(str::to_owned),
        }
    }

    /// Whether the body is an RFC 9457 problem document (by its media type,
    /// in any case) that was read.
    pub fn is_problem(&self) -> bool {
        self.body.is_some() && media_type_is(self.headers, |t| t == "application/problem+json")
    }

    /// The server's `Retry-After`, as a wait from now (see the crate's
    /// strict reading: plain digits or an HTTP date).
    pub fn retry_after(&self) -> Option<Duration> {
        retry_after(self.headers, SystemTime::now())
    }
}

/// How a retrying client judges each answer: final or worth another
/// attempt, and what it says about whether the handler ran.
///
/// [`DefaultPolicy`] holds the rules in the [module docs](super); replace
/// it for a whole client with
/// [`RetryLayer::with_policy`](super::RetryLayer::with_policy), or for one
/// request with a [`RequestPolicy`] in its extensions. A closure
/// `Fn(&Answer) -> Judgement` is a policy; it can hand what it does not
/// decide itself to [`DefaultPolicy`]:
///
/// ```
/// use tower_idempotency::client::{Answer, DefaultPolicy, Judgement, Reach, RetryLayer, RetryPolicy};
///
/// // A server that answers "still running" with a 423 and a header.
/// let layer = RetryLayer::new().with_policy(|answer: &Answer<'_>| {
///     if answer.status() == 423 && answer.headers().contains_key("x-still-running") {
///         Judgement::Retry { after: answer.retry_after(), reach: Reach::Maybe }
///     } else {
///         DefaultPolicy.judge(answer)
///     }
/// });
/// ```
///
/// Whatever the policy says, a request that carries no key and whose method
/// is not idempotent is sent once, and the attempts, the deadline and the
/// retry budget bound the rest.
pub trait RetryPolicy: Send + Sync + 'static {
    /// Whether to read an answer's body before judging it (up to 64 KiB,
    /// within the attempt's time; a longer body fails the attempt). The
    /// body read is handed back to the caller whole. By default: a 409
    /// whose media type is JSON (`application/json`, any `+json`), and a
    /// 500, 502 or 503 problem document, the media type in any case.
    fn reads_body(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        DefaultPolicy.reads_body(status, headers)
    }

    /// The judgement on one answer.
    fn judge(&self, answer: &Answer<'_>) -> Judgement;
}

impl<F> RetryPolicy for F
where
    F: Fn(&Answer<'_>) -> Judgement + Send + Sync + 'static,
{
    fn judge(&self, answer: &Answer<'_>) -> Judgement {
        self(answer)
    }
}

/// A [`RetryPolicy`] for one request, in its extensions (the request's own
/// for [`RetryLayer`](super::RetryLayer), the middleware extensions for
/// `RetryMiddleware`): it replaces the client's policy for that request.
#[derive(Clone)]
pub struct RequestPolicy(pub(crate) Arc<dyn RetryPolicy>);

impl RequestPolicy {
    /// `policy`, for the request it is put on.
    pub fn new(policy: impl RetryPolicy) -> Self {
        RequestPolicy(Arc::new(policy))
    }
}

impl fmt::Debug for RequestPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RequestPolicy")
    }
}

/// Problem codes of answers worth retrying that say nothing ran.
const NOTHING_RAN: &[&str] = &[
    "store-unavailable",
    "overloaded",
    "audit-unavailable",
    "upstream-unreachable",
];

/// The problem code of a 409 that says "the first request with this key is
/// still running", as this crate's server writes it.
pub(crate) const IN_FLIGHT: &str = "request-in-flight";

/// Codes other servers give their "still running" 409.
const OTHERS_IN_FLIGHT: &[&str] = &["idempotency_key_in_use"];

/// The largest body read to judge an answer.
pub(crate) const PROBLEM_LIMIT: usize = 64 * 1024;

/// The rules of the [module docs](super), and these for a 409:
///
/// - in flight, retried after its `Retry-After`: a 409 whose code
///   ([`Answer::code`]) is `request-in-flight` (this crate's server) or
///   `idempotency_key_in_use` (Stripe's); and, for a request that carried
///   a key, a 409 problem document without a `code` (the IETF
///   Idempotency-Key draft answers a retry of a request still being
///   processed with a 409 problem, and gives a reused key a 422), or a 409
///   with a `Retry-After`;
/// - final: any other 409 (a reused key as some servers answer it, a
///   version conflict, a 409 to a request without a key).
///
/// Other answers: 408, 425, 429, 502, 503 and 504 are retried. 408, 425
/// and 429 say nothing ran; a 502, 503 or 504 may have reached the handler
/// (a proxy answers so after forwarding) unless its code is
/// `store-unavailable`, `overloaded`, `audit-unavailable` or
/// `upstream-unreachable`, which say nothing ran. Every other answer is
/// final, and a 500 `outcome-unknown` ends as outcome unknown.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultPolicy;

impl RetryPolicy for DefaultPolicy {
    fn reads_body(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        match status.as_u16() {
            409 => media_type_is(headers, |t| {
                t == "application/json" || (t.starts_with("application/") && t.ends_with("+json"))
            }),
            500 | 502 | 503 => media_type_is(headers, |t| t == "application/problem+json"),
            _ => false,
        }
    }

    fn judge(&self, answer: &Answer<'_>) -> Judgement {
        let code = answer.code();
        let code = code.as_deref();
        let retry = |reach| Judgement::Retry {
            after: answer.retry_after(),
            reach,
        };
        // What the code says of the handler, over what the status says.
        let reach = |by_status| match code {
            Some("outcome-unknown") => Reach::Maybe,
            Some(code) if NOTHING_RAN.contains(&code) => Reach::Nothing,
            _ => by_status,
        };
        match answer.status().as_u16() {
            409 if in_flight(answer, code) => retry(Reach::Maybe),
            // The server says it did not process the request.
            408 | 425 | 429 => retry(reach(Reach::Nothing)),
            // A 503 says "not processed" only with a code that says so (a
            // proxy answers 503 after it forwarded the request, when the
            // upstream reset it); a 502 or 504 comes from a proxy that may
            // have passed the request on before it failed.
            502..=504 => retry(reach(Reach::Maybe)),
            _ => Judgement::Final {
                reach: reach(Reach::Answered),
            },
        }
    }
}

/// Whether a 409 says "the first request with this key is still running".
fn in_flight(answer: &Answer<'_>, code: Option<&str>) -> bool {
    match code {
        Some(code) => code == IN_FLIGHT || OTHERS_IN_FLIGHT.contains(&code),
        None => {
            answer.keyed()
                && (answer.is_problem() || answer.headers().contains_key(header::RETRY_AFTER))
        }
    }
}

/// Whether the answer's media type (lower-cased, without parameters)
/// passes `test`.
fn media_type_is(headers: &HeaderMap, test: impl Fn(&str) -> bool) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| test(&t.trim().to_ascii_lowercase()))
}

/// Whether an answer is read before it is judged: `policy` asks for it and
/// its length is unknown or at most [`PROBLEM_LIMIT`].
pub(crate) fn reads_body(
    policy: &dyn RetryPolicy,
    status: StatusCode,
    headers: &HeaderMap,
    known_len: Option<u64>,
) -> bool {
    known_len.is_none_or(|len| len <= PROBLEM_LIMIT as u64) && policy.reads_body(status, headers)
}

/// `Retry-After` as a wait: delay-seconds (plain digits: `+5` is no
/// delay-seconds), or an HTTP date (a date in the past is no wait). A delay
/// too large for the clock is the longest wait, so it ends the retries at
/// the deadline rather than read as absent.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(
            value
                .parse::<u64>()
                .map_or(Duration::MAX, Duration::from_secs),
        );
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Methods RFC 9110 defines as idempotent: safe to retry without a key.
pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Exponential backoff with full jitter: a uniform wait in
/// `[0, min(cap, base * 2^(retry - 1))]` before retry number `retry` (1 for
/// the first retry).
pub(crate) fn backoff(base: Duration, cap: Duration, retry: u32) -> Duration {
    let ceiling = backoff_ceiling(base, cap, retry);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    match nanos {
        0 => Duration::ZERO,
        u64::MAX => Duration::from_nanos(crate::random_u64()),
        _ => Duration::from_nanos(crate::random_u64() % (nanos + 1)),
    }
}

/// The longest backoff before retry number `retry`.
pub(crate) fn backoff_ceiling(base: Duration, cap: Duration, retry: u32) -> Duration {
    base.saturating_mul(
        1u32.checked_shl(retry.saturating_sub(1))
            .unwrap_or(u32::MAX),
    )
    .min(cap)
}

/// The least time an attempt after a wait must have before the deadline.
pub(crate) const LEAST_ATTEMPT: Duration = Duration::from_millis(50);

/// The wait before the next attempt, or `None` when the deadline leaves no
/// time for one: the server's `Retry-After` if given (never less than the
/// backoff, so `Retry-After: 0` does not mean a tight loop), else the
/// backoff.
pub(crate) fn next_wait(
    server_hint: Option<Duration>,
    backoff: Duration,
    remaining: Duration,
) -> Option<Duration> {
    let wait = server_hint.map_or(backoff, |hint| hint.max(backoff));
    (wait.saturating_add(LEAST_ATTEMPT) <= remaining).then_some(wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with_retry_after(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        headers
    }

    fn judge(status: u16, headers: &HeaderMap, body: Option<&str>, keyed: bool) -> Judgement {
        let status = StatusCode::from_u16(status).unwrap();
        let read = DefaultPolicy.reads_body(status, headers);
        let body = body.filter(|_| read).map(str::as_bytes);
        DefaultPolicy.judge(&Answer::new(&Method::POST, keyed, status, headers, body))
    }

    fn typed(media_type: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(media_type).unwrap(),
        );
        headers
    }

    const RETRY_MAYBE: Judgement = Judgement::Retry {
        after: None,
        reach: Reach::Maybe,
    };

    #[test]
    fn statuses_are_classified_as_the_table_says() {
        let none = HeaderMap::new();
        for code in [408, 425, 429] {
            let expected = Judgement::Retry {
                after: None,
                reach: Reach::Nothing,
            };
            assert_eq!(judge(code, &none, None, true), expected, "{code}");
        }
        for code in [502, 503, 504] {
            assert_eq!(judge(code, &none, None, true), RETRY_MAYBE, "{code}");
        }
        assert_eq!(
            judge(
                503,
                &typed("application/problem+json"),
                Some(r#"{"code":"store-unavailable"}"#),
                true
            ),
            Judgement::Retry {
                after: None,
                reach: Reach::Nothing
            },
            "the server's own 503 that says nothing ran"
        );
        for code in [
            200, 201, 204, 301, 400, 401, 403, 404, 409, 410, 413, 422, 500, 501,
        ] {
            assert_eq!(judge(code, &none, None, true), Judgement::done(), "{code}");
        }
        let problem = typed("application/problem+json");
        let unknown = Judgement::Final {
            reach: Reach::Maybe,
        };
        assert_eq!(
            judge(500, &problem, Some(r#"{"code":"outcome-unknown"}"#), true),
            unknown
        );
        assert_eq!(
            judge(
                502,
                &problem,
                Some(r#"{"code":"upstream-unreachable"}"#),
                true
            ),
            Judgement::Retry {
                after: None,
                reach: Reach::Nothing
            },
            "a gateway that says it reached nothing"
        );
    }

    #[test]
    fn every_in_flight_409_is_recognised_and_other_409s_are_final() {
        let ours = r#"{"type":"x","code":"request-in-flight"}"#;
        for media_type in [
            "application/problem+json",
            "Application/Problem+JSON",
            "application/problem+json; charset=utf-8",
            "application/json",
        ] {
            assert_eq!(
                judge(409, &typed(media_type), Some(ours), true),
                RETRY_MAYBE,
                "{media_type}"
            );
        }
        // The IETF draft: a problem without a code, for a keyed request.
        let ietf = r#"{"type":"https://example.com/idempotency","title":"A request is outstanding for this Idempotency-Key"}"#;
        let problem = typed("application/problem+json");
        assert_eq!(judge(409, &problem, Some(ietf), true), RETRY_MAYBE);
        assert_eq!(
            judge(409, &problem, Some(ietf), false),
            Judgement::done(),
            "a PUT's edit conflict is no in-flight answer"
        );
        // Stripe's shape.
        let stripe =
            r#"{"error":{"type":"invalid_request_error","code":"idempotency_key_in_use"}}"#;
        assert_eq!(
            judge(409, &typed("application/json"), Some(stripe), true),
            RETRY_MAYBE
        );
        // A 409 that asks to come back later.
        let later = with_retry_after("2");
        assert_eq!(
            judge(409, &later, None, true),
            Judgement::Retry {
                after: Some(Duration::from_secs(2)),
                reach: Reach::Maybe
            }
        );
        // Final: a code that says something else, a body that is not
        // JSON, a 409 without anything.
        for body in [
            r#"{"code":"key-reused"}"#,
            r#"{"error":{"code":"resource_already_exists"}}"#,
        ] {
            assert_eq!(
                judge(409, &problem, Some(body), true),
                Judgement::done(),
                "{body}"
            );
        }
        assert_eq!(
            judge(409, &typed("text/html"), Some("<h1>Conflict</h1>"), true),
            Judgement::done()
        );
        assert_eq!(judge(409, &HeaderMap::new(), None, true), Judgement::done());
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            retry_after(&with_retry_after("3"), now),
            Some(Duration::from_secs(3))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(
            retry_after(&with_retry_after(&later), now),
            Some(Duration::from_secs(7))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(
            retry_after(&with_retry_after(&earlier), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&with_retry_after("soon"), now), None);
        assert_eq!(
            retry_after(&with_retry_after("+5"), now),
            None,
            "not delay-seconds"
        );
        assert_eq!(retry_after(&with_retry_after("-5"), now), None);
        assert_eq!(
            retry_after(&with_retry_after("99999999999999999999999"), now),
            Some(Duration::MAX),
            "too large for the clock is the longest wait, not none"
        );
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn backoff_is_full_jitter_under_a_growing_cap() {
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(2));
        for retry in 1..12 {
            let ceiling = (base * 2u32.pow(retry - 1)).min(cap);
            for _ in 0..50 {
                assert!(backoff(base, cap, retry) <= ceiling);
            }
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| backoff(base, cap, 5)).collect();
        assert!(spread.len() > 10, "jittered, not fixed");
        assert_eq!(backoff(Duration::ZERO, cap, 3), Duration::ZERO);
        assert!(backoff(base, cap, 200) <= cap, "no overflow");
    }

    #[test]
    fn the_deadline_caps_the_wait() {
        let ms = Duration::from_millis;
        assert_eq!(next_wait(Some(ms(500)), ms(10), ms(1000)), Some(ms(500)));
        assert_eq!(next_wait(None, ms(10), ms(1000)), Some(ms(10)));
        assert_eq!(next_wait(Some(ms(2000)), ms(10), ms(1000)), None);
        assert_eq!(
            next_wait(Some(ms(980)), ms(10), ms(1000)),
            None,
            "no time left to try"
        );
        assert_eq!(next_wait(Some(ms(0)), ms(30), ms(1000)), Some(ms(30)));
        assert!(backoff(Duration::MAX, Duration::MAX, 3) <= Duration::MAX);
    }

    #[test]
    fn only_idempotent_methods_retry_without_a_key() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert!(is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&m), "{m}");
        }
    }
}
