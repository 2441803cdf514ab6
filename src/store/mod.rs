//! Where records live: the [`Store`] trait, its contract, and the stores that
//! ship with the crate.
//!
//! A store is the only part that differs between one process and a fleet of
//! servers. Every method is designed to be a single atomic operation, one
//! round trip to a remote store:
//!
//! | method | Redis | PostgreSQL | [`MemoryStore`] |
//! |---|---|---|---|
//! | [`claim`](Store::claim) | Lua script | a read, and only for a free or expired key `INSERT ... ON CONFLICT DO UPDATE ... WHERE expired RETURNING`, in one statement | `DashMap::entry` |
//! | [`complete`](Store::complete) | Lua compare-token-and-set | `UPDATE ... WHERE token = $1` | entry under its shard lock |
//! | [`renew`](Store::renew) | Lua compare-token-and-`PEXPIRE` | `UPDATE ... WHERE token = $1` | entry under its shard lock |
//! | [`release`](Store::release) | Lua compare-token-and-`DEL` | `DELETE ... WHERE token = $1` | `remove_if` |
//! | [`peek`](Store::peek) (only after a refused token) | `HMGET` in a script | `SELECT` | a shared read |
//!
//! Time that decides leases and expiry is the store's own clock where it has
//! one (Redis TTLs, PostgreSQL `now()`), so app servers with skewed clocks
//! agree.

use std::{error::Error as StdError, fmt, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;

use crate::Fingerprint;

mod boxed;
mod memory;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
mod redis;

#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod conformance;
#[cfg(feature = "test-util")]
mod faulty;

pub use boxed::BoxStore;
#[cfg(feature = "test-util")]
pub use faulty::{Fault, FaultyStore, Op};
#[cfg(feature = "test-util")]
pub use memory::ManualClock;
pub use memory::{Clock, MemoryStore, MemoryStoreBuilder, TokioClock};
#[cfg(feature = "postgres")]
pub use postgres::{InvalidTableName, PostgresStore};
#[cfg(feature = "redis")]
pub use redis::RedisStore;

/// The lookup key of a record: the server-chosen scope and the client's key.
///
/// Two callers in different scopes who pick the same key never see each
/// other's records. [`RecordKey::as_str`] joins both into one unambiguous
/// string (`"<scope length>:<scope><key>"`) for stores keyed by a string.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordKey {
    /// `"<scope length>:<scope><key>"`: one allocation, cloned by reference
    /// count, and small enough to keep per-record overhead low.
    joined: Arc<str>,
}

impl RecordKey {
    /// Builds a key from a scope and a client key.
    pub fn new(scope: &str, key: &str) -> Self {
        use std::fmt::Write;
        // Joined on the stack when it fits, so the one allocation is the
        // shared string's own.
        let mut joined = Joined::default();
        let _ = write!(joined, "{}:{scope}{key}", scope.len());
        let joined: Arc<str> = match &joined.spilled {
            Some(spilled) => Arc::from(spilled.as_str()),
            None => Arc::from(joined.as_str()),
        };
        RecordKey { joined }
    }

    /// Where the scope starts and ends in the joined string.
    fn scope_range(&self) -> (usize, usize) {
        // `new` wrote a decimal length and a colon; nothing else builds one.
        let colon = self.joined.find(':').unwrap_or(0);
        let len: usize = self.joined[..colon].parse().unwrap_or(0);
        (colon + 1, colon + 1 + len)
    }

    /// The scope part.
    pub fn scope(&self) -> &str {
        let (start, end) = self.scope_range();
        &self.joined[start..end]
    }

    /// The client's key.
    pub fn key(&self) -> &str {
        &self.joined[self.scope_range().1..]
    }

    /// Scope and key joined into one string, unambiguously: no two
    /// `(scope, key)` pairs give the same string.
    pub fn as_str(&self) -> &str {
        &self.joined
    }
}

/// A string built on the stack up to its capacity, on the heap past it.
struct Joined {
    buf: [u8; 192],
    len: usize,
    spilled: Option<String>,
}

impl Default for Joined {
    fn default() -> Self {
        Joined {
            buf: [0; 192],
            len: 0,
            spilled: None,
        }
    }
}

impl Joined {
    fn as_str(&self) -> &str {
        // Only whole `str`s are copied in, so the bytes are UTF-8.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl fmt::Write for Joined {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if let Some(spilled) = &mut self.spilled {
            spilled.push_str(s);
        } else if let Some(room) = self.buf.get_mut(self.len..self.len + s.len()) {
            room.copy_from_slice(s.as_bytes());
            self.len += s.len();
        } else {
            let mut spilled = String::with_capacity(2 * (self.len + s.len()));
            spilled.push_str(self.as_str());
            spilled.push_str(s);
            self.spilled = Some(spilled);
        }
        Ok(())
    }
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordKey")
            .field("scope", &self.scope())
            .field("key_len", &self.key().len())
            .finish()
    }
}

/// A fencing token, issued with each successful claim.
///
/// Completing, renewing or releasing a record needs the token of the claim
/// that currently holds it, so a holder whose lease was taken over cannot
/// overwrite the newer claim's record.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Token(pub u64);

/// What [`Store::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// The caller now holds the key: no record existed, or the previous
    /// claim's lease or the previous record's retention had run out.
    Acquired {
        /// Fences every later call about this claim.
        token: Token,
        /// The key was in flight under an earlier claim whose lease had run
        /// out: its holder stopped renewing (died, stalled) and may have done
        /// part of the work. `false` for an absent key or an expired
        /// completed record.
        took_over: bool,
    },
    /// Another request holds the key and its lease is still running.
    InFlight {
        /// The fingerprint the holder claimed with.
        fingerprint: Fingerprint,
        /// Time left on the holder's lease, by the store's clock.
        lease_remaining: Duration,
    },
    /// The key's request completed and its record is retained.
    Completed {
        /// The fingerprint of the request that completed.
        fingerprint: Fingerprint,
        /// The record exactly as it was passed to [`Store::complete`].
        record: Bytes,
    },
}

/// Why a store operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The token no longer holds the key: its lease was taken over, or the
    /// record was released, completed or expired.
    Fenced,
    /// The store is full of records it may not evict (in-flight claims), or
    /// a record is larger than the store can hold.
    Full,
    /// The store holds something under this key that it cannot read.
    Corrupt(Box<dyn StdError + Send + Sync>),
    /// The store could not be reached or failed to answer.
    Unavailable(Box<dyn StdError + Send + Sync>),
}

impl StoreError {
    /// Wraps a backend error as [`StoreError::Unavailable`].
    pub fn unavailable(err: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        StoreError::Unavailable(err.into())
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Fenced => f.write_str("the claim was fenced out by a newer claim"),
            StoreError::Full => f.write_str("the store is full of in-flight records"),
            StoreError::Corrupt(e) => write!(f, "the stored record is unreadable: {e}"),
            StoreError::Unavailable(e) => write!(f, "the store is unavailable: {e}"),
        }
    }
}

impl StdError for StoreError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            StoreError::Corrupt(e) | StoreError::Unavailable(e) => Some(&**e),
            StoreError::Fenced | StoreError::Full => None,
        }
    }
}

/// A place to keep idempotency records, shared by every request of a layer
/// (and, for a remote store, by every server of a fleet).
///
/// # Contract
///
/// Each method is one atomic step. "Atomic" means no other call on the same
/// key can observe or act on a state between the method's read and its write;
/// read-then-write across two round trips is never acceptable.
///
/// A record is in one of three states: absent, *in flight*
/// (`fingerprint, lease_until, token`) or *completed*
/// (`fingerprint, record, expires_at`). An in-flight record whose lease has
/// passed, and a completed record whose retention has passed, count as absent.
///
/// The crate's conformance suite (feature `test-util`,
/// [`conformance`]) checks every rule below; run it
/// against your own store.
pub trait Store: Send + Sync + 'static {
    /// Claims `key` for a request with `fingerprint`.
    ///
    /// Atomically:
    /// - absent (or expired): write *in flight* with a new token and a lease of
    ///   `lease` from now; return [`Claim::Acquired`], with `took_over` set
    ///   when what expired was an in-flight claim. Of any number of
    ///   concurrent claims on an absent key, exactly one acquires it;
    /// - in flight with a lapsed lease, claimed with a different fingerprint:
    ///   return [`Claim::InFlight`] with the holder's fingerprint and no time
    ///   left, changing nothing. Only the same request takes a lapsed claim
    ///   over, so a different one never inherits its half-done work;
    /// - in flight: return [`Claim::InFlight`] with the holder's fingerprint
    ///   and the time left on its lease, changing nothing;
    /// - completed: return [`Claim::Completed`] with its fingerprint and the
    ///   record bytes, changing nothing.
    ///
    /// Apart from lapsed claims, the store does not compare fingerprints;
    /// the layer does.
    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Extends the lease of the claim holding `token` to `lease` from now.
    ///
    /// Fails with [`StoreError::Fenced`] unless `key` is in flight under
    /// `token` (an expired lease that nobody took over may still be renewed).
    fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Replaces the in-flight claim holding `token` with a completed record
    /// kept for `ttl` from now.
    ///
    /// `record` must come back from [`Store::claim`] byte for byte. Fails with
    /// [`StoreError::Fenced`] unless `key` is in flight under `token`, and
    /// with [`StoreError::Full`] if the record can never fit.
    fn complete(
        &self,
        key: &RecordKey,
        token: Token,
        record: Bytes,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes the in-flight claim holding `token`, so the next request with
    /// the key executes.
    ///
    /// Fails with [`StoreError::Fenced`] unless `key` is in flight under
    /// `token`; a completed record is never removed by `release`.
    fn release(
        &self,
        key: &RecordKey,
        token: Token,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads what holds `key`, changing nothing.
    ///
    /// The layer calls it only after a completion or renewal was refused
    /// with [`StoreError::Fenced`], to say truthfully why: the record
    /// landed after all (an earlier attempt's answer was lost), another
    /// claim took the key over, or the claim is gone (it expired, or the
    /// store lost it in a restart or failover). A lapsed claim nobody took
    /// over still holds its key. The default answers
    /// [`Peeked::Unknown`], and the layer then says only that the claim is
    /// no longer held.
    fn peek(&self, key: &RecordKey) -> impl Future<Output = Result<Peeked, StoreError>> + Send {
        let _ = key;
        std::future::ready(Ok(Peeked::Unknown))
    }

    /// A short name for metrics and logs (`memory`, `redis`, `postgres`);
    /// `custom` unless a store says otherwise.
    fn name(&self) -> &'static str {
        "custom"
    }
}

/// What [`Store::peek`] found under a key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Peeked {
    /// Nothing holds the key: no record, or only an expired one.
    Absent,
    /// A claim holds the key (its lease may have lapsed).
    InFlight {
        /// The claim's fencing token.
        token: Token,
    },
    /// A completed record, within its retention.
    Completed {
        /// The record exactly as it was passed to [`Store::complete`].
        record: Bytes,
    },
    /// The store cannot tell.
    Unknown,
}

impl<S: Store + ?Sized> Store for Arc<S> {
    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        (**self).claim(key, fingerprint, lease)
    }

    fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).renew(key, token, lease)
    }

    fn complete(
        &self,
        key: &RecordKey,
        token: Token,
        record: Bytes,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).complete(key, token, record, ttl)
    }

    fn release(
        &self,
        key: &RecordKey,
        token: Token,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).release(key, token)
    }

    fn peek(&self, key: &RecordKey) -> impl Future<Output = Result<Peeked, StoreError>> + Send {
        (**self).peek(key)
    }

    fn name(&self) -> &'static str {
        (**self).name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_do_not_collide_across_scope_and_key() {
        let a = RecordKey::new("ab", "c");
        let b = RecordKey::new("a", "bc");
        assert_ne!(a, b);
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!((a.scope(), a.key()), ("ab", "c"));
        assert_eq!((b.scope(), b.key()), ("a", "bc"));
        let colon = RecordKey::new("1:x", ":k");
        assert_eq!((colon.scope(), colon.key()), ("1:x", ":k"));
        let empty = RecordKey::new("", "k");
        assert_eq!((empty.scope(), empty.key()), ("", "k"));
    }

    /// Joined on the stack or, past its room, on the heap: the same key
    /// either way, at every length around the edge and with multi-byte
    /// characters across it.
    #[test]
    fn long_record_keys_join_like_short_ones() {
        for scope_len in [0, 1, 100, 185, 186, 187, 190, 300] {
            for key_len in [1, 2, 5, 255] {
                let scope = "s".repeat(scope_len);
                let key = "\u{e9}".repeat(key_len);
                let joined = RecordKey::new(&scope, &key);
                assert_eq!(joined.as_str(), format!("{scope_len}:{scope}{key}"));
                assert_eq!(
                    (joined.scope(), joined.key()),
                    (scope.as_str(), key.as_str())
                );
            }
        }
    }
}
