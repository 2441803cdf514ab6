//! The store conformance suite: every rule of the [`Store`] contract, as
//! checks any store can run against itself.
//!
//! Implement [`Harness`] for your store, then generate one test per rule:
//!
//! ```
//! use std::time::Duration;
//! use tower_idempotency::MemoryStore;
//! use tower_idempotency::store::{ManualClock, conformance::Harness};
//!
//! #[derive(Default)]
//! struct Memory(ManualClock);
//!
//! impl Harness for Memory {
//!     type Store = MemoryStore;
//!
//!     fn store(&self) -> MemoryStore {
//!         MemoryStore::builder().clock(self.0.clone()).build()
//!     }
//!
//!     async fn advance(&self, by: Duration) {
//!         self.0.advance(by);
//!     }
//! }
//!
//! // In a test file (needs tokio with the `macros` and `rt-multi-thread` features):
//! // tower_idempotency::store_conformance_tests!(Memory::default());
//! ```
//!
//! Every check uses keys of its own (random per run), so a store shared
//! between checks, such as one Redis database, is fine. A check fails by
//! panicking with the rule it found broken.

use std::{collections::HashSet, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;

use super::{Claim, RecordKey, Store, StoreError, Token};
use crate::Fingerprint;

/// Connects the suite to a store under test.
pub trait Harness: Send + Sync + 'static {
    /// The store under test; clones must share its records.
    type Store: Store + Clone;

    /// A store to test. Called once per check; may return a handle to the
    /// same store every time.
    fn store(&self) -> Self::Store;

    /// Lets `by` pass on the store's clock: advance a manual clock, or sleep
    /// for a store on real time.
    fn advance(&self, by: Duration) -> impl Future<Output = ()> + Send;

    /// The lease the suite claims with (default 10 seconds). A store on real
    /// time picks something short, since the suite waits for leases to run
    /// out.
    fn lease(&self) -> Duration {
        Duration::from_secs(10)
    }

    /// Overwrites what the store holds for `key` with something it cannot
    /// decode, and returns `true`; or returns `false` (the default) if the
    /// store has no way to hold such a thing, and the check is skipped.
    fn corrupt(&self, store: &Self::Store, key: &RecordKey) -> impl Future<Output = bool> + Send {
        let _ = (store, key);
        async { false }
    }

    /// Runs the store's own cleanup of expired records once (a sweeper's
    /// pass, a `DELETE` of expired rows), if it has one; the default does
    /// nothing. The suite checks that cleanup never removes a lapsed claim
    /// that nobody took over.
    fn sweep(&self, store: &Self::Store) -> impl Future<Output = ()> + Send {
        let _ = store;
        async {}
    }
}

/// Generates one `#[tokio::test]` per conformance check.
///
/// - `store_conformance_tests!(harness_expression)` runs every check against
///   the expression, evaluated once per test.
/// - `store_conformance_tests!(optional: make_harness)` calls
///   `make_harness("check_name").await`, an `Option` of a harness, and skips
///   the check on `None` (for a store that needs a server which may be
///   absent).
///
/// The calling crate needs `tokio` with the `macros` and `rt-multi-thread`
/// features.
#[macro_export]
macro_rules! store_conformance_tests {
    // Internal arms first: an `expr` fragment that fails to parse is an
    // error, not a fall-through.
    (@all $mode:tt) => {
        $crate::store_conformance_tests!(@each $mode;
            first_claim_acquires,
            racing_claims_acquire_exactly_once,
            record_round_trips_byte_for_byte,
            fingerprints_are_reported_not_compared,
            scopes_and_keys_are_separate,
            lease_lapse_allows_take_over,
            lapsed_claim_nobody_took_over_completes,
            lapsed_claim_taken_over_is_fenced,
            racing_take_overs_acquire_exactly_once,
            renew_extends_the_lease,
            fencing_rejects_the_old_holder,
            release_frees_the_key,
            completed_records_expire_after_ttl,
            completed_records_are_final,
            corrupt_record_is_an_error,
            peek_reads_without_changing,
        );
    };
    (@each (optional $make:path); $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some(harness) = $make(stringify!($check)).await else {
                    return;
                };
                $crate::store::conformance::$check(&harness).await;
            }
        )*
    };
    (@each (plain $harness:expr); $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                $crate::store::conformance::$check(&$harness).await;
            }
        )*
    };
    (optional: $make:path) => {
        $crate::store_conformance_tests!(@all (optional $make));
    };
    ($harness:expr) => {
        $crate::store_conformance_tests!(@all (plain $harness));
    };
}

/// Runs every check in turn.
pub async fn run_all<H: Harness>(harness: &H) {
    first_claim_acquires(harness).await;
    racing_claims_acquire_exactly_once(harness).await;
    record_round_trips_byte_for_byte(harness).await;
    fingerprints_are_reported_not_compared(harness).await;
    scopes_and_keys_are_separate(harness).await;
    lease_lapse_allows_take_over(harness).await;
    lapsed_claim_nobody_took_over_completes(harness).await;
    lapsed_claim_taken_over_is_fenced(harness).await;
    racing_take_overs_acquire_exactly_once(harness).await;
    renew_extends_the_lease(harness).await;
    fencing_rejects_the_old_holder(harness).await;
    release_frees_the_key(harness).await;
    completed_records_expire_after_ttl(harness).await;
    completed_records_are_final(harness).await;
    corrupt_record_is_an_error(harness).await;
    peek_reads_without_changing(harness).await;
}

const TTL_LEASES: u32 = 4;

fn fresh_key(name: &str) -> RecordKey {
    let nonce = crate::random_u64();
    RecordKey::new("conformance", &format!("{name}-{nonce:016x}"))
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

fn ttl<H: Harness>(h: &H) -> Duration {
    h.lease() * TTL_LEASES
}

/// Claims a key nobody holds: it must be acquired, and not as a take-over.
async fn acquire<S: Store>(
    store: &S,
    key: &RecordKey,
    fingerprint: Fingerprint,
    lease: Duration,
) -> Token {
    acquire_as(store, key, fingerprint, lease, false).await
}

/// Claims a key whose holder's lease ran out: it must be acquired, and
/// reported as a take-over.
async fn take_over<S: Store>(
    store: &S,
    key: &RecordKey,
    fingerprint: Fingerprint,
    lease: Duration,
) -> Token {
    acquire_as(store, key, fingerprint, lease, true).await
}

async fn acquire_as<S: Store>(
    store: &S,
    key: &RecordKey,
    fingerprint: Fingerprint,
    lease: Duration,
    take_over: bool,
) -> Token {
    match store.claim(key, fingerprint, lease).await {
        Ok(Claim::Acquired { token, took_over }) if took_over == take_over => token,
        other => panic!(
            "this claim must acquire the key with `took_over: {take_over}` \
             (a free key is no take-over; a key whose lease lapsed is), got {other:?}"
        ),
    }
}

/// A claim on a new key acquires it; a second claim sees it in flight, with
/// the first claim's fingerprint and the time left on its lease.
pub async fn first_claim_acquires<H: Harness>(h: &H) {
    let store = h.store();
    let key = fresh_key("first");
    acquire(&store, &key, fp(1), h.lease()).await;
    match store.claim(&key, fp(1), h.lease()).await {
        Ok(Claim::InFlight {
            fingerprint,
            lease_remaining,
        }) => {
            assert_eq!(
                fingerprint,
                fp(1),
                "in-flight claim must report its fingerprint"
            );
            assert!(
                lease_remaining <= h.lease() && !lease_remaining.is_zero(),
                "lease_remaining must be within (0, lease], got {lease_remaining:?}"
            );
        }
        other => panic!("a claimed key must be in flight, got {other:?}"),
    }
}

async fn race_claims<S: Store + Clone>(store: &S, key: &RecordKey, lease: Duration) -> usize {
    const TASKS: usize = 64;
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut tasks = Vec::with_capacity(TASKS);
    for _ in 0..TASKS {
        let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store.claim(&key, fp(7), lease).await
        }));
    }
    let mut acquired = 0;
    for task in tasks {
        match task.await.expect("claim task panicked") {
            Ok(Claim::Acquired { .. }) => acquired += 1,
            Ok(Claim::InFlight { fingerprint, .. }) => assert_eq!(fingerprint, fp(7)),
            other => panic!("a racing claim must acquire or see the key in flight, got {other:?}"),
        }
    }
    acquired
}

/// 64 tasks claiming one free key at once: exactly one acquires it.
pub async fn racing_claims_acquire_exactly_once<H: Harness>(h: &H) {
    let store = h.store();
    let key = fresh_key("race");
    let acquired = race_claims(&store, &key, h.lease()).await;
    assert_eq!(
        acquired, 1,
        "exactly one of 64 racing claims may acquire a key"
    );
}

/// The record given to `complete` comes back from `claim` byte for byte:
/// empty, every byte value, and large.
pub async fn record_round_trips_byte_for_byte<H: Harness>(h: &H) {
    let store = h.store();
    let every_byte: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let large: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    for (name, record) in [
        ("empty", Bytes::new()),
        ("binary", Bytes::from(every_byte)),
        ("large", Bytes::from(large)),
    ] {
        let key = fresh_key(name);
        let token = acquire(&store, &key, fp(2), h.lease()).await;
        store
            .complete(&key, token, record.clone(), ttl(h))
            .await
            .unwrap_or_else(|e| panic!("completing a held claim must succeed ({name}): {e}"));
        match store.claim(&key, fp(2), h.lease()).await {
            Ok(Claim::Completed {
                fingerprint,
                record: back,
            }) => {
                assert_eq!(fingerprint, fp(2), "completed record keeps its fingerprint");
                assert!(back == record, "record {name} must come back byte for byte");
            }
            other => panic!("a completed key must return its record, got {other:?}"),
        }
    }
}

/// A claim with a different fingerprint is answered with the holder's
/// fingerprint and changes nothing: comparing is the layer's job.
pub async fn fingerprints_are_reported_not_compared<H: Harness>(h: &H) {
    let store = h.store();
    let key = fresh_key("mismatch");
    let token = acquire(&store, &key, fp(1), h.lease()).await;
    match store.claim(&key, fp(2), h.lease()).await {
        Ok(Claim::InFlight { fingerprint, .. }) => assert_eq!(fingerprint, fp(1)),
        other => panic!("expected the holder's claim, got {other:?}"),
    }
    store
        .complete(&key, token, Bytes::from_static(b"r"), ttl(h))
        .await
        .expect("the holder can still complete");
    match store.claim(&key, fp(2), h.lease()).await {
        Ok(Claim::Completed { fingerprint, .. }) => assert_eq!(fingerprint, fp(1)),
        other => panic!("expected the completed record, got {other:?}"),
    }
}

/// The same key in two scopes, and keys that differ only in where scope ends
/// and key begins, are different records.
pub async fn scopes_and_keys_are_separate<H: Harness>(h: &H) {
    let store = h.store();
    let nonce = format!("{:016x}", crate::random_u64());
    let keys = [
        RecordKey::new(&format!("tenant-a{nonce}"), "k"),
        RecordKey::new(&format!("tenant-b{nonce}"), "k"),
        RecordKey::new(&format!("tenant-a{nonce}k"), ""),
        RecordKey::new(&format!("tenant-a{nonce}"), "k:{x}*?[]"),
    ];
    let mut tokens = HashSet::new();
    for key in &keys {
        let token = acquire(&store, key, fp(3), h.lease()).await;
        assert!(tokens.insert(token), "tokens must differ between claims");
    }
}

/// An in-flight claim whose lease has passed counts as absent for the same
/// request: its next claim takes it over with a new token, and says it took
/// it over. A different request sees the lapsed claim in flight, with the
/// holder's fingerprint, and takes nothing over.
pub async fn lease_lapse_allows_take_over<H: Harness>(h: &H) {
    let store = h.store();
    let key = fresh_key("lapse");
    let first = acquire(&store, &key, fp(4), h.lease()).await;
    h.advance(h.lease() / 2).await;
    assert!(
        matches!(
            store.claim(&key, fp(4), h.lease()).await,
            Ok(Claim::InFlight { .. })
        ),
        "the lease must hold before it ends"
    );
    h.advance(h.lease()).await;
    match store.claim(&key, fp(44), h.lease()).await {
        Ok(Claim::InFlight { fingerprint, .. }) => assert_eq!(
            fingerprint,
            fp(4),
            "a lapsed claim must report its holder's fingerprint"
        ),
        other => panic!("a different request must not take over a lapsed claim, got {other:?}"),
    }
    let second = take_over(&store, &key, fp(4), h.lease()).await;
    assert_ne!(first, second, "a take-over must issue a new token");
}

/// A lease that runs out while nobody claims the key is only lapsed: the
/// store's cleanup keeps the claim, its holder can still renew it, and after
/// lapsing again can complete it. Every later claim replays that record.
pub async fn lapsed_claim_nobody_took_over_completes<H: Harness>(h: &H) {
    let store = h.store();
    let key = fresh_key("lapsed-untaken");
    let token = acquire(&store, &key, fp(40), h.lease()).await;
    h.advance(h.lease() * 2).await;
    h.sweep(&store).await;
    store
        .renew(&key, token, h.lease())
        .await
        .expect("a lapsed claim nobody took over must survive cleanup and stay renewable");
    h.advance(h.lease() * 2).await;
    h.sweep(&store).await;
    store
        .complete(&key, token, Bytes::from_static(b"late"), ttl(h))
        .await
        .expect("a lapsed claim nobody took over must stay completable");
    for fingerprint in [fp(40), fp(41)] {
        match store.claim(&key, fingerprint, h.lease()).await {
            Ok(Claim::Completed {
                fingerprint: held,
                record,
            }) => {
                assert_eq!(held, fp(40));
                assert_eq!(&record[..], b"late", "the late holder's record must stand");
            }
            other => panic!("a late completion must be recorded, got {other:?}"),
        }
    }
}

/// A lapsed claim that another claim took over is fenced: the late holder
/// can neither renew nor complete, even after cleanup, and the new holder's
/// record stands.
pub async fn lapsed_claim_taken_over_is_fenced<H: Harness>(h: &H) {
    let store = h.store();
    let key = fresh_key("lapsed-taken");
    let late = acquire(&store, &key, fp(42), h.lease()).await;
    h.advance(h.lease() * 2).await;
    h.sweep(&store).await;
    let current = take_over(&store, &key, fp(42), h.lease()).await;
    h.sweep(&store).await;
    assert!(
        matches!(
            store.renew(&key, late, h.lease()).await,
            Err(StoreError::Fenced)
        ),
        "a holder whose lapsed claim was taken over must not renew"
    );
    assert!(
        matches!(
            store
                .complete(&key, late, Bytes::from_static(b"late"), ttl(h))
                .await,
            Err(StoreError::Fenced)
        ),
        "a holder whose lapsed claim was taken over must not complete"
    );
    match store.claim(&key, fp(42), h.lease()).await {
        Ok(Claim::InFlight { .. }) => {}
        other => panic!("the new holder's claim must stand, got {other:?}"),
    }
    store
        .complete(&key, current, Bytes::from_static(b"current"), ttl(h))
        .await
        .expect("the new holder completes");
    match store.claim(&key, fp(42), h.lease()).await {
        Ok(Claim::Completed { record, .. }) => assert_eq!(&record[..], b"current"),
        other => panic!("expected the new holder's record, got {other:?}"),
    }
}

/// 64 tasks racing to take over one lapsed claim: exactly one does.
pub async fn racing_take_overs_acquire_exactly_once<H: Harness>(h: &H) {
    let store = h.store();
    let key = fresh_key("takeover-race");
    acquire(&store, &key, fp(7), h.lease()).await;
    h.advance(h.lease() + h.lease() / 2).await;
    let acquired = race_claims(&store, &key, h.lease()).await;
    assert_eq!(
        acquired, 1,
        "exactly one of 64 racing take-overs may acquire a key"
    );
}

/// Renewing moves the end of the lease to `lease` from now.
pub async fn renew_extends_the_lease<H: Harness>(h: &H) {
    let store = h.store();
    let key = fresh_key("renew");
    let token = acquire(&store, &key, fp(5), h.lease()).await;
    h.advance(h.lease() * 6 / 10).await;
    store
        .renew(&key, token, h.lease())
        .await
        .expect("the holder can renew");
    h.advance(h.lease() * 6 / 10).await;
    assert!(
        matches!(
            store.claim(&key, fp(5), h.lease()).await,
            Ok(Claim::InFlight { .. })
        ),
        "a renewed lease must outlast the original one"
    );
    store
        .complete(&key, token, Bytes::from_static(b"done"), ttl(h))
        .await
        .expect("the holder can complete after renewing");
}

/// After a take-over, the old holder's renew, complete and release are all
/// fenced out, and the new holder's record stands.
pub async fn fencing_rejects_the_old_holder<H: Harness>(h: &H) {
    let store = h.store();
    let key = fresh_key("fence");
    let old = acquire(&store, &key, fp(6), h.lease()).await;
    h.advance(h.lease() + h.lease() / 2).await;
    let new = take_over(&store, &key, fp(6), h.lease()).await;
    assert!(
        matches!(
            store.renew(&key, old, h.lease()).await,
            Err(StoreError::Fenced)
        ),
        "renew with a stale token must be fenced"
    );
    assert!(
        matches!(
            store
                .complete(&key, old, Bytes::from_static(b"old"), ttl(h))
                .await,
            Err(StoreError::Fenced)
        ),
        "complete with a stale token must be fenced"
    );
    assert!(
        matches!(store.release(&key, old).await, Err(StoreError::Fenced)),
        "release with a stale token must be fenced"
    );
    store
        .complete(&key, new, Bytes::from_static(b"new"), ttl(h))
        .await
        .expect("the current holder can complete");
    match store.claim(&key, fp(6), h.lease()).await {
        Ok(Claim::Completed { record, .. }) => assert_eq!(&record[..], b"new"),
        other => panic!("expected the new holder's record, got {other:?}"),
    }
    assert!(
        matches!(
            store
                .complete(&key, old, Bytes::from_static(b"old"), ttl(h))
                .await,
            Err(StoreError::Fenced)
        ),
        "a stale token must not overwrite a completed record"
    );
}

/// Releasing frees the key for the next claim; a wrong token releases
/// nothing.
pub async fn release_frees_the_key<H: Harness>(h: &H) {
    let store = h.store();
    let key = fresh_key("release");
    let token = acquire(&store, &key, fp(8), h.lease()).await;
    assert!(
        matches!(
            store.release(&key, Token(token.0 ^ 1)).await,
            Err(StoreError::Fenced)
        ),
        "release with a wrong token must be fenced"
    );
    assert!(
        matches!(
            store.claim(&key, fp(8), h.lease()).await,
            Ok(Claim::InFlight { .. })
        ),
        "a fenced release must leave the claim in place"
    );
    store
        .release(&key, token)
        .await
        .expect("the holder can release");
    acquire(&store, &key, fp(9), h.lease()).await;
}

/// [`Store::peek`] tells what holds a key and changes nothing: absent, a
/// claim with its token (a lapsed one too), a completed record byte for
/// byte, absent again after its TTL. A store may answer
/// [`Peeked::Unknown`](super::Peeked::Unknown) throughout (the default).
pub async fn peek_reads_without_changing<H: Harness>(h: &H) {
    use super::Peeked;
    let store = h.store();
    let key = fresh_key("peek");
    let peek = |store: &H::Store| {
        let key = key.clone();
        let store = store.clone();
        async move { store.peek(&key).await.expect("peek answers") }
    };
    let first = peek(&store).await;
    if first == Peeked::Unknown {
        return;
    }
    assert_eq!(first, Peeked::Absent, "nothing holds a fresh key");
    let token = acquire(&store, &key, fp(20), h.lease()).await;
    assert_eq!(peek(&store).await, Peeked::InFlight { token });
    h.advance(h.lease() * 2).await;
    assert_eq!(
        peek(&store).await,
        Peeked::InFlight { token },
        "a lapsed claim nobody took over still holds its key"
    );
    let record = Bytes::from_static(b"\x00peeked\xff");
    store
        .complete(&key, token, record.clone(), ttl(h))
        .await
        .expect("a lapsed claim nobody took over completes");
    assert_eq!(peek(&store).await, Peeked::Completed { record });
    assert!(
        matches!(
            store.claim(&key, fp(20), h.lease()).await,
            Ok(Claim::Completed { .. })
        ),
        "peeking changed nothing"
    );
    h.advance(ttl(h) * 2).await;
    assert_eq!(peek(&store).await, Peeked::Absent, "expired is absent");
}

/// A completed record lives for its TTL, then the key is new again.
pub async fn completed_records_expire_after_ttl<H: Harness>(h: &H) {
    let store = h.store();
    let key = fresh_key("ttl");
    let token = acquire(&store, &key, fp(10), h.lease()).await;
    store
        .complete(&key, token, Bytes::from_static(b"kept"), ttl(h))
        .await
        .expect("the holder can complete");
    h.advance(ttl(h) / 2).await;
    assert!(
        matches!(
            store.claim(&key, fp(10), h.lease()).await,
            Ok(Claim::Completed { .. })
        ),
        "a record must be kept until its TTL ends"
    );
    h.advance(ttl(h)).await;
    acquire(&store, &key, fp(11), h.lease()).await;
}

/// A completed record cannot be completed again, renewed or released, even
/// with the token that completed it.
pub async fn completed_records_are_final<H: Harness>(h: &H) {
    let store = h.store();
    let key = fresh_key("final");
    let token = acquire(&store, &key, fp(12), h.lease()).await;
    store
        .complete(&key, token, Bytes::from_static(b"first"), ttl(h))
        .await
        .expect("the holder can complete");
    assert!(matches!(
        store
            .complete(&key, token, Bytes::from_static(b"second"), ttl(h))
            .await,
        Err(StoreError::Fenced)
    ));
    assert!(matches!(
        store.renew(&key, token, h.lease()).await,
        Err(StoreError::Fenced)
    ));
    assert!(matches!(
        store.release(&key, token).await,
        Err(StoreError::Fenced)
    ));
    match store.claim(&key, fp(12), h.lease()).await {
        Ok(Claim::Completed { record, .. }) => assert_eq!(&record[..], b"first"),
        other => panic!("expected the first record, got {other:?}"),
    }
}

/// What the store cannot read under a key is an error from `claim`, not a
/// panic and not a free key (which would run the request again). Skipped for
/// stores whose [`Harness::corrupt`] returns `false`.
pub async fn corrupt_record_is_an_error<H: Harness>(h: &H) {
    let store = h.store();
    let key = fresh_key("corrupt");
    let token = acquire(&store, &key, fp(13), h.lease()).await;
    store
        .complete(&key, token, Bytes::from_static(b"fine"), ttl(h))
        .await
        .expect("the holder can complete");
    if !h.corrupt(&store, &key).await {
        eprintln!(
            "conformance: corrupt_record_is_an_error skipped: the harness cannot corrupt records"
        );
        return;
    }
    match store.claim(&key, fp(13), h.lease()).await {
        Err(StoreError::Corrupt(_) | StoreError::Unavailable(_)) => {}
        other => panic!("a corrupt record must be an error, got {other:?}"),
    }
}

/// For a store bounded to `max_entries` records: full of in-flight claims, a
/// new claim fails with [`StoreError::Full`] and every held claim survives;
/// once all but one complete, a new claim makes room by evicting a
/// completed record, never the claim still in flight.
pub async fn bounded_store_never_evicts_in_flight<S: Store>(
    store: &S,
    max_entries: usize,
    lease: Duration,
) {
    let keys: Vec<_> = (0..max_entries)
        .map(|i| fresh_key(&format!("bound-{i}")))
        .collect();
    let mut tokens = Vec::new();
    for key in &keys {
        tokens.push(acquire(store, key, fp(14), lease).await);
    }
    let extra = fresh_key("bound-extra");
    assert!(
        matches!(
            store.claim(&extra, fp(14), lease).await,
            Err(StoreError::Full)
        ),
        "a store full of in-flight claims must refuse a new one"
    );
    for key in &keys {
        assert!(
            matches!(
                store.claim(key, fp(14), lease).await,
                Ok(Claim::InFlight { .. })
            ),
            "no in-flight claim may be evicted"
        );
    }
    // Most of them complete (a store may refuse to evict records for a
    // claim while claims hold much of it); the last stays in flight.
    let (last, done) = keys.split_last().expect("at least one key");
    for (key, token) in done.iter().zip(&tokens) {
        store
            .complete(key, *token, Bytes::from_static(b"r"), lease * TTL_LEASES)
            .await
            .expect("the holder can complete");
    }
    acquire(store, &extra, fp(14), lease).await;
    assert!(
        matches!(
            store.claim(last, fp(14), lease).await,
            Ok(Claim::InFlight { .. })
        ),
        "making room must evict a completed record, not an in-flight one"
    );
}
