//! [`AtMostOnce`]: the layer's guarantee for work that is not an HTTP
//! request: tool calls, queue messages, scheduled jobs.
//!
//! Given a scope, a key, the input and an async closure, the closure runs at
//! most once per key (within the retention), and every duplicate gets the
//! output it recorded. It runs on the same [`Store`]s as the layer, with the
//! same rules, which the store conformance suite checks: an atomic claim,
//! a lease renewed while the closure runs, fencing tokens, the take-over
//! flag for a claim whose holder stopped renewing, and only the same input
//! taking a lapsed claim over.

use std::{
    fmt,
    future::Future,
    panic::{AssertUnwindSafe, catch_unwind, resume_unwind},
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::Poll,
    time::Duration,
};

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use tokio::time::{Instant, timeout};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    Drained, Fingerprint, IdempotencyContext, Lapse,
    client::IntentKeyError,
    store::{Claim, Peeked, RecordKey, Store, StoreError, Token},
    trail::Trail,
};

/// Runs work at most once per key and hands its recorded output to every
/// duplicate.
///
/// | setting | default |
/// |---|---|
/// | lease of a running claim | 30 s, renewed every 10 s while the closure runs |
/// | retention of an output | 24 hours |
/// | duplicate while the first runs | [`OnceError::InFlight`] at once, or wait up to a bound ([`with_wait`](Self::with_wait)) |
/// | the closure's `Err` | releases the key: the next duplicate runs again ([`run_recording_errors`](Self::run_recording_errors) records it instead) |
/// | store timeout | 5 s per operation |
/// | completion retried after a store failure | for up to 1 hour, in the background |
///
/// The future `run` returns must be driven to its end. Dropped while the
/// closure runs, the closure is dropped with it and the claim is left to
/// lapse; a duplicate with the same input then takes it over and sees
/// [`IdempotencyContext::took_over`].
///
/// ```
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_idempotency::{MemoryStore, once::AtMostOnce};
///
/// let once = AtMostOnce::new(MemoryStore::default());
/// let message = serde_json::json!({"caller": "ada", "slot": "09:00"});
/// for _delivery in 0..3 {
///     // A queue redelivers the same message: it is booked once.
///     let booking: u64 = once
///         .run("bookings-queue", "msg-4711", &message, |_ctx| async {
///             Ok::<_, std::io::Error>(42) // book, return the booking id
///         })
///         .await?;
///     assert_eq!(booking, 42);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct AtMostOnce<St> {
    store: St,
    lease: Duration,
    ttl: Duration,
    wait: Option<Duration>,
    store_timeout: Duration,
    completion_retry: Duration,
    lapse: Lapse,
    /// Completions retried after a store failure; shared by clones.
    completions: TaskTracker,
    /// Completions given up since the last drain; shared by clones.
    abandoned: Arc<AtomicU64>,
    #[cfg(feature = "audit")]
    audit: Option<crate::audit::AuditLog>,
}

/// The work ran, but its claim was lost before its output was recorded:
/// another execution took the key over (its renewals failed for longer
/// than the lease), or the store no longer held the claim (it lost it in a
/// restart or failover). Another execution may do, or have done, the same
/// work, and duplicates will not get this output. It is carried here, so
/// that the caller can compensate or check.
#[derive(Debug, Clone)]
pub struct Fenced {
    /// The record this execution tried to complete with.
    record: Bytes,
    taken_over: bool,
}

impl Fenced {
    /// The output the work returned, as the type `run` was asked for. An
    /// error when the work returned an error instead (for
    /// [`run_recording_errors`](AtMostOnce::run_recording_errors)), or its
    /// output did not serialise.
    pub fn output<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        match self.record.get(MAGIC.len()..).and_then(<[u8]>::split_first) {
            Some((0, json)) => serde_json::from_slice(json),
            _ => Err(serde::de::Error::custom(
                "the work returned no output that could be recorded",
            )),
        }
    }

    /// Whether another execution holds or completed the key (`true`), or
    /// the store no longer held this execution's claim at all (`false`).
    pub fn taken_over(&self) -> bool {
        self.taken_over
    }
}

/// Why [`AtMostOnce::run`] did not return an output.
#[derive(Debug)]
#[non_exhaustive]
pub enum OnceError<E> {
    /// The closure returned this error (this call's, or with
    /// [`run_recording_errors`](AtMostOnce::run_recording_errors) the one
    /// recorded by the first call).
    Failed(E),
    /// The key was used before with a different input.
    InputMismatch,
    /// The key's first call is still running; try again after about
    /// `retry_after`.
    InFlight {
        /// A short hint, never past the holder's lease.
        retry_after: Duration,
    },
    /// The store failed or timed out before anything ran: nothing ran.
    Store(StoreError),
    /// The recorded output could not be read as the type asked for (another
    /// type, or a record of another kind under this key).
    Unreadable(Box<dyn std::error::Error + Send + Sync>),
    /// The input does not serialise to JSON.
    Input(IntentKeyError),
    /// The audit chain could not take the call's entry, and its policy is
    /// that nothing runs without one: nothing ran.
    AuditUnavailable,
    /// The work ran, but lost its claim before its output was recorded; see
    /// [`Fenced`], which carries the output. Never a success: another
    /// execution may have done the same work.
    Fenced(Fenced),
    /// Under [`Lapse::Settle`]: an earlier execution
    /// of this key stopped renewing its claim before it finished, so
    /// whether its work took effect is unknown, and it will not run again
    /// under this key. Recorded: every later duplicate gets it too.
    OutcomeUnknown,
}

impl<E> OnceError<E> {
    /// The same error with `f` applied to a [`Failed`](OnceError::Failed)
    /// error.
    fn map_failed<F>(self, f: impl FnOnce(E) -> F) -> OnceError<F> {
        match self {
            OnceError::Failed(e) => OnceError::Failed(f(e)),
            OnceError::InputMismatch => OnceError::InputMismatch,
            OnceError::InFlight { retry_after } => OnceError::InFlight { retry_after },
            OnceError::Store(e) => OnceError::Store(e),
            OnceError::Unreadable(e) => OnceError::Unreadable(e),
            OnceError::Input(e) => OnceError::Input(e),
            OnceError::AuditUnavailable => OnceError::AuditUnavailable,
            OnceError::Fenced(fenced) => OnceError::Fenced(fenced),
            OnceError::OutcomeUnknown => OnceError::OutcomeUnknown,
        }
    }
}

impl<E: fmt::Display> fmt::Display for OnceError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OnceError::Failed(e) => write!(f, "the work failed: {e}"),
            OnceError::InputMismatch => {
                f.write_str("the key was used before with a different input")
            }
            OnceError::InFlight { retry_after } => write!(
                f,
                "the key's first call is still running; retry in {} ms",
                retry_after.as_millis()
            ),
            OnceError::Store(e) => write!(f, "nothing ran: {e}"),
            OnceError::Unreadable(e) => write!(f, "the recorded output is unreadable: {e}"),
            OnceError::Input(e) => write!(f, "the input does not serialise: {e}"),
            OnceError::AuditUnavailable => {
                f.write_str("nothing ran: the audit log cannot record the call")
            }
            OnceError::Fenced(fenced) if fenced.taken_over => f.write_str(
                "the work ran, but another execution took its key over before its output was recorded: it may have run twice",
            ),
            OnceError::Fenced(_) => f.write_str(
                "the work ran, but the store lost its claim before its output was recorded: a duplicate may run it again",
            ),
            OnceError::OutcomeUnknown => f.write_str(
                "an earlier execution of this key stopped before it finished: whether it took effect is unknown, and it will not run again under this key",
            ),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for OnceError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OnceError::Failed(e) => Some(e),
            OnceError::Store(e) => Some(e),
            OnceError::Unreadable(e) => Some(&**e),
            OnceError::Input(e) => Some(e),
            OnceError::InputMismatch
            | OnceError::InFlight { .. }
            | OnceError::AuditUnavailable
            | OnceError::Fenced(_)
            | OnceError::OutcomeUnknown => None,
        }
    }
}

/// Record layout: magic `TO`, version 1, then `0` and the output's JSON,
/// `1` and the recorded error's JSON, `2` (an output that could not be
/// serialised) or `3` (settled as outcome unknown).
const MAGIC: &[u8; 3] = b"TO\x01";

#[derive(Debug)]
struct Unreadable(&'static str);

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Unreadable {}

/// The record of work that ran but whose output (or error) could not be
/// serialised: duplicates get [`OnceError::Unreadable`], and nothing runs
/// again.
fn unrecordable() -> Bytes {
    let mut out = MAGIC.to_vec();
    out.push(2);
    Bytes::from(out)
}

/// The record of a key settled as outcome unknown, under
/// [`Lapse::Settle`].
fn outcome_unknown() -> Bytes {
    let mut out = MAGIC.to_vec();
    out.push(3);
    Bytes::from(out)
}

fn encode<V: Serialize>(tag: u8, value: &V) -> Result<Bytes, serde_json::Error> {
    let mut out = MAGIC.to_vec();
    out.push(tag);
    serde_json::to_writer(&mut out, value)?;
    Ok(Bytes::from(out))
}

/// What a record holds: an output, a recorded error, or that the outcome
/// is unknown.
enum Recorded<T, E> {
    Output(T),
    Error(E),
    OutcomeUnknown,
}

fn decode<T: DeserializeOwned, E: DeserializeOwned>(
    record: &[u8],
) -> Result<Recorded<T, E>, Box<dyn std::error::Error + Send + Sync>> {
    let Some(rest) = record.strip_prefix(MAGIC) else {
        return Err(Box::new(Unreadable(
            "not an at-most-once record, or one of another version",
        )));
    };
    match rest.split_first() {
        Some((0, json)) => Ok(Recorded::Output(serde_json::from_slice(json)?)),
        Some((1, json)) => Ok(Recorded::Error(serde_json::from_slice(json)?)),
        Some((2, _)) => Err(Box::new(Unreadable(
            "the first call ran, but its output could not be serialised to be recorded",
        ))),
        Some((3, _)) => Ok(Recorded::OutcomeUnknown),
        _ => Err(Box::new(Unreadable("a record of an unknown kind"))),
    }
}

/// A never-recorded error type, for calls whose errors release the key.
#[derive(Debug, serde::Deserialize)]
enum NoRecordedError {}

impl<St: Store + Clone> AtMostOnce<St> {
    /// At-most-once over `store`, with the defaults above.
    pub fn new(store: St) -> Self {
        AtMostOnce {
            store,
            lease: Duration::from_secs(30),
            ttl: Duration::from_secs(24 * 60 * 60),
            wait: None,
            store_timeout: Duration::from_secs(5),
            completion_retry: Duration::from_secs(60 * 60),
            lapse: Lapse::TakeOver,
            completions: TaskTracker::new(),
            abandoned: Arc::default(),
            #[cfg(feature = "audit")]
            audit: None,
        }
    }

    /// What a call does when it finds its key's claim lapsed (the earlier
    /// execution stopped renewing: its process died, stalled, or lost the
    /// store for longer than the lease). [`Lapse::TakeOver`] (the default)
    /// runs the work again, telling it
    /// ([`IdempotencyContext::took_over`]); [`Lapse::Settle`] never runs a
    /// key twice: it records the key as [`OnceError::OutcomeUnknown`], for
    /// this and every later duplicate, and runs nothing.
    #[must_use]
    pub fn with_lapse(mut self, lapse: Lapse) -> Self {
        self.lapse = lapse;
        self
    }

    /// Waits for the completions being retried in the background (after
    /// the store failed to take an output) to land, for up to `within`.
    /// `run` returns its output once the work is done, before its record
    /// has landed when the store failed: a process that exits (a CLI, a
    /// serverless function) calls this first, or the next start runs the
    /// work again. The result counts, in
    /// [`abandoned_completions`](Drained::abandoned_completions), the
    /// records that had not landed by the deadline and those given up
    /// since the last drain (the retry limit passed, or another run took
    /// the key over meanwhile: the work may have run twice); [`Drained::is_complete`] says every record
    /// landed. The instance keeps working afterwards.
    pub async fn drain(&self, within: Duration) -> Drained {
        self.completions.close();
        let _ = timeout(within, self.completions.wait()).await;
        self.completions.reopen();
        let pending = self.completions.len();
        let given_up = self.abandoned.swap(0, Ordering::Relaxed) as usize;
        Drained {
            abandoned_completions: pending + given_up,
            ..Drained::default()
        }
    }

    /// Writes every decision into `audit`'s chain (feature `audit`), as the
    /// layer's [`with_audit`](crate::IdempotencyLayer::with_audit) does:
    /// `executed` with the SHA-256 of the output's JSON, `replayed`,
    /// `key_reused`, `request_in_flight`, `store_unavailable`, `taken_over`,
    /// `released` (the closure failed or panicked), `fenced`, `abandoned`.
    #[cfg(feature = "audit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "audit")))]
    #[must_use]
    pub fn with_audit(mut self, audit: crate::audit::AuditLog) -> Self {
        self.audit = Some(audit);
        self
    }

    /// The call's place in the audit chain; see `Config::trail`.
    fn trail(&self, scope: &str, key: &str) -> Result<Option<Trail>, ()> {
        #[cfg(feature = "audit")]
        if let Some(audit) = &self.audit {
            return audit.call_trail(scope, key).map(Some);
        }
        let _ = (scope, key);
        Ok(None)
    }

    /// How long a running claim is honoured without renewal (default 30 s);
    /// renewed every third of it while the closure runs.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(3));
        self
    }

    /// How long an output is kept for duplicates (default 24 hours).
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Instead of [`OnceError::InFlight`] at once, a duplicate waits up to
    /// `bound` for the first call to finish and returns its output.
    #[must_use]
    pub fn with_wait(mut self, bound: Duration) -> Self {
        self.wait = Some(bound);
        self
    }

    /// How long one store operation may take (default 5 s).
    #[must_use]
    pub fn with_store_timeout(mut self, limit: Duration) -> Self {
        self.store_timeout = limit;
        self
    }

    /// How long a completion the store refused is retried in the background
    /// (default 1 hour), renewing the lease between attempts.
    #[must_use]
    pub fn with_completion_retry_limit(mut self, limit: Duration) -> Self {
        self.completion_retry = limit;
        self
    }

    /// Runs `work` unless `key` (within `scope`) already ran with this
    /// `input`, and returns its output; every duplicate gets the recorded
    /// output without running anything.
    ///
    /// - A duplicate with a different input: [`OnceError::InputMismatch`].
    /// - A duplicate while the first runs: [`OnceError::InFlight`], or the
    ///   output once it lands with [`with_wait`](Self::with_wait).
    /// - `work` returning `Err(e)`: the key is released, so the next
    ///   duplicate runs again, and this call returns [`OnceError::Failed`].
    ///   A panic in `work` releases the key too, then resumes.
    /// - The store failing before `work` runs: [`OnceError::Store`], and
    ///   nothing ran. Failing after: the output is returned, and the
    ///   completion retried in the background (renewing the lease) for up
    ///   to the [completion retry limit](Self::with_completion_retry_limit).
    ///   If it never lands (the limit passes, or the process exits first),
    ///   the claim lapses and the next duplicate with the same input runs
    ///   the work again, with `took_over()` set. A process about to exit
    ///   calls [`drain`](Self::drain) first, which waits for the record
    ///   and says whether it landed.
    /// - A call whose claim was lost while it ran (its renewals failed for
    ///   longer than the lease and a duplicate took over, or the store lost
    ///   it) never returns `Ok`: it returns [`OnceError::Fenced`], which
    ///   carries its output, since another execution may have done the
    ///   same work. The work itself is told as soon as a renewal is refused
    ///   ([`IdempotencyContext::fenced`]), and can stop before its side
    ///   effect. Under [`Lapse::Settle`] the
    ///   duplicate runs nothing and gets [`OnceError::OutcomeUnknown`].
    /// - The lease is renewed from a task of its own, so work that blocks
    ///   its thread (a synchronous client, a subprocess wait) keeps its
    ///   claim on a multi-thread runtime. On a current-thread runtime
    ///   nothing else runs while the work blocks, renewals included: there,
    ///   keep blocking calls in `tokio::task::spawn_blocking`, or the claim
    ///   lapses after one lease.
    /// - An output (or recorded error) that does not serialise is recorded
    ///   as unreadable: duplicates get [`OnceError::Unreadable`].
    /// - The input is fingerprinted by a canonical form of its JSON: field
    ///   and map order never matter, and numbers compare as RFC 8785 writes
    ///   them (`10` is `10.0`), as in an intent key. An input that does not
    ///   serialise, or holds a number beyond ±(2^53 − 1) (an integer, or
    ///   the double a larger integer in JSON text was read as), is
    ///   [`OnceError::Input`], and nothing runs.
    ///
    /// `work` receives the [`IdempotencyContext`] of this execution: its
    /// `took_over()` says an earlier execution of the same input stopped
    /// renewing (its process died) and may have done part of the work, and
    /// `derive(label)` gives keys for the calls it makes downstream.
    pub async fn run<I, T, E, F, Fut>(
        &self,
        scope: &str,
        key: &str,
        input: &I,
        work: F,
    ) -> Result<T, OnceError<E>>
    where
        I: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        F: FnOnce(IdempotencyContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let result = self
            .execute::<I, T, E, NoRecordedError, _, _>(scope, key, input, work, |_| None)
            .await;
        result.map_err(|err| {
            err.map_failed(|failed| match failed {
                Ok(e) => e,
                Err(never) => match never {},
            })
        })
    }

    /// Like [`run`](Self::run), but an `Err` of `work` is recorded like an
    /// output: every duplicate gets the same [`OnceError::Failed`] and
    /// nothing runs again. For errors that say the work was refused for
    /// good (a declined payment), not for failures worth retrying.
    pub async fn run_recording_errors<I, T, E, F, Fut>(
        &self,
        scope: &str,
        key: &str,
        input: &I,
        work: F,
    ) -> Result<T, OnceError<E>>
    where
        I: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        E: Serialize + DeserializeOwned,
        F: FnOnce(IdempotencyContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let result = self
            .execute::<I, T, E, E, _, _>(scope, key, input, work, |e| Some(encode(1, e)))
            .await;
        result.map_err(|err| err.map_failed(|(Ok(e) | Err(e))| e))
    }

    /// The claim loop and the execution. `Failed(Ok(e))` is this call's
    /// error, `Failed(Err(r))` a recorded one; `record_error` encodes an
    /// error for the record, or says it releases the key (`None`).
    async fn execute<I, T, E, R, F, Fut>(
        &self,
        scope: &str,
        key: &str,
        input: &I,
        work: F,
        record_error: impl Fn(&E) -> Option<Result<Bytes, serde_json::Error>>,
    ) -> Result<T, OnceError<Result<E, R>>>
    where
        I: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        R: DeserializeOwned,
        F: FnOnce(IdempotencyContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let fingerprint = fingerprint(input).map_err(OnceError::Input)?;
        let record_key = RecordKey::new(scope, key);
        let Ok(mut trail) = self.trail(scope, key) else {
            return Err(OnceError::AuditUnavailable);
        };
        if let Some(trail) = &mut trail {
            trail.fingerprint(&fingerprint);
        }
        let decide = |trail: Option<Trail>, decision: &'static str| {
            if let Some(trail) = trail {
                trail.record(decision, None, None);
            }
        };
        let started = Instant::now();
        let mut backoff = Duration::from_millis(5);
        let (token, took_over) = loop {
            let claim = match self
                .bounded(self.store.claim(&record_key, fingerprint, self.lease))
                .await
            {
                Ok(claim) => claim,
                Err(err) => {
                    decide(trail, "store_unavailable");
                    return Err(OnceError::Store(err));
                }
            };
            match claim {
                Claim::Acquired { token, took_over } => break (token, took_over),
                Claim::Completed {
                    fingerprint: held, ..
                }
                | Claim::InFlight {
                    fingerprint: held, ..
                } if held != fingerprint => {
                    decide(trail, "key_reused");
                    return Err(OnceError::InputMismatch);
                }
                Claim::Completed { record, .. } => {
                    decide(trail, "replayed");
                    return match decode::<T, R>(&record).map_err(OnceError::Unreadable)? {
                        Recorded::Output(output) => Ok(output),
                        Recorded::Error(recorded) => Err(OnceError::Failed(Err(recorded))),
                        Recorded::OutcomeUnknown => Err(OnceError::OutcomeUnknown),
                    };
                }
                Claim::InFlight {
                    lease_remaining, ..
                } => {
                    let left = self.wait.map_or(Duration::ZERO, |bound| {
                        bound.saturating_sub(started.elapsed())
                    });
                    if left.is_zero() {
                        let retry_after =
                            lease_remaining.clamp(Duration::from_millis(1), Duration::from_secs(1));
                        decide(trail, "request_in_flight");
                        return Err(OnceError::InFlight { retry_after });
                    }
                    tokio::time::sleep(backoff.min(left)).await;
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
            }
        };
        if took_over && let Some(mut held_trail) = trail.take() {
            match held_trail.another() {
                Ok(execution) => {
                    held_trail.record("taken_over", None, None);
                    trail = Some(execution);
                }
                Err(()) => {
                    self.release(&record_key, token).await;
                    held_trail.record("taken_over", None, None);
                    return Err(OnceError::AuditUnavailable);
                }
            }
        }
        if took_over && self.lapse == Lapse::Settle {
            // The earlier execution may or may not have taken effect, and
            // nothing runs a second time: every duplicate learns so.
            tracing::warn!(
                "an at-most-once claim lapsed before its work finished; settled as outcome unknown"
            );
            return match self
                .complete(record_key, token, outcome_unknown(), trail, "settled")
                .await
            {
                Completion::Fenced(fenced) => Err(OnceError::Fenced(fenced)),
                Completion::Recorded | Completion::Pending => Err(OnceError::OutcomeUnknown),
            };
        }
        let fence = CancellationToken::new();
        let context = IdempotencyContext::new(record_key.clone(), fingerprint, took_over)
            .with_fence(fence.clone());
        let work = match catch_unwind(AssertUnwindSafe(|| work(context))) {
            Ok(work) => work,
            Err(panic) => {
                self.release(&record_key, token).await;
                decide(trail, "released");
                resume_unwind(panic);
            }
        };
        let finished = self.run_renewing(&record_key, token, fence, work).await;
        let outcome = match finished {
            Ok(outcome) => outcome,
            Err(panic) => {
                self.release(&record_key, token).await;
                decide(trail, "released");
                resume_unwind(panic);
            }
        };
        let (record, result) = match outcome {
            Ok(output) => {
                let record = encode(0, &output).unwrap_or_else(|err| {
                    // It ran, but cannot be replayed: record that, so that
                    // a duplicate is told so and nothing runs again.
                    tracing::error!(error = %err, "at-most-once output does not serialise; recorded as unreadable");
                    unrecordable()
                });
                (record, Ok(output))
            }
            Err(err) => match record_error(&err) {
                Some(record) => {
                    let record = record.unwrap_or_else(|serialise| {
                        tracing::error!(error = %serialise, "at-most-once error does not serialise; recorded as unreadable");
                        unrecordable()
                    });
                    (record, Err(OnceError::Failed(Ok(err))))
                }
                None => {
                    self.release(&record_key, token).await;
                    decide(trail, "released");
                    return Err(OnceError::Failed(Ok(err)));
                }
            },
        };
        match self
            .complete(record_key, token, record, trail, "executed")
            .await
        {
            // Never `Ok` for work whose record another execution's replaced
            // or the store lost: its caller must know.
            Completion::Fenced(fenced) if result.is_ok() => Err(OnceError::Fenced(fenced)),
            _ => result,
        }
    }

    async fn bounded<V>(
        &self,
        op: impl Future<Output = Result<V, StoreError>>,
    ) -> Result<V, StoreError> {
        match timeout(self.store_timeout, op).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::unavailable(Unreadable(
                "the store did not answer within the store timeout",
            ))),
        }
    }

    /// Drives `work` to its end while a task of its own renews the lease
    /// every third of it (so work that blocks its thread does not stop the
    /// renewals on a multi-thread runtime), cancelling `fence` if a renewal
    /// is refused; catches a panic so that the key can be released first.
    async fn run_renewing<O>(
        &self,
        key: &RecordKey,
        token: Token,
        fence: CancellationToken,
        work: impl Future<Output = O>,
    ) -> Result<O, Box<dyn std::any::Any + Send>> {
        let renewals = tokio::spawn(renew_until_lost(
            self.store.clone(),
            key.clone(),
            token,
            self.lease,
            self.store_timeout,
            fence,
        ));
        /// Stops the renewals however the work ends.
        struct Stop(tokio::task::AbortHandle);
        impl Drop for Stop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _stop = Stop(renewals.abort_handle());
        // Let the renewals start (arm their timer) before the work: a task
        // spawned from a worker waits in that worker's own slot, where no
        // other worker takes it, and work that blocks this thread at once
        // would keep it there.
        tokio::task::yield_now().await;
        let mut work = pin!(work);
        std::future::poll_fn(
            |cx| match catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx))) {
                Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
                Ok(Poll::Pending) => Poll::Pending,
                Err(panic) => Poll::Ready(Err(panic)),
            },
        )
        .await
    }

    async fn release(&self, key: &RecordKey, token: Token) {
        if let Err(err) = self.bounded(self.store.release(key, token)).await {
            tracing::warn!(error = %err, "could not release an at-most-once claim; it ends with its lease");
        }
    }

    /// Records the output; on a store failure, keeps trying in the
    /// background (renewing the lease) until it lands, is fenced, or the
    /// completion retry limit passes. `decision` is the audit entry's when
    /// it lands.
    async fn complete(
        &self,
        key: RecordKey,
        token: Token,
        record: Bytes,
        trail: Option<Trail>,
        decision: &'static str,
    ) -> Completion {
        // The digest of what was recorded: the output's (or error's) JSON.
        let response = trail
            .as_ref()
            .map(|_| Sha256::digest(record.get(MAGIC.len() + 1..).unwrap_or_default()).into());
        let decide = move |decision: &'static str| {
            if let Some(trail) = trail {
                trail.record(decision, None, response);
            }
        };
        let first = self
            .bounded(self.store.complete(&key, token, record.clone(), self.ttl))
            .await;
        match self.landed(&key, &record, first).await {
            Some(Completion::Recorded) => {
                decide(decision);
                return Completion::Recorded;
            }
            Some(Completion::Fenced(fenced)) => {
                decide(if fenced.taken_over {
                    "fenced"
                } else {
                    "claim_lost"
                });
                return Completion::Fenced(fenced);
            }
            Some(Completion::Pending) | None => {}
        }
        tracing::warn!("could not record an at-most-once output; retrying in the background");
        let this = self.clone();
        let retry = async move {
            let give_up = far(this.completion_retry);
            let mut pause = Duration::from_millis(100);
            while Instant::now() < give_up {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                let _ = this
                    .bounded(this.store.renew(&key, token, this.lease))
                    .await;
                let attempt = this
                    .bounded(this.store.complete(&key, token, record.clone(), this.ttl))
                    .await;
                match this.landed(&key, &record, attempt).await {
                    Some(Completion::Recorded) => return decide(decision),
                    Some(Completion::Fenced(fenced)) => {
                        // Another run has the key: this output never lands,
                        // and `drain` must say so.
                        this.abandoned.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            taken_over = fenced.taken_over,
                            "an at-most-once output the store refused could not be recorded later: another run holds the key"
                        );
                        return decide(if fenced.taken_over {
                            "fenced"
                        } else {
                            "claim_lost"
                        });
                    }
                    Some(Completion::Pending) | None => {}
                }
            }
            this.abandoned.fetch_add(1, Ordering::Relaxed);
            tracing::error!("gave up recording an at-most-once output; the claim ends as lapsed");
            decide("abandoned");
        };
        self.completions.spawn(retry);
        Completion::Pending
    }

    /// What a completion attempt's answer means: `None` for a failure
    /// worth retrying. A refusal for the token is read back from the store,
    /// to tell an earlier attempt that landed from a claim that is lost.
    async fn landed(
        &self,
        key: &RecordKey,
        record: &Bytes,
        attempt: Result<(), StoreError>,
    ) -> Option<Completion> {
        match attempt {
            Ok(()) => Some(Completion::Recorded),
            Err(StoreError::Fenced) => {
                let peeked = self.bounded(self.store.peek(key)).await;
                let taken_over = match peeked {
                    Ok(Peeked::Completed { record: held }) if held == *record => {
                        return Some(Completion::Recorded);
                    }
                    Ok(Peeked::Absent) => false,
                    _ => true,
                };
                tracing::error!(
                    taken_over,
                    "an at-most-once output was not recorded: its claim was lost while the work ran"
                );
                Some(Completion::Fenced(Fenced {
                    record: record.clone(),
                    taken_over,
                }))
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not record an at-most-once output");
                None
            }
        }
    }
}

/// How a completion ended for the caller.
enum Completion {
    Recorded,
    Fenced(Fenced),
    /// Being retried in the background.
    Pending,
}

/// Renews an at-most-once claim every third of its lease until aborted;
/// a refused renewal cancels `fence` and ends it.
async fn renew_until_lost<St: Store>(
    store: St,
    key: RecordKey,
    token: Token,
    lease: Duration,
    store_timeout: Duration,
    fence: CancellationToken,
) {
    let every = lease / 3;
    loop {
        tokio::time::sleep(every).await;
        match timeout(store_timeout.min(every), store.renew(&key, token, lease)).await {
            Ok(Ok(())) => {}
            Ok(Err(StoreError::Fenced)) => {
                tracing::error!(
                    "an at-most-once claim was lost while its work ran (taken over, or gone from the store)"
                );
                fence.cancel();
                return;
            }
            Ok(Err(err)) => tracing::warn!(error = %err, "could not renew an at-most-once claim"),
            Err(_) => tracing::warn!("renewing an at-most-once claim timed out"),
        }
    }
}

/// `now + by`, or a century from now when that overflows.
fn far(by: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(by)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 60 * 60))
}

/// The fingerprint of an input: SHA-256 over a version tag and the input's
/// JSON in a canonical form of this crate's own (object members sorted by
/// name, numbers as RFC 8785 writes them), so map order never matters, no
/// two different inputs share one, and two inputs share one exactly when
/// they share an intent key (`10` and `10.0` are one number). Numbers
/// beyond ±(2^53 − 1) and NaN or infinite floats are refused, as intent
/// keys refuse them.
fn fingerprint<I: Serialize + ?Sized>(input: &I) -> Result<Fingerprint, IntentKeyError> {
    if crate::client::has_non_finite(input) {
        return Err(IntentKeyError::NonFinite);
    }
    let value = serde_json::to_value(input).map_err(IntentKeyError::Unserializable)?;
    crate::client::check_numbers(&value)?;
    let mut hasher = Sha256::new();
    hasher.update(b"tower-idempotency/once/v2\0");
    canonical(&value, &mut hasher);
    Ok(Fingerprint::from_bytes(hasher.finalize().into()))
}

/// Feeds `value` to `out` unambiguously: a type byte, then lengths before
/// every string, array and object, members sorted by name.
fn canonical(value: &serde_json::Value, out: &mut Sha256) {
    use serde_json::Value;
    let text = |out: &mut Sha256, s: &str| {
        out.update((s.len() as u64).to_be_bytes());
        out.update(s.as_bytes());
    };
    match value {
        Value::Null => out.update(b"n"),
        Value::Bool(b) => out.update(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            // As RFC 8785 writes it: `10.0` is `10`, as in an intent key.
            // Integers and the shortest round-trip decimals are unchanged.
            out.update(b"#");
            let jcs = serde_json_canonicalizer::to_string(&Value::Number(n.clone()));
            text(out, jcs.as_deref().unwrap_or("NaN"));
        }
        Value::String(s) => {
            out.update(b"s");
            text(out, s);
        }
        Value::Array(items) => {
            out.update(b"[");
            out.update((items.len() as u64).to_be_bytes());
            items.iter().for_each(|item| canonical(item, out));
        }
        Value::Object(members) => {
            out.update(b"{");
            out.update((members.len() as u64).to_be_bytes());
            let mut sorted: Vec<_> = members.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            for (name, member) in sorted {
                text(out, name);
                canonical(member, out);
            }
        }
    }
}
