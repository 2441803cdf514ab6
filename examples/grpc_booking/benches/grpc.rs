//! One unary `Book` call over loopback TCP through the tonic client: the
//! demo's service bare, and behind the idempotency layer (memory store),
//! measured in the same run.
//!
//! `cargo bench -p grpc_booking`

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use grpc_booking::{
    Bookings, authenticate, idempotency,
    proto::{BookRequest, bookings_client::BookingsClient, bookings_server::BookingsServer},
};
use tokio::net::TcpListener;
use tonic::transport::{Channel, server::TcpIncoming};
use tower_idempotency::MemoryStore;

fn request(key: Option<&str>) -> tonic::Request<BookRequest> {
    let mut request = tonic::Request::new(BookRequest {
        caller: "ada".into(),
        slot: "2026-12-01T09:00".into(),
        provider: "dr-who".into(),
        delay_ms: 0,
    });
    let metadata = request.metadata_mut();
    metadata.insert("authorization", "Bearer bench.v1".parse().unwrap());
    if let Some(key) = key {
        metadata.insert("idempotency-key", key.parse().unwrap());
    }
    request
}

async fn client(addr: std::net::SocketAddr) -> BookingsClient<Channel> {
    BookingsClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn unary(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (bare, protected) = rt.block_on(async {
        let bare_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let protected_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (bare_addr, protected_addr) = (
            bare_listener.local_addr().unwrap(),
            protected_listener.local_addr().unwrap(),
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(tower::util::MapRequestLayer::new(authenticate))
                .add_service(BookingsServer::new(Bookings::default()))
                .serve_with_incoming(TcpIncoming::from(bare_listener).with_nodelay(Some(true))),
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(tower::util::MapRequestLayer::new(authenticate))
                .layer(idempotency(MemoryStore::default()))
                .add_service(BookingsServer::new(Bookings::default()))
                .serve_with_incoming(
                    TcpIncoming::from(protected_listener).with_nodelay(Some(true)),
                ),
        );
        (client(bare_addr).await, client(protected_addr).await)
    });

    let mut group = c.benchmark_group("grpc/unary Book");
    group.bench_function("bare tonic service", |b| {
        b.to_async(&rt).iter(|| {
            let mut client = bare.clone();
            async move { client.book(request(None)).await.unwrap() }
        })
    });
    let next = AtomicU64::new(0);
    group.bench_function("protected, first execution", |b| {
        b.to_async(&rt).iter(|| {
            let mut client = protected.clone();
            let key = format!("bench-{}", next.fetch_add(1, Ordering::Relaxed));
            async move { client.book(request(Some(&key))).await.unwrap() }
        })
    });
    rt.block_on(protected.clone().book(request(Some("recorded"))))
        .unwrap();
    group.bench_function("protected, replay", |b| {
        b.to_async(&rt).iter(|| {
            let mut client = protected.clone();
            async move { client.book(request(Some("recorded"))).await.unwrap() }
        })
    });
    group.finish();
}

/// A unary `Book` as the HTTP/2 request the tonic client sends.
fn http_request(key: Option<&str>) -> http::Request<tonic::body::Body> {
    use prost::Message;
    let message = BookRequest {
        caller: "ada".into(),
        slot: "2026-12-01T09:00".into(),
        provider: "dr-who".into(),
        delay_ms: 0,
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let mut request = http::Request::post(grpc_booking::BOOK)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", "Bearer bench.v1");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request
        .body(tonic::body::Body::new(http_body_util::Full::new(
            bytes::Bytes::from(framed),
        )))
        .unwrap()
}

/// The same call without the network: the tonic service called in
/// process, bare and behind the layer, its response body read to the end.
fn in_process(c: &mut Criterion) {
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let routes = tonic::service::Routes::new(BookingsServer::new(Bookings::default()));
    let bare = tower::util::MapRequestLayer::new(authenticate).layer(routes.clone());
    let protected = tower::util::MapRequestLayer::new(authenticate)
        .layer(idempotency(MemoryStore::default()).layer(routes));
    let mut group = c.benchmark_group("grpc/unary Book, in process");
    group.bench_function("bare tonic service", |b| {
        b.to_async(&rt).iter(|| {
            let svc = bare.clone();
            async move {
                let response = svc.oneshot(http_request(None)).await.unwrap();
                response.into_body().collect().await.unwrap()
            }
        })
    });
    let next = AtomicU64::new(0);
    group.bench_function("protected, first execution", |b| {
        b.to_async(&rt).iter(|| {
            let svc = protected.clone();
            let key = format!("bench-{}", next.fetch_add(1, Ordering::Relaxed));
            async move {
                let response = svc.oneshot(http_request(Some(&key))).await.unwrap();
                response.into_body().collect().await.unwrap()
            }
        })
    });
    group.finish();
}

criterion_group!(benches, unary, in_process);
criterion_main!(benches);
