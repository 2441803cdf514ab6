//! `PostgresStore` against a real PostgreSQL: the conformance suite, a fleet
//! of two servers sharing it, and a holder whose lease lapses.
//!
//! Needs `DATABASE_URL` (for example `postgres://127.0.0.1/test`); without it
//! every test here says it skipped and passes. Each test uses a table of its
//! own, dropped at the end.

mod common;

use std::time::Duration;

use common::fleet;
use sqlx::PgPool;
use tower_idempotency::store::{PostgresStore, RecordKey, conformance::Harness};

fn database_url() -> Option<String> {
    let url = std::env::var("DATABASE_URL").ok();
    if url.is_none() {
        // Straight to stderr: the test harness hides printed output of
        // passing tests, and a skip must be seen.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipped: DATABASE_URL is not set (for example postgres://127.0.0.1/test)"
        );
    }
    url
}

/// A table of the test's own, so tests and runs never meet.
async fn store(test: &str) -> Option<(PostgresStore, PgPool, String)> {
    let url = database_url()?;
    let pool = PgPool::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("DATABASE_URL is set but PostgreSQL is not reachable: {e}"));
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    // Identifiers stop at 63 characters.
    let table = format!("idem_{}_{:x}", &test[..test.len().min(24)], nonce as u64);
    let store = PostgresStore::new(pool.clone()).with_table(&table).unwrap();
    store.migrate().await.unwrap();
    Some((store, pool, table))
}

async fn drop_table(pool: &PgPool, table: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
        .execute(pool)
        .await
        .unwrap();
}

struct Postgres {
    store: PostgresStore,
    pool: PgPool,
    table: String,
}

impl Harness for Postgres {
    type Store = PostgresStore;

    fn store(&self) -> PostgresStore {
        self.store.clone()
    }

    /// PostgreSQL keeps time itself (`now()`): let it pass.
    async fn advance(&self, by: Duration) {
        tokio::time::sleep(by).await;
    }

    /// Short, since the suite waits for leases to run out in real time.
    fn lease(&self) -> Duration {
        Duration::from_millis(300)
    }

    async fn sweep(&self, store: &PostgresStore) {
        store.remove_expired().await.unwrap();
    }

    async fn corrupt(&self, _store: &PostgresStore, key: &RecordKey) -> bool {
        let sql = format!(
            "UPDATE {} SET fingerprint = '\\x00' WHERE key = $1",
            self.table
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(key.as_str())
            .execute(&self.pool)
            .await
            .unwrap();
        true
    }
}

/// One table per check, with a fixed name: dropped and created anew at the
/// start, so runs leave at most one small table per check behind.
async fn harness(check: &str) -> Option<Postgres> {
    harness_on(check, "conformance", &[]).await
}

/// The same, on sessions that use `settings`, in tables named after `tag`.
async fn harness_on(check: &str, tag: &str, settings: &[(&str, &str)]) -> Option<Postgres> {
    database_url()?;
    let pool = pool_with(settings).await;
    let table = format!("idem_{tag}_{}", &check[..check.len().min(40)]);
    drop_table(&pool, &table).await;
    let store = PostgresStore::new(pool.clone()).with_table(&table).unwrap();
    store.migrate().await.unwrap();
    Some(Postgres { store, pool, table })
}

tower_idempotency::store_conformance_tests!(optional: harness);

/// The suite on sessions whose transactions are SERIALIZABLE by default:
/// serialization failures between racing claims are retried by the store,
/// never surfaced as `Unavailable`.
mod serializable {
    use super::*;

    async fn harness(check: &str) -> Option<Postgres> {
        harness_on(
            check,
            "ser",
            &[("default_transaction_isolation", "serializable")],
        )
        .await
    }

    tower_idempotency::store_conformance_tests!(optional: harness);
}

/// The suite on sessions whose transactions are REPEATABLE READ by default.
mod repeatable_read {
    use super::*;

    async fn harness(check: &str) -> Option<Postgres> {
        harness_on(
            check,
            "rr",
            &[("default_transaction_isolation", "repeatable read")],
        )
        .await
    }

    tower_idempotency::store_conformance_tests!(optional: harness);
}

/// Two servers sharing one PostgreSQL execute a request once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_two_servers_executes_once() {
    let Some((store, pool, table)) = store("fleet").await else {
        return;
    };
    let other = PostgresStore::new(PgPool::connect(&database_url().unwrap()).await.unwrap())
        .with_table(&table)
        .unwrap();
    fleet::two_servers_execute_once([store, other]).await;
    drop_table(&pool, &table).await;
}

/// A holder that stops renewing loses the key after its lease, on the
/// database's clock, and its late completion is fenced out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holder_is_taken_over_and_fenced_out() {
    let Some((store, pool, table)) = store("crash").await else {
        return;
    };
    let other = store.clone();
    fleet::a_lapsed_holder_is_fenced_out([store, other], Duration::from_millis(300)).await;
    drop_table(&pool, &table).await;
}

/// Expired rows are deleted by `remove_expired`, and only those: a lapsed
/// claim once its lapsed retention is over too.
#[tokio::test]
async fn remove_expired_deletes_only_expired_rows() {
    use tower_idempotency::{Fingerprint, Store, store::Claim};
    let Some((store, pool, table)) = store("cleanup").await else {
        return;
    };
    let fp = Fingerprint::from_bytes([1; 32]);
    let short = RecordKey::new("", "short");
    let long = RecordKey::new("", "long");
    assert!(matches!(
        store.claim(&short, fp, Duration::from_millis(50)).await,
        Ok(Claim::Acquired { .. })
    ));
    assert!(matches!(
        store.claim(&long, fp, Duration::from_secs(60)).await,
        Ok(Claim::Acquired { .. })
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        store.remove_expired().await.unwrap(),
        0,
        "a lapsed claim stays for the lapsed retention (24 hours by default)"
    );
    let store = store.with_lapsed_retention(Duration::from_millis(100));
    assert_eq!(store.remove_expired().await.unwrap(), 1);
    assert!(matches!(
        store.claim(&long, fp, Duration::from_secs(60)).await,
        Ok(Claim::InFlight { .. })
    ));
    drop_table(&pool, &table).await;
}

/// Round trips per request, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_per_request() {
    let Some((store, pool, table)) = store("round_trips").await else {
        return;
    };
    fleet::round_trips_per_request(store).await;
    drop_table(&pool, &table).await;
}

/// A valid name that is also a reserved word works: names are quoted.
#[tokio::test]
async fn a_reserved_word_is_a_usable_table_name() {
    use tower_idempotency::{Fingerprint, Store, store::Claim};
    let Some(url) = database_url() else { return };
    let pool = PgPool::connect(&url).await.unwrap();
    let table = "order";
    drop_table(&pool, "\"order\"").await;
    let store = PostgresStore::new(pool.clone()).with_table(table).unwrap();
    store.migrate().await.unwrap();
    let key = RecordKey::new("", "k");
    let claim = store
        .claim(
            &key,
            Fingerprint::from_bytes([0; 32]),
            Duration::from_secs(5),
        )
        .await;
    assert!(matches!(claim, Ok(Claim::Acquired { .. })), "{claim:?}");
    drop_table(&pool, "\"order\"").await;
}

/// A pool whose sessions use `settings` (`-c name=value` at connect).
async fn pool_with(settings: &[(&str, &str)]) -> PgPool {
    let options: sqlx::postgres::PgConnectOptions = database_url().unwrap().parse().unwrap();
    PgPool::connect_with(options.options(settings.iter().copied()))
        .await
        .unwrap_or_else(|e| panic!("DATABASE_URL is set but PostgreSQL is not reachable: {e}"))
}

/// The row's `xmax`: a transaction that updated or locked the row leaves
/// its id there.
async fn xmax(pool: &PgPool, table: &str, key: &RecordKey) -> String {
    let sql = format!("SELECT xmax::text FROM {table} WHERE key = $1");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(key.as_str())
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A replay and an in-flight answer are reads: they neither write nor lock
/// the row, so they never queue behind the holder's `complete` or `renew`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_in_flight_answers_take_no_row_lock() {
    use sqlx::Acquire;
    use tower_idempotency::{Fingerprint, Store, store::Claim};
    let Some((store, pool, table)) = store("no_lock").await else {
        return;
    };
    let fp = Fingerprint::from_bytes([7; 32]);
    let done = RecordKey::new("s", "done");
    let busy = RecordKey::new("s", "busy");
    common::record_directly(&store, &done, fp, b"r").await;
    assert!(matches!(
        store.claim(&busy, fp, Duration::from_secs(60)).await,
        Ok(Claim::Acquired { .. })
    ));

    // Nothing writes the rows' xmax: no update, no row lock.
    let before = (
        xmax(&pool, &table, &done).await,
        xmax(&pool, &table, &busy).await,
    );
    for _ in 0..3 {
        assert!(matches!(
            store.claim(&done, fp, Duration::from_secs(60)).await,
            Ok(Claim::Completed { .. })
        ));
        assert!(matches!(
            store.claim(&busy, fp, Duration::from_secs(60)).await,
            Ok(Claim::InFlight { .. })
        ));
    }
    let after = (
        xmax(&pool, &table, &done).await,
        xmax(&pool, &table, &busy).await,
    );
    assert_eq!(
        before, after,
        "a replay or an in-flight answer locked or wrote the row"
    );

    // While another transaction holds both rows locked (a holder's
    // `complete` under way), answers still come: on a pool that gives up on
    // any row lock after 2 s, a claim that waited for one would fail.
    let impatient = PostgresStore::new(pool_with(&[("lock_timeout", "2s")]).await)
        .with_table(&table)
        .unwrap();
    let mut holder = pool.acquire().await.unwrap();
    let mut tx = holder.begin().await.unwrap();
    let lock = format!("SELECT key FROM {table} WHERE key IN ($1, $2) FOR UPDATE");
    let locked: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(lock))
        .bind(done.as_str())
        .bind(busy.as_str())
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(locked.len(), 2);
    let replay = impatient.claim(&done, fp, Duration::from_secs(60)).await;
    assert!(matches!(replay, Ok(Claim::Completed { .. })), "{replay:?}");
    let in_flight = impatient.claim(&busy, fp, Duration::from_secs(60)).await;
    assert!(
        matches!(in_flight, Ok(Claim::InFlight { .. })),
        "{in_flight:?}"
    );
    tx.rollback().await.unwrap();
    drop(holder);
    drop_table(&pool, &table).await;
}

/// At-most-once work on PostgreSQL: racing calls with one key run it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_racing_calls_run_once() {
    let Some((store, pool, table)) = store("once").await else {
        return;
    };
    common::at_most_once_races(store, "tools").await;
    drop_table(&pool, &table).await;
}
