//! A tamper-evident audit chain of every decision (feature `audit`, on by
//! default).
//!
//! When a duplicated booking is disputed, the questions are whether both
//! requests carried the same key, whether the first had been answered before
//! the retry came, and the whole sequence of calls for that key. An
//! [`AuditLog`] given to [`IdempotencyLayer::with_audit`](crate::IdempotencyLayer::with_audit)
//! or [`AtMostOnce::with_audit`](crate::once::AtMostOnce::with_audit)
//! answers them: each decision becomes one entry, each entry is chained to
//! the one before by its hash, and the chain is signed with Ed25519 at
//! checkpoints.
//!
//! # An entry
//!
//! One JSON object per line, in RFC 8785 canonical form (members sorted, no
//! spaces):
//!
//! | member | when | what |
//! |---|---|---|
//! | `seq` | always | 1, 2, 3, ... per writer |
//! | `time` | always | when the decision was made, RFC 3339 UTC with milliseconds |
//! | `instance` | always | the writer's name |
//! | `decision` | always | see below |
//! | `duration_ms` | always | from the request's arrival (or the call's start) to the decision |
//! | `scope` | when known | SHA-256 of the scope (HMAC-SHA-256 with [`AuditBuilder::with_secret`]) |
//! | `key` | when known | SHA-256 of the key (HMAC-SHA-256 with the secret) |
//! | `fingerprint` | once the request was read | the request's fingerprint (HMAC-SHA-256 of it with the secret) |
//! | `status` | where a response was given | its HTTP status |
//! | `response_sha256` | `executed`, with the whole body | SHA-256 of the response body (for [`AtMostOnce`](crate::once::AtMostOnce), of the output's JSON); with the secret, HMAC-SHA-256 of that digest |
//! | `count` | `lost` | how many decisions had no entry |
//! | `prev` | always | the `hash` of the entry before (64 zeros for the first) |
//! | `hash` | always | SHA-256 of this line's canonical JSON without `hash` |
//!
//! Never the raw key, scope, body or credential. Without a secret, a client
//! finds its key's entries with `printf %s "$KEY" | sha256sum`.
//!
//! Decisions: `executed` (its record landed), `replayed`, each rejection by
//! its code (`missing_key`, `invalid_key`, `key_reused`,
//! `anonymous_request`, `request_in_flight`, `body_too_large`,
//! `body_unreadable`, `response_not_retained`, `store_unavailable`,
//! `audit_unavailable`), `taken_over` (a claim whose holder stopped
//! renewing was taken over; the execution's own entry follows), `fenced`
//! (the work ran but another claim had taken the key over, so its record
//! was refused), `released` (the key was freed for a retry: the handler
//! failed, or the record policy declined the response), `settled` (stopped
//! or cut short past the maximum execution time, or at a drain's deadline,
//! and recorded as such), `abandoned` (the work ran, but its record never
//! landed within the completion retry limit), `failed_open` (executed
//! unprotected, the store being down, by
//! [`with_fail_open`](crate::IdempotencyLayer::with_fail_open)), and
//! `lost` (decisions that found the queue full under
//! [`AuditFailure::Open`]), and `dropped` (the request ended before any
//! decision: its client went away while its body was read, or the caller
//! dropped an at-most-once call).
//!
//! # The tree and its checkpoints
//!
//! The entries' lines are the leaves of an RFC 6962 Merkle tree
//! ([`merkle`]). Every batch the writer makes durable ends with a line
//! `{"checkpoint":"<signed note>","peaks":[...]}` (and one follows every N
//! entries within a batch): the note is a C2SP `tlog-checkpoint` naming the
//! instance, the tree's size and root and the time, in a C2SP
//! `signed-note` with an Ed25519 signature (its text form is in
//! [`AuditSigner`]'s module docs and the README); `peaks` let a restarted
//! writer grow the tree on. A restart checks the last checkpoint with its
//! own key before it writes, and adopts entries found after it behind a
//! `resumed` entry that counts them.
//!
//! # Failure policy
//!
//! The writer takes entries from a bounded queue and appends them in
//! batches, each made durable before the next. By default
//! ([`AuditFailure::Closed`]) no request executes without room for its
//! entry: a keyed request reserves its place in the queue once its body is
//! read and before it claims its key, and when the queue is full, or the
//! sink is failing (or has not answered an append within
//! [`AuditBuilder::with_append_timeout`]), it is answered `503
//! audit-unavailable` and nothing runs. With
//! [`AuditFailure::Open`] it runs anyway, and the chain gets a `lost` entry
//! counting the decisions it missed.
//!
//! # What the chain proves, and what it does not
//!
//! With the public key, [`verify_file`] finds any changed, removed,
//! reordered or inserted entry, and a chain rewritten by someone without
//! the private key; entries after the last checkpoint or adopted at a
//! restart are reported as such, and [`verify_file_with`] holds a chain
//! against checkpoints kept elsewhere ([`Trust`]), so a chain cut back or
//! started again is a rollback. It does not prove that a decision was never
//! made: a writer holding the key can leave one out. An entry accepted into
//! the queue but not yet written when the process dies is lost with it.

mod checkpoint;
mod entry;
mod file;
pub mod merkle;
#[cfg(feature = "postgres")]
mod postgres;
mod receipt;
mod resume;
mod sink;
mod trail;
mod verify;

use std::{
    fmt, io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};

pub use checkpoint::{AuditKeyError, AuditSigner, AuditVerifier};
pub use file::JsonlSink;
#[cfg(feature = "postgres")]
pub use postgres::PostgresAuditSink;
pub(crate) use receipt::ReceiptSlot;
pub use receipt::{RECEIPT_HEADER, Receipt, ReceiptError, ReceiptProof};
pub use sink::{AuditLine, AuditSink, ChainTaken};
pub(crate) use trail::Trail;
pub use verify::{
    ChainBreak, HistoryEntry, KeyRotation, ReceiptFound, Trust, VerifiedChain, VerifyError,
    check_receipt, check_receipt_files, history, history_files_with, history_with, receipt_proof,
    verify_file, verify_file_with, verify_files_with, verify_lines, verify_lines_with,
};

use entry::{Hasher, Pending, render, valid_instance};

/// What a request does when its entry cannot be queued: the queue is
/// full, the sink is failing, or the log is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AuditFailure {
    /// Nothing executes without its entry: the request is answered `503
    /// audit-unavailable` (an [`AtMostOnce`](crate::once::AtMostOnce) call
    /// fails with `OnceError::AuditUnavailable`) before its key is claimed.
    #[default]
    Closed,
    /// The request goes on; the decisions without an entry are counted in a
    /// `lost` entry once the writer has room.
    Open,
}

/// Why an audit log could not start or close.
#[derive(Debug)]
#[non_exhaustive]
pub enum AuditError {
    /// An instance name must be 1 to 64 of ASCII letters, digits, `.`, `_`,
    /// `-` and `:`.
    InvalidInstance(String),
    /// The sink failed.
    Sink(io::Error),
    /// The chain the sink holds cannot be continued; says why.
    Chain(String),
    /// The log was closed already.
    Closed,
    /// Closing, the sink kept failing past the close timeout: these
    /// entries were not written.
    Unwritten {
        /// Lines not written.
        lines: usize,
        /// The sink's last error.
        error: io::Error,
    },
    /// The chain passed to another writer while this one ran (its sink
    /// said [`ChainTaken`]): from then on it refused every request
    /// (fail-closed) or ran them without entries (fail-open).
    Taken {
        /// Decisions that had, or asked for, a place in the chain and were
        /// not written: those queued when it was taken and every one after.
        unwritten: u64,
        /// What the sink found.
        error: io::Error,
    },
}

impl fmt::Display for AuditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuditError::InvalidInstance(name) => write!(
                f,
                "invalid audit instance name {name:?}: use 1 to 64 of ASCII letters, digits, `.`, `_`, `-` and `:`"
            ),
            AuditError::Sink(err) => write!(f, "audit sink: {err}"),
            AuditError::Chain(why) => {
                write!(f, "the stored audit chain cannot be continued: {why}")
            }
            AuditError::Closed => f.write_str("the audit log is closed"),
            AuditError::Unwritten { lines, error } => {
                write!(f, "{lines} audit lines were not written: {error}")
            }
            AuditError::Taken { unwritten, error } => {
                write!(f, "{error}; {unwritten} decisions were not written")
            }
        }
    }
}

impl std::error::Error for AuditError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AuditError::Sink(err)
            | AuditError::Unwritten { error: err, .. }
            | AuditError::Taken { error: err, .. } => Some(err),
            _ => None,
        }
    }
}

/// What a closed log wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditSummary {
    /// The chain's last `seq` (0 for an empty chain).
    pub seq: u64,
    /// Entries this writer appended.
    pub written: u64,
}

/// Configures and starts an [`AuditLog`]: see [`AuditLog::builder`].
///
/// Its `Debug` form leaves out the signing key and the secret.
#[must_use]
pub struct AuditBuilder {
    instance: String,
    signer: AuditSigner,
    every: u64,
    capacity: usize,
    batch: usize,
    failure: AuditFailure,
    secret: Option<Vec<u8>>,
    close_timeout: Duration,
    append_timeout: Duration,
    probe_interval: Duration,
    linger: Duration,
    receipts: bool,
}

impl fmt::Debug for AuditBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditBuilder")
            .field("instance", &self.instance)
            .field("signer", &self.signer)
            .field("every", &self.every)
            .field("capacity", &self.capacity)
            .field("batch", &self.batch)
            .field("failure", &self.failure)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("close_timeout", &self.close_timeout)
            .field("append_timeout", &self.append_timeout)
            .field("probe_interval", &self.probe_interval)
            .field("linger", &self.linger)
            .field("receipts", &self.receipts)
            .finish()
    }
}

impl AuditBuilder {
    /// How long the writer waits after the first entry of a batch for more
    /// to join it (default 5 ms): fewer, larger appends and `fsync`s under
    /// load. Requests never wait for it; an entry is at risk in a crash for
    /// this long longer.
    pub fn with_batch_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// A checkpoint after every `entries` entries within a batch (default
    /// 1000; at least 1). Every batch ends with a checkpoint too, so each
    /// append the sink makes durable is signed.
    pub fn with_checkpoints(mut self, entries: u64) -> Self {
        self.every = entries.max(1);
        self
    }

    /// Decisions waiting to be written, and requests running with a place
    /// reserved, at most (default 8192).
    pub fn with_queue_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Lines per append at most (default 512).
    pub fn with_batch_limit(mut self, lines: usize) -> Self {
        self.batch = lines.max(1);
        self
    }

    /// What a request does when its entry cannot be queued (default
    /// [`AuditFailure::Closed`]).
    pub fn with_failure_policy(mut self, failure: AuditFailure) -> Self {
        self.failure = failure;
        self
    }

    /// Hashes keys and scopes with HMAC-SHA-256 under `secret` instead of
    /// plain SHA-256, so that guessable keys cannot be found in the chain by
    /// trying them. Use the same secret as
    /// [`DefaultScope::with_secret`](crate::DefaultScope::with_secret).
    pub fn with_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.secret = Some(secret.as_ref().to_vec());
        self
    }

    /// How long [`AuditLog::close`] waits for running requests and a failing
    /// sink (default 10 s).
    pub fn with_close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// How long an append may go unanswered before the log counts as
    /// unhealthy (default 5 s; at least 1 ms): a sink that hangs rather
    /// than fails (a stalled disk, a paused database) then refuses requests
    /// under [`AuditFailure::Closed`] and shows in
    /// [`AuditLog::is_healthy`], until it answers.
    pub fn with_append_timeout(mut self, timeout: Duration) -> Self {
        self.append_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How long the writer may sit idle before it asks the sink whether it
    /// could still append ([`AuditSink::probe`]; default 1 s, at least
    /// 1 ms): a database session that ended while no request came (and
    /// with it the PostgreSQL sink's lock) shows as unhealthy, or as a
    /// chain taken by another writer, before the next request runs.
    pub fn with_probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Gives every response whose decision has a place in the chain an
    /// `Idempotency-Receipt` header ([`RECEIPT_HEADER`]): the log's signed
    /// word that the entry carrying the receipt's id is in the chain (see
    /// [`Receipt`]). Off by default; it costs an Ed25519 signature and
    /// about 400 header bytes per response.
    pub fn with_receipts(mut self) -> Self {
        self.receipts = true;
        self
    }

    /// Reads where `sink`'s chain ends, and starts the writer there, on the
    /// current tokio runtime.
    pub async fn start<S: AuditSink>(self, mut sink: S) -> Result<AuditLog, AuditError> {
        if !valid_instance(&self.instance) {
            return Err(AuditError::InvalidInstance(self.instance));
        }
        let tail = sink.tail().await.map_err(AuditError::Sink)?;
        let cut = sink.cut_bytes();
        let resumed = resume::check(&tail, &self.instance, &self.signer.verifier())
            .map_err(AuditError::Chain)?;
        let continuing = sink.continues();
        if continuing && (resumed.adopted > 0 || resumed.note.is_none()) {
            return Err(AuditError::Chain(
                "the closed file before the current one does not end in a checkpoint".into(),
            ));
        }
        if resumed.adopted > 0 {
            tracing::warn!(
                adopted = resumed.adopted,
                from_seq = resumed.seq - resumed.adopted + 1,
                "the audit chain holds entries after its last checkpoint (a crash before they were signed, or lines added since); continuing after a `resumed` entry that counts them, and the verifier reports them as adopted unsigned"
            );
        }
        let (tx, rx) = mpsc::channel(self.capacity);
        let state = Arc::new(State {
            healthy: AtomicBool::new(true),
            closing: AtomicBool::new(false),
            lost: AtomicU64::new(0),
            taken: AtomicBool::new(false),
            unwritten: AtomicU64::new(0),
            close: Notify::new(),
            rotation: Mutex::new(Ok(None)),
            rotate: Notify::new(),
            receipts: std::sync::RwLock::new(self.receipts.then(|| Arc::new(self.signer.clone()))),
        });
        let instance: Arc<str> = self.instance.into();
        let mut writer = Writer {
            sink,
            signer: self.signer,
            instance: instance.clone(),
            seq: resumed.seq,
            head: resumed.head,
            tree: resumed.tree,
            last: resumed.last,
            adopted: resumed.adopted,
            cut,
            after_crash: resumed.after_crash,
            abandoned: false,
            started: std::time::SystemTime::now(),
            last_note: resumed.note,
            continuing,
            since: 0,
            written: 0,
            every: self.every,
            batch: self.batch,
            close_timeout: self.close_timeout,
            append_timeout: self.append_timeout,
            probe_interval: self.probe_interval,
            linger: self.linger,
            state: state.clone(),
        };
        let mut receipt_prefix = [0u8; 8];
        if self.receipts {
            getrandom::fill(&mut receipt_prefix).map_err(|err| {
                AuditError::Sink(io::Error::other(format!(
                    "no random bytes for receipt ids: {err}"
                )))
            })?;
            // The run is in the chain before it gives a receipt: a crash
            // before its first batch is then still seen at the next start,
            // and a receipt is held to its run by the chain, not by clocks.
            writer.begin(receipt_prefix).await?;
        }
        let ended = Ended(state.clone());
        let task = tokio::spawn(async move {
            let _ended = ended;
            writer.run(rx).await
        });
        Ok(AuditLog {
            shared: Arc::new(Shared {
                tx,
                state,
                failure: self.failure,
                hasher: match self.secret {
                    Some(secret) => Hasher::keyed(&secret),
                    None => Hasher::Plain,
                },
                instance,
                receipts: self.receipts,
                receipt_prefix,
                receipt_count: AtomicU64::new(0),
                task: Mutex::new(Some(task)),
            }),
        })
    }
}

/// The writer of one audit chain: cheap to clone, shared by every layer and
/// [`AtMostOnce`](crate::once::AtMostOnce) that records into it.
///
/// ```
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_idempotency::{
///     IdempotencyLayer, MemoryStore,
///     audit::{AuditLog, AuditSigner, JsonlSink},
/// };
///
/// # let dir = std::env::temp_dir().join(format!("audit-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// let signer = AuditSigner::generate("booking-audit")?;
/// println!("audit public key: {}", signer.verifier());
/// let audit = AuditLog::builder("booking-api-1", signer)
///     .start(JsonlSink::open(dir.join("audit.jsonl"))?)
///     .await?;
/// let layer = IdempotencyLayer::new(MemoryStore::default()).with_audit(audit.clone());
/// // ... serve; then, after the server has drained:
/// audit.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("instance", &&*self.shared.instance)
            .field("failure", &self.shared.failure)
            .finish_non_exhaustive()
    }
}

struct Shared {
    tx: mpsc::Sender<Pending>,
    state: Arc<State>,
    failure: AuditFailure,
    hasher: Hasher,
    instance: Arc<str>,
    /// Whether responses get receipts.
    receipts: bool,
    /// Receipt ids: these random bytes, then a count.
    receipt_prefix: [u8; 8],
    receipt_count: AtomicU64,
    task: Mutex<Option<tokio::task::JoinHandle<Result<AuditSummary, AuditError>>>>,
}

/// What the writer and the requests share.
struct State {
    /// The last append succeeded.
    healthy: AtomicBool,
    closing: AtomicBool,
    /// Decisions that found no room, not yet written as a `lost` entry.
    lost: AtomicU64,
    /// The chain passed to another writer: this one writes nothing more.
    taken: AtomicBool,
    /// Decisions queued for the chain when it was taken, or after.
    unwritten: AtomicU64,
    close: Notify,
    /// A key rotation asked for, and who waits for it; `Err` once the
    /// writer has stopped.
    rotation: Mutex<Result<Option<Rotation>, ()>>,
    rotate: Notify,
    /// The key that signs receipts, when they are given: the writer's
    /// current key.
    receipts: std::sync::RwLock<Option<Arc<AuditSigner>>>,
}

/// Marks the writer stopped when its task ends, by returning or by a
/// panic: a rotation asked for is answered `Closed`, and the log is
/// unhealthy.
struct Ended(Arc<State>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.healthy.store(false, Ordering::Relaxed);
        let waiting = std::mem::replace(
            &mut *self
                .0
                .rotation
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            Err(()),
        );
        drop(waiting);
    }
}

/// A key rotation on its way to the writer.
struct Rotation {
    next: AuditSigner,
    done: tokio::sync::oneshot::Sender<Result<u64, AuditError>>,
}

impl AuditLog {
    /// A log for the writer named `instance` (one chain per instance:
    /// `[A-Za-z0-9._:-]{1,64}`), signing its checkpoints with `signer`.
    pub fn builder(instance: impl Into<String>, signer: AuditSigner) -> AuditBuilder {
        AuditBuilder {
            instance: instance.into(),
            signer,
            every: 1000,
            capacity: 8192,
            batch: 512,
            failure: AuditFailure::Closed,
            secret: None,
            close_timeout: Duration::from_secs(10),
            append_timeout: Duration::from_secs(5),
            probe_interval: Duration::from_secs(1),
            linger: Duration::from_millis(5),
            receipts: false,
        }
    }

    /// The writer's instance name.
    pub fn instance(&self) -> &str {
        &self.shared.instance
    }

    /// The hash a key has in this log's entries, as lowercase hex: what
    /// `audit_verify --history` takes.
    pub fn key_hash(&self, key: &str) -> String {
        let mut hex = String::with_capacity(64);
        crate::scope::push_hex(&mut hex, &self.shared.hasher.digest(key.as_bytes()));
        hex
    }

    /// Whether the last append (or idle probe) succeeded.
    pub fn is_healthy(&self) -> bool {
        self.shared.state.healthy.load(Ordering::Relaxed)
    }

    /// Decisions this log could not write because its chain passed to
    /// another writer ([`AuditError::Taken`]); 0 while the chain is its own.
    pub fn unwritten(&self) -> u64 {
        let state = &self.shared.state;
        if !state.taken.load(Ordering::SeqCst) {
            return 0;
        }
        state.unwritten.load(Ordering::Relaxed) + state.lost.load(Ordering::Relaxed)
    }

    /// Hands signing over to `next`: the writer appends a `key_rotated`
    /// entry naming `next`'s public key, then a checkpoint signed by both
    /// keys, and signs every later checkpoint (and receipt) with `next`
    /// alone. A verifier given the current key learns `next` from the
    /// chain; one that trusts only `next` cannot check what came before.
    /// Save `next` where the writer's key is loaded from before the next
    /// start: a restart continues the chain only with it. Returns the
    /// rotation entry's `seq` once it is durable.
    pub async fn rotate_key(&self, next: AuditSigner) -> Result<u64, AuditError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        {
            let mut slot = self
                .shared
                .state
                .rotation
                .lock()
                .expect("the rotation slot is never poisoned");
            match &*slot {
                Err(()) => return Err(AuditError::Closed),
                Ok(Some(_)) => {
                    return Err(AuditError::Chain(
                        "a key rotation is already under way".into(),
                    ));
                }
                Ok(None) if self.shared.state.closing.load(Ordering::SeqCst) => {
                    return Err(AuditError::Closed);
                }
                Ok(None) => *slot = Ok(Some(Rotation { next, done })),
            }
        }
        self.shared.state.rotate.notify_one();
        answer.await.unwrap_or(Err(AuditError::Closed))
    }

    /// Stops taking entries, writes those queued (waiting, up to the close
    /// timeout, for requests that reserved a place), appends a final
    /// checkpoint and stops the writer. Close after the server has drained.
    pub async fn close(&self) -> Result<AuditSummary, AuditError> {
        let task = self
            .shared
            .task
            .lock()
            .expect("the audit task slot is never poisoned")
            .take();
        let Some(task) = task else {
            return Err(AuditError::Closed);
        };
        self.shared.state.closing.store(true, Ordering::SeqCst);
        self.shared.state.close.notify_one();
        match task.await {
            // Refusals go on being counted after the writer stopped.
            Ok(Err(AuditError::Taken { error, .. })) => Err(AuditError::Taken {
                unwritten: self.unwritten(),
                error,
            }),
            Ok(closed) => closed,
            Err(err) => Err(AuditError::Sink(io::Error::other(err))),
        }
    }

    /// A place for a request's decisions, reserved now. `Err` under
    /// [`AuditFailure::Closed`] when there is none: the request must not
    /// run.
    pub(crate) fn trail(&self, scope: Option<&str>, key: Option<&str>) -> Result<Trail, ()> {
        let mut trail = self.loose_trail(scope, key);
        trail.reserve()?;
        Ok(trail)
    }

    /// A request's trail with no place reserved yet: its decision is
    /// written if there is room then ([`Trail::reserve`] takes a place).
    pub(crate) fn loose_trail(&self, scope: Option<&str>, key: Option<&str>) -> Trail {
        let hasher = &self.shared.hasher;
        let scope = scope.map(|s| hasher.digest(s.as_bytes()));
        let key = key.map(|k| hasher.digest(k.as_bytes()));
        Trail::new(self.clone(), None, scope, key, true)
    }

    /// An [`AtMostOnce`](crate::once::AtMostOnce) call's place, reserved
    /// now: like [`trail`](Self::trail), without a receipt.
    pub(crate) fn call_trail(&self, scope: &str, key: &str) -> Result<Trail, ()> {
        let hasher = &self.shared.hasher;
        let mut trail = Trail::new(
            self.clone(),
            None,
            Some(hasher.digest(scope.as_bytes())),
            Some(hasher.digest(key.as_bytes())),
            false,
        );
        trail.reserve()?;
        Ok(trail)
    }

    /// The key receipts are signed with now, with receipts on.
    pub(crate) fn receipt_signer(&self) -> Option<Arc<AuditSigner>> {
        self.shared
            .state
            .receipts
            .read()
            .expect("the receipt key is never poisoned")
            .clone()
    }

    /// A new receipt for a request about `key`, with receipts on.
    pub(crate) fn receipt_slot(&self, key: Option<[u8; 32]>) -> Option<Arc<ReceiptSlot>> {
        if !self.shared.receipts {
            return None;
        }
        let count = self.shared.receipt_count.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.shared.receipt_prefix);
        id[8..].copy_from_slice(&count.to_be_bytes());
        Some(ReceiptSlot::new(self.clone(), id, key))
    }

    pub(crate) fn reserve(&self) -> Result<Option<mpsc::OwnedPermit<Pending>>, ()> {
        let state = &self.shared.state;
        if !state.closing.load(Ordering::Relaxed)
            && state.healthy.load(Ordering::Relaxed)
            && let Ok(permit) = self.shared.tx.clone().try_reserve_owned()
        {
            return Ok(Some(permit));
        }
        match self.shared.failure {
            AuditFailure::Closed => {
                state.lost.fetch_add(1, Ordering::Relaxed);
                Err(())
            }
            AuditFailure::Open => Ok(None),
        }
    }

    /// Sends a decision: through its reserved place, or (without one) if
    /// there is room, else counted as lost.
    fn send(&self, permit: Option<mpsc::OwnedPermit<Pending>>, pending: Pending) {
        match permit {
            Some(permit) => {
                permit.send(pending);
            }
            None => {
                if self.shared.state.closing.load(Ordering::Relaxed)
                    || self.shared.tx.try_send(pending).is_err()
                {
                    self.shared.state.lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The task that owns the sink.
struct Writer<S> {
    sink: S,
    signer: AuditSigner,
    instance: Arc<str>,
    seq: u64,
    head: [u8; 32],
    /// The Merkle tree over every entry's line.
    tree: merkle::Tree,
    /// The leaf hash of the last entry.
    last: merkle::Hash,
    /// Entries found after the last checkpoint at start, still to be
    /// counted by a `resumed` entry.
    adopted: u64,
    /// Bytes of a torn last line the sink cut at start, for the same entry.
    cut: u64,
    /// The writer before this one stopped without closing the log: said in
    /// the same entry.
    after_crash: bool,
    /// Closing gave up on requests that still held a place: no `closed`
    /// entry, so the next start says the log was not closed.
    abandoned: bool,
    /// When this writer started: the time of its `resumed` entry, so that
    /// entry comes before every decision of its run in time too.
    started: std::time::SystemTime,
    /// The last checkpoint's note.
    last_note: Option<String>,
    /// The sink's current file is new after a rotation: its first entry is
    /// still to be the `continued` one.
    continuing: bool,
    /// Entries since the last checkpoint.
    since: u64,
    written: u64,
    every: u64,
    batch: usize,
    close_timeout: Duration,
    append_timeout: Duration,
    probe_interval: Duration,
    linger: Duration,
    state: Arc<State>,
}

impl<S: AuditSink> Writer<S> {
    async fn run(mut self, mut rx: mpsc::Receiver<Pending>) -> Result<AuditSummary, AuditError> {
        match self.serve(&mut rx).await {
            Err(AuditError::Taken { unwritten, error }) => {
                Err(self.taken(rx, unwritten, error).await)
            }
            served => served,
        }
    }

    /// The chain is another writer's: refuse every request from now on
    /// (the queue is closed), and count the decisions that were queued or
    /// still hold a place ([`AuditLog::close`] adds the refusals).
    async fn taken(
        &mut self,
        mut rx: mpsc::Receiver<Pending>,
        unwritten: u64,
        error: io::Error,
    ) -> AuditError {
        let state = &self.state;
        state.healthy.store(false, Ordering::Relaxed);
        state.unwritten.fetch_add(unwritten, Ordering::Relaxed);
        state.taken.store(true, Ordering::SeqCst);
        rx.close();
        tracing::error!(
            %error,
            unwritten,
            "the audit chain passed to another writer; this one writes nothing more: requests are refused (fail-closed) or run without entries (fail-open), and every decision is counted as unwritten"
        );
        let mut closing = state
            .closing
            .load(Ordering::SeqCst)
            .then(|| Instant::now() + self.close_timeout);
        loop {
            let next = match closing {
                None => tokio::select! {
                    biased;
                    () = state.close.notified() => {
                        closing = Some(Instant::now() + self.close_timeout);
                        continue;
                    }
                    next = rx.recv() => next,
                },
                Some(deadline) => tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .unwrap_or(None),
            };
            match next {
                Some(_) => {
                    state.unwritten.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
        AuditError::Taken {
            unwritten: state.unwritten.load(Ordering::Relaxed),
            error,
        }
    }

    /// What a start records, once, before its first decision: the
    /// `continued` entry of a rotation it finishes (signed at once, as after
    /// a rotation, so a `resumed` entry after it counts only what it
    /// adopted), and a `resumed` entry for what it adopted or cut, or for a
    /// chain not closed cleanly.
    fn start_entries(&mut self, lines: &mut Vec<AuditLine>) {
        if self.continuing {
            self.continued(lines);
            self.checkpoint(lines);
        }
        if self.adopted > 0 || self.cut > 0 || self.after_crash {
            let adopted = std::mem::take(&mut self.adopted);
            let cut = std::mem::take(&mut self.cut);
            let after_crash = std::mem::take(&mut self.after_crash);
            let mut resumed = Pending::resumed(adopted, cut, after_crash);
            resumed.time = self.started;
            self.entry(&resumed, lines);
        }
    }

    /// Writes, before the log serves, what a start records (a `continued`
    /// entry, a `resumed` one) and the run's `started` entry, signed and
    /// durable: one attempt, whose failure fails the start.
    async fn begin(&mut self, run: [u8; 8]) -> Result<(), AuditError> {
        let mut lines = Vec::new();
        self.start_entries(&mut lines);
        self.entry(&Pending::started(run), &mut lines);
        self.checkpoint(&mut lines);
        tokio::time::timeout(self.append_timeout, self.sink.append(&lines))
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the sink did not answer within the append timeout",
                ))
            })
            .map_err(AuditError::Sink)?;
        self.written += lines.iter().filter(|l| !l.checkpoint).count() as u64;
        self.continuing = false;
        Ok(())
    }

    async fn serve(
        &mut self,
        rx: &mut mpsc::Receiver<Pending>,
    ) -> Result<AuditSummary, AuditError> {
        let mut pending = Vec::with_capacity(self.batch);
        let mut lines = Vec::new();
        let mut closing: Option<Instant> = None;
        loop {
            let received = match closing {
                None => {
                    tokio::select! {
                        biased;
                        () = self.state.close.notified() => {
                            closing = Some(Instant::now() + self.close_timeout);
                            rx.close();
                            continue;
                        }
                        // A rotation waits for the entries queued before
                        // it (see the end of the loop); this only wakes an
                        // idle writer for it.
                        () = self.state.rotate.notified() => 0,
                        () = tokio::time::sleep(self.probe_interval) => {
                            self.probe().await?;
                            continue;
                        }
                        received = rx.recv_many(&mut pending, self.batch) => {
                            if received == 0 {
                                // Every handle is gone: close.
                                closing = Some(Instant::now() + self.close_timeout);
                            } else if received < self.batch && !self.linger.is_zero() {
                                // Let more join this batch: one append and
                                // one fsync for all of them.
                                tokio::time::sleep(self.linger).await;
                                while pending.len() < self.batch {
                                    match rx.try_recv() {
                                        Ok(more) => pending.push(more),
                                        Err(_) => break,
                                    }
                                }
                            }
                            received
                        }
                    }
                }
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, rx.recv_many(&mut pending, self.batch))
                        .await
                    {
                        Ok(received) => received,
                        Err(_) => {
                            tracing::error!(
                                "audit log closed with requests still holding a place; their entries are lost"
                            );
                            self.abandoned = true;
                            0
                        }
                    }
                }
            };
            self.start_entries(&mut lines);
            let lost = self.state.lost.swap(0, Ordering::Relaxed);
            if lost > 0 {
                self.entry(&Pending::lost(lost), &mut lines);
            }
            for decision in pending.drain(..) {
                self.entry(&decision, &mut lines);
                if self.since >= self.every {
                    self.checkpoint(&mut lines);
                }
            }
            let finishing = closing.is_some() && received == 0;
            if finishing && !self.abandoned {
                // Every entry with a place is written: the log closes
                // cleanly, and a later start can tell a crash from it.
                self.entry(&Pending::closed(), &mut lines);
            }
            // Every batch made durable ends signed: the unsigned tail after
            // a crash is at most the batch being written.
            if self.since > 0 {
                self.checkpoint(&mut lines);
            }
            if !lines.is_empty() {
                self.write(&mut lines, closing).await?;
            }
            // Not after the `closed` entry: the chain ends with it, and the
            // next start rotates.
            if self.sink.rotation_due() && !self.continuing && !finishing {
                self.rotate_file(&mut lines, closing).await?;
            }
            if closing.is_none() {
                self.rotate(&mut lines).await?;
            }
            if finishing {
                if let Err(err) = self.sink.close().await {
                    tracing::warn!(error = %err, "audit sink did not close cleanly");
                }
                return Ok(AuditSummary {
                    seq: self.seq,
                    written: self.written,
                });
            }
        }
    }

    fn entry(&mut self, pending: &Pending, lines: &mut Vec<AuditLine>) {
        let seq = self.seq + 1;
        let (text, hash) = render(pending, seq, &self.instance, &self.head);
        self.seq = seq;
        self.head = hash;
        self.last = merkle::leaf_hash(text.as_bytes());
        self.tree.push(self.last);
        self.since += 1;
        lines.push(AuditLine {
            seq,
            checkpoint: false,
            text,
        });
    }

    /// Writes a rotation asked for: its entry, a checkpoint both keys
    /// sign, then signs with the next key.
    async fn rotate(&mut self, lines: &mut Vec<AuditLine>) -> Result<(), AuditError> {
        let Ok(Some(Rotation { next, done })) = self
            .state
            .rotation
            .lock()
            .expect("the rotation slot is never poisoned")
            .as_mut()
            .map(Option::take)
        else {
            return Ok(());
        };
        let (current, upcoming) = (self.signer.verifier(), next.verifier());
        if current == upcoming {
            let _ = done.send(Err(AuditError::Chain(
                "the next key is the current one".into(),
            )));
            return Ok(());
        }
        // Receipts move to the next key before the rotation's time is
        // taken: every receipt the old key signs is from before it.
        {
            let mut receipts = self
                .state
                .receipts
                .write()
                .expect("the receipt key is never poisoned");
            if receipts.is_some() {
                *receipts = Some(Arc::new(next.clone()));
            }
        }
        self.entry(&Pending::rotated(upcoming.to_string()), lines);
        let seq = self.seq;
        self.checkpoint(lines);
        if let Some(mut line) = lines.pop() {
            line.text = self.cosigned(&line.text, &next);
            lines.push(line);
        }
        let written = self.write(lines, None).await;
        if written.is_ok() {
            self.signer = next;
            tracing::info!(seq, key = %upcoming, "audit signing key rotated");
        }
        let _ = done.send(
            written
                .as_ref()
                .map(|()| seq)
                .map_err(|err| AuditError::Sink(io::Error::other(err.to_string()))),
        );
        written
    }

    /// The `continued` entry that begins a file after a rotation.
    fn continued(&mut self, lines: &mut Vec<AuditLine>) {
        let note = self.last_note.clone().unwrap_or_default();
        let peaks = self
            .tree
            .peaks()
            .map(|p| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, p))
            .collect();
        self.continuing = false;
        self.entry(&Pending::continued(note, peaks), lines);
    }

    /// Closes the sink's file after its final checkpoint and begins the
    /// next with a `continued` entry (and its checkpoint). A sink that
    /// cannot rotate goes on in its file, and says so.
    async fn rotate_file(
        &mut self,
        lines: &mut Vec<AuditLine>,
        closing: Option<Instant>,
    ) -> Result<(), AuditError> {
        if let Err(error) = self.sink.rotate().await {
            tracing::error!(%error, "audit file rotation failed; writing on in the current file");
            return Ok(());
        }
        tracing::info!(seq = self.seq, "audit file rotated");
        self.continued(lines);
        self.checkpoint(lines);
        self.write(lines, closing).await
    }

    /// A checkpoint line with `next`'s signature added to its note.
    fn cosigned(&mut self, line: &str, next: &AuditSigner) -> String {
        let object: serde_json::Value =
            serde_json::from_str(line).expect("the writer's checkpoint line is JSON");
        let note = next.cosign(
            object["checkpoint"]
                .as_str()
                .expect("a checkpoint line holds its note"),
        );
        let line = checkpoint::line(&note, &self.tree);
        self.last_note = Some(note);
        line
    }

    fn checkpoint(&mut self, lines: &mut Vec<AuditLine>) {
        let note = self.signer.checkpoint(
            &self.instance,
            self.seq,
            &self.tree.root(),
            &self.last,
            std::time::SystemTime::now(),
        );
        let text = checkpoint::line(&note, &self.tree);
        self.last_note = Some(note);
        self.since = 0;
        lines.push(AuditLine {
            seq: self.seq,
            checkpoint: true,
            text,
        });
    }

    /// Asks an idle sink whether it could append now.
    async fn probe(&mut self) -> Result<(), AuditError> {
        match patient(&self.state, self.append_timeout, self.sink.probe()).await {
            Ok(()) => {
                if !self.state.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!("audit sink recovered");
                }
                Ok(())
            }
            Err(error) if ChainTaken::is(&error) => Err(AuditError::Taken {
                unwritten: 0,
                error,
            }),
            Err(error) => {
                if self.state.healthy.swap(false, Ordering::Relaxed) {
                    tracing::error!(%error, "audit sink failed its idle probe; requests are refused until it recovers (fail-closed) or run without entries (fail-open)");
                }
                Ok(())
            }
        }
    }

    /// Appends `lines`, trying again with a growing pause while the sink
    /// fails; when closing, until the close deadline.
    async fn write(
        &mut self,
        lines: &mut Vec<AuditLine>,
        closing: Option<Instant>,
    ) -> Result<(), AuditError> {
        let mut pause = Duration::from_millis(10);
        let mut closing = closing;
        loop {
            if closing.is_none() && self.state.closing.load(Ordering::SeqCst) {
                closing = Some(Instant::now() + self.close_timeout);
            }
            let appended = match closing {
                // Closing, a sink that never answers must not hold it.
                Some(deadline) => tokio::time::timeout_at(deadline, self.sink.append(lines))
                    .await
                    .unwrap_or_else(|_| {
                        Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the sink did not answer before the close timeout",
                        ))
                    }),
                None => patient(&self.state, self.append_timeout, self.sink.append(lines)).await,
            };
            match appended {
                Ok(()) => {
                    if !self.state.healthy.swap(true, Ordering::Relaxed) {
                        tracing::info!("audit sink recovered");
                    }
                    self.written += lines.iter().filter(|l| !l.checkpoint).count() as u64;
                    lines.clear();
                    return Ok(());
                }
                Err(error) if ChainTaken::is(&error) => {
                    return Err(AuditError::Taken {
                        unwritten: lines.iter().filter(|l| !l.checkpoint).count() as u64,
                        error,
                    });
                }
                Err(error) => {
                    if self.state.healthy.swap(false, Ordering::Relaxed) {
                        tracing::error!(%error, "audit sink failed; requests are refused until it recovers (fail-closed) or run without entries (fail-open)");
                    }
                    if closing.is_some_and(|deadline| Instant::now() + pause > deadline) {
                        return Err(AuditError::Unwritten {
                            lines: lines.len(),
                            error,
                        });
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Awaits a sink's call to its end (all or nothing), marking the log
/// unhealthy once it has not answered within `timeout`: a sink that hangs
/// rather than fails (a stalled disk, a paused database) then refuses
/// requests (fail-closed) or counts them (fail-open) rather than run them
/// while their entries wait.
async fn patient<T>(state: &State, timeout: Duration, call: impl Future<Output = T>) -> T {
    let mut call = std::pin::pin!(call);
    match tokio::time::timeout(timeout, call.as_mut()).await {
        Ok(answered) => answered,
        Err(_) => {
            if state.healthy.swap(false, Ordering::Relaxed) {
                tracing::error!(
                    timeout_ms = timeout.as_millis() as u64,
                    "audit sink has not answered within the append timeout; requests are refused until it does (fail-closed) or run without entries (fail-open)"
                );
            }
            call.await
        }
    }
}
