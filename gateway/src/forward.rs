//! Forwarding to the upstream: a pooled HTTP/1.1 client, bodies streamed
//! both ways, hop-by-hop headers removed, `X-Forwarded-*` set.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
    uri::{Authority, PathAndQuery, Scheme},
};
use http_body::Body;
use http_body_util::{BodyExt, combinators::UnsyncBoxBody};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tower_idempotency::{IdempotencyContext, audit::RECEIPT_HEADER};
use tower_service::Service;

/// Any error a body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the gateway sends or receives.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// The upstream the gateway forwards to: `http://host:port` and an
/// optional base path every request path is appended to.
#[derive(Debug, Clone)]
pub struct Upstream {
    authority: Authority,
    host: HeaderValue,
    /// Without a trailing slash; empty for none.
    base_path: String,
}

impl Upstream {
    /// Parses `http://HOST:PORT[/BASE]`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "{url:?}: https upstreams are not supported; run the gateway beside the API and forward over http"
                ));
            }
            _ => return Err(format!("{url:?}: the upstream must be an http:// URL")),
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("{url:?}: no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{url:?}: credentials in the URL are not supported"));
        }
        if uri.query().is_some() {
            return Err(format!("{url:?}: the upstream URL cannot have a query"));
        }
        let host = HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
        Ok(Upstream {
            host,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            authority,
        })
    }

    fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        let tail = path_and_query.map_or("/", PathAndQuery::as_str);
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(if self.base_path.is_empty() {
            path_and_query
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"))
        } else {
            format!("{}{tail}", self.base_path)
                .parse()
                .expect("a valid path after a valid base path")
        });
        Uri::from_parts(parts).expect("scheme, authority and path are set")
    }
}

/// Sent to the upstream with a request forwarded again after its key's
/// earlier holder stopped (only with `--take-over`): this may be a second
/// execution. Removed from what clients send.
pub const IDEMPOTENT_TAKE_OVER: HeaderName = HeaderName::from_static("idempotent-take-over");

/// The client's address, put into each request's extensions by the server.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Set on the gateway's 502: no response came from the upstream, and the
/// layer releases the key rather than record it.
#[derive(Debug, Clone, Copy)]
pub struct Unreached;

/// The forwarding service: every request to the upstream, every failure a
/// problem+json response.
#[derive(Clone)]
pub struct Forwarder {
    client: Client<HttpConnector, GatewayBody>,
    upstream: Arc<Upstream>,
    timeout: Duration,
    trusted: Arc<[ipnet::IpNet]>,
    /// The gateway signs receipts: an `Idempotency-Receipt` from anyone else
    /// (a client's request, an upstream's response head or trailers) is
    /// removed, so every receipt a client holds is the gateway's.
    receipts: bool,
}

impl Forwarder {
    /// A forwarder to `upstream`, giving up on a response head after
    /// `timeout` (for requests the idempotency layer holds a key for, the
    /// layer's maximum execution time does, and settles the key) and on a
    /// connection after `connect_timeout`, keeping idle connections for
    /// `idle`.
    pub fn new(
        upstream: Upstream,
        timeout: Duration,
        connect_timeout: Duration,
        idle: Duration,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout.min(timeout)));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(idle)
            .http1_max_headers(MAX_UPSTREAM_HEADERS)
            .build(connector);
        Forwarder {
            client,
            upstream: Arc::new(upstream),
            timeout,
            trusted: Arc::from([]),
            receipts: false,
        }
    }

    /// Removes every `Idempotency-Receipt` the gateway did not sign: on
    /// requests to the upstream, and on its responses, trailers included.
    #[must_use]
    pub fn with_receipts(mut self, receipts: bool) -> Self {
        self.receipts = receipts;
        self
    }

    /// Keeps the forwarding headers of clients in `proxies`.
    #[must_use]
    pub fn with_trusted_proxies(mut self, proxies: &[ipnet::IpNet]) -> Self {
        self.trusted = Arc::from(proxies);
        self
    }
}

impl<B> Service<Request<B>> for Forwarder
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let sent = self.send(req);
        Box::pin(async move { Ok(sent.await) })
    }
}

impl Forwarder {
    /// Sends `req` to the upstream: its response, or a problem+json
    /// response for every failure.
    pub fn send<B>(
        &self,
        req: Request<B>,
    ) -> impl Future<Output = Response<GatewayBody>> + Send + 'static
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // A keyed request's deadline is the layer's: past it the key is
        // settled, never released into a second execution.
        let deadline = if req.extensions().get::<IdempotencyContext>().is_some() {
            None
        } else {
            Some(self.timeout)
        };
        let mut request = outgoing(&self.upstream, &self.trusted, req);
        let receipts = self.receipts;
        if receipts {
            request.headers_mut().remove(RECEIPT_HEADER);
            request = request.map(|body| without_receipt_trailer(body).boxed_unsync());
        }
        let sent = self.client.request(request);
        let timeout = self.timeout;
        async move {
            let started = Instant::now();
            let result = match deadline {
                Some(deadline) => tokio::time::timeout(deadline, sent).await,
                None => Ok(sent.await),
            };
            let seconds = started.elapsed().as_secs_f64();
            match result {
                Ok(Ok(response)) => {
                    upstream_metric("response", seconds);
                    incoming(response, receipts)
                }
                Ok(Err(err)) if err.is_connect() || never_sent(&err) => {
                    upstream_metric("unreachable", seconds);
                    let cause = error_chain(&err);
                    eprintln!("idempotency-gateway: upstream unreachable: {cause}");
                    let mut response = problem(
                        StatusCode::BAD_GATEWAY,
                        "upstream-unreachable",
                        &format!(
                            "No connection to the upstream ({cause}); nothing was sent. The key is released: retry with the same key."
                        ),
                    );
                    response.extensions_mut().insert(Unreached);
                    response
                }
                Ok(Err(err)) if head_too_large(&err) => {
                    // The upstream answered, with a head past hyper's
                    // bounds: it carried the request out, so the key is
                    // not released (this 502 is recorded).
                    upstream_metric("unreadable", seconds);
                    let cause = error_chain(&err);
                    eprintln!("idempotency-gateway: upstream response head unreadable: {cause}");
                    problem(
                        StatusCode::BAD_GATEWAY,
                        "upstream-head-too-large",
                        &format!(
                            "The upstream answered with a response head the gateway does not read ({cause}: more than {MAX_UPSTREAM_HEADERS} headers, or too many bytes); it carried the request out. This key will not run again: check the outcome before retrying with a new key."
                        ),
                    )
                }
                Ok(Err(err)) => {
                    // The connection broke once the request may have been
                    // written: the upstream may have carried it out, so the
                    // key is not released (this 502 is recorded).
                    upstream_metric("broken", seconds);
                    let cause = error_chain(&err);
                    eprintln!("idempotency-gateway: upstream connection broke: {cause}");
                    problem(
                        StatusCode::BAD_GATEWAY,
                        "upstream-connection-lost",
                        &format!(
                            "The connection to the upstream broke before its response ({cause}); the request may have been carried out. This key will not run again: check the outcome before retrying with a new key."
                        ),
                    )
                }
                Err(_) => {
                    upstream_metric("timeout", seconds);
                    problem(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream-timeout",
                        &format!(
                            "The upstream sent no response within {} s.",
                            timeout.as_secs()
                        ),
                    )
                }
            }
        }
    }
}

/// The most headers an upstream response may carry (hyper's default).
const MAX_UPSTREAM_HEADERS: usize = 100;

/// Whether the upstream's response head was past hyper's bounds.
fn head_too_large(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = err.source();
    while let Some(err) = source {
        if err
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse_too_large)
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// Whether hyper gave the request back unsent: the connection closed
/// before it was written (hyper-util already tried again on a fresh one
/// when the closed one was pooled).
fn never_sent(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>() {
            return hyper.is_canceled();
        }
        source = cause.source();
    }
    false
}

fn upstream_metric(outcome: &'static str, seconds: f64) {
    metrics::counter!("gateway_upstream_requests_total", "outcome" => outcome).increment(1);
    metrics::histogram!("gateway_upstream_duration_seconds").record(seconds);
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The request as the upstream gets it.
fn outgoing<B>(
    upstream: &Upstream,
    trusted: &[ipnet::IpNet],
    req: Request<B>,
) -> Request<GatewayBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    remove_hop_by_hop(&mut parts.headers);
    join_cookies(&mut parts.headers);
    parts.headers.remove(IDEMPOTENT_TAKE_OVER);
    if parts
        .extensions
        .get::<IdempotencyContext>()
        .is_some_and(IdempotencyContext::took_over)
    {
        parts
            .headers
            .insert(IDEMPOTENT_TAKE_OVER, HeaderValue::from_static("true"));
    }
    let client = parts.extensions.get::<ClientAddr>().map(|addr| addr.0.ip());
    let from_proxy = client.is_some_and(|ip| trusted.iter().any(|net| net.contains(&ip)));
    // One pass over the names, removals only for what is there: headers
    // some servers route by (IIS's `X-Original-URL`), never forwarded since
    // the gateway matched the request line; and, unless the client is a
    // trusted proxy, what proxies say about the client.
    let dropped: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|name| is_routing(name) || (!from_proxy && is_proxy_set(name)))
        .cloned()
        .collect();
    for name in &dropped {
        parts.headers.remove(name);
    }
    if let Some(ip) = client {
        let mut list: Vec<u8> = Vec::new();
        for earlier in parts.headers.get_all(X_FORWARDED_FOR) {
            list.extend_from_slice(earlier.as_bytes());
            list.extend_from_slice(b", ");
        }
        list.extend_from_slice(ip.to_string().as_bytes());
        let forwarded_for = HeaderValue::from_bytes(&list).ok();
        if let Some(value) = forwarded_for {
            parts.headers.insert(X_FORWARDED_FOR, value);
        }
    }
    if !parts.headers.contains_key(X_FORWARDED_PROTO) {
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if !parts.headers.contains_key(X_FORWARDED_HOST) {
        match original_host {
            Some(host) => parts.headers.insert(X_FORWARDED_HOST, host),
            None => parts.headers.remove(X_FORWARDED_HOST),
        };
    }
    parts.headers.insert(header::HOST, upstream.host.clone());
    parts.uri = upstream.uri(parts.uri.path_and_query());
    parts.version = Version::HTTP_11;
    Request::from_parts(parts, body.map_err(Into::into).boxed_unsync())
}

/// HTTP/2 clients may send each cookie as a field of its own; HTTP/1.1
/// wants one `Cookie` header (RFC 9113, section 8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().count() < 2 {
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for (i, cookie) in headers.get_all(header::COOKIE).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(cookie.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// The upstream's response as the client gets it.
fn incoming(response: Response<hyper::body::Incoming>, receipts: bool) -> Response<GatewayBody> {
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    let body = body.map_err(BoxError::from);
    if !receipts {
        return Response::from_parts(parts, body.boxed_unsync());
    }
    // Not the gateway's: an upstream's receipt would pass for one, on an
    // answer the gateway never audited (a pass-through) or as a trailer.
    parts.headers.remove(RECEIPT_HEADER);
    Response::from_parts(parts, without_receipt_trailer(body).boxed_unsync())
}

/// `body` without an `Idempotency-Receipt` trailer.
fn without_receipt_trailer<B: Body<Data = Bytes>>(
    body: B,
) -> impl Body<Data = Bytes, Error = B::Error> {
    body.map_frame(|frame| match frame.into_trailers() {
        Ok(mut trailers) => {
            trailers.remove(RECEIPT_HEADER);
            http_body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    })
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Whether `name` tells an upstream which path to route instead of the
/// request line's.
fn is_routing(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "x-original-url" | "x-rewrite-url" | "x-original-uri" | "x-forwarded-prefix"
    )
}

/// Whether `name` is one of the headers proxies and CDNs set to tell an
/// upstream who the client is, which scheme, host, port or prefix it used,
/// or which URL to route (IIS's `X-Original-URL`): kept only from
/// `--trusted-proxies`.
fn is_proxy_set(name: &HeaderName) -> bool {
    let name = name.as_str();
    // The whole `X-Forwarded-*` family (`-For`, `-Proto`, `-Protocol`,
    // `-Client-Cert`, ...), and the client address, scheme and certificate
    // headers of common proxies, CDNs and servers.
    name.starts_with("x-forwarded")
        || name.starts_with("x-envoy-")
        || name.starts_with("x-arr-")
        || name.starts_with("x-azure-")
        || matches!(
            name,
            "forwarded"
                | "via"
                | "front-end-https"
                | "x-url-scheme"
                | "x-scheme"
                | "x-host"
                | "x-original-host"
                | "x-http-host-override"
                | "x-original-forwarded-for"
                | "x-real-ip"
                | "true-client-ip"
                | "x-client-ip"
                | "client-ip"
                | "cluster-client-ip"
                | "x-cluster-client-ip"
                | "proxy-client-ip"
                | "wl-proxy-client-ip"
                | "cf-connecting-ip"
                | "fastly-client-ip"
                | "akamai-client-ip"
                | "fly-client-ip"
                | "x-appengine-user-ip"
                | "cloudfront-viewer-address"
                | "x-remote-ip"
                | "x-remote-addr"
                | "remote-addr"
                | "x-originating-ip"
                | "x-ssl-client-cert"
                | "ssl-client-cert"
                | "x-client-cert"
        )
}

/// The headers that describe one connection, not the message (RFC 9110
/// section 7.6.1), and those the `Connection` header names.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    // `Trailer` announces trailers hyper forwards as frames; the header
    // itself stays, since the body still carries them.
}

/// A problem+json response of the gateway's own.
pub fn problem(status: StatusCode, code: &str, detail: &str) -> Response<GatewayBody> {
    let doc = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
        "code": code,
    });
    let mut response = Response::new(full(Bytes::from(doc.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// A body of known bytes.
pub fn full(bytes: Bytes) -> GatewayBody {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_are_checked() {
        let upstream = Upstream::parse("http://127.0.0.1:8080/api/").unwrap();
        let path: PathAndQuery = "/orders?x=1".parse().unwrap();
        assert_eq!(
            upstream.uri(Some(&path)).to_string(),
            "http://127.0.0.1:8080/api/orders?x=1"
        );
        let plain = Upstream::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            plain.uri(Some(&path)).to_string(),
            "http://127.0.0.1:8080/orders?x=1"
        );
        for (bad, expected) in [
            ("https://api.example", "https upstreams are not supported"),
            ("127.0.0.1:8080", "must be an http:// URL"),
            ("http://user:pw@127.0.0.1", "credentials"),
            ("http://127.0.0.1/?a=1", "cannot have a query"),
            ("http://exa mple", "not a URL"),
        ] {
            let err = Upstream::parse(bad).unwrap_err();
            assert!(err.contains(expected), "{bad}: {err}");
        }
    }

    #[test]
    fn cookies_sent_as_separate_fields_are_joined() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut headers);
        let cookies: Vec<_> = headers.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2"]);
    }

    #[test]
    fn hop_by_hop_headers_go_and_so_do_those_connection_names() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-trace-hop"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("x-trace-hop", "1"),
            ("idempotency-key", "k1"),
            ("content-type", "application/json"),
        ] {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        remove_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["idempotency-key", "content-type"]);
    }
}
