//! Whose record is whose: scopes by principal and credential, the anonymous
//! policy, and fingerprints that never cross hosts or routes.

mod common;

#[cfg(feature = "axum")]
use axum::Router;
use axum::{
    body::Body,
    extract::Request as AxumRequest,
    middleware::{self, Next},
    response::Response as AxumResponse,
};
use common::{Counter, body_bytes, booking_router, problem};
use http::{Request, StatusCode, header};
use tower::ServiceExt;
use tower_idempotency::{
    Anonymous, DefaultScope, IdempotencyLayer, MemoryStore, Outcome, Principal,
};

/// An app that authenticates with a session cookie (`session=<user>`), as
/// many do: no `Authorization` header anywhere.
async fn cookie_auth(mut req: AxumRequest, next: Next) -> AxumResponse {
    let user = req
        .headers()
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("session="))
        .map(str::to_owned);
    if let Some(user) = user {
        req.extensions_mut().insert(Principal::new(user));
    }
    next.run(req).await
}

/// An app that maps bearer tokens to principals: `alice.v1` and `alice.v2`
/// are two tokens of `alice`.
async fn token_auth(mut req: AxumRequest, next: Next) -> AxumResponse {
    let user = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|token| token.split('.').next())
        .map(str::to_owned);
    if let Some(user) = user {
        req.extensions_mut().insert(Principal::new(user));
    }
    next.run(req).await
}

fn request(
    key: &str,
    header: Option<(header::HeaderName, &str)>,
    body: &'static str,
) -> Request<Body> {
    let mut req = Request::post("/book").header("idempotency-key", key);
    if let Some((name, value)) = header {
        req = req.header(name, value);
    }
    req.body(Body::from(body)).unwrap()
}

#[tokio::test]
async fn a_caller_who_sends_anothers_key_and_body_never_gets_their_response() {
    let counter = Counter::default();
    let app = booking_router(counter.clone())
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .layer(middleware::from_fn(cookie_auth));
    let as_user = |user: &str| {
        request(
            "pay-1",
            Some((header::COOKIE, &format!("session={user}"))),
            "100 EUR to Bob",
        )
    };

    let alice = app.clone().oneshot(as_user("alice")).await.unwrap();
    assert_eq!(
        alice.extensions().get::<Outcome>(),
        Some(&Outcome::Executed)
    );
    let alice_body = body_bytes(alice).await;

    let mallory = app.clone().oneshot(as_user("mallory")).await.unwrap();
    assert_eq!(
        mallory.extensions().get::<Outcome>(),
        Some(&Outcome::Executed),
        "Mallory's request is her own, not a replay of Alice's"
    );
    assert!(!mallory.headers().contains_key("idempotent-replayed"));
    assert_ne!(body_bytes(mallory).await, alice_body);

    let alice_again = app.oneshot(as_user("alice")).await.unwrap();
    assert_eq!(alice_again.headers()["idempotent-replayed"], "true");
    assert_eq!(body_bytes(alice_again).await, alice_body);
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn a_retry_with_a_refreshed_token_of_the_same_principal_replays() {
    let counter = Counter::default();
    let app = booking_router(counter.clone())
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .layer(middleware::from_fn(token_auth));
    let with_token = |token: &str| {
        request(
            "pay-2",
            Some((header::AUTHORIZATION, &format!("Bearer {token}"))),
            "100 EUR",
        )
    };
    let first = app.clone().oneshot(with_token("alice.v1")).await.unwrap();
    let first_body = body_bytes(first).await;
    let refreshed = app.clone().oneshot(with_token("alice.v2")).await.unwrap();
    assert_eq!(refreshed.headers()["idempotent-replayed"], "true");
    assert_eq!(body_bytes(refreshed).await, first_body);
    let bob = app.oneshot(with_token("bob.v1")).await.unwrap();
    assert!(!bob.headers().contains_key("idempotent-replayed"));
    assert_eq!(counter.get(), 2, "one execution for Alice, one for Bob");
}

#[tokio::test]
async fn a_credential_scope_without_an_auth_layer_keeps_callers_apart_with_a_secret_too() {
    let counter = Counter::default();
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_scope(DefaultScope::new().with_secret("a server secret of 32 bytes or more"));
    let app = booking_router(counter.clone()).layer(layer);
    let as_user = |token: &str| request("k", Some((header::AUTHORIZATION, token)), "x");
    for token in ["Bearer a", "Bearer b", "Bearer a"] {
        body_bytes(app.clone().oneshot(as_user(token)).await.unwrap()).await;
    }
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn anonymous_keyed_requests_are_rejected_by_default() {
    let counter = Counter::default();
    let app = booking_router(counter.clone()).layer(IdempotencyLayer::new(MemoryStore::default()));
    let response = app.clone().oneshot(request("k", None, "x")).await.unwrap();
    assert_eq!(
        response.extensions().get::<Outcome>(),
        Some(&Outcome::Rejected(
            tower_idempotency::RejectionKind::AnonymousRequest
        ))
    );
    let (status, code, doc) = problem(response).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "anonymous-request")
    );
    assert!(
        doc["type"]
            .as_str()
            .unwrap()
            .ends_with("#anonymous-request")
    );
    assert_eq!(
        counter.get(),
        0,
        "nothing runs for an anonymous keyed request"
    );

    // Without a key, an anonymous request is not the layer's business.
    let unkeyed = Request::post("/book").body(Body::from("x")).unwrap();
    assert_eq!(
        app.oneshot(unkeyed).await.unwrap().status(),
        StatusCode::CREATED
    );
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn the_same_key_and_body_on_two_hosts_is_not_a_replay() {
    let counter = Counter::default();
    let app = booking_router(counter.clone())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_anonymous(Anonymous::Shared));
    let on_host = |host: &str| {
        Request::post("/book")
            .header("host", host)
            .header("idempotency-key", "k")
            .body(Body::from("x"))
            .unwrap()
    };
    body_bytes(
        app.clone()
            .oneshot(on_host("shop-a.example"))
            .await
            .unwrap(),
    )
    .await;
    let other = app
        .clone()
        .oneshot(on_host("shop-b.example"))
        .await
        .unwrap();
    let (status, code, _) = problem(other).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "key-reused")
    );
    // The host's case does not matter.
    let same = app.oneshot(on_host("SHOP-A.example")).await.unwrap();
    assert_eq!(same.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 1);
}

/// axum's `nest` strips the prefix; the `axum` feature reads the full path
/// from `OriginalUri`.
#[cfg(feature = "axum")]
#[tokio::test]
async fn the_same_key_and_body_on_two_nested_routes_is_not_a_replay() {
    let counter = Counter::default();
    let store = MemoryStore::default();
    let layer = IdempotencyLayer::new(store).with_anonymous(Anonymous::Shared);
    // Both nested routers see the path `/book`: the prefix is stripped.
    let app = Router::new()
        .nest(
            "/payments",
            booking_router(counter.clone()).layer(layer.clone()),
        )
        .nest("/refunds", booking_router(counter.clone()).layer(layer));
    let to = |path: &str| {
        Request::post(path)
            .header("idempotency-key", "k")
            .body(Body::from("100 EUR"))
            .unwrap()
    };
    body_bytes(app.clone().oneshot(to("/payments/book")).await.unwrap()).await;
    let refund = app.clone().oneshot(to("/refunds/book")).await.unwrap();
    let (status, code, _) = problem(refund).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "key-reused")
    );
    let retry = app.oneshot(to("/payments/book")).await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(counter.get(), 1);
}
