//! The layer through an axum router: every rejection, replay, and the
//! responses that are or are not recorded.

mod common;

use std::{convert::Infallible, time::Duration};

use axum::{Router, body::Body, routing::post};
use bytes::Bytes;
use common::{Counter, body_bytes, booking_router, post_with_key, problem};
use http::{Method, Request, Response, StatusCode};
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_idempotency::{
    IdempotencyLayer, MemoryStore, Outcome, Rejection, RejectionKind, Scope,
    store::{Fault, FaultyStore, Op},
};

fn app(counter: &Counter, layer: IdempotencyLayer<MemoryStore>) -> Router {
    booking_router(counter.clone()).layer(layer)
}

fn layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default())
}

#[tokio::test]
async fn first_request_executes_and_retries_replay() {
    let counter = Counter::default();
    let app = app(&counter, layer());

    let first = app
        .clone()
        .oneshot(post_with_key("k1", "slot 9"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(!first.headers().contains_key("idempotent-replayed"));
    assert_eq!(
        first.extensions().get::<Outcome>(),
        Some(&Outcome::Executed)
    );
    let first_body = body_bytes(first).await;

    for _ in 0..3 {
        let retry = app
            .clone()
            .oneshot(post_with_key("k1", "slot 9"))
            .await
            .unwrap();
        assert_eq!(retry.status(), StatusCode::CREATED);
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        assert_eq!(retry.headers()["x-execution"], "1");
        assert_eq!(
            retry.extensions().get::<Outcome>(),
            Some(&Outcome::Replayed)
        );
        assert_eq!(body_bytes(retry).await, first_body);
    }
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn quoted_and_bare_keys_are_the_same_key() {
    let counter = Counter::default();
    let app = app(&counter, layer());
    body_bytes(
        app.clone()
            .oneshot(post_with_key("\"k2\"", "x"))
            .await
            .unwrap(),
    )
    .await;
    let retry = app.oneshot(post_with_key("k2", "x")).await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn missing_key_passes_through_when_optional_and_is_rejected_when_required() {
    let counter = Counter::default();
    let request = || {
        Request::post("/book")
            .header("authorization", common::AUTH)
            .body(Body::from("x"))
            .unwrap()
    };

    let optional = app(&counter, layer());
    for _ in 0..2 {
        let response = optional.clone().oneshot(request()).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(response.extensions().get::<Outcome>().is_none());
    }
    assert_eq!(counter.get(), 2, "unkeyed requests are not protected");

    let required = app(&counter, layer().with_required_key(true));
    let response = required.oneshot(request()).await.unwrap();
    assert_eq!(
        response.extensions().get::<Outcome>(),
        Some(&Outcome::Rejected(RejectionKind::MissingKey))
    );
    let (status, code, doc) = problem(response).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "missing-key")
    );
    assert!(doc["detail"].as_str().unwrap().contains("idempotency-key"));
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn every_invalid_key_is_rejected_before_the_handler() {
    let counter = Counter::default();
    let app = app(&counter, layer());
    let too_long = "k".repeat(256);
    for value in [
        "",
        "\"\"",
        "a b",
        "\"unterminated",
        "\"a\"b",
        "\"bad\\escape\"",
        too_long.as_str(),
    ] {
        let response = app
            .clone()
            .oneshot(post_with_key(value, "x"))
            .await
            .unwrap();
        let (status, code, _) = problem(response).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "invalid-key"),
            "{value:?}"
        );
    }
    let non_ascii = Request::post("/book")
        .header("authorization", common::AUTH)
        .header(
            "idempotency-key",
            http::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        )
        .body(Body::from("x"))
        .unwrap();
    let (_, code, _) = problem(app.clone().oneshot(non_ascii).await.unwrap()).await;
    assert_eq!(code, "invalid-key");
    let repeated = Request::post("/book")
        .header("authorization", common::AUTH)
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .body(Body::from("x"))
        .unwrap();
    let (_, code, doc) = problem(app.oneshot(repeated).await.unwrap()).await;
    assert_eq!(code, "invalid-key");
    assert!(doc["detail"].as_str().unwrap().contains("more than once"));
    assert_eq!(counter.get(), 0);
}

#[tokio::test]
async fn reused_key_with_a_different_request_is_rejected() {
    let counter = Counter::default();
    let app = app(&counter, layer());
    body_bytes(
        app.clone()
            .oneshot(post_with_key("k3", "slot 9"))
            .await
            .unwrap(),
    )
    .await;
    let (status, code, _) = problem(
        app.clone()
            .oneshot(post_with_key("k3", "slot 10"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "key-reused")
    );
    let other_query = Request::post("/book?x=1")
        .header("authorization", common::AUTH)
        .header("idempotency-key", "k3")
        .body(Body::from("slot 9"))
        .unwrap();
    let (_, code, _) = problem(app.clone().oneshot(other_query).await.unwrap()).await;
    assert_eq!(code, "key-reused");
    assert_eq!(counter.get(), 1);

    let strict = self::app(&counter, layer().with_mismatch_422(true));
    body_bytes(
        strict
            .clone()
            .oneshot(post_with_key("k4", "a"))
            .await
            .unwrap(),
    )
    .await;
    let response = strict.oneshot(post_with_key("k4", "b")).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn extra_fingerprint_headers_distinguish_requests() {
    let counter = Counter::default();
    let app = app(
        &counter,
        layer().with_fingerprint_headers([http::HeaderName::from_static("x-account")]),
    );
    let with_account = |account: &'static str| {
        Request::post("/book")
            .header("authorization", common::AUTH)
            .header("idempotency-key", "k5")
            .header("x-account", account)
            .body(Body::from("x"))
            .unwrap()
    };
    body_bytes(app.clone().oneshot(with_account("a")).await.unwrap()).await;
    let (_, code, _) = problem(app.oneshot(with_account("b")).await.unwrap()).await;
    assert_eq!(code, "key-reused");
}

#[tokio::test]
async fn scopes_keep_callers_apart() {
    let counter = Counter::default();
    let app = app(&counter, layer());
    let as_user = |auth: &'static str| {
        Request::post("/book")
            .header("idempotency-key", "same-key")
            .header("authorization", auth)
            .body(Body::from("x"))
            .unwrap()
    };
    let alice = app.clone().oneshot(as_user("Bearer alice")).await.unwrap();
    assert_eq!(
        alice.extensions().get::<Outcome>(),
        Some(&Outcome::Executed)
    );
    body_bytes(alice).await;
    let bob = app.clone().oneshot(as_user("Bearer bob")).await.unwrap();
    assert_eq!(bob.extensions().get::<Outcome>(), Some(&Outcome::Executed));
    body_bytes(bob).await;
    let alice_again = app.oneshot(as_user("Bearer alice")).await.unwrap();
    assert_eq!(alice_again.headers()["x-execution"], "1");
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn custom_scope_reads_extensions() {
    #[derive(Clone)]
    struct Tenant(&'static str);
    let counter = Counter::default();
    let layer = layer().with_scope(|parts: &http::request::Parts| {
        Some(Scope::new(
            parts.extensions.get::<Tenant>().map_or("none", |t| t.0),
        ))
    });
    let app = app(&counter, layer);
    for tenant in ["t1", "t2", "t1"] {
        let mut req = post_with_key("k6", "x");
        req.extensions_mut().insert(Tenant(tenant));
        body_bytes(app.clone().oneshot(req).await.unwrap()).await;
    }
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn unprotected_methods_pass_through_and_methods_are_configurable() {
    let counter = Counter::default();
    let c = counter.clone();
    let router = Router::new().route(
        "/book",
        axum::routing::put(move || {
            let c = c.clone();
            async move { c.hit().to_string() }
        }),
    );
    let req = || {
        Request::put("/book")
            .header("authorization", common::AUTH)
            .header("idempotency-key", "k7")
            .body(Body::empty())
            .unwrap()
    };
    let default = router.clone().layer(layer());
    body_bytes(default.clone().oneshot(req()).await.unwrap()).await;
    body_bytes(default.oneshot(req()).await.unwrap()).await;
    assert_eq!(counter.get(), 2, "PUT is not protected by default");

    let with_put = router.layer(layer().with_methods([Method::PUT]));
    body_bytes(with_put.clone().oneshot(req()).await.unwrap()).await;
    let retry = with_put.oneshot(req()).await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 3);
}

#[tokio::test]
async fn request_body_over_the_limit_is_413_without_calling_the_handler() {
    let counter = Counter::default();
    let app = app(&counter, layer().with_request_body_limit(8));
    // Announced by Content-Length.
    let (status, code, _) = problem(
        app.clone()
            .oneshot(post_with_key("k8", "123456789"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "body-too-large")
    );
    // Discovered while streaming, with no size announced.
    let chunks = futures_util::stream::iter([
        Ok::<_, Infallible>(Bytes::from_static(b"12345")),
        Ok(Bytes::from_static(b"6789")),
    ]);
    let req = Request::post("/book")
        .header("authorization", common::AUTH)
        .header("idempotency-key", "k9")
        .body(Body::from_stream(chunks))
        .unwrap();
    let (status, code, _) = problem(app.clone().oneshot(req).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "body-too-large")
    );
    // At the limit is fine.
    let ok = app.oneshot(post_with_key("k10", "12345678")).await.unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn unreadable_request_body_is_400_and_nothing_runs() {
    let counter = Counter::default();
    let app = app(&counter, layer());
    let failing = futures_util::stream::iter(vec![
        Ok(Bytes::from_static(b"part")),
        Err(std::io::Error::other("connection reset")),
    ]);
    let req = Request::post("/book")
        .header("authorization", common::AUTH)
        .header("idempotency-key", "k11")
        .body(Body::from_stream(failing))
        .unwrap();
    let (status, code, _) = problem(app.clone().oneshot(req).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "body-unreadable")
    );
    // Nothing was claimed: the same key works for the full request.
    let ok = app.oneshot(post_with_key("k11", "x")).await.unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn large_response_streams_in_full_and_a_retry_gets_410() {
    let counter = Counter::default();
    let c = counter.clone();
    let router = Router::new().route(
        "/export",
        post(move || {
            let c = c.clone();
            async move {
                c.hit();
                (StatusCode::ACCEPTED, vec![b'z'; 4096])
            }
        }),
    );
    let app = router.layer(layer().with_response_body_limit(1024));
    let req = || {
        Request::post("/export")
            .header("authorization", common::AUTH)
            .header("idempotency-key", "k12")
            .body(Body::empty())
            .unwrap()
    };
    let first = app.clone().oneshot(req()).await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    assert_eq!(body_bytes(first).await.len(), 4096);
    let retry = app.oneshot(req()).await.unwrap();
    let (status, code, doc) = problem(retry).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::GONE, "response-not-retained")
    );
    assert!(doc["detail"].as_str().unwrap().contains("202"));
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn retryable_statuses_release_the_key_and_others_are_recorded() {
    for (status, executions) in [
        (StatusCode::SERVICE_UNAVAILABLE, 2),
        (StatusCode::TOO_MANY_REQUESTS, 2),
        (StatusCode::REQUEST_TIMEOUT, 2),
        (StatusCode::INTERNAL_SERVER_ERROR, 1),
        (StatusCode::BAD_REQUEST, 1),
    ] {
        let counter = Counter::default();
        let c = counter.clone();
        let svc = ServiceBuilder::new()
            .layer(layer())
            .service(service_fn(move |_req| {
                c.hit();
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Body::empty())
                            .unwrap(),
                    )
                }
            }));
        for _ in 0..2 {
            let response = svc.clone().oneshot(post_with_key("k", "x")).await.unwrap();
            assert_eq!(response.status(), status);
            body_bytes(response).await;
        }
        assert_eq!(counter.get(), executions, "{status}");
    }
}

#[tokio::test]
async fn record_policy_is_configurable() {
    let counter = Counter::default();
    let c = counter.clone();
    let svc = ServiceBuilder::new()
        .layer(
            layer().with_record_policy(|parts: &http::response::Parts| {
                !parts.status.is_server_error()
            }),
        )
        .service(service_fn(move |_req| {
            c.hit();
            async {
                Ok::<_, Infallible>(Response::builder().status(500).body(Body::empty()).unwrap())
            }
        }));
    for _ in 0..2 {
        body_bytes(svc.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    }
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn service_error_releases_the_key_and_passes_the_error_on() {
    let counter = Counter::default();
    let c = counter.clone();
    let svc = ServiceBuilder::new()
        .layer(layer())
        .service(service_fn(move |_req: Request<_>| {
            let n = c.hit();
            async move {
                if n == 1 {
                    Err("backend down")
                } else {
                    Ok(Response::new(Body::from("ok")))
                }
            }
        }));
    let err = svc
        .clone()
        .oneshot(post_with_key("k", "x"))
        .await
        .unwrap_err();
    assert_eq!(err, "backend down");
    let ok = svc.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(ok.extensions().get::<Outcome>(), Some(&Outcome::Executed));
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn panicking_handler_releases_the_key() {
    let counter = Counter::default();
    let c = counter.clone();
    let store = MemoryStore::default();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store.clone()))
        .service(service_fn(move |_req: Request<_>| {
            let n = c.hit();
            async move {
                assert!(n != 1, "handler bug on first call");
                Ok::<_, Infallible>(Response::new(Body::from("ok")))
            }
        }));
    let panicked = tokio::spawn(svc.clone().oneshot(post_with_key("k", "x"))).await;
    assert!(panicked.unwrap_err().is_panic());
    // The release runs as a task of its own; it is done once the store is
    // empty again.
    while !store.is_empty() {
        tokio::task::yield_now().await;
    }
    let ok = svc.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn store_failures_are_503_and_nothing_executes() {
    for fault in [Fault::Unavailable, Fault::Corrupt, Fault::Full] {
        let counter = Counter::default();
        let store = FaultyStore::new(MemoryStore::default());
        store.set_fault(Op::Claim, Some(fault));
        let app = booking_router(counter.clone()).layer(IdempotencyLayer::new(store.clone()));
        let response = app.oneshot(post_with_key("k", "x")).await.unwrap();
        assert!(response.headers().contains_key("retry-after"));
        let (status, code, _) = problem(response).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "store-unavailable"),
            "{fault:?}"
        );
        assert_eq!(counter.get(), 0, "{fault:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn stalled_store_times_out_with_503() {
    let counter = Counter::default();
    let store = FaultyStore::new(MemoryStore::default());
    store.set_fault(Op::Claim, Some(Fault::Stall));
    let app = booking_router(counter.clone())
        .layer(IdempotencyLayer::new(store).with_store_timeout(Duration::from_millis(200)));
    let response = app.oneshot(post_with_key("k", "x")).await.unwrap();
    let (status, code, doc) = problem(response).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "store-unavailable")
    );
    assert!(
        !doc["detail"].as_str().unwrap().contains("200ms"),
        "the store's own error stays in the log"
    );
    assert_eq!(counter.get(), 0);
}

#[tokio::test]
async fn fail_open_runs_the_handler_unprotected() {
    let counter = Counter::default();
    let store = FaultyStore::new(MemoryStore::default());
    store.set_fault_all(Some(Fault::Unavailable));
    let app =
        booking_router(counter.clone()).layer(IdempotencyLayer::new(store).with_fail_open(true));
    for _ in 0..2 {
        let response = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(
            response.extensions().get::<Outcome>(),
            Some(&Outcome::FailedOpen)
        );
    }
    assert_eq!(counter.get(), 2, "fail-open gives up protection");
}

#[tokio::test]
async fn completing_into_a_full_store_keeps_the_outcome_without_the_body() {
    let counter = Counter::default();
    let store = FaultyStore::new(MemoryStore::default());
    let app = booking_router(counter.clone()).layer(IdempotencyLayer::new(store.clone()));
    // The first complete fails as Full; the layer completes again without the
    // body, so the retry learns the outcome and nothing runs twice.
    store.set_fault_once(Op::Complete, Fault::Full);
    body_bytes(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    let (status, code, _) = problem(app.oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::GONE, "response-not-retained")
    );
    assert_eq!(store.calls(Op::Complete), 2);
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn rejections_can_be_replaced() {
    let counter = Counter::default();
    let layer = layer()
        .with_required_key(true)
        .with_rejection_response(|rejection: &Rejection| {
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/grpc")
                .header("grpc-status", "3")
                .header("grpc-message", rejection.kind().code())
                .body(Bytes::new())
                .unwrap()
        });
    let app = app(&counter, layer);
    let response = app
        .oneshot(Request::post("/book").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.headers()["grpc-status"], "3");
    assert_eq!(response.headers()["grpc-message"], "missing-key");
    assert_eq!(
        response.extensions().get::<Outcome>(),
        Some(&Outcome::Rejected(RejectionKind::MissingKey))
    );
}

#[tokio::test]
async fn full_store_of_in_flight_claims_answers_503() {
    let store = MemoryStore::builder().max_entries(1).build();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let (gate, open) = tokio::sync::watch::channel(false);
    let router = Router::new().route(
        "/book",
        post(move || {
            let (tx, mut open) = (started_tx.clone(), open.clone());
            async move {
                tx.send(()).unwrap();
                open.wait_for(|open| *open).await.unwrap();
                "done"
            }
        }),
    );
    let app = router.layer(IdempotencyLayer::new(store.clone()));
    let held = tokio::spawn(app.clone().oneshot(post_with_key("a", "x")));
    started.recv().await.unwrap();
    let (status, code, _) =
        problem(app.clone().oneshot(post_with_key("b", "x")).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "store-unavailable")
    );
    gate.send(true).unwrap();
    body_bytes(held.await.unwrap().unwrap()).await;
    // The completed record may now be evicted to make room.
    let response = app.oneshot(post_with_key("b", "x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// The record is complete by the time the last frame reaches the client, as
/// a server sees it: the body says it has ended, and a retry sent before the
/// body is even dropped is a replay.
#[tokio::test]
async fn the_record_is_complete_when_the_last_frame_goes_out() {
    use http_body::Body as _;
    use http_body_util::BodyExt;
    let counter = Counter::default();
    let app = app(&counter, layer());
    let first = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    let mut body = first.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "booking 1: x");
    assert!(body.is_end_stream(), "a server stops polling here");
    let retry = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(
        retry.extensions().get::<Outcome>(),
        Some(&Outcome::Replayed)
    );
    drop(body);
    assert_eq!(counter.get(), 1);
}

/// A body that is complete at once is recorded before the response head is
/// even returned: a retry sent as soon as the head arrives is a replay.
#[tokio::test]
async fn a_ready_body_is_recorded_before_the_head_goes_out() {
    let counter = Counter::default();
    let app = app(&counter, layer());
    let first = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    let retry = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(
        retry.extensions().get::<Outcome>(),
        Some(&Outcome::Replayed)
    );
    assert_eq!(body_bytes(first).await, "booking 1: x");
    assert_eq!(counter.get(), 1);
}

/// A keyed booking whose body sends `bytes` and then stalls, as a slow or
/// hostile upload does.
fn stalled_upload(key: &str, bytes: usize) -> Request<Body> {
    use futures_util::StreamExt;
    let first = futures_util::stream::iter([Ok::<_, Infallible>(Bytes::from(vec![b'x'; bytes]))]);
    let stalled = first.chain(futures_util::stream::pending());
    Request::post("/book")
        .header("authorization", common::AUTH)
        .header("idempotency-key", key)
        .body(Body::from_stream(stalled))
        .unwrap()
}

/// Stalled uploads hold at most the layer's bound on buffered bytes: past
/// it a keyed request gets 503 `overloaded` and nothing runs; once the
/// uploads are gone, the bytes are free again.
#[tokio::test]
async fn buffered_bodies_are_bounded_across_requests() {
    use futures_util::FutureExt;
    let counter = Counter::default();
    let app = app(&counter, layer().with_max_buffered_bytes(64 * 1024));
    let mut stalled = Vec::new();
    for i in 0..3 {
        let mut upload = Box::pin(
            app.clone()
                .oneshot(stalled_upload(&format!("s{i}"), 20 * 1024)),
        );
        assert!((&mut upload).now_or_never().is_none(), "upload {i} is held");
        stalled.push(upload);
    }
    let refused = app
        .clone()
        .oneshot(stalled_upload("s3", 20 * 1024))
        .await
        .unwrap();
    assert_eq!(
        refused.extensions().get::<Outcome>(),
        Some(&Outcome::Rejected(RejectionKind::Overloaded))
    );
    assert_eq!(refused.headers()["retry-after"], "1");
    let (status, code, _) = problem(refused).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
    );
    drop(stalled);
    let booked = app.oneshot(post_with_key("after", "x")).await.unwrap();
    assert_eq!(booked.status(), StatusCode::CREATED);
    assert_eq!(counter.get(), 1, "only the booking after the uploads ran");
}

/// The bound is on by default: 64 MiB, 64 stalled uploads at the default
/// 1 MiB body limit; the 65th is refused.
#[tokio::test]
async fn buffered_bodies_are_bounded_by_default() {
    use futures_util::FutureExt;
    let counter = Counter::default();
    let app = app(&counter, layer());
    let mut stalled = Vec::new();
    for i in 0..64 {
        let mut upload = Box::pin(
            app.clone()
                .oneshot(stalled_upload(&format!("s{i}"), 1024 * 1024)),
        );
        assert!((&mut upload).now_or_never().is_none(), "upload {i} is held");
        stalled.push(upload);
    }
    let mut one_more = Box::pin(app.clone().oneshot(stalled_upload("s64", 1024 * 1024)));
    let refused = (&mut one_more)
        .now_or_never()
        .expect("refused at once, not held")
        .unwrap();
    let (status, code, _) = problem(refused).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
    );
    assert_eq!(counter.get(), 0);
}

/// The bound holds bytes until the service has taken the body, not until it
/// answers: a slow handler that has read its body does not keep other
/// callers' requests out.
#[tokio::test]
async fn a_body_the_service_has_taken_no_longer_counts() {
    use futures_util::FutureExt;
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let read = Counter::default();
    let (g, r) = (gate.clone(), read.clone());
    let router = Router::new().route(
        "/book",
        post(move |body: Bytes| {
            let (g, r) = (g.clone(), r.clone());
            async move {
                drop(body);
                r.hit();
                g.notified().await;
                (StatusCode::CREATED, "booked")
            }
        }),
    );
    let app = router.layer(layer().with_max_buffered_bytes(64 * 1024));
    let big = || {
        Request::post("/book")
            .header("authorization", common::AUTH)
            .header("idempotency-key", format!("k-{}", uuid_like()))
            .body(Body::from(vec![b'x'; 60 * 1024]))
            .unwrap()
    };
    let mut slow = Box::pin(app.clone().oneshot(big()));
    assert!(
        (&mut slow).now_or_never().is_none(),
        "the first is held in its handler"
    );
    assert_eq!(read.get(), 1, "its handler has read the body");
    let mut second = Box::pin(app.clone().oneshot(big()));
    assert!(
        (&mut second).now_or_never().is_none(),
        "the second runs too"
    );
    assert_eq!(read.get(), 2, "not refused as overloaded");
    gate.notify_waiters();
    assert_eq!(slow.await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(second.await.unwrap().status(), StatusCode::CREATED);
}

/// A key of its own for each call.
fn uuid_like() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
