//! Work the layer does after a client has gone: requests finishing in the
//! background, and completions retried against a failing store. Counted,
//! bounded, and drained on shutdown.

use std::{
    fmt,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The background work of one layer (shared by its clones and services).
#[derive(Default)]
pub(crate) struct Background {
    /// Requests whose client went away after their key was claimed.
    detached: TaskTracker,
    /// Completions retried after the store failed.
    completions: TaskTracker,
    /// Cancelled once a drain's deadline has passed: every detached request
    /// is then settled at once.
    abandon: CancellationToken,
    completions_abandoned: AtomicU64,
    settled: AtomicU64,
    /// Detached requests settled at a drain's deadline.
    drain_settled: AtomicU64,
    /// Detached requests whose handler had not started at a drain's
    /// deadline, released instead.
    drain_released: AtomicU64,
}

impl Background {
    /// Runs a detached request (or the rest of its response body) in a task
    /// of its own. `false` outside a tokio runtime, where nothing can run.
    pub(crate) fn spawn_detached<F>(&self, work: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        /// Counts the request out of the gauge however its task ends.
        struct Running;
        impl Drop for Running {
            fn drop(&mut self) {
                crate::metrics::detached(-1.0);
            }
        }
        crate::metrics::detached(1.0);
        let running = Running;
        spawn(&self.detached, async move {
            let _running = running;
            work.await;
        })
    }

    /// Retries a completion in a task of its own. `false` outside a tokio
    /// runtime.
    pub(crate) fn spawn_completion<F>(&self, work: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        spawn(&self.completions, work)
    }

    /// Resolves once detached requests are to settle.
    pub(crate) fn abandoned(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.abandon.cancelled()
    }

    pub(crate) fn completion_abandoned(&self) {
        self.completions_abandoned.fetch_add(1, Ordering::Relaxed);
    }

    /// A request was stopped and settled `outcome-unknown`; `at_drain` when
    /// a drain's deadline stopped it.
    pub(crate) fn settled_unfinished(&self, at_drain: bool) {
        self.settled.fetch_add(1, Ordering::Relaxed);
        if at_drain {
            self.drain_settled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A detached request reached a drain's deadline before its handler
    /// started, and its claim was released.
    pub(crate) fn released_unstarted(&self) {
        self.drain_released.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> BackgroundStats {
        BackgroundStats {
            detached_running: self.detached.len(),
            completions_pending: self.completions.len(),
            completions_abandoned: self.completions_abandoned.load(Ordering::Relaxed),
            settled_unfinished: self.settled.load(Ordering::Relaxed),
        }
    }

    pub(crate) async fn drain(self: Arc<Self>, within: Duration, grace: Duration) -> Drained {
        self.detached.close();
        self.completions.close();
        let everything = async {
            self.detached.wait().await;
            self.completions.wait().await;
        };
        if tokio::time::timeout(within, everything).await.is_ok() {
            return Drained::default();
        }
        // Past the deadline: settle what still runs, as a request past its
        // maximum execution time is settled, release what never started,
        // and give the store a moment to take those records.
        let count = |counter: &AtomicU64| counter.load(Ordering::Relaxed) as usize;
        let (settled, released) = (count(&self.drain_settled), count(&self.drain_released));
        self.abandon.cancel();
        let _ = tokio::time::timeout(grace, self.detached.wait()).await;
        let drained = Drained {
            settled: count(&self.drain_settled) - settled,
            released: count(&self.drain_released) - released,
            abandoned_requests: self.detached.len(),
            abandoned_completions: self.completions.len(),
        };
        tracing::warn!(
            settled = drained.settled,
            released = drained.released,
            abandoned_requests = drained.abandoned_requests,
            abandoned_completions = drained.abandoned_completions,
            "idempotency drain deadline passed"
        );
        drained
    }
}

/// Where a protected request stands, shared by its path and its future: may
/// it move into the background if its client goes away, has it, and must it
/// settle now. Each is a bit of its own, so no stage overwrites another.
#[derive(Debug, Default)]
pub(crate) struct Lifeline(AtomicU8);

const DETACHABLE: u8 = 1;
const DETACHED: u8 = 2;
const SETTLE: u8 = 4;

impl Lifeline {
    /// Set while the key is being claimed and from the moment it is held;
    /// cleared between the claims of wait mode.
    pub(crate) fn set_detachable(&self, detachable: bool) {
        if detachable {
            self.0.fetch_or(DETACHABLE, Ordering::AcqRel);
        } else {
            self.0.fetch_and(!DETACHABLE, Ordering::AcqRel);
        }
    }

    pub(crate) fn is_detachable(&self) -> bool {
        self.0.load(Ordering::Acquire) & DETACHABLE != 0
    }

    /// The client went away and the request moved into the background.
    pub(crate) fn detach(&self) {
        self.0.fetch_or(DETACHED, Ordering::AcqRel);
    }

    /// Whether nobody waits for the answer any more.
    pub(crate) fn is_detached(&self) -> bool {
        self.0.load(Ordering::Acquire) & DETACHED != 0
    }

    /// A drain's deadline has passed while the request ran detached.
    pub(crate) fn settle(&self) {
        self.0.fetch_or(SETTLE, Ordering::AcqRel);
    }

    pub(crate) fn must_settle(&self) -> bool {
        self.0.load(Ordering::Acquire) & SETTLE != 0
    }
}

fn spawn<F>(tracker: &TaskTracker, work: F) -> bool
where
    F: Future<Output = ()> + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(tracker.track_future(work));
            true
        }
        Err(_) => false,
    }
}

/// The layer's background work, for a metrics layer or a health check:
/// see [`IdempotencyLayer::stats`](crate::IdempotencyLayer::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackgroundStats {
    /// Requests (or response bodies) running in the background now, because
    /// their client went away after the key was claimed.
    pub detached_running: usize,
    /// Completions being retried now, because the store failed to take the
    /// record; until one lands, retries of its key are answered in flight.
    pub completions_pending: usize,
    /// Completions given up since the layer was built, after the
    /// [completion retry limit](crate::IdempotencyLayer::with_completion_retry_limit):
    /// their keys end as lapsed claims (see the crate docs, "Faults").
    pub completions_abandoned: u64,
    /// Requests settled as `outcome-unknown` since the layer was built,
    /// because they ran past the
    /// [maximum execution time](crate::IdempotencyLayer::with_max_execution)
    /// or past a drain's deadline.
    pub settled_unfinished: u64,
}

/// What [`IdempotencyLayer::drain`](crate::IdempotencyLayer::drain) left
/// behind. All zero when everything finished in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Drained {
    /// Detached requests still running at the deadline, stopped and
    /// recorded as `outcome-unknown` (retries get that answer, never a
    /// second execution).
    pub settled: usize,
    /// Detached requests whose handler had not started at the deadline
    /// (their key was still being claimed): their claims are released, so a
    /// retry executes them, since nothing ran.
    pub released: usize,
    /// Detached requests that could not even be settled in the grace period
    /// after the deadline (the store did not answer): their keys end as
    /// lapsed claims, which only the same request may take over, with the
    /// take-over flag set.
    pub abandoned_requests: usize,
    /// Completions still being retried at the deadline: their keys end as
    /// lapsed claims too.
    pub abandoned_completions: usize,
}

impl Drained {
    /// Whether every detached request and completion finished before the
    /// deadline.
    pub fn is_complete(&self) -> bool {
        *self == Drained::default()
    }
}

impl fmt::Display for Drained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_complete() {
            return f.write_str("every background request and completion finished");
        }
        write!(
            f,
            "{} request(s) settled as outcome-unknown, {} released before they started, {} request(s) and {} completion(s) abandoned",
            self.settled, self.released, self.abandoned_requests, self.abandoned_completions
        )
    }
}
