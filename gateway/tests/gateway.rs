//! The gateway against a real upstream on loopback that counts its
//! executions and deduplicates nothing.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use clap::Parser;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use idempotency_gateway::Args;
use tokio::{net::TcpListener, sync::Notify};

const OPENAPI: &str = r#"
openapi: 3.1.0
info: { title: Clinic, version: "1" }
paths:
  /appointments:
    get:
      summary: List appointments
    post:
      summary: Book an appointment
      x-side-effects: transactional
  /appointments/{id}:
    patch:
      summary: Move an appointment
  /flaky:
    post:
      x-idempotency: required
  /large:
    get: {}
    post:
      x-idempotency: required
  /slow:
    post:
      x-idempotency: required
  /echo:
    post: {}
    get: {}
  /crash:
    post:
      x-idempotency: required
  /bighead:
    post:
      x-idempotency: required
  /metered:
    post:
      x-idempotency: required
"#;

type BoxBody = UnsyncBoxBody<Bytes, Infallible>;

/// The upstream: counts executions per path, answers as told.
struct Upstream {
    executions: Mutex<HashMap<String, usize>>,
    /// Notified when a request to `/slow` has arrived.
    started: Notify,
    /// `/slow` answers once this has permits: released once, it lets
    /// every later request through too, so a second execution is counted
    /// rather than left hanging.
    release: tokio::sync::Semaphore,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            executions: Mutex::default(),
            started: Notify::new(),
            release: tokio::sync::Semaphore::new(0),
        }
    }
}

impl Upstream {
    fn release(&self) {
        self.release
            .add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
    }

    /// Waits (bounded) until a request to `/slow` has reached the upstream.
    async fn started(&self) {
        tokio::time::timeout(Duration::from_secs(30), self.started.notified())
            .await
            .expect("no request reached the upstream");
    }

    fn count(&self, path: &str) -> usize {
        self.executions
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// `None`: drop the connection without an answer, as a crashing
    /// upstream would.
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Option<Response<BoxBody>> {
        let path = req.uri().path().to_owned();
        let n = {
            let mut counts = self.executions.lock().unwrap();
            let n = counts.entry(path.clone()).or_default();
            *n += 1;
            *n
        };
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if path == "/crash" {
            return None;
        }
        // An upstream that plants a receipt of its own, in its head and as
        // a trailer.
        if let Some(planted) = parts.headers.get("x-plant-receipt").cloned() {
            let mut trailers = HeaderMap::new();
            trailers.insert("idempotency-receipt", planted.clone());
            let body = Full::new(Bytes::from("planted"))
                .with_trailers(async move { Some(Ok(trailers)) })
                .boxed_unsync();
            let mut response = Response::new(body);
            *response.status_mut() = StatusCode::CREATED;
            response
                .headers_mut()
                .insert("idempotency-receipt", planted);
            return Some(response);
        }
        Some(match (parts.method.clone(), path.as_str()) {
            (_, "/bighead") => {
                let mut response = reply(StatusCode::CREATED, "booked".into());
                for i in 0..120 {
                    response.headers_mut().insert(
                        HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                        HeaderValue::from_static("v"),
                    );
                }
                response
            }
            (_, "/flaky") if n == 1 => reply(StatusCode::SERVICE_UNAVAILABLE, "busy".into()),
            (_, "/slow") => {
                self.started.notify_one();
                let _ = self.release.acquire().await;
                reply(StatusCode::CREATED, format!("slow {n}"))
            }
            (Method::GET, "/large") | (Method::POST, "/large") => {
                Response::new(BodyExt::boxed_unsync(Chunks(0)))
            }
            (_, "/echo") => {
                let headers: HashMap<String, String> = parts
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
                    .collect();
                reply(
                    StatusCode::OK,
                    serde_json::to_string(&serde_json::json!({
                        "uri": parts.uri.to_string(),
                        "headers": headers,
                    }))
                    .unwrap(),
                )
            }
            _ => reply(
                if parts.method == Method::POST {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                format!(
                    "{} {path} #{n}: {}",
                    parts.method,
                    String::from_utf8_lossy(&body)
                ),
            ),
        })
    }
}

const LARGE_CHUNKS: usize = 64;
const CHUNK: usize = 64 * 1024;

fn chunk(i: usize) -> Bytes {
    Bytes::from(vec![(i % 251) as u8; CHUNK])
}

/// A body of `LARGE_CHUNKS` frames, produced one at a time.
struct Chunks(usize);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.0 == LARGE_CHUNKS {
            return std::task::Poll::Ready(None);
        }
        self.0 += 1;
        std::task::Poll::Ready(Some(Ok(Frame::data(chunk(self.0 - 1)))))
    }
}

fn reply(status: StatusCode, body: String) -> Response<BoxBody> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *response.status_mut() = status;
    response
}

/// Serves `upstream` on `listener` for the rest of the test.
fn serve_upstream(listener: TcpListener, upstream: Arc<Upstream>) {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let upstream = upstream.clone();
                    async move { upstream.handle(req).await.ok_or("the upstream crashed") }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

async fn start_upstream() -> (SocketAddr, Arc<Upstream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = Arc::new(Upstream::default());
    serve_upstream(listener, upstream.clone());
    (addr, upstream)
}

/// A document of its own for each gateway: tests run in parallel.
fn openapi_file() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("gateway-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("api-{}.yaml", NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, OPENAPI).unwrap();
    path
}

/// A running gateway; stops (and drains) when dropped.
struct Gateway {
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_gateway(upstream: SocketAddr, extra: &[&str]) -> Gateway {
    Gateway::start_with_upstream(&format!("http://{upstream}"), extra).await
}

impl Gateway {
    /// A gateway in front of the upstream at `url`, with `extra` flags
    /// (a later `--openapi` wins over the test document).
    async fn start_with_upstream(url: &str, extra: &[&str]) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let openapi = openapi_file();
        let mut argv = vec![
            "idempotency-gateway".to_owned(),
            "--upstream".to_owned(),
            url.to_owned(),
            "--listen".to_owned(),
            addr.to_string(),
            "--openapi".to_owned(),
            openapi.display().to_string(),
            "--scope-secret".to_owned(),
            "test-secret".to_owned(),
        ];
        argv.extend(extra.iter().map(|s| (*s).to_owned()));
        let args = Args::try_parse_from(argv).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(err) = idempotency_gateway::serve(args, listener, shutdown).await {
                panic!("gateway failed: {err}");
            }
        });
        Gateway { addr, _stop: stop }
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn code(&self) -> String {
        let doc: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        doc["code"].as_str().unwrap_or_default().to_owned()
    }

    fn replayed(&self) -> bool {
        self.headers.contains_key("idempotent-replayed")
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(
    gateway: SocketAddr,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Reply {
    send_with(&client(), gateway, method, path, key, body, &[]).await
}

async fn send_with(
    client: &Client<HttpConnector, Full<Bytes>>,
    gateway: SocketAddr,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{gateway}{path}"))
        .header("content-type", "application/json");
    if !headers.iter().any(|(name, _)| *name == "authorization") {
        req = req.header("authorization", "Bearer alice");
    }
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let response = client
        .request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

#[tokio::test]
async fn a_transactional_operation_without_a_key_is_rejected_before_the_upstream() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &[]).await;
    let reply = send(gateway.addr, Method::POST, "/appointments", None, "{}").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.code(), "missing-key");
    assert_eq!(
        reply.headers["content-type"],
        "application/problem+json",
        "{}",
        reply.text()
    );
    assert_eq!(upstream.count("/appointments"), 0);
}

#[tokio::test]
async fn retries_replay_the_first_response_and_a_changed_body_is_rejected() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &[]).await;
    let body = r#"{"patient":"p-1","slot":"09:00"}"#;
    let first = send(
        gateway.addr,
        Method::POST,
        "/appointments",
        Some("k-1"),
        body,
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    assert!(!first.replayed());
    for _ in 0..3 {
        let retry = send(
            gateway.addr,
            Method::POST,
            "/appointments",
            Some("k-1"),
            body,
        )
        .await;
        assert_eq!(retry.status, StatusCode::CREATED);
        assert!(retry.replayed());
        assert_eq!(retry.body, first.body);
    }
    assert_eq!(upstream.count("/appointments"), 1);

    let changed = r#"{"patient":"p-1","slot":"10:00"}"#;
    let reused = send(
        gateway.addr,
        Method::POST,
        "/appointments",
        Some("k-1"),
        changed,
    )
    .await;
    assert_eq!(reused.status, StatusCode::BAD_REQUEST);
    assert_eq!(reused.code(), "key-reused");
    assert_eq!(upstream.count("/appointments"), 1);

    // Another caller's identical key is another intent.
    let bob = send_with(
        &client(),
        gateway.addr,
        Method::POST,
        "/appointments",
        Some("k-1"),
        body,
        &[("authorization", "Bearer bob")],
    )
    .await;
    assert_eq!(bob.status, StatusCode::CREATED);
    assert!(!bob.replayed());
    assert_eq!(upstream.count("/appointments"), 2);
}

#[tokio::test]
async fn thirty_two_concurrent_duplicates_execute_once() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &["--wait-secs", "30"]).await;
    let client = client();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let client = client.clone();
        let addr = gateway.addr;
        tasks.push(tokio::spawn(async move {
            send_with(&client, addr, Method::POST, "/slow", Some("dup"), "{}", &[]).await
        }));
    }
    // Every duplicate is in by the time the first reaches the upstream or
    // soon after; the upstream answers once it has been reached.
    upstream.started().await;
    upstream.release();
    let mut bodies = Vec::new();
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        bodies.push(reply.body);
    }
    assert_eq!(upstream.count("/slow"), 1);
    assert!(bodies.iter().all(|b| *b == bodies[0]));
}

#[tokio::test]
async fn a_client_that_disconnects_mid_request_and_retries_executes_once() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &["--wait-secs", "30"]).await;
    let addr = gateway.addr;
    let first =
        tokio::spawn(
            async move { send(addr, Method::POST, "/slow", Some("gone"), r#"{"n":1}"#).await },
        );
    upstream.started().await;
    // The client gives up while the upstream is working: its connection
    // closes with the request in flight.
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    let retry =
        tokio::spawn(
            async move { send(addr, Method::POST, "/slow", Some("gone"), r#"{"n":1}"#).await },
        );
    upstream.release();
    let retry = retry.await.unwrap();
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.text());
    assert_eq!(retry.text(), "slow 1");
    assert_eq!(upstream.count("/slow"), 1);
}

#[tokio::test]
async fn operations_that_are_not_transactional_pass_through() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &[]).await;
    for _ in 0..2 {
        let reply = send(gateway.addr, Method::GET, "/appointments", Some("g-1"), "").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(!reply.replayed());
    }
    assert_eq!(upstream.count("/appointments"), 2);
    // A path the document does not describe is forwarded as it is.
    for _ in 0..2 {
        let reply = send(
            gateway.addr,
            Method::POST,
            "/undocumented",
            Some("u-1"),
            "{}",
        )
        .await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
    }
    assert_eq!(upstream.count("/undocumented"), 2);
    // An unmarked PATCH on a template is protected once keyed.
    for _ in 0..2 {
        let reply = send(
            gateway.addr,
            Method::PATCH,
            "/appointments/7",
            Some("m-1"),
            "{}",
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(upstream.count("/appointments/7"), 1);
    let unkeyed = send(gateway.addr, Method::PATCH, "/appointments/7", None, "{}").await;
    assert_eq!(unkeyed.status, StatusCode::OK);
    assert_eq!(upstream.count("/appointments/7"), 2);
}

#[tokio::test]
async fn unknown_paths_can_be_rejected_instead() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &["--reject-unknown-paths"]).await;
    let reply = send(
        gateway.addr,
        Method::POST,
        "/undocumented",
        Some("u-1"),
        "{}",
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.code(), "path-not-described");
    let reply = send(gateway.addr, Method::DELETE, "/appointments", None, "").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.headers["allow"], "GET, POST");
    assert_eq!(
        upstream.count("/undocumented") + upstream.count("/appointments"),
        0
    );
}

#[tokio::test]
async fn an_upstream_503_releases_the_key_and_a_retry_executes() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &[]).await;
    let first = send(gateway.addr, Method::POST, "/flaky", Some("f-1"), "{}").await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    let second = send(gateway.addr, Method::POST, "/flaky", Some("f-1"), "{}").await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert!(!second.replayed());
    let third = send(gateway.addr, Method::POST, "/flaky", Some("f-1"), "{}").await;
    assert_eq!(third.status, StatusCode::CREATED);
    assert!(third.replayed());
    assert_eq!(upstream.count("/flaky"), 2);
}

#[tokio::test]
async fn an_upstream_that_is_down_gives_502_and_records_nothing() {
    // A port nobody listens on, until the upstream comes up on it.
    let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = probe.local_addr().unwrap();
    drop(probe);
    let gateway = start_gateway(upstream_addr, &[]).await;
    let body = r#"{"patient":"p-2"}"#;
    let down = send(
        gateway.addr,
        Method::POST,
        "/appointments",
        Some("d-1"),
        body,
    )
    .await;
    assert_eq!(down.status, StatusCode::BAD_GATEWAY, "{}", down.text());
    assert_eq!(down.code(), "upstream-unreachable");
    assert_eq!(down.headers["content-type"], "application/problem+json");

    let listener = TcpListener::bind(upstream_addr).await.unwrap();
    let upstream = Arc::new(Upstream::default());
    serve_upstream(listener, upstream.clone());
    let up = send(
        gateway.addr,
        Method::POST,
        "/appointments",
        Some("d-1"),
        body,
    )
    .await;
    assert_eq!(up.status, StatusCode::CREATED, "{}", up.text());
    assert!(!up.replayed(), "the 502 was not recorded");
    assert_eq!(upstream.count("/appointments"), 1);
}

#[tokio::test]
async fn a_connection_broken_after_the_request_was_sent_never_runs_it_again() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &[]).await;
    let first = send(gateway.addr, Method::POST, "/crash", Some("c-1"), "{}").await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY, "{}", first.text());
    assert_eq!(first.code(), "upstream-connection-lost");
    let retry = send(gateway.addr, Method::POST, "/crash", Some("c-1"), "{}").await;
    assert_eq!(retry.status, StatusCode::BAD_GATEWAY);
    assert!(retry.replayed());
    assert_eq!(upstream.count("/crash"), 1);
}

/// An upstream that answered with more headers than the gateway reads
/// carried the request out: the key is recorded with a 502 that says so,
/// and the write is never sent again.
#[tokio::test]
async fn an_answer_with_a_head_too_large_is_recorded_and_never_sent_again() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &[]).await;
    let first = send(gateway.addr, Method::POST, "/bighead", Some("h-1"), "{}").await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY, "{}", first.text());
    assert_eq!(first.code(), "upstream-head-too-large", "{}", first.text());
    let retry = send(gateway.addr, Method::POST, "/bighead", Some("h-1"), "{}").await;
    assert!(retry.replayed());
    assert_eq!(upstream.count("/bighead"), 1);
}

#[tokio::test]
async fn an_upstream_past_its_timeout_settles_the_key_and_never_runs_it_again() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &["--upstream-timeout-secs", "1"]).await;
    // The upstream never answers in time: it answers only when released.
    let first = send(gateway.addr, Method::POST, "/slow", Some("t-1"), "{}").await;
    assert_eq!(
        first.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        first.text()
    );
    assert_eq!(first.code(), "outcome-unknown");
    let retry = send(gateway.addr, Method::POST, "/slow", Some("t-1"), "{}").await;
    assert_eq!(retry.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(retry.code(), "outcome-unknown");
    assert_eq!(upstream.count("/slow"), 1);
    upstream.release();
}

#[tokio::test]
async fn a_large_streamed_response_passes_through_intact() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &[]).await;
    let expected: Vec<u8> = (0..LARGE_CHUNKS).flat_map(|i| chunk(i).to_vec()).collect();
    let plain = send(gateway.addr, Method::GET, "/large", None, "").await;
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(plain.body.len(), expected.len());
    assert!(plain.body == expected);
    // Keyed, and larger than the record limit: streamed in full, its record
    // keeps the status only, and a retry is told so rather than re-run.
    let keyed = send(gateway.addr, Method::POST, "/large", Some("l-1"), "{}").await;
    assert_eq!(keyed.status, StatusCode::OK);
    assert!(keyed.body == expected);
    let retry = send(gateway.addr, Method::POST, "/large", Some("l-1"), "{}").await;
    assert_eq!(retry.status, StatusCode::GONE);
    assert_eq!(retry.code(), "response-not-retained");
    assert_eq!(upstream.count("/large"), 2);
}

#[tokio::test]
async fn forwarding_sets_forwarded_headers_and_drops_hop_by_hop_ones() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &[]).await;
    let reply = send_with(
        &client(),
        gateway.addr,
        Method::POST,
        "/echo?page=2",
        Some("e-1"),
        "{}",
        &[
            ("connection", "x-hop"),
            ("x-hop", "secret"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-app", "kept"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let seen: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let headers = &seen["headers"];
    assert_eq!(seen["uri"], "/echo?page=2");
    assert_eq!(headers["idempotency-key"], "e-1");
    assert_eq!(headers["x-app"], "kept");
    // From a client that is not a trusted proxy, its own list is dropped.
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], gateway.addr.to_string());
    assert_eq!(headers["host"], upstream_addr.to_string());
    assert!(headers.get("x-hop").is_none(), "{headers}");
}

#[tokio::test]
async fn healthz_checks_the_store_and_metrics_count_decisions() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &[]).await;
    let health = send(gateway.addr, Method::GET, "/healthz", None, "").await;
    assert_eq!(health.status, StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_slice(&health.body).unwrap();
    assert_eq!(doc["status"], "ok");
    assert_eq!(doc["store"], "memory");
    let posted = send(gateway.addr, Method::POST, "/healthz", None, "").await;
    assert_eq!(posted.status, StatusCode::METHOD_NOT_ALLOWED);

    // A route no other test uses: the recorder is the process's.
    for _ in 0..2 {
        send(gateway.addr, Method::POST, "/metered", Some("m-1"), "{}").await;
    }
    let metrics = send(gateway.addr, Method::GET, "/metrics", None, "").await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = metrics.text();
    let replayed = text
        .lines()
        .find(|l| {
            l.starts_with("idempotency_requests_total")
                && l.contains("outcome=\"replayed\"")
                && l.contains("route=\"/metered\"")
        })
        .unwrap_or_else(|| panic!("no replay counted:\n{text}"));
    assert!(replayed.ends_with(" 1"), "{replayed}");
    assert!(text.contains("gateway_upstream_requests_total"), "{text}");
}

#[tokio::test]
async fn two_gateways_sharing_redis_act_as_one() {
    let Ok(redis) = std::env::var("REDIS_URL") else {
        eprintln!("skipped: set REDIS_URL (redis://127.0.0.1:6379) to run");
        return;
    };
    let (upstream_addr, upstream) = start_upstream().await;
    let a = start_gateway(upstream_addr, &["--store", &redis, "--wait-secs", "30"]).await;
    let b = start_gateway(upstream_addr, &["--store", &redis, "--wait-secs", "30"]).await;
    let run = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    // Behind one load balancer: the same public host at both.
    let host = [("host", "clinic.example")];
    let client = client();
    let key = format!("shared-{run}");
    let first = send_with(
        &client,
        a.addr,
        Method::POST,
        "/appointments",
        Some(&key),
        "{}",
        &host,
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    let retry = send_with(
        &client,
        b.addr,
        Method::POST,
        "/appointments",
        Some(&key),
        "{}",
        &host,
    )
    .await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(upstream.count("/appointments"), 1);

    // Sixteen duplicates split across both gateways: one execution.
    let key = format!("race-{run}");
    let mut tasks = Vec::new();
    for i in 0..16 {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        let (client, key) = (client.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            send_with(
                &client,
                addr,
                Method::POST,
                "/slow",
                Some(&key),
                "{}",
                &host,
            )
            .await
        }));
    }
    upstream.started().await;
    upstream.release();
    let mut bodies = Vec::new();
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        bodies.push(reply.body);
    }
    assert_eq!(upstream.count("/slow"), 1);
    assert!(bodies.iter().all(|b| *b == bodies[0]));
    let health = send(b.addr, Method::GET, "/healthz", None, "").await;
    assert_eq!(health.status, StatusCode::OK, "{}", health.text());
}

#[tokio::test]
async fn the_binary_prints_its_address_and_drains_on_sigterm() {
    let (upstream_addr, upstream) = start_upstream().await;
    let openapi = openapi_file();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_idempotency-gateway"))
        .args(["--listen", "127.0.0.1:0", "--openapi"])
        .arg(&openapi)
        .env("GATEWAY_UPSTREAM", format!("http://{upstream_addr}"))
        .env("GATEWAY_SCOPE_SECRET", "test-secret")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap();
    let addr: SocketAddr = first
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("first line: {first}"))
        .parse()
        .unwrap();
    let reply = send(addr, Method::POST, "/appointments", Some("bin-1"), "{}").await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(upstream.count("/appointments"), 1);

    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut rest = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        rest.push(line);
    }
    let exit = child.wait().await.unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(rest.iter().any(|l| l.starts_with("drained:")), "{rest:?}");
}

#[tokio::test]
async fn bad_input_is_named_and_exits_2() {
    let dir = openapi_file().parent().unwrap().to_owned();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "openapi: 3.1.0\npaths:\n  /a:\n    post: { x-idempotency: always }\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_idempotency-gateway"))
            .args(args)
            .output()
            .unwrap()
    };
    let openapi = bad.display().to_string();
    let out = run(&[
        "--upstream",
        "http://127.0.0.1:9",
        "--listen",
        "127.0.0.1:0",
        "--openapi",
        &openapi,
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("POST /a: x-idempotency is \"always\""),
        "{stderr}"
    );

    let good = openapi_file().display().to_string();
    let out = run(&[
        "--upstream",
        "https://api.example",
        "--listen",
        "127.0.0.1:0",
        "--openapi",
        &good,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("https upstreams are not supported"));

    let out = run(&[
        "--upstream",
        "http://127.0.0.1:9",
        "--openapi",
        &good,
        "--store",
        "mysql://x",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--store must be"));

    // clap's own usage errors.
    let out = run(&[
        "--upstream",
        "http://127.0.0.1:9",
        "--openapi",
        &good,
        "--ttl-secs",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let help = run(&["--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    for var in [
        "GATEWAY_UPSTREAM",
        "GATEWAY_LISTEN",
        "GATEWAY_OPENAPI",
        "GATEWAY_STORE",
        "GATEWAY_AUDIT",
        "GATEWAY_TTL_SECS",
        "GATEWAY_LEASE_SECS",
        "GATEWAY_UPSTREAM_TIMEOUT_SECS",
        "GATEWAY_SCOPE_HEADER",
    ] {
        assert!(help.contains(var), "{var} missing from --help");
    }
}

/// What an upstream routing the way common frameworks do executed: the
/// method after overrides and upper-casing, the path decoded before
/// splitting (WSGI), compared case-insensitively (Express), without `;`
/// parameters (Tomcat) or a format suffix (Rails), with dot segments
/// resolved: the operations `POST /appointments` and
/// `DELETE /appointments/{id}`, and whether a key came with them.
#[derive(Default)]
struct FrameworkUpstream {
    seen_paths: Mutex<Vec<String>>,
    executed: Mutex<Vec<(String, bool)>>,
}

impl FrameworkUpstream {
    fn route(method: &str, path: &str, headers: &HeaderMap) -> Option<String> {
        let mut method = method.to_ascii_uppercase();
        for name in [
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
        ] {
            if let Some(value) = headers.get(name) {
                method = value.to_str().unwrap_or("").trim().to_ascii_uppercase();
            }
        }
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        for pair in query.split('&') {
            if let Some(value) = pair.strip_prefix("_method=") {
                method = value.to_ascii_uppercase();
            }
        }
        let decoded = percent_encoding::percent_decode_str(path)
            .decode_utf8_lossy()
            .replace('\\', "/");
        let mut segments: Vec<String> = Vec::new();
        for segment in decoded.split('/') {
            let segment = segment.split(';').next().unwrap_or("").to_lowercase();
            match segment.as_str() {
                "" | "." => {}
                ".." => {
                    segments.pop();
                }
                _ => segments.push(segment),
            }
        }
        if let Some(last) = segments.last_mut()
            && let Some(dot) = last.rfind('.')
            && dot > 0
        {
            last.truncate(dot);
        }
        if segments.first().map(String::as_str) == Some("v2") {
            segments.remove(0);
        }
        match (method.as_str(), segments.as_slice()) {
            ("POST", [a]) if a == "appointments" => Some("POST /appointments".into()),
            ("DELETE", [a, _]) if a == "appointments" => Some("DELETE /appointments/{id}".into()),
            _ => None,
        }
    }

    fn executed(&self) -> Vec<(String, bool)> {
        self.executed.lock().unwrap().clone()
    }
}

async fn start_framework_upstream() -> (SocketAddr, Arc<FrameworkUpstream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = Arc::new(FrameworkUpstream::default());
    let shared = upstream.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let upstream = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let upstream = upstream.clone();
                    async move {
                        let target = req.uri().to_string();
                        upstream.seen_paths.lock().unwrap().push(target.clone());
                        let route =
                            FrameworkUpstream::route(req.method().as_str(), &target, req.headers());
                        let keyed = req.headers().contains_key("idempotency-key");
                        if let Some(route) = route {
                            upstream.executed.lock().unwrap().push((route, keyed));
                        }
                        Ok::<_, Infallible>(reply(StatusCode::CREATED, "done".into()))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, upstream)
}

/// Sends `head` (request line and headers, without the blank line) over a
/// connection of its own, exactly as written; the answer's status and body.
async fn raw_request(addr: SocketAddr, head: &str) -> (u16, String) {
    let request = format!("{head}\r\nHost: api.test\r\nConnection: close\r\n\r\n");
    let (status, answer) = raw_bytes(addr, request.as_bytes()).await;
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// Reads what `stream` still sends until the gateway closes it, waiting
/// at most `seconds`: a connection the gateway must close.
async fn closed_by_the_gateway(
    mut stream: tokio::net::TcpStream,
    seconds: u64,
    why: &str,
) -> String {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(seconds), stream.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|_| panic!("{why}"))
        .ok();
    String::from_utf8_lossy(&rest).into_owned()
}

const SPELLINGS: &[(&str, &str)] = &[
    ("post /appointments", ""),
    ("Post /appointments", ""),
    ("delete /appointments/42", ""),
    ("POST /appointments%2F42", ""),
    ("POST /Appointments", ""),
    ("POST /APPOINTMENTS/", ""),
    ("POST /appointments;jsessionid=1", ""),
    ("POST /appointments.json", ""),
    ("POST /./appointments;v=1", ""),
    ("POST /appointments/42", "X-HTTP-Method-Override: DELETE"),
    ("POST /appointments/42", "X-HTTP-Method: delete"),
    ("POST /appointments/42", "X-Method-Override: DELETE"),
    ("POST /appointments/42?_method=DELETE", ""),
    ("POST /appoint%6Dents", ""),
    ("POST /%61ppointments/", ""),
    ("POST /appointments%5C42", ""),
    ("POST //appointments", ""),
    ("DELETE /Appointments/42;a=b", ""),
    ("DELETE /appointments/42.xml", ""),
    ("POST /x/../appointments", ""),
    ("POST /%2e%2e/appointments", ""),
    ("POST /appointments/42", "X_HTTP_Method_Override: DELETE"),
    ("POST /appointments/42", "X_Method_Override: delete"),
    ("POST /appointments/..;/appointments", ""),
    ("POST /x/..;/appointments", ""),
    ("POST /;/appointments", ""),
    ("POST /;x/appointments", ""),
    ("POST /appointments/;x", ""),
    ("POST /appointments/.;x", ""),
    ("POST /appointments;x/;y", ""),
    ("DELETE /appointments/1/..;/2", ""),
    ("DELETE /appointments/;x/1", ""),
    ("POST /appointments.", ""),
    ("POST /appointments%3bx", ""),
    ("POST /%2561ppointments", ""),
];

#[tokio::test]
async fn no_spelling_of_a_required_operation_reaches_the_upstream_without_a_key() {
    let (upstream_addr, upstream) = start_framework_upstream().await;
    let openapi = r#"
openapi: 3.1.0
paths:
  /appointments:
    post: { x-side-effects: transactional }
  /appointments/{id}:
    delete: { x-idempotency: required }
"#;
    let path = openapi_file();
    std::fs::write(&path, openapi).unwrap();
    let gateway = start_gateway(upstream_addr, &["--openapi", path.to_str().unwrap()]).await;
    let mut refused = Vec::new();
    for (line, header) in SPELLINGS {
        let head = if header.is_empty() {
            format!("{line} HTTP/1.1\r\nAuthorization: Bearer alice")
        } else {
            format!("{line} HTTP/1.1\r\nAuthorization: Bearer alice\r\n{header}")
        };
        let (status, body) = raw_request(gateway.addr, &head).await;
        assert_eq!(status, 400, "{line} {header}: {body}");
        assert!(
            body.contains("missing-key") || body.contains("path-ambiguous"),
            "{line} {header}: {body}"
        );
        if body.contains("path-ambiguous") {
            refused.push(*line);
        }
    }
    assert_eq!(upstream.executed(), [], "executed without a key");

    // With a key, each spelling runs once, protected.
    for (i, (line, header)) in SPELLINGS.iter().enumerate() {
        let head = format!(
            "{line} HTTP/1.1\r\nAuthorization: Bearer alice\r\nIdempotency-Key: s-{i}\r\n{header}"
        );
        for _ in 0..2 {
            raw_request(gateway.addr, head.trim_end()).await;
        }
    }
    let executed = upstream.executed();
    assert!(executed.iter().all(|(_, keyed)| *keyed), "{executed:?}");
    // Refused spellings never run; overrides are removed, so the upstream
    // runs the POST that was matched, which routes nowhere; the rest run
    // once for two sends.
    let runs = SPELLINGS
        .iter()
        .filter(|(line, header)| {
            let overridden = !header.is_empty() || line.contains("_method");
            !refused.contains(line) && !overridden
        })
        .count();
    assert_eq!(executed.len(), runs, "{executed:?}");
}

#[tokio::test]
async fn no_path_climbs_out_of_the_upstream_base_path() {
    let (upstream_addr, upstream) = start_framework_upstream().await;
    let gateway = Gateway::start_with_upstream(&format!("http://{upstream_addr}/v2"), &[]).await;
    for path in [
        "/../v2/appointments",
        "/%2e%2e/admin",
        "/.%2E/.%2e/admin",
        "/a/../../admin",
        "/..",
        "/..;/admin",
        "/x/..;/..;/admin",
    ] {
        let (status, body) = raw_request(
            gateway.addr,
            &format!("GET {path} HTTP/1.1\r\nAuthorization: Bearer alice"),
        )
        .await;
        assert!(status == 201 || status == 400, "{path}: {status} {body}");
    }
    let seen = upstream.seen_paths.lock().unwrap().clone();
    assert!(!seen.is_empty());
    for path in &seen {
        assert!(path.starts_with("/v2/"), "reached {path}");
        assert!(!path.contains(".."), "reached {path}");
    }
    assert!(seen.contains(&"/v2/v2/appointments".to_owned()), "{seen:?}");
    assert!(seen.contains(&"/v2/admin".to_owned()), "{seen:?}");
}

/// Sends `signal` (`STOP`, `CONT`, `KILL`, ...) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// The gateway binary on a port of its own, with `args`; its address once
/// it is listening.
async fn spawn_gateway_binary(
    upstream: SocketAddr,
    args: &[&str],
) -> (tokio::process::Child, SocketAddr) {
    let openapi = openapi_file();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_idempotency-gateway"))
        .args(["--listen", "127.0.0.1:0", "--openapi"])
        .arg(&openapi)
        .args(args)
        .env("GATEWAY_UPSTREAM", format!("http://{upstream}"))
        .env("GATEWAY_SCOPE_SECRET", "test-secret")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap();
    let addr: SocketAddr = first
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("first line: {first}"))
        .parse()
        .unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

/// Redis's clock, in milliseconds.
fn redis_now_ms(url: &str) -> u64 {
    let out = std::process::Command::new("redis-cli")
        .args(["-u", url, "TIME"])
        .output()
        .expect("redis-cli is on the PATH");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let secs: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap();
    let micros: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap();
    secs * 1000 + micros / 1000
}

/// Waits until `ms` milliseconds have passed on Redis's clock, which
/// decides leases.
async fn wait_on_redis_clock(url: &str, ms: u64) {
    let start = redis_now_ms(url);
    while redis_now_ms(url) < start + ms {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /slow` with `key`, as one public host: two gateways behind one
/// load balancer.
async fn post_slow(gateway: SocketAddr, key: &str) -> Reply {
    let host = [("host", "clinic.example")];
    send_with(
        &client(),
        gateway,
        Method::POST,
        "/slow",
        Some(key),
        "{}",
        &host,
    )
    .await
}

/// Retries `key` at `gateway` until it is no longer in flight (bounded).
async fn settled_answer(gateway: SocketAddr, key: &str) -> Reply {
    for _ in 0..200 {
        let reply = post_slow(gateway, key).await;
        if reply.status != StatusCode::CONFLICT && reply.status != StatusCode::SERVICE_UNAVAILABLE {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{key} stayed in flight");
}

fn unique(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[tokio::test]
async fn a_gateway_stopped_past_its_lease_is_never_forwarded_twice() {
    let Ok(redis) = std::env::var("REDIS_URL") else {
        eprintln!("skipped: set REDIS_URL (redis://127.0.0.1:6379) to run");
        return;
    };
    let (upstream_addr, upstream) = start_upstream().await;
    let flags = ["--store", redis.as_str(), "--lease-secs", "1"];
    let (holder, a) = spawn_gateway_binary(upstream_addr, &flags).await;
    let b = start_gateway(upstream_addr, &flags).await;
    let key = unique("stopped");
    let first = tokio::spawn({
        let key = key.clone();
        async move { post_slow(a, &key).await }
    });
    upstream.started().await;
    let pid = holder.id().unwrap();
    signal(pid, "STOP");
    // Three leases pass on the store's clock with the holder stopped.
    wait_on_redis_clock(&redis, 3000).await;
    upstream.release();
    let retry = post_slow(b.addr, &key).await;
    assert_eq!(retry.status, StatusCode::CONFLICT, "{}", retry.text());
    assert_eq!(upstream.count("/slow"), 1, "forwarded a second time");
    signal(pid, "CONT");
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    let answer = settled_answer(b.addr, &key).await;
    assert!(answer.replayed(), "{}", answer.text());
    assert_eq!(answer.body, first.body);
    assert_eq!(upstream.count("/slow"), 1);
}

#[tokio::test]
async fn a_store_paused_past_the_lease_never_runs_a_write_twice() {
    if std::env::var("REDIS_URL").is_err() {
        eprintln!("skipped: set REDIS_URL (and have redis-server on the PATH) to run");
        return;
    }
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut server = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server is on the PATH");
    let url = format!("redis://127.0.0.1:{port}");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (upstream_addr, upstream) = start_upstream().await;
    let flags = ["--store", url.as_str(), "--lease-secs", "1"];
    let a = start_gateway(upstream_addr, &flags).await;
    let b = start_gateway(upstream_addr, &flags).await;
    let key = unique("paused");
    let first = tokio::spawn({
        let key = key.clone();
        async move { post_slow(a.addr, &key).await }
    });
    upstream.started().await;
    let pid = server.id().unwrap();
    signal(pid, "STOP");
    // Past the lease with the store away: the holder cannot renew, and a
    // retry's claim waits in Redis's queue.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let retry = post_slow(b.addr, &key).await;
    assert_eq!(
        retry.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        retry.text()
    );
    signal(pid, "CONT");
    upstream.release();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    let answer = settled_answer(b.addr, &key).await;
    assert!(answer.replayed(), "{}", answer.text());
    assert_eq!(answer.body, first.body);
    assert_eq!(upstream.count("/slow"), 1);
    let _ = server.kill().await;
}

/// An upstream that answers each request and closes the connection at once
/// without saying so (no `Connection: close`), as a server whose
/// keep-alive timeout just ran out does: the keys it received.
async fn start_closing_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keys = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let keys = keys.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                let header = |name: &str| {
                    head.lines()
                        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                        .map(str::to_owned)
                };
                let length: usize = header("content-length")
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; length];
                if stream.read_exact(&mut body).await.is_err() {
                    return;
                }
                let key = header("idempotency-key").unwrap_or_default();
                keys.lock().unwrap().push(key.clone());
                let answer = format!(
                    "HTTP/1.1 201 Created\r\ncontent-length: {}\r\n\r\n{key}",
                    key.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
/// A pooled connection the upstream closes right after each answer: a
/// request hyper gives back unsent goes out again on a fresh connection;
/// one written into the closing connection cannot be told from one the
/// upstream read and crashed on, so it is recorded as
/// `upstream-connection-lost` (the README's known gap) and, whatever
/// happened, no key reaches the upstream twice.
async fn a_pooled_connection_the_upstream_closed_never_sends_a_key_twice() {
    let (upstream_addr, seen) = start_closing_upstream().await;
    let gateway = start_gateway(upstream_addr, &[]).await;
    let client = client();
    let mut lost = Vec::new();
    for i in 0..200 {
        let key = format!("pool-{i}");
        let reply = send_with(
            &client,
            gateway.addr,
            Method::POST,
            "/appointments",
            Some(&key),
            "{}",
            &[],
        )
        .await;
        if reply.status != StatusCode::CREATED {
            lost.push((key, reply.status, reply.code()));
        }
    }
    let seen = seen.lock().unwrap().clone();
    for (key, status, code) in &lost {
        assert_eq!(
            (*status, code.as_str()),
            (StatusCode::BAD_GATEWAY, "upstream-connection-lost"),
            "{key}"
        );
        // Recorded: a retry is answered the same, never sent again.
        let again = send_with(
            &client,
            gateway.addr,
            Method::POST,
            "/appointments",
            Some(key),
            "{}",
            &[],
        )
        .await;
        assert_eq!(
            again.status,
            StatusCode::BAD_GATEWAY,
            "{key} was sent again"
        );
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "a key reached the upstream twice");
}

#[tokio::test]
async fn half_sent_heads_are_closed_and_never_keep_others_out() {
    use tokio::io::AsyncWriteExt;
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &["--header-read-timeout-secs", "1"]).await;
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
        stream
            .write_all(b"POST /appointments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: s")
            .await
            .unwrap();
        slow.push(stream);
    }
    let reply = send(gateway.addr, Method::GET, "/appointments", None, "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    for stream in slow {
        // Closed (hyper may answer 408 first), never forwarded.
        closed_by_the_gateway(stream, 30, "a half-sent head was kept open").await;
    }
    assert_eq!(upstream.count("/appointments"), 1);
}

#[tokio::test]
async fn connections_requests_and_buffered_bodies_are_bounded_and_answered() {
    use tokio::io::AsyncWriteExt;
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(
        upstream_addr,
        &[
            "--max-buffered-bytes",
            "4096",
            "--request-body-limit",
            "4096",
        ],
    )
    .await;
    // A keyed body held half-sent reserves its length.
    let mut held = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    held.write_all(
        b"POST /appointments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\nIdempotency-Key: big\r\nContent-Length: 4096\r\n\r\n{",
    )
    .await
    .unwrap();
    let client = client();
    let mut refused = None;
    for _ in 0..100 {
        let reply = send_with(
            &client,
            gateway.addr,
            Method::POST,
            "/appointments",
            Some("b-2"),
            "{}",
            &[],
        )
        .await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            refused = Some(reply);
            break;
        }
        // The held body may not have been admitted yet.
        assert_eq!(reply.status, StatusCode::CREATED);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = refused.expect("a keyed body past the bound was accepted");
    assert_eq!(refused.code(), "overloaded");
    assert_eq!(refused.headers["retry-after"], "1");
    // Unkeyed reads are not held to the body bound.
    let read = send_with(
        &client,
        gateway.addr,
        Method::GET,
        "/appointments",
        None,
        "",
        &[],
    )
    .await;
    assert_eq!(read.status, StatusCode::OK);
    drop(held);

    // Two requests in progress: a third is answered 503, not forwarded.
    let gateway = start_gateway(upstream_addr, &["--max-requests", "2"]).await;
    let slow: Vec<_> = (0..2)
        .map(|i| {
            let client = client.clone();
            let addr = gateway.addr;
            tokio::spawn(async move {
                send_with(
                    &client,
                    addr,
                    Method::POST,
                    "/slow",
                    Some(&format!("slow-{i}")),
                    "{}",
                    &[],
                )
                .await
            })
        })
        .collect();
    upstream.started().await;
    let mut third = None;
    for _ in 0..100 {
        let reply = send_with(&client, gateway.addr, Method::GET, "/echo", None, "", &[]).await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            third = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        third.expect("a third request was forwarded").code(),
        "overloaded"
    );
    upstream.release();
    for task in slow {
        assert_eq!(task.await.unwrap().status, StatusCode::CREATED);
    }

    // Three connections open: a fourth is answered 503 and closed.
    let gateway = start_gateway(upstream_addr, &["--max-connections", "3"]).await;
    let fresh = || {
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build_http::<Full<Bytes>>()
    };
    let open: Vec<_> = (0..3).map(|_| fresh()).collect();
    for c in &open {
        let reply = send_with(c, gateway.addr, Method::GET, "/echo", None, "", &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let (status, body) = raw_request(gateway.addr, "GET /echo HTTP/1.1").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("overloaded"), "{body}");
}

#[tokio::test]
async fn shutdown_finishes_within_the_drain_budget() {
    let (upstream_addr, upstream) = start_upstream().await;
    let (mut child, addr) = spawn_gateway_binary(upstream_addr, &["--drain-secs", "2"]).await;
    let stuck =
        tokio::spawn(async move { send(addr, Method::POST, "/slow", Some("drain-1"), "{}").await });
    upstream.started().await;
    signal(child.id().unwrap(), "TERM");
    let exit = tokio::time::timeout(Duration::from_millis(3500), child.wait())
        .await
        .expect("the gateway took longer than --drain-secs (and a margin) to stop")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    stuck.abort();
    upstream.release();
}

#[tokio::test]
async fn forwarding_headers_are_kept_only_from_trusted_proxies() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let spoofed = [
        ("x-forwarded-for", "10.0.0.1"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "api.example"),
        ("forwarded", "for=10.0.0.1;proto=https"),
        ("x-real-ip", "10.0.0.1"),
        ("true-client-ip", "10.0.0.1"),
        ("idempotent-take-over", "true"),
        ("x-forwarded-protocol", "ssl"),
        ("x-forwarded-client-cert", "Hash=1"),
        ("front-end-https", "on"),
        ("x-url-scheme", "https"),
        ("x-original-host", "evil"),
        ("x-arr-clientip", "10.0.0.1"),
    ];
    let echo = |addr| async move {
        let reply = send_with(&client(), addr, Method::GET, "/echo", None, "", &spoofed).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let seen: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        seen["headers"].clone()
    };
    let untrusted = start_gateway(upstream_addr, &[]).await;
    let headers = echo(untrusted.addr).await;
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], untrusted.addr.to_string());
    for name in [
        "forwarded",
        "x-real-ip",
        "true-client-ip",
        "idempotent-take-over",
    ] {
        assert!(headers.get(name).is_none(), "{name} forwarded: {headers}");
    }
    let behind_proxy = start_gateway(
        upstream_addr,
        &["--trusted-proxies", "10.9.0.0/16,127.0.0.1"],
    )
    .await;
    let headers = echo(behind_proxy.addr).await;
    assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "https");
    assert_eq!(headers["x-forwarded-host"], "api.example");
    assert_eq!(headers["forwarded"], "for=10.0.0.1;proto=https");
    assert!(headers.get("idempotent-take-over").is_none(), "{headers}");
    // A path to route by is never forwarded, not even from a proxy.
    let reply = send_with(
        &client(),
        behind_proxy.addr,
        Method::GET,
        "/echo",
        None,
        "",
        &[
            ("x-original-url", "/appointments"),
            ("x-rewrite-url", "/appointments"),
        ],
    )
    .await;
    let seen: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert!(seen["headers"].get("x-original-url").is_none(), "{seen}");
    assert!(seen["headers"].get("x-rewrite-url").is_none(), "{seen}");
}

#[tokio::test]
async fn heads_the_upstream_would_misread_are_refused() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &[]).await;
    for (head, code) in [
        ("POST /echo HTTP/1.1\r\nHost: b.example", "host-repeated"),
        (
            "POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip, chunked",
            "transfer-coding-unsupported",
        ),
        (
            "POST /appointments HTTP/1.1\r\nAuthorization: Bearer alice\r\nAuthorization: Bearer bob\r\nIdempotency-Key: r-1",
            "scope-repeated",
        ),
    ] {
        let (status, body) = raw_request(gateway.addr, head).await;
        assert!(status == 400 || status == 501, "{head}: {status} {body}");
        assert!(body.contains(code), "{head}: {status} {body}");
    }
    assert_eq!(upstream.count("/echo") + upstream.count("/appointments"), 0);
}

#[tokio::test]
async fn an_authorization_scheme_in_any_case_is_one_caller() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &[]).await;
    let client = client();
    let first = send_with(
        &client,
        gateway.addr,
        Method::POST,
        "/appointments",
        Some("case-1"),
        "{}",
        &[("authorization", "Bearer alice")],
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = send_with(
        &client,
        gateway.addr,
        Method::POST,
        "/appointments",
        Some("case-1"),
        "{}",
        &[("authorization", "bearer alice")],
    )
    .await;
    assert!(again.replayed(), "{}", again.text());
    let empty = send_with(
        &client,
        gateway.addr,
        Method::POST,
        "/appointments",
        Some("case-2"),
        "{}",
        &[("authorization", "")],
    )
    .await;
    assert_eq!(empty.status, StatusCode::UNAUTHORIZED, "{}", empty.text());
    assert_eq!(upstream.count("/appointments"), 1);
}

#[tokio::test]
async fn a_method_override_in_a_form_body_needs_the_key_of_the_method_it_may_name() {
    let (upstream_addr, upstream) = start_framework_upstream().await;
    let path = openapi_file();
    std::fs::write(
        &path,
        "openapi: 3.1.0\npaths:\n  /appointments/{id}:\n    delete: { x-idempotency: required }\n",
    )
    .unwrap();
    let gateway = start_gateway(upstream_addr, &["--openapi", path.to_str().unwrap()]).await;
    for content_type in [
        "application/x-www-form-urlencoded",
        "Application/X-WWW-Form-Urlencoded; charset=utf-8",
        "multipart/form-data; boundary=b",
    ] {
        let body = "_method=DELETE";
        let head = format!(
            "POST /appointments/1 HTTP/1.1\r\nAuthorization: Bearer a\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (status, answer) = raw_request_with_body(gateway.addr, &head).await;
        assert_eq!(status, 400, "{content_type}: {answer}");
        assert!(answer.contains("missing-key"), "{answer}");
    }
    assert!(upstream.seen_paths.lock().unwrap().is_empty());
}

/// Sends `request` (head, blank line and body, without the `Host` and
/// `Connection` lines the helper adds) over a connection of its own.
async fn raw_request_with_body(addr: SocketAddr, request: &str) -> (u16, String) {
    let (head, body) = request.split_once("\r\n\r\n").unwrap();
    let head = format!("{head}\r\nHost: api.test\r\nConnection: close\r\n\r\n{body}");
    raw_bytes(addr, head.as_bytes()).await
}

/// Writes `bytes` as they are and reads the answer to its end.
async fn raw_bytes(addr: SocketAddr, bytes: &[u8]) -> (u16, String) {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let answer = closed_by_the_gateway(stream, 10, "no answer within 10 s").await;
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

#[tokio::test]
async fn underscored_header_names_are_not_forwarded() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let gateway = start_gateway(upstream_addr, &[]).await;
    let (status, answer) = raw_bytes(
        gateway.addr,
        b"GET /echo HTTP/1.1\r\nHost: a\r\nX_Real_IP: 2.2.2.3\r\nX_Forwarded_For: 2.2.2.2\r\nX-Forwarded_Host: evil\r\nX-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\nX-Client-IP: 2.2.2.4\r\nCF-Connecting-IP: 2.2.2.5\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    let headers = seen["headers"].as_object().unwrap();
    assert!(
        headers.keys().all(|name| !name.contains('_')),
        "{headers:?}"
    );
    let text = seen["headers"].to_string();
    for leaked in ["2.2.2.", "evil", "/admin"] {
        assert!(!text.contains(leaked), "{leaked}: {text}");
    }
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_header_read_timeout() {
    use tokio::io::AsyncWriteExt;
    let (upstream_addr, _upstream) = start_upstream().await;
    let gateway = start_gateway(
        upstream_addr,
        &["--header-read-timeout-secs", "1", "--max-connections", "20"],
    )
    .await;
    let mut silent = Vec::new();
    for i in 0..20 {
        let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
        if i % 2 == 1 {
            stream.write_all(b"P").await.unwrap();
        }
        silent.push(stream);
    }
    for stream in silent {
        closed_by_the_gateway(stream, 30, "a silent connection was kept open").await;
    }
    let reply = send(gateway.addr, Method::GET, "/echo", None, "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test]
async fn a_stalled_keyed_body_is_cut_and_frees_its_room() {
    use tokio::io::AsyncWriteExt;
    let (upstream_addr, upstream) = start_upstream().await;
    let gateway = start_gateway(
        upstream_addr,
        &[
            "--body-read-timeout-secs",
            "1",
            "--max-buffered-bytes",
            "4096",
            "--request-body-limit",
            "4096",
        ],
    )
    .await;
    let mut stalled = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stalled
        .write_all(b"POST /appointments HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer a\r\nIdempotency-Key: stall\r\nContent-Length: 4096\r\n\r\n{")
        .await
        .unwrap();
    let answer =
        closed_by_the_gateway(stalled, 30, "a stalled body was waited for without end").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let reply = send(
        gateway.addr,
        Method::POST,
        "/appointments",
        Some("after"),
        "{}",
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(upstream.count("/appointments"), 1);
}

/// A SIGTERM as soon as the gateway says it listens drains it: the handler
/// is installed before that line.
#[tokio::test]
async fn a_sigterm_right_after_listening_drains() {
    let (upstream_addr, _upstream) = start_upstream().await;
    for _ in 0..5 {
        let (mut child, _addr) = spawn_gateway_binary(upstream_addr, &["--drain-secs", "1"]).await;
        signal(child.id().unwrap(), "TERM");
        let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("the gateway did not stop")
            .unwrap();
        assert!(exit.success(), "killed instead of drained: {exit:?}");
    }
}

/// With receipts on, every `Idempotency-Receipt` a client gets is the
/// gateway's: an upstream's, in the head or as a trailer, on an answer the
/// gateway audits or on one it passes through, is removed, and a client's
/// never reaches the upstream.
#[tokio::test]
async fn only_the_gateway_gives_receipts() {
    use tower_idempotency::audit::{AuditVerifier, Receipt};
    let (upstream_addr, _upstream) = start_upstream().await;
    let dir = std::env::temp_dir().join(unique("gateway-receipts"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("audit.jsonl");
    let path_arg = path.to_str().unwrap().to_owned();
    let (mut child, addr) =
        spawn_gateway_binary(upstream_addr, &["--audit", &path_arg, "--audit-receipts"]).await;
    let public = std::fs::read_to_string(dir.join("audit.jsonl.key.pub")).unwrap();
    let key: AuditVerifier = public.trim().parse().unwrap();
    let planted = [("x-plant-receipt", "Zm9yZ2Vk"), ("host", "clinic.example")];
    // Audited (a key), and passed through (no key where none is needed).
    for (path, key_header) in [("/appointments", Some("planted-1")), ("/echo", None)] {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{addr}{path}"))
            .header("authorization", "Bearer alice")
            .header("x-plant-receipt", planted[0].1);
        let request = match key_header {
            Some(k) => request.header("idempotency-key", k),
            None => request,
        };
        let response = client()
            .request(request.body(Full::new(Bytes::from("{}"))).unwrap())
            .await
            .unwrap();
        let receipts: Vec<_> = response
            .headers()
            .get_all("idempotency-receipt")
            .iter()
            .cloned()
            .collect();
        let body = response.into_body().collect().await.unwrap();
        let trailers = body.trailers().cloned().unwrap_or_default();
        assert!(
            !trailers.contains_key("idempotency-receipt"),
            "{trailers:?}"
        );
        match key_header {
            Some(_) => {
                assert_eq!(receipts.len(), 1, "{receipts:?}");
                let receipt = Receipt::parse(receipts[0].to_str().unwrap()).unwrap();
                receipt.verify(std::slice::from_ref(&key)).unwrap();
            }
            None => assert!(receipts.is_empty(), "{receipts:?}"),
        }
    }
    let echoed = send_with(
        &client(),
        addr,
        Method::POST,
        "/echo",
        None,
        "{}",
        &[("idempotency-receipt", "Q0xJRU5U"), planted[1]],
    )
    .await;
    assert!(!echoed.text().contains("Q0xJRU5U"), "{}", echoed.text());
    signal(child.id().unwrap(), "TERM");
    assert!(child.wait().await.unwrap().success());
}

/// The gateway's audit chain end to end: every answer carries a receipt,
/// the file rotates at its size, and after a SIGTERM the files verify as
/// one chain that holds every receipt.
#[tokio::test]
async fn the_gateway_audits_with_receipts_across_rotated_files() {
    use tower_idempotency::audit::{
        AuditVerifier, JsonlSink, Receipt, Trust, check_receipt_files, verify_files_with,
    };
    let (upstream_addr, _upstream) = start_upstream().await;
    let dir = std::env::temp_dir().join(unique("gateway-audit"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("audit.jsonl");
    let path_arg = path.to_str().unwrap().to_owned();
    let (mut child, addr) = spawn_gateway_binary(
        upstream_addr,
        &[
            "--audit",
            &path_arg,
            "--audit-receipts",
            "--audit-max-bytes",
            "2000",
        ],
    )
    .await;
    let mut receipts = Vec::new();
    for i in 0..12 {
        let key = format!("audited-{i}");
        for attempt in 0..2 {
            let reply = send(addr, Method::POST, "/appointments", Some(&key), "{}").await;
            assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
            assert_eq!(reply.replayed(), attempt == 1);
            let header = reply.headers["idempotency-receipt"].to_str().unwrap();
            receipts.push(Receipt::parse(header).unwrap());
        }
    }
    signal(child.id().unwrap(), "TERM");
    assert!(child.wait().await.unwrap().success());

    let public = std::fs::read_to_string(dir.join("audit.jsonl.key.pub")).unwrap();
    let key: AuditVerifier = public.trim().parse().unwrap();
    let trust = Trust::new().with_key(key.clone());
    let mut files = JsonlSink::rotated_files(&path).unwrap();
    assert!(files.len() >= 2, "the file rotated: {files:?}");
    files.push(path.clone());
    let chain = verify_files_with(&files, &trust).unwrap();
    assert!(chain.is_complete(), "{chain:?}");
    assert!(chain.entries >= 24, "{}", chain.entries);
    // Held against later files only, a receipt of the first is not called
    // missing: those files begin after it.
    let (_, early) = check_receipt_files(&files[1..], &trust, &receipts[0]).unwrap();
    let why = early.unwrap_err().to_string();
    assert!(why.contains("give the closed files before them"), "{why}");
    for receipt in &receipts {
        receipt.verify(std::slice::from_ref(&key)).unwrap();
        let (_, found) = check_receipt_files(&files, &trust, receipt).unwrap();
        let found = found.unwrap();
        assert!(
            found.decision == "executed" || found.decision == "replayed",
            "{}",
            found.decision
        );
    }
}
