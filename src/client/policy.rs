//! What to retry, and how long to wait: shared by the tower layer and the
//! reqwest middleware.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, StatusCode, header};

/// What an attempt's answer says.
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
pub(crate) enum Reach {
    /// It says nothing ran: a refused connection, a 503, a 429.
    Nothing,
    /// It may have run: a timeout after sending, a broken connection, a
    /// 409 in flight, a 504, a 500 `outcome-unknown`.
    Maybe,
    /// A final answer about the request.
    Answered,
}

/// Problem codes of answers worth retrying that say nothing ran.
const NOTHING_RAN: &[&str] = &[
    "store-unavailable",
    "overloaded",
    "audit-unavailable",
    "upstream-unreachable",
];

/// Whether an answer with `status` and problem `code` may have reached the
/// handler of the request.
pub(crate) fn reach(status: StatusCode, problem: Option<&str>) -> Reach {
    match (status.as_u16(), problem) {
        (_, Some("outcome-unknown")) => Reach::Maybe,
        (_, Some(code)) if NOTHING_RAN.contains(&code) => Reach::Nothing,
        (409, Some(IN_FLIGHT)) => Reach::Maybe,
        // The server says it did not process the request.
        (408 | 425 | 429 | 503, _) => Reach::Nothing,
        // A proxy that may have passed the request on before it failed.
        (502 | 504, _) => Reach::Maybe,
        _ => Reach::Answered,
    }
}

/// The problem code of a 409 that says "the first request with this key is
/// still running".
pub(crate) const IN_FLIGHT: &str = "request-in-flight";

/// The largest problem body read to learn its code.
pub(crate) const PROBLEM_LIMIT: usize = 64 * 1024;

/// Whether an answer is worth reading for its problem code: a 409, 500,
/// 502 or 503 problem document (its media type in any case) whose length
/// is unknown or at most [`PROBLEM_LIMIT`]; it is read within the attempt's
/// time, up to that limit. Any other answer passes untouched.
pub(crate) fn is_problem(status: StatusCode, headers: &HeaderMap, known_len: Option<u64>) -> bool {
    matches!(status.as_u16(), 409 | 500 | 502 | 503)
        && known_len.is_none_or(|len| len <= PROBLEM_LIMIT as u64)
        && headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/problem+json"))
            })
}

/// The `code` member of a problem document, if it has one.
pub(crate) fn problem_code(body: &[u8]) -> Option<String> {
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    doc.get("code")?.as_str().map(str::to_owned)
}

/// The verdict on an answer: 408, 425, 429, 502, 503, 504 and a 409
/// `request-in-flight` are retried; everything else is final (400 and 422
/// above all: a reused key or a bad request does not get better).
pub(crate) fn classify(status: StatusCode, headers: &HeaderMap, problem: Option<&str>) -> Verdict {
    let retry = match status.as_u16() {
        408 | 425 | 429 | 502 | 503 | 504 => true,
        409 => problem == Some(IN_FLIGHT),
        _ => false,
    };
    if retry {
        Verdict::Retry(retry_after(headers, SystemTime::now()))
    } else {
        Verdict::Done
    }
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

    #[test]
    fn statuses_are_classified_as_the_table_says() {
        let none = HeaderMap::new();
        for code in [408, 425, 429, 502, 503, 504] {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(
                classify(status, &none, None),
                Verdict::Retry(None),
                "{code}"
            );
        }
        for code in [
            200, 201, 204, 301, 400, 401, 403, 404, 410, 413, 422, 500, 501,
        ] {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(classify(status, &none, None), Verdict::Done, "{code}");
        }
        assert_eq!(
            classify(StatusCode::CONFLICT, &none, Some(IN_FLIGHT)),
            Verdict::Retry(None)
        );
        assert_eq!(
            classify(StatusCode::CONFLICT, &none, Some("key-reused")),
            Verdict::Done
        );
        assert_eq!(classify(StatusCode::CONFLICT, &none, None), Verdict::Done);
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
