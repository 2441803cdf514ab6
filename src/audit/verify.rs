//! Checking a chain: [`verify_file`], [`verify_lines`], [`history`].

use std::{
    fmt,
    io::{self, BufRead},
    path::Path,
};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{
    AuditVerifier,
    checkpoint::{self, parse_hex32},
    entry::{GENESIS, valid_instance},
};

/// What an intact chain holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifiedChain {
    /// Entries in the chain.
    pub entries: u64,
    /// Checkpoints in the chain.
    pub checkpoints: u64,
    /// The writer's instance (`None` for an empty chain).
    pub instance: Option<String>,
    /// The `seq` of the last entry a checkpoint covers; with a key, the last
    /// one a valid signature covers.
    pub signed_through: Option<u64>,
    /// Whether the checkpoints' signatures were checked (a key was given).
    pub signatures_checked: bool,
}

impl VerifiedChain {
    /// Entries after the last checkpoint: not (yet) signed.
    pub fn unsigned_tail(&self) -> u64 {
        self.entries - self.signed_through.unwrap_or(0)
    }
}

/// Where and why a chain is broken: the first bad line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// The 1-based line.
    pub line: u64,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for ChainBreak {}

/// Why [`verify_file`] gave no verdict, or its verdict.
#[derive(Debug)]
#[non_exhaustive]
pub enum VerifyError {
    /// The file could not be read.
    Io(io::Error),
    /// The chain is broken.
    Broken(ChainBreak),
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyError::Io(err) => write!(f, "cannot read the chain: {err}"),
            VerifyError::Broken(broken) => broken.fmt(f),
        }
    }
}

impl std::error::Error for VerifyError {}

/// One decision of a chain, as [`history`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryEntry {
    /// The 1-based line of the entry.
    pub line: u64,
    /// The entry's `seq`.
    pub seq: u64,
    /// Its `time`.
    pub time: String,
    /// Its `decision`.
    pub decision: String,
    /// Its `status`, where a response was given.
    pub status: Option<u16>,
    /// Its `duration_ms`.
    pub duration_ms: u64,
    /// Its hashed `scope`.
    pub scope: Option<String>,
    /// Its `fingerprint`.
    pub fingerprint: Option<String>,
    /// Whether a checkpoint after it signs it (with a key: a valid
    /// signature).
    pub signed: bool,
}

impl fmt::Display for HistoryEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.status.map_or("-".to_owned(), |s| s.to_string());
        let dash = "-".to_owned();
        write!(
            f,
            "line {} seq {} {} {} status {} {} ms scope {} fingerprint {}{}",
            self.line,
            self.seq,
            self.time,
            self.decision,
            status,
            self.duration_ms,
            self.scope.as_ref().unwrap_or(&dash),
            self.fingerprint.as_ref().unwrap_or(&dash),
            if self.signed { "" } else { " (not yet signed)" },
        )
    }
}

/// The running check of a chain, one line at a time.
struct Checker<'k> {
    key: Option<&'k AuditVerifier>,
    line: u64,
    seq: u64,
    head: [u8; 32],
    checkpoints: u64,
    instance: Option<String>,
    signed_through: Option<u64>,
}

impl<'k> Checker<'k> {
    fn new(key: Option<&'k AuditVerifier>) -> Self {
        Checker {
            key,
            line: 0,
            seq: 0,
            head: GENESIS,
            checkpoints: 0,
            instance: None,
            signed_through: None,
        }
    }

    /// Checks the next line; an entry is returned.
    fn line(&mut self, text: &str) -> Result<Option<Map<String, Value>>, ChainBreak> {
        self.line += 1;
        let at = self.line;
        let broken = |reason: String| ChainBreak { line: at, reason };
        let value: Value =
            serde_json::from_str(text).map_err(|err| broken(format!("not JSON: {err}")))?;
        let Value::Object(object) = value else {
            return Err(broken("not a JSON object".into()));
        };
        if object.contains_key("checkpoint") {
            self.checkpoint(text, &object)
                .map_err(|r| broken(r.into()))?;
            return Ok(None);
        }
        let entry = parse_entry(text, object).map_err(broken)?;
        match &self.instance {
            None => self.instance = Some(entry.instance.clone()),
            Some(instance) if *instance != entry.instance => {
                return Err(broken(format!(
                    "an entry of instance `{}` in the chain of `{instance}`",
                    entry.instance
                )));
            }
            Some(_) => {}
        }
        if entry.seq != self.seq + 1 {
            return Err(broken(if self.seq == 0 {
                format!(
                    "the chain starts at seq {}, not 1: its start is missing",
                    entry.seq
                )
            } else {
                format!(
                    "seq {} follows seq {}: an entry is missing, moved or inserted",
                    entry.seq, self.seq
                )
            }));
        }
        if entry.prev != self.head {
            return Err(broken(
                "prev is not the hash of the entry before: an entry is missing, moved or inserted"
                    .into(),
            ));
        }
        self.seq = entry.seq;
        self.head = entry.hash;
        Ok(Some(entry.object))
    }

    fn checkpoint(&mut self, text: &str, object: &Map<String, Value>) -> Result<(), &'static str> {
        let (Some(Value::String(note)), 1) = (object.get("checkpoint"), object.len()) else {
            return Err("a checkpoint line holds one string member, `checkpoint`");
        };
        if canonical(object) != text {
            return Err("checkpoint line is not in canonical form: it was changed");
        }
        let note = checkpoint::parse(note)?;
        if self.instance.as_deref().is_some_and(|i| i != note.instance) {
            return Err("checkpoint of another instance");
        }
        if self.seq == 0 {
            return Err("checkpoint before any entry");
        }
        if note.seq != self.seq || note.head != self.head {
            return Err(
                "checkpoint does not sign the entry before it: entries were changed, removed or added",
            );
        }
        if let Some(key) = self.key {
            key.check(&note)?;
        }
        self.checkpoints += 1;
        self.signed_through = Some(self.seq);
        Ok(())
    }

    fn finish(self) -> Result<VerifiedChain, ChainBreak> {
        if let Some(key) = self.key
            && self.seq > 0
            && self.signed_through.is_none()
        {
            return Err(ChainBreak {
                line: self.line,
                reason: format!(
                    "no checkpoint signed by {key} in the chain: it cannot be shown to come from its writer"
                ),
            });
        }
        Ok(VerifiedChain {
            entries: self.seq,
            checkpoints: self.checkpoints,
            instance: self.instance,
            signed_through: self.signed_through,
            signatures_checked: self.key.is_some(),
        })
    }
}

/// An entry line, checked on its own.
pub(crate) struct Parsed {
    pub(crate) seq: u64,
    pub(crate) prev: [u8; 32],
    pub(crate) hash: [u8; 32],
    pub(crate) instance: String,
    object: Map<String, Value>,
}

fn canonical(object: &Map<String, Value>) -> String {
    serde_json_canonicalizer::to_string(object).expect("a parsed JSON object serialises")
}

/// Checks one entry line: its members, its canonical form, and that its
/// `hash` covers it.
pub(crate) fn parse_entry(text: &str, mut object: Map<String, Value>) -> Result<Parsed, String> {
    if canonical(&object) != text {
        return Err("entry is not in canonical form: it was changed".into());
    }
    let hex = |object: &Map<String, Value>, name: &str| {
        object
            .get(name)
            .and_then(Value::as_str)
            .and_then(parse_hex32)
            .ok_or_else(|| format!("entry has no `{name}` of 64 lowercase hex digits"))
    };
    let hash = hex(&object, "hash")?;
    let prev = hex(&object, "prev")?;
    let seq = object
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or("entry has no numeric `seq`")?;
    for name in ["decision", "time"] {
        if !object.get(name).is_some_and(Value::is_string) {
            return Err(format!("entry has no `{name}`"));
        }
    }
    if !object.get("duration_ms").is_some_and(Value::is_u64) {
        return Err("entry has no numeric `duration_ms`".into());
    }
    let instance = object
        .get("instance")
        .and_then(Value::as_str)
        .filter(|i| valid_instance(i))
        .ok_or("entry has no valid `instance`")?
        .to_owned();
    let stated = object.remove("hash");
    let digest: [u8; 32] = Sha256::digest(canonical(&object).as_bytes()).into();
    if digest != hash {
        return Err("hash does not match the entry: it was changed".into());
    }
    if let Some(stated) = stated {
        object.insert("hash".into(), stated);
    }
    Ok(Parsed {
        seq,
        prev,
        hash,
        instance,
        object,
    })
}

/// Checks a chain given as lines (without their newlines), with `key` the
/// checkpoints' signatures too. Without a key, the hash chain and the
/// checkpoints' form are checked, not who signed them.
pub fn verify_lines<I>(lines: I, key: Option<&AuditVerifier>) -> Result<VerifiedChain, ChainBreak>
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    let mut checker = Checker::new(key);
    for line in lines {
        checker.line(line.as_ref())?;
    }
    checker.finish()
}

/// Walks a chain file, line by line, handing each entry to `each`.
fn walk(
    path: &Path,
    key: Option<&AuditVerifier>,
    mut each: impl FnMut(u64, Map<String, Value>),
) -> Result<VerifiedChain, VerifyError> {
    let file = std::fs::File::open(path).map_err(VerifyError::Io)?;
    let mut reader = io::BufReader::new(file);
    let mut checker = Checker::new(key);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = reader
            .read_until(b'\n', &mut buf)
            .map_err(VerifyError::Io)?;
        if read == 0 {
            break;
        }
        let at = checker.line + 1;
        let broken = |reason: &str| {
            VerifyError::Broken(ChainBreak {
                line: at,
                reason: reason.to_owned(),
            })
        };
        let Some(body) = buf.strip_suffix(b"\n") else {
            return Err(broken(
                "the last line does not end: the chain was truncated mid-line",
            ));
        };
        let text = std::str::from_utf8(body).map_err(|_| broken("not UTF-8"))?;
        if let Some(entry) = checker.line(text).map_err(VerifyError::Broken)? {
            each(at, entry);
        }
    }
    checker.finish().map_err(VerifyError::Broken)
}

/// Checks the chain in the JSON Lines file at `path`; see [`verify_lines`].
pub fn verify_file(
    path: impl AsRef<Path>,
    key: Option<&AuditVerifier>,
) -> Result<VerifiedChain, VerifyError> {
    walk(path.as_ref(), key, |_, _| {})
}

/// Checks the chain at `path`, then lists, in order, the decisions about
/// the key whose hash starts with `key_hash` (lowercase hex, at least 8
/// digits): what a dispute about one key needs.
pub fn history(
    path: impl AsRef<Path>,
    key_hash: &str,
    key: Option<&AuditVerifier>,
) -> Result<(VerifiedChain, Vec<HistoryEntry>), VerifyError> {
    let wanted = key_hash.to_ascii_lowercase();
    let mut found = Vec::new();
    let chain = walk(path.as_ref(), key, |line, entry| {
        let matches = entry
            .get("key")
            .and_then(Value::as_str)
            .is_some_and(|k| k.starts_with(&wanted));
        if !matches {
            return;
        }
        let text = |name: &str| entry.get(name).and_then(Value::as_str).map(str::to_owned);
        found.push(HistoryEntry {
            line,
            seq: entry.get("seq").and_then(Value::as_u64).unwrap_or(0),
            time: text("time").unwrap_or_default(),
            decision: text("decision").unwrap_or_default(),
            status: entry
                .get("status")
                .and_then(Value::as_u64)
                .and_then(|s| u16::try_from(s).ok()),
            duration_ms: entry
                .get("duration_ms")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            scope: text("scope"),
            fingerprint: text("fingerprint"),
            signed: false,
        });
    })?;
    let through = chain.signed_through.unwrap_or(0);
    for entry in &mut found {
        entry.signed = entry.seq <= through;
    }
    Ok((chain, found))
}
