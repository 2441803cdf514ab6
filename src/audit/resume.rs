//! What a writer checks before it continues a chain it finds.

use serde_json::{Map, Value};

use super::{
    AuditVerifier,
    checkpoint::{self, peaks},
    entry::GENESIS,
    merkle::{self, Tree},
    verify::{Parsed, canonical, parse_entry},
};

/// Where a chain found at start ends.
pub(crate) struct Resumed {
    pub(crate) seq: u64,
    pub(crate) head: [u8; 32],
    pub(crate) tree: Tree,
    /// The leaf hash of the last entry.
    pub(crate) last: merkle::Hash,
    /// Entries after the last checkpoint, adopted unsigned.
    pub(crate) adopted: u64,
    /// The last checkpoint's note.
    pub(crate) note: Option<String>,
    /// The chain holds entries and its last is not `closed`: the writer
    /// before stopped without closing it.
    pub(crate) after_crash: bool,
}

fn object(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str(text) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err("a line is not a JSON object".into()),
        Err(err) => Err(format!("a line is not JSON: {err}")),
    }
}

/// The key a `key_rotated` entry hands signing to.
fn rotated_to(entry: &Parsed) -> Option<&str> {
    let object = entry.object();
    (object.get("decision").and_then(Value::as_str) == Some("key_rotated"))
        .then(|| object.get("next_key").and_then(Value::as_str).unwrap_or(""))
}

fn is_checkpoint(text: &str) -> bool {
    text.starts_with("{\"checkpoint\"")
}

/// Checks a sink's [`tail`](super::AuditSink::tail) as the writer of
/// `instance` holding `key` must before it appends: its last checkpoint is
/// signed by `key` (a writer never signs a chain another key began, so a
/// lost key is never replaced silently), names the entry before it as the
/// tree's last leaf, and its peaks grow the signed tree; that entry follows
/// the one before it (so an old entry and checkpoint copied to the end are
/// no chain's end); every entry after it continues the chain. Those entries
/// are adopted and counted.
pub(crate) fn check(
    tail: &[String],
    instance: &str,
    key: &AuditVerifier,
) -> Result<Resumed, String> {
    let entry = |text: &str| -> Result<Parsed, String> {
        let parsed = parse_entry(text, object(text)?)?;
        if parsed.instance != instance {
            return Err(format!(
                "it is the chain of instance `{}`, not `{instance}`",
                parsed.instance
            ));
        }
        Ok(parsed)
    };
    let mut last_note = None;
    let (mut seq, mut head, mut tree, mut last, rest, signed_decision) = match tail
        .iter()
        .rposition(|l| is_checkpoint(l))
    {
        None => (0, GENESIS, Tree::new(), [0; 32], tail, None),
        Some(at) => {
            let signed = at
                .checked_sub(1)
                .filter(|&i| !is_checkpoint(&tail[i]))
                .ok_or("its last checkpoint does not follow an entry")?;
            let signed_text = &tail[signed];
            let signed_entry = entry(signed_text)
                .map_err(|why| format!("the entry its last checkpoint signs: {why}"))?;
            let before = tail[..signed].iter().rev().find(|l| !is_checkpoint(l));
            match before {
                Some(text) => {
                    let before = entry(text)
                        .map_err(|why| format!("the entry before its last signed one: {why}"))?;
                    if before.seq + 1 != signed_entry.seq || before.hash != signed_entry.prev {
                        return Err(format!(
                            "its last checkpoint signs entry {}, which does not follow the entry before it (seq {}): lines were copied, changed or removed",
                            signed_entry.seq, before.seq
                        ));
                    }
                }
                // The first entry of a file after a rotation: what comes
                // before it is in the closed file.
                None if signed_entry
                    .object()
                    .get("decision")
                    .and_then(Value::as_str)
                    == Some("continued") => {}
                None if signed_entry.seq != 1 => {
                    return Err(format!(
                        "the entry before entry {} is missing",
                        signed_entry.seq
                    ));
                }
                None => {}
            }
            let line = object(&tail[at])?;
            let (Some(Value::String(note_text)), Some(peaks), 2) = (
                line.get("checkpoint"),
                line.get("peaks").and_then(peaks),
                line.len(),
            ) else {
                return Err("its last checkpoint line has no note or no peaks, or more".into());
            };
            if canonical(&line) != tail[at] {
                return Err(
                    "its last checkpoint line is not in canonical form: it was changed".into(),
                );
            }
            let note = checkpoint::parse(note_text)
                .map_err(|why| format!("its last checkpoint: {why}"))?;
            if note.instance != instance {
                return Err(format!(
                    "it is the chain of instance `{}`, not `{instance}`",
                    note.instance
                ));
            }
            key.check(&note).map_err(|why| {
                format!(
                    "its last checkpoint (entry {}) is not signed by this writer's key `{key}`: {why}. \
                     A chain is only continued by the key that signed it: restore that key, or \
                     start a new chain (another file, or another instance name)",
                    note.size
                )
            })?;
            if let Some(next) = rotated_to(&signed_entry)
                && next != key.to_string()
            {
                return Err(format!(
                    "its entry {} handed signing to the key `{next}`: a chain is only continued by the key that signs it; start with that key",
                    signed_entry.seq
                ));
            }
            let leaf = merkle::leaf_hash(signed_text.as_bytes());
            if note.size != signed_entry.seq || note.last != leaf {
                return Err(format!(
                    "its last checkpoint covers {} entries and names another last entry than the one before it (seq {}): lines were changed or copied",
                    note.size, signed_entry.seq
                ));
            }
            let tree = Tree::from_peaks(note.size, &peaks)
                .filter(|tree| tree.root() == note.root)
                .ok_or("its last checkpoint's peaks do not grow its signed root")?;
            last_note = Some(note_text.clone());
            (
                signed_entry.seq,
                signed_entry.hash,
                tree,
                leaf,
                &tail[at + 1..],
                signed_entry
                    .object()
                    .get("decision")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            )
        }
    };
    // The decision of the chain's last entry, as far as read.
    let mut last_decision = signed_decision;
    let mut adopted = 0;
    for text in rest {
        let broken = |why: String| {
            format!(
                "after its last checkpoint, the line after entry {seq}: {why}; the chain needs \
                 checking (audit_verify) before it is continued"
            )
        };
        if is_checkpoint(text) {
            return Err(broken("a checkpoint that signs no entry".into()));
        }
        let entry = entry(text).map_err(broken)?;
        // A rotation whose co-signed checkpoint never became durable (a
        // crash, a torn append) did not happen: adopted with the rest, it
        // hands signing to nobody, and this key signs on.
        if entry.seq != seq + 1 || entry.prev != head {
            return Err(broken(format!(
                "entry {} does not follow it: an entry is missing, moved or inserted",
                entry.seq
            )));
        }
        last_decision = entry
            .object()
            .get("decision")
            .and_then(Value::as_str)
            .map(str::to_owned);
        seq = entry.seq;
        head = entry.hash;
        last = merkle::leaf_hash(text.as_bytes());
        tree.push(last);
        adopted += 1;
    }
    Ok(Resumed {
        seq,
        head,
        tree,
        last,
        adopted,
        note: last_note,
        // A clean close signs everything it wrote, its `closed` entry last:
        // entries after the last checkpoint mean it did not close cleanly,
        // whatever they say.
        after_crash: seq > 0 && (adopted > 0 || last_decision.as_deref() != Some("closed")),
    })
}
