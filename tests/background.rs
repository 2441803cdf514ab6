//! Work after the client has gone: when a dropped request ends and when it
//! goes on, the maximum execution time, completions retried against a
//! failing store, and draining on shutdown. All on paused time.

mod common;

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, body::Body, routing::post};
use bytes::Bytes;
use common::{AUTH, Counter, body_bytes, booking_router, post_with_key, problem};
use futures_util::FutureExt;
use http::{Request, StatusCode};
use http_body::Frame;
use tower::ServiceExt;
use tower_idempotency::{
    Drained, IdempotencyLayer, MemoryStore, Outcome,
    store::{Fault, FaultyStore, Op},
};

/// Sets its flag when dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A request body that never ends.
struct Endless(#[allow(dead_code)] DropFlag);

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Pending
    }
}

/// `POST /book` whose handler counts its start and then never finishes; the
/// flag is set once its future is dropped.
fn hung(counter: &Counter) -> (Router, Arc<AtomicBool>) {
    let dropped = Arc::new(AtomicBool::new(false));
    let (counter, flag) = (counter.clone(), dropped.clone());
    let router = Router::new().route(
        "/book",
        post(move || {
            let (counter, flag) = (counter.clone(), flag.clone());
            async move {
                let _guard = DropFlag(flag);
                counter.hit();
                std::future::pending::<StatusCode>().await
            }
        }),
    );
    (router, dropped)
}

/// Lets background tasks run until `done` holds, without moving the clock
/// past anything they wait for.
async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("background work did not get there");
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_its_body_is_read_ends_there() {
    let counter = Counter::default();
    let layer = IdempotencyLayer::new(MemoryStore::default());
    let app = booking_router(counter.clone()).layer(layer.clone());
    let dropped = Arc::new(AtomicBool::new(false));
    let req = Request::post("/book")
        .header("authorization", AUTH)
        .header("idempotency-key", "k")
        .body(Body::new(Endless(DropFlag(dropped.clone()))))
        .unwrap();
    let mut pending = Box::pin(app.oneshot(req));
    assert!((&mut pending).now_or_never().is_none(), "reading the body");
    drop(pending);
    assert!(
        dropped.load(Ordering::SeqCst),
        "nothing is claimed yet: the request ends with its client, body and all"
    );
    assert_eq!(layer.stats().detached_running, 0);
    assert_eq!(counter.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_waiting_in_wait_mode_ends_there() {
    let counter = Counter::default();
    let (router, _) = hung(&counter);
    let store = FaultyStore::new(MemoryStore::default());
    let layer = IdempotencyLayer::new(store.clone()).with_wait(Duration::from_secs(60));
    let app = router.layer(layer.clone());
    let mut holder = Box::pin(app.clone().oneshot(post_with_key("k", "x")));
    assert!((&mut holder).now_or_never().is_none());
    assert_eq!(counter.get(), 1);

    let mut waiter = Box::pin(app.oneshot(post_with_key("k", "x")));
    assert!(
        (&mut waiter).now_or_never().is_none(),
        "waiting for the holder"
    );
    let claims = store.calls(Op::Claim);
    drop(waiter);
    for _ in 0..40 {
        tokio::time::advance(Duration::from_millis(250)).await;
    }
    assert_eq!(
        store.calls(Op::Claim),
        claims,
        "a waiter whose client went away stops asking the store"
    );
    assert_eq!(layer.stats().detached_running, 0);
    drop(holder);
}

#[tokio::test(start_paused = true)]
async fn a_hung_handler_is_settled_after_the_maximum_execution_time() {
    let counter = Counter::default();
    let (router, handler_dropped) = hung(&counter);
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_lease(Duration::from_secs(30))
        .with_max_execution(Duration::from_secs(120));
    let app = router.layer(layer.clone());

    // The client goes away once the handler runs.
    let mut first = Box::pin(app.clone().oneshot(post_with_key("k", "x")));
    assert!((&mut first).now_or_never().is_none());
    assert_eq!(counter.get(), 1);
    drop(first);
    assert_eq!(layer.stats().detached_running, 1);

    // Within the limit, and well past the lease: renewed, still in flight.
    tokio::time::sleep(Duration::from_secs(119)).await;
    let (status, code, _) =
        problem(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "request-in-flight")
    );
    assert!(!handler_dropped.load(Ordering::SeqCst));

    tokio::time::sleep(Duration::from_secs(2)).await;
    until(|| layer.stats().detached_running == 0).await;
    assert!(
        handler_dropped.load(Ordering::SeqCst),
        "the handler is stopped, not left running"
    );
    let stats = layer.stats();
    assert_eq!(stats.settled_unfinished, 1);

    let retry = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let (status, code, doc) = problem(retry).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, "outcome-unknown"),
        "{doc}"
    );
    assert_eq!(counter.get(), 1, "never executed a second time");
}

#[tokio::test(start_paused = true)]
async fn a_connected_client_of_a_hung_handler_gets_outcome_unknown() {
    let counter = Counter::default();
    let (router, handler_dropped) = hung(&counter);
    let layer =
        IdempotencyLayer::new(MemoryStore::default()).with_max_execution(Duration::from_secs(10));
    let app = router.layer(layer.clone());
    let response = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(
        response.extensions().get::<Outcome>(),
        Some(&Outcome::Rejected(
            tower_idempotency::RejectionKind::OutcomeUnknown
        ))
    );
    assert!(!response.headers().contains_key("idempotent-replayed"));
    let (status, code, _) = problem(response).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, "outcome-unknown")
    );
    assert!(handler_dropped.load(Ordering::SeqCst));
    let (status, code, _) =
        problem(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, "outcome-unknown")
    );
    assert_eq!(counter.get(), 1);
    // A drained layer still serves: a request arriving afterwards runs.
    let mut later = Box::pin(app.oneshot(post_with_key("k2", "x")));
    assert!((&mut later).now_or_never().is_none());
    assert_eq!(counter.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn drain_waits_for_a_detached_request_to_be_recorded() {
    let counter = Counter::default();
    let c = counter.clone();
    let router = Router::new().route(
        "/book",
        post(move || {
            let c = c.clone();
            async move {
                let n = c.hit();
                tokio::time::sleep(Duration::from_secs(10)).await;
                (StatusCode::CREATED, format!("booking {n}"))
            }
        }),
    );
    let layer = IdempotencyLayer::new(MemoryStore::default());
    let app = router.layer(layer.clone());
    let mut first = Box::pin(app.clone().oneshot(post_with_key("k", "x")));
    assert!((&mut first).now_or_never().is_none());
    drop(first);

    let started = tokio::time::Instant::now();
    let drained: Drained = layer.drain(Duration::from_secs(30)).await;
    assert!(drained.is_complete(), "{drained}");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "drain returned before the request was done"
    );
    assert_eq!(layer.stats().detached_running, 0);
    let replay = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(body_bytes(replay).await, "booking 1");
    assert_eq!(counter.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn drain_settles_what_outlives_its_deadline() {
    let counter = Counter::default();
    let (router, handler_dropped) = hung(&counter);
    let layer = IdempotencyLayer::new(MemoryStore::default());
    let app = router.layer(layer.clone());
    let mut first = Box::pin(app.clone().oneshot(post_with_key("k", "x")));
    assert!((&mut first).now_or_never().is_none());
    drop(first);

    let drained = layer.drain(Duration::from_secs(5)).await;
    assert_eq!(
        (
            drained.settled,
            drained.abandoned_requests,
            drained.abandoned_completions
        ),
        (1, 0, 0),
        "{drained}"
    );
    assert!(handler_dropped.load(Ordering::SeqCst));
    let (status, code, _) =
        problem(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, "outcome-unknown")
    );
    assert_eq!(counter.get(), 1);
    // A drained layer still serves: a request arriving afterwards runs.
    let mut later = Box::pin(app.oneshot(post_with_key("k2", "x")));
    assert!((&mut later).now_or_never().is_none());
    assert_eq!(counter.get(), 2);
}

/// The store refuses completions for ten minutes: the response still goes
/// out, the lease is kept alive meanwhile (retries are told "in flight",
/// never executed), and the record lands once the store takes it.
#[tokio::test(start_paused = true)]
async fn a_completion_is_retried_until_the_store_takes_it() {
    let counter = Counter::default();
    let store = FaultyStore::new(MemoryStore::default());
    let layer = IdempotencyLayer::new(store.clone()).with_lease(Duration::from_secs(30));
    let app = booking_router(counter.clone()).layer(layer.clone());
    store.set_fault(Op::Complete, Some(Fault::Unavailable));
    let first = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(body_bytes(first).await, "booking 1: x");
    assert_eq!(layer.stats().completions_pending, 1);

    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let (status, code, _) =
            problem(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::CONFLICT, "request-in-flight"),
            "the claim is kept alive while the record waits"
        );
    }
    assert!(store.calls(Op::Renew) > 0);

    store.set_fault(Op::Complete, None);
    tokio::time::sleep(Duration::from_secs(6)).await;
    until(|| layer.stats().completions_pending == 0).await;
    let replay = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(body_bytes(replay).await, "booking 1: x");
    assert_eq!(counter.get(), 1);
    assert_eq!(layer.stats().completions_abandoned, 0);
}

#[tokio::test(start_paused = true)]
async fn a_completion_is_given_up_after_the_retry_limit() {
    let counter = Counter::default();
    let store = FaultyStore::new(MemoryStore::default());
    let layer =
        IdempotencyLayer::new(store.clone()).with_completion_retry_limit(Duration::from_secs(120));
    let app = booking_router(counter.clone()).layer(layer.clone());
    store.set_fault(Op::Complete, Some(Fault::Unavailable));
    let first = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    tokio::time::sleep(Duration::from_secs(180)).await;
    until(|| layer.stats().completions_pending == 0).await;
    assert_eq!(layer.stats().completions_abandoned, 1);
    let attempts = store.calls(Op::Complete);
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        store.calls(Op::Complete),
        attempts,
        "no attempts after the limit"
    );
    assert_eq!(counter.get(), 1);
}

/// A response body still streaming when its client goes away is drained in
/// the background, but only until the maximum execution time: then it is cut
/// and recorded with status and headers, and no task is left.
#[tokio::test(start_paused = true)]
async fn a_detached_body_is_cut_at_the_maximum_execution_time() {
    use http_body_util::BodyExt;
    let counter = Counter::default();
    let (router, _gate) = common::gated_stream_router(&counter);
    let layer =
        IdempotencyLayer::new(MemoryStore::default()).with_max_execution(Duration::from_secs(60));
    let app = router.layer(layer.clone());
    let response = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"head;");
    drop(body);
    assert_eq!(layer.stats().detached_running, 1);

    tokio::time::sleep(Duration::from_secs(61)).await;
    until(|| layer.stats().detached_running == 0).await;
    let (status, code, doc) = problem(app.oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::GONE, "response-not-retained"),
        "{doc}"
    );
    assert_eq!(counter.get(), 1);
}

/// The client leaves while its claim is under way; the drain's deadline
/// passes before the claim lands. The handler never started, so the claim
/// is released (a retry executes it once), never settled `outcome-unknown`.
#[tokio::test(start_paused = true)]
async fn a_drain_releases_a_claim_whose_handler_never_started() {
    let counter = Counter::default();
    let layer = IdempotencyLayer::new(common::Altered::slow_claims(Duration::from_secs(3)));
    let app = booking_router(counter.clone()).layer(layer.clone());
    let mut first = Box::pin(app.clone().oneshot(post_with_key("k", "x")));
    assert!((&mut first).now_or_never().is_none());
    drop(first);

    let drained = layer.drain(Duration::from_secs(1)).await;
    assert_eq!(
        (
            drained.settled,
            drained.released,
            drained.abandoned_requests
        ),
        (0, 1, 0),
        "{drained}"
    );
    assert_eq!(counter.get(), 0, "the handler never ran");
    let retry = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(body_bytes(retry).await, "booking 1: x");
    assert_eq!(counter.get(), 1);
}

/// In wait mode, a request dropped during one of its claims waits no
/// longer: after a drain's deadline has passed, the key's holder releases
/// it, and the dropped request never runs (old code: its next claim
/// cleared the settle flag, it ran, and the drain called it settled).
#[tokio::test(start_paused = true)]
async fn a_dropped_waiting_request_never_runs_after_a_drain() {
    let counter = Counter::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (c, g) = (counter.clone(), gate.clone());
    let router = Router::new().route(
        "/book",
        post(move || {
            let (c, g) = (c.clone(), g.clone());
            async move {
                let n = c.hit();
                if n == 1 {
                    // The first run waits for the test, then declines
                    // ("not processed, try again"), which frees the key.
                    let _ = g.acquire().await.unwrap();
                    return (StatusCode::SERVICE_UNAVAILABLE, "later".to_owned());
                }
                (StatusCode::CREATED, format!("booking {n}"))
            }
        }),
    );
    let layer = IdempotencyLayer::new(common::Altered::slow_claims(Duration::from_millis(100)))
        .with_wait(Duration::from_secs(60));
    let app = router.layer(layer.clone());
    let mut holder = Box::pin(app.clone().oneshot(post_with_key("k", "x")));
    tokio::select! {
        _ = &mut holder => panic!("the first request is held at its gate"),
        () = until_async(|| counter.get() == 1) => {}
    }
    let mut waiter = Box::pin(app.clone().oneshot(post_with_key("k", "x")));
    assert!(
        (&mut waiter).now_or_never().is_none(),
        "its claim is under way"
    );
    drop(waiter);

    let drain = tokio::spawn({
        let layer = layer.clone();
        async move { layer.drain(Duration::from_secs(1)).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    gate.add_permits(1);
    let declined = holder.await.unwrap();
    assert_eq!(declined.status(), StatusCode::SERVICE_UNAVAILABLE);
    body_bytes(declined).await;
    let drained = drain.await.unwrap();
    assert_eq!(layer.stats().detached_running, 0);
    assert_eq!((drained.settled, drained.released), (0, 0), "{drained}");
    assert_eq!(counter.get(), 1, "the dropped request never ran");
}

/// Polls `done` between timer ticks of the paused clock.
async fn until_async(mut done: impl FnMut() -> bool) {
    while !done() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
