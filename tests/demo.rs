//! The demo server, exercised over TCP as a new user would with curl.

#[allow(dead_code)]
#[path = "../examples/booking_server.rs"]
mod demo;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn start() -> (String, HttpClient) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let store = tower_idempotency::BoxStore::new(tower_idempotency::MemoryStore::default());
        axum::serve(
            listener,
            demo::app(Some(demo::idempotency(store, None, None))),
        )
        .await
        .unwrap();
    });
    (base, Client::builder(TokioExecutor::new()).build_http())
}

fn book(base: &str, key: Option<&str>, json: &'static str) -> Request<Full<Bytes>> {
    let mut req = Request::post(format!("{base}/appointments"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer ada.v1");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    req.body(Full::new(Bytes::from_static(json.as_bytes())))
        .unwrap()
}

async fn send(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
) -> (StatusCode, http::HeaderMap, serde_json::Value) {
    let response = client.request(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (parts.status, parts.headers, json)
}

async fn rows(base: &str, client: &HttpClient) -> Vec<serde_json::Value> {
    let req = Request::get(format!("{base}/appointments"))
        .body(Full::default())
        .unwrap();
    let (status, _, json) = send(client, req).await;
    assert_eq!(status, StatusCode::OK);
    json.as_array().unwrap().clone()
}

const ADA: &str = r#"{"caller":"ada","slot":"2026-12-01T09:00","provider":"dr-who"}"#;

#[tokio::test]
async fn a_retried_booking_is_stored_once_and_replayed() {
    let (base, client) = start().await;
    let (status, headers, first) = send(&client, book(&base, Some("ada-1"), ADA)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        headers["location"],
        format!("/appointments/{}", first["id"])
    );
    assert_eq!(first["caller"], "ada");

    let (status, headers, again) = send(&client, book(&base, Some("ada-1"), ADA)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(again, first);
    assert_eq!(rows(&base, &client).await.len(), 1);
}

#[tokio::test]
async fn the_demo_requires_keys_and_leaves_bad_json_to_the_handler() {
    let (base, client) = start().await;
    let (status, headers, problem) = send(&client, book(&base, None, ADA)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(problem["code"], "missing-key");

    let (status, _, _) = send(&client, book(&base, Some("bad-json"), "{not json")).await;
    assert!(
        status.is_client_error() && status != StatusCode::CONFLICT,
        "{status}"
    );
    assert!(rows(&base, &client).await.is_empty());
}

#[tokio::test]
async fn concurrent_duplicates_of_a_slow_booking_store_one_row() {
    let (base, client) = start().await;
    const SLOW: &str = r#"{"caller":"bo","slot":"10:00","provider":"dr-no","delay_ms":200}"#;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (client, req) = (client.clone(), book(&base, Some("bo-1"), SLOW));
        tasks.push(tokio::spawn(async move { send(&client, req).await }));
    }
    let mut created = 0;
    for task in tasks {
        let (status, _, _) = task.await.unwrap();
        match status {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert!(created >= 1);
    assert_eq!(rows(&base, &client).await.len(), 1);
}

fn book_as(base: &str, token: Option<&str>, key: &str, json: &'static str) -> Request<Full<Bytes>> {
    let mut req = Request::post(format!("{base}/appointments"))
        .header("content-type", "application/json")
        .header("idempotency-key", key);
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    req.body(Full::new(Bytes::from_static(json.as_bytes())))
        .unwrap()
}

#[tokio::test]
async fn the_demo_authenticates_and_scopes_keys_by_principal() {
    let (base, client) = start().await;
    let (status, headers, problem) = send(&client, book_as(&base, None, "k", ADA)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert_eq!(problem["status"], 401);

    let (status, _, first) = send(&client, book_as(&base, Some("ada.v1"), "k", ADA)).await;
    assert_eq!(status, StatusCode::CREATED);
    // A refreshed token of the same principal: a replay.
    let (status, headers, again) = send(&client, book_as(&base, Some("ada.v2"), "k", ADA)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(again, first);
    // Another principal with the same key and body books for itself.
    let (status, headers, other) = send(&client, book_as(&base, Some("bob.v1"), "k", ADA)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!headers.contains_key("idempotent-replayed"));
    assert_ne!(other["id"], first["id"]);
    assert_eq!(rows(&base, &client).await.len(), 2);
}

/// The first execution stalls past its lease (renewals fail), a retry takes
/// the key over, and the stalled one then books: the take-over finds that
/// row for its intent instead of booking a second time.
#[cfg(feature = "test-util")]
#[tokio::test(start_paused = true)]
async fn a_take_over_finds_the_stalled_executions_booking() {
    use tower::ServiceExt;
    use tower_idempotency::{
        BoxStore, MemoryStore,
        store::{Fault, FaultyStore, Op},
    };
    let store = FaultyStore::new(MemoryStore::default());
    store.set_fault(Op::Renew, Some(Fault::Unavailable));
    let lease = std::time::Duration::from_secs(1);
    let app = demo::app(Some(demo::idempotency(
        BoxStore::new(store),
        None,
        Some(lease),
    )));
    const SLOW: &str = r#"{"caller":"cy","slot":"11:00","provider":"dr-x","delay_ms":3000}"#;
    let stalled = tokio::spawn(
        app.clone()
            .oneshot(book_as("", Some("cy.v1"), "cy-1", SLOW)),
    );
    // The first execution is in its delay; its lease lapses unrenewed.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let retry = tokio::spawn(
        app.clone()
            .oneshot(book_as("", Some("cy.v1"), "cy-1", SLOW)),
    );
    let first = stalled.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let second = retry.await.unwrap().unwrap();
    assert_eq!(second.status(), StatusCode::CREATED);
    assert!(!second.headers().contains_key("idempotent-replayed"));
    let body = |response: http::Response<axum::body::Body>| async move {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()
    };
    let (first, second) = (body(first).await, body(second).await);
    assert_eq!(first["id"], second["id"], "one booking for the intent");
    let list = app
        .oneshot(Request::get("/appointments").body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(body(list).await.as_array().unwrap().len(), 1);
}
