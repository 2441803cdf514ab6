//! [`MemoryStore`]: a bounded in-process store on `dashmap`.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    future::{Future, ready},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use dashmap::{DashMap, mapref::entry::Entry};
use tokio::time::Instant;

use super::{Claim, Peeked, RecordKey, Store, StoreError, Token};
use crate::Fingerprint;

/// Where a store reads the time that decides leases and expiry.
pub trait Clock: fmt::Debug + Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The default clock: [`tokio::time::Instant::now`], so tests can use
/// `tokio::time::pause()` and `advance()`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to, shared by its clones. For tests that
/// need a multi-threaded runtime, where `tokio::time::pause` is unavailable.
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
#[derive(Debug, Clone)]
pub struct ManualClock {
    base: Instant,
    offset_nanos: Arc<AtomicU64>,
}

#[cfg(feature = "test-util")]
impl ManualClock {
    /// A clock standing at the current instant.
    pub fn new() -> Self {
        ManualClock {
            base: Instant::now(),
            offset_nanos: Arc::default(),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.offset_nanos.fetch_add(nanos, Ordering::SeqCst);
    }
}

#[cfg(feature = "test-util")]
impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "test-util")]
impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + Duration::from_nanos(self.offset_nanos.load(Ordering::SeqCst))
    }
}

/// A bounded, in-process [`Store`] for a single server.
///
/// - Bounded by entries and by bytes (keys plus records). When a new claim or
///   a completed record needs room, it evicts a completed record past its
///   TTL if there is one. Otherwise it takes from the *heaviest scope*: the
///   one holding the largest share of the store (the larger of its share of
///   the entries and its share of the bytes, in flight and completed), and
///   within it the completed record closest to expiry (with one TTL, its
///   oldest). A scope makes room from its own records when it is the
///   heaviest, and never by evicting a lighter or equally heavy scope's: a
///   requester with nothing of its own to evict that weighs at least as
///   much as every scope with something to evict is refused with
///   [`StoreError::Full`] (a claim is then answered 503; a completion is
///   kept as status and headers only, "not retained"). So a caller flooding
///   the store with keyed requests evicts its own records, and another
///   scope loses a record before its TTL only while it holds more than the
///   flood does; a newcomer to a full store takes its room from the
///   heaviest scope. [`evicted_live`](MemoryStore::evicted_live) counts the
///   records evicted before their TTL. The bookkeeping (per-scope counts
///   and queues) is not counted against `max_bytes`.
/// - Claims count in a scope's weight like completed records do: when the
///   heaviest scope holds only claims, which are never evicted, no lighter
///   scope pays for it, and a newcomer is refused with [`StoreError::Full`]
///   until room frees up. One scope holds at most
///   [`max_in_flight_per_scope`](MemoryStoreBuilder::max_in_flight_per_scope)
///   claims (half the store by default); past that its claims are refused,
///   so a flood of requests held open (a slow handler, a client that left)
///   cannot take the room of others; and once the claims of all scopes
///   together hold half the store, a new claim evicts no completed record
///   before its TTL (it is refused if no room is free), so a flood of claims
///   spread over many scopes takes at most half the records.
/// - It never evicts a live in-flight record; full of them, [`Store::claim`]
///   fails with [`StoreError::Full`] and the layer answers 503. An in-flight
///   record whose lease has passed (its holder stopped renewing) is only
///   *lapsed*: its holder may still renew and complete it until another
///   claim takes it over, so it is removed (by the sweeper, or by eviction
///   once no completed record is left, in a scan of the map run at most once
///   a second) only after
///   [lapsed retention](MemoryStoreBuilder::lapsed_retention) has also
///   passed.
/// - Every method is a single `dashmap` entry operation under the key's
///   shard lock, so claims are atomic without any read-then-write.
/// - Cloning is cheap and clones share the records.
/// - Expired records are removed when their key is claimed again, when room
///   is needed, by [`MemoryStore::remove_expired`], or periodically by
///   [`MemoryStore::spawn_sweeper`].
///
/// ```
/// use tower_idempotency::MemoryStore;
///
/// let store = MemoryStore::builder()
///     .max_entries(50_000)
///     .max_bytes(64 * 1024 * 1024)
///     .build();
/// assert_eq!(store.len(), 0);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Hashed with foldhash, seeded per process: several times SipHash's
    /// speed on these short keys, and no fixed seed to aim collisions at.
    map: DashMap<RecordKey, Record, Hasher>,
    /// Every completed record by expiry, for eviction: an entry is added
    /// under the record's map guard as it completes and removed as the
    /// record leaves, so the index holds exactly the completed records and
    /// never needs pruning (a prune is a stall of every request). Taken
    /// while holding a map guard, and never held while waiting for one.
    expiry: Mutex<BTreeSet<(Nanos, RecordKey)>>,
    /// What each scope holds, for eviction that takes from the heaviest
    /// scope. Taken while holding a map guard, never held while waiting for
    /// one, and never together with `expiry`.
    scopes: Mutex<Scopes>,
    /// Records evicted before their TTL.
    evicted_live: AtomicU64,
    /// Instants are kept as nanoseconds since this one: half the size.
    epoch: Instant,
    /// When eviction last scanned the whole map for expired in-flight
    /// records; such scans are rate-limited.
    last_scan: AtomicU64,
    entries: AtomicUsize,
    bytes: AtomicUsize,
    next: AtomicU64,
    token_salt: u64,
    max_entries: usize,
    max_bytes: usize,
    /// The most claims one scope holds at once.
    max_in_flight: usize,
    /// How long a lapsed claim is kept after its lease, in nanoseconds.
    lapsed_retention: Nanos,
    clock: Arc<dyn Clock>,
}

/// Nanoseconds since the store's epoch.
type Nanos = u64;

/// The maps' hasher.
type Hasher = foldhash::fast::RandomState;

enum Record {
    InFlight {
        fingerprint: Fingerprint,
        lease_until: Nanos,
        token: Token,
    },
    Completed {
        fingerprint: Fingerprint,
        record: Bytes,
        expires_at: Nanos,
    },
}

impl Record {
    /// Past its lease (a lapsed claim) or past its retention (a completed
    /// record).
    fn is_expired(&self, now: Nanos) -> bool {
        match self {
            Record::InFlight { lease_until, .. } => *lease_until <= now,
            Record::Completed { expires_at, .. } => *expires_at <= now,
        }
    }

    /// Gone for good: a completed record past its retention, or a claim past
    /// its lease and the lapsed retention after it.
    fn is_removable(&self, now: Nanos, lapsed_retention: Nanos) -> bool {
        match self {
            Record::InFlight { lease_until, .. } => {
                lease_until.saturating_add(lapsed_retention) <= now
            }
            Record::Completed { expires_at, .. } => *expires_at <= now,
        }
    }

    fn record_len(&self) -> usize {
        match self {
            Record::InFlight { .. } => 0,
            Record::Completed { record, .. } => record.len(),
        }
    }
}

/// What one scope holds.
#[derive(Default)]
struct ScopeUse {
    /// Records, in flight and completed.
    entries: usize,
    /// Bytes of keys and recorded responses.
    bytes: usize,
    /// Completed records: the ones eviction may take.
    completed: usize,
    /// This scope's completed records by expiry, exactly, as
    /// `Inner::expiry`.
    queue: BTreeSet<(Nanos, RecordKey)>,
}

/// A change to what a scope holds.
#[derive(Clone, Copy, Default)]
struct Delta {
    entries: isize,
    bytes: isize,
    completed: isize,
}

/// What every scope holds, and the scopes that have something to evict
/// ordered by weight: a scope's dominant share of the store, the larger of
/// its share of `max_entries` and its share of `max_bytes`.
struct Scopes {
    by_name: HashMap<Arc<str>, ScopeUse, Hasher>,
    /// `(weight, scope)` of every scope holding a record.
    by_weight: BTreeSet<(u128, Arc<str>)>,
    /// `(weight, scope)` of every scope holding a completed record.
    evictable: BTreeSet<(u128, Arc<str>)>,
    /// Records and completed records of every scope together.
    total_entries: usize,
    total_completed: usize,
    max_entries: u128,
    max_bytes: u128,
}

impl Scopes {
    fn new(max_entries: usize, max_bytes: usize) -> Self {
        Scopes {
            by_name: HashMap::default(),
            by_weight: BTreeSet::new(),
            evictable: BTreeSet::new(),
            total_entries: 0,
            total_completed: 0,
            max_entries: max_entries as u128,
            max_bytes: max_bytes as u128,
        }
    }

    /// Shares compared without division: entries / max_entries against
    /// bytes / max_bytes, both scaled by max_entries * max_bytes.
    fn weight(&self, used: &ScopeUse) -> u128 {
        (used.entries as u128 * self.max_bytes).max(used.bytes as u128 * self.max_entries)
    }

    /// Applies `delta` to `scope`, queueing `completed` (a record it just
    /// completed) for eviction and unqueueing `gone` (a completed record
    /// that left).
    fn update(
        &mut self,
        scope: &str,
        delta: Delta,
        completed: Option<(Nanos, RecordKey)>,
        gone: Option<(Nanos, RecordKey)>,
    ) {
        let (name, mut used) = match self.by_name.remove_entry(scope) {
            Some((name, used)) => {
                let weighed = (self.weight(&used), name);
                if used.completed > 0 {
                    self.evictable.remove(&weighed);
                }
                self.by_weight.remove(&weighed);
                (weighed.1, used)
            }
            None => (Arc::from(scope), ScopeUse::default()),
        };
        let apply = |count: usize, by: isize| {
            let changed = count.checked_add_signed(by);
            debug_assert!(changed.is_some(), "scope accounting went below zero");
            changed.unwrap_or(0)
        };
        used.entries = apply(used.entries, delta.entries);
        used.bytes = apply(used.bytes, delta.bytes);
        used.completed = apply(used.completed, delta.completed);
        self.total_entries = apply(self.total_entries, delta.entries);
        self.total_completed = apply(self.total_completed, delta.completed);
        if let Some(entry) = gone {
            used.queue.remove(&entry);
        }
        if let Some(entry) = completed {
            used.queue.insert(entry);
        }
        if used.entries == 0 {
            debug_assert!(used.bytes == 0 && used.completed == 0 && used.queue.is_empty());
            return;
        }
        let weight = self.weight(&used);
        if used.completed > 0 {
            self.evictable.insert((weight, name.clone()));
        }
        self.by_weight.insert((weight, name.clone()));
        self.by_name.insert(name, used);
    }

    /// Live and lapsed claims `scope` holds.
    fn in_flight(&self, scope: &str) -> usize {
        self.by_name
            .get(scope)
            .map_or(0, |used| used.entries - used.completed)
    }

    /// The record to evict to make room for a record of `requester`: the
    /// one closest to expiry of the heaviest scope, counting every record
    /// it holds, in flight and completed, or of `requester` itself when it
    /// weighs as much. None when the heaviest scope holds nothing to evict
    /// (only claims), or is not heavier than a `requester` with nothing to
    /// give: no scope makes room for another by evicting a scope lighter
    /// than the heaviest, or lighter than or equal to the requester.
    ///
    /// For a claim (`for_claim`), none either once claims of every scope
    /// together hold half the store: claims are never evicted, so a flood
    /// of them from many scopes, each lighter than its victims, could
    /// otherwise take every record in turn.
    fn victim(&mut self, requester: &str, for_claim: bool) -> Option<(Nanos, RecordKey)> {
        let claims = self.total_entries - self.total_completed;
        if for_claim && claims as u128 * 2 >= self.max_entries {
            return None;
        }
        let (heaviest_weight, heaviest) = self
            .evictable
            .last()
            .map(|(weight, name)| (*weight, name.clone()))?;
        let overall = self.by_weight.last().map_or(0, |(weight, _)| *weight);
        if heaviest_weight < overall {
            // The heaviest scope holds only claims: it cannot give, and
            // nobody lighter pays for it.
            return None;
        }
        let own = self.by_name.get(requester).map(|used| {
            let evictable = used.completed > 0 && !used.queue.is_empty();
            (self.weight(used), evictable)
        });
        let chosen: &str = match own {
            Some((weight, true)) if weight >= heaviest_weight => requester,
            Some((weight, _)) if weight >= heaviest_weight => return None,
            _ => &heaviest,
        };
        self.by_name.get_mut(chosen)?.queue.pop_first()
    }
}

/// Configures a [`MemoryStore`].
#[derive(Debug)]
#[must_use]
pub struct MemoryStoreBuilder {
    max_entries: usize,
    max_bytes: usize,
    max_in_flight: Option<usize>,
    lapsed_retention: Duration,
    clock: Arc<dyn Clock>,
}

impl MemoryStoreBuilder {
    /// The most records held at once, in flight and completed (default
    /// 100 000).
    pub fn max_entries(mut self, max: usize) -> Self {
        self.max_entries = max.max(1);
        self
    }

    /// The most bytes of keys and recorded responses held at once (default
    /// 256 MiB). A single record larger than this is refused with
    /// [`StoreError::Full`]; the layer then keeps it as "not retained".
    pub fn max_bytes(mut self, max: usize) -> Self {
        self.max_bytes = max;
        self
    }

    /// The most claims (requests in flight, and lapsed claims) one scope
    /// holds at once (default: half of [`max_entries`](Self::max_entries)).
    /// A scope's claim past it fails with [`StoreError::Full`] (the layer
    /// answers 503), so no caller can fill the store with claims, which are
    /// never evicted, and leave others no room. Concurrent claims may pass
    /// it by their number, briefly.
    pub fn max_in_flight_per_scope(mut self, max: usize) -> Self {
        self.max_in_flight = Some(max.max(1));
        self
    }

    /// How long after its lease ends a claim nobody took over is kept
    /// (default 24 hours). Until then its holder, stalled for a while, can
    /// still renew it and record its response, and only the same request may
    /// take it over; after it, the key is free for any request. Lapsed
    /// claims count against `max_entries` and are never evicted before this.
    pub fn lapsed_retention(mut self, retention: Duration) -> Self {
        self.lapsed_retention = retention;
        self
    }

    /// The clock deciding leases and expiry (default [`TokioClock`]).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Inner {
                map: DashMap::default(),
                expiry: Mutex::default(),
                scopes: Mutex::new(Scopes::new(self.max_entries, self.max_bytes)),
                evicted_live: AtomicU64::new(0),
                epoch: self.clock.now(),
                last_scan: AtomicU64::new(0),
                entries: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                next: AtomicU64::new(1),
                token_salt: crate::random_u64(),
                max_entries: self.max_entries,
                max_bytes: self.max_bytes,
                max_in_flight: self.max_in_flight.unwrap_or((self.max_entries / 2).max(1)),
                lapsed_retention: nanos(self.lapsed_retention),
                clock: self.clock,
            }),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("len", &self.len())
            .field("bytes", &self.bytes())
            .field("max_entries", &self.inner.max_entries)
            .field("max_bytes", &self.inner.max_bytes)
            .finish()
    }
}

impl MemoryStore {
    /// A store with the default bounds.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts configuring a store.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_entries: 100_000,
            max_bytes: 256 * 1024 * 1024,
            max_in_flight: None,
            lapsed_retention: Duration::from_secs(24 * 60 * 60),
            clock: Arc::new(TokioClock),
        }
    }

    /// Records held, in flight and completed, expired ones not yet removed
    /// included.
    pub fn len(&self) -> usize {
        self.inner.entries.load(Ordering::Acquire)
    }

    /// Whether the store holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many records were evicted before their TTL ran out, to make room
    /// (records past their TTL that eviction removed are not counted). A
    /// steady rise means the store is too small for its traffic: retries of
    /// those requests execute again.
    pub fn evicted_live(&self) -> u64 {
        self.inner.evicted_live.load(Ordering::Relaxed)
    }

    /// Bytes of keys and recorded responses held.
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Acquire)
    }

    /// Removes every expired record (completed past its TTL, or in flight
    /// past its lease and the lapsed retention after it) and returns how
    /// many it removed.
    pub fn remove_expired(&self) -> usize {
        self.inner.remove_expired()
    }

    /// Spawns a task on the current tokio runtime that calls
    /// [`remove_expired`](Self::remove_expired) every `every`. The task ends
    /// by itself once every clone of the store is dropped.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, like [`tokio::spawn`].
    pub fn spawn_sweeper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let every = every.max(Duration::from_millis(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(inner) => {
                        inner.remove_expired();
                    }
                    None => return,
                }
            }
        })
    }
}

fn nanos(d: Duration) -> Nanos {
    Nanos::try_from(d.as_nanos()).unwrap_or(Nanos::MAX)
}

impl Inner {
    fn now(&self) -> Nanos {
        nanos(self.clock.now().saturating_duration_since(self.epoch))
    }

    fn new_token(&self) -> Token {
        // Unique within the store (a counter) and unlikely to match a token
        // from another store or process (salted).
        Token(self.next.fetch_add(1, Ordering::Relaxed) ^ self.token_salt)
    }

    /// Refuses a new claim of a scope that holds its share of claims. Free
    /// while the whole store holds fewer records than that share.
    fn admit_claim(&self, scope: &str) -> Result<(), StoreError> {
        if self.entries.load(Ordering::Acquire) < self.max_in_flight {
            return Ok(());
        }
        let scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        if scopes.in_flight(scope) >= self.max_in_flight {
            return Err(StoreError::Full);
        }
        Ok(())
    }

    /// Takes one entry slot for a record of `scope`, evicting to make room.
    fn reserve_entry(&self, now: Nanos, scope: &str) -> Result<(), StoreError> {
        loop {
            let held = self.entries.load(Ordering::Acquire);
            if held < self.max_entries {
                if self
                    .entries
                    .compare_exchange(held, held + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return Ok(());
                }
                continue;
            }
            if !self.evict_one(now, scope, true) {
                return Err(StoreError::Full);
            }
        }
    }

    fn forget(&self, key: &RecordKey, record: &Record) {
        let bytes = key.as_str().len() + record.record_len();
        self.entries.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        let gone = match record {
            Record::Completed { expires_at, .. } => Some(*expires_at),
            Record::InFlight { .. } => None,
        };
        self.account(
            key,
            Delta {
                entries: -1,
                bytes: -(bytes as isize),
                completed: -isize::from(gone.is_some()),
            },
            None,
            gone,
        );
    }

    /// Changes what `key`'s scope holds, and the eviction indexes with it:
    /// `completed` is the expiry of the record it just completed, `gone`
    /// that of a completed record that left. Every increase is made under
    /// the key's map guard, before the record can be removed, so that no
    /// decrease is counted before it.
    fn account(
        &self,
        key: &RecordKey,
        delta: Delta,
        completed: Option<Nanos>,
        gone: Option<Nanos>,
    ) {
        {
            let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
            scopes.update(
                key.scope(),
                delta,
                completed.map(|expiry| (expiry, key.clone())),
                gone.map(|expiry| (expiry, key.clone())),
            );
        }
        if completed.is_some() || gone.is_some() {
            let mut index = self.expiry.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(expiry) = gone {
                index.remove(&(expiry, key.clone()));
            }
            if let Some(expiry) = completed {
                index.insert((expiry, key.clone()));
            }
        }
    }

    /// Makes room for a record of `requester`'s scope: evicts a completed
    /// record past its TTL if there is one, else the completed record
    /// closest to expiry of the heaviest scope, never of a scope lighter
    /// than `requester`'s (see [`Scopes::victim`]). With none left, falls
    /// back to removing in-flight records whose lapsed retention has passed,
    /// scanning the map at most once a second so that a store full of live
    /// claims answers `Full` cheaply. Must not be called while holding a map
    /// guard.
    fn evict_one(&self, now: Nanos, requester: &str, for_claim: bool) -> bool {
        loop {
            let expired = {
                let mut index = self.expiry.lock().unwrap_or_else(|e| e.into_inner());
                match index.first() {
                    Some((expiry, _)) if *expiry <= now => index.pop_first(),
                    _ => None,
                }
            };
            if let Some((expiry, key)) = expired {
                if self.evict(&key, expiry, now) {
                    return true;
                }
                continue;
            }
            let victim = self
                .scopes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .victim(requester, for_claim);
            if let Some((expiry, key)) = victim {
                if self.evict(&key, expiry, now) {
                    return true;
                }
                continue;
            }
            let last = self.last_scan.load(Ordering::Acquire);
            let due = last == 0 || now.saturating_sub(last) >= 1_000_000_000;
            if !due
                || self
                    .last_scan
                    .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
            {
                return false;
            }
            return self.remove_expired_in(now) > 0;
        }
    }

    /// Removes `key` if it is still the completed record queued with
    /// `expiry`.
    fn evict(&self, key: &RecordKey, expiry: Nanos, now: Nanos) -> bool {
        let removed = self.map.remove_if(key, |_, record| {
            matches!(record, Record::Completed { expires_at, .. } if *expires_at == expiry)
        });
        let Some((key, record)) = removed else {
            return false;
        };
        self.forget(&key, &record);
        if expiry > now {
            self.evicted_live.fetch_add(1, Ordering::Relaxed);
            crate::metrics::evicted_live("memory");
        }
        true
    }

    fn remove_expired(&self) -> usize {
        self.remove_expired_in(self.now())
    }

    fn remove_expired_in(&self, now: Nanos) -> usize {
        let mut removed = 0;
        self.map.retain(|key, record| {
            if record.is_removable(now, self.lapsed_retention) {
                self.forget(key, record);
                removed += 1;
                false
            } else {
                true
            }
        });
        removed
    }

    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let now = self.now();
        // Fast path for replays and in-flight duplicates: a shared read lock.
        // Reading a live record is enough to answer; only a miss or an
        // expired record goes on to the write path below.
        let absent = match self.map.get(key) {
            Some(record) => match observe(&record, now, self.lapsed_retention, fingerprint) {
                Some(found) => return Ok(found),
                None => false,
            },
            None => true,
        };
        // A new key needs a slot: make room before taking the shard lock,
        // since eviction locks other keys' shards. An expired record is taken
        // over in place and needs none.
        if absent {
            self.admit_claim(key.scope())?;
            self.reserve_entry(now, key.scope())?;
        }
        let mut reserved = absent;
        loop {
            match self.map.entry(key.clone()) {
                Entry::Occupied(mut entry) => {
                    if let Some(found) =
                        observe(entry.get(), now, self.lapsed_retention, fingerprint)
                    {
                        drop(entry);
                        if reserved {
                            self.entries.fetch_sub(1, Ordering::AcqRel);
                        }
                        return Ok(found);
                    }
                    // Expired: take it over in place. A claim past its lapsed
                    // retention is gone, so claiming it takes nothing over.
                    if matches!(entry.get(), Record::Completed { .. })
                        && let Err(full) = self.admit_claim(key.scope())
                    {
                        drop(entry);
                        if reserved {
                            self.entries.fetch_sub(1, Ordering::AcqRel);
                        }
                        return Err(full);
                    }
                    let took_over = matches!(entry.get(), Record::InFlight { .. })
                        && !entry.get().is_removable(now, self.lapsed_retention);
                    let token = self.new_token();
                    let old = entry.insert(Record::InFlight {
                        fingerprint,
                        lease_until: now.saturating_add(nanos(lease)),
                        token,
                    });
                    // Counters change under the shard lock, so that no
                    // concurrent removal of this record subtracts first.
                    self.bytes.fetch_sub(old.record_len(), Ordering::AcqRel);
                    if let Record::Completed {
                        record, expires_at, ..
                    } = &old
                    {
                        let delta = Delta {
                            bytes: -(record.len() as isize),
                            completed: -1,
                            ..Delta::default()
                        };
                        self.account(key, delta, None, Some(*expires_at));
                    }
                    drop(entry);
                    if reserved {
                        self.entries.fetch_sub(1, Ordering::AcqRel);
                    }
                    return Ok(Claim::Acquired { token, took_over });
                }
                Entry::Vacant(entry) if reserved => {
                    let token = self.new_token();
                    let _guard = entry.insert(Record::InFlight {
                        fingerprint,
                        lease_until: now.saturating_add(nanos(lease)),
                        token,
                    });
                    self.bytes.fetch_add(key.as_str().len(), Ordering::AcqRel);
                    let delta = Delta {
                        entries: 1,
                        bytes: key.as_str().len() as isize,
                        completed: 0,
                    };
                    self.account(key, delta, None, None);
                    return Ok(Claim::Acquired {
                        token,
                        took_over: false,
                    });
                }
                Entry::Vacant(entry) => {
                    // Room must be made without holding the shard lock, since
                    // eviction locks other keys' shards; then look again.
                    drop(entry);
                    self.admit_claim(key.scope())?;
                    self.reserve_entry(now, key.scope())?;
                    reserved = true;
                }
            }
        }
    }

    fn renew(&self, key: &RecordKey, token: Token, lease: Duration) -> Result<(), StoreError> {
        let now = self.now();
        match self.map.get_mut(key).as_deref_mut() {
            Some(Record::InFlight {
                lease_until,
                token: held,
                ..
            }) if *held == token => {
                *lease_until = now.saturating_add(nanos(lease));
                Ok(())
            }
            _ => Err(StoreError::Fenced),
        }
    }

    fn complete(
        &self,
        key: &RecordKey,
        token: Token,
        record: Bytes,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let size = record.len();
        if key.as_str().len() + size > self.max_bytes {
            return Err(StoreError::Full);
        }
        let now = self.now();
        // Make room first, while this key is still in flight and so cannot
        // be the record evicted. Concurrent completions may overshoot the
        // bound by their own sizes, briefly.
        while self.bytes.load(Ordering::Acquire) + size > self.max_bytes {
            if !self.evict_one(now, key.scope(), false) {
                return Err(StoreError::Full);
            }
        }
        let expires_at = now.saturating_add(nanos(ttl));
        let mut guard = self.map.get_mut(key).ok_or(StoreError::Fenced)?;
        let fingerprint = match &*guard {
            Record::InFlight {
                fingerprint,
                token: held,
                ..
            } if *held == token => *fingerprint,
            _ => return Err(StoreError::Fenced),
        };
        *guard = Record::Completed {
            fingerprint,
            record,
            expires_at,
        };
        self.bytes.fetch_add(size, Ordering::AcqRel);
        let delta = Delta {
            bytes: size as isize,
            completed: 1,
            ..Delta::default()
        };
        // Indexed under the guard: no removal of the record can come first.
        self.account(key, delta, Some(expires_at), None);
        drop(guard);
        Ok(())
    }

    fn peek(&self, key: &RecordKey) -> Peeked {
        let now = self.now();
        match self.map.get(key).as_deref() {
            Some(record) if record.is_removable(now, self.lapsed_retention) => Peeked::Absent,
            Some(Record::InFlight { token, .. }) => Peeked::InFlight { token: *token },
            Some(Record::Completed {
                record, expires_at, ..
            }) if *expires_at > now => Peeked::Completed {
                record: record.clone(),
            },
            _ => Peeked::Absent,
        }
    }

    fn release(&self, key: &RecordKey, token: Token) -> Result<(), StoreError> {
        let removed = self.map.remove_if(
            key,
            |_, record| matches!(record, Record::InFlight { token: held, .. } if *held == token),
        );
        match removed {
            Some((key, record)) => {
                self.forget(&key, &record);
                Ok(())
            }
            None => Err(StoreError::Fenced),
        }
    }
}

/// What a claim with `fingerprint` finds in `record`, or `None` when it may
/// take the record over.
fn observe(
    record: &Record,
    now: Nanos,
    lapsed_retention: Nanos,
    fingerprint: Fingerprint,
) -> Option<Claim> {
    if record.is_expired(now) {
        // A lapsed claim is taken over only by the same request: another
        // one learns the key is taken (and is told `key-reused`), until the
        // lapsed retention is over too.
        return match record {
            Record::InFlight {
                fingerprint: held, ..
            } if *held != fingerprint && !record.is_removable(now, lapsed_retention) => {
                Some(Claim::InFlight {
                    fingerprint: *held,
                    lease_remaining: Duration::ZERO,
                })
            }
            _ => None,
        };
    }
    Some(match record {
        Record::InFlight {
            fingerprint,
            lease_until,
            ..
        } => Claim::InFlight {
            fingerprint: *fingerprint,
            lease_remaining: Duration::from_nanos(lease_until - now),
        },
        Record::Completed {
            fingerprint,
            record,
            ..
        } => Claim::Completed {
            fingerprint: *fingerprint,
            record: record.clone(),
        },
    })
}

impl Store for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        ready(self.inner.claim(key, fingerprint, lease))
    }

    fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        ready(self.inner.renew(key, token, lease))
    }

    fn complete(
        &self,
        key: &RecordKey,
        token: Token,
        record: Bytes,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        ready(self.inner.complete(key, token, record, ttl))
    }

    fn release(
        &self,
        key: &RecordKey,
        token: Token,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        ready(self.inner.release(key, token))
    }

    fn peek(&self, key: &RecordKey) -> impl Future<Output = Result<Peeked, StoreError>> + Send {
        ready(Ok(self.inner.peek(key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Racing claims, completions, releases and evictions across scopes
    /// leave every scope's counts equal to what the map holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scope_accounting_matches_the_map_after_a_race() {
        let store = MemoryStore::builder()
            .max_entries(64)
            .max_bytes(64 * 300)
            .build();
        let tasks: Vec<_> = (0..8u64)
            .map(|task| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0..400u64 {
                        let scope = format!("s{}", (task + i) % 4);
                        let key = RecordKey::new(&scope, &format!("k{}", i % 97));
                        let fp = Fingerprint::from_bytes([(i % 3) as u8; 32]);
                        let claim = store.claim(&key, fp, Duration::from_secs(5)).await;
                        if let Ok(Claim::Acquired { token, .. }) = claim {
                            tokio::task::yield_now().await;
                            if i % 5 == 0 {
                                let _ = store.release(&key, token).await;
                            } else {
                                let size = 50 + (i as usize * 37) % 400;
                                let record = Bytes::from(vec![0u8; size]);
                                let ttl = Duration::from_secs(60);
                                let _ = store.complete(&key, token, record, ttl).await;
                            }
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let mut held: HashMap<String, (usize, usize, usize)> = HashMap::new();
        for entry in store.inner.map.iter() {
            let used = held.entry(entry.key().scope().to_owned()).or_default();
            used.0 += 1;
            used.1 += entry.key().as_str().len() + entry.value().record_len();
            used.2 += usize::from(matches!(entry.value(), Record::Completed { .. }));
        }
        let scopes = store.inner.scopes.lock().unwrap();
        let counted: HashMap<String, (usize, usize, usize)> = scopes
            .by_name
            .iter()
            .map(|(name, used)| (name.to_string(), (used.entries, used.bytes, used.completed)))
            .collect();
        assert_eq!(counted, held);
        assert_eq!(
            scopes.evictable.len(),
            held.values().filter(|u| u.2 > 0).count()
        );
        assert_eq!(scopes.by_weight.len(), held.len());
        assert_eq!(store.len(), held.values().map(|u| u.0).sum::<usize>());
        assert_eq!(store.bytes(), held.values().map(|u| u.1).sum::<usize>());
        assert!(store.evicted_live() > 0, "the race made the store evict");
    }

    /// A scope whose records keep expiring and being claimed again keeps
    /// exactly its completed records in its eviction queue and in the
    /// store's: nothing stale to prune.
    #[tokio::test(start_paused = true)]
    async fn eviction_queues_hold_exactly_the_completed_records() {
        let store = MemoryStore::default();
        let fp = Fingerprint::from_bytes([1; 32]);
        for i in 0..5000 {
            let key = RecordKey::new("busy", &format!("k{}", i % 10));
            let Ok(Claim::Acquired { token, .. }) =
                store.claim(&key, fp, Duration::from_secs(5)).await
            else {
                panic!("an expired record is claimed afresh");
            };
            let record = Bytes::from_static(b"r");
            store
                .complete(&key, token, record, Duration::from_millis(1))
                .await
                .unwrap();
            tokio::time::advance(Duration::from_millis(2)).await;
        }
        let scopes = store.inner.scopes.lock().unwrap();
        let used = &scopes.by_name["busy"];
        assert_eq!(used.completed, 10);
        assert_eq!(used.queue.len(), 10);
        assert_eq!(store.inner.expiry.lock().unwrap().len(), 10);
    }
}
