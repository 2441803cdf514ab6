//! [`FaultyStore`]: a store that fails, stalls or corrupts on command.

use std::{
    fmt,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;

use super::{Claim, Peeked, RecordKey, Store, StoreError, Token};
use crate::Fingerprint;

/// A fault [`FaultyStore`] injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Fail with [`StoreError::Unavailable`], as a store that is down does.
    Unavailable,
    /// Never answer, as a store behind a dead connection does; the layer's
    /// store timeout ends the wait.
    Stall,
    /// Answer a claim with a completed record holding bytes nobody can read.
    /// On other operations, fail with [`StoreError::Corrupt`].
    Corrupt,
    /// Fail with [`StoreError::Full`].
    Full,
    /// Carry the operation out on the wrapped store, then fail with
    /// [`StoreError::Unavailable`], as a store whose answer was lost after
    /// it wrote (a timeout, a dropped connection) does.
    AnswerLost,
}

/// A store operation, for [`FaultyStore`] to fault or count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// [`Store::claim`].
    Claim,
    /// [`Store::renew`].
    Renew,
    /// [`Store::complete`].
    Complete,
    /// [`Store::release`].
    Release,
}

impl Op {
    const ALL: [Op; 4] = [Op::Claim, Op::Renew, Op::Complete, Op::Release];

    fn index(self) -> usize {
        match self {
            Op::Claim => 0,
            Op::Renew => 1,
            Op::Complete => 2,
            Op::Release => 3,
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    faults: Mutex<[Option<Fault>; 4]>,
    once: Mutex<[Option<Fault>; 4]>,
    calls: [AtomicUsize; 4],
}

/// Wraps a store and, on command, makes its operations fail, stall or return
/// corrupt records, so a service's behaviour during a store outage can be
/// tested. It also counts the calls made to each operation.
///
/// Clones share faults and counts.
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
/// use tower_idempotency::store::{Fault, FaultyStore, Op};
///
/// let store = FaultyStore::new(MemoryStore::default());
/// let layer = IdempotencyLayer::new(store.clone());
/// store.set_fault(Op::Claim, Some(Fault::Unavailable)); // every claim fails: 503
/// store.clear_faults();
/// assert_eq!(store.calls(Op::Claim), 0);
/// ```
#[derive(Clone)]
pub struct FaultyStore<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> fmt::Debug for FaultyStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStore")
            .field("faults", &self.shared.faults)
            .finish_non_exhaustive()
    }
}

impl<S> FaultyStore<S> {
    /// Wraps `inner`, with no faults.
    pub fn new(inner: S) -> Self {
        FaultyStore {
            inner,
            shared: Arc::default(),
        }
    }

    /// Sets (or with `None`, clears) the fault of one operation.
    pub fn set_fault(&self, op: Op, fault: Option<Fault>) {
        self.lock()[op.index()] = fault;
    }

    /// Faults only the next call of `op`, before any fault set with
    /// [`set_fault`](Self::set_fault).
    pub fn set_fault_once(&self, op: Op, fault: Fault) {
        self.shared.once.lock().unwrap_or_else(|e| e.into_inner())[op.index()] = Some(fault);
    }

    /// Sets the same fault on every operation.
    pub fn set_fault_all(&self, fault: Option<Fault>) {
        *self.lock() = [fault; 4];
    }

    /// Clears every fault.
    pub fn clear_faults(&self) {
        self.set_fault_all(None);
        *self.shared.once.lock().unwrap_or_else(|e| e.into_inner()) = [None; 4];
    }

    /// Calls made to `op` so far, faulted ones included.
    pub fn calls(&self, op: Op) -> usize {
        self.shared.calls[op.index()].load(Ordering::SeqCst)
    }

    /// Calls made to every operation so far.
    pub fn total_calls(&self) -> usize {
        Op::ALL.iter().map(|op| self.calls(*op)).sum()
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Option<Fault>; 4]> {
        self.shared.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(&self, op: Op) -> Option<Fault> {
        self.shared.calls[op.index()].fetch_add(1, Ordering::SeqCst);
        let once = self.shared.once.lock().unwrap_or_else(|e| e.into_inner())[op.index()].take();
        once.or(self.lock()[op.index()])
    }
}

#[derive(Debug)]
struct Injected(&'static str);

impl fmt::Display for Injected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "injected fault: {}", self.0)
    }
}

impl std::error::Error for Injected {}

async fn faulted<T>(fault: Fault) -> Result<T, StoreError> {
    match fault {
        Fault::Unavailable => Err(StoreError::unavailable(Injected("unavailable"))),
        Fault::Stall => std::future::pending().await,
        Fault::Corrupt => Err(StoreError::Corrupt(Box::new(Injected("corrupt")))),
        Fault::Full => Err(StoreError::Full),
        Fault::AnswerLost => Err(StoreError::unavailable(Injected("answer lost"))),
    }
}

/// Runs `op` unless `fault` says otherwise; [`Fault::AnswerLost`] runs it
/// and then fails. Called only when it is to run: a store may do its work
/// as the future is made.
async fn apply<T, F>(fault: Option<Fault>, op: impl FnOnce() -> F) -> Result<T, StoreError>
where
    F: Future<Output = Result<T, StoreError>>,
{
    match fault {
        None => op().await,
        Some(Fault::AnswerLost) => {
            let _ = op().await;
            faulted(Fault::AnswerLost).await
        }
        Some(fault) => faulted(fault).await,
    }
}

impl<S: Store> Store for FaultyStore<S> {
    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        let fault = self.enter(Op::Claim);
        async move {
            match fault {
                Some(Fault::Corrupt) => Ok(Claim::Completed {
                    fingerprint,
                    record: Bytes::from_static(b"\xffnot a record"),
                }),
                fault => apply(fault, || self.inner.claim(key, fingerprint, lease)).await,
            }
        }
    }

    fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let fault = self.enter(Op::Renew);
        async move { apply(fault, || self.inner.renew(key, token, lease)).await }
    }

    fn complete(
        &self,
        key: &RecordKey,
        token: Token,
        record: Bytes,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let fault = self.enter(Op::Complete);
        async move { apply(fault, || self.inner.complete(key, token, record, ttl)).await }
    }

    fn release(
        &self,
        key: &RecordKey,
        token: Token,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let fault = self.enter(Op::Release);
        async move { apply(fault, || self.inner.release(key, token)).await }
    }

    /// Never faulted, and not counted: it is how the layer explains a
    /// fault after the fact.
    fn peek(&self, key: &RecordKey) -> impl Future<Output = Result<Peeked, StoreError>> + Send {
        self.inner.peek(key)
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}
