//! [`IntentKey`]: one key per intent, fixed before the first attempt.

use std::fmt;

use http::HeaderValue;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The largest integer JSON numbers carry exactly (2^53 − 1): JCS writes
/// every number as an IEEE 754 double, so larger ones could collide.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// The idempotency key of one intent: the same on every attempt and every
/// retry of that intent, different for a different intent.
///
/// Two ways to get one:
///
/// - [`IntentKey::derive`] from the intent's semantic identity: an action
///   name and the fields that tell this action apart from another valid one
///   (caller, slot, provider; customer, amount, invoice; a session or turn
///   id when the same action may rightly happen again elsewhere). Any
///   process, in any language, that follows the construction below gets the
///   same key for the same identity, so an agent that restarts mid-intent
///   still retries under the same key.
/// - [`IntentKey::random`], a UUIDv7, for an action without a semantic
///   identity: create it once, when the intent is formed, and keep it with
///   the intent.
///
/// # Construction
///
/// 1. Build the JSON object `{"action": ACTION, "fields": FIELDS}`, where
///    `FIELDS` must be a JSON object.
/// 2. Serialise it with the JSON Canonicalization Scheme (RFC 8785): object
///    members sorted by their names' UTF-16 code units, no whitespace,
///    strings with the shortest JSON escapes (non-ASCII text as UTF-8, not
///    `\u` escapes), numbers as ECMAScript writes doubles (`12.5`, `1e+21`,
///    `0.000001`, and `-0` as `0`).
/// 3. SHA-256 of those UTF-8 bytes; the key is the first 16 bytes in
///    lowercase hex: 32 characters.
///
/// Field order, whitespace and map order never change the key; any change
/// of a value does. `10` and `10.0` are one number, as RFC 8785 says.
/// Numbers beyond ±(2^53 − 1) are refused
/// ([`IntentKeyError::UnsafeInteger`]): JCS writes numbers as doubles, so
/// two such integers could give one key. That holds for integers that
/// arrive as JSON text too: `serde_json` reads `123456789012345678901234`
/// as the double nearest to it, which `…235` shares, so such doubles are
/// refused as well. Send them as strings.
///
/// In Python, for identities whose object member names are in the Basic
/// Multilingual Plane and whose numbers are integers or decimals that
/// `repr` writes as ECMAScript does (`12.5`, `0.1`):
///
/// ```text
/// canonical = json.dumps({"action": action, "fields": fields},
///                        sort_keys=True, separators=(",", ":"), ensure_ascii=False)
/// key = hashlib.sha256(canonical.encode()).hexdigest()[:32]
/// ```
///
/// In TypeScript, the `canonicalize` package (RFC 8785) in place of
/// `json.dumps`, then SHA-256.
///
/// # Test vectors
///
/// Computed by this crate and, independently, by the Python above:
///
/// | action | fields | key |
/// |---|---|---|
/// | `book` | `{"caller": "ada", "slot": "2026-12-01T09:00", "provider": "dr-who", "session": "default"}` | `e7164c52a3bb021a8bc9b437ea0fb882` |
/// | `pay` | `{"customer": "cus_42", "amount": 12.5, "currency": "EUR", "invoice": {"lines": [1, 2, 3], "id": "inv-7"}}` | `b591cf84f6364963582a4ea795d0f725` |
/// | `book` | `{"caller": "Zoë Åkesson", "slot": "2026-12-01T09:00", "provider": "dr-müller", "session": "turn-3"}` | `8f75b5620b818f9d38535066da76bc87` |
/// | `refund` | `{"amount": -0.5, "count": 3, "max": 9007199254740991, "note": "日本語"}` | `0649768a3a922d3b62676e240f6b9144` |
///
/// The canonical JSON of the first:
/// `{"action":"book","fields":{"caller":"ada","provider":"dr-who","session":"default","slot":"2026-12-01T09:00"}}`.
///
/// ```
/// use tower_idempotency::client::IntentKey;
///
/// let key = IntentKey::derive("book", &serde_json::json!({
///     "caller": "ada", "slot": "2026-12-01T09:00", "provider": "dr-who", "session": "default",
/// }))?;
/// assert_eq!(key.as_str().len(), 32);
/// // The same identity, fields in another order: the same key.
/// let again = IntentKey::derive("book", &serde_json::json!({
///     "session": "default", "provider": "dr-who", "slot": "2026-12-01T09:00", "caller": "ada",
/// }))?;
/// assert_eq!(key, again);
/// # Ok::<(), tower_idempotency::client::IntentKeyError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IntentKey(String);

impl IntentKey {
    /// The key of the intent `action` with the distinguishing `fields`
    /// (anything that serialises to a JSON object), as the type docs
    /// construct it.
    pub fn derive(action: &str, fields: &impl Serialize) -> Result<IntentKey, IntentKeyError> {
        if super::finite::has_non_finite(fields) {
            return Err(IntentKeyError::NonFinite);
        }
        let fields = serde_json::to_value(fields).map_err(IntentKeyError::Unserializable)?;
        if !fields.is_object() {
            return Err(IntentKeyError::NotAnObject);
        }
        let identity = serde_json::json!({ "action": action, "fields": fields });
        let canonical = canonical_json(&identity)?;
        let digest = Sha256::digest(&canonical);
        let mut key = String::with_capacity(32);
        crate::scope::push_hex(&mut key, &digest[..16]);
        Ok(IntentKey(key))
    }

    /// A fresh random key (a UUIDv7, 36 characters): create it once per
    /// intent and keep it for every retry.
    pub fn random() -> IntentKey {
        IntentKey(uuid::Uuid::now_v7().to_string())
    }

    /// Uses a key the caller already has (one kept from an earlier run),
    /// checked by the server's rules: 1 to 255 visible ASCII characters.
    pub fn from_existing(key: &str) -> Result<IntentKey, IntentKeyError> {
        let valid = (1..=crate::MAX_KEY_LEN).contains(&key.len())
            && key.bytes().all(|b| (0x21..=0x7e).contains(&b));
        if valid {
            Ok(IntentKey(key.to_owned()))
        } else {
            Err(IntentKeyError::InvalidKey)
        }
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key as an `Idempotency-Key` header value.
    pub fn header_value(&self) -> HeaderValue {
        // Hex digits, a UUID, or checked visible ASCII: always valid.
        HeaderValue::from_str(&self.0).expect("an intent key is a valid header value")
    }
}

impl fmt::Debug for IntentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IntentKey").field(&self.0).finish()
    }
}

impl fmt::Display for IntentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an intent key could not be made.
#[derive(Debug)]
#[non_exhaustive]
pub enum IntentKeyError {
    /// The fields do not serialise to JSON (a map with non-string keys, a
    /// failing `Serialize` impl).
    Unserializable(serde_json::Error),
    /// A NaN or infinite float, which JSON cannot carry (serde_json would
    /// write it as `null`, making `+inf`, `-inf`, NaN and `null` one
    /// intent).
    NonFinite,
    /// The fields serialise to something other than a JSON object.
    NotAnObject,
    /// A number beyond ±(2^53 − 1), which JSON numbers do not carry
    /// exactly (an integer, or the double a larger integer in JSON text
    /// was read as): send it as a string.
    UnsafeInteger(String),
    /// A key given to [`IntentKey::from_existing`] is not 1 to 255 visible
    /// ASCII characters.
    InvalidKey,
}

impl fmt::Display for IntentKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntentKeyError::Unserializable(e) => write!(f, "the intent's fields are not JSON: {e}"),
            IntentKeyError::NonFinite => f.write_str(
                "the intent's fields hold a NaN or infinite number, which JSON cannot carry",
            ),
            IntentKeyError::NotAnObject => {
                f.write_str("the intent's fields must serialise to a JSON object")
            }
            IntentKeyError::UnsafeInteger(n) => write!(
                f,
                "the number {n} is beyond what JSON numbers carry exactly (2^53 - 1): pass it as a string"
            ),
            IntentKeyError::InvalidKey => {
                f.write_str("an idempotency key is 1 to 255 visible ASCII characters")
            }
        }
    }
}

impl std::error::Error for IntentKeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            IntentKeyError::Unserializable(e) => Some(e),
            _ => None,
        }
    }
}

/// RFC 8785 bytes of `value`, refusing numbers JSON cannot carry exactly.
fn canonical_json(value: &Value) -> Result<Vec<u8>, IntentKeyError> {
    check_numbers(value)?;
    serde_json_canonicalizer::to_vec(value).map_err(IntentKeyError::Unserializable)
}

/// Refuses every number beyond ±(2^53 − 1): integers, and doubles of that
/// size, which are what larger integers in JSON text parse to (every
/// double that large is an integer, and neighbouring integers share it).
pub(crate) fn check_numbers(value: &Value) -> Result<(), IntentKeyError> {
    match value {
        Value::Number(n) => {
            let unsafe_number = match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => u > MAX_SAFE_INTEGER,
                (None, Some(i), _) => i.unsigned_abs() > MAX_SAFE_INTEGER,
                (None, None, Some(f)) => f.abs() > MAX_SAFE_INTEGER as f64,
                (None, None, None) => false,
            };
            if unsafe_number {
                return Err(IntentKeyError::UnsafeInteger(n.to_string()));
            }
            Ok(())
        }
        Value::Array(items) => items.iter().try_for_each(check_numbers),
        Value::Object(members) => members.values().try_for_each(check_numbers),
        _ => Ok(()),
    }
}
