//! [`RecordPolicy`]: which final responses are recorded, shared by the
//! layer and the gRPC support.

use http::{HeaderMap, StatusCode, response};

/// Decides whether a final response is recorded (and replayed to retries) or
/// its claim released (so a retry executes again).
///
/// The head decides, through [`should_record`](Self::should_record). A
/// policy for a protocol that puts its outcome in the trailers (gRPC, see
/// [`GrpcRecordPolicy`](crate::grpc::GrpcRecordPolicy)) can leave the
/// decision to the end of the body instead: when
/// [`decides_at_end`](Self::decides_at_end) says so for a head that
/// `should_record` accepted, [`should_record_at_end`](Self::should_record_at_end)
/// decides once the body has ended, before its last frame goes out (and
/// before the head, when the whole body is ready at once).
///
/// Implemented for closures `Fn(&http::response::Parts) -> bool`, which
/// decide from the head alone.
pub trait RecordPolicy: Send + Sync + 'static {
    /// Whether to record the response whose head is `parts`; `false`
    /// releases the claim at once.
    fn should_record(&self, parts: &response::Parts) -> bool;

    /// Whether the decision for the response whose head is `parts` waits
    /// for the end of its body (default: never).
    fn decides_at_end(&self, parts: &response::Parts) -> bool {
        let _ = parts;
        false
    }

    /// For a response whose decision waited: whether to record it, given
    /// its status and the trailers its body ended with (`None` when it ended
    /// without). Default: record. A body that failed midway, or was cut
    /// short (past the maximum execution time, or past the response limit
    /// with its client gone), is recorded (status and headers) without
    /// asking, and so is a response whose policy panics here.
    fn should_record_at_end(&self, status: StatusCode, trailers: Option<&HeaderMap>) -> bool {
        let _ = (status, trailers);
        true
    }
}

impl<F> RecordPolicy for F
where
    F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
{
    fn should_record(&self, parts: &response::Parts) -> bool {
        self(parts)
    }
}

/// The default policy: record every response, 5xx included (the work may
/// have happened), except 408, 429 and 503, which say "not processed, try
/// again".
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordUnlessRetryable;

impl RecordPolicy for RecordUnlessRetryable {
    fn should_record(&self, parts: &response::Parts) -> bool {
        !matches!(
            parts.status,
            StatusCode::REQUEST_TIMEOUT
                | StatusCode::TOO_MANY_REQUESTS
                | StatusCode::SERVICE_UNAVAILABLE
        )
    }
}
