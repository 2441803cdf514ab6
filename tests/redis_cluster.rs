//! `RedisStore` against a real three-master Redis Cluster: the conformance
//! suite, a fleet of two servers, a stalled and a crashed holder, and where
//! records land.
//!
//! Needs `REDIS_CLUSTER_URLS`, the nodes' addresses separated by commas (for
//! example `redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103`);
//! without it every test here says it skipped and passes.
//! `bash scripts/redis-cluster.sh start` starts such a cluster and prints the
//! variable; `.ci/run` does so.

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::fleet;
use tower_idempotency::{
    Fingerprint, Store,
    store::{Claim, RecordKey, RedisStore, conformance::Harness},
};

fn cluster_urls() -> Option<Vec<String>> {
    let urls = std::env::var("REDIS_CLUSTER_URLS").ok();
    if urls.is_none() {
        // Straight to stderr: the test harness hides printed output of
        // passing tests, and a skip must be seen.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipped: REDIS_CLUSTER_URLS is not set (bash scripts/redis-cluster.sh start prints it)"
        );
    }
    Some(urls?.split(',').map(|url| url.trim().to_owned()).collect())
}

/// A prefix of its own per test run, so runs and tests never meet.
fn prefix(test: &str) -> String {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("tower-idempotency-test:{test}:{nonce}:")
}

async fn connect(urls: &[String], test_prefix: &str) -> RedisStore {
    RedisStore::connect_cluster(urls)
        .await
        .unwrap_or_else(|e| {
            panic!("REDIS_CLUSTER_URLS is set but the cluster is not reachable: {e}")
        })
        .with_prefix(test_prefix)
}

/// A plain cluster connection, to look at and damage records directly.
async fn raw(urls: &[String]) -> redis::cluster_async::ClusterConnection {
    redis::cluster::ClusterClient::new(urls.to_vec())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap()
}

struct Cluster {
    store: RedisStore,
    urls: Vec<String>,
}

impl Harness for Cluster {
    type Store = RedisStore;

    fn store(&self) -> RedisStore {
        self.store.clone()
    }

    /// Redis keeps time itself: let it pass.
    async fn advance(&self, by: Duration) {
        tokio::time::sleep(by).await;
    }

    /// Short, since the suite waits for leases to run out in real time.
    fn lease(&self) -> Duration {
        Duration::from_millis(300)
    }

    async fn corrupt(&self, store: &RedisStore, key: &RecordKey) -> bool {
        let _: () = redis::cmd("SET")
            .arg(store.redis_key(key))
            .arg("not a record")
            .query_async(&mut raw(&self.urls).await)
            .await
            .unwrap();
        true
    }
}

async fn harness(test: &str) -> Option<Cluster> {
    let urls = cluster_urls()?;
    let store = connect(&urls, &prefix(test)).await;
    Some(Cluster { store, urls })
}

tower_idempotency::store_conformance_tests!(optional: harness);

/// Two servers sharing one cluster execute a request once, and either
/// replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_two_servers_executes_once() {
    let Some(urls) = cluster_urls() else { return };
    let prefix = prefix("fleet");
    let a = connect(&urls, &prefix).await;
    let b = connect(&urls, &prefix).await;
    fleet::two_servers_execute_once([a, b]).await;
}

/// A holder that stalls past its lease while nobody retries still records
/// its response, and the other instance replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_holder_still_records_its_response() {
    let Some(urls) = cluster_urls() else { return };
    let prefix = prefix("stall");
    let a = connect(&urls, &prefix).await;
    let b = connect(&urls, &prefix).await;
    fleet::a_stalled_holder_still_records([a, b], Duration::from_millis(300)).await;
}

/// A holder that stops renewing is taken over by a retry on the other
/// instance, and its late completion is fenced out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holder_is_taken_over_and_fenced_out() {
    let Some(urls) = cluster_urls() else { return };
    let prefix = prefix("crash");
    let a = connect(&urls, &prefix).await;
    let b = connect(&urls, &prefix).await;
    fleet::a_lapsed_holder_is_fenced_out([a, b], Duration::from_millis(300)).await;
}

async fn slot(connection: &mut redis::cluster_async::ClusterConnection, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(connection)
        .await
        .unwrap()
}

/// Which slot a record lands on follows from the digest of scope and key:
/// braces in a client's key do not choose it, and records spread over every
/// master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_land_by_digest_on_every_master() {
    let Some(urls) = cluster_urls() else { return };
    let store = connect(&urls, &prefix("slots")).await;
    let mut connection = raw(&urls).await;

    // A client trying to pin its keys to the slot of `{pinned}`.
    let pinned = slot(&mut connection, "{pinned}").await;
    let mut slots = BTreeSet::new();
    for i in 0..64 {
        let key = RecordKey::new("caller", &format!("{{pinned}}{i}"));
        let redis_key = store.redis_key(&key);
        let tag = &redis_key[redis_key.find('{').unwrap()..=redis_key.find('}').unwrap()];
        assert_eq!(tag.len(), 18, "16 hex digits in braces: {redis_key}");
        let landed = slot(&mut connection, &redis_key).await;
        assert_eq!(
            landed,
            slot(&mut connection, tag).await,
            "the digest decides"
        );
        slots.insert(landed);
    }
    assert!(slots.len() > 1, "braces in the key chose the slot");
    assert!(!slots.iter().all(|s| *s == pinned));

    // Every master receives records: each holds a third of the slots.
    let masters: BTreeSet<u16> = slots.iter().map(|s| s / 5462).collect();
    assert_eq!(masters.len(), 3, "slots {slots:?}");

    // And they work where they land.
    let fp = Fingerprint::from_bytes([4; 32]);
    for i in 0..16 {
        let key = RecordKey::new("caller", &format!("k{i}"));
        common::record_directly(&store, &key, fp, b"r").await;
        assert!(matches!(
            store.claim(&key, fp, Duration::from_secs(5)).await,
            Ok(Claim::Completed { .. })
        ));
    }
}

/// `connect` takes `redis+cluster://` addresses, and names a bad one.
#[tokio::test]
async fn connect_reads_cluster_addresses() {
    let Some(urls) = cluster_urls() else { return };
    let nodes: Vec<&str> = urls
        .iter()
        .map(|u| u.trim_start_matches("redis://"))
        .collect();
    let store = RedisStore::connect(&format!("redis+cluster://{}", nodes.join(",")))
        .await
        .unwrap();
    assert!(format!("{store:?}").contains("cluster"));
    let policies = store.eviction_policies().await.unwrap();
    assert!(
        policies.iter().all(|p| p == "noeviction"),
        "the test cluster runs with noeviction: {policies:?}"
    );
    for bad in ["redis+cluster://", "redis+cluster://127.0.0.1:7101,"] {
        let err = RedisStore::connect(bad).await.unwrap_err();
        assert!(
            err.to_string().contains("redis+cluster://HOST:PORT"),
            "{bad}: {err}"
        );
    }
}

/// At-most-once work on the cluster: racing calls with one key run it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_racing_calls_run_once() {
    let Some(urls) = cluster_urls() else { return };
    common::at_most_once_races(connect(&urls, &prefix("once")).await, "tools").await;
}
