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

criterion_group!(benches, unary);
criterion_main!(benches);
