//! What the layer costs, each figure beside the bare service in the same run.
//!
//! `cargo bench --bench layer`

use std::{
    convert::Infallible,
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt, service_fn};
use tower_idempotency::{Fingerprint, IdempotencyLayer, MemoryStore, Store};

const KIB: &[u8] = &[b'a'; 1024];

/// A trivial handler answering with 1 KiB.
fn handler<B>()
-> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(|_req: Request<B>| async { Ok(Response::new(Full::new(Bytes::from_static(KIB)))) })
}

fn post(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = Request::post("/book").header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    req.body(Full::new(Bytes::from_static(KIB))).unwrap()
}

fn get() -> Request<Full<Bytes>> {
    Request::get("/book").body(Full::default()).unwrap()
}

/// Runs one request to its end, body included (the record completes there).
async fn run<S, B>(svc: &S, req: Request<Full<Bytes>>) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let response = svc.clone().oneshot(req).await.unwrap();
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len()
}

/// The same workload for any store, so every backend is measured alike.
fn bench_store<St: Store + Clone>(c: &mut Criterion, name: &str, store: St) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bare = handler::<Full<Bytes>>();
    let layered = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store))
        .service(handler());

    let mut group = c.benchmark_group(format!("{name}/pass-through"));
    group.bench_function("bare GET", |b| b.to_async(&rt).iter(|| run(&bare, get())));
    group.bench_function("layered GET", |b| {
        b.to_async(&rt).iter(|| run(&layered, get()))
    });
    group.bench_function("bare POST", |b| {
        b.to_async(&rt).iter(|| run(&bare, post(None)))
    });
    group.bench_function("layered POST, no key", |b| {
        b.to_async(&rt).iter(|| run(&layered, post(None)))
    });
    group.finish();

    let mut group = c.benchmark_group(format!("{name}/keyed 1 KiB"));
    let next = AtomicU64::new(0);
    group.bench_function("bare handler", |b| {
        b.to_async(&rt).iter(|| run(&bare, post(Some("k"))))
    });
    group.bench_function("first execution", |b| {
        b.to_async(&rt).iter(|| {
            let key = format!("first-{}", next.fetch_add(1, Ordering::Relaxed));
            run(&layered, post(Some(key.as_str())))
        })
    });
    rt.block_on(run(&layered, post(Some("recorded"))));
    group.bench_function("replay", |b| {
        b.to_async(&rt)
            .iter(|| run(&layered, post(Some("recorded"))))
    });
    group.finish();
}

fn layer(c: &mut Criterion) {
    bench_store(c, "memory", MemoryStore::default());
}

fn fingerprint(c: &mut Criterion) {
    let mut group = c.benchmark_group("fingerprint");
    let (parts, ()) = Request::post("/book?x=1")
        .header("content-type", "application/json")
        .body(())
        .unwrap()
        .into_parts();
    for size in [1024usize, 64 * 1024, 1024 * 1024] {
        let body = vec![7u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("{} KiB", size / 1024), |b| {
            b.iter(|| Fingerprint::compute(black_box(&parts), &[], black_box(&body)))
        });
    }
    group.finish();
}

criterion_group!(benches, layer, fingerprint);
criterion_main!(benches);
