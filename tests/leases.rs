//! In-flight duplicates, waiting, lease renewal, take-over and fencing, on
//! paused time.

mod common;

use std::time::Duration;

use axum::{Router, routing::post};
use common::{Counter, body_bytes, post_with_key, problem};
use http::StatusCode;
use tokio::sync::{mpsc, watch};
use tower::ServiceExt;
use tower_idempotency::{
    Fingerprint, IdempotencyLayer, MemoryStore, Outcome, Store,
    store::{Claim, Fault, FaultyStore, Op, RecordKey},
};

/// `POST /book` that reports each start and waits for the gate to open.
fn gated(counter: &Counter) -> (Router, mpsc::UnboundedReceiver<usize>, watch::Sender<bool>) {
    let (started_tx, started) = mpsc::unbounded_channel();
    let (gate, gate_rx) = watch::channel(false);
    let counter = counter.clone();
    let router = Router::new().route(
        "/book",
        post(move || {
            let (counter, started, mut gate) =
                (counter.clone(), started_tx.clone(), gate_rx.clone());
            async move {
                let n = counter.hit();
                started.send(n).unwrap();
                gate.wait_for(|open| *open).await.unwrap();
                (StatusCode::CREATED, format!("booking {n}"))
            }
        }),
    );
    (router, started, gate)
}

#[tokio::test(start_paused = true)]
async fn duplicate_in_flight_gets_409_with_retry_after_then_the_replay() {
    let counter = Counter::default();
    let (router, mut started, gate) = gated(&counter);
    let app = router
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_lease(Duration::from_secs(30)));
    let first = tokio::spawn(app.clone().oneshot(post_with_key("k", "x")));
    started.recv().await.unwrap();

    tokio::time::advance(Duration::from_millis(4500)).await;
    let response = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "Retry-After {retry_after}");
    let (status, code, _) = problem(response).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "request-in-flight")
    );

    gate.send(true).unwrap();
    body_bytes(first.await.unwrap().unwrap()).await;
    let replay = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(body_bytes(replay).await, "booking 1");
    assert_eq!(counter.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn wait_mode_replays_when_the_first_request_finishes_in_time() {
    let counter = Counter::default();
    let (router, mut started, gate) = gated(&counter);
    let app = router
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_wait(Duration::from_secs(5)));
    let first = tokio::spawn(app.clone().oneshot(post_with_key("k", "x")));
    started.recv().await.unwrap();
    let waiting = tokio::spawn(app.clone().oneshot(post_with_key("k", "x")));
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(!waiting.is_finished(), "the duplicate waits");
    gate.send(true).unwrap();
    body_bytes(first.await.unwrap().unwrap()).await;
    let replay = waiting.await.unwrap().unwrap();
    assert_eq!(
        replay.extensions().get::<Outcome>(),
        Some(&Outcome::Replayed)
    );
    assert_eq!(counter.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn wait_mode_gives_up_with_409_at_its_bound() {
    let counter = Counter::default();
    let (router, mut started, _gate) = gated(&counter);
    let app = router
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_wait(Duration::from_secs(3)));
    let _first = tokio::spawn(app.clone().oneshot(post_with_key("k", "x")));
    started.recv().await.unwrap();
    let begun = tokio::time::Instant::now();
    let (status, code, _) = problem(app.oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "request-in-flight")
    );
    let waited = begun.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert_eq!(counter.get(), 1);
}

/// A handler running for ten leases keeps its claim: the layer renews it.
#[tokio::test(start_paused = true)]
async fn a_long_request_keeps_its_claim_by_renewing() {
    let counter = Counter::default();
    let (router, mut started, gate) = gated(&counter);
    let store = FaultyStore::new(MemoryStore::default());
    let app = router.layer(IdempotencyLayer::new(store.clone()).with_lease(Duration::from_secs(3)));
    let first = tokio::spawn(app.clone().oneshot(post_with_key("k", "x")));
    started.recv().await.unwrap();
    for _ in 0..30 {
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    let (status, _, _) = problem(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT, "still held after ten leases");
    assert!(
        store.calls(Op::Renew) >= 9,
        "renewed {} times",
        store.calls(Op::Renew)
    );
    gate.send(true).unwrap();
    body_bytes(first.await.unwrap().unwrap()).await;
    assert_eq!(counter.get(), 1);
}

/// A claim whose holder died (here: claimed straight in the store and never
/// completed) blocks the key only until its lease ends.
#[tokio::test(start_paused = true)]
async fn an_abandoned_claim_is_taken_over_after_its_lease() {
    let counter = Counter::default();
    let store = MemoryStore::default();
    let app = common::booking_router(counter.clone()).layer(
        IdempotencyLayer::new(store.clone())
            .with_lease(Duration::from_secs(10))
            .with_scope(|_: &http::request::Parts| Some(tower_idempotency::Scope::global())),
    );
    // Claim as the layer would, for the same request, then "crash".
    let (parts, ()) = http::Request::post("/book").body(()).unwrap().into_parts();
    let fingerprint = Fingerprint::compute(&parts, &[], b"x");
    let key = RecordKey::new("", "k");
    assert!(matches!(
        store
            .claim(&key, fingerprint, Duration::from_secs(10))
            .await,
        Ok(Claim::Acquired { .. })
    ));
    let (status, _, _) = problem(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    tokio::time::advance(Duration::from_secs(11)).await;
    let response = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response.extensions().get::<Outcome>(),
        Some(&Outcome::Executed)
    );
    assert_eq!(counter.get(), 1);
}

/// When renewals fail (a store partition) the lease lapses and a duplicate
/// takes over; the first holder's late completion is fenced out, and retries
/// replay the holder that owns the record.
#[tokio::test(start_paused = true)]
async fn a_lapsed_holder_is_fenced_out() {
    let counter = Counter::default();
    let (router, mut started, gate) = gated(&counter);
    let store = FaultyStore::new(MemoryStore::default());
    store.set_fault(Op::Renew, Some(Fault::Unavailable));
    let app = router.layer(IdempotencyLayer::new(store.clone()).with_lease(Duration::from_secs(3)));
    let first = tokio::spawn(app.clone().oneshot(post_with_key("k", "x")));
    assert_eq!(started.recv().await, Some(1));
    tokio::time::advance(Duration::from_secs(4)).await;
    let second = tokio::spawn(app.clone().oneshot(post_with_key("k", "x")));
    assert_eq!(
        started.recv().await,
        Some(2),
        "the lapsed claim was taken over"
    );
    gate.send(true).unwrap();
    let first_body = body_bytes(first.await.unwrap().unwrap()).await;
    assert_eq!(first_body, "booking 1");
    let second_body = body_bytes(second.await.unwrap().unwrap()).await;
    assert_eq!(second_body, "booking 2");
    let replay = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(
        body_bytes(replay).await,
        "booking 2",
        "the fenced holder did not overwrite"
    );
    assert_eq!(store.calls(Op::Complete), 2);
}

#[tokio::test(start_paused = true)]
async fn records_expire_after_the_ttl() {
    let counter = Counter::default();
    let app = common::booking_router(counter.clone())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_ttl(Duration::from_secs(60)));
    body_bytes(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    tokio::time::advance(Duration::from_secs(59)).await;
    let replay = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(
        replay.extensions().get::<Outcome>(),
        Some(&Outcome::Replayed)
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    let fresh = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(
        fresh.extensions().get::<Outcome>(),
        Some(&Outcome::Executed)
    );
    assert_eq!(counter.get(), 2);
}

/// Eviction under pressure never drops an in-flight record: with room for
/// four records, a held request survives a flood of other keys.
#[tokio::test(start_paused = true)]
async fn eviction_never_drops_an_in_flight_record() {
    let counter = Counter::default();
    let (router, mut started, gate) = gated(&counter);
    // One scope holds every claim here, so it may hold all four.
    let store = MemoryStore::builder()
        .max_entries(4)
        .max_in_flight_per_scope(4)
        .build();
    let app = router.layer(IdempotencyLayer::new(store.clone()));
    let mut held = Vec::new();
    // One held request: a claim evicts a record only while claims hold
    // less than half the store.
    for i in 0..1 {
        held.push(tokio::spawn(
            app.clone()
                .oneshot(post_with_key(&format!("held-{i}"), "x")),
        ));
        started.recv().await.unwrap();
    }
    // The other slots: fill them with completed records, over and over.
    let quick =
        common::booking_router(Counter::default()).layer(IdempotencyLayer::new(store.clone()));
    for i in 0..50 {
        let response = quick
            .clone()
            .oneshot(post_with_key(&format!("quick-{i}"), "x"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "quick-{i}");
        body_bytes(response).await;
        assert!(store.len() <= 4);
    }
    gate.send(true).unwrap();
    for h in held {
        body_bytes(h.await.unwrap().unwrap()).await;
    }
    for i in 0..1 {
        let replay = app
            .clone()
            .oneshot(post_with_key(&format!("held-{i}"), "x"))
            .await
            .unwrap();
        assert_eq!(
            replay.extensions().get::<Outcome>(),
            Some(&Outcome::Replayed),
            "held-{i}"
        );
    }
}

/// The holder's renewals all fail while its lease lapses many times over,
/// and nobody else claims the key: when it finishes, its response is still
/// recorded and replayed, and nothing executes twice.
#[tokio::test(start_paused = true)]
async fn a_stalled_holder_nobody_took_over_still_records() {
    let counter = Counter::default();
    let (router, mut started, gate) = gated(&counter);
    let store = FaultyStore::new(MemoryStore::default());
    store.set_fault(Op::Renew, Some(Fault::Unavailable));
    let app =
        router.layer(IdempotencyLayer::new(store.clone()).with_lease(Duration::from_secs(30)));
    let first = tokio::spawn(app.clone().oneshot(post_with_key("k", "x")));
    started.recv().await.unwrap();
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert!(
        store.calls(Op::Renew) >= 9,
        "renewals were attempted and lost"
    );
    first_booking_records_once(app, first, gate, &counter).await;
}

/// `Lapse::Settle`: a holder whose renewals fail past its lease (a stall,
/// a partition from the store) is never run a second time; the retry is
/// answered in flight, and the holder's late response still records.
#[tokio::test(start_paused = true)]
async fn under_settle_a_lapsed_holder_is_not_taken_over_and_its_late_response_records() {
    let counter = Counter::default();
    let (router, mut started, gate) = gated(&counter);
    let store = FaultyStore::new(MemoryStore::default());
    store.set_fault(Op::Renew, Some(Fault::Unavailable));
    let app = router.layer(
        IdempotencyLayer::new(store.clone())
            .with_lease(Duration::from_secs(3))
            .with_max_execution(Duration::from_secs(60))
            .with_lapse(tower_idempotency::Lapse::Settle),
    );
    let first = tokio::spawn(app.clone().oneshot(post_with_key("k", "x")));
    assert_eq!(started.recv().await, Some(1));
    for _ in 0..5 {
        tokio::time::advance(Duration::from_secs(4)).await;
        let (status, kind, _) =
            problem(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
        assert_eq!(status, StatusCode::CONFLICT, "{kind}");
    }
    first_booking_records_once(app, first, gate, &counter).await;
}

/// `Lapse::Settle`: the store away for longer than the lease while the
/// holder holds its answer: the retries after the store returns are in
/// flight until the holder's record lands, then replay it.
#[tokio::test(start_paused = true)]
async fn under_settle_a_store_outage_past_the_lease_lets_the_holder_record() {
    let counter = Counter::default();
    let store = FaultyStore::new(MemoryStore::default());
    let app = common::booking_router(counter.clone()).layer(
        IdempotencyLayer::new(store.clone())
            .with_lease(Duration::from_secs(3))
            .with_lapse(tower_idempotency::Lapse::Settle),
    );
    store.set_fault(Op::Renew, Some(Fault::Unavailable));
    store.set_fault(Op::Complete, Some(Fault::Unavailable));
    let first = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let _ = body_bytes(first).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    let (status, _, _) = problem(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT, "the retry took the key over");
    store.set_fault(Op::Renew, None);
    store.set_fault(Op::Complete, None);
    // The holder's completion retries back off to a third of the lease.
    for _ in 0..20 {
        tokio::time::advance(Duration::from_millis(500)).await;
    }
    let replay = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 1);
}

/// `Lapse::Settle`: a claim whose holder stopped for longer than the
/// maximum execution time plus a lease is settled `outcome-unknown`, and
/// nothing runs.
#[tokio::test(start_paused = true)]
async fn under_settle_a_claim_abandoned_past_its_maximum_is_settled_not_run() {
    let counter = Counter::default();
    let store = MemoryStore::default();
    let app = common::booking_router(counter.clone()).layer(
        IdempotencyLayer::new(store.clone())
            .with_lease(Duration::from_secs(10))
            .with_max_execution(Duration::from_secs(60))
            .with_lapse(tower_idempotency::Lapse::Settle)
            .with_scope(|_: &http::request::Parts| Some(tower_idempotency::Scope::global())),
    );
    let (parts, ()) = http::Request::post("/book").body(()).unwrap().into_parts();
    let fingerprint = Fingerprint::compute(&parts, &[], b"x");
    let key = RecordKey::new("", "k");
    assert!(matches!(
        store
            .claim(&key, fingerprint, Duration::from_secs(70))
            .await,
        Ok(Claim::Acquired { .. })
    ));
    tokio::time::advance(Duration::from_secs(65)).await;
    let (status, _, _) = problem(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT, "taken before max execution");
    tokio::time::advance(Duration::from_secs(6)).await;
    for _ in 0..2 {
        let (status, kind, _) =
            problem(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(kind.ends_with("outcome-unknown"), "{kind}");
    }
    assert_eq!(counter.get(), 0);
}

/// Opens the gate for the first (and only) execution of `k`: its client
/// gets booking 1, a retry replays it, and nothing else ran.
async fn first_booking_records_once<S, B>(
    app: S,
    first: tokio::task::JoinHandle<Result<http::Response<B>, S::Error>>,
    gate: watch::Sender<bool>,
    counter: &Counter,
) where
    S: tower::Service<http::Request<axum::body::Body>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    gate.send(true).unwrap();
    assert_eq!(body_bytes(first.await.unwrap().unwrap()).await, "booking 1");
    let replay = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(body_bytes(replay).await, "booking 1");
    assert_eq!(counter.get(), 1);
}
