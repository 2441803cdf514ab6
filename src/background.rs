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

    pub(crate) fn settled_unfinished(&self) {
        self.settled.fetch_add(1, Ordering::Relaxed);
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
        // maximum execution time is settled, and give the store a moment to
        // take those records.
        let running = self.detached.len();
        self.abandon.cancel();
        let _ = tokio::time::timeout(grace, self.detached.wait()).await;
        let drained = Drained {
            settled: running.saturating_sub(self.detached.len()),
            abandoned_requests: self.detached.len(),
            abandoned_completions: self.completions.len(),
        };
        tracing::warn!(
            settled = drained.settled,
            abandoned_requests = drained.abandoned_requests,
            abandoned_completions = drained.abandoned_completions,
            "idempotency drain deadline passed"
        );
        drained
    }
}

/// Where a protected request stands, shared by its path and its future: may
/// it move into the background if its client goes away, and must it settle
/// now.
#[derive(Debug, Default)]
pub(crate) struct Lifeline(AtomicU8);

const ENDS_WITH_CLIENT: u8 = 0;
const DETACHABLE: u8 = 1;
const SETTLE: u8 = 2;

impl Lifeline {
    /// Set while the key is being claimed and from the moment it is held;
    /// cleared between the claims of wait mode.
    pub(crate) fn set_detachable(&self, detachable: bool) {
        let stage = if detachable {
            DETACHABLE
        } else {
            ENDS_WITH_CLIENT
        };
        self.0.store(stage, Ordering::Release);
    }

    pub(crate) fn is_detachable(&self) -> bool {
        self.0.load(Ordering::Acquire) != ENDS_WITH_CLIENT
    }

    /// A drain's deadline has passed while the request ran detached.
    pub(crate) fn settle(&self) {
        self.0.store(SETTLE, Ordering::Release);
    }

    pub(crate) fn must_settle(&self) -> bool {
        self.0.load(Ordering::Relaxed) == SETTLE
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
            "{} request(s) settled as outcome-unknown, {} request(s) and {} completion(s) abandoned",
            self.settled, self.abandoned_requests, self.abandoned_completions
        )
    }
}
