//! The store conformance suite, run against the stores this crate ships.

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
}

tower_idempotency::store_conformance_tests!(Memory::default());

#[tokio::test]
async fn memory_store_bounded_by_entries_never_evicts_in_flight() {
    let store = MemoryStore::builder().max_entries(8).build();
    conformance::bounded_store_never_evicts_in_flight(&store, 8, Duration::from_secs(10)).await;
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
