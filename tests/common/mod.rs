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

pub fn post_with_key(key: &str, body: &'static str) -> Request<Body> {
    Request::post("/book")
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
