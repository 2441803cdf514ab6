//! The layer behind a real HTTP/1 server on loopback: clients that go away
//! mid-request and mid-response, and many clients racing on one key.

mod common;

use std::{sync::Arc, time::Duration};

use axum::{Router, routing::post};
use bytes::Bytes;
use common::Counter;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, watch},
    task::JoinHandle,
};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// Serves `app` on a loopback port; each accepted connection's task handle is
/// sent on the returned channel, so a test can wait for the server to be
/// done with a connection.
async fn serve(
    app: Router,
) -> (
    std::net::SocketAddr,
    mpsc::UnboundedReceiver<JoinHandle<()>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = TowerToHyperService::new(app.clone());
            let connection = tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            if tx.send(connection).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: std::net::SocketAddr) -> (Sender, JoinHandle<()>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, driver)
}

fn booking(key: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post("/book")
        .header("host", "localhost")
        .header("authorization", "Bearer tcp")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// A handler that says when it has started and then waits for the gate.
fn gated_router(
    counter: Counter,
    started: mpsc::UnboundedSender<()>,
    gate: watch::Receiver<bool>,
) -> Router {
    Router::new().route(
        "/book",
        post(move |body: Bytes| {
            let (counter, started, mut gate) = (counter.clone(), started.clone(), gate.clone());
            async move {
                let _ = started.send(());
                gate.wait_for(|open| *open).await.unwrap();
                let n = counter.hit();
                (
                    StatusCode::CREATED,
                    format!("booking {n}: {}", String::from_utf8_lossy(&body)),
                )
            }
        }),
    )
}

/// The seed story: the client gives up while the handler runs; the server
/// finishes the work anyway and records it; the retry replays it and the
/// booking happens once.
#[tokio::test]
async fn client_that_disconnects_mid_request_gets_a_replay_on_retry() {
    let counter = Counter::default();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (gate, gate_rx) = watch::channel(false);
    let layer = IdempotencyLayer::new(MemoryStore::default()).with_wait(Duration::from_secs(30));
    let (addr, mut connections) =
        serve(gated_router(counter.clone(), started_tx, gate_rx).layer(layer)).await;

    let (mut sender, driver) = connect(addr).await;
    let pending =
        tokio::spawn(async move { sender.send_request(booking("seed", "dr who, 9:00")).await });
    started.recv().await.unwrap();
    // The client times out: it drops the request and the connection.
    pending.abort();
    driver.abort();
    // Wait until the server has noticed and dropped the connection, and with
    // it the response future.
    let server_side = connections.recv().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), server_side)
        .await
        .expect("server should close the connection")
        .unwrap();
    assert_eq!(counter.get(), 0, "the handler is still waiting");

    // The work completes after the client has gone.
    gate.send(true).unwrap();

    let (mut sender, _driver) = connect(addr).await;
    let retry = sender
        .send_request(booking("seed", "dr who, 9:00"))
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let body = retry.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"booking 1: dr who, 9:00");
    assert_eq!(counter.get(), 1);
}

/// The client reads the head and the first chunk, then goes away: the rest
/// of the body is drained and recorded, and the retry replays all of it.
#[tokio::test]
async fn client_that_disconnects_mid_body_gets_the_whole_body_on_retry() {
    let counter = Counter::default();
    let (router, gate) = common::gated_stream_router(&counter);
    let layer = IdempotencyLayer::new(MemoryStore::default()).with_wait(Duration::from_secs(30));
    let (addr, mut connections) = serve(router.layer(layer)).await;

    let (mut sender, driver) = connect(addr).await;
    let response = sender.send_request(booking("stream", "")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"head;");
    drop(body);
    driver.abort();
    let server_side = connections.recv().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), server_side)
        .await
        .expect("server should close the connection")
        .unwrap();

    gate.send(true).unwrap();
    let (mut sender, _driver) = connect(addr).await;
    let retry = sender.send_request(booking("stream", "")).await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let body = retry.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"head;tail");
    assert_eq!(counter.get(), 1);
}

/// 64 clients on 64 connections send the same request with the same key at
/// once: the handler runs exactly once; every other client gets 409 or the
/// replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_racing_clients_execute_once() {
    const CLIENTS: usize = 64;
    let counter = Counter::default();
    let (started_tx, _started) = mpsc::unbounded_channel();
    let (gate, gate_rx) = watch::channel(false);
    let layer = IdempotencyLayer::new(MemoryStore::default());
    let (addr, _connections) =
        serve(gated_router(counter.clone(), started_tx, gate_rx).layer(layer)).await;

    let ready = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let answered = Arc::new(Semaphore::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (ready, answered) = (ready.clone(), answered.clone());
        clients.push(tokio::spawn(async move {
            let (mut sender, _driver) = connect(addr).await;
            ready.wait().await;
            let response = sender
                .send_request(booking("race", "one slot"))
                .await
                .unwrap();
            answered.add_permits(1);
            let status = response.status();
            let replayed = response.headers().contains_key("idempotent-replayed");
            response.into_body().collect().await.unwrap();
            (status, replayed)
        }));
    }
    // Every client but the one executing is answered (409) while the handler
    // is held at the gate; then it may finish.
    let _ = answered.acquire_many(CLIENTS as u32 - 1).await.unwrap();
    gate.send(true).unwrap();
    let mut created = 0;
    let mut conflicts = 0;
    for client in clients {
        match client.await.unwrap() {
            (StatusCode::CREATED, false) => created += 1,
            (StatusCode::CONFLICT, _) => conflicts += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!((created, conflicts), (1, CLIENTS - 1));
    assert_eq!(counter.get(), 1);
}

/// A response with a known length is recorded before its last byte goes
/// out: a retry sent the moment the first response has been read is a
/// replay, never a 409.
#[tokio::test]
async fn a_retry_right_after_the_response_is_a_replay() {
    let counter = Counter::default();
    let app = common::booking_router(counter.clone())
        .layer(IdempotencyLayer::new(MemoryStore::default()));
    let (addr, _connections) = serve(app).await;
    let (mut sender, _driver) = connect(addr).await;
    for round in 0..20 {
        let key = format!("quick-{round}");
        let first = sender.send_request(booking(&key, "x")).await.unwrap();
        assert!(first.headers().contains_key("content-length"));
        first.into_body().collect().await.unwrap();
        let retry = sender.send_request(booking(&key, "x")).await.unwrap();
        assert_eq!(retry.status(), StatusCode::CREATED, "round {round}");
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        retry.into_body().collect().await.unwrap();
    }
    assert_eq!(counter.get(), 20);
}
