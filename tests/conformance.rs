//! The store conformance suite, run against the stores this crate ships.

mod common;

use std::time::Duration;

use tower_idempotency::MemoryStore;
use tower_idempotency::store::{ManualClock, conformance, conformance::Harness};

/// `MemoryStore` on a manual clock, so the suite's leases and TTLs pass
/// instantly.
#[derive(Default)]
struct Memory(ManualClock);

impl Harness for Memory {
    type Store = MemoryStore;

    fn store(&self) -> MemoryStore {
        MemoryStore::builder().clock(self.0.clone()).build()
    }

    async fn advance(&self, by: Duration) {
        self.0.advance(by);
    }

    async fn sweep(&self, store: &MemoryStore) {
        store.remove_expired();
    }
}

tower_idempotency::store_conformance_tests!(Memory::default());

#[tokio::test]
async fn memory_store_bounded_by_entries_never_evicts_in_flight() {
    // One scope may fill this store with claims.
    let store = MemoryStore::builder()
        .max_entries(8)
        .max_in_flight_per_scope(8)
        .build();
    conformance::bounded_store_never_evicts_in_flight(&store, 8, Duration::from_secs(10)).await;
}

/// A lapsed claim survives the sweeper and eviction until its lapsed
/// retention is over; then it is removed, and any request may claim the key
/// afresh.
#[tokio::test]
async fn memory_store_keeps_a_lapsed_claim_for_its_retention() {
    use tower_idempotency::{
        Fingerprint, Store,
        store::{Claim, RecordKey},
    };
    let clock = ManualClock::new();
    let store = MemoryStore::builder()
        .clock(clock.clone())
        .max_entries(1)
        .lapsed_retention(Duration::from_secs(60))
        .build();
    let lease = Duration::from_secs(10);
    let key = RecordKey::new("s", "k");
    let (a, b) = (
        Fingerprint::from_bytes([1; 32]),
        Fingerprint::from_bytes([2; 32]),
    );
    assert!(matches!(
        store.claim(&key, a, lease).await,
        Ok(Claim::Acquired { .. })
    ));
    clock.advance(Duration::from_secs(69));
    assert_eq!(store.remove_expired(), 0, "lapsed 59 s ago: kept");
    let other = RecordKey::new("s", "other");
    assert!(
        matches!(
            store.claim(&other, a, lease).await,
            Err(tower_idempotency::store::StoreError::Full)
        ),
        "a lapsed claim is not evicted to make room before its retention is over"
    );
    assert!(matches!(
        store.claim(&key, b, lease).await,
        Ok(Claim::InFlight {
            lease_remaining: Duration::ZERO,
            ..
        })
    ));
    clock.advance(Duration::from_secs(1));
    assert_eq!(store.remove_expired(), 1, "lapsed 60 s ago: removed");
    assert!(matches!(
        store.claim(&key, b, lease).await,
        Ok(Claim::Acquired {
            took_over: false,
            ..
        })
    ));
}

#[tokio::test]
async fn boxed_store_passes_the_whole_suite() {
    struct Boxed(ManualClock);
    impl Harness for Boxed {
        type Store = tower_idempotency::BoxStore;
        fn store(&self) -> Self::Store {
            tower_idempotency::BoxStore::new(MemoryStore::builder().clock(self.0.clone()).build())
        }
        async fn advance(&self, by: Duration) {
            self.0.advance(by);
        }
    }
    conformance::run_all(&Boxed(ManualClock::new())).await;
}

#[tokio::test]
async fn arc_store_passes_the_whole_suite() {
    struct Shared(ManualClock);
    impl Harness for Shared {
        type Store = std::sync::Arc<MemoryStore>;
        fn store(&self) -> Self::Store {
            std::sync::Arc::new(MemoryStore::builder().clock(self.0.clone()).build())
        }
        async fn advance(&self, by: Duration) {
            self.0.advance(by);
        }
    }
    conformance::run_all(&Shared(ManualClock::new())).await;
}

/// The suite has teeth: a store that claims by reading, then writing, is
/// caught by the racing check, and one that ignores tokens by the fencing
/// check.
mod broken {
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use bytes::Bytes;
    use tower_idempotency::{
        Fingerprint, Store,
        store::{
            Claim, ManualClock, RecordKey, StoreError, Token, conformance, conformance::Harness,
        },
    };

    /// Fingerprint, token, and the record once completed.
    type Entry = (Fingerprint, Token, Option<Bytes>);

    #[derive(Clone, Default)]
    struct ReadThenWrite {
        records: Arc<Mutex<HashMap<RecordKey, Entry>>>,
        check_tokens: bool,
    }

    impl Store for ReadThenWrite {
        async fn claim(
            &self,
            key: &RecordKey,
            fingerprint: Fingerprint,
            _lease: Duration,
        ) -> Result<Claim, StoreError> {
            let existing = self.records.lock().unwrap().get(key).cloned();
            if let Some((fingerprint, _, record)) = existing {
                return Ok(match record {
                    Some(record) => Claim::Completed {
                        fingerprint,
                        record,
                    },
                    None => Claim::InFlight {
                        fingerprint,
                        lease_remaining: Duration::from_secs(1),
                    },
                });
            }
            // The bug: another claim can run between the read and the write.
            tokio::task::yield_now().await;
            let token = Token(rand_token());
            self.records
                .lock()
                .unwrap()
                .insert(key.clone(), (fingerprint, token, None));
            Ok(Claim::Acquired {
                token,
                took_over: false,
            })
        }

        async fn renew(
            &self,
            _key: &RecordKey,
            _token: Token,
            _lease: Duration,
        ) -> Result<(), StoreError> {
            Ok(())
        }

        async fn complete(
            &self,
            key: &RecordKey,
            token: Token,
            record: Bytes,
            _ttl: Duration,
        ) -> Result<(), StoreError> {
            let mut records = self.records.lock().unwrap();
            match records.get_mut(key) {
                Some(entry) if !self.check_tokens || entry.1 == token => {
                    entry.2 = Some(record);
                    Ok(())
                }
                _ => Err(StoreError::Fenced),
            }
        }

        async fn release(&self, key: &RecordKey, _token: Token) -> Result<(), StoreError> {
            self.records.lock().unwrap().remove(key);
            Ok(())
        }
    }

    fn rand_token() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    struct Broken(ReadThenWrite, ManualClock);

    impl Harness for Broken {
        type Store = ReadThenWrite;
        fn store(&self) -> ReadThenWrite {
            self.0.clone()
        }
        async fn advance(&self, by: Duration) {
            self.1.advance(by);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_then_write_claim_fails_the_race_check() {
        let harness = Broken(ReadThenWrite::default(), ManualClock::new());
        let outcome = tokio::spawn(async move {
            conformance::racing_claims_acquire_exactly_once(&harness).await;
        })
        .await;
        assert!(
            outcome.unwrap_err().is_panic(),
            "the suite must reject a racy claim"
        );
    }

    #[tokio::test]
    async fn a_store_ignoring_tokens_fails_the_fencing_check() {
        let harness = Broken(ReadThenWrite::default(), ManualClock::new());
        let outcome = tokio::spawn(async move {
            conformance::completed_records_are_final(&harness).await;
        })
        .await;
        assert!(
            outcome.unwrap_err().is_panic(),
            "the suite must reject a store without fencing"
        );
    }
}

#[tokio::test]
async fn memory_store_makes_room_by_bytes_without_evicting_the_new_record() {
    use tower_idempotency::{
        Fingerprint, Store,
        store::{Claim, RecordKey},
    };
    let store = MemoryStore::builder().max_bytes(3000).build();
    let lease = Duration::from_secs(10);
    let ttl = Duration::from_secs(60);
    let mut keys = Vec::new();
    for i in 0..3 {
        let key = RecordKey::new("", &format!("k{i}"));
        let Ok(Claim::Acquired { token, .. }) = store
            .claim(&key, Fingerprint::from_bytes([0; 32]), lease)
            .await
        else {
            panic!("claim");
        };
        store
            .complete(&key, token, bytes::Bytes::from(vec![7u8; 1400]), ttl)
            .await
            .expect("room is made by evicting older records");
        keys.push(key);
    }
    assert!(store.bytes() <= 3000, "{} bytes held", store.bytes());
    for key in &keys[1..] {
        assert!(matches!(
            store
                .claim(key, Fingerprint::from_bytes([0; 32]), lease)
                .await,
            Ok(Claim::Completed { .. })
        ));
    }
    // A record that can never fit is refused, not stored and evicted.
    let huge = RecordKey::new("", "huge");
    let Ok(Claim::Acquired { token, .. }) = store
        .claim(&huge, Fingerprint::from_bytes([0; 32]), lease)
        .await
    else {
        panic!("claim");
    };
    assert!(matches!(
        store
            .complete(&huge, token, bytes::Bytes::from(vec![0u8; 4000]), ttl)
            .await,
        Err(tower_idempotency::store::StoreError::Full)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_round_trips_per_request() {
    common::fleet::round_trips_per_request(MemoryStore::default()).await;
}

mod fair_eviction {
    use std::time::Duration;

    use bytes::Bytes;
    use tower_idempotency::{
        Fingerprint, MemoryStore, Store,
        store::{Claim, RecordKey, StoreError},
    };

    const LEASE: Duration = Duration::from_secs(10);
    const TTL: Duration = Duration::from_secs(3600);

    fn fp() -> Fingerprint {
        Fingerprint::from_bytes([5; 32])
    }

    /// Claims and completes `scope`'s key `i` with a record of `size` bytes.
    async fn record(
        store: &MemoryStore,
        scope: &str,
        i: usize,
        size: usize,
    ) -> Result<(), StoreError> {
        let key = RecordKey::new(scope, &format!("k{i}"));
        let Claim::Acquired { token, .. } = store.claim(&key, fp(), LEASE).await? else {
            panic!("{scope}/k{i} was already held");
        };
        store
            .complete(&key, token, Bytes::from(vec![1u8; size]), TTL)
            .await
    }

    async fn replayed(store: &MemoryStore, scope: &str, i: usize) -> bool {
        let key = RecordKey::new(scope, &format!("k{i}"));
        matches!(
            store.claim(&key, fp(), LEASE).await,
            Ok(Claim::Completed { .. })
        )
    }

    /// One scope sends ten times the store's size in keyed requests: it
    /// evicts its own records, never those of the scopes that came before.
    #[tokio::test]
    async fn a_flood_from_one_scope_never_evicts_another_scopes_records() {
        let store = MemoryStore::builder().max_entries(100).build();
        for victim in ["alice", "bob"] {
            for i in 0..10 {
                record(&store, victim, i, 64).await.unwrap();
            }
        }
        for i in 0..1000 {
            record(&store, "mallory", i, 64)
                .await
                .expect("the flood makes room from itself");
        }
        assert!(store.len() <= 100, "{} records held", store.len());
        assert_eq!(
            store.evicted_live(),
            1000 - 80,
            "every eviction was of a live record of the flood"
        );
        for victim in ["alice", "bob"] {
            for i in 0..10 {
                assert!(
                    replayed(&store, victim, i).await,
                    "{victim}/k{i} was evicted by the flood"
                );
            }
        }
        assert!(
            replayed(&store, "mallory", 999).await,
            "the flood's newest record is kept"
        );
        assert!(
            !replayed(&store, "mallory", 0).await,
            "the flood's oldest records made room"
        );
    }

    /// The same under the byte bound: a scope sending large responses evicts
    /// its own, not the small records of others.
    #[tokio::test]
    async fn a_flood_of_large_records_never_evicts_another_scopes_records() {
        let store = MemoryStore::builder().max_bytes(64 * 1024).build();
        for i in 0..20 {
            record(&store, "alice", i, 256).await.unwrap();
        }
        for i in 0..200 {
            record(&store, "mallory", i, 8 * 1024).await.unwrap();
        }
        assert!(store.bytes() <= 64 * 1024, "{} bytes held", store.bytes());
        for i in 0..20 {
            assert!(replayed(&store, "alice", i).await, "alice/k{i} was evicted");
        }
        assert!(store.evicted_live() > 0);
    }

    /// A scope that arrives at a store the flood filled takes its room from
    /// the flood.
    #[tokio::test]
    async fn a_newcomer_takes_room_from_the_heaviest_scope() {
        let store = MemoryStore::builder().max_entries(50).build();
        for i in 0..50 {
            record(&store, "mallory", i, 64).await.unwrap();
        }
        for i in 0..10 {
            record(&store, "carol", i, 64).await.unwrap();
        }
        for i in 0..10 {
            assert!(replayed(&store, "carol", i).await, "carol/k{i} was evicted");
        }
        assert_eq!(store.len(), 50);
        assert_eq!(store.evicted_live(), 10);
    }

    /// A scope holding claims that never complete cannot evict a lighter
    /// scope's records for more: it is refused (`Full`, a 503) instead.
    #[tokio::test]
    async fn in_flight_claims_of_one_scope_never_evict_a_lighter_scopes_records() {
        let store = MemoryStore::builder()
            .max_entries(30)
            .max_in_flight_per_scope(20)
            .build();
        for i in 0..10 {
            record(&store, "alice", i, 64).await.unwrap();
        }
        for i in 0..20 {
            let key = RecordKey::new("mallory", &format!("slow{i}"));
            assert!(matches!(
                store.claim(&key, fp(), LEASE).await,
                Ok(Claim::Acquired { .. })
            ));
        }
        let key = RecordKey::new("mallory", "slow-one-more");
        assert!(matches!(
            store.claim(&key, fp(), LEASE).await,
            Err(StoreError::Full)
        ));
        for i in 0..10 {
            assert!(replayed(&store, "alice", i).await, "alice/k{i} was evicted");
        }
        assert_eq!(store.evicted_live(), 0);
    }

    fn claim_of(scope: &str, i: usize) -> RecordKey {
        RecordKey::new(scope, &format!("claim{i}"))
    }

    /// 100 slots: a light scope's 10 records, then a flood of 90 claims
    /// that never complete, then a third scope's 10 claims. The flood holds
    /// at most half the store; the third scope finds room without evicting
    /// anything of the light scope's.
    #[tokio::test]
    async fn a_flood_of_claims_never_costs_another_scope_its_records() {
        let store = MemoryStore::builder().max_entries(100).build();
        for i in 0..10 {
            record(&store, "alice", i, 64).await.unwrap();
        }
        let mut held = 0;
        for i in 0..90 {
            match store.claim(&claim_of("mallory", i), fp(), LEASE).await {
                Ok(Claim::Acquired { .. }) => held += 1,
                Err(StoreError::Full) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(held, 50, "one scope holds at most half the store in claims");
        for i in 0..10 {
            assert!(
                matches!(
                    store.claim(&claim_of("carol", i), fp(), LEASE).await,
                    Ok(Claim::Acquired { .. })
                ),
                "carol's claim {i}"
            );
        }
        for i in 0..10 {
            assert!(replayed(&store, "alice", i).await, "alice/k{i} was evicted");
        }
        assert_eq!(store.evicted_live(), 0);
    }

    /// A full store whose heaviest scope holds only claims: a newcomer is
    /// refused, and no lighter scope's records pay for it. Once claims hold
    /// less than half the store, the newcomer's room comes from the
    /// heaviest scope's records.
    #[tokio::test]
    async fn a_newcomer_never_takes_room_from_a_scope_lighter_than_the_heaviest() {
        let store = MemoryStore::builder().max_entries(100).build();
        let mut tokens = Vec::new();
        for i in 0..50 {
            let acquired = store.claim(&claim_of("mallory", i), fp(), LEASE).await;
            let Ok(Claim::Acquired { token, .. }) = acquired else {
                panic!("{acquired:?}");
            };
            tokens.push(token);
        }
        for i in 0..10 {
            record(&store, "alice", i, 64).await.unwrap();
        }
        for i in 0..40 {
            let acquired = store.claim(&claim_of("carol", i), fp(), LEASE).await;
            assert!(matches!(acquired, Ok(Claim::Acquired { .. })));
        }
        assert_eq!(store.len(), 100);
        assert!(matches!(
            store.claim(&claim_of("dave", 0), fp(), LEASE).await,
            Err(StoreError::Full)
        ));
        assert_eq!(store.evicted_live(), 0);
        // Claims hold 90 of 100 slots: while they hold half the store or
        // more, no claim evicts a record. Mallory completes 45 of its
        // claims, so claims hold 45; a newcomer's room then comes from the
        // heaviest scope, mallory, until claims hold half again.
        for (i, token) in tokens.into_iter().enumerate().take(45) {
            let done = Bytes::from_static(b"done");
            store
                .complete(&claim_of("mallory", i), token, done, TTL)
                .await
                .unwrap();
        }
        for i in 0..5 {
            let acquired = store.claim(&claim_of("dave", i), fp(), LEASE).await;
            assert!(
                matches!(acquired, Ok(Claim::Acquired { .. })),
                "{acquired:?}"
            );
        }
        assert_eq!(store.evicted_live(), 5);
        assert!(matches!(
            store.claim(&claim_of("dave", 5), fp(), LEASE).await,
            Err(StoreError::Full)
        ));
        for i in 0..10 {
            assert!(replayed(&store, "alice", i).await, "alice/k{i} was evicted");
        }
    }

    /// Claims spread over many scopes, each lighter than the scope holding
    /// records: once claims hold half the store, a newcomer's claim is
    /// refused rather than evict those records, one after another.
    #[tokio::test]
    async fn claims_of_many_light_scopes_never_take_a_heavier_scopes_records() {
        let store = MemoryStore::builder().max_entries(10).build();
        for i in 0..3 {
            record(&store, "light", i, 64).await.unwrap();
        }
        for scope in 0..7 {
            let key = claim_of(&format!("sybil-{scope}"), 0);
            let acquired = store.claim(&key, fp(), LEASE).await;
            assert!(
                matches!(acquired, Ok(Claim::Acquired { .. })),
                "{acquired:?}"
            );
        }
        for newcomer in 0..5 {
            assert!(matches!(
                store
                    .claim(&claim_of(&format!("new-{newcomer}"), 0), fp(), LEASE)
                    .await,
                Err(StoreError::Full)
            ));
        }
        assert_eq!(store.evicted_live(), 0);
        for i in 0..3 {
            assert!(replayed(&store, "light", i).await, "light/k{i} was evicted");
        }
    }
}
