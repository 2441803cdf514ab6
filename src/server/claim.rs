//! A claim the layer holds: renewing its lease, completing or releasing it,
//! and never leaving it behind.

use std::{
    fmt,
    future::{Future, poll_fn},
    pin::{Pin, pin},
    sync::Arc,
    task::{Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use tokio::time::{Instant, Sleep};

use crate::{
    background::Background,
    layer::Config,
    record::RecordBuilder,
    scope::push_hex,
    store::{Peeked, RecordKey, Store, StoreError, Token},
    trail::Trail,
};

/// How the work a completion records ended, for its audit entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Finish {
    /// Stopped or cut short by the layer, past the maximum execution time
    /// or a drain's deadline.
    pub(crate) settled: bool,
    /// The response's status.
    pub(crate) status: u16,
    /// SHA-256 of the whole response body, when audited and it ended.
    pub(crate) response: Option<[u8; 32]>,
}

impl Finish {
    fn decision(&self) -> &'static str {
        if self.settled { "settled" } else { "executed" }
    }
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Runs a store operation, failing it as unavailable after `limit`.
///
/// A store that answers on the first poll (the memory store always does)
/// never touches the timer.
pub(crate) async fn bounded<T>(
    op: impl Future<Output = Result<T, StoreError>>,
    limit: Duration,
    (operation, store): (&'static str, &'static str),
) -> Result<T, StoreError> {
    #[cfg(feature = "metrics")]
    let started = std::time::Instant::now();
    let mut op = pin!(op);
    // Boxed, and only once the store makes us wait: a timer is large, and
    // this future is part of every protected request's state.
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    let mut timed_out = false;
    let result = poll_fn(|cx| {
        if let Poll::Ready(out) = op.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        timed_out = true;
        Poll::Ready(Err(StoreError::unavailable(TimedOut(limit))))
    })
    .await;
    #[cfg(feature = "metrics")]
    {
        let error = match &result {
            Ok(_) => None,
            Err(_) if timed_out => Some("timeout"),
            Err(StoreError::Fenced) => Some("fenced"),
            Err(StoreError::Full) => Some("full"),
            Err(StoreError::Corrupt(_)) => Some("corrupt"),
            Err(_) => Some("unavailable"),
        };
        crate::metrics::store_operation(operation, store, started.elapsed(), error);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (operation, store, timed_out);
    result
}

/// A store operation took longer than the layer's store timeout.
#[derive(Debug)]
struct TimedOut(Duration);

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no answer within {:?}", self.0)
    }
}

impl std::error::Error for TimedOut {}

/// Formats a record key as a short hash, for logs: never the raw key.
pub(crate) struct KeyHash<'a>(pub(crate) &'a RecordKey);

impl fmt::Display for KeyHash<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.0.as_str().as_bytes());
        let mut hex = String::with_capacity(16);
        push_hex(&mut hex, &digest[..8]);
        f.write_str(&hex)
    }
}

/// Formats a scope as a short hash, for spans: never the raw scope.
pub(crate) struct ScopeHash<'a>(pub(crate) &'a str);

impl fmt::Display for ScopeHash<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.0.as_bytes());
        let mut hex = String::with_capacity(16);
        push_hex(&mut hex, &digest[..8]);
        f.write_str(&hex)
    }
}

/// The store operations on one held claim, without the store's type.
pub(crate) trait HeldClaim: Send {
    /// Starts renewing the lease from a task of its own, once, until the
    /// claim is completed, released or dropped. Called whenever the work the
    /// claim guards waits, so work that never waits costs no task.
    fn keep_alive(&mut self);
    /// Completes the claim with `record`; the claim is no longer held after.
    fn complete(&mut self, record: Bytes, finish: Finish) -> BoxFuture<()>;
    /// Releases the claim (the response's status, if there was one); the
    /// claim is no longer held after.
    fn release(&mut self, status: Option<u16>) -> BoxFuture<()>;
    /// Whether the claim's decisions are audited (so a response digest is
    /// worth computing).
    fn audited(&self) -> bool;
    /// When the work must be settled: claimed at plus the maximum execution
    /// time.
    fn deadline(&self) -> Instant;
    /// The layer's background work, for detaching.
    fn background(&self) -> &Arc<Background>;
}

/// A claim held by this process.
///
/// All store traffic about a claim after it is taken lives here, in three
/// pieces: [`keep_alive`](HeldClaim::keep_alive) renews the lease every third
/// of it from a task; [`complete`](HeldClaim::complete) stops that, tries
/// once, and on a store failure keeps trying (renewing between attempts) in a
/// background task until the record lands, the claim is fenced, or the
/// completion retry limit passes; dropped while still held (a panic in the
/// service, or a runtime shutting down), the claim is released in the
/// background so the key does not stay blocked until the lease runs out.
pub(crate) struct Held<St: Store> {
    config: Arc<Config<St>>,
    key: RecordKey,
    token: Token,
    deadline: Instant,
    renewal: Option<tokio::task::AbortHandle>,
    armed: bool,
    /// Where the claim's last decision goes.
    trail: Option<Trail>,
}

impl<St: Store> Held<St> {
    pub(crate) fn new(
        config: Arc<Config<St>>,
        key: RecordKey,
        token: Token,
        trail: Option<Trail>,
    ) -> Self {
        let deadline = Instant::now() + config.max_execution;
        Held {
            config,
            key,
            token,
            deadline,
            renewal: None,
            armed: true,
            trail,
        }
    }

    fn stop_renewing(&mut self) {
        if let Some(task) = self.renewal.take() {
            task.abort();
        }
    }

    fn release_future(&mut self, status: Option<u16>) -> BoxFuture<()> {
        let (config, key, token) = (self.config.clone(), self.key.clone(), self.token);
        let trail = self.trail.take();
        Box::pin(async move {
            let op = config.store.release(&key, token);
            match bounded(op, config.store_timeout, ("release", config.store.name())).await {
                Ok(()) => tracing::debug!(key = %KeyHash(&key), "claim released"),
                Err(err) => {
                    tracing::warn!(key = %KeyHash(&key), error = %err, "could not release claim; it ends with its lease")
                }
            }
            if let Some(trail) = trail {
                trail.record("released", status, None);
            }
        })
    }
}

impl<St: Store> HeldClaim for Held<St> {
    fn keep_alive(&mut self) {
        if self.renewal.is_some() || !self.armed {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (config, key, token) = (self.config.clone(), self.key.clone(), self.token);
            let task = handle.spawn(renew_until_fenced(config, key, token));
            self.renewal = Some(task.abort_handle());
        }
    }

    fn complete(&mut self, record: Bytes, finish: Finish) -> BoxFuture<()> {
        self.armed = false;
        self.stop_renewing();
        let (config, key, token) = (self.config.clone(), self.key.clone(), self.token);
        let mut trail = self.trail.take();
        Box::pin(async move {
            let attempt = complete_once(&config, &key, token, &record).await;
            if let Some(decision) = attempt.decision(finish) {
                if let Some(trail) = trail.take() {
                    trail.record(decision, Some(finish.status), finish.response);
                }
                return;
            }
            // The work is done, so the record must land: keep trying in the
            // background and let the response end now. Until it lands,
            // retries see the key in flight.
            let background = config.background.clone();
            let retries = complete_until_done(config, key.clone(), token, record, finish, trail);
            if !background.spawn_completion(retries) {
                tracing::error!(
                    key = %KeyHash(&key),
                    "response not recorded outside a tokio runtime; the key stays claimed until its lease ends"
                );
            }
        })
    }

    fn release(&mut self, status: Option<u16>) -> BoxFuture<()> {
        self.armed = false;
        self.stop_renewing();
        self.release_future(status)
    }

    fn audited(&self) -> bool {
        self.trail.is_some()
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn background(&self) -> &Arc<Background> {
        &self.config.background
    }
}

/// Renews the lease every third of it, until fenced (or aborted by the
/// claim's holder). A failed renewal is logged and tried again next time:
/// the lease has two more thirds to go.
async fn renew_until_fenced<St: Store>(config: Arc<Config<St>>, key: RecordKey, token: Token) {
    let every = (config.lease / 3).max(Duration::from_millis(1));
    loop {
        tokio::time::sleep(every).await;
        let op = config.store.renew(&key, token, config.claim_lease());
        match bounded(op, config.store_timeout, ("renew", config.store.name())).await {
            Ok(()) => {}
            Err(StoreError::Fenced) => {
                let why = why_fenced(&config, &key, token, None).await;
                tracing::warn!(key = %KeyHash(&key), "lease lost: {}; no longer renewing", why.said());
                return;
            }
            Err(err) => tracing::warn!(key = %KeyHash(&key), error = %err, "could not renew lease"),
        }
    }
}

/// How one attempt to complete went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Recorded,
    /// Another request took the key over: nothing left to try.
    Fenced,
    /// The claim is gone from the store (expired, or lost in a restart or
    /// failover): nothing left to try.
    Lost,
    /// The store failed; worth trying again.
    Failed,
}

impl Attempt {
    /// The audit decision of a final attempt; `None` for a failed one.
    fn decision(self, finish: Finish) -> Option<&'static str> {
        match self {
            Attempt::Recorded => Some(finish.decision()),
            Attempt::Fenced => Some("fenced"),
            Attempt::Lost => Some("claim_lost"),
            Attempt::Failed => None,
        }
    }
}

/// Why the store refused a claim's token, as far as it can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fence {
    /// The record under the key is this claim's: an earlier completion
    /// landed, and only its answer was lost.
    Landed,
    /// Another claim holds the key, or completed it.
    TakenOver,
    /// Nothing holds the key: the claim expired, or the store lost it.
    Gone,
    /// The store cannot say.
    Unknown,
}

impl Fence {
    /// What a log line says happened.
    pub(crate) fn said(self) -> &'static str {
        match self {
            Fence::Landed => "the record had already landed",
            Fence::TakenOver => "another request took the key over",
            Fence::Gone => {
                "the claim is gone from the store (it expired, or the store lost it in a restart or failover)"
            }
            Fence::Unknown => {
                "the claim is no longer held (the store cannot say whether another request took it over or it was lost)"
            }
        }
    }
}

/// Asks the store why `token` was refused: `record` is what this claim
/// tried to complete with, if it did.
pub(crate) async fn why_fenced<St: Store>(
    config: &Config<St>,
    key: &RecordKey,
    token: Token,
    record: Option<&Bytes>,
) -> Fence {
    let op = config.store.peek(key);
    match bounded(op, config.store_timeout, ("peek", config.store.name())).await {
        Ok(Peeked::Completed { record: held }) => {
            let ours = record.is_some_and(|record| {
                held == *record
                    || RecordBuilder::without_body(record).is_ok_and(|slim| held == slim)
            });
            if ours {
                Fence::Landed
            } else {
                Fence::TakenOver
            }
        }
        Ok(Peeked::InFlight { token: holder }) if holder != token => Fence::TakenOver,
        Ok(Peeked::Absent) => Fence::Gone,
        _ => Fence::Unknown,
    }
}

/// One attempt to complete.
async fn complete_once<St: Store>(
    config: &Config<St>,
    key: &RecordKey,
    token: Token,
    record: &Bytes,
) -> Attempt {
    let (store, limit, ttl) = (&config.store, config.store_timeout, config.ttl);
    let label = ("complete", store.name());
    let mut result = bounded(
        store.complete(key, token, record.clone(), ttl),
        limit,
        label,
    )
    .await;
    let mut recorded = record.len();
    if let Err(StoreError::Full) = result {
        // No room for the body: keep status and headers, so a retry learns
        // the outcome and nothing executes twice.
        if let Ok(slim) = RecordBuilder::without_body(record) {
            recorded = slim.len();
            result = bounded(store.complete(key, token, slim, ttl), limit, label).await;
        }
    }
    match result {
        Ok(()) => {
            tracing::debug!(key = %KeyHash(key), "response recorded");
            crate::metrics::recorded(recorded);
            Attempt::Recorded
        }
        Err(StoreError::Fenced) => fenced(config, key, token, record).await,
        Err(err) => {
            tracing::warn!(key = %KeyHash(key), error = %err, "could not record response; retrying");
            Attempt::Failed
        }
    }
}

/// A completion refused for its token: recorded after all when an earlier
/// attempt landed, else fenced or lost, as the store tells.
async fn fenced<St: Store>(
    config: &Config<St>,
    key: &RecordKey,
    token: Token,
    record: &Bytes,
) -> Attempt {
    let why = why_fenced(config, key, token, Some(record)).await;
    if why == Fence::Landed {
        tracing::debug!(key = %KeyHash(key), "response recorded (an earlier attempt landed)");
        crate::metrics::recorded(record.len());
        return Attempt::Recorded;
    }
    crate::metrics::completion_fenced();
    tracing::warn!(key = %KeyHash(key), "response not recorded: {}", why.said());
    if why == Fence::Gone {
        Attempt::Lost
    } else {
        Attempt::Fenced
    }
}

/// Attempts at completing after a failure, backing off from 100 ms to a
/// third of the lease (at most 5 s) and renewing the lease after each failed
/// one, until the record lands, the claim is fenced, or the completion retry
/// limit passes.
async fn complete_until_done<St: Store>(
    config: Arc<Config<St>>,
    key: RecordKey,
    token: Token,
    record: Bytes,
    finish: Finish,
    trail: Option<Trail>,
) {
    let attempt = complete_retrying(&config, &key, token, record).await;
    if let Some(trail) = trail {
        let decision = attempt.decision(finish).unwrap_or("abandoned");
        trail.record(decision, Some(finish.status), finish.response);
    }
}

/// The attempts of [`complete_until_done`]; `Failed` once it gave up.
async fn complete_retrying<St: Store>(
    config: &Arc<Config<St>>,
    key: &RecordKey,
    token: Token,
    record: Bytes,
) -> Attempt {
    let give_up = Instant::now() + config.completion_retry;
    let longest = (config.lease / 3).clamp(Duration::from_millis(1), Duration::from_secs(5));
    let mut pause = Duration::from_millis(100).min(longest);
    loop {
        if Instant::now() + pause > give_up {
            config.background.completion_abandoned();
            crate::metrics::completion_abandoned();
            tracing::error!(
                key = %KeyHash(key),
                "response not recorded within the completion retry limit; the claim lapses, and only the same request may take it over"
            );
            return Attempt::Failed;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(longest);
        crate::metrics::completion_retried();
        let attempt = complete_once(config, key, token, &record).await;
        if attempt != Attempt::Failed {
            return attempt;
        }
        let renewal = config.store.renew(key, token, config.claim_lease());
        let label = ("renew", config.store.name());
        if let Err(StoreError::Fenced) = bounded(renewal, config.store_timeout, label).await {
            return fenced(config, key, token, &record).await;
        }
    }
}

impl<St: Store> Drop for Held<St> {
    fn drop(&mut self) {
        self.stop_renewing();
        if !self.armed {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(self.release_future(None));
            }
            Err(_) => tracing::warn!(
                key = %KeyHash(&self.key),
                "claim dropped outside a tokio runtime; it ends with its lease"
            ),
        }
    }
}
