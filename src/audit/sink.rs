//! Where a chain's lines go: the [`AuditSink`] trait.

use std::{error::Error, fmt, future::Future, io};

/// One line of a chain as a sink stores it: an entry, or a signed
/// checkpoint after the entry of the same `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditLine {
    pub(crate) seq: u64,
    pub(crate) checkpoint: bool,
    pub(crate) text: String,
}

impl AuditLine {
    /// The entry's sequence number; for a checkpoint, that of the entry it
    /// signs.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether this is a signed checkpoint rather than an entry.
    pub fn is_checkpoint(&self) -> bool {
        self.checkpoint
    }

    /// The line's text: one JSON object, without a newline.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Durable storage for one writer's chain.
///
/// The writer calls it from one task, one call at a time. Two rules make a
/// sink correct:
///
/// - [`append`](Self::append) is all or nothing. When it returns `Ok`, the
///   lines are durable, in order, after those before them. When it returns
///   an error, the writer offers the same lines again (from the same
///   `seq`), so a partial write must be undone or recognised.
/// - Only one writer appends to a chain: a sink should refuse a second one
///   (the file sink locks its file, the PostgreSQL sink takes an advisory
///   lock per instance). A sink that finds, after it started, that the
///   chain is no longer its writer's (its lock went with its session and
///   another writer holds it, or rows it did not write follow its own)
///   fails with [`ChainTaken`] (see [`ChainTaken::error`]): the writer then
///   stops for good, refusing requests and counting what it cannot write.
pub trait AuditSink: Send + 'static {
    /// The end of the chain already stored, as lines in order: from the
    /// entry the last checkpoint signs (that entry, the checkpoint line,
    /// and every line after it); the whole chain when it holds no
    /// checkpoint; nothing for a new chain. A writer checks it and
    /// continues the chain from it.
    fn tail(&mut self) -> impl Future<Output = io::Result<Vec<String>>> + Send;

    /// Bytes of a torn last line (a write a crash cut short) this sink
    /// removed when it read its [`tail`](Self::tail): the writer records
    /// them in its `resumed` entry, so nothing is cut unseen. 0 by default.
    fn cut_bytes(&self) -> u64 {
        0
    }

    /// Stores `lines` durably and in order; see the trait's rules.
    fn append(&mut self, lines: &[AuditLine]) -> impl Future<Output = io::Result<()>> + Send;

    /// Checks, while the writer is idle, that the sink could append now:
    /// an error marks the log unhealthy before any request runs (a
    /// [`ChainTaken`] stops it). Called after each idle probe interval;
    /// does nothing by default.
    fn probe(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        async { Ok(()) }
    }

    /// Whether the sink wants its current file closed and a new one begun
    /// (it reached its size or age): asked after every append that ends
    /// in a checkpoint. Never, by default.
    fn rotation_due(&self) -> bool {
        false
    }

    /// Closes the current file, whose last line is a checkpoint, and begins
    /// an empty one; the writer starts it with a `continued` entry naming
    /// that checkpoint. Unsupported by default.
    fn rotate(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        async {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this audit sink does not rotate",
            ))
        }
    }

    /// Whether the current file holds nothing yet while the chain goes on
    /// in the files before it (a rotation the process did not finish):
    /// then [`tail`](Self::tail) is the previous file's, and the writer
    /// begins this one with a `continued` entry. False by default.
    fn continues(&self) -> bool {
        false
    }

    /// Called once, after the writer's last append: release what the sink
    /// holds (a lock). Does nothing by default.
    fn close(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        async { Ok(()) }
    }
}

/// The chain a sink holds has passed to another writer: see [`AuditSink`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainTaken(pub String);

impl ChainTaken {
    /// This as an [`io::Error`], what a sink returns.
    pub fn error(why: impl Into<String>) -> io::Error {
        io::Error::other(ChainTaken(why.into()))
    }

    /// Whether `error` says the chain was taken.
    pub fn is(error: &io::Error) -> bool {
        error
            .get_ref()
            .is_some_and(|inner| inner.is::<ChainTaken>())
    }
}

impl fmt::Display for ChainTaken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the audit chain is no longer this writer's: {}", self.0)
    }
}

impl Error for ChainTaken {}
