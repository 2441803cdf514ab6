//! [`RedisStore`]: records in Redis, shared by a fleet of servers.

use std::{
    fmt,
    future::Future,
    sync::{Arc, LazyLock},
    time::Duration,
};

use bytes::Bytes;
use redis::{Script, Value, aio::ConnectionManager};

use super::{Claim, RecordKey, Store, StoreError, Token};
use crate::Fingerprint;

// Each record is one Redis hash under one key, so every script touches a
// single key and runs unchanged on Redis Cluster. Fields: `s` (state: `f` in
// flight, `c` completed), `fp` (fingerprint), `tok` (fencing token, while in
// flight) and `rec` (the record, once completed). Leases and retention are
// the key's own expiry, on Redis's clock.

/// ARGV: fingerprint, token, lease in ms.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 's', 'f', 'fp', ARGV[1], 'tok', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'a'}
end
local f = redis.call('HMGET', KEYS[1], 's', 'fp', 'rec')
if f[1] == 'f' and f[2] then
  return {'f', f[2], redis.call('PTTL', KEYS[1])}
elseif f[1] == 'c' and f[2] and f[3] then
  return {'c', f[2], f[3]}
end
return redis.error_reply('CORRUPT unreadable idempotency record')
",
    )
});

/// ARGV: token, lease in ms.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local f = redis.call('HMGET', KEYS[1], 's', 'tok')
if f[1] == 'f' and f[2] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
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

/// A [`Store`] in Redis: every server of a fleet that shares one Redis
/// (or one Redis Cluster) shares its records.
///
/// - Every method is one Lua script, so one round trip, atomic on the
///   server. (The first call of each script after Redis restarts costs one
///   more, to load it.)
/// - One Redis key per record, `<prefix><scope length>:<scope><key>`, and
///   every script touches only that key, so the layout needs no cross-slot
///   access on Redis Cluster. The store itself talks to one server through a
///   [`ConnectionManager`] (a single Redis, or a cluster proxy).
/// - Leases and retention are the key's expiry (`PEXPIRE`, `PTTL`), on
///   Redis's clock: app servers with skewed clocks agree. Expired records
///   disappear by themselves.
/// - A key holding something else (a string, a hash without the expected
///   fields) is [`StoreError::Corrupt`], never a panic or a fresh claim.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_idempotency::{IdempotencyLayer, store::RedisStore};
///
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let layer = IdempotencyLayer::new(store.with_prefix("bookings:idem:"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    prefix: Arc<str>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &'static str = "idempotency:";

    /// A store on a connection manager the application already has (it
    /// reconnects by itself after a failure).
    pub fn new(connection: ConnectionManager) -> Self {
        RedisStore {
            connection,
            prefix: Arc::from(Self::DEFAULT_PREFIX),
        }
    }

    /// Connects to the Redis at `url` (`redis://host:port/db`).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::unavailable)?;
        let connection = ConnectionManager::new(client)
            .await
            .map_err(StoreError::unavailable)?;
        Ok(Self::new(connection))
    }

    /// Puts every key under `prefix` (default `idempotency:`), so several
    /// services or layers can share one Redis.
    #[must_use]
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = Arc::from(prefix);
        self
    }

    /// The Redis key of a record.
    pub fn redis_key(&self, key: &RecordKey) -> String {
        let mut redis_key = String::with_capacity(self.prefix.len() + key.as_str().len());
        redis_key.push_str(&self.prefix);
        redis_key.push_str(key.as_str());
        redis_key
    }

    async fn run(&self, invocation: redis::ScriptInvocation<'_>) -> Result<Value, StoreError> {
        let mut connection = self.connection.clone();
        invocation
            .invoke_async(&mut connection)
            .await
            .map_err(store_error)
    }
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

fn parse_claim(value: Value) -> Result<Claim, StoreError> {
    let Value::Array(items) = &value else {
        return Err(unexpected(&value));
    };
    match items.as_slice() {
        [tag, fingerprint, ttl] if bytes_of(tag) == Some(b"f") => {
            // PTTL is -1 for a key without expiry, which this store never
            // writes: such a claim would never lapse.
            let Value::Int(ttl @ 0..) = ttl else {
                return Err(unexpected(&value));
            };
            Ok(Claim::InFlight {
                fingerprint: fingerprint_of(fingerprint)?,
                lease_remaining: Duration::from_millis(u64::try_from(*ttl).unwrap_or(1).max(1)),
            })
        }
        [tag, fingerprint, record] if bytes_of(tag) == Some(b"c") => Ok(Claim::Completed {
            fingerprint: fingerprint_of(fingerprint)?,
            record: Bytes::copy_from_slice(bytes_of(record).ok_or_else(|| unexpected(&value))?),
        }),
        _ => Err(unexpected(&value)),
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
    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        let redis_key = self.redis_key(key);
        let token = Token(crate::random_u64());
        async move {
            let mut invocation = CLAIM.key(redis_key);
            invocation
                .arg(&fingerprint.as_bytes()[..])
                .arg(token.0.to_string())
                .arg(millis(lease));
            let value = self.run(invocation).await?;
            if matches!(&value, Value::Array(items) if items.len() == 1 && bytes_of(&items[0]) == Some(b"a"))
            {
                return Ok(Claim::Acquired { token });
            }
            parse_claim(value)
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
            invocation.arg(token.0.to_string()).arg(millis(lease));
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
}
