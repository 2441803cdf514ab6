//! Checking a chain: [`verify_file`], [`verify_lines`], [`history`].

use std::{
    fmt,
    io::{self, BufRead, Read as _},
    path::Path,
};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{
    AuditVerifier, Receipt, ReceiptError, ReceiptProof,
    checkpoint::{self, parse_hex32},
    entry::{GENESIS, valid_instance},
    merkle::{self, Tree},
};

/// What an intact chain holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifiedChain {
    /// Entries in the chain (in the files checked).
    pub entries: u64,
    /// The `seq` of the first entry checked: 1, or for a file after a
    /// rotation checked on its own, its `continued` entry's.
    pub first_seq: u64,
    /// Checkpoints in the chain.
    pub checkpoints: u64,
    /// The writer's instance (`None` for an empty chain).
    pub instance: Option<String>,
    /// The `seq` of the last entry a checkpoint covers; with a key, the last
    /// one a valid signature covers.
    pub signed_through: Option<u64>,
    /// Whether the checkpoints' signatures were checked (a key was given).
    pub signatures_checked: bool,
    /// The lines (first and last) of each run of entries a restarted
    /// writer found after its chain's last checkpoint and adopted unsigned,
    /// as its `resumed` entry counts them: a crash's unsigned batch, or
    /// lines added while no writer ran. Later checkpoints cover them, but
    /// nothing shows who wrote them.
    pub adopted: Vec<(u64, u64)>,
    /// The `resumed` entries (their line) whose writer's sink cut bytes of
    /// a torn last line before it started, and how many: a write a crash
    /// cut short, whose decisions may be missing.
    pub cut: Vec<(u64, u64)>,
    /// The lines (first and last) of the entries after the last
    /// checkpoint, if any: not (yet) signed.
    pub unsigned_lines: Option<(u64, u64)>,
    /// The Merkle tree's root over every entry.
    pub root: [u8; 32],
    /// The last checkpoint's note, as written.
    pub last_checkpoint: Option<String>,
    /// The line that ends the file without a newline: a write cut short by
    /// a crash (the writer cuts it off when it starts again). Not read as
    /// an entry.
    pub torn_line: Option<u64>,
    /// The key rotations, in order; with keys given, each was signed by
    /// the key before it, and the checkpoint after it by both.
    pub rotations: Vec<KeyRotation>,
}

/// A `key_rotated` entry of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyRotation {
    /// Its 1-based line.
    pub line: u64,
    /// Its `time`: receipts signed by the key before it are from before
    /// it.
    pub time: String,
    /// The key it handed signing to.
    pub key: AuditVerifier,
}

impl VerifiedChain {
    /// Entries after the last checkpoint: not (yet) signed.
    pub fn unsigned_tail(&self) -> u64 {
        let before = self.first_seq.saturating_sub(1);
        before + self.entries - self.signed_through.unwrap_or(before)
    }

    /// Every entry is signed by a checkpoint, and none was adopted unsigned
    /// at a restart.
    pub fn is_complete(&self) -> bool {
        self.unsigned_tail() == 0
            && self.adopted.is_empty()
            && self.cut.is_empty()
            && self.torn_line.is_none()
    }
}

/// What a chain is held against: the keys whose checkpoints count, the
/// checkpoints kept elsewhere it must be consistent with, and the instance
/// it must be.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Trust {
    keys: Vec<AuditVerifier>,
    checkpoints: Vec<Trusted>,
    instance: Option<String>,
}

/// A checkpoint kept elsewhere.
#[derive(Debug, Clone)]
struct Trusted {
    name: String,
    size: u64,
    root: [u8; 32],
}

impl Trust {
    /// Nothing trusted: the chain's form is checked, not who signed it.
    pub fn new() -> Self {
        Trust::default()
    }

    /// A key whose signature makes a checkpoint count (a chain signed by
    /// several keys over its life is held against all of them).
    pub fn with_key(mut self, key: AuditVerifier) -> Self {
        self.keys.push(key);
        self
    }

    /// A checkpoint note kept elsewhere (handed to a witness, saved by
    /// `audit_verify --latest-checkpoint`), under `name` for messages: the
    /// chain must hold its tree, so a chain cut back, emptied, rewritten or
    /// started again is a rollback. Its signature is checked against the
    /// keys given before it; the error says why it cannot be used.
    pub fn with_checkpoint(mut self, name: impl Into<String>, note: &str) -> Result<Self, String> {
        let name = name.into();
        let parsed = checkpoint::parse(note).map_err(|why| format!("{name}: {why}"))?;
        if self.keys.is_empty() {
            return Err(format!(
                "{name}: a trusted checkpoint needs a key to check it"
            ));
        }
        self.signed(&parsed)
            .map_err(|why| format!("{name}: {why}"))?;
        self.checkpoints.push(Trusted {
            name,
            size: parsed.size,
            root: parsed.root,
        });
        Ok(self)
    }

    /// The instance the chain must be.
    pub fn with_instance(mut self, instance: impl Into<String>) -> Self {
        self.instance = Some(instance.into());
        self
    }

    fn from_key(key: Option<&AuditVerifier>) -> Self {
        Trust {
            keys: key.into_iter().cloned().collect(),
            ..Trust::default()
        }
    }

    /// The keys given.
    pub(crate) fn keys(&self) -> &[AuditVerifier] {
        &self.keys
    }

    /// Checks `note` against every key: a valid signature by one, and no
    /// bad line by any.
    fn signed(&self, note: &checkpoint::Note) -> Result<(), &'static str> {
        signed_by_any(&self.keys, note)
    }
}

/// Checks `note` against `keys`: a valid signature by one, and no bad line
/// by any.
fn signed_by_any(keys: &[AuditVerifier], note: &checkpoint::Note) -> Result<(), &'static str> {
    checkpoint::signed_by_any(keys, &note.body, &note.signatures)
}

/// Where and why a chain is broken: the first bad line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// The 1-based line (for a rollback, the chain's last line).
    pub line: u64,
    /// What is wrong with it.
    pub reason: String,
    /// For a rollback: the name of the saved checkpoint the chain falls
    /// short of.
    pub checkpoint: Option<String>,
    /// When several files were checked as one chain: the file of the line.
    pub file: Option<String>,
}

impl fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.checkpoint, &self.file) {
            (Some(name), _) => write!(f, "{name}: {}", self.reason),
            (None, Some(file)) => write!(f, "{file} line {}: {}", self.line, self.reason),
            (None, None) => write!(f, "line {}: {}", self.line, self.reason),
        }
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
    /// signature) and it was not adopted unsigned at a restart.
    pub signed: bool,
    /// Whether a restarted writer found it after the chain's last
    /// checkpoint and adopted it unsigned (see [`VerifiedChain::adopted`]).
    pub adopted: bool,
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
            if self.adopted {
                " (adopted unsigned at a restart: nothing shows who wrote it)"
            } else if self.signed {
                ""
            } else {
                " (not yet signed)"
            },
        )
    }
}

/// A file after the first that does not begin as a rotation begins one.
const NOT_CONTINUED: &str = "a file after the first does not begin with a `continued` entry naming the previous file's final checkpoint";

/// The running check of a chain, one line at a time.
struct Checker<'k> {
    trust: &'k Trust,
    line: u64,
    seq: u64,
    head: [u8; 32],
    tree: Tree,
    /// The leaf hash of the last entry.
    last: [u8; 32],
    checkpoints: u64,
    instance: Option<String>,
    signed_through: Option<u64>,
    /// The lines of the entries since the last checkpoint.
    since: Option<(u64, u64)>,
    adopted: Vec<(u64, u64)>,
    cut: Vec<(u64, u64)>,
    last_checkpoint: Option<String>,
    /// The keys whose signature makes the next checkpoint count: those
    /// trusted, until a rotation hands signing to the key it names.
    signers: Vec<AuditVerifier>,
    /// A rotation, until the checkpoint after it.
    next_key: Option<KeyRotation>,
    rotations: Vec<KeyRotation>,
    /// The next line begins a file.
    file_start: bool,
    /// Entries before the first one checked (a file after a rotation).
    base: u64,
    /// The root of the tree before the first entry checked, when a file
    /// after a rotation begins the chain.
    base_root: Option<[u8; 32]>,
}

impl<'k> Checker<'k> {
    fn new(trust: &'k Trust) -> Self {
        Checker {
            trust,
            line: 0,
            seq: 0,
            head: GENESIS,
            tree: Tree::new(),
            last: [0; 32],
            checkpoints: 0,
            instance: None,
            signed_through: None,
            since: None,
            adopted: Vec::new(),
            cut: Vec::new(),
            last_checkpoint: None,
            signers: trust.keys.clone(),
            next_key: None,
            rotations: Vec::new(),
            file_start: true,
            base: 0,
            base_root: None,
        }
    }

    /// Checks the next line; an entry is returned.
    fn line(&mut self, text: &str) -> Result<Option<Map<String, Value>>, ChainBreak> {
        self.line += 1;
        let at = self.line;
        let broken = |reason: String| ChainBreak {
            line: at,
            reason,
            checkpoint: None,
            file: None,
        };
        let value: Value =
            serde_json::from_str(text).map_err(|err| broken(format!("not JSON: {err}")))?;
        let Value::Object(object) = value else {
            return Err(broken("not a JSON object".into()));
        };
        let starting = std::mem::take(&mut self.file_start);
        if object.contains_key("checkpoint") {
            if starting && self.seq > 0 {
                return Err(broken(NOT_CONTINUED.into()));
            }
            self.checkpoint(text, &object)
                .map_err(|r| broken(r.into()))?;
            return Ok(None);
        }
        let entry = parse_entry(text, object).map_err(broken)?;
        if entry.object.get("decision").and_then(Value::as_str) == Some("continued") {
            match (starting, self.seq) {
                (true, 0) if entry.seq != 1 => self.begin_after(&entry).map_err(broken)?,
                (true, seq) if seq > 0 => {
                    let named = entry
                        .object
                        .get("previous_checkpoint")
                        .and_then(Value::as_str);
                    if named != self.last_checkpoint.as_deref() || self.unsigned() > 0 {
                        return Err(broken(
                            "the `continued` entry does not name the previous file's final checkpoint"
                                .into(),
                        ));
                    }
                }
                _ => {
                    return Err(broken(
                        "a `continued` entry that does not begin a file after a rotation".into(),
                    ));
                }
            }
        } else if starting && self.seq > 0 {
            return Err(broken(NOT_CONTINUED.into()));
        }
        if let Some(wanted) = &self.trust.instance
            && *wanted != entry.instance
        {
            return Err(broken(format!(
                "an entry of instance `{}`, not `{wanted}`",
                entry.instance
            )));
        }
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
        if entry.object.get("decision").and_then(Value::as_str) == Some("resumed") {
            let counted = entry
                .object
                .get("count")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let after = self.unsigned();
            if counted != after {
                return Err(broken(format!(
                    "a `resumed` entry counts {counted} entries adopted after the last checkpoint, but {after} follow it"
                )));
            }
            // A rotation no checkpoint signed before the restart did not
            // happen: its entry is adopted unsigned like the rest, and the
            // writer signs on with the key it had.
            self.next_key = None;
            if let Some(run) = self.since.take() {
                self.adopted.push(run);
            }
            if let Some(cut) = entry.object.get("cut_bytes").and_then(Value::as_u64) {
                self.cut.push((at, cut));
            }
        }
        if entry.object.get("decision").and_then(Value::as_str) == Some("key_rotated") {
            let next: AuditVerifier = entry
                .object
                .get("next_key")
                .and_then(Value::as_str)
                .and_then(|k| k.parse().ok())
                .ok_or_else(|| broken("a `key_rotated` entry without a valid `next_key`".into()))?;
            if self.next_key.is_some() {
                return Err(broken(
                    "a second key rotation before the first was signed".into(),
                ));
            }
            let time = entry
                .object
                .get("time")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            self.next_key = Some(KeyRotation {
                line: at,
                time,
                key: next,
            });
        }
        self.seq = entry.seq;
        self.head = entry.hash;
        self.last = merkle::leaf_hash(text.as_bytes());
        self.tree.push(self.last);
        for trusted in &self.trust.checkpoints {
            if trusted.size == self.tree.size() && trusted.root != self.tree.root() {
                return Err(broken(format!(
                    "the first {} entries are not those checkpoint {} signed: the chain was rewritten or started again",
                    trusted.size, trusted.name
                )));
            }
        }
        self.since = Some(match self.since {
            Some((first, _)) => (first, at),
            None => (at, at),
        });
        Ok(Some(entry.object))
    }

    /// Starts a lone file after a rotation from its `continued` entry:
    /// the previous file's final checkpoint (signed by a trusted key) and
    /// its tree's peaks.
    fn begin_after(&mut self, entry: &Parsed) -> Result<(), String> {
        let text = entry
            .object
            .get("previous_checkpoint")
            .and_then(Value::as_str)
            .ok_or("a `continued` entry without its `previous_checkpoint`")?;
        let note =
            checkpoint::parse(text).map_err(|why| format!("its previous checkpoint: {why}"))?;
        if note.instance != entry.instance || note.size + 1 != entry.seq {
            return Err(format!(
                "its previous checkpoint signs {} entries of `{}`, but it is entry {} of `{}`",
                note.size, note.instance, entry.seq, entry.instance
            ));
        }
        let tree = entry
            .object
            .get("peaks")
            .and_then(checkpoint::peaks)
            .and_then(|peaks| Tree::from_peaks(note.size, &peaks))
            .filter(|tree| tree.root() == note.root)
            .ok_or("its `peaks` do not grow its previous checkpoint's root")?;
        if !self.trust.keys.is_empty() {
            signed_by_any(&self.signers, &note)
                .map_err(|why| format!("its previous checkpoint: {why}"))?;
        }
        self.seq = note.size;
        self.base = note.size;
        self.base_root = Some(note.root);
        self.head = entry.prev;
        self.tree = tree;
        self.last = note.last;
        self.signed_through = Some(note.size);
        self.last_checkpoint = Some(text.to_owned());
        Ok(())
    }

    /// Entries since the last checkpoint (or the start).
    fn unsigned(&self) -> u64 {
        self.seq - self.signed_through.unwrap_or(0)
    }

    fn checkpoint(&mut self, text: &str, object: &Map<String, Value>) -> Result<(), &'static str> {
        let (Some(Value::String(note)), Some(peaks), 2) = (
            object.get("checkpoint"),
            object.get("peaks").and_then(checkpoint::peaks),
            object.len(),
        ) else {
            return Err(
                "a checkpoint line holds two members: `checkpoint` (a string) and `peaks` (base64 hashes)",
            );
        };
        if canonical(object) != text {
            return Err("checkpoint line is not in canonical form: it was changed");
        }
        let parsed = checkpoint::parse(note)?;
        if self
            .instance
            .as_deref()
            .is_some_and(|i| i != parsed.instance)
        {
            return Err("checkpoint of another instance");
        }
        if self.seq == 0 {
            return Err("checkpoint before any entry");
        }
        if self.signed_through == Some(self.seq) {
            return Err("a second checkpoint of the same entries: a duplicated line");
        }
        if parsed.size != self.seq || parsed.root != self.tree.root() || parsed.last != self.last {
            return Err(
                "checkpoint does not sign the entries before it: entries were changed, removed or added",
            );
        }
        if !peaks.iter().eq(self.tree.peaks()) {
            return Err("checkpoint's peaks are not those of the tree it signs");
        }
        if let Some(rotation) = self.next_key.take() {
            let next = &rotation.key;
            if !self.trust.keys.is_empty() {
                // The rotation is the old key's word, and the new key's
                // signature shows the new key accepted it.
                signed_by_any(&self.signers, &parsed)?;
                if next.signs(&parsed) != checkpoint::Signed::Valid {
                    return Err(
                        "the checkpoint after a key rotation is not signed by the key it names",
                    );
                }
                self.signers = vec![next.clone()];
            }
            self.rotations.push(rotation);
        } else if !self.trust.keys.is_empty() {
            signed_by_any(&self.signers, &parsed)?;
        }
        self.checkpoints += 1;
        self.signed_through = Some(self.seq);
        self.since = None;
        self.last_checkpoint = Some(note.clone());
        Ok(())
    }

    fn finish(self) -> Result<VerifiedChain, ChainBreak> {
        if let Some(trusted) = self
            .trust
            .checkpoints
            .iter()
            .filter(|t| t.size > self.seq)
            .max_by_key(|t| t.size)
        {
            return Err(ChainBreak {
                line: self.line,
                reason: format!(
                    "this saved checkpoint signed {} entries, the chain holds {}: it was rolled back",
                    trusted.size, self.seq
                ),
                checkpoint: Some(trusted.name.clone()),
                file: None,
            });
        }
        if let Some(trusted) = self
            .trust
            .checkpoints
            .iter()
            // One of the very size the files begin after is held by the
            // first file's `continued` entry.
            .filter(|t| {
                self.base > 0
                    && (t.size < self.base
                        || (t.size == self.base && Some(t.root) != self.base_root))
            })
            .min_by_key(|t| t.size)
        {
            // Its tree lies in files before the first one given: nothing
            // here shows this chain holds it.
            return Err(ChainBreak {
                line: 1,
                reason: format!(
                    "this saved checkpoint signed {} entries, and the files given begin at seq {}: the files that held them are missing",
                    trusted.size,
                    self.base + 1
                ),
                checkpoint: Some(trusted.name.clone()),
                file: None,
            });
        }
        if !self.trust.keys.is_empty() && self.seq > 0 && self.signed_through.is_none() {
            let keys: Vec<String> = self.trust.keys.iter().map(ToString::to_string).collect();
            return Err(ChainBreak {
                line: self.line,
                reason: format!(
                    "no checkpoint signed by {} in the chain: it cannot be shown to come from its writer",
                    keys.join(" or ")
                ),
                checkpoint: None,
                file: None,
            });
        }
        Ok(VerifiedChain {
            entries: self.seq - self.base,
            first_seq: self.base + 1,
            checkpoints: self.checkpoints,
            instance: self.instance,
            signed_through: self.signed_through,
            signatures_checked: !self.trust.keys.is_empty(),
            adopted: self.adopted,
            cut: self.cut,
            unsigned_lines: self.since,
            root: self.tree.root(),
            last_checkpoint: self.last_checkpoint,
            torn_line: None,
            rotations: self.rotations,
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

impl Parsed {
    /// The entry's members.
    pub(crate) fn object(&self) -> &Map<String, Value> {
        &self.object
    }
}

pub(crate) fn canonical(object: &Map<String, Value>) -> String {
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
/// checkpoints' signatures too. Without a key, the hash chain, the tree and
/// the checkpoints' form are checked, not who signed them.
pub fn verify_lines<I>(lines: I, key: Option<&AuditVerifier>) -> Result<VerifiedChain, ChainBreak>
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    verify_lines_with(lines, &Trust::from_key(key))
}

/// Checks a chain given as lines against `trust`: its keys, its saved
/// checkpoints, its instance.
pub fn verify_lines_with<I>(lines: I, trust: &Trust) -> Result<VerifiedChain, ChainBreak>
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    let mut checker = Checker::new(trust);
    for line in lines {
        checker.line(line.as_ref())?;
    }
    checker.finish()
}

/// The longest line a chain holds (an entry is about 400 bytes, a
/// checkpoint with its peaks about 3 KiB): a longer one is refused before
/// it is read whole.
pub(crate) const LINE_LIMIT: u64 = 64 * 1024;

/// Walks a chain file, line by line, handing each entry to `each`.
fn walk(
    path: &Path,
    trust: &Trust,
    each: impl FnMut(u64, &str, Map<String, Value>),
) -> Result<VerifiedChain, VerifyError> {
    walk_files(&[path], trust, each)
}

/// Walks the files of one chain in order (the closed files of a rotation,
/// then the current one), line by line.
fn walk_files(
    paths: &[&Path],
    trust: &Trust,
    mut each: impl FnMut(u64, &str, Map<String, Value>),
) -> Result<VerifiedChain, VerifyError> {
    let mut checker = Checker::new(trust);
    let several = paths.len() > 1;
    for (index, path) in paths.iter().enumerate() {
        let last_file = index + 1 == paths.len();
        checker.line = 0;
        checker.file_start = true;
        let name = several.then(|| path.display().to_string());
        let in_file = |mut broken: ChainBreak| {
            broken.file.clone_from(&name);
            VerifyError::Broken(broken)
        };
        let file = std::fs::File::open(path).map_err(VerifyError::Io)?;
        let mut reader = io::BufReader::new(file);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let read = (&mut reader)
                .take(LINE_LIMIT + 1)
                .read_until(b'\n', &mut buf)
                .map_err(VerifyError::Io)?;
            if read == 0 {
                break;
            }
            let at = checker.line + 1;
            let broken = |reason: String| ChainBreak {
                line: at,
                reason,
                checkpoint: None,
                file: None,
            };
            if read as u64 > LINE_LIMIT {
                return Err(in_file(broken(format!(
                    "a line longer than {} KiB: no line its writer writes is",
                    LINE_LIMIT / 1024
                ))));
            }
            let Some(body) = buf.strip_suffix(b"\n") else {
                // Only the last line can lack its newline: a write cut short.
                if !last_file {
                    return Err(in_file(broken("a closed file ends in a torn line".into())));
                }
                let mut chain = checker.finish().map_err(in_file)?;
                chain.torn_line = Some(at);
                return Ok(chain);
            };
            let text =
                std::str::from_utf8(body).map_err(|_| in_file(broken("not UTF-8".into())))?;
            if let Some(entry) = checker.line(text).map_err(in_file)? {
                each(at, text, entry);
            }
        }
        if !last_file && checker.unsigned() > 0 {
            return Err(in_file(broken_at(
                checker.line,
                "a closed file does not end in a checkpoint",
            )));
        }
    }
    checker.finish().map_err(VerifyError::Broken)
}

fn broken_at(line: u64, reason: &str) -> ChainBreak {
    ChainBreak {
        line,
        reason: reason.to_owned(),
        checkpoint: None,
        file: None,
    }
}

/// Checks the files of one chain in order, oldest first (the closed files
/// of a rotation, `PATH.<seq>`, then `PATH`; see
/// [`JsonlSink::rotated_files`](super::JsonlSink::rotated_files)): each
/// file after the first must begin with a `continued` entry naming the
/// final checkpoint of the one before.
pub fn verify_files_with<P: AsRef<Path>>(
    paths: &[P],
    trust: &Trust,
) -> Result<VerifiedChain, VerifyError> {
    let paths: Vec<&Path> = paths.iter().map(AsRef::as_ref).collect();
    walk_files(&paths, trust, |_, _, _| {})
}

/// Checks the chain in the JSON Lines file at `path`; see [`verify_lines`].
pub fn verify_file(
    path: impl AsRef<Path>,
    key: Option<&AuditVerifier>,
) -> Result<VerifiedChain, VerifyError> {
    verify_file_with(path, &Trust::from_key(key))
}

/// Checks the chain in the JSON Lines file at `path` against `trust`.
pub fn verify_file_with(
    path: impl AsRef<Path>,
    trust: &Trust,
) -> Result<VerifiedChain, VerifyError> {
    walk(path.as_ref(), trust, |_, _, _| {})
}

/// Checks the chain at `path`, then lists, in order, the decisions about
/// the key whose hash starts with `key_hash` (lowercase hex, at least 8
/// digits): what a dispute about one key needs.
pub fn history(
    path: impl AsRef<Path>,
    key_hash: &str,
    key: Option<&AuditVerifier>,
) -> Result<(VerifiedChain, Vec<HistoryEntry>), VerifyError> {
    history_with(path, key_hash, &Trust::from_key(key))
}

/// [`history`], with the chain held against `trust`.
pub fn history_with(
    path: impl AsRef<Path>,
    key_hash: &str,
    trust: &Trust,
) -> Result<(VerifiedChain, Vec<HistoryEntry>), VerifyError> {
    history_files_with(&[path], key_hash, trust)
}

/// [`history_with`] over the files of one chain, oldest first (see
/// [`verify_files_with`]).
pub fn history_files_with<P: AsRef<Path>>(
    paths: &[P],
    key_hash: &str,
    trust: &Trust,
) -> Result<(VerifiedChain, Vec<HistoryEntry>), VerifyError> {
    let paths: Vec<&Path> = paths.iter().map(AsRef::as_ref).collect();
    let wanted = key_hash.to_ascii_lowercase();
    let mut found = Vec::new();
    let chain = walk_files(&paths, trust, |line, _, entry| {
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
            adopted: false,
        });
    })?;
    let through = chain.signed_through.unwrap_or(0);
    for entry in &mut found {
        entry.adopted = chain
            .adopted
            .iter()
            .any(|(first, last)| (*first..=*last).contains(&entry.line));
        entry.signed = entry.seq <= through && !entry.adopted;
    }
    Ok((chain, found))
}

/// Where a chain holds a receipt's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReceiptFound {
    /// The entry's 1-based line.
    pub line: u64,
    /// Its `seq`.
    pub seq: u64,
    /// Its `decision`.
    pub decision: String,
    /// Whether a checkpoint signs it and it was not adopted unsigned at a
    /// restart.
    pub signed: bool,
}

/// Checks the chain at `path` against `trust`, then holds it to
/// `receipt`: the outer `Err` is the chain's own break; the inner one says
/// why the receipt does not stand (not signed by the trusted keys, its
/// entry missing or different).
pub fn check_receipt(
    path: impl AsRef<Path>,
    trust: &Trust,
    receipt: &Receipt,
) -> Result<(VerifiedChain, Result<ReceiptFound, ReceiptError>), VerifyError> {
    check_receipt_files(&[path], trust, receipt)
}

/// [`check_receipt`] over the files of one chain, oldest first (see
/// [`verify_files_with`]).
pub fn check_receipt_files<P: AsRef<Path>>(
    paths: &[P],
    trust: &Trust,
    receipt: &Receipt,
) -> Result<(VerifiedChain, Result<ReceiptFound, ReceiptError>), VerifyError> {
    let paths: Vec<&Path> = paths.iter().map(AsRef::as_ref).collect();
    let (chain, found, _) = locate(&paths, trust, receipt, false)?;
    Ok((chain, found.map(|(found, _)| found)))
}

/// The evidence for `receipt` that needs no log: its entry's line, the
/// last checkpoint of the chain at `path` (checked against `trust`), and
/// the entry's inclusion proof in that checkpoint's tree.
pub fn receipt_proof(
    path: impl AsRef<Path>,
    trust: &Trust,
    receipt: &Receipt,
) -> Result<ReceiptProof, ReceiptError> {
    let (chain, found, leaves) = locate(&[path.as_ref()], trust, receipt, true)
        .map_err(|err| ReceiptError::Broken(format!("the chain does not verify: {err}")))?;
    if chain.first_seq != 1 {
        return Err(ReceiptError::Broken(format!(
            "the file begins after a rotation (at seq {}): a proof is drawn from a chain that begins at seq 1",
            chain.first_seq
        )));
    }
    let (found, entry) = found?;
    if !found.signed {
        return Err(ReceiptError::Broken(format!(
            "line {}: the receipt's entry is not signed by a checkpoint yet",
            found.line
        )));
    }
    let (Some(checkpoint), Some(size)) = (chain.last_checkpoint, chain.signed_through) else {
        return Err(ReceiptError::Broken("the chain has no checkpoint".into()));
    };
    let size = usize::try_from(size).expect("a chain read into memory fits");
    let proof = merkle::inclusion_proof(found.seq - 1, &leaves[..size])
        .expect("a signed entry is in the signed tree");
    Ok(ReceiptProof {
        entry,
        checkpoint,
        proof,
    })
}

type Located = (
    VerifiedChain,
    Result<(ReceiptFound, String), ReceiptError>,
    Vec<merkle::Hash>,
);

fn locate(
    paths: &[&Path],
    trust: &Trust,
    receipt: &Receipt,
    keep_leaves: bool,
) -> Result<Located, VerifyError> {
    let mut leaves = Vec::new();
    let mut found: Option<(u64, u64, String, String)> = None;
    let mut differs: Option<String> = None;
    // The writer's runs end with a `closed` entry, or with the `resumed`
    // entry of the next run after a crash: every such marker, in order.
    let mut markers: Vec<(u64, u64, bool, String)> = Vec::new();
    // The entries of the receipt's own run (receipt ids begin with the
    // run's random prefix): the last one's seq.
    let prefix = &receipt.id()[..16];
    // The entries carrying a receipt of the run: line and seq.
    let mut run_entries: Vec<(u64, u64)> = Vec::new();
    // The run's `started` entry: its line and seq.
    let mut run_start: Option<(u64, u64)> = None;
    let chain = walk_files(paths, trust, |line, text, entry| {
        if keep_leaves {
            leaves.push(merkle::leaf_hash(text.as_bytes()));
        }
        let seq = entry.get("seq").and_then(Value::as_u64).unwrap_or(0);
        let decision = entry.get("decision").and_then(Value::as_str);
        let crash = decision == Some("resumed")
            && entry.get("after").and_then(Value::as_str) == Some("crash");
        if crash || decision == Some("closed") {
            let time = entry.get("time").and_then(Value::as_str).unwrap_or("");
            markers.push((line, seq, crash, time.to_owned()));
        }
        if entry
            .get("receipt")
            .and_then(Value::as_str)
            .is_some_and(|id| id.starts_with(prefix))
        {
            run_entries.push((line, seq));
        }
        if decision == Some("started")
            && entry.get("run").and_then(Value::as_str) == Some(prefix)
            && run_start.is_none()
        {
            run_start = Some((line, seq));
        }
        if differs.is_some() {
            return;
        }
        match receipt.matches(&entry) {
            Ok(false) => {}
            Ok(true) if found.is_some() => {
                differs = Some(format!(
                    "line {line}: a second entry carries the receipt's id: an entry was duplicated"
                ));
            }
            Ok(true) => {
                let seq = entry.get("seq").and_then(Value::as_u64).unwrap_or(0);
                let decision = entry
                    .get("decision")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                found = Some((line, seq, decision, text.to_owned()));
            }
            Err(why) => differs = Some(format!("line {line}: {why}")),
        }
    })?;
    let verdict = (|| {
        receipt_signed(receipt, trust.keys(), &chain.rotations)?;
        if let Some(instance) = &chain.instance
            && *instance != receipt.instance()
        {
            return Err(ReceiptError::Broken(format!(
                "the receipt was issued by instance `{}`, the chain is `{instance}`'s",
                receipt.instance()
            )));
        }
        if let Some(why) = differs {
            return Err(ReceiptError::Broken(why));
        }
        // Only the writer's own word counts: an entry or marker its
        // checkpoints sign, never one found after them or adopted unsigned.
        let signed = |line: u64, seq: u64| {
            seq <= chain.signed_through.unwrap_or(0)
                && !chain
                    .adopted
                    .iter()
                    .any(|(first, last)| (*first..=*last).contains(&line))
        };
        // Where the receipt's run is in the chain: from its signed
        // `started` entry, else from its last signed entry with a receipt.
        let after = run_start
            .filter(|(line, seq)| signed(*line, *seq))
            .map(|(_, seq)| seq)
            .into_iter()
            .chain(
                run_entries
                    .iter()
                    .filter(|(line, seq)| signed(*line, *seq))
                    .map(|(_, seq)| *seq),
            )
            .max();
        let ended = match after {
            // The marker that ends the receipt's run, in chain order.
            Some(last) => markers
                .iter()
                .find(|(line, seq, _, _)| *seq > last && signed(*line, *seq)),
            // No entry of its run is in the files given: by time.
            None => markers.iter().find(|(line, seq, _, time)| {
                time.as_str() >= receipt.time() && signed(*line, *seq)
            }),
        }
        .map(|(line, seq, crash, _)| (*line, *seq, *crash));
        let Some((line, seq, decision, text)) = found else {
            let id = receipt.id();
            // The entry may be in the files before the first one given.
            if chain.first_seq > 1 {
                return Err(ReceiptError::Unwritten(format!(
                    "no entry in the files given carries receipt {id}; they begin at seq {} (after a rotation): give the closed files before them too",
                    chain.first_seq
                )));
            }
            return Err(match ended {
                Some((line, _, true)) => ReceiptError::Unwritten(format!(
                    "no entry carries receipt {id}: the writer stopped without closing the log after it was issued, and line {line} records the restart; its entry was lost in that stop (a crash, or a kill)"
                )),
                None => ReceiptError::Unwritten(format!(
                    "no entry carries receipt {id} yet: the log has not been closed since it was issued (its writer still runs, or stopped and has not started again); the entry may still come, or have been lost in a stop the next start records"
                )),
                Some((line, _, false)) => ReceiptError::Broken(format!(
                    "no entry carries receipt {id}: the decision it promises is not in the chain, and the log was closed after it at line {line} with every entry written (left out or removed)"
                )),
            });
        };
        let signed = signed(line, seq);
        // An entry its run could never have written: after the run closed.
        if let Some((closed, closed_seq, false)) = ended
            && !signed
            && seq > closed_seq
        {
            return Err(ReceiptError::Broken(format!(
                "line {line} carries the receipt, unsigned, after its run closed the log at line {closed}: it was added"
            )));
        }
        Ok((
            ReceiptFound {
                line,
                seq,
                decision,
                signed,
            },
            text,
        ))
    })();
    Ok((chain, verdict, leaves))
}

/// Checks that `receipt` was signed by a key that signed for the log when
/// it was issued: a trusted key until the first rotation, each rotation's
/// key until the next. Keys learned from the chain count only when the
/// chain's checkpoints were checked against trusted keys.
fn receipt_signed(
    receipt: &Receipt,
    trusted: &[AuditVerifier],
    rotations: &[KeyRotation],
) -> Result<(), ReceiptError> {
    if trusted.is_empty() {
        return Err(ReceiptError::Forged);
    }
    let mut periods: Vec<(&[AuditVerifier], Option<&str>)> =
        vec![(trusted, rotations.first().map(|r| r.time.as_str()))];
    for (i, rotation) in rotations.iter().enumerate() {
        let until = rotations.get(i + 1).map(|r| r.time.as_str());
        periods.push((std::slice::from_ref(&rotation.key), until));
    }
    let mut signed_by_one = false;
    for (keys, until) in periods {
        if receipt.verify(keys).is_ok() {
            signed_by_one = true;
            // Times are RFC 3339 in one form: they compare as text.
            if until.is_none_or(|until| receipt.time() <= until) {
                return Ok(());
            }
        }
    }
    Err(if signed_by_one {
        ReceiptError::Broken(
            "the receipt is signed by a key the log had handed on before the receipt's time: a retired key cannot vouch for later decisions".into(),
        )
    } else {
        ReceiptError::Forged
    })
}
