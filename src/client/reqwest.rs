//! [`RetryMiddleware`]: the same retries for `reqwest`, through
//! `reqwest-middleware`.

use http::Extensions;
use reqwest_middleware::{Middleware, Next};

use super::{
    Ending, IntentKey, RetryLayer,
    policy::{self, Answer, RequestPolicy, RetryPolicy},
    retry::{Config, Judged, RetryBody, drive},
};

/// [`RetryLayer`]'s behaviour as a `reqwest-middleware` middleware: the same
/// key rules, the same answers retried, the same timeouts, deadline and
/// backoff, a [`RetryReport`](super::RetryReport) in the final response's
/// extensions.
///
/// The key comes from the request's `Idempotency-Key` header, or from an
/// [`IntentKey`] in the middleware extensions
/// (`RequestBuilder::with_extension`). A request whose body cannot be
/// cloned (a stream) is sent once.
///
/// When no answer came, the error is reqwest's own
/// (`reqwest_middleware::Error::Reqwest`, with `is_connect`, `is_timeout`
/// and the rest) only when no attempt can have reached the handler
/// ([`Ending::NothingRan`]); when one may have, it is a middleware error
/// holding the [`RetryError`](super::RetryError) (its `ending()` says
/// [`Ending::OutcomeUnknown`], its source is the last attempt's error), so
/// a connect error on a retry never hides an earlier attempt that ran. An
/// error met after following a redirect to another URL counts as "may have
/// run"; one after a redirect back to the same URL cannot be told from a
/// first connect error, so for requests that must never be misread give
/// the client `reqwest::redirect::Policy::none()`.
///
/// ```
/// use tower_idempotency::client::{IntentKey, RetryLayer, RetryMiddleware};
///
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(RetryMiddleware::from(RetryLayer::new().with_attempts(4)))
///     .build();
/// let key = IntentKey::derive("book", &serde_json::json!({"caller": "ada", "slot": "09:00"}))?;
/// let request = client
///     .post("http://127.0.0.1:3000/appointments")
///     .with_extension(key)
///     .body(r#"{"caller":"ada","slot":"09:00"}"#);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct RetryMiddleware {
    layer: RetryLayer,
}

impl RetryMiddleware {
    /// The defaults of [`RetryLayer::new`].
    pub fn new() -> Self {
        Self::default()
    }
}

impl From<RetryLayer> for RetryMiddleware {
    fn from(layer: RetryLayer) -> Self {
        RetryMiddleware { layer }
    }
}

#[async_trait::async_trait]
impl Middleware for RetryMiddleware {
    async fn handle(
        &self,
        mut request: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let config: &Config = self.layer.config();
        if super::retry::key_of(request.headers(), &config.header).is_none()
            && let Some(key) = extensions.get::<IntentKey>()
        {
            let value = key.header_value();
            request.headers_mut().insert(config.header.clone(), value);
        }
        let key = super::retry::key_of(request.headers(), &config.header);
        let cloneable = request.try_clone().is_some();
        let retryable = cloneable && (key.is_some() || policy::is_idempotent(request.method()));
        let judge_by = extensions
            .get::<RequestPolicy>()
            .map_or_else(|| config.policy.clone(), |p| p.0.clone());
        let (method, keyed) = (request.method().clone(), key.is_some());
        let endpoint = config.learnt_enabled().then(|| {
            let url = request.url();
            let authority = match (url.host_str(), url.port()) {
                (Some(host), Some(port)) => format!("{host}:{port}"),
                (Some(host), None) => host.to_owned(),
                (None, _) => String::new(),
            };
            super::learnt::endpoint(url.scheme(), &authority, url.path())
        });
        let deadline = config.deadline_from_now();
        let mut first = Some(request);
        let template = first.as_ref().and_then(reqwest::Request::try_clone);
        let answer = drive(config, key, endpoint, retryable, || {
            let attempt = first
                .take()
                .or_else(|| template.as_ref().and_then(reqwest::Request::try_clone));
            let (next, mut extensions) = (next.clone(), extensions.clone());
            let (judge_by, method) = (judge_by.clone(), method.clone());
            async move {
                let Some(attempt) = attempt else {
                    return Err("the request body cannot be sent again".into());
                };
                let url = attempt.url().clone();
                let response = next.run(attempt, &mut extensions).await.map_err(
                    |err| -> Box<dyn std::error::Error + Send + Sync> {
                        match err {
                            // An error on the way to another URL (a
                            // redirect followed) says nothing of whether
                            // this request's handler ran.
                            reqwest_middleware::Error::Reqwest(err)
                                if err.url().is_some_and(|at| *at != url) =>
                            {
                                Box::new(AfterRedirect(err))
                            }
                            // Kept as reqwest's, to be handed back as such.
                            reqwest_middleware::Error::Reqwest(err) => Box::new(err),
                            other => other.into(),
                        }
                    },
                )?;
                judge(response, &*judge_by, &method, keyed).await
            }
        })
        .await;
        match answer {
            Ok((response, report)) => {
                let mut response = match deadline {
                    Some(at) => until(response, at),
                    None => response,
                };
                response.extensions_mut().insert(report);
                Ok(response)
            }
            // reqwest's own error, as reqwest gave it (`is_connect`,
            // `is_timeout` and the rest keep working), when no attempt can
            // have reached the handler; otherwise (an earlier attempt may
            // have run, whatever the last one met) and for the layer's own
            // (an attempt timeout, a body that cannot be sent again), a
            // middleware error carrying the report.
            Err(err) if err.source_is_reqwest() && err.ending() == Ending::NothingRan => {
                let source = err
                    .into_source()
                    .and_then(|source| source.downcast::<reqwest::Error>().ok());
                match source {
                    Some(source) => Err(reqwest_middleware::Error::Reqwest(*source)),
                    None => unreachable!("checked above"),
                }
            }
            Err(err) => Err(reqwest_middleware::Error::middleware(err)),
        }
    }
}

/// Judges a reqwest answer; a body the policy asks to read is read (up to
/// its limit, whatever its framing) and put back together (a longer one is
/// judged without it and handed back whole).
async fn judge(
    response: reqwest::Response,
    judge_by: &dyn RetryPolicy,
    method: &http::Method,
    keyed: bool,
) -> Result<Judged<reqwest::Response>, Box<dyn std::error::Error + Send + Sync>> {
    use http_body_util::BodyExt as _;
    let status = response.status();
    let replayed = response
        .headers()
        .get(crate::IDEMPOTENT_REPLAYED)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    let receipt = super::retry::receipt_in(response.headers());
    if !policy::reads_body(
        judge_by,
        status,
        response.headers(),
        response.content_length(),
    ) {
        let (verdict, reach) = judge_by
            .judge(&Answer::new(
                method,
                keyed,
                status,
                response.headers(),
                None,
            ))
            .verdict();
        return Ok(Judged {
            status,
            replayed,
            receipt,
            verdict,
            reach,
            answer: response,
        });
    }
    let url = response.url().clone();
    let (parts, mut body) = http::Response::<reqwest::Body>::from(response).into_parts();
    let mut read = Vec::new();
    let mut whole = true;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            read.extend_from_slice(&data);
            if read.len() > policy::PROBLEM_LIMIT {
                whole = false;
                break;
            }
        }
    }
    let read = bytes::Bytes::from(read);
    let (verdict, reach) = judge_by
        .judge(&Answer::new(
            method,
            keyed,
            status,
            &parts.headers,
            whole.then_some(&read[..]),
        ))
        .verdict();
    let body = if whole {
        reqwest::Body::from(read)
    } else {
        reqwest::Body::wrap(RetryBody::prefixed(read, Box::pin(body)))
    };
    Ok(Judged {
        status,
        replayed,
        receipt,
        verdict,
        reach,
        answer: rebuild(parts, url, body),
    })
}

/// A reqwest response from its parts, its URL and a body.
fn rebuild(
    parts: http::response::Parts,
    url: reqwest::Url,
    body: reqwest::Body,
) -> reqwest::Response {
    let mut rebuilt = http::Response::builder()
        .status(parts.status)
        .version(parts.version);
    if let Some(headers) = rebuilt.headers_mut() {
        *headers = parts.headers;
    }
    if let Some(extensions) = rebuilt.extensions_mut() {
        extensions.extend(parts.extensions);
    }
    match reqwest::ResponseBuilderExt::url(rebuilt, url).body(body) {
        Ok(rebuilt) => reqwest::Response::from(rebuilt),
        Err(_) => unreachable!("every part came from a valid response"),
    }
}

/// The same response, its body ended with an error if it is still arriving
/// at `deadline` (the deadline bounds the whole exchange, as on the tower
/// path).
fn until(response: reqwest::Response, deadline: tokio::time::Instant) -> reqwest::Response {
    let url = response.url().clone();
    let (parts, body) = http::Response::<reqwest::Body>::from(response).into_parts();
    let body = reqwest::Body::wrap(RetryBody::inner(body).until(deadline));
    rebuild(parts, url, body)
}

/// A reqwest error met on the way to another URL than the request's (a
/// redirect it followed): the request itself was answered.
#[derive(Debug)]
pub(crate) struct AfterRedirect(reqwest::Error);

impl std::fmt::Display for AfterRedirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "after a redirect: {}", self.0)
    }
}

impl std::error::Error for AfterRedirect {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}
