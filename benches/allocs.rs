//! Heap allocations the layer makes per request on the memory store,
//! counted (not timed) beside the bare handler in the same run: a first
//! execution at the store's bound (so eviction is included), a replay, and
//! the pass-through of a GET and of a POST without a key. Each is held to
//! its budget below (also in the README): the run fails when a path
//! allocates more than its budget, so a change that adds an allocation to
//! the request path shows here first.
//!
//! `cargo bench --bench allocs`; `ALLOCS_PROFILE=first` (or `replay`)
//! instead writes `dhat-heap.json`, every allocation site of 2 000 such
//! requests with its stack, for `dh_view.html` or a script.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::Service;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

mod common;

use common::{get, handler, post, run};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Requests counted per path, after as many to warm up.
const ROUNDS: u64 = 2_000;

/// The store's bound: the first executions evict from the warm-up on.
const MAX_ENTRIES: usize = 500;

/// The most allocations the layer may add to one request of each path,
/// beyond what the bare handler's request makes.
const BUDGET: &[(&str, u64)] = &[
    ("first execution", 22),
    ("replay", 13),
    ("GET pass-through", 0),
    ("POST without a key", 0),
];

/// Allocations and bytes per request of `make` through `svc`, after a warm
/// up of as many.
async fn per_request<S, B>(svc: &S, mut make: impl FnMut(u64) -> Request<Full<Bytes>>) -> (f64, f64)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    for i in 0..ROUNDS {
        run(svc, make(i)).await;
    }
    let before = dhat::HeapStats::get();
    for i in ROUNDS..2 * ROUNDS {
        run(svc, make(i)).await;
    }
    let after = dhat::HeapStats::get();
    (
        (after.total_blocks - before.total_blocks) as f64 / ROUNDS as f64,
        (after.total_bytes - before.total_bytes) as f64 / ROUNDS as f64,
    )
}

/// Every allocation site of 2 000 requests of one path, with its stack.
fn profile(path: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = MemoryStore::builder().max_entries(MAX_ENTRIES).build();
        let layered = tower::ServiceBuilder::new()
            .layer(IdempotencyLayer::new(store))
            .service(handler());
        let keys: Vec<String> = (0..3_000).map(|i| format!("first-{i:012}")).collect();
        for key in &keys[..1_000] {
            run(&layered, post(Some(key))).await;
        }
        run(&layered, post(Some("recorded"))).await;
        let _profiler = dhat::Profiler::new_heap();
        for key in &keys[1_000..] {
            let key = if path == "replay" { "recorded" } else { key };
            run(&layered, post(Some(key))).await;
        }
    });
}

fn main() {
    if let Ok(path) = std::env::var("ALLOCS_PROFILE") {
        return profile(&path);
    }
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let over = rt.block_on(async {
        let bare = handler::<Full<Bytes>>();
        let store = MemoryStore::builder().max_entries(MAX_ENTRIES).build();
        let layered = tower::ServiceBuilder::new()
            .layer(IdempotencyLayer::new(store.clone()))
            .service(handler());
        let keys: Vec<String> = (0..2 * ROUNDS).map(|i| format!("first-{i:012}")).collect();
        let mut rows = Vec::new();

        let bare_keyed = per_request(&bare, |_| post(Some("k"))).await;
        let first = per_request(&layered, |i| post(Some(&keys[i as usize]))).await;
        assert!(store.evicted_live() > 0, "the store was not at its bound");
        rows.push(("first execution", first, bare_keyed));
        run(&layered, post(Some("recorded"))).await;
        let replay = per_request(&layered, |_| post(Some("recorded"))).await;
        rows.push(("replay", replay, bare_keyed));
        let bare_get = per_request(&bare, |_| get()).await;
        let layered_get = per_request(&layered, |_| get()).await;
        rows.push(("GET pass-through", layered_get, bare_get));
        let bare_post = per_request(&bare, |_| post(None)).await;
        let layered_post = per_request(&layered, |_| post(None)).await;
        rows.push(("POST without a key", layered_post, bare_post));

        println!(
            "{:<20} {:>12} {:>12} {:>8} {:>12}",
            "path", "allocations", "bare", "budget", "bytes added"
        );
        let mut over = Vec::new();
        for (path, (allocs, bytes), (bare_allocs, bare_bytes)) in rows {
            let added = (allocs - bare_allocs).max(0.0);
            let budget = BUDGET
                .iter()
                .find(|(name, _)| *name == path)
                .map(|(_, budget)| *budget)
                .unwrap();
            println!(
                "{path:<20} {allocs:>12.2} {bare_allocs:>12.2} {budget:>8} {:>12.0}",
                bytes - bare_bytes
            );
            if added > budget as f64 + 0.05 {
                over.push(format!(
                    "{path}: {added:.2} allocations added, budget {budget}"
                ));
            }
        }
        over
    });
    if !over.is_empty() {
        for line in &over {
            eprintln!("over budget: {line}");
        }
        std::process::exit(1);
    }
}
