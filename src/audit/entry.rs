//! One entry: what a decision records, its canonical line, and its hash.

use std::{fmt::Write as _, time::SystemTime};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::scope::push_hex;

/// The `prev` of a chain's first entry: 32 zero bytes.
pub(crate) const GENESIS: [u8; 32] = [0; 32];

/// A decision on its way to the writer, before it has a place in the chain.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub(crate) time: SystemTime,
    pub(crate) decision: &'static str,
    pub(crate) scope: Option<[u8; 32]>,
    pub(crate) key: Option<[u8; 32]>,
    pub(crate) fingerprint: Option<[u8; 32]>,
    pub(crate) status: Option<u16>,
    pub(crate) duration_ms: u64,
    pub(crate) response: Option<[u8; 32]>,
    /// Entries lost before this one (a `lost` entry only).
    pub(crate) count: Option<u64>,
    /// Bytes of a torn last line the sink cut off before this writer
    /// started (a `resumed` entry only).
    pub(crate) cut_bytes: Option<u64>,
    /// The id of the receipt its response carried.
    pub(crate) receipt: Option<[u8; 16]>,
    /// The writer before this one stopped without closing the log (a
    /// `resumed` entry only): `"after":"crash"`.
    pub(crate) after_crash: bool,
    /// The random prefix of this run's receipt ids (a `started` entry only).
    pub(crate) run: Option<[u8; 8]>,
    /// The key that signs from the next checkpoint on (a `key_rotated`
    /// entry only), in its text form.
    pub(crate) next_key: Option<String>,
    /// The previous file's final checkpoint note and its tree's peaks
    /// (base64), for a `continued` entry (the first of a file after a
    /// rotation).
    pub(crate) continues: Option<(String, Vec<String>)>,
}

impl Pending {
    /// A `resumed` entry: the writer started on a chain whose last `count`
    /// entries follow its last checkpoint, and adopted them unsigned; and
    /// whose sink cut `cut` bytes of a torn last line, if any.
    pub(crate) fn resumed(count: u64, cut: u64, after_crash: bool) -> Self {
        Pending {
            decision: "resumed",
            cut_bytes: (cut > 0).then_some(cut),
            after_crash,
            ..Pending::lost(count)
        }
    }

    /// A `closed` entry: the writer closed the log, every entry it had a
    /// place for written before it.
    pub(crate) fn closed() -> Self {
        Pending {
            decision: "closed",
            count: None,
            ..Pending::lost(0)
        }
    }

    /// A `key_rotated` entry: checkpoints from the next on are signed by
    /// `next` (the next one by both keys).
    pub(crate) fn rotated(next: String) -> Self {
        Pending {
            decision: "key_rotated",
            count: None,
            next_key: Some(next),
            ..Pending::lost(0)
        }
    }

    /// A `continued` entry: the first of a file after a rotation, naming
    /// the previous file's final checkpoint `note`, with its tree's `peaks`
    /// (base64) so the file's checkpoints can be checked on their own.
    pub(crate) fn continued(note: String, peaks: Vec<String>) -> Self {
        Pending {
            decision: "continued",
            count: None,
            continues: Some((note, peaks)),
            ..Pending::lost(0)
        }
    }

    /// A `lost` entry: `count` decisions were not written.
    pub(crate) fn lost(count: u64) -> Self {
        Pending {
            time: SystemTime::now(),
            decision: "lost",
            scope: None,
            key: None,
            fingerprint: None,
            status: None,
            duration_ms: 0,
            response: None,
            count: Some(count),
            cut_bytes: None,
            receipt: None,
            next_key: None,
            continues: None,
            after_crash: false,
            run: None,
        }
    }

    /// A `started` entry: a writer giving receipts began a run whose
    /// receipt ids begin with `run`, before it gave any.
    pub(crate) fn started(run: [u8; 8]) -> Self {
        Pending {
            decision: "started",
            count: None,
            run: Some(run),
            ..Pending::lost(0)
        }
    }
}

/// Renders entry `seq` of `instance` after `prev`: its line (RFC 8785
/// canonical JSON, members in code-point order, `hash` included) and its
/// hash, the SHA-256 of the same canonical JSON without the `hash` member.
///
/// Every value but `next_key` is an integer or a string of characters JSON
/// never escapes (hex, decimal, an RFC 3339 time, a checked instance name,
/// a decision label), so writing the members in order is the canonical
/// form.
pub(crate) fn render(
    pending: &Pending,
    seq: u64,
    instance: &str,
    prev: &[u8; 32],
) -> (String, [u8; 32]) {
    let mut head = String::with_capacity(420);
    head.push('{');
    if pending.after_crash {
        head.push_str("\"after\":\"crash\",");
    }
    if let Some(count) = pending.count {
        let _ = write!(head, "\"count\":{count},");
    }
    if let Some(cut) = pending.cut_bytes {
        let _ = write!(head, "\"cut_bytes\":{cut},");
    }
    let _ = write!(
        head,
        "\"decision\":\"{}\",\"duration_ms\":{},",
        pending.decision, pending.duration_ms
    );
    if let Some(fingerprint) = &pending.fingerprint {
        hex_member(&mut head, "fingerprint", fingerprint);
    }
    let split = head.len();
    let _ = write!(head, "\"instance\":\"{instance}\",");
    if let Some(key) = &pending.key {
        hex_member(&mut head, "key", key);
    }
    if let Some(next) = &pending.next_key {
        // A key's name may hold characters JSON escapes: serde_json's
        // escaping of ASCII is the canonical one.
        let _ = write!(
            head,
            "\"next_key\":{},",
            serde_json::to_string(next).expect("a string serialises")
        );
    }
    if let Some((_, peaks)) = &pending.continues {
        let _ = write!(
            head,
            "\"peaks\":{},",
            serde_json::to_string(peaks).expect("strings serialise")
        );
    }
    hex_member(&mut head, "prev", prev);
    if let Some((note, _)) = &pending.continues {
        // The note's newlines and em dash: serde_json escapes `\n` as
        // RFC 8785 does, and writes other characters as they are.
        let _ = write!(
            head,
            "\"previous_checkpoint\":{},",
            serde_json::to_string(note).expect("a string serialises")
        );
    }
    if let Some(receipt) = &pending.receipt {
        hex_member(&mut head, "receipt", receipt);
    }
    if let Some(response) = &pending.response {
        hex_member(&mut head, "response_sha256", response);
    }
    if let Some(run) = &pending.run {
        hex_member(&mut head, "run", run);
    }
    if let Some(scope) = &pending.scope {
        hex_member(&mut head, "scope", scope);
    }
    let _ = write!(head, "\"seq\":{seq},");
    if let Some(status) = pending.status {
        let _ = write!(head, "\"status\":{status},");
    }
    let _ = write!(
        head,
        "\"time\":\"{}\"}}",
        humantime::format_rfc3339_millis(pending.time)
    );
    let hash: [u8; 32] = Sha256::digest(head.as_bytes()).into();
    let mut member = String::with_capacity(75);
    hex_member(&mut member, "hash", &hash);
    head.insert_str(split, &member);
    (head, hash)
}

fn hex_member(out: &mut String, name: &str, bytes: &[u8]) {
    out.push('"');
    out.push_str(name);
    out.push_str("\":\"");
    push_hex(out, bytes);
    out.push_str("\",");
}

/// How keys and scopes are hashed into entries: SHA-256, or HMAC-SHA-256
/// with a secret.
#[derive(Clone)]
pub(crate) enum Hasher {
    Plain,
    Keyed(Hmac<Sha256>),
}

impl Hasher {
    pub(crate) fn keyed(secret: &[u8]) -> Self {
        Hasher::Keyed(Hmac::new_from_slice(secret).expect("HMAC takes a key of any length"))
    }

    /// A digest made elsewhere (a fingerprint, a body's SHA-256) as an
    /// entry holds it: itself, or keyed with the secret so that a guessed
    /// body cannot be confirmed offline.
    pub(crate) fn rekey(&self, digest: [u8; 32]) -> [u8; 32] {
        match self {
            Hasher::Plain => digest,
            Hasher::Keyed(_) => self.digest(&digest),
        }
    }

    pub(crate) fn digest(&self, bytes: &[u8]) -> [u8; 32] {
        match self {
            Hasher::Plain => Sha256::digest(bytes).into(),
            Hasher::Keyed(mac) => {
                let mut mac = mac.clone();
                mac.update(bytes);
                mac.finalize().into_bytes().into()
            }
        }
    }
}

/// Whether `name` may name an instance: 1 to 64 of ASCII letters, digits,
/// `.`, `_`, `-` and `:`.
pub(crate) fn valid_instance(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> Pending {
        Pending {
            time: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_547_200_123),
            decision: "executed",
            scope: Some([1; 32]),
            key: Some([2; 32]),
            fingerprint: Some([3; 32]),
            status: Some(201),
            duration_ms: 12,
            response: Some([4; 32]),
            count: None,
            cut_bytes: None,
            receipt: Some([5; 16]),
            next_key: None,
            continues: None,
            after_crash: false,
            run: None,
        }
    }

    #[test]
    fn a_line_is_its_own_canonical_form_and_hashes_without_its_hash() {
        for entry in [
            pending(),
            Pending::lost(3),
            Pending::resumed(2, 70, false),
            Pending::resumed(0, 0, true),
            Pending::closed(),
            Pending::started([7; 8]),
            Pending::rotated("a\"b\\c+0badc0de+AQ/=".into()),
            Pending::continued(
                "tower-idempotency/audit/api-1\n3\nAA==\n\n\u{2014} k AA==\n".into(),
                vec!["AA==".into(), "AQ==".into()],
            ),
        ] {
            let (line, hash) = render(&entry, 7, "api-1", &[9; 32]);
            let value: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(serde_json_canonicalizer::to_string(&value).unwrap(), line);
            let mut without = value.clone();
            let stated = without.as_object_mut().unwrap().remove("hash").unwrap();
            let canonical = serde_json_canonicalizer::to_string(&without).unwrap();
            let digest: [u8; 32] = Sha256::digest(canonical.as_bytes()).into();
            assert_eq!(digest, hash);
            let mut hex = String::new();
            push_hex(&mut hex, &hash);
            assert_eq!(stated, serde_json::Value::String(hex));
        }
    }

    #[test]
    fn an_entry_names_its_time_in_milliseconds() {
        let (line, _) = render(&pending(), 1, "api-1", &GENESIS);
        assert!(
            line.contains("\"time\":\"2025-12-01T00:00:00.123Z\""),
            "{line}"
        );
    }

    #[test]
    fn instance_names_are_checked() {
        assert!(valid_instance("booking-api.eu-1:7"));
        for bad in ["", "a b", "x\"y", "ü", &"a".repeat(65)] {
            assert!(!valid_instance(bad), "{bad:?}");
        }
    }
}
