//! The warning about the shared anonymous scope, in a test binary of its
//! own: tracing caches each callsite's interest process-wide, and tests on
//! other threads setting and dropping their own subscribers could leave the
//! warning's callsite cached as uninterested while this test's subscriber
//! is set.

mod common;

use axum::body::Body;
use common::{Captured, Counter, body_bytes, booking_router};
use http::Request;
use http::StatusCode;
use tower::ServiceExt;
use tower_idempotency::{Anonymous, IdempotencyLayer, MemoryStore};

fn request(key: &str) -> Request<Body> {
    Request::post("/book")
        .header("idempotency-key", key)
        .body(Body::from("x"))
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn the_shared_anonymous_scope_is_explicit_and_warned_about_once() {
    let captured = Captured::default();
    let _guard = tracing::subscriber::set_default(captured.subscriber(tracing::Level::WARN));

    let counter = Counter::default();
    let app = booking_router(counter.clone())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_anonymous(Anonymous::Shared));
    let first = app.clone().oneshot(request("k")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    body_bytes(first).await;
    for _ in 0..3 {
        let again = app.clone().oneshot(request("k")).await.unwrap();
        assert_eq!(again.headers()["idempotent-replayed"], "true");
    }
    assert_eq!(counter.get(), 1);
    let log = captured.text();
    assert_eq!(
        log.matches("with_anonymous(Anonymous::Shared)").count(),
        1,
        "one warning naming the setting: {log}"
    );
}
