//! A claim the layer holds: renewing its lease, completing or releasing it,
//! and never leaving it behind.

use std::{
    fmt,
    future::{Future, poll_fn},
    pin::{Pin, pin},
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use tokio::time::{Instant, Sleep};

use crate::{
    layer::Config,
    record::RecordBuilder,
    scope::push_hex,
    store::{RecordKey, Store, StoreError, Token},
};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Runs a store operation, failing it as unavailable after `limit`.
///
/// A store that answers on the first poll (the memory store always does)
/// never touches the timer.
pub(crate) async fn bounded<T>(
    op: impl Future<Output = Result<T, StoreError>>,
    limit: Duration,
) -> Result<T, StoreError> {
    let mut op = pin!(op);
    // Boxed, and only once the store makes us wait: a timer is large, and
    // this future is part of every protected request's state.
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    poll_fn(|cx| {
        if let Poll::Ready(out) = op.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(StoreError::unavailable(TimedOut(limit))))
    })
    .await
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

/// The store operations on one held claim, without the store's type.
pub(crate) trait HeldClaim: Send {
    /// How often the lease is renewed.
    fn renew_every(&self) -> Duration;
    fn renew(&self) -> BoxFuture<()>;
    /// Renews every [`renew_every`](Self::renew_every), until dropped.
    fn renew_forever(&self) -> BoxFuture<()>;
    /// Completes the claim with `record`; the claim is no longer held after.
    fn complete(&mut self, record: Bytes) -> BoxFuture<()>;
    /// Releases the claim; the claim is no longer held after.
    fn release(&mut self) -> BoxFuture<()>;
}

/// A claim held by this process. Dropped while still held (a panic in the
/// service, or a runtime shutting down), it releases the claim in the
/// background so the key does not stay blocked until the lease runs out.
pub(crate) struct Held<St: Store> {
    config: Arc<Config<St>>,
    key: RecordKey,
    token: Token,
    armed: bool,
}

impl<St: Store> Held<St> {
    pub(crate) fn new(config: Arc<Config<St>>, key: RecordKey, token: Token) -> Self {
        Held {
            config,
            key,
            token,
            armed: true,
        }
    }

    fn release_future(&self) -> BoxFuture<()> {
        let (config, key, token) = (self.config.clone(), self.key.clone(), self.token);
        Box::pin(async move {
            let op = config.store.release(&key, token);
            match bounded(op, config.store_timeout).await {
                Ok(()) => tracing::debug!(key = %KeyHash(&key), "claim released"),
                Err(err) => {
                    tracing::warn!(key = %KeyHash(&key), error = %err, "could not release claim; it ends with its lease")
                }
            }
        })
    }
}

impl<St: Store> HeldClaim for Held<St> {
    fn renew_every(&self) -> Duration {
        self.config.lease / 3
    }

    fn renew(&self) -> BoxFuture<()> {
        let (config, key, token) = (self.config.clone(), self.key.clone(), self.token);
        Box::pin(async move {
            let op = config.store.renew(&key, token, config.lease);
            if let Err(err) = bounded(op, config.store_timeout).await {
                tracing::warn!(key = %KeyHash(&key), error = %err, "could not renew lease");
            }
        })
    }

    fn renew_forever(&self) -> BoxFuture<()> {
        let (config, key, token) = (self.config.clone(), self.key.clone(), self.token);
        Box::pin(async move {
            let every = config.lease / 3;
            loop {
                tokio::time::sleep(every).await;
                let op = config.store.renew(&key, token, config.lease);
                if let Err(err) = bounded(op, config.store_timeout).await {
                    tracing::warn!(key = %KeyHash(&key), error = %err, "could not renew lease");
                }
            }
        })
    }

    fn complete(&mut self, record: Bytes) -> BoxFuture<()> {
        self.armed = false;
        let (config, key, token) = (self.config.clone(), self.key.clone(), self.token);
        Box::pin(async move {
            if complete_once(&config, &key, token, &record).await {
                return;
            }
            // The store failed. The work is done, so the record must land:
            // keep trying in the background (holding the lease meanwhile)
            // and let the response end now. Until it lands, retries see the
            // key in flight.
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn(complete_with_retries(config, key, token, record));
                }
                Err(_) => tracing::error!(
                    key = %KeyHash(&key),
                    "response not recorded; the key stays claimed until its lease ends"
                ),
            }
        })
    }

    fn release(&mut self) -> BoxFuture<()> {
        self.armed = false;
        self.release_future()
    }
}

/// One attempt to complete; `true` when there is nothing left to try (done,
/// or fenced out by a newer claim).
async fn complete_once<St: Store>(
    config: &Config<St>,
    key: &RecordKey,
    token: Token,
    record: &Bytes,
) -> bool {
    let (store, limit, ttl) = (&config.store, config.store_timeout, config.ttl);
    let mut result = bounded(store.complete(key, token, record.clone(), ttl), limit).await;
    if let Err(StoreError::Full) = result {
        // No room for the body: keep status and headers, so a retry learns
        // the outcome and nothing executes twice.
        if let Ok(slim) = RecordBuilder::without_body(record) {
            result = bounded(store.complete(key, token, slim, ttl), limit).await;
        }
    }
    match result {
        Ok(()) => {
            tracing::debug!(key = %KeyHash(key), "response recorded");
            true
        }
        Err(StoreError::Fenced) => {
            tracing::warn!(
                key = %KeyHash(key),
                "response not recorded: the lease lapsed and another request took the key over"
            );
            true
        }
        Err(err) => {
            tracing::warn!(key = %KeyHash(key), error = %err, "could not record response; retrying");
            false
        }
    }
}

/// Attempts at completing after a failure: backing off from 100 ms to 5 s,
/// about a minute in all, renewing the lease before each.
async fn complete_with_retries<St: Store>(
    config: Arc<Config<St>>,
    key: RecordKey,
    token: Token,
    record: Bytes,
) {
    let mut backoff = Duration::from_millis(100);
    for _ in 0..16 {
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        let renewal = config.store.renew(&key, token, config.lease);
        if let Err(StoreError::Fenced) = bounded(renewal, config.store_timeout).await {
            tracing::warn!(
                key = %KeyHash(&key),
                "response not recorded: the lease lapsed and another request took the key over"
            );
            return;
        }
        if complete_once(&config, &key, token, &record).await {
            return;
        }
    }
    tracing::error!(
        key = %KeyHash(&key),
        "response not recorded after repeated store failures; the key stays claimed until its lease ends"
    );
}

impl<St: Store> Drop for Held<St> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(self.release_future());
            }
            Err(_) => tracing::warn!(
                key = %KeyHash(&self.key),
                "claim dropped outside a tokio runtime; it ends with its lease"
            ),
        }
    }
}

/// Keeps a held claim's lease alive while the request runs and while its
/// response streams.
///
/// While the service works on the request, the server polls its future
/// whenever woken, so a timer polled alongside it is enough. A streaming
/// response is different: the server stops polling the body while the
/// client is slow to read, so renewal moves to a task of its own.
pub(crate) struct Renewer {
    pub(crate) claim: Box<dyn HeldClaim>,
    timer: Option<Pin<Box<Sleep>>>,
    renewing: Option<BoxFuture<()>>,
    background: Option<tokio::task::AbortHandle>,
}

impl Renewer {
    pub(crate) fn new(claim: Box<dyn HeldClaim>) -> Self {
        Renewer {
            claim,
            timer: None,
            renewing: None,
            background: None,
        }
    }

    /// Moves renewal into a task (once), for as long as this renewer lives
    /// or until [`stop`](Self::stop).
    pub(crate) fn renew_in_background(&mut self) {
        if self.background.is_some() {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let task = handle.spawn(self.claim.renew_forever());
            self.background = Some(task.abort_handle());
        }
    }

    /// Stops background renewal: the claim is being completed or released.
    pub(crate) fn stop(&mut self) {
        if let Some(task) = self.background.take() {
            task.abort();
        }
    }

    /// Drives renewal; call it whenever the work it guards is pending. The
    /// timer starts on the first call, so work that never waits costs none.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) {
        loop {
            if let Some(renewing) = &mut self.renewing {
                if renewing.as_mut().poll(cx).is_pending() {
                    return;
                }
                self.renewing = None;
            }
            let every = self.claim.renew_every();
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
            if timer.as_mut().poll(cx).is_pending() {
                return;
            }
            timer.as_mut().reset(Instant::now() + every);
            self.renewing = Some(self.claim.renew());
        }
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.stop();
    }
}
