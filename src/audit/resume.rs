//! What a writer checks before it continues a chain it finds.

use serde_json::{Map, Value};

use super::{
    AuditVerifier,
    checkpoint::{self, peaks},
    entry::GENESIS,
    merkle::{self, Tree},
    verify::parse_entry,
};

/// Where a chain found at start ends.
pub(crate) struct Resumed {
    pub(crate) seq: u64,
    pub(crate) head: [u8; 32],
    pub(crate) tree: Tree,
    /// Entries after the last checkpoint, adopted unsigned.
    pub(crate) adopted: u64,
}

fn object(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str(text) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err("a line is not a JSON object".into()),
        Err(err) => Err(format!("a line is not JSON: {err}")),
    }
}

fn is_checkpoint(text: &str) -> bool {
    text.starts_with("{\"checkpoint\"")
}

/// Checks a sink's [`tail`](super::AuditSink::tail) as the writer of
/// `instance` holding `key` must before it appends: its last checkpoint is
/// signed by `key` (a writer never signs a chain another key began, so a
/// lost key is never replaced silently) and its peaks grow the signed tree;
/// every entry after it continues the chain. Those entries are adopted and
/// counted.
pub(crate) fn check(
    tail: &[String],
    instance: &str,
    key: &AuditVerifier,
) -> Result<Resumed, String> {
    let signed = tail.len() >= 2 && is_checkpoint(&tail[1]);
    let (mut seq, mut head, mut tree, rest) = if signed {
        let entry = parse_entry(&tail[0], object(&tail[0])?)
            .map_err(|why| format!("the entry its last checkpoint signs: {why}"))?;
        let line = object(&tail[1])?;
        let (Some(Value::String(note)), Some(peaks)) =
            (line.get("checkpoint"), line.get("peaks").and_then(peaks))
        else {
            return Err("its last checkpoint line has no note or no peaks".into());
        };
        let note = checkpoint::parse(note).map_err(|why| format!("its last checkpoint: {why}"))?;
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
        if note.size != entry.seq {
            return Err(format!(
                "its last checkpoint covers {} entries, but follows entry {}",
                note.size, entry.seq
            ));
        }
        let tree = Tree::from_peaks(note.size, &peaks)
            .filter(|tree| tree.root() == note.root)
            .ok_or("its last checkpoint's peaks do not grow its signed root")?;
        (entry.seq, entry.hash, tree, &tail[2..])
    } else {
        (0, GENESIS, Tree::new(), tail)
    };
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
        let entry = parse_entry(text, object(text).map_err(broken)?).map_err(broken)?;
        if entry.instance != instance {
            return Err(format!(
                "it is the chain of instance `{}`, not `{instance}`",
                entry.instance
            ));
        }
        if entry.seq != seq + 1 || entry.prev != head {
            return Err(broken(format!(
                "entry {} does not follow it: an entry is missing, moved or inserted",
                entry.seq
            )));
        }
        seq = entry.seq;
        head = entry.hash;
        tree.push(merkle::leaf_hash(text.as_bytes()));
        adopted += 1;
    }
    Ok(Resumed {
        seq,
        head,
        tree,
        adopted,
    })
}
