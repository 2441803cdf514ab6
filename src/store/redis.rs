//! [`RedisStore`]: records in Redis, shared by a fleet of servers.

use std::{
    fmt,
    future::Future,
    sync::{Arc, LazyLock},
    time::Duration,
};

use bytes::Bytes;
use redis::{Script, Value, aio::ConnectionManager, cluster_async::ClusterConnection};
use sha2::{Digest, Sha256};

use super::{Claim, Peeked, RecordKey, Store, StoreError, Token};
use crate::Fingerprint;

// Each record is one Redis hash under one key, so every script touches a
// single key and runs unchanged on Redis Cluster. The key is
// `<prefix>{<digest>}<scope length>:<scope><key>`: the hash tag is the first
// 16 hex digits of SHA-256 over scope and key, so the slot follows from the
// digest, and braces inside a client's key cannot choose it. Fields: `s` (state: `f` in
// flight, `c` completed), `fp` (fingerprint), `tok` (fencing token, while in
// flight), `lu` (end of the lease, in milliseconds of Redis's `TIME`, while in
// flight) and `rec` (the record, once completed). Time is Redis's clock.
//
// A lease that runs out does not remove the claim: its holder may still renew
// and complete it until another claim takes it over. The key of an in-flight
// record expires only `lapsed retention` after its lease; a completed record's
// key expires with its TTL.

/// ARGV: fingerprint, token, lease in ms, lapsed retention in ms.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local took = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  local f = redis.call('HMGET', KEYS[1], 's', 'fp', 'rec', 'lu')
  local lu = tonumber(f[4])
  if f[1] == 'f' and f[2] and not f[4] then
    -- Written by a version that kept the lease as the key's expiry.
    return {'f', f[2], math.max(redis.call('PTTL', KEYS[1]), 1)}
  elseif f[1] == 'f' and f[2] and lu then
    if lu > now then
      return {'f', f[2], lu - now}
    elseif f[2] ~= ARGV[1] then
      -- Lapsed, but only the same request may take it over.
      return {'f', f[2], 0}
    end
    took = 1
  elseif f[1] == 'c' and f[2] and f[3] then
    return {'c', f[2], f[3]}
  else
    return redis.error_reply('CORRUPT unreadable idempotency record')
  end
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 's', 'f', 'fp', ARGV[1], 'tok', ARGV[2],
  'lu', string.format('%.0f', now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], string.format('%.0f', tonumber(ARGV[3]) + tonumber(ARGV[4])))
return {'a', took}
",
    )
});

/// ARGV: token, lease in ms, lapsed retention in ms.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local f = redis.call('HMGET', KEYS[1], 's', 'tok')
if f[1] == 'f' and f[2] == ARGV[1] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS[1], 'lu', string.format('%.0f', now + tonumber(ARGV[2])))
  redis.call('PEXPIRE', KEYS[1], string.format('%.0f', tonumber(ARGV[2]) + tonumber(ARGV[3])))
  return 1
end
return 0
",
    )
});

/// ARGV: token, record, ttl in ms.
static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local f = redis.call('HMGET', KEYS[1], 's', 'tok')
if f[1] == 'f' and f[2] == ARGV[1] then
  redis.call('HSET', KEYS[1], 's', 'c', 'rec', ARGV[2])
  redis.call('HDEL', KEYS[1], 'tok')
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
",
    )
});

/// ARGV: token.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local f = redis.call('HMGET', KEYS[1], 's', 'tok')
if f[1] == 'f' and f[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
",
    )
});

/// Reads a record: `{state, token, record}`, each `false` when absent.
static PEEK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
return redis.call('HMGET', KEYS[1], 's', 'tok', 'rec')
",
    )
});

/// A [`Store`] in Redis: every server of a fleet that shares one Redis, or
/// one Redis Cluster, shares its records.
///
/// - Every method is one Lua script, so one round trip, atomic on the
///   server. (The first call of each script after Redis restarts costs one
///   more, to load it.)
/// - One Redis key per record, `<prefix>{<digest>}<scope length>:<scope><key>`,
///   and every script touches only that key. The `{<digest>}` hash tag is
///   16 hex digits of SHA-256 over scope and key: on a cluster, the slot
///   (and so the node) a record lands on follows from that digest, and a
///   client cannot choose it by putting braces in its key. (A prefix with a
///   `{...}` of its own puts every record in that one slot: it works, on one
///   node.)
/// - One server through a [`ConnectionManager`] ([`connect`](Self::connect),
///   [`new`](Self::new)), or a Redis Cluster through the `redis` crate's
///   async cluster client ([`connect_cluster`](Self::connect_cluster),
///   [`new_cluster`](Self::new_cluster)), which follows `MOVED` and `ASK`
///   redirections and slot migrations. The scripts and guarantees are the
///   same.
/// - Leases are a deadline inside the record and retention is the key's
///   expiry (`PEXPIRE`), both on Redis's clock (`TIME`): app servers with
///   skewed clocks agree. A claim whose lease ran out stays until another
///   claim takes it over (its holder may still renew and complete it), or
///   until [lapsed retention](Self::with_lapsed_retention) (24 hours by
///   default) after its lease. Expired records disappear by themselves.
/// - A key holding something else (a string, a hash without the expected
///   fields) is [`StoreError::Corrupt`], never a panic or a fresh claim.
/// - A claim whose caller stopped waiting for the answer (the layer's
///   store timeout, with Redis paused or slow) is followed by a release
///   under its token on the same connection: if Redis runs the claim
///   later, it does not hold the key for nobody, and it cannot keep a
///   retry from executing, or, under [`Lapse::Settle`](crate::Lapse::Settle),
///   turn into an `outcome-unknown` for a request that never ran.
///
/// # What Redis must guarantee
///
/// - **`maxmemory-policy noeviction`.** Every key of this store has an
///   expiry, so any other policy (`allkeys-*` and `volatile-*` alike) lets
///   Redis delete a live claim or record under memory pressure, and the
///   next retry executes again. With `noeviction` a full Redis refuses
///   writes instead: claims fail and the layer answers 503. `connect` and
///   `connect_cluster` log a warning when the server reports another
///   policy (when `CONFIG` is allowed to answer).
/// - **An append-only file, synced.** With Redis's default `appendonly
///   no`, a restart or crash of Redis loses every claim and record: the
///   retry of a completed request executes again, and so does the retry
///   of one that was running. Run it with `appendonly yes` and
///   `appendfsync always` (every write on disk before it is acknowledged),
///   or `everysec` (the last second of writes can be lost in a crash of
///   the machine). RDB snapshots alone (`save`) lose everything since the
///   last one. `connect` and `connect_cluster` warn when a node reports
///   `appendonly no` or `appendfsync no`.
/// - **Replication is asynchronous.** A claim or record acknowledged by a
///   primary that fails before its replica received it is lost when the
///   replica is promoted: a retry in that window executes again. Redis
///   Cluster failover has the same window (and a partitioned minority
///   primary keeps accepting writes for up to `cluster-node-timeout`).
///   Where that window matters, run with persistence (`appendonly yes`,
///   `appendfsync always`) and no replicas, or use the PostgreSQL store
///   with synchronous replication.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_idempotency::{IdempotencyLayer, store::RedisStore};
///
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let layer = IdempotencyLayer::new(store.with_prefix("bookings:idem:"));
///
/// // Or a Redis Cluster, from any of its nodes:
/// let cluster = RedisStore::connect("redis+cluster://127.0.0.1:7101,127.0.0.1:7102").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    connection: Connection,
    prefix: Arc<str>,
    lapsed_retention: Duration,
}

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.connection {
            Connection::Single(_) => "single",
            Connection::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("mode", &mode)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A `redis+cluster://` address [`RedisStore::connect`] could not read.
#[derive(Debug)]
struct InvalidClusterUrl(String);

impl fmt::Display for InvalidClusterUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid Redis Cluster address {:?}: expected redis+cluster://HOST:PORT[,HOST:PORT...]",
            self.0
        )
    }
}

impl std::error::Error for InvalidClusterUrl {}

impl RedisStore {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "idempotency:";

    /// How long a claim whose lease ran out is kept by default, for its
    /// holder to renew or complete it if nobody takes it over: 24 hours.
    pub const DEFAULT_LAPSED_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

    /// How long [`connect`](Self::connect) and
    /// [`connect_cluster`](Self::connect_cluster) let the client wait for
    /// an answer: 30 seconds, above the layer's
    /// [store timeout](crate::IdempotencyLayer::with_store_timeout), which
    /// answers the request first (the `redis` crate's own default, 500 ms,
    /// would fail a claim that Redis, once it catches up, still runs).
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

    fn with_connection(connection: Connection) -> Self {
        RedisStore {
            connection,
            prefix: Arc::from(Self::DEFAULT_PREFIX),
            lapsed_retention: Self::DEFAULT_LAPSED_RETENTION,
        }
    }

    /// A store on a connection manager the application already has (it
    /// reconnects by itself after a failure).
    pub fn new(connection: ConnectionManager) -> Self {
        Self::with_connection(Connection::Single(connection))
    }

    /// A store on a Redis Cluster connection the application already has
    /// (from `redis::cluster::ClusterClient::get_async_connection`).
    pub fn new_cluster(connection: ClusterConnection) -> Self {
        Self::with_connection(Connection::Cluster(connection))
    }

    /// Connects to the Redis at `url` (`redis://host:port/db`), or to the
    /// Redis Cluster at `redis+cluster://host:port[,host:port...]` (any of
    /// its nodes; the rest are discovered). Warns (through `tracing`) when
    /// the server's `maxmemory-policy` may evict records, or when it keeps
    /// no durable append-only file (`appendonly no`, or `appendfsync no`).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        if let Some(nodes) = url.strip_prefix("redis+cluster://") {
            let nodes: Vec<String> = nodes
                .split(',')
                .map(|node| format!("redis://{}", node.trim()))
                .collect();
            if nodes.iter().any(|node| node.len() == "redis://".len()) {
                return Err(StoreError::unavailable(InvalidClusterUrl(url.to_owned())));
            }
            return Self::connect_cluster(&nodes).await;
        }
        let client = redis::Client::open(url).map_err(StoreError::unavailable)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(Self::RESPONSE_TIMEOUT));
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(StoreError::unavailable)?;
        let store = Self::new(connection);
        store.warn_if_unsafe().await;
        Ok(store)
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port`
    /// each). Warns (through `tracing`) when a node's `maxmemory-policy` may
    /// evict records, or it keeps no durable append-only file.
    pub async fn connect_cluster(nodes: &[impl AsRef<str>]) -> Result<Self, StoreError> {
        let nodes: Vec<&str> = nodes.iter().map(AsRef::as_ref).collect();
        let client = redis::cluster::ClusterClient::builder(nodes)
            .response_timeout(Self::RESPONSE_TIMEOUT)
            .build()
            .map_err(StoreError::unavailable)?;
        let connection = client
            .get_async_connection()
            .await
            .map_err(StoreError::unavailable)?;
        let store = Self::new_cluster(connection);
        store.warn_if_unsafe().await;
        Ok(store)
    }

    /// The server's `maxmemory-policy` (on a cluster, as each node that
    /// answered reports it), or `None` when `CONFIG` is disabled or refused.
    pub async fn eviction_policies(&self) -> Option<Vec<String>> {
        self.config_values("maxmemory-policy").await
    }

    /// The server's `appendonly` and `appendfsync` settings (on a cluster,
    /// as each node that answered reports them), or `None` when `CONFIG`
    /// is disabled or refused.
    pub async fn persistence(&self) -> Option<Vec<(String, String)>> {
        let append_only = self.config_values("appendonly").await?;
        let fsync = self.config_values("appendfsync").await?;
        Some(append_only.into_iter().zip(fsync).collect())
    }

    /// One `CONFIG GET` parameter's value, per node that answered.
    async fn config_values(&self, parameter: &'static str) -> Option<Vec<String>> {
        let mut command = redis::cmd("CONFIG");
        command.arg("GET").arg(parameter);
        let answer: Result<Value, _> = match &self.connection {
            Connection::Single(c) => command.query_async(&mut c.clone()).await,
            Connection::Cluster(c) => command.query_async(&mut c.clone()).await,
        };
        match answer {
            Ok(value) => Some(values_in(&value, parameter)),
            Err(err) => {
                tracing::debug!(error = %err, parameter, "could not read a Redis setting");
                None
            }
        }
    }

    /// Warns about settings under which Redis loses records: eviction, and
    /// no durable append-only file.
    async fn warn_if_unsafe(&self) {
        for policy in self.eviction_policies().await.unwrap_or_default() {
            if policy != "noeviction" {
                tracing::warn!(
                    policy = %policy,
                    "Redis may evict idempotency records under memory pressure (maxmemory-policy \
                     is not noeviction): a retry of an evicted request executes again"
                );
                break;
            }
        }
        for (append_only, fsync) in self.persistence().await.unwrap_or_default() {
            if append_only != "yes" {
                tracing::warn!(
                    "Redis keeps no append-only file (appendonly is not yes): a restart or crash \
                     of Redis loses completed and in-flight records, and retries of those \
                     requests execute again; run it with appendonly yes and appendfsync always \
                     (or everysec, which can lose the last second)"
                );
                return;
            }
            if fsync == "no" {
                tracing::warn!(
                    "Redis leaves flushing its append-only file to the operating system \
                     (appendfsync no): a crash can lose the last seconds of records, and retries \
                     of those requests execute again; use appendfsync always or everysec"
                );
                return;
            }
        }
    }

    /// Puts every key under `prefix` (default `idempotency:`), so several
    /// services or layers can share one Redis.
    #[must_use]
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = Arc::from(prefix);
        self
    }

    /// How long after its lease ends a claim nobody took over is kept
    /// (default [`DEFAULT_LAPSED_RETENTION`](Self::DEFAULT_LAPSED_RETENTION)).
    /// Until then its holder, stalled or cut off from Redis for a while, can
    /// still renew it and record its response; after it, the key is free.
    #[must_use]
    pub fn with_lapsed_retention(mut self, retention: Duration) -> Self {
        self.lapsed_retention = retention;
        self
    }

    /// The Redis key of a record: `<prefix>{<digest>}<scope length>:<scope><key>`.
    pub fn redis_key(&self, key: &RecordKey) -> String {
        let joined = key.as_str();
        let digest = Sha256::digest(joined.as_bytes());
        let mut redis_key = String::with_capacity(self.prefix.len() + 18 + joined.len());
        redis_key.push_str(&self.prefix);
        redis_key.push('{');
        crate::scope::push_hex(&mut redis_key, &digest[..8]);
        redis_key.push('}');
        redis_key.push_str(joined);
        redis_key
    }

    async fn run(&self, invocation: redis::ScriptInvocation<'_>) -> Result<Value, StoreError> {
        let answer = match &self.connection {
            Connection::Single(c) => invocation.invoke_async(&mut c.clone()).await,
            Connection::Cluster(c) => invocation.invoke_async(&mut c.clone()).await,
        };
        answer.map_err(store_error)
    }
}

/// The values in a `CONFIG GET <parameter>` answer: a map or a flat
/// name-value list, or on a cluster one such answer per node.
fn values_in(value: &Value, parameter: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut collect = |v: &Value| {
        if let Some(text) = bytes_of(v).and_then(|b| std::str::from_utf8(b).ok())
            && text != parameter
        {
            found.push(text.to_owned());
        }
    };
    fn walk(value: &Value, collect: &mut dyn FnMut(&Value)) {
        match value {
            Value::Array(items) | Value::Set(items) => items.iter().for_each(|v| walk(v, collect)),
            Value::Map(pairs) => pairs.iter().for_each(|(k, v)| {
                walk(k, collect);
                walk(v, collect);
            }),
            other => collect(other),
        }
    }
    walk(value, &mut collect);
    found
}

fn store_error(err: redis::RedisError) -> StoreError {
    // A key of another type (`WRONGTYPE`, raised inside the script) or a
    // hash without the expected fields (`CORRUPT`, raised by the script).
    let text = err.to_string();
    let corrupt = matches!(err.code(), Some("WRONGTYPE" | "CORRUPT"))
        || text.contains("WRONGTYPE")
        || text.contains("CORRUPT");
    if corrupt {
        StoreError::Corrupt(Box::new(err))
    } else {
        StoreError::unavailable(err)
    }
}

/// An answer from a script that is not what the script returns.
#[derive(Debug)]
struct Unexpected(String);

impl fmt::Display for Unexpected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unexpected answer from Redis: {}", self.0)
    }
}

impl std::error::Error for Unexpected {}

fn unexpected(value: &Value) -> StoreError {
    StoreError::Corrupt(Box::new(Unexpected(format!("{value:?}"))))
}

/// A lease or TTL in milliseconds, at least 1 and at most 100 years: Redis
/// refuses an expiry past its own range, and a script stopped by such an
/// error halfway would leave its first writes behind.
fn millis(d: Duration) -> u64 {
    const CENTURY_MS: u64 = 100 * 365 * 24 * 60 * 60 * 1000;
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, CENTURY_MS)
}

fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn fingerprint_of(value: &Value) -> Result<Fingerprint, StoreError> {
    bytes_of(value)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(Fingerprint::from_bytes)
        .ok_or_else(|| unexpected(value))
}

fn parse_claim(value: Value, token: Token) -> Result<Claim, StoreError> {
    let Value::Array(items) = &value else {
        return Err(unexpected(&value));
    };
    match items.as_slice() {
        [tag, Value::Int(took_over @ 0..=1)] if bytes_of(tag) == Some(b"a") => {
            Ok(Claim::Acquired {
                token,
                took_over: *took_over == 1,
            })
        }
        [tag, fingerprint, left] if bytes_of(tag) == Some(b"f") => {
            // 0: lapsed, and held for a different request.
            let Value::Int(left @ 0..) = left else {
                return Err(unexpected(&value));
            };
            Ok(Claim::InFlight {
                fingerprint: fingerprint_of(fingerprint)?,
                lease_remaining: Duration::from_millis(u64::try_from(*left).unwrap_or(1)),
            })
        }
        [tag, fingerprint, record] if bytes_of(tag) == Some(b"c") => Ok(Claim::Completed {
            fingerprint: fingerprint_of(fingerprint)?,
            record: Bytes::copy_from_slice(bytes_of(record).ok_or_else(|| unexpected(&value))?),
        }),
        _ => Err(unexpected(&value)),
    }
}

/// A claim sent and not yet answered; see [`Store::claim`] for Redis.
struct Unanswered(Option<(RedisStore, String, Token)>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        let Some((store, redis_key, token)) = self.0.take() else {
            return;
        };
        // On the same connection (and, on a cluster, the same node) the
        // release runs after the claim: it removes the claim if it landed
        // under this token, and changes nothing otherwise.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut invocation = RELEASE.key(redis_key);
                invocation.arg(token.0.to_string());
                let _ = store.run(invocation).await;
            });
        }
    }
}

fn fenced_unless_one(value: Value) -> Result<(), StoreError> {
    match value {
        Value::Int(1) => Ok(()),
        Value::Int(0) => Err(StoreError::Fenced),
        other => Err(unexpected(&other)),
    }
}

impl Store for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        let redis_key = self.redis_key(key);
        let token = Token(crate::random_u64());
        async move {
            let mut invocation = CLAIM.key(&redis_key);
            invocation
                .arg(&fingerprint.as_bytes()[..])
                .arg(token.0.to_string())
                .arg(millis(lease))
                .arg(millis(self.lapsed_retention));
            // Dropped before the answer (the layer's store timeout): the
            // script may still run, so a release under the same token
            // follows it and undoes a claim nobody holds.
            // (The invocation holds the key's bytes already: the string
            // itself moves into the guard, no copy.)
            let mut unanswered = Unanswered(Some((self.clone(), redis_key, token)));
            let answer = self.run(invocation).await;
            unanswered.0 = None;
            parse_claim(answer?, token)
        }
    }

    fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let redis_key = self.redis_key(key);
        async move {
            let mut invocation = RENEW.key(redis_key);
            invocation
                .arg(token.0.to_string())
                .arg(millis(lease))
                .arg(millis(self.lapsed_retention));
            fenced_unless_one(self.run(invocation).await?)
        }
    }

    fn complete(
        &self,
        key: &RecordKey,
        token: Token,
        record: Bytes,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let redis_key = self.redis_key(key);
        async move {
            let mut invocation = COMPLETE.key(redis_key);
            invocation
                .arg(token.0.to_string())
                .arg(&record[..])
                .arg(millis(ttl));
            fenced_unless_one(self.run(invocation).await?)
        }
    }

    fn release(
        &self,
        key: &RecordKey,
        token: Token,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let redis_key = self.redis_key(key);
        async move {
            let mut invocation = RELEASE.key(redis_key);
            invocation.arg(token.0.to_string());
            fenced_unless_one(self.run(invocation).await?)
        }
    }

    fn peek(&self, key: &RecordKey) -> impl Future<Output = Result<Peeked, StoreError>> + Send {
        let redis_key = self.redis_key(key);
        async move {
            let value = self.run(PEEK.key(redis_key)).await?;
            parse_peek(&value)
        }
    }
}

fn parse_peek(value: &Value) -> Result<Peeked, StoreError> {
    let Value::Array(items) = value else {
        return Err(unexpected(value));
    };
    let field = |i: usize| items.get(i).and_then(bytes_of);
    Ok(match (field(0), field(1), field(2)) {
        (None, _, _) => Peeked::Absent,
        (Some(b"f"), Some(token), _) => {
            let token = std::str::from_utf8(token)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| unexpected(value))?;
            Peeked::InFlight {
                token: Token(token),
            }
        }
        (Some(b"c"), _, Some(record)) => Peeked::Completed {
            record: Bytes::copy_from_slice(record),
        },
        _ => return Err(unexpected(value)),
    })
}
