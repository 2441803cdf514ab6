//! Streaming responses: renewal while the client reads slowly, bodies that
//! never end, bodies that panic, and a store that fails to record.

mod common;

use std::{convert::Infallible, time::Duration};

use axum::{Router, body::Body, routing::post};
use bytes::Bytes;
use common::{Counter, body_bytes, post_with_key, problem};
use http::StatusCode;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{
    IdempotencyLayer, MemoryStore, Outcome,
    store::{Fault, FaultyStore, Op},
};

/// The client reads the first chunk, then stops reading for ten leases. The
/// lease is renewed all along, so a duplicate is still told "in flight".
#[tokio::test(start_paused = true)]
async fn a_slow_reader_keeps_the_claim() {
    let counter = Counter::default();
    let (router, gate) = common::gated_stream_router(&counter);
    let store = FaultyStore::new(MemoryStore::default());
    let app = router.layer(IdempotencyLayer::new(store.clone()).with_lease(Duration::from_secs(3)));
    let response = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"head;");
    // Not polling the body at all now, as a server does when the socket is
    // full.
    for _ in 0..30 {
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert!(
        store.calls(Op::Renew) >= 9,
        "renewed {} times",
        store.calls(Op::Renew)
    );
    let (status, _, _) = problem(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    gate.send(true).unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"tail");
    let replay = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(body_bytes(replay).await, "head;tail");
    assert_eq!(counter.get(), 1);
}

/// An endless stream whose client went away is drained only until it is
/// over the response limit; then it is recorded as not retained.
#[tokio::test]
async fn an_abandoned_endless_stream_stops_at_the_limit() {
    let counter = Counter::default();
    let c = counter.clone();
    let router = Router::new().route(
        "/book",
        post(move || {
            let c = c.clone();
            async move {
                c.hit();
                let endless = futures_util::stream::repeat_with(|| {
                    Ok::<_, Infallible>(Bytes::from_static(&[b'e'; 1024]))
                });
                Body::from_stream(endless)
            }
        }),
    );
    let store = MemoryStore::default();
    let app = router.layer(
        IdempotencyLayer::new(store.clone())
            .with_response_body_limit(4096)
            .with_wait(Duration::from_secs(30)),
    );
    let response = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    // The wait mode makes the retry wait for the background drain.
    let (status, code, _) = problem(app.oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::GONE, "response-not-retained")
    );
    assert_eq!(counter.get(), 1);
}

/// A body that panics after its head went out is recorded as status and
/// headers only: the work happened, so it must not run again.
#[tokio::test]
async fn a_panicking_body_is_recorded_as_not_retained() {
    let counter = Counter::default();
    let c = counter.clone();
    let router = Router::new().route(
        "/book",
        post(move || {
            let c = c.clone();
            async move {
                c.hit();
                let chunks = futures_util::stream::unfold(0, |step| async move {
                    assert!(step == 0, "body bug");
                    Some((Ok::<_, Infallible>(Bytes::from_static(b"part")), 1))
                });
                Body::from_stream(chunks)
            }
        }),
    );
    let app = router
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_wait(Duration::from_secs(30)));
    let response = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    let reading = tokio::spawn(async move { response.into_body().collect().await });
    assert!(reading.await.unwrap_err().is_panic());
    let (status, code, _) = problem(app.oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::GONE, "response-not-retained")
    );
    assert_eq!(counter.get(), 1);
}

/// The store fails when the response is to be recorded: the response still
/// reaches the client, the record lands on a later attempt, and nothing
/// executes twice.
#[tokio::test(start_paused = true)]
async fn a_failed_completion_is_retried_in_the_background() {
    let counter = Counter::default();
    let store = FaultyStore::new(MemoryStore::default());
    let app = common::booking_router(counter.clone()).layer(IdempotencyLayer::new(store.clone()));
    store.set_fault_once(Op::Complete, Fault::Unavailable);
    let first = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(body_bytes(first).await, "booking 1: x");
    let (status, _, _) = problem(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "not recorded yet, still claimed"
    );
    // Paused time: this lets the runtime run the background attempt, due
    // 100 ms after the failure, and moves the clock only as far as needed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let replay = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(
        replay.extensions().get::<Outcome>(),
        Some(&Outcome::Replayed)
    );
    assert_eq!(body_bytes(replay).await, "booking 1: x");
    assert_eq!(store.calls(Op::Complete), 2);
    assert_eq!(counter.get(), 1);
}

/// A body whose very first read fails: the client gets the error, and the
/// record keeps status and headers only.
#[tokio::test]
async fn a_body_failing_at_once_reaches_the_client_and_is_not_retained() {
    let counter = Counter::default();
    let c = counter.clone();
    let router = Router::new().route(
        "/book",
        post(move || {
            let c = c.clone();
            async move {
                c.hit();
                let failing = futures_util::stream::iter([Err::<Bytes, _>(std::io::Error::other(
                    "disk gone",
                ))]);
                Body::from_stream(failing)
            }
        }),
    );
    let app = router.layer(IdempotencyLayer::new(MemoryStore::default()));
    let response = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    let err = response.into_body().collect().await.unwrap_err();
    assert!(err.to_string().contains("disk gone"), "{err}");
    let (status, code, _) = problem(app.oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::GONE, "response-not-retained")
    );
    assert_eq!(counter.get(), 1);
}
