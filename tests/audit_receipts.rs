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

/// The flow the README shows: the demo with receipts on, a booking, its
/// receipt saved, and `audit_verify --receipt` after shutdown: 0 when the
/// chain holds it, 1 for a chain without it, 3 while it is unsigned, 2 for
/// a file that is no receipt.
#[tokio::test]
async fn the_demo_gives_receipts_and_audit_verify_checks_them() {
    use http_body_util::{BodyExt as _, Full};
    use std::io::BufRead as _;
    let dir = scratch("demo");
    let run_demo = |chain: &Path| {
        let mut child = std::process::Command::new(common::example("booking_server"))
            .arg("127.0.0.1:0")
            .env("IDEMPOTENCY_AUDIT", chain)
            .env("IDEMPOTENCY_AUDIT_RECEIPTS", "1")
            .env_remove("IDEMPOTENCY_AUDIT_SIGNING_KEY")
            .env_remove("IDEMPOTENCY_STORE")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let base = loop {
            let mut line = String::new();
            assert!(stdout.read_line(&mut line).unwrap() > 0, "the demo starts");
            if let Some(addr) = line.trim().strip_prefix("listening on ") {
                break addr.to_owned();
            }
        };
        (child, base, stdout)
    };
    let book = |base: &str, key: &str| {
        Request::post(format!("{base}/appointments"))
            .header("host", "bookings.example")
            .header("content-type", "application/json")
            .header("authorization", "Bearer grace.v1")
            .header("idempotency-key", key)
            .body(Full::new(bytes::Bytes::from_static(
                br#"{"caller":"grace","slot":"2026-12-02T10:00","provider":"dr-receipt"}"#,
            )))
            .unwrap()
    };
    let stop = |(mut child, _, stdout): (
        std::process::Child,
        String,
        std::io::BufReader<std::process::ChildStdout>,
    )| {
        let pid = child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let rest: Vec<String> = stdout.lines().map(Result::unwrap).collect();
        assert!(child.wait().unwrap().success(), "{rest:?}");
    };
    let client = common::fleet::client();

    let chain = dir.join("audit.jsonl");
    let demo = run_demo(&chain);
    let response = client.request(book(&demo.1, "receipt-1")).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let header = response.headers()[RECEIPT_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    response.into_body().collect().await.unwrap();
    // Once the first entry is signed, a second booking, for a receipt
    // whose entry follows a checkpoint.
    for _ in 0..10_000 {
        let text = std::fs::read_to_string(&chain).unwrap_or_default();
        // The run's `started` entry is signed at start: wait for the
        // checkpoint after the booking.
        if text
            .lines()
            .filter(|l| l.starts_with("{\"checkpoint\""))
            .count()
            >= 2
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let response = client.request(book(&demo.1, "receipt-1b")).await.unwrap();
    let second = response.headers()[RECEIPT_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    response.into_body().collect().await.unwrap();
    stop(demo);
    let receipt_file = dir.join("receipt");
    std::fs::write(&receipt_file, &header).unwrap();
    let second_file = dir.join("second-receipt");
    std::fs::write(&second_file, &second).unwrap();

    let other = dir.join("other.jsonl");
    let demo = run_demo(&other);
    let response = client.request(book(&demo.1, "receipt-2")).await.unwrap();
    response.into_body().collect().await.unwrap();
    stop(demo);

    let verify = |chain: &Path, key: &Path, receipt: &Path| {
        let out = std::process::Command::new(common::example("audit_verify"))
            .arg(chain)
            .arg("--public-key")
            .arg(key)
            .arg("--receipt")
            .arg(receipt)
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let key = dir.join("audit.jsonl.key.pub");
    let (code, stdout) = verify(&chain, &key, &receipt_file);
    assert_eq!(code, 0, "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    // The run's `started` entry, the two bookings, the close.
    assert_eq!(lines[0], "ok: 4 entries, signed through 4", "{stdout}");
    assert_eq!(
        lines[1],
        "receipt: line 3 (seq 2, executed) holds it, signed through 4"
    );

    // Another chain under the same key does not hold it.
    std::fs::copy(dir.join("audit.jsonl.key"), dir.join("forged.jsonl.key")).unwrap();
    let forged = dir.join("forged.jsonl");
    let demo = run_demo(&forged);
    let response = client.request(book(&demo.1, "receipt-3")).await.unwrap();
    response.into_body().collect().await.unwrap();
    stop(demo);
    let (code, stdout) = verify(&forged, &key, &receipt_file);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.starts_with("receipt: no entry carries receipt"),
        "{stdout}"
    );
    // A receipt another key signed is not this log's.
    let (code, stdout) = verify(&other, &dir.join("other.jsonl.key.pub"), &receipt_file);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("did not issue it"), "{stdout}");

    // The second entry without the checkpoint after it: intact, incomplete.
    let text = std::fs::read_to_string(&chain).unwrap();
    let unsigned = dir.join("unsigned.jsonl");
    let kept: Vec<&str> = text.lines().take(5).collect();
    assert!(!kept[4].starts_with("{\"checkpoint\""));
    std::fs::write(&unsigned, kept.join("\n") + "\n").unwrap();
    let (code, stdout) = verify(&unsigned, &key, &second_file);
    assert_eq!(code, 3, "{stdout}");
    assert!(
        stdout.contains("receipt: line 5 (seq 3, executed) holds it, not signed"),
        "{stdout}"
    );

    // A crash before the second entry was durable: the chain as it was
    // then. While no writer has started again, the entry may still be on
    // its way; once one has, the chain records the stop, and the receipt's
    // entry was lost in it. Either way intact and incomplete, not forged.
    let crashed = dir.join("crashed.jsonl");
    std::fs::write(
        &crashed,
        text.lines().take(4).collect::<Vec<_>>().join("\n") + "\n",
    )
    .unwrap();
    for suffix in [".key", ".key.pub"] {
        std::fs::copy(
            dir.join(format!("audit.jsonl{suffix}")),
            dir.join(format!("crashed.jsonl{suffix}")),
        )
        .unwrap();
    }
    let (code, stdout) = verify(&crashed, &key, &second_file);
    assert_eq!(code, 3, "{stdout}");
    assert!(
        stdout.contains("has not been closed since it was issued"),
        "{stdout}"
    );
    stop(run_demo(&crashed));
    let (code, stdout) = verify(&crashed, &key, &second_file);
    assert_eq!(code, 3, "{stdout}");
    assert!(stdout.contains("lost in that stop"), "{stdout}");
    let restarted = std::fs::read_to_string(&crashed).unwrap();
    assert!(restarted.contains("\"after\":\"crash\""), "{restarted}");
    // The first receipt's entry is there all the same.
    assert_eq!(verify(&crashed, &key, &receipt_file).0, 0);

    let junk = dir.join("junk");
    std::fs::write(&junk, "not a receipt").unwrap();
    assert_eq!(verify(&chain, &key, &junk).0, 2);
}

/// The client keeps the receipt of the answer it ends with, on both
/// clients; a replay carries its own.
#[tokio::test]
async fn the_retrying_client_reports_the_receipt() {
    use http_body_util::Full;
    use tower::Layer as _;
    use tower_idempotency::client::{RetryLayer, RetryMiddleware, RetryReport};
    let dir = scratch("client");
    let signer = AuditSigner::generate("test-audit").unwrap();
    let audit = log(&dir.join("audit.jsonl"), &signer).await;
    let app = common::booking_router(Counter::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    let key = [signer.verifier()];

    // tower
    let client = RetryLayer::new().layer(app.clone());
    let request = || {
        Request::post("/book")
            .header("authorization", AUTH)
            .header("idempotency-key", "client-1")
            .body(Full::new(bytes::Bytes::from_static(b"x")))
            .unwrap()
    };
    let first = client.clone().oneshot(request()).await.unwrap();
    let first = first.extensions().get::<RetryReport>().unwrap().clone();
    let receipt = first.receipt.expect("the answer's receipt is kept");
    receipt.verify(&key).unwrap();
    assert_eq!(receipt.status(), 201);
    let again = client.oneshot(request()).await.unwrap();
    let again = again.extensions().get::<RetryReport>().unwrap().clone();
    assert!(again.replayed);
    let replay = again.receipt.unwrap();
    replay.verify(&key).unwrap();
    assert_ne!(replay.id(), receipt.id());

    // reqwest
    let base = common::fleet::serve(app).await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::from(RetryLayer::new()))
        .build();
    let response = client
        .post(format!("{base}/book"))
        .header("authorization", AUTH)
        .header("idempotency-key", "client-2")
        .body("x")
        .send()
        .await
        .unwrap();
    let report = response.extensions().get::<RetryReport>().unwrap().clone();
    report.receipt.unwrap().verify(&key).unwrap();
    audit.close().await.unwrap();
}

/// Receipts and their proofs check in the independent implementation of
/// the documented formats (tests/independent/audit_check.py).
#[tokio::test]
async fn receipts_and_their_proofs_check_in_an_independent_implementation() {
    let dir = scratch("independent");
    let path = dir.join("audit.jsonl");
    let signer = AuditSigner::generate("test-audit").unwrap();
    let audit = AuditLog::builder("api-1", signer.clone())
        .with_receipts()
        .with_checkpoints(3)
        .start(JsonlSink::open(&path).unwrap())
        .await
        .unwrap();
    let app = common::booking_router(Counter::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    let mut receipts = Vec::new();
    for i in 0..9 {
        let key: &'static str = format!("k{}", i / 2).leak();
        let response = app.clone().oneshot(post_with_key(key, "x")).await.unwrap();
        receipts.push(receipt_of(&response));
        body_bytes(response).await;
    }
    audit.close().await.unwrap();
    let key_file = dir.join("audit.key.pub");
    std::fs::write(&key_file, signer.verifier().to_string()).unwrap();
    let proofs: Vec<(String, serde_json::Value)> = receipts
        .iter()
        .map(|receipt| {
            let proof = receipt_proof(&path, &trust(&signer), receipt).unwrap();
            (
                receipt.to_header_value(),
                serde_json::from_str(&proof.to_json()).unwrap(),
            )
        })
        .collect();
    let run = |pairs: &[(String, serde_json::Value)]| {
        let doc = serde_json::json!({
            "receipts": pairs
                .iter()
                .map(|(receipt, proof)| serde_json::json!({"receipt": receipt, "proof": proof}))
                .collect::<Vec<_>>(),
        });
        let file = dir.join("receipts.json");
        std::fs::write(&file, doc.to_string()).unwrap();
        std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/independent/audit_check.py"
            ))
            .arg(&path)
            .arg(&key_file)
            .arg(&file)
            .output()
            .expect("python3 runs (with the `cryptography` package)")
    };
    let out = run(&proofs);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.ends_with(", 9 proofs\n"), "{stdout}");
    // One receipt with another's proof.
    let swapped = vec![(proofs[0].0.clone(), proofs[1].1.clone())];
    let out = run(&swapped);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "the entry is not the receipt's\n"
    );
}
