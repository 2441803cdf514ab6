//! Bytes the in-memory store holds per recorded entry beyond the key and the
//! response itself, counted by a heap profiler (not timed).
//!
//! `cargo bench --bench memory`

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{ServiceExt, service_fn};
use tower_idempotency::{
    Fingerprint, IdempotencyLayer, MemoryStore, Store,
    store::{Claim, RecordKey},
};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const ENTRIES: usize = 20_000;

fn heap() -> usize {
    dhat::HeapStats::get().curr_bytes
}

/// Records straight into the store: the store's own cost per entry.
async fn store_overhead(record_len: usize) -> f64 {
    let store = MemoryStore::builder().max_entries(ENTRIES + 1).build();
    let keys: Vec<RecordKey> = (0..ENTRIES)
        .map(|i| RecordKey::new("", &format!("key-{i:032}")))
        .collect();
    let records: Vec<Bytes> = (0..ENTRIES)
        .map(|_| Bytes::from(vec![1u8; record_len]))
        .collect();
    let key_bytes: usize = keys.iter().map(|k| k.as_str().len()).sum();
    let before = heap();
    for (key, record) in keys.iter().zip(records) {
        let Ok(Claim::Acquired { token, .. }) = store
            .claim(
                key,
                Fingerprint::from_bytes([0; 32]),
                Duration::from_secs(30),
            )
            .await
        else {
            panic!("claim failed");
        };
        store
            .complete(key, token, record, Duration::from_secs(3600))
            .await
            .unwrap();
    }
    // The records and keys were allocated before `before` and now live in the
    // store: what grew is the store's bookkeeping.
    let grown = heap() - before;
    let _ = key_bytes;
    drop(keys);
    grown as f64 / ENTRIES as f64
}

/// Records through the layer: a 1 KiB response with two headers.
async fn layer_overhead() -> f64 {
    let store = MemoryStore::builder().max_entries(ENTRIES + 1).build();
    let svc = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store.clone()))
        .service(service_fn(
            |_req: Request<tower_idempotency::RequestBody<Full<Bytes>>>| async {
                let mut response = Response::new(Full::new(Bytes::from(vec![b'r'; 1024])));
                response
                    .headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                response
                    .headers_mut()
                    .insert("location", "/appointments/12345".parse().unwrap());
                Ok::<_, std::convert::Infallible>(response)
            },
        ));
    let before = heap();
    let mut payload = 0;
    for i in 0..ENTRIES {
        let key = format!("key-{i:032}");
        payload += key.len() + 2 /* scope prefix "0:" */ + 1024 + "content-type".len() + "application/json".len()
            + "location".len() + "/appointments/12345".len();
        let req = Request::post("/book")
            .header("idempotency-key", key)
            .header("authorization", "Bearer bench")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let response = svc.clone().oneshot(req).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(store.len(), ENTRIES);
    (heap() - before - payload) as f64 / ENTRIES as f64
}

fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for record_len in [0, 1024] {
            let per_entry = store_overhead(record_len).await;
            println!("memory store: {per_entry:.0} bytes per entry held beyond its key and a {record_len}-byte record");
        }
        let per_entry = layer_overhead().await;
        println!(
            "layer + memory store: {per_entry:.0} bytes per recorded response beyond its key, headers and 1 KiB body"
        );
    });
}
