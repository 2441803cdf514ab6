//! [`RetryMiddleware`]: the same retries for `reqwest`, through
//! `reqwest-middleware`.

use http::Extensions;
use reqwest_middleware::{Middleware, Next};

use super::{
    IntentKey, RetryLayer,
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
        if !request.headers().contains_key(&config.header)
            && let Some(key) = extensions.get::<IntentKey>()
        {
            let value = key.header_value();
            request.headers_mut().insert(config.header.clone(), value);
        }
        let key = request
            .headers()
            .get(&config.header)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
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
                let response = next.run(attempt, &mut extensions).await.map_err(
                    |err| -> Box<dyn std::error::Error + Send + Sync> {
                        match err {
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
            // `is_timeout` and the rest keep working); the layer's own
            // (an attempt timeout, a body that cannot be sent again) as a
            // middleware error carrying the report.
            Err(err) if err.source_is_reqwest() => {
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
/// its limit, whatever its framing) and put back together.
async fn judge(
    response: reqwest::Response,
    judge_by: &dyn RetryPolicy,
    method: &http::Method,
    keyed: bool,
) -> Result<Judged<reqwest::Response>, Box<dyn std::error::Error + Send + Sync>> {
    let status = response.status();
    let replayed = response
        .headers()
        .get(crate::IDEMPOTENT_REPLAYED)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
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
            verdict,
            reach,
            answer: response,
        });
    }
    let headers = response.headers().clone();
    let (version, url) = (response.version(), response.url().clone());
    let mut response = response;
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > policy::PROBLEM_LIMIT {
            return Err("an answer body longer than 64 KiB, read to judge it".into());
        }
        body.extend_from_slice(&chunk);
    }
    let body = bytes::Bytes::from(body);
    let (verdict, reach) = judge_by
        .judge(&Answer::new(method, keyed, status, &headers, Some(&body)))
        .verdict();
    let mut rebuilt = http::Response::builder().status(status).version(version);
    if let Some(h) = rebuilt.headers_mut() {
        *h = headers;
    }
    let rebuilt = reqwest::ResponseBuilderExt::url(rebuilt, url)
        .body(body)
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
    Ok(Judged {
        status,
        replayed,
        verdict,
        reach,
        answer: reqwest::Response::from(rebuilt),
    })
}

/// The same response, its body ended with an error if it is still arriving
/// at `deadline` (the deadline bounds the whole exchange, as on the tower
/// path).
fn until(response: reqwest::Response, deadline: tokio::time::Instant) -> reqwest::Response {
    let url = response.url().clone();
    let (parts, body) = http::Response::<reqwest::Body>::from(response).into_parts();
    let body = reqwest::Body::wrap(RetryBody::inner(body).until(deadline));
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
