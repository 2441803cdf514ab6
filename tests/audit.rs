//! The audit chain: every decision has its entry, racing duplicates give one
//! `executed`, tampering is found at its line, the chain continues across
//! restarts, and the failure policy holds both ways. The PostgreSQL sink
//! runs the same chain tests when `DATABASE_URL` is set.

mod common;

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, routing::post};
use common::{AUTH, Counter, body_bytes, post_with_key, problem};
use http::{Request, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc, watch};
use tower::ServiceExt;
use tower_idempotency::{
    IdempotencyLayer, MemoryStore,
    audit::{
        AuditError, AuditFailure, AuditLine, AuditLog, AuditSigner, AuditSink, JsonlSink, merkle,
        verify_file, verify_lines,
    },
    once::{AtMostOnce, OnceError},
    store::{Fault, FaultyStore, Op},
};

/// Starts a writer of the chain at `path`, answers one request under `key`
/// through it, and closes it.
async fn one_request(path: &Path, signer: &AuditSigner, key: &'static str) {
    let audit = AuditLog::builder("api-1", signer.clone())
        .start(JsonlSink::open(path).unwrap())
        .await
        .unwrap();
    let app = common::booking_router(Counter::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    body_bytes(app.oneshot(post_with_key(key, "x")).await.unwrap()).await;
    audit.close().await.unwrap();
}

/// A writer giving receipts on the chain at `path`, and the booking app
/// that audits into it.
async fn receipts_app(path: &Path, signer: &AuditSigner) -> (AuditLog, Router) {
    let audit = AuditLog::builder("api-1", signer.clone())
        .with_receipts()
        .start(JsonlSink::open(path).unwrap())
        .await
        .unwrap();
    let app = common::booking_router(Counter::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    (audit, app)
}

/// Books under `key` and returns the answer's receipt.
async fn book_receipt(app: &Router, key: &'static str) -> tower_idempotency::audit::Receipt {
    let response = app.clone().oneshot(post_with_key(key, "x")).await.unwrap();
    let receipt = tower_idempotency::audit::Receipt::from_headers(response.headers())
        .unwrap()
        .unwrap();
    body_bytes(response).await;
    receipt
}

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tower-idempotency-audit-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A sink in memory that can be made to fail, or to hold every append until
/// released.
#[derive(Clone, Default)]
struct MemorySink {
    lines: Arc<Mutex<Vec<String>>>,
    failing: Arc<AtomicBool>,
    held: Arc<AtomicBool>,
    release: Arc<Notify>,
    appends: Arc<Mutex<usize>>,
}

impl MemorySink {
    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl AuditSink for MemorySink {
    async fn tail(&mut self) -> io::Result<Vec<String>> {
        let lines = self.lines.lock().unwrap();
        let is_checkpoint = |l: &String| l.starts_with("{\"checkpoint\"");
        // From the entry before the one the last checkpoint signs.
        let from = lines.iter().rposition(is_checkpoint).map_or(0, |at| {
            lines[..at - 1]
                .iter()
                .rposition(|l| !is_checkpoint(l))
                .unwrap_or(at - 1)
        });
        Ok(lines[from..].to_vec())
    }

    async fn append(&mut self, lines: &[AuditLine]) -> io::Result<()> {
        *self.appends.lock().unwrap() += 1;
        while self.held.load(Ordering::SeqCst) {
            self.release.notified().await;
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(io::Error::other("disk on fire"));
        }
        let mut held = self.lines.lock().unwrap();
        held.extend(lines.iter().map(|l| l.text().to_owned()));
        Ok(())
    }
}

fn signer() -> AuditSigner {
    AuditSigner::generate("test-audit").unwrap()
}

/// The entries of the requests: without checkpoints, the `closed` entries
/// a clean close writes (see `closes`), and the `started` entries of runs
/// that give receipts.
fn entries(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| {
            v.get("checkpoint").is_none() && v["decision"] != "closed" && v["decision"] != "started"
        })
        .collect()
}

/// How many times the log was closed cleanly: its `closed` entries.
fn closes(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.contains("\"decision\":\"closed\""))
        .count()
}

fn decisions(lines: &[String]) -> Vec<String> {
    entries(lines)
        .iter()
        .map(|e| e["decision"].as_str().unwrap().to_owned())
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Polls `ready` until it holds: for state another task changes.
async fn until(mut ready: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("condition never held");
}

/// `POST /book` that holds every execution until the gate opens, telling
/// `started` each time one begins.
fn gated(counter: &Counter) -> (Router, mpsc::UnboundedReceiver<usize>, watch::Sender<bool>) {
    let (gate, gate_rx) = watch::channel(false);
    let (started_tx, started) = mpsc::unbounded_channel();
    let counter = counter.clone();
    let router = Router::new().route(
        "/book",
        post(move || {
            let (counter, mut gate, started) =
                (counter.clone(), gate_rx.clone(), started_tx.clone());
            async move {
                let n = counter.hit();
                let _ = started.send(n);
                let _ = gate.wait_for(|open| *open).await;
                (StatusCode::CREATED, format!("booking {n}"))
            }
        }),
    );
    (router, started, gate)
}

/// A router whose `/fail` answers 503 and whose `/slow` never answers.
fn extra_routes(counter: &Counter) -> Router {
    let (fail, slow) = (counter.clone(), counter.clone());
    common::booking_router(counter.clone())
        .route(
            "/fail",
            post(move || {
                fail.hit();
                async { (StatusCode::SERVICE_UNAVAILABLE, "try later") }
            }),
        )
        .route(
            "/slow",
            post(move || {
                slow.hit();
                std::future::pending::<&'static str>()
            }),
        )
}

fn keyed(path: &str, key: &str, body: &'static str) -> Request<Body> {
    Request::post(path)
        .header("authorization", AUTH)
        .header("idempotency-key", key)
        .body(Body::from(body))
        .unwrap()
}

#[tokio::test]
async fn every_decision_of_the_layer_has_its_entry() {
    let sink = MemorySink::default();
    let signer = signer();
    let audit = AuditLog::builder("api-1", signer.clone())
        .start(sink.clone())
        .await
        .unwrap();
    let counter = Counter::default();
    let store = FaultyStore::new(MemoryStore::default());
    let layer = IdempotencyLayer::new(store.clone())
        .with_required_key(true)
        .with_request_body_limit(64)
        .with_max_execution(Duration::from_millis(50))
        .with_record_policy(|parts: &http::response::Parts| {
            parts.status != StatusCode::SERVICE_UNAVAILABLE
        })
        .with_audit(audit.clone());
    let app = extra_routes(&counter).layer(layer.clone());

    let first = app.clone().oneshot(post_with_key("k1", "x")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_body = body_bytes(first).await;
    let replay = app.clone().oneshot(post_with_key("k1", "x")).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    body_bytes(replay).await;
    let (status, code, _) =
        problem(app.clone().oneshot(post_with_key("k1", "y")).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "key-reused")
    );
    let missing = Request::post("/book")
        .header("authorization", AUTH)
        .body(Body::from("x"))
        .unwrap();
    assert_eq!(
        app.clone().oneshot(missing).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let invalid = Request::post("/book")
        .header("authorization", AUTH)
        .header("idempotency-key", "a,b")
        .header("idempotency-key", "c")
        .body(Body::from("x"))
        .unwrap();
    assert_eq!(
        app.clone().oneshot(invalid).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let anonymous = Request::post("/book")
        .header("idempotency-key", "k2")
        .body(Body::from("x"))
        .unwrap();
    assert_eq!(
        app.clone().oneshot(anonymous).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let large = app
        .clone()
        .oneshot(post_with_key("k3", &*"z".repeat(100).leak()))
        .await
        .unwrap();
    assert_eq!(large.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let released = app
        .clone()
        .oneshot(keyed("/fail", "k4", "x"))
        .await
        .unwrap();
    assert_eq!(released.status(), StatusCode::SERVICE_UNAVAILABLE);
    let settled = app
        .clone()
        .oneshot(keyed("/slow", "k5", "x"))
        .await
        .unwrap();
    assert_eq!(settled.status(), StatusCode::INTERNAL_SERVER_ERROR);
    store.set_fault(Op::Claim, Some(Fault::Unavailable));
    let down = app.clone().oneshot(post_with_key("k6", "x")).await.unwrap();
    assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
    let open = extra_routes(&counter).layer(layer.clone().with_fail_open(true));
    assert_eq!(
        open.oneshot(post_with_key("k7", "x"))
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
    store.set_fault(Op::Claim, None);

    // In flight: a second request while the first holds its key.
    let (router, mut started, gate) = gated(&counter);
    let gated_app = router.layer(layer.clone());
    let holder = tokio::spawn(gated_app.clone().oneshot(post_with_key("k8", "x")));
    started.recv().await.unwrap();
    let (status, code, _) = problem(
        gated_app
            .clone()
            .oneshot(post_with_key("k8", "x"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "request-in-flight")
    );
    gate.send(true).unwrap();
    body_bytes(holder.await.unwrap().unwrap()).await;

    let summary = audit.close().await.unwrap();
    let lines = sink.lines();
    assert_eq!(
        decisions(&lines),
        [
            "executed",
            "replayed",
            "key_reused",
            "missing_key",
            "invalid_key",
            "anonymous_request",
            "body_too_large",
            "released",
            "settled",
            "store_unavailable",
            "failed_open",
            "request_in_flight",
            "executed",
        ]
    );
    assert_eq!(summary.seq, 14, "13 decisions and the close");
    let all = entries(&lines);
    // The executed entry: status, the body's digest, hashed key and scope.
    let executed = &all[0];
    assert_eq!(executed["status"], 201);
    assert_eq!(executed["response_sha256"], sha256_hex(&first_body));
    assert_eq!(executed["key"], sha256_hex(b"k1"));
    assert_eq!(executed["key"], audit.key_hash("k1"));
    assert!(executed["scope"].as_str().unwrap().len() == 64);
    assert!(executed["fingerprint"].as_str().unwrap().len() == 64);
    assert_eq!(all[1]["status"], 201);
    assert_eq!(all[1]["key"], executed["key"]);
    assert_eq!(all[2]["status"], 400);
    assert!(all[3].get("key").is_none(), "a missing key has no hash");
    assert_eq!(all[5]["key"], sha256_hex(b"k2"));
    assert!(
        all[5].get("scope").is_none(),
        "an anonymous request has no scope"
    );
    assert_eq!(all[7]["status"], 503);
    assert_eq!(all[8]["status"], 500);
    assert_eq!(all[9]["status"], 503);
    for entry in &all {
        let text = entry.to_string();
        for secret in ["test-caller", "\"k1\"", "booking 1"] {
            assert!(!text.contains(secret), "{secret} leaked into {text}");
        }
    }
    let chain = verify_lines(&lines, Some(&signer.verifier())).unwrap_or_else(|b| panic!("{b}"));
    assert_eq!(chain.entries, 14, "13 decisions and the close");
    assert_eq!(chain.unsigned_tail(), 0, "closing signs the head");
    assert_eq!(counter.get(), 5);
}

/// A holder whose renewals fail loses its key to a duplicate: the chain
/// shows the take-over, the new holder's execution, and the first holder's
/// completion fenced out. A completion that never lands is abandoned.
#[tokio::test(start_paused = true)]
async fn take_overs_fenced_and_abandoned_completions_have_their_entries() {
    let sink = MemorySink::default();
    let audit = AuditLog::builder("api-1", signer())
        .start(sink.clone())
        .await
        .unwrap();
    let counter = Counter::default();
    let (router, mut started, gate) = gated(&counter);
    let store = FaultyStore::new(MemoryStore::default());
    store.set_fault(Op::Renew, Some(Fault::Unavailable));
    let layer = IdempotencyLayer::new(store.clone())
        .with_lease(Duration::from_secs(3))
        .with_completion_retry_limit(Duration::from_secs(1))
        .with_audit(audit.clone());
    let app = router.layer(layer);
    let first = tokio::spawn(app.clone().oneshot(post_with_key("k", "x")));
    assert_eq!(started.recv().await, Some(1));
    tokio::time::advance(Duration::from_secs(4)).await;
    let second = tokio::spawn(app.clone().oneshot(post_with_key("k", "x")));
    assert_eq!(started.recv().await, Some(2));
    gate.send(true).unwrap();
    body_bytes(first.await.unwrap().unwrap()).await;
    body_bytes(second.await.unwrap().unwrap()).await;

    store.set_fault(Op::Complete, Some(Fault::Unavailable));
    let lost = tokio::spawn(app.clone().oneshot(post_with_key("k2", "x")));
    body_bytes(lost.await.unwrap().unwrap()).await;
    // The completion retries, then gives up, in the background.
    tokio::time::advance(Duration::from_secs(5)).await;
    audit.close().await.unwrap();
    let lines = sink.lines();
    let mut seen = decisions(&lines);
    seen.sort();
    assert_eq!(
        seen,
        ["abandoned", "executed", "fenced", "taken_over"],
        "{lines:#?}"
    );
}

#[tokio::test]
async fn every_decision_of_at_most_once_has_its_entry() {
    let sink = MemorySink::default();
    let audit = AuditLog::builder("worker-1", signer())
        // A call has no response to carry a receipt: its entries name none.
        .with_receipts()
        .start(sink.clone())
        .await
        .unwrap();
    let once = AtMostOnce::new(MemoryStore::default()).with_audit(audit.clone());
    let input = serde_json::json!({"slot": "09:00"});
    let run = |n: u64| async move { Ok::<_, std::io::Error>(n) };
    assert_eq!(once.run("s", "m1", &input, |_| run(7)).await.unwrap(), 7);
    assert_eq!(once.run("s", "m1", &input, |_| run(8)).await.unwrap(), 7);
    let other = serde_json::json!({"slot": "10:00"});
    assert!(matches!(
        once.run("s", "m1", &other, |_| run(9)).await,
        Err(OnceError::InputMismatch)
    ));
    let failed = once
        .run("s", "m2", &input, |_| async {
            Err::<u64, _>(std::io::Error::other("no"))
        })
        .await;
    assert!(matches!(failed, Err(OnceError::Failed(_))));
    audit.close().await.unwrap();
    let lines = sink.lines();
    assert_eq!(
        decisions(&lines),
        ["executed", "replayed", "key_reused", "released"]
    );
    let all = entries(&lines);
    assert_eq!(all[0]["response_sha256"], sha256_hex(b"7"));
    assert_eq!(all[0]["key"], sha256_hex(b"m1"));
    assert_eq!(all[0]["scope"], sha256_hex(b"s"));
    assert!(all[0].get("status").is_none());
    assert!(all.iter().all(|e| e.get("receipt").is_none()), "{lines:#?}");
}

/// 64 duplicates at once: one `executed`, and every other one answered as
/// in flight or replayed, each with its entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_duplicates_give_one_executed_entry() {
    let dir = scratch("race");
    let signer = signer();
    let audit = AuditLog::builder("api-1", signer.clone())
        .start(JsonlSink::open(dir.join("audit.jsonl")).unwrap())
        .await
        .unwrap();
    let counter = Counter::default();
    let app = common::booking_router(counter.clone())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (app, barrier) = (app.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let response = app.oneshot(post_with_key("race", "x")).await.unwrap();
                let status = response.status();
                body_bytes(response).await;
                status
            })
        })
        .collect();
    for task in tasks {
        let status = task.await.unwrap();
        assert!(status == StatusCode::CREATED || status == StatusCode::CONFLICT);
    }
    audit.close().await.unwrap();
    assert_eq!(counter.get(), 1);
    let lines = read_lines(&dir.join("audit.jsonl"));
    let seen = decisions(&lines);
    assert_eq!(seen.len(), 64);
    assert_eq!(seen.iter().filter(|d| *d == "executed").count(), 1);
    assert!(
        seen.iter()
            .all(|d| ["executed", "replayed", "request_in_flight"].contains(&d.as_str()))
    );
    let chain = verify_file(dir.join("audit.jsonl"), Some(&signer.verifier())).unwrap();
    assert_eq!(chain.entries, 65, "64 decisions and the close");
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Writes a chain of `n` executed/replayed entries with a checkpoint every
/// `every`, through `sink`, and returns the signer.
async fn write_chain<S: AuditSink>(sink: S, n: usize, every: u64) -> AuditSigner {
    let signer = signer();
    let audit = AuditLog::builder("api-1", signer.clone())
        .with_checkpoints(every)
        .start(sink)
        .await
        .unwrap();
    let app = common::booking_router(Counter::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    for i in 0..n {
        let key: &'static str = format!("k{}", i / 2).leak();
        body_bytes(app.clone().oneshot(post_with_key(key, "x")).await.unwrap()).await;
    }
    audit.close().await.unwrap();
    signer
}

/// The 1-based line holding byte `at` of `text`.
fn line_of(text: &[u8], at: usize) -> u64 {
    text[..at].iter().filter(|&&b| b == b'\n').count() as u64 + 1
}

#[tokio::test]
async fn any_changed_byte_is_found_at_its_line() {
    let dir = scratch("bytes");
    let path = dir.join("audit.jsonl");
    let signer = write_chain(JsonlSink::open(&path).unwrap(), 7, 3).await;
    let key = signer.verifier();
    let original = std::fs::read(&path).unwrap();
    verify_file(&path, Some(&key)).unwrap();
    let tampered = dir.join("tampered.jsonl");
    for at in 0..original.len() {
        let mut bytes = original.clone();
        bytes[at] ^= 0x01;
        std::fs::write(&tampered, &bytes).unwrap();
        match verify_file(&tampered, Some(&key)) {
            Err(tower_idempotency::audit::VerifyError::Broken(broken)) => {
                assert_eq!(broken.line, line_of(&original, at), "byte {at}: {broken}")
            }
            // The file's last newline changed: its last line reads as torn
            // by a crash, and the chain as incomplete, never complete.
            Ok(chain) if at == original.len() - 1 => {
                assert_eq!(chain.torn_line, Some(line_of(&original, at)));
                assert!(!chain.is_complete());
            }
            other => panic!("byte {at} changed, not found: {other:?}"),
        }
    }
}

/// The chain as lines, each entry or checkpoint.
#[tokio::test]
async fn removed_swapped_and_cut_lines_are_found_at_their_line() {
    let dir = scratch("lines");
    let path = dir.join("audit.jsonl");
    let signer = write_chain(JsonlSink::open(&path).unwrap(), 12, 4).await;
    let key = signer.verifier();
    let lines = read_lines(&path);
    check_line_tampering(&lines, &key);
}

/// Removing an entry, swapping two lines, and cutting the tail, each
/// reported at the first line out of place.
fn check_line_tampering(lines: &[String], key: &tower_idempotency::audit::AuditVerifier) {
    let is_checkpoint = |l: &String| l.starts_with("{\"checkpoint\"");
    verify_lines(lines, Some(key)).unwrap();
    for removed in 0..lines.len() {
        let mut fewer = lines.to_vec();
        fewer.remove(removed);
        let result = verify_lines(&fewer, Some(key));
        if is_checkpoint(&lines[removed]) {
            // A checkpoint's removal leaves a valid chain, less of it signed.
            let chain = result.unwrap();
            let last = verify_lines(lines, Some(key)).unwrap().signed_through;
            assert!(chain.signed_through < last || removed + 1 < lines.len());
        } else {
            let broken = result.expect_err("a removed entry is found");
            assert_eq!(
                broken.line,
                removed as u64 + 1,
                "removed line {}: {broken}",
                removed + 1
            );
        }
    }
    for first in 0..lines.len() - 1 {
        let mut swapped = lines.to_vec();
        swapped.swap(first, first + 1);
        let broken = verify_lines(&swapped, Some(key)).expect_err("a swap is found");
        let line = first as u64 + 1;
        if is_checkpoint(&lines[first]) || is_checkpoint(&lines[first + 1]) {
            // An entry moved ahead of a checkpoint is in order itself: the
            // checkpoint after it is what no longer matches.
            assert!(
                [line, line + 1].contains(&broken.line),
                "swap {line}: {broken}"
            );
        } else {
            assert_eq!(broken.line, line, "swap {line}: {broken}");
        }
    }
    // A tail cut at a line boundary past a checkpoint keeps a valid, shorter
    // chain; its unsigned entries are named.
    let whole = verify_lines(lines, Some(key)).unwrap().entries;
    let cut = &lines[..lines.len() - 2];
    let chain = verify_lines(cut, Some(key)).unwrap();
    assert!(chain.entries < whole);
}

#[tokio::test]
async fn a_tail_cut_mid_line_reads_as_a_crash_at_that_line() {
    let dir = scratch("cut");
    let path = dir.join("audit.jsonl");
    let signer = write_chain(JsonlSink::open(&path).unwrap(), 8, 3).await;
    let original = std::fs::read(&path).unwrap();
    let text = String::from_utf8_lossy(&original);
    let first_checkpoint = text.find("{\"checkpoint\"").unwrap();
    let past = first_checkpoint + text[first_checkpoint..].find('\n').unwrap() + 2;
    let cut = dir.join("cut.jsonl");
    for end in past..original.len() {
        std::fs::write(&cut, &original[..end]).unwrap();
        let result = verify_file(&cut, Some(&signer.verifier()));
        if original[end - 1] == b'\n' {
            result.unwrap_or_else(|e| panic!("cut at a line end {end}: {e}"));
        } else {
            // A crash, not tampering: intact, incomplete, the torn line
            // named.
            let chain = result.unwrap_or_else(|e| panic!("cut at {end}: {e}"));
            assert_eq!(
                chain.torn_line,
                Some(line_of(&original, end - 1)),
                "cut at {end}"
            );
            assert!(!chain.is_complete());
        }
    }
}

/// Someone without the private key rewrites the chain (changing one
/// decision and recomputing every hash after it), and signs its checkpoints
/// with a key of their own under the same name: the signature fails.
#[tokio::test]
async fn a_chain_rewritten_without_the_key_fails_its_signature() {
    let dir = scratch("rewrite");
    let path = dir.join("audit.jsonl");
    let signer = write_chain(JsonlSink::open(&path).unwrap(), 6, 2).await;
    let lines = read_lines(&path);
    let forged = rewrite(&lines, &AuditSigner::generate("test-audit").unwrap());
    // Without a key, the forgery is consistent: the hash chain alone cannot
    // tell.
    verify_lines(&forged, None).unwrap();
    let broken = verify_lines(&forged, Some(&signer.verifier())).unwrap_err();
    let first_checkpoint = forged
        .iter()
        .position(|l| l.contains("checkpoint"))
        .unwrap();
    assert_eq!(broken.line, first_checkpoint as u64 + 1, "{broken}");
    assert!(broken.reason.contains("signed"), "{broken}");
    // Dropping every checkpoint instead leaves nothing signed.
    let unsigned: Vec<_> = forged
        .into_iter()
        .filter(|l| !l.contains("checkpoint"))
        .collect();
    let broken = verify_lines(&unsigned, Some(&signer.verifier())).unwrap_err();
    assert!(broken.reason.contains("no checkpoint signed"), "{broken}");
}

/// Changes the first entry's status and rebuilds the chain after it, as a
/// forger with `key` would: every hash recomputed, checkpoints re-signed.
fn rewrite(lines: &[String], key: &AuditSigner) -> Vec<String> {
    resign(lines, key, |i, value| {
        if i == 0 {
            value.insert("status".into(), Value::from(500));
        }
    })
}

/// The chain with each entry changed by `edit` (given its line's index),
/// hashed, linked and signed again with `key`.
fn resign(
    lines: &[String],
    key: &AuditSigner,
    mut edit: impl FnMut(usize, &mut serde_json::Map<String, Value>),
) -> Vec<String> {
    let mut out = Vec::new();
    let mut prev = "0".repeat(64);
    let mut tree = merkle::Tree::new();
    let mut last = [0; 32];
    for (i, line) in lines.iter().enumerate() {
        let mut value: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
        if value.contains_key("checkpoint") {
            out.push(forge_checkpoint(key, &tree, &last));
            continue;
        }
        edit(i, &mut value);
        value.insert("prev".into(), Value::from(prev.clone()));
        value.remove("hash");
        let canonical = serde_json_canonicalizer::to_string(&value).unwrap();
        let hash = sha256_hex(canonical.as_bytes());
        value.insert("hash".into(), Value::from(hash.clone()));
        let text = serde_json_canonicalizer::to_string(&value).unwrap();
        last = merkle::leaf_hash(text.as_bytes());
        tree.push(last);
        out.push(text);
        prev = hash;
    }
    out
}

/// A checkpoint over a forged tree, signed with the forger's `key`: the
/// formats are public, so it is built as the writer builds it.
fn forge_checkpoint(key: &AuditSigner, tree: &merkle::Tree, last: &merkle::Hash) -> String {
    use base64::Engine as _;
    let b64 = |h: &[u8; 32]| base64::engine::general_purpose::STANDARD.encode(h);
    let body = format!(
        "tower-idempotency/audit/api-1\n{}\n{}\ntime 2026-12-04T00:00:00.000Z\nlast {}\n",
        tree.size(),
        b64(&tree.root()),
        b64(last)
    );
    let note = key_sign(key, &body);
    let peaks: Vec<String> = tree.peaks().map(b64).collect();
    serde_json::to_string(&serde_json::json!({ "checkpoint": note, "peaks": peaks })).unwrap()
}

/// A signed note over `body` with `key`, in the documented text form.
fn key_sign(key: &AuditSigner, body: &str) -> String {
    use base64::Engine as _;
    use ed25519_dalek::Signer as _;
    let secret = key.to_secret_text();
    let parts: Vec<&str> = secret.splitn(5, '+').collect();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(parts[4])
        .unwrap();
    let signing = ed25519_dalek::SigningKey::from_bytes(&raw[1..].try_into().unwrap());
    let id = u32::from_str_radix(parts[3], 16).unwrap().to_be_bytes();
    let mut signed = id.to_vec();
    signed.extend_from_slice(&signing.sign(body.as_bytes()).to_bytes());
    format!(
        "{body}\n\u{2014} {} {}\n",
        parts[2],
        base64::engine::general_purpose::STANDARD.encode(signed)
    )
}

#[tokio::test]
async fn a_restart_continues_the_chain_from_the_files_head() {
    let dir = scratch("restart");
    let path = dir.join("audit.jsonl");
    let signer = write_chain(JsonlSink::open(&path).unwrap(), 3, 100).await;
    // A crash tore the last write in half.
    let mut torn = std::fs::read(&path).unwrap();
    torn.extend_from_slice(b"{\"decision\":\"exec");
    std::fs::write(&path, &torn).unwrap();
    let audit = AuditLog::builder("api-1", signer.clone())
        .start(JsonlSink::open(&path).unwrap())
        .await
        .unwrap();
    // One writer per file.
    let second = JsonlSink::open(&path).unwrap_err();
    assert!(second.to_string().contains("another writer"), "{second}");
    let app = common::booking_router(Counter::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    body_bytes(app.oneshot(post_with_key("after", "x")).await.unwrap()).await;
    let summary = audit.close().await.unwrap();
    // A `resumed` entry that records the cut bytes, then the new entry,
    // then the close.
    assert_eq!((summary.seq, summary.written), (7, 3));
    let chain = verify_file(&path, Some(&signer.verifier())).unwrap();
    assert_eq!(chain.entries, 7);
    let lines = read_lines(&path);
    let resumed = lines
        .iter()
        .position(|l| l.contains("\"decision\":\"resumed\""))
        .unwrap();
    assert!(
        lines[resumed].contains("\"cut_bytes\":17"),
        "{}",
        lines[resumed]
    );
    assert_eq!(chain.cut, [(resumed as u64 + 1, 17)]);
    assert!(!chain.is_complete(), "the cut is reported");
    // Another instance's name on this chain is refused.
    let other = AuditLog::builder("api-2", signer)
        .start(JsonlSink::open(&path).unwrap())
        .await
        .unwrap_err();
    assert!(other.to_string().contains("instance `api-1`"), "{other}");
}

/// Fail-closed: while the sink fails, keyed requests are refused with 503
/// and nothing runs; a full queue refuses the same way; and the refusals
/// are counted in a `lost` entry once the sink recovers.
#[tokio::test]
async fn fail_closed_runs_nothing_without_its_entry() {
    let sink = MemorySink::default();
    let audit = AuditLog::builder("api-1", signer())
        .with_queue_capacity(1)
        .start(sink.clone())
        .await
        .unwrap();
    let counter = Counter::default();
    let app = common::booking_router(counter.clone())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    sink.failing.store(true, Ordering::SeqCst);
    let first = app.clone().oneshot(post_with_key("a", "x")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    until(|| !audit.is_healthy()).await;
    let (status, code, _) =
        problem(app.clone().oneshot(post_with_key("b", "x")).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "audit-unavailable")
    );
    assert_eq!(counter.get(), 1, "nothing ran without its entry");
    sink.failing.store(false, Ordering::SeqCst);
    until(|| audit.is_healthy()).await;

    // A full queue: the sink holds its appends, one request holds a place.
    sink.held.store(true, Ordering::SeqCst);
    let (router, mut started, gate) = gated(&counter);
    let gated_app =
        router.layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    let holder = tokio::spawn(gated_app.clone().oneshot(post_with_key("c", "x")));
    started.recv().await.unwrap();
    let (status, code, _) =
        problem(app.clone().oneshot(post_with_key("d", "x")).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "audit-unavailable")
    );
    gate.send(true).unwrap();
    body_bytes(holder.await.unwrap().unwrap()).await;
    sink.held.store(false, Ordering::SeqCst);
    sink.release.notify_waiters();
    audit.close().await.unwrap();
    let lines = sink.lines();
    let all = entries(&lines);
    let seen = decisions(&lines);
    assert_eq!(
        seen.iter().filter(|d| *d == "executed").count(),
        2,
        "{seen:?}"
    );
    let lost: u64 = all
        .iter()
        .filter(|e| e["decision"] == "lost")
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    assert_eq!(lost, 2, "both refusals are counted: {seen:?}");
    assert_eq!(counter.get(), 2);
}

/// Fail-open: the same outage runs every request; what found no room is
/// counted in a `lost` entry.
#[tokio::test]
async fn fail_open_runs_and_counts_what_was_lost() {
    let sink = MemorySink::default();
    let audit = AuditLog::builder("api-1", signer())
        .with_queue_capacity(1)
        .with_failure_policy(AuditFailure::Open)
        .start(sink.clone())
        .await
        .unwrap();
    let counter = Counter::default();
    let app = common::booking_router(counter.clone())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    sink.failing.store(true, Ordering::SeqCst);
    for key in ["a", "b", "c", "d"] {
        let response = app.clone().oneshot(post_with_key(key, "x")).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        if key == "a" {
            until(|| !audit.is_healthy()).await;
        }
    }
    assert_eq!(counter.get(), 4);
    sink.failing.store(false, Ordering::SeqCst);
    audit.close().await.unwrap();
    let lines = sink.lines();
    let all = entries(&lines);
    let executed = all.iter().filter(|e| e["decision"] == "executed").count() as u64;
    let lost: u64 = all
        .iter()
        .filter(|e| e["decision"] == "lost")
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    assert!(lost >= 1, "{lines:#?}");
    assert_eq!(executed + lost, 4, "every decision is an entry or counted");
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use tower_idempotency::audit::PostgresAuditSink;

    async fn pool() -> Option<sqlx::PgPool> {
        let Ok(url) = std::env::var("DATABASE_URL") else {
            eprintln!("skipping: DATABASE_URL is not set");
            return None;
        };
        Some(sqlx::PgPool::connect(&url).await.unwrap())
    }

    fn instance(name: &str) -> String {
        format!("{name}-{}-{}", std::process::id(), uuid())
    }

    fn uuid() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    /// The same chain checks as the file's, on rows: writing, tampering
    /// (with the append-only trigger out of the way, as a superuser could),
    /// and continuing after a restart.
    #[tokio::test]
    async fn the_postgres_sink_keeps_a_verifiable_append_only_chain() {
        let Some(pool) = pool().await else { return };
        let name = instance("pg");
        let signer = signer();
        for round in 0..2 {
            let audit = AuditLog::builder(&name, signer.clone())
                .with_checkpoints(4)
                .start(
                    PostgresAuditSink::connect(pool.clone(), &name)
                        .await
                        .unwrap(),
                )
                .await
                .unwrap();
            // One writer per instance.
            let second = PostgresAuditSink::connect(pool.clone(), &name)
                .await
                .unwrap_err();
            assert!(second.to_string().contains("another writer"), "{second}");
            let app = common::booking_router(Counter::default())
                .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
            for i in 0..6 {
                let key: &'static str = format!("r{round}k{}", i / 2).leak();
                body_bytes(app.clone().oneshot(post_with_key(key, "x")).await.unwrap()).await;
            }
            audit.close().await.unwrap();
        }
        let lines = PostgresAuditSink::lines(&pool, &name).await.unwrap();
        let chain = verify_lines(&lines, Some(&signer.verifier())).unwrap();
        assert_eq!(chain.entries, 14, "the restart continued the chain");
        assert_eq!(closes(&lines), 2);
        assert_eq!(
            decisions(&lines)
                .iter()
                .filter(|d| *d == "executed")
                .count(),
            6
        );
        check_line_tampering(&lines, &signer.verifier());

        let update =
            sqlx::query("UPDATE idempotency_audit SET line = 'x' WHERE instance = $1 AND seq = 3")
                .bind(&name)
                .execute(&pool)
                .await
                .unwrap_err();
        assert!(update.to_string().contains("append-only"), "{update}");
        let delete = sqlx::query("DELETE FROM idempotency_audit WHERE instance = $1")
            .bind(&name)
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(delete.to_string().contains("append-only"), "{delete}");

        // A superuser steps around the trigger and changes entry 3.
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SET LOCAL session_replication_role = replica")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("UPDATE idempotency_audit SET line = replace(line, '\"status\":201', '\"status\":200') WHERE instance = $1 AND seq = 3 AND NOT checkpoint")
            .bind(&name)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let lines_after = PostgresAuditSink::lines(&pool, &name).await.unwrap();
        let broken = verify_lines(&lines_after, Some(&signer.verifier())).unwrap_err();
        let at = lines
            .iter()
            .position(|l| l.contains("\"seq\":3,") && !l.contains("checkpoint"))
            .unwrap();
        assert_eq!(broken.line, at as u64 + 1, "{broken}");
    }

    /// A pool whose sessions carry `name`, so a test can end them.
    async fn named_pool(name: &str) -> Option<sqlx::PgPool> {
        use std::str::FromStr;
        let Ok(url) = std::env::var("DATABASE_URL") else {
            eprintln!("skipping: DATABASE_URL is not set");
            return None;
        };
        let options = sqlx::postgres::PgConnectOptions::from_str(&url)
            .unwrap()
            .application_name(name);
        Some(sqlx::PgPool::connect_with(options).await.unwrap())
    }

    /// Ends every session of the pool named `app` (as a failover, an
    /// operator's `pg_terminate_backend` or an idle timeout would) while
    /// another session waits for the chain's lock of `instance`, so the lock
    /// passes to that one; returns it, holding the lock.
    async fn take_the_chain(pool: &sqlx::PgPool, app: &str, instance: &str) -> sqlx::PgConnection {
        use sqlx::Connection;
        let url = std::env::var("DATABASE_URL").unwrap();
        let thief = format!("thief-{instance}");
        let mut other = sqlx::PgConnection::connect(&format!("{url}?application_name={thief}"))
            .await
            .unwrap();
        let instance = instance.to_owned();
        let waiting = tokio::spawn(async move {
            sqlx::query(
                "SELECT pg_advisory_lock(hashtextextended('tower-idempotency/audit/' || $1, 0))",
            )
            .bind(&instance)
            .execute(&mut other)
            .await
            .unwrap();
            other
        });
        // The other session waits in the lock's queue before the writer's
        // session ends, so it has the lock before the writer can ask again.
        loop {
            let queued: bool = sqlx::query_scalar(
                "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
            )
            .bind(&thief)
            .fetch_one(pool)
            .await
            .unwrap();
            if queued {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(app)
        .execute(pool)
        .await
        .unwrap();
        waiting.await.unwrap()
    }

    async fn wait_for_entries(pool: &sqlx::PgPool, name: &str, n: usize) {
        for _ in 0..2000 {
            let lines = PostgresAuditSink::lines(pool, name).await.unwrap();
            if entries(&lines).len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{n} entries were never written");
    }

    async fn status(app: &Router, key: &'static str) -> StatusCode {
        let response = app.clone().oneshot(post_with_key(key, "x")).await.unwrap();
        let status = response.status();
        body_bytes(response).await;
        status
    }

    /// A writer on its own pool (sessions named after it), a layer that
    /// audits into it, and a second pool to watch the table with.
    struct PgWriter {
        name: String,
        app_name: String,
        watcher: sqlx::PgPool,
        signer: AuditSigner,
        audit: AuditLog,
        counter: Counter,
        app: Router,
    }

    async fn pg_writer(prefix: &str, probe: Duration) -> Option<PgWriter> {
        let name = instance(prefix);
        let app_name = format!("a-{name}");
        let pool = named_pool(&app_name).await?;
        let watcher = pool_for_checks().await?;
        let signer = signer();
        let audit = AuditLog::builder(&name, signer.clone())
            .with_probe_interval(probe)
            .with_close_timeout(Duration::from_secs(2))
            .start(PostgresAuditSink::connect(pool, &name).await.unwrap())
            .await
            .unwrap();
        let counter = Counter::default();
        let app = common::booking_router(counter.clone())
            .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
        Some(PgWriter {
            name,
            app_name,
            watcher,
            signer,
            audit,
            counter,
            app,
        })
    }

    /// A writer whose session ended while a request ran, and whose lock
    /// another session took meanwhile: the entry cannot be written, the log
    /// turns unhealthy, the next keyed request runs nothing, and close says
    /// how many decisions were not written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_whose_lock_was_taken_refuses_and_counts_what_it_could_not_write() {
        // Nothing finds the lost session before the next request.
        let Some(w) = pg_writer("pg-taken", Duration::from_secs(3600)).await else {
            return;
        };
        assert_eq!(status(&w.app, "k1").await, StatusCode::CREATED);
        assert_eq!(status(&w.app, "k2").await, StatusCode::CREATED);
        wait_for_entries(&w.watcher, &w.name, 2).await;

        let _thief = take_the_chain(&w.watcher, &w.app_name, &w.name).await;
        // This one had its place before the writer knew: it runs, and its
        // entry is what cannot be written.
        assert_eq!(status(&w.app, "k3").await, StatusCode::CREATED);
        until(|| !w.audit.is_healthy() && w.audit.unwritten() == 1).await;
        assert_eq!(status(&w.app, "k4").await, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(w.counter.get(), 3, "nothing runs once the chain is taken");

        match w.audit.close().await {
            Err(AuditError::Taken { unwritten, error }) => {
                assert_eq!(unwritten, 2, "k3's entry and k4's refusal");
                assert!(error.to_string().contains("another writer"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        let lines = PostgresAuditSink::lines(&w.watcher, &w.name).await.unwrap();
        verify_lines(&lines, Some(&w.signer.verifier())).unwrap();
        assert_eq!(decisions(&lines), ["executed", "executed"]);
    }

    /// The same loss while no request comes: the idle probe finds it, and
    /// the first request after it runs nothing. Here the other session also
    /// writes a row and lets the lock go, so the writer could take its lock
    /// back, and must still refuse the chain that went on without it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_writer_finds_its_chain_taken_before_a_request_runs() {
        let Some(w) = pg_writer("pg-idle", Duration::from_millis(20)).await else {
            return;
        };
        assert_eq!(status(&w.app, "k1").await, StatusCode::CREATED);
        wait_for_entries(&w.watcher, &w.name, 1).await;

        let mut thief = take_the_chain(&w.watcher, &w.app_name, &w.name).await;
        sqlx::query("INSERT INTO idempotency_audit (instance, seq, checkpoint, line) VALUES ($1, 2, false, '{\"seq\":2,\"decision\":\"executed\"}')")
            .bind(&w.name)
            .execute(&mut thief)
            .await
            .unwrap();
        sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut thief)
            .await
            .unwrap();
        until(|| w.audit.unwritten() == 0 && !w.audit.is_healthy()).await;
        assert_eq!(status(&w.app, "k2").await, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(w.counter.get(), 1);
        match w.audit.close().await {
            Err(AuditError::Taken { unwritten, .. }) => assert_eq!(unwritten, 1),
            other => panic!("{other:?}"),
        }
    }

    /// A session that ended with nobody waiting for the lock is only an
    /// outage: the writer takes its lock back and the chain goes on whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_whose_session_ended_takes_its_lock_back() {
        let Some(w) = pg_writer("pg-back", Duration::from_millis(20)).await else {
            return;
        };
        assert_eq!(status(&w.app, "k1").await, StatusCode::CREATED);
        wait_for_entries(&w.watcher, &w.name, 1).await;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&w.app_name)
        .execute(&w.watcher)
        .await
        .unwrap();
        assert_eq!(status(&w.app, "k2").await, StatusCode::CREATED);
        wait_for_entries(&w.watcher, &w.name, 2).await;
        // Healthy again once the append that found the session gone has
        // been answered.
        until(|| w.audit.is_healthy()).await;
        w.audit.close().await.unwrap();
        let lines = PostgresAuditSink::lines(&w.watcher, &w.name).await.unwrap();
        verify_lines(&lines, Some(&w.signer.verifier())).unwrap();
        assert_eq!(decisions(&lines), ["executed", "executed"]);
    }

    async fn pool_for_checks() -> Option<sqlx::PgPool> {
        pool().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_duplicates_give_one_executed_row() {
        let Some(pool) = pool().await else { return };
        let name = instance("pg-race");
        let signer = signer();
        let audit = AuditLog::builder(&name, signer.clone())
            .start(
                PostgresAuditSink::connect(pool.clone(), &name)
                    .await
                    .unwrap(),
            )
            .await
            .unwrap();
        let counter = Counter::default();
        let app = common::booking_router(counter.clone())
            .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let app = app.clone();
                tokio::spawn(async move {
                    body_bytes(app.oneshot(post_with_key("race", "x")).await.unwrap()).await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        audit.close().await.unwrap();
        let lines = PostgresAuditSink::lines(&pool, &name).await.unwrap();
        verify_lines(&lines, Some(&signer.verifier())).unwrap();
        let seen = decisions(&lines);
        assert_eq!(seen.len(), 64);
        assert_eq!(seen.iter().filter(|d| *d == "executed").count(), 1);
        assert_eq!(counter.get(), 1);
    }
}

/// A request whose client goes away while its body is still arriving ends
/// before any decision: its entry says `dropped`.
#[tokio::test]
async fn a_request_dropped_before_its_decision_has_its_entry() {
    let sink = MemorySink::default();
    let audit = AuditLog::builder("api-1", signer())
        .start(sink.clone())
        .await
        .unwrap();
    let counter = Counter::default();
    let app = common::booking_router(counter.clone())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    let never = futures_util::stream::pending::<Result<bytes::Bytes, io::Error>>();
    let request = Request::post("/book")
        .header("authorization", AUTH)
        .header("idempotency-key", "gone")
        .body(Body::from_stream(never))
        .unwrap();
    // The body never arrives; the client gives up on it.
    let gave_up = tokio::time::timeout(Duration::from_millis(20), app.oneshot(request)).await;
    assert!(gave_up.is_err());
    audit.close().await.unwrap();
    let lines = sink.lines();
    assert_eq!(decisions(&lines), ["dropped"]);
    assert_eq!(entries(&lines)[0]["key"], sha256_hex(b"gone"));
    assert_eq!(counter.get(), 0);
}

/// A completion that landed but whose answer was lost is retried, refused
/// for its token (the record is already there), and then found to be its
/// own: recorded as `executed`, and nobody is said to have taken the key.
#[tokio::test(start_paused = true)]
async fn a_completion_whose_answer_was_lost_is_executed_not_fenced() {
    let logs = common::Captured::default();
    let _logging = tracing::subscriber::set_default(logs.subscriber(tracing::Level::DEBUG));
    let sink = MemorySink::default();
    let audit = AuditLog::builder("api-1", signer())
        .start(sink.clone())
        .await
        .unwrap();
    let counter = Counter::default();
    let store = FaultyStore::new(MemoryStore::default());
    store.set_fault_once(Op::Complete, Fault::AnswerLost);
    let layer = IdempotencyLayer::new(store.clone()).with_audit(audit.clone());
    let app = common::booking_router(counter.clone()).layer(layer.clone());
    let first = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(body_bytes(first).await, "booking 1: x");
    until(|| layer.stats().completions_pending == 0).await;
    assert!(
        store.calls(Op::Complete) >= 2,
        "the completion was tried again"
    );
    let replay = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    audit.close().await.unwrap();
    let lines = sink.lines();
    assert_eq!(decisions(&lines), ["executed", "replayed"], "{lines:#?}");
    let text = logs.text();
    assert!(!text.contains("took the key over"), "{text}");
    assert!(!text.contains("not recorded"), "{text}");
    assert_eq!(counter.get(), 1);
}

/// The store loses the claim while the handler runs (a restart without
/// persistence): the completion is refused, and the entry and the log say
/// the claim was gone, not that another request took the key over.
#[tokio::test(start_paused = true)]
async fn a_completion_after_the_store_lost_its_claim_says_so() {
    let logs = common::Captured::default();
    let _logging = tracing::subscriber::set_default(logs.subscriber(tracing::Level::WARN));
    let sink = MemorySink::default();
    let audit = AuditLog::builder("api-1", signer())
        .start(sink.clone())
        .await
        .unwrap();
    let counter = Counter::default();
    let (router, mut started, gate) = gated(&counter);
    let store = common::Altered::default();
    let app = router.layer(IdempotencyLayer::new(store.clone()).with_audit(audit.clone()));
    let first = tokio::spawn(app.clone().oneshot(post_with_key("k", "x")));
    assert_eq!(started.recv().await, Some(1));
    store.restart();
    gate.send(true).unwrap();
    body_bytes(first.await.unwrap().unwrap()).await;
    audit.close().await.unwrap();
    let lines = sink.lines();
    assert_eq!(decisions(&lines), ["claim_lost"], "{lines:#?}");
    let text = logs.text();
    assert!(text.contains("the claim is gone from the store"), "{text}");
    assert!(!text.contains("took the key over"), "{text}");
}

fn is_checkpoint(line: &str) -> bool {
    line.starts_with("{\"checkpoint\"")
}

/// An entry that continues `lines` as its writer would write it, as anyone
/// with write access can forge it: the formats are public.
fn forge_next(lines: &[String], decision: &str) -> String {
    let last = lines.iter().rev().find(|l| !is_checkpoint(l)).unwrap();
    let last: Value = serde_json::from_str(last).unwrap();
    // A request's entry, made to follow the last one (a `closed` entry has
    // no key to copy).
    let request = lines
        .iter()
        .rev()
        .find(|l| !is_checkpoint(l) && l.contains("\"key\":"))
        .unwrap();
    let mut value: serde_json::Map<String, Value> = serde_json::from_str(request).unwrap();
    let prev = last["hash"].as_str().unwrap().to_owned();
    let seq = last["seq"].as_u64().unwrap() + 1;
    value.insert("seq".into(), Value::from(seq));
    value.insert("prev".into(), Value::from(prev));
    value.insert("decision".into(), Value::from(decision));
    value.remove("hash");
    let hash = sha256_hex(
        serde_json_canonicalizer::to_string(&value)
            .unwrap()
            .as_bytes(),
    );
    value.insert("hash".into(), Value::from(hash));
    serde_json_canonicalizer::to_string(&value).unwrap()
}

/// Every append the writer makes ends with a checkpoint: whenever entries
/// are visible in the sink, every one of them is signed.
#[tokio::test]
async fn every_batch_ends_signed() {
    let sink = MemorySink::default();
    let signer = signer();
    let audit = AuditLog::builder("api-1", signer.clone())
        .start(sink.clone())
        .await
        .unwrap();
    let app = common::booking_router(Counter::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    for i in 0..6 {
        let key: &'static str = format!("batch-{i}").leak();
        body_bytes(app.clone().oneshot(post_with_key(key, "x")).await.unwrap()).await;
        until(|| entries(&sink.lines()).len() > i).await;
        let lines = sink.lines();
        assert!(is_checkpoint(lines.last().unwrap()), "{lines:?}");
        let chain = verify_lines(&lines, Some(&signer.verifier())).unwrap();
        assert!(chain.is_complete(), "{chain:?}");
    }
    audit.close().await.unwrap();
}

/// Entries forged after the last checkpoint are named by the verifier as
/// unsigned; a restart never signs them as its own: it adopts them behind a
/// `resumed` entry that counts them, and the verifier names them still.
#[tokio::test]
async fn a_forged_tail_is_named_before_and_after_a_restart() {
    let dir = scratch("forged-tail");
    let path = dir.join("audit.jsonl");
    let signer = write_chain(JsonlSink::open(&path).unwrap(), 4, 100).await;
    let key = signer.verifier();
    let mut lines = read_lines(&path);
    let forged_line = lines.len() as u64 + 1;
    lines.push(forge_next(&lines, "executed"));
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();

    let chain = verify_file(&path, Some(&key)).unwrap();
    assert_eq!(chain.unsigned_lines, Some((forged_line, forged_line)));
    assert!(!chain.is_complete());

    one_request(&path, &signer, "after").await;
    let lines = read_lines(&path);
    let resumed = entries(&lines)
        .into_iter()
        .find(|e| e["decision"] == "resumed")
        .expect("a resumed entry");
    assert_eq!(resumed["count"], 1);
    let chain = verify_file(&path, Some(&key)).unwrap();
    assert_eq!(chain.adopted, [(forged_line, forged_line)]);
    assert_eq!(chain.unsigned_tail(), 0, "signed since, but adopted");
    assert!(!chain.is_complete());
    // A key's history marks it too.
    let forged = &entries(&lines)[entries(&lines).len() - 3];
    let prefix = &forged["key"].as_str().unwrap()[..16];
    let (_, found) = tower_idempotency::audit::history(&path, prefix, Some(&key)).unwrap();
    let marked = found.iter().find(|h| h.line == forged_line).unwrap();
    assert!(marked.adopted && !marked.signed, "{marked}");
    assert!(marked.to_string().contains("adopted unsigned"), "{marked}");

    // A line far longer than any the writer writes is refused before it is
    // read whole.
    let long = dir.join("long.jsonl");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend(std::iter::repeat_n(b'x', 70 * 1024));
    bytes.push(b'\n');
    std::fs::write(&long, bytes).unwrap();
    match verify_file(&long, Some(&key)) {
        Err(tower_idempotency::audit::VerifyError::Broken(broken)) => {
            assert!(broken.reason.contains("longer than"), "{broken}")
        }
        other => panic!("{other:?}"),
    }
}

/// A lost signing key is never replaced silently: a writer with another
/// key refuses to continue the chain, and leaves it as it was.
#[tokio::test]
async fn a_chain_is_never_continued_by_another_key() {
    let dir = scratch("other-key");
    let path = dir.join("audit.jsonl");
    write_chain(JsonlSink::open(&path).unwrap(), 3, 100).await;
    let before = std::fs::read(&path).unwrap();
    let err = AuditLog::builder("api-1", AuditSigner::generate("test-audit").unwrap())
        .start(JsonlSink::open(&path).unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not signed by this writer's key"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

/// A checkpoint line given twice, and a junk signature line put before the
/// real one, are refused at their line.
#[tokio::test]
async fn duplicated_checkpoints_and_junk_signatures_are_refused() {
    let dir = scratch("duplicated");
    let path = dir.join("audit.jsonl");
    let signer = write_chain(JsonlSink::open(&path).unwrap(), 4, 100).await;
    let key = signer.verifier();
    let lines = read_lines(&path);
    let at = lines.iter().position(|l| is_checkpoint(l)).unwrap();
    let mut twice = lines.clone();
    twice.insert(at + 1, lines[at].clone());
    let broken = verify_lines(&twice, Some(&key)).unwrap_err();
    assert_eq!(broken.line, at as u64 + 2, "{broken}");
    assert!(broken.reason.contains("duplicated"), "{broken}");

    let mut value: serde_json::Map<String, Value> = serde_json::from_str(&lines[at]).unwrap();
    let note = value["checkpoint"].as_str().unwrap().to_owned();
    let (body, signature) = note.split_once("\n\n").unwrap();
    let (name, sig) = signature
        .trim_end()
        .strip_prefix("\u{2014} ")
        .unwrap()
        .split_once(' ')
        .unwrap();
    use base64::Engine as _;
    let mut raw = base64::engine::general_purpose::STANDARD
        .decode(sig)
        .unwrap();
    raw[10] ^= 1;
    let junk = format!(
        "\u{2014} {name} {}\n",
        base64::engine::general_purpose::STANDARD.encode(raw)
    );
    value.insert(
        "checkpoint".into(),
        Value::from(format!("{body}\n\n{junk}{signature}")),
    );
    let mut junked = lines.clone();
    junked[at] = serde_json_canonicalizer::to_string(&value).unwrap();
    let broken = verify_lines(&junked, Some(&key)).unwrap_err();
    assert_eq!(broken.line, at as u64 + 1, "{broken}");
}

/// Checkpoints (their tree, peaks and signatures) and the library's
/// inclusion and consistency proofs check in an independent implementation
/// written from the documented formats (`tests/independent/audit_check.py`,
/// Python with `cryptography`); a chain rewritten under another key fails
/// there too.
#[tokio::test]
async fn checkpoints_and_proofs_check_in_an_independent_implementation() {
    use base64::Engine as _;
    let b64 = |h: &[u8; 32]| base64::engine::general_purpose::STANDARD.encode(h);
    let dir = scratch("independent");
    let path = dir.join("audit.jsonl");
    let signer = write_chain(JsonlSink::open(&path).unwrap(), 11, 4).await;
    let key_file = dir.join("audit.key.pub");
    std::fs::write(&key_file, signer.verifier().to_string()).unwrap();
    let lines = read_lines(&path);
    let leaves: Vec<merkle::Hash> = lines
        .iter()
        .filter(|l| !is_checkpoint(l))
        .map(|l| merkle::leaf_hash(l.as_bytes()))
        .collect();
    let n = leaves.len() as u64;
    let mut inclusion = Vec::new();
    for size in [1, 5, n] {
        for index in 0..size {
            let proof = merkle::inclusion_proof(index, &leaves[..size as usize]).unwrap();
            assert!(merkle::verify_inclusion(
                index,
                size,
                &leaves[index as usize],
                &proof,
                &merkle::root(&leaves[..size as usize])
            ));
            inclusion.push(serde_json::json!({
                "index": index, "size": size, "leaf": b64(&leaves[index as usize]),
                "proof": proof.iter().map(b64).collect::<Vec<_>>(),
            }));
        }
    }
    let mut consistency = Vec::new();
    for second in [5, n] {
        for first in 0..=second {
            let proof = merkle::consistency_proof(first, &leaves[..second as usize]).unwrap();
            consistency.push(serde_json::json!({
                "first": first, "second": second,
                "proof": proof.iter().map(b64).collect::<Vec<_>>(),
            }));
        }
    }
    let proofs = dir.join("proofs.json");
    std::fs::write(
        &proofs,
        serde_json::json!({"inclusion": inclusion, "consistency": consistency}).to_string(),
    )
    .unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/independent/audit_check.py"
    );
    let run = |chain: &Path| {
        std::process::Command::new("python3")
            .arg(script)
            .arg(chain)
            .arg(&key_file)
            .arg(&proofs)
            .output()
            .expect("python3 runs (with the `cryptography` package)")
    };
    let out = run(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with(&format!("ok: {n} entries")), "{stdout}");

    let forged = dir.join("forged.jsonl");
    let rewritten = rewrite(&lines, &AuditSigner::generate("test-audit").unwrap());
    std::fs::write(&forged, rewritten.join("\n") + "\n").unwrap();
    let out = run(&forged);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `audit_verify`'s verdicts, as a user runs it: 0 complete, 1 tampered or
/// rolled back against a saved checkpoint, 3 intact but incomplete, 2 bad
/// arguments.
#[tokio::test]
async fn audit_verify_exit_codes() {
    let dir = scratch("verify-cli");
    let path = dir.join("audit.jsonl");
    let signer = write_chain(JsonlSink::open(&path).unwrap(), 6, 2).await;
    let key = dir.join("audit.jsonl.key.pub");
    std::fs::write(&key, format!("{}\n", signer.verifier())).unwrap();
    let binary = common::example("audit_verify");
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(&binary)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let saved = dir.join("saved.checkpoint");
    let (code, stdout) = run(&[
        path.as_os_str(),
        "--public-key".as_ref(),
        key.as_os_str(),
        "--latest-checkpoint".as_ref(),
        saved.as_os_str(),
    ]);
    assert_eq!(
        (code, stdout.as_str()),
        (0, "ok: 7 entries, signed through 7\n")
    );
    let note = std::fs::read_to_string(&saved).unwrap();
    assert!(
        note.starts_with("tower-idempotency/audit/api-1\n7\n"),
        "{note}"
    );

    // Cut back to its first checkpoint: a valid chain on its own, a
    // rollback against the saved checkpoint.
    let lines = read_lines(&path);
    let first = lines.iter().position(|l| is_checkpoint(l)).unwrap();
    let cut = dir.join("cut.jsonl");
    std::fs::write(&cut, lines[..=first].join("\n") + "\n").unwrap();
    assert_eq!(
        run(&[cut.as_os_str(), "--public-key".as_ref(), key.as_os_str()]).0,
        0
    );
    let (code, stdout) = run(&[
        cut.as_os_str(),
        "--public-key".as_ref(),
        key.as_os_str(),
        "--checkpoint".as_ref(),
        saved.as_os_str(),
    ]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.starts_with(&format!("{}: ", saved.display())),
        "{stdout}"
    );
    assert!(stdout.contains("rolled back"), "{stdout}");
    // Emptied: incomplete on its own, a rollback against the checkpoint.
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    assert_eq!(
        run(&[empty.as_os_str(), "--public-key".as_ref(), key.as_os_str()]).0,
        3
    );
    let with_saved = [
        empty.as_os_str(),
        "--public-key".as_ref(),
        key.as_os_str(),
        "--checkpoint".as_ref(),
        saved.as_os_str(),
    ];
    assert_eq!(run(&with_saved).0, 1);

    // A forged tail: intact, incomplete, its line named.
    let forged = dir.join("forged.jsonl");
    let mut more = lines.clone();
    more.push(forge_next(&lines, "executed"));
    std::fs::write(&forged, more.join("\n") + "\n").unwrap();
    let (code, stdout) = run(&[forged.as_os_str(), "--public-key".as_ref(), key.as_os_str()]);
    assert_eq!(code, 3, "{stdout}");
    let n = more.len();
    assert!(
        stdout.contains(&format!(
            "lines {n}-{n}: after the last checkpoint, not signed"
        )),
        "{stdout}"
    );

    // A changed byte: exit 1 at its line.
    let tampered = dir.join("tampered.jsonl");
    let mut changed = lines.clone();
    changed[0] = changed[0].replace("\"status\":201", "\"status\":200");
    std::fs::write(&tampered, changed.join("\n") + "\n").unwrap();
    let (code, stdout) = run(&[
        tampered.as_os_str(),
        "--public-key".as_ref(),
        key.as_os_str(),
    ]);
    assert_eq!(code, 1);
    assert!(stdout.starts_with("line 1: "), "{stdout}");

    // Bad arguments.
    assert_eq!(run(&[path.as_os_str()]).0, 2, "no key");
    assert_eq!(
        run(&[
            path.as_os_str(),
            "--public-key".as_ref(),
            dir.join("nope").as_os_str()
        ])
        .0,
        2
    );
    assert_eq!(run(&["--help".as_ref()]).0, 0);

    // A key, checkpoint or receipt file is read up to a bound: a device
    // that never ends is refused, not read until memory runs out.
    assert_eq!(
        run(&[
            path.as_os_str(),
            "--public-key".as_ref(),
            "/dev/zero".as_ref()
        ])
        .0,
        2
    );
    // The latest checkpoint never overwrites what the run reads.
    let before = std::fs::read(&path).unwrap();
    for out in [&path, &key] {
        let (code, _) = run(&[
            path.as_os_str(),
            "--public-key".as_ref(),
            key.as_os_str(),
            "--latest-checkpoint".as_ref(),
            out.as_os_str(),
        ]);
        assert_eq!(code, 2, "{out:?}");
    }
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // Nor by another name for the same file.
    let linked = dir.join("hard-link");
    std::fs::hard_link(&path, &linked).unwrap();
    let (code, _) = run(&[
        path.as_os_str(),
        "--public-key".as_ref(),
        key.as_os_str(),
        "--latest-checkpoint".as_ref(),
        linked.as_os_str(),
    ]);
    assert_eq!(code, 2);
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // A saved checkpoint is updated in place.
    let (code, _) = run(&[
        path.as_os_str(),
        "--public-key".as_ref(),
        key.as_os_str(),
        "--checkpoint".as_ref(),
        saved.as_os_str(),
        "--latest-checkpoint".as_ref(),
        saved.as_os_str(),
    ]);
    assert_eq!(code, 0);
    // The same file twice is a bad argument, not tampering.
    assert_eq!(
        run(&[
            path.as_os_str(),
            path.as_os_str(),
            "--public-key".as_ref(),
            key.as_os_str()
        ])
        .0,
        2
    );
    // Nor a file that is no saved checkpoint (a key, anything else).
    let other = dir.join("audit.jsonl.key");
    std::fs::write(&other, "a signing key").unwrap();
    let (code, _) = run(&[
        path.as_os_str(),
        "--public-key".as_ref(),
        key.as_os_str(),
        "--latest-checkpoint".as_ref(),
        other.as_os_str(),
    ]);
    assert_eq!(code, 2);
    assert_eq!(std::fs::read_to_string(&other).unwrap(), "a signing key");
    // A FIFO would block the read: refused at once.
    let fifo = dir.join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(
        run(&[path.as_os_str(), "--public-key".as_ref(), fifo.as_os_str()]).0,
        2
    );
    assert_eq!(
        run(&[fifo.as_os_str(), "--public-key".as_ref(), key.as_os_str()]).0,
        2
    );
}

/// With a secret, every digest in an entry is keyed: the fingerprint and
/// the response's SHA-256 cannot be matched against a guessed body offline.
/// Without one they are the plain digests.
#[tokio::test]
async fn with_a_secret_every_digest_is_keyed() {
    let entry = |secret: Option<&'static str>| async move {
        let sink = MemorySink::default();
        let mut builder = AuditLog::builder("api-1", signer());
        if let Some(secret) = secret {
            builder = builder.with_secret(secret);
        }
        let audit = builder.start(sink.clone()).await.unwrap();
        let app = common::booking_router(Counter::default())
            .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
        let body = body_bytes(app.oneshot(post_with_key("k-secret", "x")).await.unwrap()).await;
        audit.close().await.unwrap();
        (entries(&sink.lines())[0].clone(), body)
    };
    let (plain, body) = entry(None).await;
    assert_eq!(plain["response_sha256"], sha256_hex(&body));
    let (keyed, _) = entry(Some("s3cret")).await;
    assert_eq!(keyed["decision"], "executed");
    for member in ["fingerprint", "response_sha256", "key", "scope"] {
        let (a, b) = (&plain[member], &keyed[member]);
        assert!(a.is_string() && b.is_string(), "{member}");
        assert_ne!(a, b, "{member} is keyed under the secret");
    }
}

/// A new chain file is readable by its owner only.
#[cfg(unix)]
#[tokio::test]
async fn a_new_chain_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("mode");
    let path = dir.join("audit.jsonl");
    write_chain(JsonlSink::open(&path).unwrap(), 1, 100).await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    let gid = std::fs::metadata(&dir).unwrap();
    let group_path = dir.join("group.jsonl");
    let _sink =
        JsonlSink::open_for_group(&group_path, std::os::unix::fs::MetadataExt::gid(&gid)).unwrap();
    let mode = std::fs::metadata(&group_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "{mode:o}");
}

/// A signing key's public file is written once and never replaced; a
/// missing key whose public file is still there is an error, never a new
/// key; the demo refuses to start on a chain whose key went missing.
#[tokio::test]
async fn a_lost_key_is_never_replaced_silently() {
    let dir = scratch("lost-key");
    let key = dir.join("audit.jsonl.key");
    let public = dir.join("audit.jsonl.key.pub");
    let (signer, created) = AuditSigner::load_or_generate(&key, "k").unwrap();
    assert!(created);
    assert_eq!(
        std::fs::read_to_string(&public).unwrap().trim(),
        signer.verifier().to_string()
    );
    let (again, created) = AuditSigner::load_or_generate(&key, "k").unwrap();
    assert!(!created);
    assert_eq!(again.verifier(), signer.verifier());
    std::fs::remove_file(&key).unwrap();
    let err = AuditSigner::load_or_generate(&key, "k").unwrap_err();
    assert!(err.to_string().contains("restore the key"), "{err}");
    assert!(!key.exists(), "no new key was made");
    std::fs::write(
        &key,
        format!("{}\n", AuditSigner::generate("k").unwrap().to_secret_text()),
    )
    .unwrap();
    let err = AuditSigner::load_or_generate(&key, "k").unwrap_err();
    assert!(err.to_string().contains("never replaced"), "{err}");

    // The demo, on a chain that holds entries, with its key gone.
    let chain = dir.join("demo.jsonl");
    let demo_signer = write_chain(JsonlSink::open(&chain).unwrap(), 2, 100).await;
    let _ = demo_signer;
    let out = std::process::Command::new(common::example("booking_server"))
        .arg("127.0.0.1:0")
        .env("IDEMPOTENCY_AUDIT", &chain)
        .env_remove("IDEMPOTENCY_AUDIT_SIGNING_KEY")
        .env_remove("IDEMPOTENCY_STORE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("restore the key"), "{stderr}");
    assert!(!dir.join("demo.jsonl.key").exists(), "no new key was made");
}

/// A sink that hangs (rather than fails) makes the log unhealthy after the
/// append timeout: keyed requests are refused and nothing runs, until it
/// answers again; the refusals are counted.
#[tokio::test]
async fn a_hung_sink_is_unhealthy_after_the_append_timeout() {
    let sink = MemorySink::default();
    let audit = AuditLog::builder("api-1", signer())
        .with_append_timeout(Duration::from_millis(50))
        .start(sink.clone())
        .await
        .unwrap();
    let counter = Counter::default();
    let app = common::booking_router(counter.clone())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    sink.held.store(true, Ordering::SeqCst);
    let first = app
        .clone()
        .oneshot(post_with_key("hung-1", "x"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    until(|| !audit.is_healthy()).await;
    let (status, code, _) = problem(
        app.clone()
            .oneshot(post_with_key("hung-2", "x"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status.as_u16(), code.as_str()), (503, "audit-unavailable"));
    assert_eq!(counter.get(), 1, "nothing ran while the sink hung");
    sink.held.store(false, Ordering::SeqCst);
    sink.release.notify_waiters();
    until(|| audit.is_healthy()).await;
    let third = app
        .clone()
        .oneshot(post_with_key("hung-3", "x"))
        .await
        .unwrap();
    assert_eq!(third.status(), StatusCode::CREATED);
    audit.close().await.unwrap();
    let lines = sink.lines();
    assert!(
        entries(&lines)
            .iter()
            .any(|e| e["decision"] == "lost" && e["count"] == 1),
        "{lines:?}"
    );
}

/// A request takes its place in the fail-closed queue once its body is
/// read: uploads that stall hold none, and requests behind them run.
#[tokio::test]
async fn slow_uploads_hold_no_place_in_the_queue() {
    use futures_util::StreamExt;
    use tower::{Layer, Service};
    let sink = MemorySink::default();
    let audit = AuditLog::builder("api-1", signer())
        .with_queue_capacity(4)
        .start(sink.clone())
        .await
        .unwrap();
    let counter = Counter::default();
    let mut app = IdempotencyLayer::new(MemoryStore::default())
        .with_audit(audit.clone())
        .layer(common::booking_router(counter.clone()));
    let mut stalled = Vec::new();
    for i in 0..4 {
        let body =
            futures_util::stream::iter([Ok::<_, io::Error>(bytes::Bytes::from_static(b"x"))])
                .chain(futures_util::stream::pending());
        let request = Request::post("/book")
            .header("authorization", AUTH)
            .header("idempotency-key", format!("slow-{i}"))
            .body(Body::from_stream(body))
            .unwrap();
        tower::ServiceExt::<Request<Body>>::ready(&mut app)
            .await
            .unwrap();
        stalled.push(tokio::spawn(app.call(request)));
    }
    for i in 0..3 {
        let key: &'static str = format!("quick-{i}").leak();
        let response = app.clone().oneshot(post_with_key(key, "x")).await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::CREATED,
            "request {i} behind the uploads"
        );
        // Its entry written: the queue is as free as before it.
        until(|| entries(&sink.lines()).len() > i).await;
    }
    assert_eq!(counter.get(), 3);
    for upload in stalled {
        upload.abort();
    }
    audit.close().await.unwrap();
}

/// A chain file truncated under its writer (a `copytruncate` rotation) is
/// refused, never padded: the log turns unhealthy, requests are refused,
/// and the file holds no NUL bytes.
#[tokio::test]
async fn a_file_truncated_under_the_writer_is_refused_never_padded() {
    let dir = scratch("copytruncate");
    let path = dir.join("audit.jsonl");
    let audit = AuditLog::builder("api-1", signer())
        .with_close_timeout(Duration::from_millis(200))
        .start(JsonlSink::open(&path).unwrap())
        .await
        .unwrap();
    let counter = Counter::default();
    let app = common::booking_router(counter.clone())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    body_bytes(
        app.clone()
            .oneshot(post_with_key("before", "x"))
            .await
            .unwrap(),
    )
    .await;
    until(|| std::fs::metadata(&path).unwrap().len() > 0).await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    body_bytes(
        app.clone()
            .oneshot(post_with_key("after", "x"))
            .await
            .unwrap(),
    )
    .await;
    until(|| !audit.is_healthy()).await;
    let (status, code, _) = problem(
        app.clone()
            .oneshot(post_with_key("refused", "x"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status.as_u16(), code.as_str()), (503, "audit-unavailable"));
    assert_eq!(counter.get(), 2);
    let _ = audit.close().await;
    let bytes = std::fs::read(&path).unwrap();
    assert!(!bytes.contains(&0), "padded with NUL bytes");
    assert!(bytes.is_empty(), "nothing written over the truncation");
}

/// A restart refuses a chain whose end is not what its writer left: an old
/// entry and its checkpoint copied to the end, the last signed entry changed
/// in place, the last signed entry given twice, the last checkpoint line
/// made non-canonical. It never signs a second tree of a size it signed.
#[tokio::test]
async fn a_restart_refuses_an_end_that_is_not_its_writers() {
    let dir = scratch("replayed-end");
    let path = dir.join("audit.jsonl");
    let signer = write_chain(JsonlSink::open(&path).unwrap(), 4, 1).await;
    let lines = read_lines(&path);
    let cps: Vec<usize> = (0..lines.len())
        .filter(|&i| is_checkpoint(&lines[i]))
        .collect();
    let last_cp = *cps.last().unwrap();
    let first_cp = cps[0];
    let mut variants: Vec<(&str, Vec<String>)> = Vec::new();
    // The first entry and its checkpoint, copied to the end.
    let mut replayed = lines.clone();
    replayed.extend_from_slice(&lines[first_cp - 1..=first_cp]);
    variants.push(("an old entry and checkpoint copied to the end", replayed));
    // The last signed entry changed (its hash recomputed).
    let mut changed = lines.clone();
    let mut value: serde_json::Map<String, Value> =
        serde_json::from_str(&lines[last_cp - 1]).unwrap();
    value.insert("status".into(), Value::from(299));
    value.remove("hash");
    let hash = sha256_hex(
        serde_json_canonicalizer::to_string(&value)
            .unwrap()
            .as_bytes(),
    );
    value.insert("hash".into(), Value::from(hash));
    changed[last_cp - 1] = serde_json_canonicalizer::to_string(&value).unwrap();
    variants.push(("the last signed entry changed", changed));
    // The last signed entry given twice.
    let mut twice = lines.clone();
    twice.insert(last_cp - 1, lines[last_cp - 1].clone());
    variants.push(("the last signed entry twice", twice));
    // The last checkpoint line with a space.
    let mut spaced = lines.clone();
    spaced[last_cp] = spaced[last_cp].replacen("{\"checkpoint\":", "{\"checkpoint\": ", 1);
    variants.push(("a non-canonical last checkpoint", spaced));
    for (why, variant) in variants {
        let file = dir.join("variant.jsonl");
        std::fs::write(&file, variant.join("\n") + "\n").unwrap();
        let before = std::fs::read(&file).unwrap();
        let err = AuditLog::builder("api-1", signer.clone())
            .start(JsonlSink::open(&file).unwrap())
            .await
            .err()
            .unwrap_or_else(|| panic!("{why}: the restart continued it"));
        assert!(err.to_string().contains("chain"), "{why}: {err}");
        assert_eq!(
            std::fs::read(&file).unwrap(),
            before,
            "{why}: left as it was"
        );
        std::fs::remove_file(&file).unwrap();
    }
    // The chain as its writer left it restarts.
    let audit = AuditLog::builder("api-1", signer.clone())
        .start(JsonlSink::open(&path).unwrap())
        .await
        .unwrap();
    audit.close().await.unwrap();
}

/// A key rotation is a signed entry naming the next key, and the checkpoint
/// after it carries both signatures: a verifier given the first key learns
/// the next from the chain; checkpoints the old key signs after the
/// rotation, a rotation nobody signed, and a restart with the old key are
/// refused.
#[tokio::test]
async fn a_key_rotation_hands_signing_to_the_next_key() {
    use tower_idempotency::audit::{Trust, verify_lines_with};
    let dir = scratch("rotation");
    let path = dir.join("audit.jsonl");
    let old = signer();
    let next = AuditSigner::generate("test-audit-2").unwrap();
    let audit = AuditLog::builder("api-1", old.clone())
        .start(JsonlSink::open(&path).unwrap())
        .await
        .unwrap();
    let app = common::booking_router(Counter::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    for key in ["r1", "r2"] {
        body_bytes(app.clone().oneshot(post_with_key(key, "x")).await.unwrap()).await;
    }
    until(|| {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .matches("\"decision\":\"executed\"")
            .count()
            == 2
    })
    .await;
    let seq = audit.rotate_key(next.clone()).await.unwrap();
    assert_eq!(seq, 3);
    for key in ["r3", "r4"] {
        body_bytes(app.clone().oneshot(post_with_key(key, "x")).await.unwrap()).await;
    }
    audit.close().await.unwrap();

    let lines = read_lines(&path);
    let rotation = lines
        .iter()
        .position(|l| l.contains("\"decision\":\"key_rotated\""))
        .unwrap();
    assert!(
        lines[rotation].contains(&format!("\"next_key\":\"{}\"", next.verifier())),
        "{}",
        lines[rotation]
    );
    assert!(lines[rotation].contains(&format!("\"seq\":{seq},")));
    let cosigned: Value = serde_json::from_str(&lines[rotation + 1]).unwrap();
    let note = cosigned["checkpoint"].as_str().unwrap();
    assert_eq!(note.matches('\u{2014}').count(), 2, "{note}");

    let with_old = Trust::new().with_key(old.verifier());
    let chain = verify_lines_with(&lines, &with_old).unwrap();
    assert!(chain.is_complete());
    assert_eq!(chain.entries, 6, "four requests, the rotation, the close");
    assert_eq!(chain.rotations.len(), 1);
    assert_eq!(chain.rotations[0].line, rotation as u64 + 1);
    assert_eq!(chain.rotations[0].key, next.verifier());
    // Only the next key: what came before is not its to vouch for.
    let with_next = Trust::new().with_key(next.verifier());
    assert!(verify_lines_with(&lines, &with_next).is_err());

    // The old key keeps signing after the rotation: refused.
    let mut stale = lines.clone();
    let last = stale.len() - 1;
    let tail_value: Value = serde_json::from_str(&stale[last]).unwrap();
    let body = tail_value["checkpoint"]
        .as_str()
        .unwrap()
        .split_once("\n\n")
        .unwrap()
        .0
        .to_owned()
        + "\n";
    stale[last] = serde_json::to_string(&serde_json::json!({
        "checkpoint": key_sign(&old, &body),
        "peaks": tail_value["peaks"],
    }))
    .unwrap();
    let broken = verify_lines_with(&stale, &with_old).unwrap_err();
    assert_eq!(broken.line, last as u64 + 1, "{broken}");

    // A rotation to a forger's key, with a checkpoint only the forger
    // signs: refused at that checkpoint.
    let forger = AuditSigner::generate("forger").unwrap();
    let mut forged: Vec<String> = lines[..rotation].to_vec();
    let mut entry: serde_json::Map<String, Value> =
        serde_json::from_str(&forge_next(&forged, "key_rotated")).unwrap();
    entry.insert(
        "next_key".into(),
        Value::from(forger.verifier().to_string()),
    );
    entry.remove("hash");
    let hash = sha256_hex(
        serde_json_canonicalizer::to_string(&entry)
            .unwrap()
            .as_bytes(),
    );
    entry.insert("hash".into(), Value::from(hash));
    forged.push(serde_json_canonicalizer::to_string(&entry).unwrap());
    let mut tree = merkle::Tree::new();
    let mut last_leaf = [0; 32];
    for line in forged.iter().filter(|l| !is_checkpoint(l)) {
        last_leaf = merkle::leaf_hash(line.as_bytes());
        tree.push(last_leaf);
    }
    forged.push(forge_checkpoint(&forger, &tree, &last_leaf));
    let broken = verify_lines_with(&forged, &with_old).unwrap_err();
    assert_eq!(broken.line, forged.len() as u64, "{broken}");

    // A restart with the old key does not continue a chain it handed on.
    let mut cut: Vec<String> = lines[..=rotation + 1].to_vec();
    cut.push(String::new());
    std::fs::write(&path, cut.join("\n")).unwrap();
    let err = AuditLog::builder("api-1", old.clone())
        .start(JsonlSink::open(&path).unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("handed signing"), "{err}");
    // The next key continues it.
    let again = AuditLog::builder("api-1", next.clone())
        .start(JsonlSink::open(&path).unwrap())
        .await
        .unwrap();
    again.close().await.unwrap();
    assert!(
        verify_file_with_key(&path, &with_old),
        "the continued chain verifies"
    );

    // A crash tore the rotation's batch: its entry is there, the checkpoint
    // both keys sign is not. The rotation did not happen (rotate_key never
    // answered): the old key continues the chain, the rotation's entry is
    // adopted unsigned, and nothing is handed to the next key.
    let mut torn: Vec<String> = lines[..=rotation].to_vec();
    torn.push(String::new());
    std::fs::write(&path, torn.join("\n")).unwrap();
    let err = AuditLog::builder("api-1", next.clone())
        .start(JsonlSink::open(&path).unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not signed by this writer's key"),
        "{err}"
    );
    one_request(&path, &old, "r5").await;
    let chain = verify_lines_with(read_lines(&path), &with_old).unwrap();
    assert!(chain.rotations.is_empty(), "{:?}", chain.rotations);
    assert_eq!(
        chain.adopted.len(),
        1,
        "the rotation's entry, adopted unsigned"
    );
    assert_eq!(chain.adopted[0], (rotation as u64 + 1, rotation as u64 + 1));
    assert!(verify_lines_with(read_lines(&path), &with_next).is_err());
}

fn verify_file_with_key(path: &Path, trust: &tower_idempotency::audit::Trust) -> bool {
    tower_idempotency::audit::verify_file_with(path, trust).is_ok_and(|c| c.is_complete())
}

/// A rotated file closes at its size after a checkpoint, and the next
/// begins with a `continued` entry naming that checkpoint: the files
/// verify as one chain and each on its own; a missing or reordered file is
/// found; a rotation cut short by a crash (closed file renamed, new one
/// empty) is finished at the next start.
#[tokio::test]
async fn rotated_files_verify_as_one_chain() {
    use tower_idempotency::audit::{Trust, verify_files_with};
    let dir = scratch("file-rotation");
    let path = dir.join("audit.jsonl");
    let signer = signer();
    let trust = Trust::new().with_key(signer.verifier());
    let audit = AuditLog::builder("api-1", signer.clone())
        .start(JsonlSink::open(&path).unwrap().with_max_bytes(3000))
        .await
        .unwrap();
    let app = common::booking_router(Counter::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    let executed = |path: &Path| {
        let mut files = JsonlSink::rotated_files(path).unwrap();
        files.push(path.to_owned());
        files
            .iter()
            .map(|f| {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .matches("\"decision\":\"executed\"")
                    .count()
            })
            .sum::<usize>()
    };
    for i in 0..24 {
        let key: &'static str = format!("f{i}").leak();
        body_bytes(app.clone().oneshot(post_with_key(key, "x")).await.unwrap()).await;
        // One batch each, so the file grows past its size between them.
        until(|| executed(&path) == i + 1).await;
    }
    audit.close().await.unwrap();
    let mut files = JsonlSink::rotated_files(&path).unwrap();
    assert!(files.len() >= 2, "{files:?}");
    files.push(path.clone());
    let chain = verify_files_with(&files, &trust).unwrap();
    assert!(chain.is_complete());
    let total: usize = files
        .iter()
        .map(|f| read_lines(f).iter().filter(|l| !is_checkpoint(l)).count())
        .sum();
    assert_eq!(chain.entries, total as u64);
    for (i, file) in files.iter().enumerate() {
        let lines = read_lines(file);
        assert!(is_checkpoint(lines.last().unwrap()), "{file:?} ends signed");
        let alone = verify_files_with(&[file], &trust).unwrap();
        assert!(alone.is_complete(), "{file:?} verifies on its own");
        if i > 0 {
            assert!(
                lines[0].contains("\"decision\":\"continued\""),
                "{}",
                lines[0]
            );
            assert!(alone.first_seq > 1);
        }
    }
    // A file left out, and two in the wrong order.
    let mut gap = files.clone();
    gap.remove(1);
    let broken = verify_files_with(&gap, &trust).unwrap_err().to_string();
    assert!(
        broken.contains("previous file's final checkpoint"),
        "{broken}"
    );
    let mut swapped = files.clone();
    swapped.swap(0, 1);
    assert!(verify_files_with(&swapped, &trust).is_err());
    // Only the first file verifies from seq 1 on its own; a later one
    // alone is no whole chain when held against a checkpoint beyond it.
    let cli = std::process::Command::new(common::example("audit_verify"))
        .args(&files)
        .arg("--public-key")
        .arg({
            let key = dir.join("key.pub");
            std::fs::write(&key, signer.verifier().to_string()).unwrap();
            key
        })
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&cli.stdout);
    assert_eq!(cli.status.code(), Some(0), "{stdout}");
    assert_eq!(
        stdout,
        format!("ok: {total} entries, signed through {total}\n")
    );
    // The first file left out, held against a checkpoint it held: the
    // files that held it are missing.
    let first = read_lines(&files[0]);
    let early = dir.join("early.checkpoint");
    let note: Value =
        serde_json::from_str(first.iter().find(|l| is_checkpoint(l)).unwrap()).unwrap();
    std::fs::write(&early, note["checkpoint"].as_str().unwrap()).unwrap();
    let later = verify_files_with(
        &files[1..],
        &Trust::new()
            .with_key(signer.verifier())
            .with_checkpoint("early", &std::fs::read_to_string(&early).unwrap())
            .unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        later.contains("files that held them are missing"),
        "{later}"
    );
    // The first file's final checkpoint is the one the next file's
    // `continued` entry names: held against it, the later files verify.
    let last_of_first: Value =
        serde_json::from_str(first.iter().rev().find(|l| is_checkpoint(l)).unwrap()).unwrap();
    let named = verify_files_with(
        &files[1..],
        &Trust::new()
            .with_key(signer.verifier())
            .with_checkpoint("named", last_of_first["checkpoint"].as_str().unwrap())
            .unwrap(),
    );
    assert!(named.is_ok(), "{named:?}");

    // A rotation cut short: the closed file renamed, the new one empty.
    let crash = dir.join("crash.jsonl");
    let crash_signer = write_chain(JsonlSink::open(&crash).unwrap(), 4, 100).await;
    let last_seq = read_lines(&crash)
        .iter()
        .filter(|l| !is_checkpoint(l))
        .count();
    let closed = dir.join(format!("crash.jsonl.{last_seq:020}"));
    std::fs::rename(&crash, &closed).unwrap();
    std::fs::write(&crash, "").unwrap();
    let audit = AuditLog::builder("api-1", crash_signer.clone())
        .start(JsonlSink::open(&crash).unwrap())
        .await
        .unwrap();
    audit.close().await.unwrap();
    let lines = read_lines(&crash);
    assert!(lines[0].contains("\"decision\":\"continued\""), "{lines:?}");
    let trust = Trust::new().with_key(crash_signer.verifier());
    assert!(
        verify_files_with(&[&closed, &crash], &trust)
            .unwrap()
            .is_complete()
    );
    let whole = read_lines(&crash);

    // A crash tore the new file's first line: the start cuts it and goes on
    // from the closed file, never from seq 1 again.
    std::fs::write(&crash, &whole[0][..whole[0].len() / 2]).unwrap();
    one_request(&crash, &crash_signer, "after-torn").await;
    let lines = read_lines(&crash);
    assert!(lines[0].contains("\"decision\":\"continued\""), "{lines:?}");
    assert!(!lines[0].contains("\"seq\":1,"), "{}", lines[0]);
    let chain = verify_files_with(&[&closed, &crash], &trust).unwrap();
    assert_eq!(chain.cut.len(), 1, "the torn line is counted");
    // The closed file's entries (its close among them), then `continued`,
    // `resumed`, the request and the close.
    assert_eq!(chain.entries as usize, last_seq + 4);

    // A crash cut the new file's first batch before its checkpoint: the
    // `continued` entry is adopted unsigned, with a torn line after it cut.
    std::fs::write(&crash, format!("{}\n{{\"seq\":", whole[0])).unwrap();
    one_request(&crash, &crash_signer, "after-unsigned").await;
    let chain = verify_files_with(&[&closed, &crash], &trust).unwrap();
    assert_eq!(chain.adopted.len(), 1, "the continued entry, adopted");
    assert_eq!(chain.cut.len(), 1);
    assert_eq!(chain.entries as usize, last_seq + 4);
}

/// After a rotation, the retired key vouches only for what came before
/// it: a receipt it signs with a later time is refused (a leaked old key
/// cannot frame the log), while the receipts it gave before the rotation
/// still stand; and with no trusted key, a key the chain names is no
/// authority at all.
#[tokio::test]
async fn a_retired_key_cannot_vouch_for_later_receipts() {
    use tower_idempotency::audit::{Receipt, ReceiptError, Trust, check_receipt};
    let dir = scratch("retired-receipts");
    let path = dir.join("audit.jsonl");
    let old = signer();
    let next = AuditSigner::generate("test-audit-2").unwrap();
    let audit = AuditLog::builder("api-1", old.clone())
        .with_receipts()
        .start(JsonlSink::open(&path).unwrap())
        .await
        .unwrap();
    let app = common::booking_router(Counter::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    let response = app.clone().oneshot(post_with_key("t1", "x")).await.unwrap();
    let before = Receipt::from_headers(response.headers()).unwrap().unwrap();
    body_bytes(response).await;
    until(|| {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .contains("\"decision\":\"executed\"")
    })
    .await;
    audit.rotate_key(next.clone()).await.unwrap();
    let response = app.clone().oneshot(post_with_key("t2", "x")).await.unwrap();
    let after = Receipt::from_headers(response.headers()).unwrap().unwrap();
    body_bytes(response).await;
    audit.close().await.unwrap();
    let trust = Trust::new().with_key(old.verifier());
    assert!(
        after.verify(&[next.verifier()]).is_ok(),
        "signed by the new key"
    );
    for receipt in [&before, &after] {
        let (_, found) = check_receipt(&path, &trust, receipt).unwrap();
        assert!(found.unwrap().signed);
    }
    // The old key, leaked, signs a receipt dated after the rotation.
    let body = format!(
        "tower-idempotency/receipt/api-1\n{}\nstatus 200\nkey -\ntime 2999-01-01T00:00:00.000Z\n",
        "ab".repeat(16)
    );
    let forged = Receipt::parse(&key_sign(&old, &body)).unwrap();
    let (_, found) = check_receipt(&path, &trust, &forged).unwrap();
    match found {
        Err(ReceiptError::Broken(why)) => assert!(why.contains("retired key"), "{why}"),
        other => panic!("{other:?}"),
    }
    // No trusted key: nothing vouches.
    let (_, found) = check_receipt(&path, &Trust::new(), &after).unwrap();
    assert_eq!(found.unwrap_err(), ReceiptError::Forged);
}

/// A sink whose append panics, as a bug in a sink would.
struct PanickingSink(Arc<AtomicBool>);

impl AuditSink for PanickingSink {
    async fn tail(&mut self) -> io::Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn append(&mut self, _: &[AuditLine]) -> io::Result<()> {
        self.0.store(true, Ordering::SeqCst);
        panic!("a sink's bug");
    }
}

/// A writer that died of a panic leaves no one waiting: the log is
/// unhealthy, a key rotation asked for afterwards is answered `Closed`, and
/// close says the writer failed.
#[tokio::test(start_paused = true)]
async fn a_writer_that_panicked_answers_rotations_and_turns_unhealthy() {
    let panicked = Arc::new(AtomicBool::new(false));
    let audit = AuditLog::builder("api-1", signer())
        .start(PanickingSink(panicked.clone()))
        .await
        .unwrap();
    let app = common::booking_router(Counter::default())
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
    body_bytes(app.clone().oneshot(post_with_key("p1", "x")).await.unwrap()).await;
    until(|| panicked.load(Ordering::SeqCst)).await;
    tokio::task::yield_now().await;
    assert!(!audit.is_healthy());
    let next = AuditSigner::generate("test-audit-2").unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(60), audit.rotate_key(next))
        .await
        .expect("a rotation is answered, not left waiting");
    assert!(matches!(answered, Err(AuditError::Closed)), "{answered:?}");
    let response = app.oneshot(post_with_key("p2", "x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(audit.close().await.is_err());
}

/// Which run of the writer a receipt was issued in is read from the chain,
/// not from clocks: a receipt whose entry a crash lost stays "lost in that
/// stop" when the next run's clock was behind; an unsigned `closed` line
/// added after the crash excuses nothing and blames nothing; a clean close
/// at a file's size bound is no crash at the next start; a receipt checked
/// against later files alone is not called missing.
#[tokio::test]
async fn a_receipt_is_held_to_its_own_run() {
    use tower_idempotency::audit::{ReceiptError, Trust, check_receipt};
    let dir = scratch("receipt-runs");
    let path = dir.join("audit.jsonl");
    let signer = signer();
    let trust = Trust::new().with_key(signer.verifier());
    // Run 1: one entry durable, then a crash before the second one was.
    let (audit, app) = receipts_app(&path, &signer).await;
    book_receipt(&app, "run1-a").await;
    until(|| {
        let lines = read_lines(&path);
        lines
            .iter()
            .any(|l| l.contains("\"decision\":\"executed\""))
            && lines.last().is_some_and(|l| is_checkpoint(l))
    })
    .await;
    let at_crash = read_lines(&path);
    let lost = book_receipt(&app, "run1-b").await;
    audit.close().await.unwrap();
    std::fs::write(&path, at_crash.join("\n") + "\n").unwrap();
    let verdict = |path: &Path| check_receipt(path, &trust, &lost).unwrap().1;
    assert!(matches!(verdict(&path), Err(ReceiptError::Unwritten(_))));

    // An unsigned `closed` line after the crash: still not closed.
    let mut framed = at_crash.clone();
    framed.push(forge_next(&at_crash, "closed"));
    let framed_path = dir.join("framed.jsonl");
    std::fs::write(&framed_path, framed.join("\n") + "\n").unwrap();
    let why = verdict(&framed_path).unwrap_err();
    assert!(matches!(why, ReceiptError::Unwritten(_)), "{why}");
    assert!(why.to_string().contains("has not been closed"), "{why}");

    // Runs 2 and 3 start on the crashed chain and close; then run 2's clock
    // is made a minute behind run 1's (the chain signed again with the key).
    for key in ["run2", "run3"] {
        let (audit, app) = receipts_app(&path, &signer).await;
        book_receipt(&app, key).await;
        audit.close().await.unwrap();
    }
    let lines = read_lines(&path);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("\"after\":\"crash\""))
            .count(),
        1,
        "run 3 starts after a clean close: {lines:#?}"
    );
    let run2 = lines
        .iter()
        .position(|l| l.contains("\"after\":\"crash\""))
        .unwrap();
    let run2_end = run2
        + lines[run2..]
            .iter()
            .position(|l| l.contains("\"decision\":\"closed\""))
            .unwrap();
    let skewed = resign(&lines, &signer, |i, value| {
        if (run2..=run2_end).contains(&i) {
            let time = humantime::parse_rfc3339(value["time"].as_str().unwrap()).unwrap();
            let behind = time - Duration::from_secs(60);
            value.insert(
                "time".into(),
                Value::from(humantime::format_rfc3339_millis(behind).to_string()),
            );
        }
    });
    let skewed_path = dir.join("skewed.jsonl");
    std::fs::write(&skewed_path, skewed.join("\n") + "\n").unwrap();
    let why = verdict(&skewed_path).unwrap_err();
    assert!(why.to_string().contains("lost in that stop"), "{why}");
    assert!(
        why.to_string().contains(&format!("line {}", run2 + 1)),
        "{why}"
    );
}

/// A log closed when its file is past its size bound ends in its `closed`
/// entry (the rotation waits for the next start), so the next start is
/// not taken for one after a crash.
#[tokio::test]
async fn a_close_at_the_size_bound_is_a_clean_close() {
    let dir = scratch("close-at-bound");
    let path = dir.join("audit.jsonl");
    let signer = signer();
    for key in ["b1", "b2", "b3"] {
        let audit = AuditLog::builder("api-1", signer.clone())
            .start(JsonlSink::open(&path).unwrap().with_max_bytes(1))
            .await
            .unwrap();
        let app = common::booking_router(Counter::default())
            .layer(IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone()));
        body_bytes(app.oneshot(post_with_key(key, "x")).await.unwrap()).await;
        audit.close().await.unwrap();
        let lines = read_lines(&path);
        let last_entry = lines.iter().rev().find(|l| !is_checkpoint(l)).unwrap();
        assert!(last_entry.contains("\"decision\":\"closed\""), "{lines:#?}");
    }
    let mut files = JsonlSink::rotated_files(&path).unwrap();
    files.push(path.clone());
    let all: Vec<String> = files.iter().flat_map(|f| read_lines(f)).collect();
    assert!(files.len() >= 2, "{files:?}");
    assert!(
        !all.iter().any(|l| l.contains("\"after\":\"crash\"")),
        "{all:#?}"
    );
}

/// A run killed before its first batch was written is still in the chain:
/// its `started` entry is durable before it gives a receipt, so the next
/// start records the crash, and the run's lost receipt reads as lost in it
/// rather than as left out by the clean close after.
#[tokio::test]
async fn a_run_killed_before_its_first_batch_is_still_seen() {
    use tower_idempotency::audit::{ReceiptError, Trust, check_receipt};
    let dir = scratch("killed-early");
    let path = dir.join("audit.jsonl");
    let signer = signer();
    let run = |key: &'static str| {
        let (path, signer) = (path.clone(), signer.clone());
        async move {
            let (audit, app) = receipts_app(&path, &signer).await;
            let at_start = read_lines(&path);
            let receipt = book_receipt(&app, key).await;
            audit.close().await.unwrap();
            (receipt, at_start)
        }
    };
    run("first").await;
    let (lost, at_start) = run("killed").await;
    // Killed before its first batch: the chain as the run began it.
    std::fs::write(&path, at_start.join("\n") + "\n").unwrap();
    assert!(at_start.last().is_some_and(|l| is_checkpoint(l)));
    run("after").await;
    let trust = Trust::new().with_key(signer.verifier());
    let why = check_receipt(&path, &trust, &lost).unwrap().1.unwrap_err();
    assert!(matches!(why, ReceiptError::Unwritten(_)), "{why}");
    assert!(why.to_string().contains("lost in that stop"), "{why}");
}

/// A log that left a decision out and closed cleanly is held to it: an
/// unsigned line added after the close, carrying the receipt's id or any
/// other id of its run, excuses nothing, before a restart or after one.
#[tokio::test]
async fn an_omission_stays_an_omission_whatever_is_appended() {
    use tower_idempotency::audit::{ReceiptError, Trust, check_receipt};
    let dir = scratch("omission");
    let path = dir.join("audit.jsonl");
    let signer = signer();
    let trust = Trust::new().with_key(signer.verifier());
    let (audit, app) = receipts_app(&path, &signer).await;
    let receipts = [
        book_receipt(&app, "o1").await,
        book_receipt(&app, "o2").await,
    ];
    audit.close().await.unwrap();
    // The log leaves o2's decision out (whoever holds the key can).
    let mut omitted: Vec<String> = read_lines(&path)
        .into_iter()
        .filter(|l| !l.contains(&format!("\"receipt\":\"{}\"", receipts[1].id())))
        .collect();
    omitted.dedup_by(|b, a| is_checkpoint(a) && is_checkpoint(b));
    let mut seq = 0;
    let omitted = resign(&omitted, &signer, |_, value| {
        seq += 1;
        value.insert("seq".into(), Value::from(seq));
    });
    std::fs::write(&path, omitted.join("\n") + "\n").unwrap();
    let verdict = |path: &Path| check_receipt(path, &trust, &receipts[1]).unwrap().1;
    assert!(matches!(verdict(&path), Err(ReceiptError::Broken(_))));
    let id = receipts[1].id();
    let other = format!("{}{}", &id[..16], "00000000000000ff");
    for carried in [id.clone(), other] {
        let mut added = omitted.clone();
        let mut line: serde_json::Map<String, Value> =
            serde_json::from_str(&forge_next(&omitted, "executed")).unwrap();
        line.insert("receipt".into(), Value::from(carried.clone()));
        line.insert("status".into(), Value::from(201));
        line.remove("hash");
        let hash = sha256_hex(
            serde_json_canonicalizer::to_string(&line)
                .unwrap()
                .as_bytes(),
        );
        line.insert("hash".into(), Value::from(hash));
        added.push(serde_json_canonicalizer::to_string(&line).unwrap());
        let forged = dir.join("forged.jsonl");
        std::fs::write(&forged, added.join("\n") + "\n").unwrap();
        let why = verdict(&forged).unwrap_err();
        assert!(matches!(why, ReceiptError::Broken(_)), "{carried}: {why}");
        // A restart adopts the line; the verdict stands.
        one_request(&forged, &signer, "after").await;
        let why = verdict(&forged).unwrap_err();
        assert!(
            matches!(why, ReceiptError::Broken(_)),
            "{carried} after a restart: {why}"
        );
    }
}
