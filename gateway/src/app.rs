//! The gateway's service: its own `/healthz` and `/metrics`, then each
//! request to the idempotency layer or straight to the upstream, as the
//! OpenAPI document says.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header, response};
use http_body::Body;
use http_body_util::BodyExt;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_idempotency::{
    BoxStore, Fingerprint, Idempotency, IdempotencyLayer, RecordPolicy, RecordUnlessRetryable,
    Store,
    audit::AuditLog,
    store::{Claim, RecordKey},
};
use tower_service::Service;

use crate::{
    forward::{BoxError, Forwarder, GatewayBody, Unreached, full, problem},
    limits::{Deadline, Held, Limits},
    openapi::{Api, Matched, Protection},
    route::{canonical, is_override_header},
};

/// The operation a request matched, for the metrics' `route` label.
#[derive(Debug, Clone)]
struct Route(Arc<str>);

/// Records what the upstream answered, except what says "not processed":
/// 408, 429 and 503 from the upstream, and the gateway's own 502 when no
/// response came.
struct UpstreamRecordPolicy;

impl RecordPolicy for UpstreamRecordPolicy {
    fn should_record(&self, parts: &response::Parts) -> bool {
        parts.extensions.get::<Unreached>().is_none() && RecordUnlessRetryable.should_record(parts)
    }
}

/// Configures `layer` as the gateway needs it: every method (the document
/// decides which requests reach it), the upstream's record policy, and the
/// operation's template as the metrics route.
pub(crate) fn configure(layer: IdempotencyLayer<BoxStore>) -> IdempotencyLayer<BoxStore> {
    layer
        .with_methods([
            Method::GET,
            Method::PUT,
            Method::POST,
            Method::DELETE,
            Method::OPTIONS,
            Method::HEAD,
            Method::PATCH,
            Method::TRACE,
        ])
        .with_record_policy(UpstreamRecordPolicy)
        // The same bytes under another coding are another request.
        .with_fingerprint_headers([header::CONTENT_ENCODING])
        .with_metrics_route(|parts: &http::request::Parts| {
            parts
                .extensions
                .get::<Route>()
                .map_or_else(|| "other".to_owned(), |route| route.0.to_string())
        })
}

/// What the gateway refuses, besides what the layer does.
pub(crate) struct Rules {
    /// `--reject-unknown-paths`.
    pub(crate) reject_unknown: bool,
    /// Requests in progress and buffered bodies.
    pub(crate) limits: Limits,
    /// The header that scopes keys, refused when repeated.
    pub(crate) scope_header: http::HeaderName,
    /// `--body-read-timeout-secs`.
    pub(crate) body_timeout: Duration,
}

/// The gateway: route, protect, forward.
#[derive(Clone)]
pub struct Gateway {
    api: Arc<Api>,
    required: Idempotency<Forwarder, BoxStore>,
    optional: Idempotency<Forwarder, BoxStore>,
    forward: Forwarder,
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
    rules: Arc<Rules>,
}

impl Gateway {
    /// A gateway applying `layer` (already configured) where `api` says.
    pub(crate) fn new(
        api: Api,
        layer: &IdempotencyLayer<BoxStore>,
        forward: Forwarder,
        health: Health,
        metrics: Option<PrometheusHandle>,
        rules: Rules,
    ) -> Self {
        use tower_layer::Layer;
        let required = layer.clone().with_required_key(true);
        let optional = layer.clone().with_required_key(false);
        Gateway {
            api: Arc::new(api),
            required: required.layer(forward.clone()),
            optional: optional.layer(forward.clone()),
            forward,
            health: Arc::new(health),
            metrics,
            rules: Arc::new(rules),
        }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, Infallible>> + Send>>;

impl<B> Service<Request<B>> for Gateway
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> BoxFuture {
        self.handle(req)
    }
}

impl Gateway {
    /// Answers `req`: what [`Service::call`] does, from a shared
    /// reference, cloning only the service the request goes to.
    pub fn handle<B>(&self, mut req: Request<B>) -> BoxFuture
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        match req.uri().path() {
            "/healthz" => return self.healthz(req.method()),
            "/metrics" => return self.metrics(req.method()),
            _ => {}
        }
        if let Some(refused) = self.refuse_head(req.headers()) {
            return ready(refused);
        }
        // One reading of the request, matched and forwarded alike.
        let canonical = match canonical(req.method(), req.uri(), req.headers())
            .and_then(|c| c.uri(req.uri()).map(|uri| (c, uri)))
        {
            Ok(read) => read,
            Err(refusal) => {
                return ready(problem(refusal.status(), refusal.code(), &refusal.detail()));
            }
        };
        let (canonical, uri) = canonical;
        // Overrides are read; they, and every other name with `_` (which
        // WSGI, CGI and PHP read as `-`: `X_Real_IP` is `X-Real-IP`), are
        // not forwarded, as nginx does by default.
        let dropped: Vec<http::HeaderName> = req
            .headers()
            .keys()
            .filter(|name| {
                (name.as_str().contains('_') && **name != self.rules.scope_header)
                    || is_override_header(name)
            })
            .cloned()
            .collect();
        for name in &dropped {
            req.headers_mut().remove(name);
        }
        if let Some(uri) = uri {
            *req.uri_mut() = uri;
        }
        *req.method_mut() = canonical.method.clone();
        let matched = self.api.decide(
            &canonical.method,
            &canonical.overrides,
            &canonical.path.segments,
        );
        let (template, protection) = match matched {
            Matched::Operation {
                template,
                protection,
            } => (Some(template), protection),
            Matched::UndescribedMethod {
                template,
                allow,
                default,
            } => {
                if self.rules.reject_unknown {
                    let mut response = problem(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "method-not-described",
                        &format!(
                            "The API describes {template} only for {allow}; the gateway forwards nothing else."
                        ),
                    );
                    if let Ok(allow) = HeaderValue::from_str(&allow) {
                        response.headers_mut().insert(header::ALLOW, allow);
                    }
                    return ready(response);
                }
                // A described path: an unmarked method's default applies.
                (Some(template), default)
            }
            Matched::UnknownPath => {
                if self.rules.reject_unknown {
                    return ready(problem(
                        StatusCode::NOT_FOUND,
                        "path-not-described",
                        "The API's OpenAPI document does not describe this path.",
                    ));
                }
                (None, Protection::Off)
            }
        };
        let buffered = match protection {
            Protection::Required => true,
            Protection::Optional => req
                .headers()
                .contains_key(tower_idempotency::IDEMPOTENCY_KEY),
            Protection::Off => false,
        };
        let held = match self.rules.limits.admit(req.headers(), buffered) {
            Ok(held) => held,
            Err(overloaded) => return ready(overloaded.response()),
        };
        if let Some(template) = template {
            req.extensions_mut().insert(Route(template));
        }
        let idle = self.rules.body_timeout;
        let req = req.map(|body| Deadline::new(body, idle, buffered));
        match protection {
            Protection::Required => holding(self.required.clone().call(req), held),
            Protection::Optional => holding(self.optional.clone().call(req), held),
            Protection::Off => {
                let sent = self.forward.send(req);
                Box::pin(async move {
                    let response = sent.await;
                    drop(held);
                    Ok(response)
                })
            }
        }
    }
}

impl Gateway {
    /// Heads the gateway cannot forward as they are: two `Host` headers, a
    /// transfer coding other than `chunked` (the upstream would get the
    /// coded bytes as plain data), a repeated scope header.
    fn refuse_head(&self, headers: &http::HeaderMap) -> Option<Response<GatewayBody>> {
        if headers.get_all(header::HOST).iter().nth(1).is_some() {
            return Some(problem(
                StatusCode::BAD_REQUEST,
                "host-repeated",
                "The request has more than one Host header.",
            ));
        }
        let codings = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("?").split(','))
            .map(str::trim);
        for coding in codings {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Some(problem(
                    StatusCode::NOT_IMPLEMENTED,
                    "transfer-coding-unsupported",
                    &format!(
                        "The gateway forwards bodies sent plain or chunked, not with the transfer coding {coding:?}; send the body with Content-Encoding instead."
                    ),
                ));
            }
        }
        if headers
            .get_all(&self.rules.scope_header)
            .iter()
            .nth(1)
            .is_some()
        {
            return Some(problem(
                StatusCode::BAD_REQUEST,
                "scope-repeated",
                &format!(
                    "The request has more than one {} header, so the gateway cannot tell who is calling.",
                    self.rules.scope_header
                ),
            ));
        }
        None
    }

    fn healthz(&self, method: &Method) -> BoxFuture {
        if method != Method::GET && method != Method::HEAD {
            return ready(not_allowed("GET, HEAD"));
        }
        let health = self.health.clone();
        Box::pin(async move { Ok(health.check().await) })
    }

    fn metrics(&self, method: &Method) -> BoxFuture {
        if method != Method::GET && method != Method::HEAD {
            return ready(not_allowed("GET, HEAD"));
        }
        let response = match &self.metrics {
            Some(handle) => {
                let mut response = Response::new(full(Bytes::from(handle.render())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            None => problem(
                StatusCode::NOT_FOUND,
                "metrics-off",
                "This process has another metrics recorder; the gateway's is not installed.",
            ),
        };
        ready(response)
    }
}

fn not_allowed(allow: &'static str) -> Response<GatewayBody> {
    let mut response = problem(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        &format!("The gateway's own endpoints answer {allow}."),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

fn ready(response: Response<GatewayBody>) -> BoxFuture {
    Box::pin(std::future::ready(Ok(response)))
}

/// The layer's answer, its body boxed, with `held` kept until its head.
fn holding<F, ResB>(future: F, held: Held) -> BoxFuture
where
    F: Future<Output = Result<Response<ResB>, Infallible>> + Send + 'static,
    ResB: Body<Data = Bytes, Error = BoxError> + Send + 'static,
{
    Box::pin(async move {
        let response = future.await?;
        drop(held);
        Ok(response.map(BodyExt::boxed_unsync))
    })
}

/// What `/healthz` checks: that the store takes a claim and lets it go, and
/// that the audit chain (if any) is being written.
pub(crate) struct Health {
    pub(crate) store: BoxStore,
    pub(crate) store_name: String,
    pub(crate) audit: Option<AuditLog>,
    pub(crate) timeout: Duration,
}

impl Health {
    async fn check(&self) -> Response<GatewayBody> {
        let store = match tokio::time::timeout(self.timeout, self.round_trip()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        };
        let audit = self.audit.as_ref().is_none_or(AuditLog::is_healthy);
        match (store, audit) {
            (Ok(()), true) => {
                let doc = serde_json::json!({
                    "status": "ok",
                    "store": self.store_name,
                    "audit": if self.audit.is_some() { "ok" } else { "off" },
                });
                let mut response = Response::new(full(Bytes::from(doc.to_string())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                response
            }
            (Err(err), _) => problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                &format!("The {} store failed its check: {err}", self.store_name),
            ),
            (Ok(()), false) => problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit-unavailable",
                "The audit chain cannot be written.",
            ),
        }
    }

    /// A claim on a key of its own, released at once: a real write and
    /// delete, on the path every request takes.
    async fn round_trip(&self) -> Result<(), String> {
        let nonce = uuid_like();
        let key = RecordKey::new("idempotency-gateway:health", &nonce);
        let claim = self
            .store
            .claim(
                &key,
                Fingerprint::from_bytes([0; 32]),
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| e.to_string())?;
        match claim {
            Claim::Acquired { token, .. } => self
                .store
                .release(&key, token)
                .await
                .map_err(|e| e.to_string()),
            _ => Err("a fresh key was already claimed".into()),
        }
    }
}

/// A key no other check uses: the time and a process-wide counter.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}-{}-{}",
        std::process::id(),
        now.as_nanos(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
