//! `RedisStore` against a real Redis: the conformance suite, a fleet of two
//! servers sharing it, and a Redis that goes down mid-run.
//!
//! Needs `REDIS_URL` (for example `redis://127.0.0.1:6379`); without it every
//! test here says it skipped and passes. The outage test also needs
//! `redis-server` on the PATH.

mod common;

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{
    Counter,
    fleet::{self, booking, send},
};
use http::StatusCode;
use http_body_util::BodyExt;
use tower_idempotency::{
    IdempotencyLayer,
    store::{RecordKey, RedisStore, conformance::Harness},
};

fn redis_url() -> Option<String> {
    let url = std::env::var("REDIS_URL").ok();
    if url.is_none() {
        // Straight to stderr: the test harness hides printed output of
        // passing tests, and a skip must be seen.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipped: REDIS_URL is not set (for example redis://127.0.0.1:6379)"
        );
    }
    url
}

/// A prefix of its own per test run, so runs and tests never meet.
fn prefix(test: &str) -> String {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("tower-idempotency-test:{test}:{nonce}:")
}

struct Redis {
    store: RedisStore,
}

impl Harness for Redis {
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
        let url = std::env::var("REDIS_URL").unwrap();
        let client = redis::Client::open(url).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg(store.redis_key(key))
            .arg("not a record")
            .query_async(&mut connection)
            .await
            .unwrap();
        true
    }
}

async fn harness(test: &str) -> Option<Redis> {
    let url = redis_url()?;
    let store = RedisStore::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("REDIS_URL is set but Redis is not reachable: {e}"))
        .with_prefix(&prefix(test));
    Some(Redis { store })
}

tower_idempotency::store_conformance_tests!(optional: harness);

/// Two servers sharing one Redis execute a request once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_two_servers_executes_once() {
    let Some(url) = redis_url() else { return };
    let prefix = prefix("fleet");
    let a = RedisStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(&prefix);
    let b = RedisStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(&prefix);
    fleet::two_servers_execute_once([a, b]).await;
}

/// A holder that stops renewing loses the key after its lease, on Redis's
/// clock, and its late completion is fenced out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holder_is_taken_over_and_fenced_out() {
    let Some(url) = redis_url() else { return };
    let prefix = prefix("crash");
    let a = RedisStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(&prefix);
    let b = RedisStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(&prefix);
    fleet::a_lapsed_holder_is_fenced_out([a, b], Duration::from_millis(300)).await;
}

/// A holder that stalls past its lease while nobody retries still records
/// its response, and the other instance replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_holder_still_records_its_response() {
    let Some(url) = redis_url() else { return };
    let prefix = prefix("stall");
    let a = RedisStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(&prefix);
    let b = RedisStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(&prefix);
    fleet::a_stalled_holder_still_records([a, b], Duration::from_millis(300)).await;
}

/// A `redis-server` of the test's own, on a free loopback port, keeping an
/// append-only file so that a restart remembers what it held.
struct OwnRedis {
    port: u16,
    dir: std::path::PathBuf,
    extra: Vec<&'static str>,
    child: Option<Child>,
}

impl OwnRedis {
    fn start(port: u16, dir: std::path::PathBuf) -> Self {
        Self::start_with(port, dir, Vec::new())
    }

    fn start_with(port: u16, dir: std::path::PathBuf, extra: Vec<&'static str>) -> Self {
        let mut redis = OwnRedis {
            port,
            dir,
            extra,
            child: None,
        };
        redis.restart();
        redis
    }

    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(&self.extra)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on the PATH for the outage test");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn wait_until_up(&self) {
        let url = format!("redis://127.0.0.1:{}", self.port);
        for _ in 0..200 {
            if let Ok(client) = redis::Client::open(url.as_str())
                && let Ok(mut connection) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "the test's redis-server did not come up on port {}",
            self.port
        );
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Redis goes down mid-run: requests get 503 `store-unavailable` with
/// `Retry-After` and nothing executes; once it is back, service resumes, what
/// completed before is still replayed, and nothing runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_503_and_service_resumes_after() {
    if redis_url().is_none() {
        return;
    }
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dir = std::env::temp_dir().join(format!("tower-idempotency-outage-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut redis = OwnRedis::start(port, dir);
    redis.wait_until_up().await;

    let counter = Counter::default();
    let store = RedisStore::connect(&format!("redis://127.0.0.1:{port}"))
        .await
        .unwrap();
    let app = common::booking_router(counter.clone())
        .layer(IdempotencyLayer::new(store).with_store_timeout(Duration::from_secs(1)));
    let base = fleet::serve(app).await;
    let client = fleet::client();

    let (status, _, _) = send(&client, booking(&base, "before")).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(counter.get(), 1);

    redis.kill();
    for key in ["before", "during"] {
        let response = client.request(booking(&base, key)).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{key}");
        assert!(response.headers().contains_key("retry-after"));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("store-unavailable"));
    }
    assert_eq!(counter.get(), 1, "nothing executes while the store is down");

    redis.restart();
    redis.wait_until_up().await;
    // The connection manager reconnects on its own; the first request may
    // still meet the broken connection.
    let mut answer = send(&client, booking(&base, "before")).await;
    for _ in 0..50 {
        if answer.0 != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        answer = send(&client, booking(&base, "before")).await;
    }
    assert_eq!(
        (answer.0, answer.1),
        (StatusCode::CREATED, true),
        "replayed after the restart"
    );
    let (status, replayed, _) = send(&client, booking(&base, "during")).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    assert_eq!(counter.get(), 2, "one execution per key, none repeated");
}

/// Round trips per request, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_per_request() {
    let Some(url) = redis_url() else { return };
    let store = RedisStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(&prefix("round-trips"));
    fleet::round_trips_per_request(store).await;
}

/// Absurd leases and TTLs are clamped rather than half-applied by Redis.
#[tokio::test]
async fn huge_leases_and_ttls_are_clamped() {
    use tower_idempotency::{
        Fingerprint, Store,
        store::{Claim, RecordKey},
    };
    let Some(url) = redis_url() else { return };
    let store = RedisStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(&prefix("huge"));
    let key = RecordKey::new("", "k");
    let fp = Fingerprint::from_bytes([3; 32]);
    let Ok(Claim::Acquired { token, .. }) = store.claim(&key, fp, Duration::MAX).await else {
        panic!("a huge lease must still claim");
    };
    assert!(matches!(
        store.claim(&key, fp, Duration::MAX).await,
        Ok(Claim::InFlight { .. })
    ));
    store
        .complete(&key, token, bytes::Bytes::from_static(b"r"), Duration::MAX)
        .await
        .expect("a huge TTL must still complete");
    assert!(matches!(
        store.claim(&key, fp, Duration::MAX).await,
        Ok(Claim::Completed { .. })
    ));
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Connects to a `redis-server` of the test's own, started with
/// `settings`, and hands the store to `check`; returns what was logged at
/// WARN and above meanwhile.
fn connect_logged(settings: Vec<&'static str>, check: impl AsyncFnOnce(RedisStore)) -> String {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("tower-idempotency-settings-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let redis = OwnRedis::start_with(port, dir, settings);
    let captured = common::Captured::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(captured.subscriber(tracing::Level::WARN), || {
        runtime.block_on(async {
            redis.wait_until_up().await;
            let store = RedisStore::connect(&format!("redis://127.0.0.1:{port}"))
                .await
                .unwrap();
            check(store).await;
        })
    });
    captured.text()
}

/// A Redis that may evict keys under memory pressure is named in a warning
/// at connect; one with `noeviction` is not.
#[test]
fn connect_warns_when_redis_may_evict_records() {
    if redis_url().is_none() {
        return;
    }
    for (policy, warned) in [
        ("allkeys-lru", true),
        ("volatile-ttl", true),
        ("noeviction", false),
    ] {
        let text = connect_logged(vec!["--maxmemory-policy", policy], async |store| {
            assert_eq!(
                store.eviction_policies().await,
                Some(vec![policy.to_owned()])
            );
        });
        assert_eq!(
            text.contains("may evict idempotency records"),
            warned,
            "{policy}: {text}"
        );
        if warned {
            assert!(
                text.contains(policy),
                "the warning names the policy: {text}"
            );
        }
    }
}

/// A Redis that keeps no durable append-only file (Redis's default
/// `appendonly no`, or `appendfsync no`) is named in a warning at connect:
/// a restart of it loses records, and their retries execute again.
#[test]
fn connect_warns_when_redis_keeps_no_durable_append_only_file() {
    if redis_url().is_none() {
        return;
    }
    for (settings, (append_only, fsync), warning) in [
        (
            vec!["--appendonly", "no"],
            ("no", "always"),
            Some("keeps no append-only file"),
        ),
        (
            vec!["--appendfsync", "no"],
            ("yes", "no"),
            Some("appendfsync no"),
        ),
        (vec!["--appendfsync", "everysec"], ("yes", "everysec"), None),
        (vec![], ("yes", "always"), None),
    ] {
        let text = connect_logged(settings.clone(), async |store| {
            assert_eq!(
                store.persistence().await,
                Some(vec![(append_only.to_owned(), fsync.to_owned())])
            );
        });
        match warning {
            Some(warning) => assert!(text.contains(warning), "{settings:?}: {text}"),
            None => assert!(!text.contains("append"), "{settings:?}: {text}"),
        }
    }
}

/// The demo, as an operator runs it, says at start that its Redis keeps no
/// append-only file: the crate's warnings reach its stderr.
#[test]
fn the_demo_warns_at_start_about_a_redis_without_an_append_only_file() {
    if redis_url().is_none() {
        return;
    }
    use std::io::{BufRead, BufReader};
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("tower-idempotency-demo-aof-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let redis = OwnRedis::start_with(port, dir, vec!["--appendonly", "no"]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(redis.wait_until_up());
    let mut demo = Command::new(common::example("booking_server"))
        .arg("127.0.0.1:0")
        .env("IDEMPOTENCY_STORE", format!("redis://127.0.0.1:{port}"))
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the demo starts");
    let mut line = String::new();
    BufReader::new(demo.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening on "), "{line}");
    let _ = demo.kill();
    let output = demo.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("keeps no append-only file"), "{stderr}");
}

/// At-most-once work on Redis: racing calls with one key run it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_once_racing_calls_run_once() {
    let Some(url) = redis_url() else { return };
    let store = RedisStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(&prefix("once"));
    common::at_most_once_races(store, "tools").await;
}

/// A claim sent to a paused Redis and given up on (the layer's store
/// timeout) runs when Redis resumes; it must not leave the key held for
/// nobody: the next claim of the key acquires it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_nobody_waited_for_does_not_hold_the_key() {
    if redis_url().is_none() {
        return;
    }
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("tower-idempotency-paused-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let server = OwnRedis::start(port, dir);
    server.wait_until_up().await;
    let store = RedisStore::connect(&format!("redis://127.0.0.1:{port}"))
        .await
        .unwrap();
    let key = RecordKey::new("scope", "unanswered");
    let fingerprint = tower_idempotency::Fingerprint::from_bytes([7; 32]);
    let pid = server.child.as_ref().unwrap().id().to_string();
    let signal = |name: &str| {
        assert!(
            Command::new("kill")
                .args([name, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    let lease = Duration::from_secs(600);
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        tower_idempotency::Store::claim(&store, &key, fingerprint, lease),
    )
    .await;
    assert!(gave_up.is_err(), "a paused Redis answered");
    signal("-CONT");
    // The queued claim, then the release that follows it, run now: the key
    // is free again at once, not held for the claim's ten-minute lease.
    let mut next = None;
    for _ in 0..100 {
        let claim = tower_idempotency::Store::claim(&store, &key, fingerprint, lease)
            .await
            .unwrap();
        if let tower_idempotency::store::Claim::Acquired { took_over, .. } = claim {
            next = Some(took_over);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(next, Some(false), "the unanswered claim held the key");
}
