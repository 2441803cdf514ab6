//! The retrying client's own cost per request: `RetryLayer` over a service
//! that answers at once, against the bare service, one request at a time.
//! With `learnt`, the attempt timeout is learnt per endpoint too.
//!
//! `cargo bench --bench client`

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt, service_fn};
use tower_idempotency::client::RetryLayer;

fn request() -> Request<Full<Bytes>> {
    Request::post("http://127.0.0.1:3000/bookings")
        .header("idempotency-key", "e7164c52a3bb021a8bc9b437ea0fb882")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"slot":"09:00"}"#)))
        .unwrap()
}

fn answer(
    _req: Request<Full<Bytes>>,
) -> std::future::Ready<Result<Response<Full<Bytes>>, std::io::Error>> {
    std::future::ready(Ok(Response::builder()
        .status(201)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"id":1}"#)))
        .unwrap()))
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("client");
    group.bench_function("bare", |b| {
        let service = service_fn(answer);
        b.to_async(&runtime).iter(|| async {
            let response = service.oneshot(request()).await.unwrap();
            response.into_body().collect().await.unwrap()
        });
    });
    group.bench_function("retry_layer", |b| {
        let service = RetryLayer::new().layer(service_fn(answer));
        b.to_async(&runtime).iter(|| async {
            let response = service.clone().oneshot(request()).await.unwrap();
            response.into_body().collect().await.unwrap()
        });
    });
    group.bench_function("retry_layer_learnt", |b| {
        let service = RetryLayer::new()
            .with_learnt_timeout(tower_idempotency::client::LearntTimeout::new())
            .layer(service_fn(answer));
        b.to_async(&runtime).iter(|| async {
            let response = service.clone().oneshot(request()).await.unwrap();
            response.into_body().collect().await.unwrap()
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
