//! Receipts: the log's signed word, given with a response, that its
//! decision is in the chain.
//!
//! With [`AuditBuilder::with_receipts`](super::AuditBuilder::with_receipts),
//! every response whose decision has a place in the chain carries an
//! `Idempotency-Receipt` header: the base64 of a C2SP `signed-note`,
//! signed with the log's key:
//!
//! ```text
//! tower-idempotency/receipt/<instance>
//! <receipt id: 32 lowercase hex digits, unique per log>
//! status <the response's HTTP status>
//! key <the key's hash as the entry holds it, or ->
//! time <RFC 3339 UTC with milliseconds, when it was signed>
//!
//! — <key name> <base64 of key id and Ed25519 signature>
//! ```
//!
//! The entry the decision gets carries the same id as its `receipt`
//! member. Like a Certificate Transparency SCT, a receipt is a promise
//! made before the entry is written: a response's head leaves before its
//! body has streamed, and an execution's entry (which holds the body's
//! digest) is written when the body ends. The entry is durable within one
//! batch of the writer. A caller who keeps the receipt can later hold the
//! log to it: `audit_verify PATH --public-key FILE --receipt FILE` finds the
//! entry, checks that it says what the receipt says and that a checkpoint
//! signs it; [`ReceiptProof`] carries the same evidence without the log
//! (the entry's line, an inclusion proof, a signed checkpoint). A receipt
//! whose entry is missing from an otherwise intact chain proves the log
//! dropped a decision it had promised.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
    time::SystemTime,
};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use super::{
    AuditLog, AuditVerifier,
    checkpoint::{self, SignatureLine, parse_hex, parse_hex32},
    merkle,
    verify::parse_entry,
};
use crate::scope::push_hex;

/// The response header that carries a receipt.
pub const RECEIPT_HEADER: HeaderName = HeaderName::from_static("idempotency-receipt");

/// The first line of every receipt, before the instance.
const ORIGIN: &str = "tower-idempotency/receipt/";

/// A receipt, read from its header value or its note text.
#[derive(Clone, PartialEq, Eq)]
pub struct Receipt {
    instance: String,
    id: [u8; 16],
    status: u16,
    key: Option<[u8; 32]>,
    time: String,
    body: String,
    signatures: Vec<SignatureLine>,
    note: String,
}

impl fmt::Debug for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receipt")
            .field("instance", &self.instance)
            .field("id", &self.id())
            .field("status", &self.status)
            .field("key", &self.key_hash())
            .field("time", &self.time)
            .finish_non_exhaustive()
    }
}

/// Why a receipt cannot be read, or does not stand.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReceiptError {
    /// Not a receipt: says why.
    Malformed(&'static str),
    /// No valid signature by any of the keys, or a signature line of one
    /// of them that does not verify: the log did not issue it.
    Forged,
    /// The evidence does not hold the receipt: says why (the log left the
    /// decision out, changed it, or the proof does not reach a signed
    /// checkpoint).
    Broken(String),
    /// The chain is intact and holds no entry for the receipt, which the
    /// log could not yet, or could no longer, write: it was issued in a
    /// run of the writer that has not closed the log, or that stopped
    /// without closing it (the next run's `resumed` entry says so). Says
    /// which.
    Unwritten(String),
}

impl fmt::Display for ReceiptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReceiptError::Malformed(why) => write!(f, "not a receipt: {why}"),
            ReceiptError::Forged => f.write_str(
                "the receipt's signature does not verify with the given keys: this log did not issue it",
            ),
            ReceiptError::Broken(why) | ReceiptError::Unwritten(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ReceiptError {}

impl Receipt {
    /// Reads a receipt from its header value (base64) or its note text;
    /// surrounding whitespace is ignored. The signature is not checked:
    /// see [`verify`](Receipt::verify).
    pub fn parse(text: &str) -> Result<Receipt, ReceiptError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(ReceiptError::Malformed("it is empty"));
        }
        let note = if text.starts_with(ORIGIN) {
            format!("{text}\n")
        } else {
            let raw = BASE64
                .decode(text)
                .map_err(|_| ReceiptError::Malformed("neither a note nor its base64"))?;
            String::from_utf8(raw).map_err(|_| ReceiptError::Malformed("not UTF-8"))?
        };
        let (body, signatures) =
            checkpoint::split_signed(&note).map_err(ReceiptError::Malformed)?;
        let [origin, id, status, key, time] = checkpoint::five_lines(&body)
            .ok_or(ReceiptError::Malformed("its body is not five lines"))?;
        let instance = checkpoint::origin_instance(origin, ORIGIN).ok_or(
            ReceiptError::Malformed("its origin is not tower-idempotency/receipt/<instance>"),
        )?;
        let id = parse_hex::<16>(id).ok_or(ReceiptError::Malformed(
            "its id is not 32 lowercase hex digits",
        ))?;
        let status: u16 = status
            .strip_prefix("status ")
            .filter(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .filter(|s| (100..600).contains(s))
            .ok_or(ReceiptError::Malformed(
                "it has no `status` line with an HTTP status",
            ))?;
        let key = match key.strip_prefix("key ") {
            Some("-") => None,
            Some(hex) => Some(parse_hex32(hex).ok_or(ReceiptError::Malformed(
                "its `key` is not 64 lowercase hex digits",
            ))?),
            None => return Err(ReceiptError::Malformed("it has no `key` line")),
        };
        let time = checkpoint::time_line(time).ok_or(ReceiptError::Malformed(
            "it has no `time` line with an RFC 3339 time",
        ))?;
        if body != receipt_body(instance, &id, status, key.as_ref(), time) {
            return Err(ReceiptError::Malformed("its body is not in canonical form"));
        }
        Ok(Receipt {
            instance: instance.to_owned(),
            id,
            status,
            key,
            time: time.to_owned(),
            body,
            signatures,
            note,
        })
    }

    /// The receipt a response carries, if any: `None` without the header,
    /// `Some(Err)` when its value is not a receipt.
    pub fn from_headers(headers: &HeaderMap) -> Option<Result<Receipt, ReceiptError>> {
        let value = headers.get(RECEIPT_HEADER)?;
        Some(
            value
                .to_str()
                .map_err(|_| ReceiptError::Malformed("the header is not ASCII"))
                .and_then(Receipt::parse),
        )
    }

    /// The log's instance that issued it.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Its id, as the entry's `receipt` member holds it.
    pub fn id(&self) -> String {
        let mut hex = String::with_capacity(32);
        push_hex(&mut hex, &self.id);
        hex
    }

    /// The response's status it states.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The key's hash as the entry holds it (lowercase hex), if the
    /// request had a key.
    pub fn key_hash(&self) -> Option<String> {
        self.key.map(|key| {
            let mut hex = String::with_capacity(64);
            push_hex(&mut hex, &key);
            hex
        })
    }

    /// When it was signed (RFC 3339).
    pub fn time(&self) -> &str {
        &self.time
    }

    /// The signed note, as text.
    pub fn note(&self) -> &str {
        &self.note
    }

    /// The header value form: the base64 of the note.
    pub fn to_header_value(&self) -> String {
        BASE64.encode(&self.note)
    }

    /// Checks that one of `keys` signed it, and that no line of any of them
    /// fails to verify.
    pub fn verify(&self, keys: &[AuditVerifier]) -> Result<(), ReceiptError> {
        checkpoint::signed_by_any(keys, &self.body, &self.signatures)
            .map_err(|_| ReceiptError::Forged)
    }

    /// Whether the entry line `object` (already checked as an entry) is the
    /// one this receipt promises: `Ok(false)` when it carries another id,
    /// `Err` when it carries this id but says something else.
    pub(crate) fn matches(&self, object: &serde_json::Map<String, Value>) -> Result<bool, String> {
        if object.get("receipt").and_then(Value::as_str) != Some(self.id().as_str()) {
            return Ok(false);
        }
        let seq = object.get("seq").and_then(Value::as_u64).unwrap_or(0);
        if object.get("instance").and_then(Value::as_str) != Some(self.instance.as_str()) {
            return Err(format!(
                "entry seq {seq} carries the receipt's id in the chain of another instance"
            ));
        }
        let status = object.get("status").and_then(Value::as_u64);
        if status != Some(u64::from(self.status)) {
            let stated = status.map_or("no status".to_owned(), |s| format!("status {s}"));
            return Err(format!(
                "entry seq {seq} records {stated}, the receipt status {}: the decision was changed",
                self.status
            ));
        }
        let key = object.get("key").and_then(Value::as_str).map(str::to_owned);
        if key != self.key_hash() {
            return Err(format!(
                "entry seq {seq} records another key than the receipt: the decision was changed"
            ));
        }
        Ok(true)
    }
}

fn receipt_body(
    instance: &str,
    id: &[u8; 16],
    status: u16,
    key: Option<&[u8; 32]>,
    time: &str,
) -> String {
    let mut body = String::with_capacity(200);
    body.push_str(ORIGIN);
    body.push_str(instance);
    body.push('\n');
    push_hex(&mut body, id);
    body.push_str("\nstatus ");
    body.push_str(&status.to_string());
    body.push_str("\nkey ");
    match key {
        Some(key) => push_hex(&mut body, key),
        None => body.push('-'),
    }
    body.push_str("\ntime ");
    body.push_str(time);
    body.push('\n');
    body
}

/// One request's promised receipt: its id, and whether its decision has a
/// place in the queue (only then is a receipt given).
pub(crate) struct ReceiptSlot {
    log: AuditLog,
    id: [u8; 16],
    key: Option<[u8; 32]>,
    promised: AtomicBool,
    /// The status the receipt states, once given (0 before).
    stamped: AtomicU16,
}

impl ReceiptSlot {
    pub(crate) fn new(log: AuditLog, id: [u8; 16], key: Option<[u8; 32]>) -> Arc<Self> {
        Arc::new(ReceiptSlot {
            log,
            id,
            key,
            promised: AtomicBool::new(false),
            stamped: AtomicU16::new(0),
        })
    }

    /// The decision has its place in the queue: its entry will carry the id.
    pub(crate) fn promise(&self) {
        self.set_promised(true);
    }

    /// Whether the decision that carries the receipt has its place.
    pub(crate) fn set_promised(&self, promised: bool) {
        self.promised.store(promised, Ordering::Relaxed);
    }

    /// The status the receipt stated, if one was given.
    pub(crate) fn stamped_status(&self) -> Option<u16> {
        Some(self.stamped.load(Ordering::Relaxed)).filter(|&s| s != 0)
    }

    /// The id, if the entry will carry it.
    pub(crate) fn promised_id(&self) -> Option<[u8; 16]> {
        self.promised.load(Ordering::Relaxed).then_some(self.id)
    }

    /// Puts the signed receipt of a response with `status` in `headers`,
    /// if its decision has a place in the chain.
    pub(crate) fn stamp(&self, status: u16, headers: &mut HeaderMap) {
        // A receipt header is this log's alone: one the service set is not
        // passed on as if it were.
        headers.remove(RECEIPT_HEADER);
        let Some(id) = self.promised_id() else {
            return;
        };
        // Closing, a request still under way may not get its entry written
        // within the close timeout: no promise is made then.
        if self.log.shared.state.closing.load(Ordering::Relaxed) {
            return;
        }
        let Some(signer) = self.log.receipt_signer() else {
            return;
        };
        self.stamped.store(status, Ordering::Relaxed);
        let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let body = receipt_body(
            &self.log.shared.instance,
            &id,
            status,
            self.key.as_ref(),
            &time,
        );
        let note = signer.sign_note(&body);
        let value =
            HeaderValue::try_from(BASE64.encode(note)).expect("base64 is a valid header value");
        headers.insert(RECEIPT_HEADER, value);
    }
}

/// What shows, without the log, that a receipt's entry is in the tree
/// under a checkpoint the log signed: the entry's line, its inclusion
/// proof, and the checkpoint. Made by [`receipt_proof`](super::receipt_proof);
/// its JSON form (`{"checkpoint":NOTE,"entry":LINE,"proof":[base64...]}`)
/// is what one side hands the other.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReceiptProof {
    /// The entry's line.
    pub entry: String,
    /// The signed checkpoint note the proof reaches.
    pub checkpoint: String,
    /// The RFC 6962 inclusion proof of the entry's leaf in that tree.
    pub proof: Vec<merkle::Hash>,
}

impl ReceiptProof {
    /// The JSON form.
    pub fn to_json(&self) -> String {
        let proof: Vec<String> = self.proof.iter().map(|h| BASE64.encode(h)).collect();
        serde_json::json!({
            "checkpoint": self.checkpoint,
            "entry": self.entry,
            "proof": proof,
        })
        .to_string()
    }

    /// Reads the JSON form.
    pub fn from_json(text: &str) -> Result<ReceiptProof, ReceiptError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|_| ReceiptError::Malformed("the proof is not JSON"))?;
        let text = |name: &str| {
            value
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or(ReceiptError::Malformed(
                    "the proof lacks its `checkpoint` or `entry`",
                ))
        };
        let proof = checkpoint::peaks(value.get("proof").unwrap_or(&Value::Null)).ok_or(
            ReceiptError::Malformed("the proof's `proof` is not a list of base64 hashes"),
        )?;
        Ok(ReceiptProof {
            entry: text("entry")?,
            checkpoint: text("checkpoint")?,
            proof,
        })
    }

    /// Checks that `receipt` was signed by one of `keys`, that the entry is
    /// the one it promises, and that the entry is in the tree of a
    /// checkpoint one of `keys` signed.
    pub fn verify(&self, receipt: &Receipt, keys: &[AuditVerifier]) -> Result<(), ReceiptError> {
        receipt.verify(keys)?;
        let broken = |why: &str| ReceiptError::Broken(why.to_owned());
        let note = checkpoint::parse(&self.checkpoint).map_err(broken)?;
        checkpoint::signed_by_any(keys, &note.body, &note.signatures).map_err(broken)?;
        if note.instance != receipt.instance {
            return Err(broken("the checkpoint is another instance's"));
        }
        let object = match serde_json::from_str(&self.entry) {
            Ok(Value::Object(object)) => object,
            _ => return Err(broken("the entry is not a JSON object")),
        };
        let entry = parse_entry(&self.entry, object).map_err(ReceiptError::Broken)?;
        if !receipt
            .matches(entry.object())
            .map_err(ReceiptError::Broken)?
        {
            return Err(broken("the entry carries another receipt's id"));
        }
        if entry.seq == 0 || entry.seq > note.size {
            return Err(broken("the checkpoint does not cover the entry"));
        }
        let leaf = merkle::leaf_hash(self.entry.as_bytes());
        if !merkle::verify_inclusion(entry.seq - 1, note.size, &leaf, &self.proof, &note.root) {
            return Err(broken(
                "the inclusion proof does not lead from the entry to the checkpoint's root",
            ));
        }
        Ok(())
    }
}
