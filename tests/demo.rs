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
