//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use axum::{Router, body::Body, routing::post};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::watch;

/// A `tracing` writer that keeps everything written to it.
#[derive(Clone, Default)]
pub struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// A subscriber writing events up to `level` here, without colours.
    pub fn subscriber(&self, level: tracing::Level) -> impl tracing::Subscriber + Send + Sync {
        let writer = self.clone();
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish()
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Counts how many times a handler body ran.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    pub fn hit(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A router with `POST /book` that counts executions and answers 201 with the
/// execution number, echoing the body.
pub fn booking_router(counter: Counter) -> Router {
    Router::new().route(
        "/book",
        post(move |body: Bytes| {
            let counter = counter.clone();
            async move {
                let n = counter.hit();
                (
                    StatusCode::CREATED,
                    [("x-execution", n.to_string())],
                    format!("booking {n}: {}", String::from_utf8_lossy(&body)),
                )
            }
        }),
    )
}

/// Claims `key` afresh and completes it with `record`, straight on a store.
pub async fn record_directly<St: tower_idempotency::Store>(
    store: &St,
    key: &tower_idempotency::store::RecordKey,
    fingerprint: tower_idempotency::Fingerprint,
    record: &'static [u8],
) {
    use std::time::Duration;
    use tower_idempotency::store::Claim;
    let claim = store.claim(key, fingerprint, Duration::from_secs(60)).await;
    let Ok(Claim::Acquired { token, .. }) = claim else {
        panic!("a fresh key is acquired, got {claim:?}");
    };
    store
        .complete(
            key,
            token,
            Bytes::from_static(record),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
}

/// The credential test requests carry, so the default scope has a caller.
pub const AUTH: &str = "Bearer test-caller";

pub fn post_with_key(key: &str, body: &'static str) -> Request<Body> {
    Request::post("/book")
        .header("authorization", AUTH)
        .header("idempotency-key", key)
        .body(Body::from(body))
        .unwrap()
}

pub async fn body_bytes<B>(response: Response<B>) -> Bytes
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    response.into_body().collect().await.unwrap().to_bytes()
}

/// Reads a problem+json response: its status, and the `code` member.
pub async fn problem<B>(response: Response<B>) -> (StatusCode, String, serde_json::Value)
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let status = response.status();
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "a rejection is problem+json"
    );
    let doc: serde_json::Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert_eq!(doc["status"], status.as_u16());
    for member in ["type", "title", "detail"] {
        assert!(doc[member].is_string(), "problem document has {member}");
    }
    (status, doc["code"].as_str().unwrap().to_owned(), doc)
}

/// `POST /book` answering with a streamed body: `head;` at once, then
/// `tail` once the returned gate is opened (sent `true`).
pub fn gated_stream_router(counter: &Counter) -> (Router, watch::Sender<bool>) {
    let (gate, gate_rx) = watch::channel(false);
    let counter = counter.clone();
    let router = Router::new().route(
        "/book",
        post(move || {
            let (counter, gate) = (counter.clone(), gate_rx.clone());
            async move {
                counter.hit();
                let chunks = futures_util::stream::unfold(0, move |step| {
                    let mut gate = gate.clone();
                    async move {
                        match step {
                            0 => Some((
                                Ok::<_, std::convert::Infallible>(Bytes::from_static(b"head;")),
                                1,
                            )),
                            1 => {
                                gate.wait_for(|open| *open).await.unwrap();
                                Some((Ok(Bytes::from_static(b"tail")), 2))
                            }
                            _ => None,
                        }
                    }
                });
                Body::from_stream(chunks)
            }
        }),
    );
    (router, gate)
}

/// Helpers for stores shared by several servers (Redis, PostgreSQL).
#[cfg(feature = "test-util")]
pub mod fleet {
    use std::time::Duration;

    use axum::Router;
    use bytes::Bytes;
    use http::{Request, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    use tokio::sync::{mpsc, watch};
    use tower_idempotency::{
        IdempotencyLayer, Store,
        store::{Fault, FaultyStore, Op},
    };

    use super::{Counter, booking_router};

    pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

    pub fn client() -> HttpClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    pub async fn serve(app: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        base
    }

    /// Every server of the fleet is reached under one public name, as
    /// behind a load balancer: the host is part of the fingerprint.
    pub fn booking(base: &str, key: &str) -> Request<Full<Bytes>> {
        Request::post(format!("{base}/book"))
            .header("host", "api.example")
            .header("authorization", super::AUTH)
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from_static(b"slot 9")))
            .unwrap()
    }

    /// Status, whether replayed, and body.
    pub async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> (StatusCode, bool, Bytes) {
        let response = client.request(req).await.unwrap();
        let status = response.status();
        let replayed = response.headers().contains_key("idempotent-replayed");
        (
            status,
            replayed,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    }

    /// Two servers, each with its own store handle on one shared store: 32
    /// concurrent duplicates spread over both execute once, and a retry sent
    /// to either server replays the response.
    pub async fn two_servers_execute_once<St: Store + Clone>(stores: [St; 2]) {
        let counter = Counter::default();
        let mut bases = Vec::new();
        for store in stores {
            let app = booking_router(counter.clone()).layer(IdempotencyLayer::new(store));
            bases.push(serve(app).await);
        }
        let client = client();
        let mut tasks = Vec::new();
        for i in 0..32 {
            let (client, req) = (client.clone(), booking(&bases[i % 2], "fleet-key"));
            tasks.push(tokio::spawn(async move { send(&client, req).await }));
        }
        for task in tasks {
            match task.await.unwrap() {
                (StatusCode::CREATED | StatusCode::CONFLICT, _, _) => {}
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert_eq!(counter.get(), 1, "one execution across the fleet");
        for base in &bases {
            let (status, replayed, body) = send(&client, booking(base, "fleet-key")).await;
            assert_eq!((status, replayed), (StatusCode::CREATED, true));
            assert_eq!(&body[..], b"booking 1: slot 9");
        }
        assert_eq!(counter.get(), 1);
    }

    /// The instance holding a claim stops renewing it (as a crashed or
    /// partitioned server would) before recording. Once its lease has lapsed
    /// on the store's clock, a retry on the other instance executes exactly
    /// once more; the old holder's late completion is fenced out, and later
    /// retries replay the new execution.
    pub async fn a_lapsed_holder_is_fenced_out<St: Store + Clone>(
        stores: [St; 2],
        lease: Duration,
    ) {
        let counter = Counter::default();
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let (gate, gate_rx) = watch::channel(false);
        let c = counter.clone();
        let router = Router::new().route(
            "/book",
            axum::routing::post(move || {
                let (c, started, mut gate) = (c.clone(), started_tx.clone(), gate_rx.clone());
                async move {
                    let n = c.hit();
                    started.send(n).unwrap();
                    if n == 1 {
                        gate.wait_for(|open| *open).await.unwrap();
                    }
                    (StatusCode::CREATED, format!("booking {n}"))
                }
            }),
        );
        let [first, second] = stores;
        let stalled = FaultyStore::new(first);
        stalled.set_fault(Op::Renew, Some(Fault::Unavailable));
        let base_a = serve(
            router
                .clone()
                .layer(IdempotencyLayer::new(stalled.clone()).with_lease(lease)),
        )
        .await;
        let base_b = serve(router.layer(IdempotencyLayer::new(second).with_lease(lease))).await;
        let client = client();

        let holder = {
            let (client, req) = (client.clone(), booking(&base_a, "crash-key"));
            tokio::spawn(async move { send(&client, req).await })
        };
        assert_eq!(started.recv().await, Some(1));
        // Within the lease, the other instance sees the claim.
        let (status, _, _) = send(&client, booking(&base_b, "crash-key")).await;
        assert_eq!(status, StatusCode::CONFLICT);
        // Let the lease run out on the store's clock.
        tokio::time::sleep(lease * 2).await;
        let (status, replayed, body) = send(&client, booking(&base_b, "crash-key")).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false));
        assert_eq!(&body[..], b"booking 2");
        // The old holder finishes late: its client gets its response, but its
        // record is fenced out.
        gate.send(true).unwrap();
        let (status, _, body) = holder.await.unwrap();
        assert_eq!(
            (status, &body[..]),
            (StatusCode::CREATED, &b"booking 1"[..])
        );
        assert_eq!(stalled.calls(Op::Complete), 1);
        for base in [&base_a, &base_b] {
            let (status, replayed, body) = send(&client, booking(base, "crash-key")).await;
            assert_eq!(
                (status, replayed, &body[..]),
                (StatusCode::CREATED, true, &b"booking 2"[..])
            );
        }
        assert_eq!(
            counter.get(),
            2,
            "exactly one more execution after the lapse"
        );
    }

    /// The instance holding a claim stalls past its lease (its renewals are
    /// dropped, as in a long pause or a store failover) while nobody retries;
    /// then it finishes. Its response is recorded all the same, and a retry
    /// on the other instance replays it: one execution.
    pub async fn a_stalled_holder_still_records<St: Store + Clone>(
        stores: [St; 2],
        lease: Duration,
    ) {
        let counter = Counter::default();
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let (gate, gate_rx) = watch::channel(false);
        let c = counter.clone();
        let router = Router::new().route(
            "/book",
            axum::routing::post(move || {
                let (c, started, mut gate) = (c.clone(), started_tx.clone(), gate_rx.clone());
                async move {
                    let n = c.hit();
                    started.send(n).unwrap();
                    gate.wait_for(|open| *open).await.unwrap();
                    (StatusCode::CREATED, format!("booking {n}"))
                }
            }),
        );
        let [first, second] = stores;
        let stalled = FaultyStore::new(first);
        stalled.set_fault(Op::Renew, Some(Fault::Unavailable));
        let base_a = serve(
            router
                .clone()
                .layer(IdempotencyLayer::new(stalled.clone()).with_lease(lease)),
        )
        .await;
        let base_b = serve(router.layer(IdempotencyLayer::new(second).with_lease(lease))).await;
        let client = client();

        let holder = {
            let (client, req) = (client.clone(), booking(&base_a, "stall-key"));
            tokio::spawn(async move { send(&client, req).await })
        };
        assert_eq!(started.recv().await, Some(1));
        // The lease lapses on the store's clock, several times over, with
        // every renewal lost.
        tokio::time::sleep(lease * 4).await;
        assert!(stalled.calls(Op::Renew) > 0, "renewals were attempted");
        gate.send(true).unwrap();
        let (status, replayed, body) = holder.await.unwrap();
        assert_eq!(
            (status, replayed, &body[..]),
            (StatusCode::CREATED, false, &b"booking 1"[..])
        );
        for base in [&base_b, &base_a] {
            let (status, replayed, body) = send(&client, booking(base, "stall-key")).await;
            assert_eq!(
                (status, replayed, &body[..]),
                (StatusCode::CREATED, true, &b"booking 1"[..]),
                "the late holder's response is recorded and replayed"
            );
        }
        assert_eq!(counter.get(), 1, "one execution");
    }

    /// Store operations per request (each one round trip for the shipped
    /// stores): two for a first execution (claim, complete), one for a
    /// replay, one for a rejected in-flight duplicate.
    pub async fn round_trips_per_request<St: Store + Clone>(store: St) {
        let store = FaultyStore::new(store);
        let counter = Counter::default();
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let (gate, gate_rx) = watch::channel(false);
        let c = counter.clone();
        let router = Router::new().route(
            "/book",
            axum::routing::post(move |body: Bytes| {
                let (c, started, mut gate) = (c.clone(), started_tx.clone(), gate_rx.clone());
                async move {
                    c.hit();
                    if &body[..] == b"slow" {
                        started.send(()).unwrap();
                        gate.wait_for(|open| *open).await.unwrap();
                    }
                    StatusCode::CREATED
                }
            }),
        );
        let base = serve(router.layer(IdempotencyLayer::new(store.clone()))).await;
        let client = client();

        let (status, _, _) = send(&client, booking(&base, "rt-first")).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(
            store.total_calls(),
            2,
            "first execution: claim and complete"
        );
        assert_eq!((store.calls(Op::Claim), store.calls(Op::Complete)), (1, 1));

        let (_, replayed, _) = send(&client, booking(&base, "rt-first")).await;
        assert!(replayed);
        assert_eq!(store.total_calls(), 3, "replay: one claim");

        let slow = || {
            Request::post(format!("{base}/book"))
                .header("host", "api.example")
                .header("authorization", super::AUTH)
                .header("idempotency-key", "rt-slow")
                .body(Full::new(Bytes::from_static(b"slow")))
                .unwrap()
        };
        let holder = {
            let (client, req) = (client.clone(), slow());
            tokio::spawn(async move { send(&client, req).await })
        };
        started.recv().await.unwrap();
        let before = store.total_calls();
        let (status, _, _) = send(&client, slow()).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(
            store.total_calls() - before,
            1,
            "rejected duplicate: one claim"
        );
        gate.send(true).unwrap();
        holder.await.unwrap();
        assert_eq!(counter.get(), 2);
    }
}

/// At-most-once on a store: 64 racing calls with one key run the work
/// once, and every one of them gets its output.
pub async fn at_most_once_races<St: tower_idempotency::Store + Clone>(store: St, scope: &str) {
    use std::time::Duration;
    use tower_idempotency::once::AtMostOnce;
    let once = AtMostOnce::new(store).with_wait(Duration::from_secs(20));
    let counter = Counter::default();
    let input = serde_json::json!({"caller": "ada", "slot": "09:00"});
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let (once, counter, input, scope) = (
                once.clone(),
                counter.clone(),
                input.clone(),
                scope.to_owned(),
            );
            tokio::spawn(async move {
                once.run(&scope, "race", &input, |_ctx| async move {
                    let n = counter.hit();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, std::io::Error>(format!("booking {n}"))
                })
                .await
                .unwrap()
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), "booking 1");
    }
    assert_eq!(counter.get(), 1, "one execution");
}

/// A memory store with faults no real store is asked for: claims that
/// answer late, records changed as they are completed, and a restart that
/// loses everything. Clones share it.
#[derive(Clone, Default)]
pub struct Altered {
    inner: Arc<std::sync::Mutex<tower_idempotency::MemoryStore>>,
    claim_delay: std::time::Duration,
    rewrite: Option<Rewrite>,
}

/// How [`Altered`] changes each record it completes.
pub type Rewrite = fn(&[u8]) -> Vec<u8>;

impl Altered {
    /// Claims answer only after `delay` (a slow network, a busy Redis).
    pub fn slow_claims(delay: std::time::Duration) -> Self {
        Altered {
            claim_delay: delay,
            ..Altered::default()
        }
    }

    /// Every record comes back as `rewrite` makes it: one written by
    /// another release, or damaged.
    pub fn rewriting(rewrite: Rewrite) -> Self {
        Altered {
            rewrite: Some(rewrite),
            ..Altered::default()
        }
    }

    /// Loses everything held, as a Redis without persistence does when it
    /// restarts.
    pub fn restart(&self) {
        *self.inner.lock().unwrap() = tower_idempotency::MemoryStore::default();
    }

    fn current(&self) -> tower_idempotency::MemoryStore {
        self.inner.lock().unwrap().clone()
    }
}

type StoreResult<T> = Result<T, tower_idempotency::store::StoreError>;

impl tower_idempotency::Store for Altered {
    async fn claim(
        &self,
        key: &tower_idempotency::store::RecordKey,
        fingerprint: tower_idempotency::Fingerprint,
        lease: std::time::Duration,
    ) -> StoreResult<tower_idempotency::store::Claim> {
        if !self.claim_delay.is_zero() {
            tokio::time::sleep(self.claim_delay).await;
        }
        self.current().claim(key, fingerprint, lease).await
    }

    async fn renew(
        &self,
        key: &tower_idempotency::store::RecordKey,
        token: tower_idempotency::store::Token,
        lease: std::time::Duration,
    ) -> StoreResult<()> {
        self.current().renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &tower_idempotency::store::RecordKey,
        token: tower_idempotency::store::Token,
        record: Bytes,
        ttl: std::time::Duration,
    ) -> StoreResult<()> {
        let record = match self.rewrite {
            Some(rewrite) => Bytes::from(rewrite(&record)),
            None => record,
        };
        self.current().complete(key, token, record, ttl).await
    }

    async fn release(
        &self,
        key: &tower_idempotency::store::RecordKey,
        token: tower_idempotency::store::Token,
    ) -> StoreResult<()> {
        self.current().release(key, token).await
    }

    async fn peek(
        &self,
        key: &tower_idempotency::store::RecordKey,
    ) -> StoreResult<tower_idempotency::store::Peeked> {
        self.current().peek(key).await
    }
}

/// Yields (and, on paused time, lets the clock move in 1 ms steps) until
/// `counter` reaches `n`.
pub async fn until_count(counter: &Counter, n: usize) {
    for _ in 0..100_000 {
        if counter.get() >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    panic!("the counter never reached {n}");
}

/// `target/<profile>/examples/<name>`, next to the running test's own
/// directory, built if it is missing.
pub fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let binary = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--example", name, "--all-features"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "{name} builds");
    }
    binary
}
