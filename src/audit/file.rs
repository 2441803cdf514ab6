//! [`JsonlSink`]: a chain in a JSON Lines file.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use super::{AuditLine, AuditSink};

/// A chain in a JSON Lines file: one JSON object per line, entries and
/// signed checkpoints, appended in batches with one `fsync` per batch.
///
/// The file is locked while the sink is open, so a second writer on the same
/// file is refused. Opening a file whose last line was torn by a crash (it
/// does not end in a newline) cuts that partial line off, with a warning:
/// its batch was never acknowledged.
///
/// With [`with_max_bytes`](Self::with_max_bytes) or
/// [`with_max_age`](Self::with_max_age) the file is rotated: once it has
/// grown past the size (or been written for longer than the age), after a
/// batch that ends in a checkpoint, it is renamed `PATH.<last seq, 20
/// digits>` and a new `PATH` begins with a `continued` entry naming the
/// closed file's final checkpoint. `audit_verify OLDEST ... PATH` checks the
/// files as one chain.
#[derive(Debug)]
pub struct JsonlSink {
    path: PathBuf,
    file: Option<File>,
    len: u64,
    /// Bytes of a torn last line cut off when the tail was read.
    cut: u64,
    mode: u32,
    group: Option<u32>,
    max_bytes: Option<u64>,
    max_age: Option<std::time::Duration>,
    /// When the current file was begun (or opened).
    begun: std::time::Instant,
    /// The seq of the last line appended.
    last_seq: u64,
    /// The current file is empty and continues the files before it.
    continues: bool,
}

impl JsonlSink {
    /// Opens (or creates) the chain at `path` and locks it. A new file is
    /// readable and writable by its owner only (mode 0600 on Unix).
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::open_with(path.as_ref(), 0o600, None)
    }

    /// [`open`](Self::open), a new file readable by group `gid` too (mode
    /// 0640, owned by that group), for an auditor's account in that group.
    #[cfg(unix)]
    #[cfg_attr(docsrs, doc(cfg(unix)))]
    pub fn open_for_group(path: impl AsRef<Path>, gid: u32) -> io::Result<Self> {
        Self::open_with(path.as_ref(), 0o640, Some(gid))
    }

    fn open_with(path: &Path, mode: u32, group: Option<u32>) -> io::Result<Self> {
        let path = path.to_owned();
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
        #[cfg(not(unix))]
        let _ = mode;
        let created = !path.exists();
        let file = options.open(&path).map_err(|err| named(&path, err))?;
        #[cfg(unix)]
        if let (true, Some(gid)) = (created, group) {
            std::os::unix::fs::fchown(&file, None, Some(gid)).map_err(|err| named(&path, err))?;
        }
        #[cfg(not(unix))]
        let _ = (created, group);
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{}: another writer holds this audit chain; each instance needs a file of its own",
                        path.display()
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(err)) => return Err(named(&path, err)),
        }
        let len = file.metadata().map_err(|err| named(&path, err))?.len();
        Ok(JsonlSink {
            path,
            file: Some(file),
            len,
            cut: 0,
            mode,
            group,
            max_bytes: None,
            max_age: None,
            begun: std::time::Instant::now(),
            last_seq: 0,
            continues: false,
        })
    }

    /// Rotates the file once it holds `bytes` or more (at a batch's end).
    pub fn with_max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes.max(1));
        self
    }

    /// Rotates the file once it has been written for `age` (counted from
    /// when this sink opened or began it; at a batch's end).
    pub fn with_max_age(mut self, age: std::time::Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Whether a chain is kept at `path`: the file holds bytes, or closed
    /// files of a rotation lie beside it. Before making a signing key for a
    /// chain, check this: a chain is continued only with its own key.
    pub fn holds_chain(path: impl AsRef<Path>) -> bool {
        let path = path.as_ref();
        std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
            || Self::rotated_files(path).is_ok_and(|files| !files.is_empty())
    }

    /// The closed files beside `path` (`PATH.<20 digits>`), oldest first:
    /// with `path` last, the chain in order.
    pub fn rotated_files(path: impl AsRef<Path>) -> io::Result<Vec<PathBuf>> {
        let path = path.as_ref();
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Ok(Vec::new());
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let prefix = format!("{}.", name.to_string_lossy());
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(digits) = file.strip_prefix(&prefix)
                && digits.len() == 20
                && digits.bytes().all(|b| b.is_ascii_digit())
            {
                found.push(entry.path());
            }
        }
        found.sort();
        Ok(found)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs blocking file work off the async threads.
    async fn blocking<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut File, &mut u64, &Path) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("the audit file was lost in a failed write"))?;
        let (mut len, path) = (self.len, self.path.clone());
        let (file, len, result) = tokio::task::spawn_blocking(move || {
            let result = work(&mut file, &mut len, &path);
            (file, len, result)
        })
        .await
        .map_err(io::Error::other)?;
        self.file = Some(file);
        self.len = len;
        result
    }
}

/// The length of a file whose failed write could not be undone.
const POISONED: u64 = u64::MAX;

fn named(path: &Path, err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

impl AuditSink for JsonlSink {
    fn cut_bytes(&self) -> u64 {
        self.cut
    }

    fn rotation_due(&self) -> bool {
        self.len > 0
            && (self.max_bytes.is_some_and(|max| self.len >= max)
                || self.max_age.is_some_and(|age| self.begun.elapsed() >= age))
    }

    fn continues(&self) -> bool {
        self.continues
    }

    async fn rotate(&mut self) -> io::Result<()> {
        let mut closed = self.path.as_os_str().to_owned();
        closed.push(format!(".{:020}", self.last_seq));
        let closed = PathBuf::from(closed);
        let (mode, group) = (self.mode, self.group);
        let path = self.path.clone();
        let file = tokio::task::spawn_blocking(move || -> io::Result<File> {
            if closed.exists() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{}: a closed audit file of that name exists",
                        closed.display()
                    ),
                ));
            }
            std::fs::rename(&path, &closed).map_err(|err| named(&path, err))?;
            let mut options = OpenOptions::new();
            options.read(true).append(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
            let file = options.open(&path).map_err(|err| named(&path, err))?;
            #[cfg(unix)]
            if let Some(gid) = group {
                std::os::unix::fs::fchown(&file, None, Some(gid))
                    .map_err(|err| named(&path, err))?;
            }
            #[cfg(not(unix))]
            let _ = (mode, group);
            file.try_lock().map_err(|err| {
                named(
                    &path,
                    io::Error::other(format!("cannot lock the new file: {err}")),
                )
            })?;
            // The rename and the new name are durable before anything is
            // written into the new file.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir).and_then(|d| d.sync_all())?;
            }
            Ok(file)
        })
        .await
        .map_err(io::Error::other)??;
        // The old file's lock goes with its handle.
        self.file = Some(file);
        self.len = 0;
        self.begun = std::time::Instant::now();
        self.continues = true;
        Ok(())
    }

    async fn tail(&mut self) -> io::Result<Vec<String>> {
        let before = self.len;
        let tail = self
            .blocking(|file, len, path| {
                let (tail, whole) = read_tail(file, *len)?;
                if whole < *len {
                    tracing::warn!(
                        path = %path.display(),
                        bytes = *len - whole,
                        "the audit chain ends in a torn line (a write cut short); cutting it off"
                    );
                    file.set_len(whole)?;
                    file.sync_all()?;
                    *len = whole;
                }
                Ok(tail)
            })
            .await?;
        self.cut += before - self.len;
        let signed = tail.iter().any(|l| is_checkpoint(l));
        let previous = match signed {
            true => None,
            false => Self::rotated_files(&self.path)?.pop(),
        };
        let Some(previous) = previous else {
            self.last_seq = last_seq_of(&tail);
            return Ok(tail);
        };
        // After a rotation the chain's last checkpoint may still be the
        // closed file's: the new file holds nothing yet (the process
        // stopped before its first line, or a crash tore that line), or its
        // first batch lacks its checkpoint.
        let mut whole = tokio::task::spawn_blocking(move || {
            let mut file = File::open(&previous).map_err(|err| named(&previous, err))?;
            let len = file.metadata()?.len();
            let (tail, whole) = read_tail(&mut file, len)?;
            if whole < len {
                return Err(named(
                    &previous,
                    io::Error::other("a closed audit file ends in a torn line"),
                ));
            }
            Ok(tail)
        })
        .await
        .map_err(io::Error::other)??;
        // Nothing in the new file: the writer begins it with its
        // `continued` entry.
        self.continues = tail.is_empty();
        whole.extend(tail);
        self.last_seq = last_seq_of(&whole);
        Ok(whole)
    }

    async fn append(&mut self, lines: &[AuditLine]) -> io::Result<()> {
        let mut batch = Vec::with_capacity(lines.iter().map(|l| l.text.len() + 1).sum());
        for line in lines {
            batch.extend_from_slice(line.text.as_bytes());
            batch.push(b'\n');
        }
        let last_seq = lines.last().map(|l| l.seq);
        self.blocking(move |file, len, path| {
            if *len == POISONED {
                return Err(io::Error::other(format!(
                    "{}: a failed write could not be undone; the file needs checking before more is appended",
                    path.display()
                )));
            }
            // The file is this writer's alone: one that changed size
            // under it (truncated by a `copytruncate` rotation, appended to
            // by hand) is refused, never padded or overwritten.
            let actual = file.metadata()?.len();
            if actual != *len {
                return Err(io::Error::other(format!(
                    "{}: the file is {actual} bytes, this writer wrote {}: it was changed by someone else (a copytruncate rotation, an edit); appends stop until it is checked",
                    path.display(),
                    *len
                )));
            }
            let written = file.write_all(&batch).and_then(|()| file.sync_data());
            match written {
                Ok(()) => {
                    *len += batch.len() as u64;
                    Ok(())
                }
                Err(err) => {
                    // All or nothing: cut back what part of the batch landed.
                    if let Err(undo) = file.set_len(*len) {
                        tracing::error!(path = %path.display(), error = %undo, "could not undo a partial audit write; refusing further appends");
                        *len = POISONED;
                    }
                    Err(named(path, err))
                }
            }
        })
        .await?;
        if let Some(seq) = last_seq {
            self.last_seq = seq;
            self.continues = false;
        }
        Ok(())
    }
}

/// The most a writer reads back from a chain's end at start.
/// The `seq` of the last entry among `tail`'s lines (0 for none).
fn is_checkpoint(line: &str) -> bool {
    line.starts_with("{\"checkpoint\"")
}

fn last_seq_of(tail: &[String]) -> u64 {
    tail.iter()
        .rev()
        .filter(|l| !is_checkpoint(l))
        .find_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("seq")?
                .as_u64()
        })
        .unwrap_or(0)
}

const TAIL_LIMIT: u64 = 16 * 1024 * 1024;

/// Reads a file of `len` bytes backwards to the entry its last checkpoint
/// signs (the line before the last checkpoint line), and returns the lines
/// from there on (every line when there is no checkpoint) with the length
/// of the file's whole lines (shorter than `len` when the last line is
/// torn).
fn read_tail(file: &mut File, len: u64) -> io::Result<(Vec<String>, u64)> {
    let mut window = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        Read::by_ref(file).take(len - start).read_to_end(&mut buf)?;
        let whole = match buf.iter().rposition(|&b| b == b'\n') {
            Some(end) => start + end as u64 + 1,
            None if start == 0 => 0,
            None => {
                window *= 2;
                continue;
            }
        };
        let complete = &buf[..(whole - start) as usize];
        let mut lines: Vec<&[u8]> = complete.split(|&b| b == b'\n').collect();
        lines.pop();
        // The window's first line may be cut unless it starts the file.
        let first_whole = usize::from(start > 0);
        let is_checkpoint = |l: &&[u8]| l.starts_with(b"{\"checkpoint\"");
        // From the entry before the one the last checkpoint signs, so that
        // the writer can check the signed entry follows it.
        let last_checkpoint = lines.iter().rposition(|l| is_checkpoint(&&l[..]));
        let from = match last_checkpoint {
            None if start == 0 => Some(0),
            None => None,
            Some(at) => {
                let before = lines[..at.saturating_sub(1)]
                    .iter()
                    .rposition(|l| !is_checkpoint(l));
                match before {
                    Some(before) if before >= first_whole => Some(before),
                    None if start == 0 => Some(at.saturating_sub(1)),
                    _ => None,
                }
            }
        };
        let Some(from) = from else {
            if window >= TAIL_LIMIT {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the audit chain's last checkpoint is more than 16 MiB from its end: check it (audit_verify) before a writer continues it",
                ));
            }
            window *= 2;
            continue;
        };
        let tail = lines[from..]
            .iter()
            .map(|line| {
                String::from_utf8(line.to_vec()).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "an audit line is not UTF-8")
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        return Ok((tail, whole));
    }
}
