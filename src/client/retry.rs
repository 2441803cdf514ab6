//! [`RetryLayer`]: retries an HTTP client's requests under their intent key.

use std::{
    error::Error as StdError,
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderName, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::{
    IntentKey, LearntTimeout,
    learnt::{self, Latencies},
    policy::{self, Answer, DefaultPolicy, Reach, RequestPolicy, RetryPolicy, Verdict},
};

type BoxError = Box<dyn StdError + Send + Sync>;

/// What one attempt ended with, as [`RetryLayer::on_attempt`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttemptOutcome {
    /// An answer with this status; `replayed` when it carried
    /// `Idempotent-Replayed: true`.
    Status {
        /// The answer's status.
        status: StatusCode,
        /// The server replayed a recorded response.
        replayed: bool,
    },
    /// No answer within the attempt timeout.
    TimedOut,
    /// The request failed before an answer (connection refused or reset):
    /// the error's text.
    Failed(String),
}

impl fmt::Display for AttemptOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptOutcome::Status { status, replayed } => {
                write!(f, "{}", status.as_u16())?;
                if *replayed {
                    f.write_str(" (replayed)")?;
                }
                Ok(())
            }
            AttemptOutcome::TimedOut => f.write_str("timed out"),
            AttemptOutcome::Failed(err) => write!(f, "failed: {err}"),
        }
    }
}

/// One attempt, as it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptEvent {
    /// 1 for the first attempt.
    pub attempt: u32,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// The time it was given: the attempt timeout (learnt, when
    /// [`RetryLayer::with_learnt_timeout`] is on and the endpoint has
    /// enough samples), or what the deadline left, whichever is shorter.
    pub timeout: Duration,
    /// The wait before the next attempt; `None` when there is none (the
    /// answer was final, or attempts or the deadline ran out).
    pub wait: Option<Duration>,
}

/// What the caller knows once the retries end: the one fact a payment
/// client needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ending {
    /// The server gave its final answer about the request (a success, a
    /// replay of one, or a refusal such as `key-reused`): the response
    /// says what happened.
    Done,
    /// No attempt can have reached the server's handler: every one failed
    /// to connect, or was answered "not processed" (503
    /// `store-unavailable`, 429, 408, ...). Safe to choose differently.
    NothingRan,
    /// An attempt may have reached the handler and no final answer came:
    /// one timed out after the request was sent, a connection broke, the
    /// server answered 500 `outcome-unknown`, or the key was still in
    /// flight at the deadline. Send the same request with the same key
    /// again to learn the outcome.
    OutcomeUnknown,
}

/// What the retries came to, in the final response's extensions (and in
/// [`RetryError`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryReport {
    /// Attempts made, the last included.
    pub attempts: u32,
    /// The final answer was a replay of a recorded response
    /// (`Idempotent-Replayed: true`).
    pub replayed: bool,
    /// The key every attempt carried, if any.
    pub key: Option<String>,
    /// The final answer was still one worth retrying (a 503, a 409 in
    /// flight, ...) when attempts or the deadline ran out.
    pub exhausted: bool,
    /// What is known of the request's outcome.
    pub ending: Ending,
    /// The receipt the final answer carried (`Idempotency-Receipt`, from a
    /// server whose audit log gives them), if it reads as one: keep it, and
    /// check it with [`Receipt::verify`](crate::audit::Receipt::verify)
    /// against the server's audit key. A replay carries a receipt of its
    /// own, for the replay's entry.
    #[cfg(feature = "audit")]
    pub receipt: Option<crate::audit::Receipt>,
}

/// Why a request got no answer.
#[derive(Debug)]
pub struct RetryError {
    kind: RetryErrorKind,
    report: RetryReport,
    source: Option<BoxError>,
}

/// What ended the last attempt, in a [`RetryError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryErrorKind {
    /// The last attempt timed out, and attempts or the deadline ran out.
    TimedOut,
    /// The last attempt failed before an answer (its error is the source),
    /// and attempts or the deadline ran out, or the request could not be
    /// retried (no key and not idempotent).
    Failed,
}

impl RetryError {
    /// What ended the last attempt.
    pub fn kind(&self) -> RetryErrorKind {
        self.kind
    }

    /// The attempts made.
    pub fn report(&self) -> &RetryReport {
        &self.report
    }

    /// Whether any attempt may have reached the server's handler:
    /// [`Ending::NothingRan`] or [`Ending::OutcomeUnknown`].
    pub fn ending(&self) -> Ending {
        self.report.ending
    }

    /// Whether the last attempt's error is reqwest's own.
    #[cfg(feature = "reqwest")]
    pub(crate) fn source_is_reqwest(&self) -> bool {
        self.source
            .as_ref()
            .is_some_and(|source| source.is::<::reqwest::Error>())
    }

    /// The last attempt's own error, taken out.
    #[cfg_attr(not(feature = "reqwest"), allow(dead_code))]
    pub(crate) fn into_source(self) -> Option<BoxError> {
        self.source
    }
}

impl fmt::Display for RetryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            RetryErrorKind::TimedOut => "timed out",
            RetryErrorKind::Failed => "failed",
        };
        write!(
            f,
            "request {what} after {} attempt(s)",
            self.report.attempts
        )?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl StdError for RetryError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

type Observer = Arc<dyn Fn(&AttemptEvent) + Send + Sync>;

/// A budget of retries shared by every request of a client, as gRPC's
/// retry throttling keeps one: it holds up to `max` tokens (it starts
/// full); every attempt that fails or is answered "try again" takes one,
/// every final answer gives back `ratio` of one; a retry is made only while
/// more than half the tokens are left. In an outage a client stops
/// multiplying its load by its attempt count after a few failures, and
/// retries again once answers come back.
#[derive(Debug)]
struct RetryBudget {
    /// Thousandths of a token.
    tokens: std::sync::atomic::AtomicI64,
    max: i64,
    ratio: i64,
}

impl RetryBudget {
    fn new(max_tokens: u32, ratio: f64) -> Self {
        let max = i64::from(max_tokens.max(1)) * 1000;
        RetryBudget {
            tokens: std::sync::atomic::AtomicI64::new(max),
            max,
            ratio: (ratio.clamp(0.0, 1.0) * 1000.0) as i64,
        }
    }

    fn change(&self, by: i64) {
        use std::sync::atomic::Ordering;
        let _ = self
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some((t + by).clamp(0, self.max))
            });
    }

    fn failed(&self) {
        self.change(-1000);
    }

    fn answered(&self) {
        self.change(self.ratio);
    }

    fn may_retry(&self) -> bool {
        self.tokens.load(std::sync::atomic::Ordering::Acquire) * 2 > self.max
    }
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) header: HeaderName,
    /// Shared by every request of the layer; `None` when turned off.
    budget: Option<Arc<RetryBudget>>,
    attempts: u32,
    attempt_timeout: Duration,
    deadline: Duration,
    base: Duration,
    cap: Duration,
    observer: Option<Observer>,
    /// How answers are judged, unless a request brings its own.
    pub(crate) policy: Arc<dyn RetryPolicy>,
    /// Each endpoint's latency, when attempt timeouts are learnt.
    learnt: Option<Arc<Latencies>>,
}

impl Config {
    #[cfg_attr(not(feature = "reqwest"), allow(dead_code))]
    pub(crate) fn learnt_enabled(&self) -> bool {
        self.learnt.is_some()
    }

    /// When an exchange started now must be over, if the deadline is
    /// within the clock's range.
    #[cfg_attr(not(feature = "reqwest"), allow(dead_code))]
    pub(crate) fn deadline_from_now(&self) -> Option<Instant> {
        Instant::now().checked_add(self.deadline)
    }
}

/// Retries an HTTP client's requests safely: under the key of their intent,
/// on the answers that mean "not done, or not known to be done".
///
/// - **The key.** A request carries its key in the `Idempotency-Key` header,
///   or as an [`IntentKey`] in its extensions (the layer writes the header
///   from it). Every attempt sends the same key; the layer never makes one
///   up. A request without a key is retried only if its method is
///   idempotent (`GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`, `DELETE`): a
///   keyless `POST` is sent once.
/// - **When.** Connection errors, attempt timeouts, 408, 425, 429, 502,
///   503, 504, and a 409 that says the key is in flight (the
///   [module docs](super) list which). Never 400 or 422 (a reused key, a
///   bad request) or any other 4xx, and never a 500 (the work may have
///   happened; with a key, the server replays it). The rules are a
///   [`RetryPolicy`], replaceable with [`with_policy`](Self::with_policy).
/// - **How long.** At most [`with_attempts`](Self::with_attempts) attempts
///   (6), each bounded by [`with_attempt_timeout`](Self::with_attempt_timeout)
///   (10 s), all within [`with_deadline`](Self::with_deadline) (60 s).
///   Between attempts: the server's `Retry-After` (seconds or an HTTP
///   date) when it sent one, else exponential backoff with full jitter
///   (`uniform(0, min(10 s, 200 ms × 2^(retry − 1)))`). A wait that would
///   pass the deadline ends the retries instead.
/// - **What happened.** The final response carries a [`RetryReport`] in
///   its extensions (attempts, whether it was a replay, the key); a request
///   that got no answer fails with a [`RetryError`] carrying the same.
///   Each attempt is a `tracing` event, and [`on_attempt`](Self::on_attempt)
///   hears about each.
///
/// The request body must be `Clone` (each attempt sends it again), such as
/// `http_body_util::Full<Bytes>`.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_idempotency::client::{IntentKey, RetryLayer};
///
/// # fn client() -> impl tower::Service<http::Request<String>, Response = http::Response<String>, Error = std::io::Error, Future: Send> + Clone + Send + 'static {
/// #     tower::service_fn(|_req| async { Ok(http::Response::new(String::new())) }) }
/// let client = ServiceBuilder::new()
///     .layer(RetryLayer::new())
///     .service(client()); // hyper-util's client, for example
///
/// let key = IntentKey::derive("book", &serde_json::json!({"caller": "ada", "slot": "09:00"}))?;
/// let mut request = http::Request::post("http://127.0.0.1:3000/appointments")
///     .body(String::from(r#"{"caller":"ada","slot":"09:00"}"#))?;
/// request.extensions_mut().insert(key);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
#[must_use]
pub struct RetryLayer {
    config: Arc<Config>,
}

impl fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("RetryLayer")
            .field("attempts", &c.attempts)
            .field("attempt_timeout", &c.attempt_timeout)
            .field("deadline", &c.deadline)
            .finish_non_exhaustive()
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryLayer {
    /// The defaults above.
    pub fn new() -> Self {
        RetryLayer {
            config: Arc::new(Config {
                header: crate::IDEMPOTENCY_KEY,
                budget: Some(Arc::new(RetryBudget::new(10, 0.1))),
                attempts: 6,
                attempt_timeout: Duration::from_secs(10),
                deadline: Duration::from_secs(60),
                base: Duration::from_millis(200),
                cap: Duration::from_secs(10),
                observer: None,
                policy: Arc::new(DefaultPolicy),
                learnt: None,
            }),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(Arc::make_mut(&mut self.config));
        self
    }

    #[cfg_attr(not(feature = "reqwest"), allow(dead_code))]
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The most attempts, the first included (default 6; at least 1).
    pub fn with_attempts(self, attempts: u32) -> Self {
        self.with(|c| c.attempts = attempts.max(1))
    }

    /// The longest one attempt may take (default 10 s).
    pub fn with_attempt_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.attempt_timeout = timeout)
    }

    /// The longest all attempts and waits may take together (default 60 s).
    pub fn with_deadline(self, deadline: Duration) -> Self {
        self.with(|c| c.deadline = deadline)
    }

    /// The backoff's base and cap (default 200 ms and 10 s).
    pub fn with_backoff(self, base: Duration, cap: Duration) -> Self {
        self.with(|c| {
            c.base = base;
            c.cap = cap;
        })
    }

    /// The retry budget every request of this layer shares (default 10
    /// tokens, 0.1 given back per final answer, as gRPC's retry throttling
    /// example): each attempt that fails or is answered "try again" takes
    /// a token, each final answer gives back `ratio`, and a retry is made
    /// only while more than half the tokens are left. So after about five
    /// failures in a row, every request is sent once until answers come
    /// back (a request stopped this way reports `exhausted`); a fleet of
    /// agents in an outage does not multiply its load by its attempt
    /// count. Clones of the layer share the budget.
    pub fn with_retry_budget(self, max_tokens: u32, ratio: f64) -> Self {
        let budget = Arc::new(RetryBudget::new(max_tokens, ratio));
        self.with(|c| c.budget = Some(budget))
    }

    /// Retries without a shared budget: every request makes up to its
    /// attempts, whatever the others met.
    pub fn without_retry_budget(self) -> Self {
        self.with(|c| c.budget = None)
    }

    /// The header carrying the key (default `Idempotency-Key`).
    pub fn with_header(self, header: HeaderName) -> Self {
        self.with(|c| c.header = header)
    }

    /// Learns each endpoint's attempt timeout from its latency, starting
    /// from [`with_attempt_timeout`](Self::with_attempt_timeout)'s (see
    /// [`LearntTimeout`]). Off by default. Clones of the layer share what
    /// was learnt.
    pub fn with_learnt_timeout(self, rule: LearntTimeout) -> Self {
        let book = Arc::new(Latencies::new(rule));
        self.with(|c| c.learnt = Some(book))
    }

    /// Judges answers by `policy` instead of [`DefaultPolicy`] (a
    /// [`RequestPolicy`] in a request's extensions replaces it for that
    /// request). See [`RetryPolicy`].
    pub fn with_policy(self, policy: impl RetryPolicy) -> Self {
        let policy: Arc<dyn RetryPolicy> = Arc::new(policy);
        self.with(|c| c.policy = policy)
    }

    /// Calls `observer` as each attempt ends (for a progress line, a
    /// metric).
    pub fn on_attempt(self, observer: impl Fn(&AttemptEvent) + Send + Sync + 'static) -> Self {
        let observer: Observer = Arc::new(observer);
        self.with(|c| c.observer = Some(observer))
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service [`RetryLayer`] builds.
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

type Finished<RB> = Result<Response<RetryBody<RB>>, RetryError>;

/// The future [`Retry`] returns.
pub struct RetryFuture<RB> {
    inner: Pin<Box<dyn Future<Output = Finished<RB>> + Send>>,
}

impl<RB> fmt::Debug for RetryFuture<RB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RetryFuture")
    }
}

impl<RB> Future for RetryFuture<RB> {
    type Output = Result<Response<RetryBody<RB>>, RetryError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<S, B, RB> Service<Request<B>> for Retry<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError> + Send,
    B: Clone + Send + 'static,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<RetryBody<RB>>;
    type Error = RetryError;
    type Future = RetryFuture<RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(|err| RetryError {
            kind: RetryErrorKind::Failed,
            report: RetryReport {
                attempts: 0,
                replayed: false,
                key: None,
                exhausted: false,
                ending: Ending::NothingRan,
                #[cfg(feature = "audit")]
                receipt: None,
            },
            source: Some(err.into()),
        })
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let config = self.config.clone();
        // The readiness `poll_ready` reserved goes with the first attempt;
        // the clone left behind serves the next call, and later attempts.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let inner = self.inner.clone();
        if key_of(request.headers(), &config.header).is_none()
            && let Some(key) = request.extensions().get::<IntentKey>()
        {
            let value = key.header_value();
            request.headers_mut().insert(config.header.clone(), value);
        }
        RetryFuture {
            inner: Box::pin(attempts(config, ready, inner, request)),
        }
    }
}

/// Sends `request` until an answer is final, or attempts or the deadline
/// run out.
async fn attempts<S, B, RB>(
    config: Arc<Config>,
    ready: S,
    inner: S,
    request: Request<B>,
) -> Result<Response<RetryBody<RB>>, RetryError>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError> + Send,
    B: Clone + Send + 'static,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let key = key_of(request.headers(), &config.header);
    // A request no retry can fix (a relative URI, a scheme other than
    // HTTP's) is sent once.
    let sendable = request.uri().authority().is_some()
        && matches!(request.uri().scheme_str(), Some("http" | "https"));
    let retryable = sendable && (key.is_some() || policy::is_idempotent(request.method()));
    let judge = request
        .extensions()
        .get::<RequestPolicy>()
        .map_or_else(|| config.policy.clone(), |p| p.0.clone());
    let (method, keyed) = (request.method().clone(), key.is_some());
    let endpoint = config.learnt.as_ref().and_then(|_| {
        let uri = request.uri();
        Some(learnt::endpoint(
            uri.scheme_str()?,
            uri.authority()?.as_str(),
            uri.path(),
        ))
    });
    // The first attempt uses the service `poll_ready` readied; each later
    // one a clone, readied first.
    let mut ready = Some(ready);
    let started = Instant::now();
    let (response, report) = drive(&config, key, endpoint, retryable, move || {
        let first = ready.take();
        let (template, request) = (inner.clone(), request.clone());
        let (judge, method) = (judge.clone(), method.clone());
        async move {
            let mut service = match first {
                Some(service) => service,
                None => {
                    let mut service = template;
                    std::future::poll_fn(|cx| service.poll_ready(cx))
                        .await
                        .map_err(Into::into)?;
                    service
                }
            };
            let response = service.call(request).await.map_err(Into::into)?;
            let replayed = is_replay(&response);
            let receipt = receipt_in(response.headers());
            let (response, body) = read_body(response, &*judge).await?;
            let (verdict, reach) = judge
                .judge(&Answer::new(
                    &method,
                    keyed,
                    response.status(),
                    response.headers(),
                    body.as_deref(),
                ))
                .verdict();
            Ok(Judged {
                status: response.status(),
                replayed,
                receipt,
                verdict,
                reach,
                answer: response,
            })
        }
    })
    .await?;
    // The deadline bounds the whole exchange: a body that stalls ends then.
    let body_deadline = started.checked_add(config.deadline);
    let mut response = match body_deadline {
        Some(at) => response.map(|body| body.until(at)),
        None => response,
    };
    response.extensions_mut().insert(report);
    Ok(response)
}

/// The request's key: its header's value, unless it is empty (or only
/// blanks), which is no key.
pub(crate) fn key_of(headers: &http::HeaderMap, header: &HeaderName) -> Option<String> {
    headers
        .get(header)
        .filter(|v| !v.as_bytes().iter().all(u8::is_ascii_whitespace))
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// One attempt's answer, judged.
pub(crate) struct Judged<R> {
    pub(crate) status: StatusCode,
    pub(crate) replayed: bool,
    /// The receipt the answer carried.
    pub(crate) receipt: HeldReceipt,
    pub(crate) verdict: Verdict,
    /// Whether the attempt may have reached the handler.
    pub(crate) reach: Reach,
    pub(crate) answer: R,
}

/// A receipt an answer carried: kept with the feature `audit`.
#[cfg(feature = "audit")]
pub(crate) type HeldReceipt = Option<crate::audit::Receipt>;
/// A receipt an answer carried: kept with the feature `audit`.
#[cfg(not(feature = "audit"))]
pub(crate) type HeldReceipt = ();

/// The receipt in `headers`, if one reads.
pub(crate) fn receipt_in(headers: &http::HeaderMap) -> HeldReceipt {
    #[cfg(feature = "audit")]
    return crate::audit::Receipt::from_headers(headers).and_then(Result::ok);
    #[cfg(not(feature = "audit"))]
    let _ = headers;
}

/// Whether a failed attempt may have reached the handler: not when the
/// connection was never made (refused, unreachable, no address), else
/// maybe (it broke after the request was written, or while it was).
fn failure_reach(err: &BoxError) -> Reach {
    use std::io::ErrorKind;
    let mut cause: Option<&(dyn StdError + 'static)> = Some(&**err);
    while let Some(err) = cause {
        #[cfg(feature = "reqwest")]
        if err.is::<super::reqwest::AfterRedirect>() {
            return Reach::Maybe;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::AddrNotAvailable
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
            )
        {
            return Reach::Nothing;
        }
        #[cfg(feature = "reqwest")]
        if let Some(e) = err.downcast_ref::<::reqwest::Error>()
            && e.is_connect()
        {
            return Reach::Nothing;
        }
        cause = err.source();
    }
    Reach::Maybe
}

/// The retry loop, for any client: `send` makes one attempt (a fresh one
/// each call) and judges its answer; this bounds it by the attempt timeout,
/// waits between attempts, stops at the attempt limit or the deadline, and
/// reports each attempt.
pub(crate) async fn drive<R, F, Fut>(
    config: &Config,
    key: Option<String>,
    endpoint: Option<String>,
    retryable: bool,
    mut send: F,
) -> Result<(R, RetryReport), RetryError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Judged<R>, BoxError>>,
{
    let attempts_allowed = if retryable { config.attempts } else { 1 };
    let now = Instant::now();
    let deadline = now
        .checked_add(config.deadline)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 60 * 60));
    let mut attempt = 0;
    // Whether any attempt so far may have reached the handler.
    let mut maybe_ran = false;
    loop {
        attempt += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let learnt = match (&config.learnt, &endpoint) {
            (Some(book), Some(endpoint)) => Some((book, endpoint)),
            _ => None,
        };
        let timeout = learnt
            .and_then(|(book, endpoint)| book.timeout(endpoint))
            .unwrap_or(config.attempt_timeout);
        let limit = timeout.min(left);
        let sent = Instant::now();
        let result = tokio::time::timeout(limit, send()).await;
        if let Some((book, endpoint)) = learnt {
            match &result {
                // Took at least its whole timeout (not one the deadline
                // cut short, which says less).
                Err(_) if limit == timeout => book.record(endpoint, timeout),
                Ok(Ok(judged)) if judged.verdict == Verdict::Done => {
                    book.record(endpoint, sent.elapsed());
                }
                _ => {}
            }
        }
        let (outcome, verdict, reach, answer) = match result {
            Err(_) => (
                AttemptOutcome::TimedOut,
                Verdict::Retry(None),
                Reach::Maybe,
                Err(None),
            ),
            Ok(Err(err)) => (
                AttemptOutcome::Failed(err.to_string()),
                Verdict::Retry(None),
                failure_reach(&err),
                Err(Some(err)),
            ),
            Ok(Ok(judged)) => (
                AttemptOutcome::Status {
                    status: judged.status,
                    replayed: judged.replayed,
                },
                judged.verdict,
                judged.reach,
                Ok((judged.answer, judged.replayed, judged.receipt)),
            ),
        };
        // An answer to retry that the handler gave (a custom policy's
        // `Reach::Answered`) ran as much as a `Maybe`.
        maybe_ran |= reach != Reach::Nothing;
        if let Some(budget) = &config.budget {
            match verdict {
                Verdict::Done => budget.answered(),
                Verdict::Retry(_) => budget.failed(),
            }
        }
        let throttled = matches!(verdict, Verdict::Retry(_))
            && config.budget.as_ref().is_some_and(|b| !b.may_retry());
        let wait = match verdict {
            Verdict::Retry(hint) if attempt < attempts_allowed && !throttled => policy::next_wait(
                hint,
                policy::backoff(config.base, config.cap, attempt),
                deadline.saturating_duration_since(Instant::now()),
            ),
            _ => None,
        };
        let event = AttemptEvent {
            attempt,
            outcome,
            timeout: limit,
            wait,
        };
        tracing::debug!(
            attempt,
            outcome = %event.outcome,
            wait_ms = wait.map(|w| w.as_millis() as u64),
            "attempt ended"
        );
        if let Some(observer) = &config.observer {
            observer(&event);
        }
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
            continue;
        }
        // Still worth retrying, but the attempts ran out, or the deadline
        // left no room even for the backoff (a server's longer wait is not
        // the budget running out).
        let exhausted = matches!(verdict, Verdict::Retry(_))
            && retryable
            && (attempt >= attempts_allowed
                || throttled
                || deadline.saturating_duration_since(Instant::now())
                    < policy::backoff_ceiling(config.base, config.cap, attempt)
                        .saturating_add(policy::LEAST_ATTEMPT));
        let final_answer = answer.is_ok() && matches!(verdict, Verdict::Done);
        let ending = match (final_answer, reach) {
            // A final answer that says the outcome is unknown (500
            // `outcome-unknown`), or any other final answer.
            (true, Reach::Maybe) => Ending::OutcomeUnknown,
            (true, _) => Ending::Done,
            (false, _) if maybe_ran => Ending::OutcomeUnknown,
            (false, _) => Ending::NothingRan,
        };
        return match answer {
            Ok((answer, replayed, receipt)) => {
                tracing::info!(
                    attempts = attempt,
                    replayed,
                    exhausted,
                    ?ending,
                    "request answered"
                );
                let report = RetryReport {
                    attempts: attempt,
                    replayed,
                    key,
                    exhausted,
                    ending,
                    #[cfg(feature = "audit")]
                    receipt,
                };
                Ok((answer, report))
            }
            Err(source) => {
                let kind = if source.is_some() {
                    RetryErrorKind::Failed
                } else {
                    RetryErrorKind::TimedOut
                };
                tracing::info!(attempts = attempt, ?ending, "request got no answer");
                Err(RetryError {
                    kind,
                    report: RetryReport {
                        attempts: attempt,
                        replayed: false,
                        key,
                        exhausted,
                        ending,
                        #[cfg(feature = "audit")]
                        receipt: None,
                    },
                    source,
                })
            }
        };
    }
}

fn is_replay<T>(response: &Response<T>) -> bool {
    response
        .headers()
        .get(crate::IDEMPOTENT_REPLAYED)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
}

/// The body of an answer the policy asks to read
/// ([`RetryPolicy::reads_body`]) is read whole, up to its limit, whatever
/// its framing (a length, chunks, or none); every other answer passes
/// untouched. A body that breaks off while it is read fails the attempt,
/// as a connection error does; the attempt timeout bounds the read.
async fn read_body<RB>(
    response: Response<RB>,
    judge: &dyn RetryPolicy,
) -> Result<(Response<RetryBody<RB>>, Option<Bytes>), BoxError>
where
    RB: Body<Data = Bytes>,
    RB::Error: Into<BoxError>,
{
    let known_len = response.body().size_hint().exact().or_else(|| {
        response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
    });
    if !policy::reads_body(judge, response.status(), response.headers(), known_len) {
        return Ok((response.map(RetryBody::inner), None));
    }
    let (parts, body) = response.into_parts();
    let mut body = Box::pin(body);
    let mut buf = BytesMut::new();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        if let Ok(mut data) = frame.map_err(Into::into)?.into_data() {
            let data = data.copy_to_bytes(data.remaining());
            if buf.len() + data.len() > policy::PROBLEM_LIMIT {
                // Too long to judge by: judged without it, and handed back
                // whole, what was read first.
                buf.extend_from_slice(&data);
                return Ok((
                    Response::from_parts(parts, RetryBody::prefixed(buf.freeze(), body)),
                    None,
                ));
            }
            buf.extend_from_slice(&data);
        }
    }
    let bytes = buf.freeze();
    Ok((
        Response::from_parts(parts, RetryBody::buffered(bytes.clone())),
        Some(bytes),
    ))
}

pin_project_lite::pin_project! {
    /// The body of a response [`Retry`] returns: the service's own, or the
    /// bytes of a problem the layer read to learn its code. The service's
    /// own body ends with an error if it has not ended by the deadline
    /// ([`RetryLayer::with_deadline`]), which bounds the whole exchange.
    pub struct RetryBody<B> {
        #[pin]
        kind: Kind<B>,
        // Boxed and set only for the service's own body: a timer is large.
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

/// A response body was still arriving at the deadline.
#[derive(Debug)]
struct BodyPastDeadline;

impl fmt::Display for BodyPastDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the answer's body had not ended by the deadline: the outcome is unknown \
             (send the same request with the same key again to learn it)",
        )
    }
}

impl StdError for BodyPastDeadline {}

/// A response body broke off: what the head said may not be all.
#[derive(Debug)]
struct BodyCut(BoxError);

impl fmt::Display for BodyCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the answer's body broke off ({}): the outcome is unknown \
             (send the same request with the same key again to learn it)",
            self.0
        )
    }
}

impl StdError for BodyCut {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

pin_project_lite::pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Buffered { data: Option<Bytes> },
        // The bytes read to judge it, then the rest.
        Prefixed { prefix: Option<Bytes>, body: Pin<Box<B>> },
    }
}

impl<B> RetryBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        RetryBody {
            kind: Kind::Inner { body },
            deadline: None,
        }
    }

    fn buffered(data: Bytes) -> Self {
        RetryBody {
            kind: Kind::Buffered {
                data: Some(data).filter(|d| !d.is_empty()),
            },
            deadline: None,
        }
    }

    /// The same body, ended with an error at `deadline` if it is the
    /// service's own and still arriving.
    pub(crate) fn prefixed(prefix: Bytes, body: Pin<Box<B>>) -> Self {
        RetryBody {
            kind: Kind::Prefixed {
                prefix: Some(prefix).filter(|p| !p.is_empty()),
                body,
            },
            deadline: None,
        }
    }

    pub(crate) fn until(mut self, deadline: Instant) -> Self {
        if matches!(self.kind, Kind::Inner { .. } | Kind::Prefixed { .. }) {
            self.deadline = Some(Box::pin(tokio::time::sleep_until(deadline)));
        }
        self
    }
}

impl<B> fmt::Debug for RetryBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::Inner { .. } => "RetryBody::Inner",
            Kind::Buffered { .. } => "RetryBody::Buffered",
            Kind::Prefixed { .. } => "RetryBody::Prefixed",
        })
    }
}

impl<B> Body for RetryBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = match this.kind.project() {
            KindProj::Buffered { data } => {
                return Poll::Ready(data.take().map(|d| Ok(Frame::data(d))));
            }
            KindProj::Prefixed { prefix, body } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                body.as_mut().poll_frame(cx)
            }
            KindProj::Inner { body } => body.poll_frame(cx),
        };
        if let Poll::Ready(frame) = polled {
            return Poll::Ready(
                frame.map(|f| f.map_err(|err| Box::new(BodyCut(err.into())) as BoxError)),
            );
        }
        let past = this
            .deadline
            .as_mut()
            .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
        if past {
            *this.deadline = None;
            return Poll::Ready(Some(Err(Box::new(BodyPastDeadline))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Buffered { data } => data.is_none(),
            Kind::Prefixed { prefix, body } => prefix.is_none() && body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Prefixed { prefix, body } => {
                let read = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let rest = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(read));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(read));
                }
                hint
            }
        }
    }
}
