//! The layer's metrics through the `metrics` facade, read back from a
//! debugging recorder.

mod common;

use std::collections::HashMap;

use axum::{Router, routing::post};
use common::{Counter, body_bytes, post_with_key};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// A metric's name and its labels, sorted.
type Metric = (String, Vec<(String, String)>);

/// Name and sorted labels of each metric, with its value.
fn snapshot(recorder: &DebuggingRecorder) -> HashMap<Metric, DebugValue> {
    recorder
        .snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let mut labels: Vec<_> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            ((key.name().to_owned(), labels), value)
        })
        .collect()
}

fn counter(values: &HashMap<Metric, DebugValue>, name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.sort();
    match values.get(&(name.to_owned(), labels)) {
        Some(DebugValue::Counter(n)) => *n,
        None => 0,
        Some(other) => panic!("{name} is not a counter: {other:?}"),
    }
}

#[test]
fn decisions_and_store_operations_are_counted() {
    let recorder = DebuggingRecorder::new();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let executions = Counter::default();
        let e = executions.clone();
        // The layer inside the router, so the matched route template is the label.
        let app = Router::new().route(
            "/book",
            post(move || {
                let e = e.clone();
                async move { format!("booking {}", e.hit()) }
            })
            .route_layer(
                IdempotencyLayer::new(MemoryStore::builder().max_entries(1).build())
                    .with_required_key(true),
            ),
        );
        for (key, body) in [("k1", "a"), ("k1", "a"), ("k1", "b"), ("k2", "a")] {
            body_bytes(app.clone().oneshot(post_with_key(key, body)).await.unwrap()).await;
        }
        let missing = http::Request::post("/book")
            .header("authorization", common::AUTH)
            .body(axum::body::Body::from("a"))
            .unwrap();
        body_bytes(app.clone().oneshot(missing).await.unwrap()).await;
        assert_eq!(executions.get(), 2);
    });
    let values = snapshot(&recorder);
    let requests = |outcome: &str| {
        counter(
            &values,
            "idempotency_requests_total",
            &[("outcome", outcome), ("route", "/book")],
        )
    };
    assert_eq!(requests("executed"), 2, "{values:#?}");
    assert_eq!(requests("replayed"), 1);
    assert_eq!(requests("key_reused"), 1);
    assert_eq!(requests("missing_key"), 1);
    assert_eq!(
        counter(
            &values,
            "idempotency_records_evicted_live_total",
            &[("store", "memory")]
        ),
        1,
        "k2 evicted k1 from a one-entry store"
    );
    assert!(counter(&values, "idempotency_recorded_bytes_total", &[]) > 0);
    let claims = values.get(&(
        "idempotency_store_operation_duration_seconds".to_owned(),
        vec![
            ("operation".to_owned(), "claim".to_owned()),
            ("store".to_owned(), "memory".to_owned()),
        ],
    ));
    match claims {
        Some(DebugValue::Histogram(samples)) => assert_eq!(samples.len(), 4, "one per claim"),
        other => panic!("claim latency: {other:?}"),
    }
    assert!(
        values
            .keys()
            .all(|(_, labels)| labels.iter().all(|(_, v)| !v.contains("k1"))),
        "never the key"
    );
}
