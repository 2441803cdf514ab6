//! What the handler is told (`IdempotencyContext`), and answers a client can
//! act on: a short `Retry-After`, no store internals in a 503, and a panic
//! that an outer layer catches runs once.

mod common;

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{Extension, Router, body::Body, routing::post};
use common::{AUTH, body_bytes, post_with_key, problem};
use http::{Request, Response, StatusCode};
use tokio::sync::watch;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_idempotency::{
    Fingerprint, IdempotencyContext, IdempotencyLayer, MemoryStore, Store,
    store::{Claim, Fault, FaultyStore, Op, RecordKey, StoreError, Token},
};

/// Every context a handler saw, in order.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<IdempotencyContext>>>);

impl Seen {
    fn all(&self) -> Vec<IdempotencyContext> {
        self.0.lock().unwrap().clone()
    }
}

/// `POST /book`: records its context, and answers with `status`.
fn context_router(seen: &Seen, status: StatusCode) -> Router {
    let seen = seen.clone();
    Router::new().route(
        "/book",
        post(move |Extension(ctx): Extension<IdempotencyContext>| {
            let seen = seen.clone();
            async move {
                seen.0.lock().unwrap().push(ctx);
                status
            }
        }),
    )
}

fn as_caller(token: &str, key: &str) -> Request<Body> {
    Request::post("/book")
        .header("authorization", format!("Bearer {token}"))
        .header("idempotency-key", key)
        .body(Body::from("x"))
        .unwrap()
}

#[tokio::test]
async fn the_handler_sees_its_key_scope_and_fingerprint() {
    let seen = Seen::default();
    let app = context_router(&seen, StatusCode::CREATED)
        .layer(IdempotencyLayer::new(MemoryStore::default()));
    let response = app
        .oneshot(
            Request::post("/book")
                .header("authorization", AUTH)
                .header("idempotency-key", "\"quoted-key\"")
                .body(Body::from("x"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let [ctx] = &seen.all()[..] else {
        panic!("one execution")
    };
    assert_eq!(ctx.key(), "quoted-key", "the key, unquoted");
    assert!(ctx.scope().starts_with("credential:"), "{}", ctx.scope());
    assert!(!ctx.scope().contains("test-caller"));
    assert!(!ctx.took_over());
    let (parts, ()) = Request::post("/book").body(()).unwrap().into_parts();
    assert_eq!(ctx.fingerprint(), Fingerprint::compute(&parts, &[], b"x"));
}

#[tokio::test]
async fn derived_keys_are_stable_across_executions_and_differ_per_label_and_scope() {
    let seen = Seen::default();
    // 503 is not recorded: the claim is released and every retry executes
    // again, as a new execution of the same intent.
    let app = context_router(&seen, StatusCode::SERVICE_UNAVAILABLE)
        .layer(IdempotencyLayer::new(MemoryStore::default()));
    for token in ["alice", "alice", "bob"] {
        let response = app
            .clone()
            .oneshot(as_caller(token, "pay-1"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    let [alice, alice_again, bob] = &seen.all()[..] else {
        panic!("three executions")
    };
    let charge = alice.derive("provider/charge");
    assert_eq!(charge.len(), 32);
    assert_eq!(
        alice_again.derive("provider/charge"),
        charge,
        "stable per intent"
    );
    assert_ne!(
        alice.derive("provider/refund"),
        charge,
        "distinct per label"
    );
    assert_ne!(bob.derive("provider/charge"), charge, "distinct per scope");
}

#[tokio::test(start_paused = true)]
async fn an_execution_that_takes_over_a_stalled_claim_is_told_so() {
    let seen = Seen::default();
    let (gate, gate_rx) = watch::channel(false);
    let s = seen.clone();
    let router = Router::new().route(
        "/book",
        post(move |Extension(ctx): Extension<IdempotencyContext>| {
            let (s, mut gate) = (s.clone(), gate_rx.clone());
            async move {
                let first = s.0.lock().unwrap().is_empty();
                s.0.lock().unwrap().push(ctx);
                if first {
                    // The first execution stalls.
                    gate.wait_for(|open| *open).await.unwrap();
                }
                StatusCode::CREATED
            }
        }),
    );
    let store = FaultyStore::new(MemoryStore::default());
    // Renewals fail, as from a stalled or partitioned holder.
    store.set_fault(Op::Renew, Some(Fault::Unavailable));
    let app = router.layer(IdempotencyLayer::new(store).with_lease(Duration::from_secs(3)));
    let stalled = tokio::spawn(app.clone().oneshot(post_with_key("k", "x")));
    while seen.all().is_empty() {
        tokio::task::yield_now().await;
    }
    tokio::time::advance(Duration::from_secs(4)).await;
    let response = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let contexts = seen.all();
    assert_eq!(contexts.len(), 2);
    assert!(!contexts[0].took_over());
    assert!(contexts[1].took_over(), "the second execution took over");
    assert_eq!(contexts[0].derive("db"), contexts[1].derive("db"));
    gate.send(true).unwrap();
    stalled.await.unwrap().unwrap();
}

/// The handler holds the key while the test asks for it again.
#[tokio::test(start_paused = true)]
async fn a_duplicate_in_flight_is_told_to_retry_soon_not_at_the_end_of_the_lease() {
    let (gate, gate_rx) = watch::channel(false);
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let router = Router::new().route(
        "/book",
        post(move || {
            let (s, mut gate) = (s.clone(), gate_rx.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                gate.wait_for(|open| *open).await.unwrap();
                StatusCode::CREATED
            }
        }),
    );
    let cases = [
        // (lease, configured hint, expected Retry-After)
        (Duration::from_secs(30), None, "1"),
        (Duration::from_secs(30), Some(Duration::from_secs(4)), "4"),
        // Never past the end of the lease.
        (Duration::from_secs(2), Some(Duration::from_secs(10)), "2"),
    ];
    for (i, (lease, hint, expected)) in cases.into_iter().enumerate() {
        let mut layer = IdempotencyLayer::new(MemoryStore::default()).with_lease(lease);
        if let Some(hint) = hint {
            layer = layer.with_in_flight_retry_after(hint);
        }
        let app = router.clone().layer(layer);
        let first = tokio::spawn(app.clone().oneshot(post_with_key("k", "x")));
        while started.load(Ordering::SeqCst) == i {
            tokio::task::yield_now().await;
        }
        let duplicate = app.oneshot(post_with_key("k", "x")).await.unwrap();
        assert_eq!(
            duplicate.headers()["retry-after"],
            expected,
            "{lease:?} {hint:?}"
        );
        let (status, code, _) = problem(duplicate).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::CONFLICT, "request-in-flight")
        );
        gate.send(true).unwrap();
        first.await.unwrap().unwrap();
        gate.send(false).unwrap();
    }
}

/// A store whose errors carry what must never reach a client.
#[derive(Clone)]
struct LeakyStore;

const SECRET_TEXT: &str = "connect to db-7.internal:5432 as user payments_rw failed";

impl Store for LeakyStore {
    async fn claim(&self, _: &RecordKey, _: Fingerprint, _: Duration) -> Result<Claim, StoreError> {
        Err(StoreError::unavailable(SECRET_TEXT))
    }
    async fn renew(&self, _: &RecordKey, _: Token, _: Duration) -> Result<(), StoreError> {
        Err(StoreError::unavailable(SECRET_TEXT))
    }
    async fn complete(
        &self,
        _: &RecordKey,
        _: Token,
        _: bytes::Bytes,
        _: Duration,
    ) -> Result<(), StoreError> {
        Err(StoreError::unavailable(SECRET_TEXT))
    }
    async fn release(&self, _: &RecordKey, _: Token) -> Result<(), StoreError> {
        Err(StoreError::unavailable(SECRET_TEXT))
    }
}

#[tokio::test]
async fn a_503_never_carries_the_stores_error_text() {
    let counter = common::Counter::default();
    let app = common::booking_router(counter.clone()).layer(IdempotencyLayer::new(LeakyStore));
    let response = app.oneshot(post_with_key("k", "x")).await.unwrap();
    let (status, code, doc) = problem(response).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "store-unavailable")
    );
    let text = doc.to_string();
    for leak in ["db-7", "5432", "payments_rw", "connect"] {
        assert!(!text.contains(leak), "{leak} leaked: {text}");
    }

    // Nor does an unreadable record's error, nor a request body's.
    let store = FaultyStore::new(MemoryStore::default());
    store.set_fault(Op::Claim, Some(Fault::Corrupt));
    let app = common::booking_router(counter.clone()).layer(IdempotencyLayer::new(store));
    let (_, code, doc) = problem(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(code, "store-unavailable");
    assert!(!doc.to_string().contains("injected"), "{doc}");
    let failing = futures_util::stream::iter(vec![
        Ok(bytes::Bytes::from_static(b"part")),
        Err(std::io::Error::other("tls: peer 10.0.0.9 reset")),
    ]);
    let req = Request::post("/book")
        .header("authorization", AUTH)
        .header("idempotency-key", "k2")
        .body(Body::from_stream(failing))
        .unwrap();
    let (_, code, doc) = problem(app.oneshot(req).await.unwrap()).await;
    assert_eq!(code, "body-unreadable");
    assert!(!doc.to_string().contains("10.0.0.9"), "{doc}");
    assert_eq!(counter.get(), 0);
}

/// A handler future that counts its polls and panics on each.
struct PanicOnPoll(Arc<AtomicUsize>);

impl Future for PanicOnPoll {
    type Output = Result<Response<Body>, Infallible>;
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.fetch_add(1, Ordering::SeqCst);
        panic!("handler bug");
    }
}

/// Counts the panics raised on the thread named `thread`, in any task.
fn count_panics_on(thread: &'static str) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some(thread) {
            c.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
    count
}

#[tokio::test]
async fn a_panic_caught_by_an_outer_layer_runs_once_and_frees_the_key() {
    // The test's own thread runs every task of its (current-thread) runtime.
    let panics = count_panics_on("a_panic_caught_by_an_outer_layer_runs_once_and_frees_the_key");
    let polls = Arc::new(AtomicUsize::new(0));
    let p = polls.clone();
    let store = MemoryStore::default();
    let svc = ServiceBuilder::new()
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .layer(IdempotencyLayer::new(store.clone()))
        .service(service_fn(move |_req: Request<_>| PanicOnPoll(p.clone())));
    let response = svc.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    body_bytes(response).await;
    // Let every task the request left behind run to its end.
    let metrics = tokio::runtime::Handle::current().metrics();
    while metrics.num_alive_tasks() > 0 || !store.is_empty() {
        tokio::task::yield_now().await;
    }
    assert_eq!(polls.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(
        panics.load(Ordering::SeqCst),
        1,
        "the panicked request is never polled again"
    );
    // The claim was released: the key executes again.
    let again = svc.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(again.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(polls.load(Ordering::SeqCst), 2);
}

/// Lets every task of the (current-thread) runtime run to its end.
async fn every_task_done() {
    let metrics = tokio::runtime::Handle::current().metrics();
    while metrics.num_alive_tasks() > 0 {
        tokio::task::yield_now().await;
    }
}

/// The answer to a retry of a request whose response head went out but
/// whose body failed: its outcome, without the body.
async fn assert_not_retained<B>(retry: Response<B>)
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (status, code, _) = problem(retry).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::GONE, "response-not-retained")
    );
}

/// A response body that is not ready at first, then panics when polled.
struct PanickingBody(Arc<AtomicUsize>);

impl http_body::Body for PanickingBody {
    type Data = bytes::Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Infallible>>> {
        if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        panic!("body bug");
    }
}

#[tokio::test]
async fn a_body_whose_panic_was_caught_is_never_polled_again_and_keeps_its_outcome() {
    let polls = Arc::new(AtomicUsize::new(0));
    let p = polls.clone();
    let store = MemoryStore::default();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store.clone()))
        .service(service_fn(move |_req: Request<_>| {
            let body = PanickingBody(p.clone());
            async move { Ok::<_, Infallible>(Response::new(body)) }
        }));
    let response = svc.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = Box::pin(response.into_body());
    // A server (or an outer layer) catches the body's panic, and drops the
    // body only later.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let _ = http_body::Body::poll_frame(body.as_mut(), &mut cx);
    }));
    assert!(caught.is_err());
    drop(body);
    every_task_done().await;
    assert_eq!(
        polls.load(Ordering::SeqCst),
        2,
        "never polled after its panic"
    );
    // The head went out, so the outcome is kept (without the body).
    let retry = svc.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_not_retained(retry).await;
}

/// A response body that sends one frame, is then not ready, then panics.
struct FrameThenPanic(Arc<AtomicUsize>);

impl http_body::Body for FrameThenPanic {
    type Data = bytes::Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Infallible>>> {
        match self.0.fetch_add(1, Ordering::SeqCst) {
            0 => Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(
                b"part",
            ))))),
            1 => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            _ => panic!("body bug after the client left"),
        }
    }
}

#[tokio::test]
async fn a_body_that_panics_after_the_client_left_keeps_its_outcome() {
    let polls = Arc::new(AtomicUsize::new(0));
    let executions = Arc::new(AtomicUsize::new(0));
    let (p, e) = (polls.clone(), executions.clone());
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .service(service_fn(move |_req: Request<_>| {
            e.fetch_add(1, Ordering::SeqCst);
            let body = FrameThenPanic(p.clone());
            async move { Ok::<_, Infallible>(Response::new(body)) }
        }));
    let response = svc.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    let mut body = response.into_body();
    let first = http_body_util::BodyExt::frame(&mut body)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "part");
    // The client goes away; the rest is drained in the background, and
    // panics there.
    drop(body);
    every_task_done().await;
    assert_eq!(
        polls.load(Ordering::SeqCst),
        3,
        "never polled after its panic"
    );
    let retry = svc.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_not_retained(retry).await;
    assert_eq!(
        executions.load(Ordering::SeqCst),
        1,
        "the work is not done twice"
    );
}
