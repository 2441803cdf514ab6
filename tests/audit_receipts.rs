//! Receipts: every audited response carries the log's signed word that its
//! decision is in the chain; the chain, or a proof drawn from it, holds the
//! log to it; a log that drops or changes a decision it gave a receipt for
//! is caught, and a receipt the log did not sign is refused.

mod common;

use std::path::{Path, PathBuf};

use axum::body::Body;
use common::{AUTH, Counter, body_bytes, post_with_key};
use http::{Request, Response, StatusCode};
use tower::ServiceExt;
use tower_idempotency::{
    IdempotencyLayer, MemoryStore,
    audit::{
        AuditLog, AuditSigner, JsonlSink, RECEIPT_HEADER, Receipt, ReceiptError, ReceiptProof,
        Trust, check_receipt, receipt_proof,
    },
};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tower-idempotency-receipts-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn receipt_of<B>(response: &Response<B>) -> Receipt {
    Receipt::from_headers(response.headers())
        .expect("an audited response carries a receipt")
        .expect("the receipt reads")
}

async fn log(path: &Path, signer: &AuditSigner) -> AuditLog {
    AuditLog::builder("api-1", signer.clone())
        .with_receipts()
        .start(JsonlSink::open(path).unwrap())
        .await
        .unwrap()
}

fn trust(signer: &AuditSigner) -> Trust {
    Trust::new().with_key(signer.verifier())
}

#[tokio::test]
async fn every_audited_response_carries_a_receipt_its_entry_holds() {
    let dir = scratch("each");
    let path = dir.join("audit.jsonl");
    let signer = AuditSigner::generate("test-audit").unwrap();
    let audit = log(&path, &signer).await;
    let app = common::booking_router(Counter::default()).layer(
        IdempotencyLayer::new(MemoryStore::default())
            .with_required_key(true)
            .with_audit(audit.clone()),
    );
    let executed = app.clone().oneshot(post_with_key("k1", "x")).await.unwrap();
    assert_eq!(executed.status(), StatusCode::CREATED);
    let executed_receipt = receipt_of(&executed);
    body_bytes(executed).await;
    let replayed = app.clone().oneshot(post_with_key("k1", "x")).await.unwrap();
    let replayed_receipt = receipt_of(&replayed);
    assert!(replayed.headers().contains_key("idempotent-replayed"));
    let reused = app.clone().oneshot(post_with_key("k1", "y")).await.unwrap();
    let reused_receipt = receipt_of(&reused);
    let keyless = Request::post("/book")
        .header("authorization", AUTH)
        .body(Body::from("x"))
        .unwrap();
    let missing = app.clone().oneshot(keyless).await.unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    let missing_receipt = receipt_of(&missing);
    audit.close().await.unwrap();

    let key = signer.verifier();
    let mut ids = Vec::new();
    for (receipt, status, decision) in [
        (&executed_receipt, 201, "executed"),
        (&replayed_receipt, 201, "replayed"),
        (&reused_receipt, reused.status().as_u16(), "key_reused"),
        (&missing_receipt, 400, "missing_key"),
    ] {
        receipt.verify(std::slice::from_ref(&key)).unwrap();
        assert_eq!(receipt.status(), status);
        assert_eq!(receipt.instance(), "api-1");
        ids.push(receipt.id());
        let (chain, found) = check_receipt(&path, &trust(&signer), receipt).unwrap();
        assert!(chain.is_complete());
        let found = found.unwrap();
        assert_eq!(found.decision, decision);
        assert!(found.signed);

        // The same evidence without the log.
        let proof = receipt_proof(&path, &trust(&signer), receipt).unwrap();
        let proof = ReceiptProof::from_json(&proof.to_json()).unwrap();
        proof.verify(receipt, std::slice::from_ref(&key)).unwrap();
        // Another receipt is not proved by it.
        let other = if std::ptr::eq(receipt, &executed_receipt) {
            &replayed_receipt
        } else {
            &executed_receipt
        };
        assert!(proof.verify(other, std::slice::from_ref(&key)).is_err());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "every response has its own receipt");
    assert_eq!(
        executed_receipt.key_hash().as_deref(),
        Some(audit.key_hash("k1").as_str())
    );
    assert_eq!(missing_receipt.key_hash(), None);
}

#[tokio::test]
async fn a_receipt_holds_the_log_to_the_decision_it_promised() {
    let dir = scratch("held");
    let signer = AuditSigner::generate("test-audit").unwrap();
    // The honest chain, and a second one written with the same key and
    // instance that never took the first decision: what a log that drops
    // a decision and signs again looks like.
    let honest_path = dir.join("honest.jsonl");
    let honest = log(&honest_path, &signer).await;
    let app = common::booking_router(Counter::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(honest.clone()));
    let response = app.clone().oneshot(post_with_key("k1", "x")).await.unwrap();
    let kept = receipt_of(&response);
    body_bytes(response).await;
    honest.close().await.unwrap();

    let dropped_path = dir.join("dropped.jsonl");
    let dropped = log(&dropped_path, &signer).await;
    let app = common::booking_router(Counter::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(dropped.clone()));
    body_bytes(app.oneshot(post_with_key("k2", "x")).await.unwrap()).await;
    dropped.close().await.unwrap();

    let (chain, found) = check_receipt(&dropped_path, &trust(&signer), &kept).unwrap();
    assert!(chain.is_complete(), "the chain on its own verifies");
    match found {
        Err(ReceiptError::Broken(why)) => assert!(why.contains("no entry carries"), "{why}"),
        other => panic!("{other:?}"),
    }

    // A receipt changed by its holder (another status) no longer verifies.
    let note = kept.note().replacen("status 201", "status 200", 1);
    let changed = Receipt::parse(&note).unwrap();
    assert_eq!(
        changed.verify(&[signer.verifier()]),
        Err(ReceiptError::Forged)
    );
    let (_, found) = check_receipt(&honest_path, &trust(&signer), &changed).unwrap();
    assert_eq!(found, Err(ReceiptError::Forged));
    // One signed by another key is not this log's.
    let other = AuditSigner::generate("test-audit").unwrap();
    let other_path = dir.join("other.jsonl");
    let other_log = log(&other_path, &other).await;
    let app = common::booking_router(Counter::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(other_log.clone()));
    let foreign = receipt_of(&app.oneshot(post_with_key("k1", "x")).await.unwrap());
    other_log.close().await.unwrap();
    let (_, found) = check_receipt(&honest_path, &trust(&signer), &foreign).unwrap();
    assert_eq!(found, Err(ReceiptError::Forged));

    // A proof whose path was changed does not reach the root.
    let mut proof = receipt_proof(&honest_path, &trust(&signer), &kept).unwrap();
    proof.entry = proof.entry.replacen("\"status\":201", "\"status\":200", 1);
    assert!(proof.verify(&kept, &[signer.verifier()]).is_err());
}

#[tokio::test]
async fn a_response_without_a_place_in_the_chain_gets_no_receipt() {
    let dir = scratch("none");
    let path = dir.join("audit.jsonl");
    let signer = AuditSigner::generate("test-audit").unwrap();
    // No room at all: the request is refused, with no entry and no receipt.
    let audit = AuditLog::builder("api-1", signer.clone())
        .with_receipts()
        .with_queue_capacity(1)
        .start(JsonlSink::open(&path).unwrap())
        .await
        .unwrap();
    let (router, mut started, gate) = {
        let (gate, gate_rx) = tokio::sync::watch::channel(false);
        let (started_tx, started) = tokio::sync::mpsc::unbounded_channel::<()>();
        let router = axum::Router::new().route(
            "/book",
            axum::routing::post(move || {
                let (mut gate, started) = (gate_rx.clone(), started_tx.clone());
                async move {
                    let _ = started.send(());
                    let _ = gate.wait_for(|open| *open).await;
                    (StatusCode::CREATED, "booked")
                }
            }),
        );
        (router, started, gate)
    };
    let app = router.layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    let first = tokio::spawn(app.clone().oneshot(post_with_key("k1", "x")));
    started.recv().await.unwrap();
    let refused = app.clone().oneshot(post_with_key("k2", "x")).await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!refused.headers().contains_key(RECEIPT_HEADER));
    gate.send(true).unwrap();
    let first = first.await.unwrap().unwrap();
    assert!(first.headers().contains_key(RECEIPT_HEADER));
    body_bytes(first).await;
    audit.close().await.unwrap();

    // Without `with_receipts`, none.
    let plain = AuditLog::builder("api-2", signer.clone())
        .start(JsonlSink::open(dir.join("plain.jsonl")).unwrap())
        .await
        .unwrap();
    let app = common::booking_router(Counter::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(plain.clone()));
    let response = app.oneshot(post_with_key("k1", "x")).await.unwrap();
    assert!(!response.headers().contains_key(RECEIPT_HEADER));
    plain.close().await.unwrap();
}

#[test]
fn a_receipt_that_is_not_one_is_named() {
    let signature = format!("\u{2014} k {}\n", "A".repeat(91) + "=");
    let note = |body: &str| format!("{body}\n{signature}");
    let bad_id = note(
        "tower-idempotency/receipt/api-1\n00\nstatus 201\nkey -\ntime 2026-01-01T00:00:00.000Z\n",
    );
    let bad_status = note(
        "tower-idempotency/receipt/api-1\n000000000000000000000000000000aa\nstatus 2010\nkey -\ntime 2026-01-01T00:00:00.000Z\n",
    );
    let bad_key = note(
        "tower-idempotency/receipt/api-1\n000000000000000000000000000000aa\nstatus 201\nkey ab\ntime 2026-01-01T00:00:00.000Z\n",
    );
    let other_origin = note("tower-idempotency/audit/api-1\n1\nAAAA\ntime x\nlast y\n");
    for (text, why) in [
        ("", "empty"),
        ("!!!", "neither a note nor its base64"),
        ("dG93ZXI=", "blank line"),
        (bad_id.as_str(), "32 lowercase hex"),
        (bad_status.as_str(), "HTTP status"),
        (bad_key.as_str(), "64 lowercase hex"),
        (other_origin.as_str(), "neither a note"),
    ] {
        match Receipt::parse(text) {
            Err(ReceiptError::Malformed(reason)) => {
                assert!(reason.contains(why), "{text:?}: {reason}")
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }
}
