//! Signed checkpoints: the keys that sign them, their text form, and the
//! check of a signature.
//!
//! A checkpoint is a C2SP `tlog-checkpoint` in a C2SP `signed-note`: a body
//! of five lines (two of them extension lines), a blank line, and one signature line per key.
//!
//! ```text
//! tower-idempotency/audit/<instance>
//! <tree size: the seq of the last entry>
//! <base64 of the RFC 6962 Merkle tree root over the entries' lines>
//! time <RFC 3339 UTC with milliseconds, when it was signed>
//! last <base64 of the last entry's leaf hash>
//!
//! — <key name> <base64 of key id (4 bytes) followed by the Ed25519 signature (64 bytes)>
//! ```
//!
//! The signature covers the body's bytes, each line ending in a newline. The
//! key id is the first four bytes of SHA-256 over the key name, a newline,
//! the byte `0x01` (Ed25519) and the 32-byte public key. Keys are written as
//! `<name>+<key id hex>+<base64 of 0x01 and the public key>` (the form
//! Go's `golang.org/x/mod/sumdb/note` reads), and signing keys as
//! `PRIVATE+KEY+<name>+<key id hex>+<base64 of 0x01 and the seed>`.

use std::{fmt, path::Path, str::FromStr, time::SystemTime};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::scope::push_hex;

/// The first line of every checkpoint, before the instance.
const ORIGIN: &str = "tower-idempotency/audit/";
/// The algorithm byte of an Ed25519 key.
const ED25519: u8 = 0x01;
/// The prefix of a signature line.
const DASH: &str = "\u{2014} ";

/// `path` with `.pub` appended: where a signing key's public key is kept.
fn public_path(path: &Path) -> std::path::PathBuf {
    let mut public = path.as_os_str().to_owned();
    public.push(".pub");
    public.into()
}

/// Writes `text` and a newline to a new file at `path` (never over one),
/// with `mode` on Unix, and syncs it.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), AuditKeyError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(AuditKeyError::Io)?;
    std::io::Write::write_all(&mut file, format!("{text}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(AuditKeyError::Io)
}

/// Why a key could not be made, read or saved.
#[derive(Debug)]
#[non_exhaustive]
pub enum AuditKeyError {
    /// A key name must be 1 to 64 visible ASCII characters other than `+`.
    InvalidName,
    /// The text is not a key in the documented form; says what is wrong.
    Malformed(&'static str),
    /// Reading or writing the key file failed.
    Io(std::io::Error),
    /// The system's random source failed.
    Random(String),
    /// The signing key file is missing while its public key (this path) is
    /// still there: a chain was signed with it. Restore the key; a new one
    /// would not continue that chain.
    Missing(std::path::PathBuf),
    /// The public key file beside the signing key (this path) holds another
    /// key.
    Mismatch(std::path::PathBuf),
}

impl fmt::Display for AuditKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuditKeyError::InvalidName => {
                f.write_str("a key name must be 1 to 64 visible ASCII characters other than `+`")
            }
            AuditKeyError::Malformed(why) => write!(f, "not an audit key: {why}"),
            AuditKeyError::Io(err) => write!(f, "key file: {err}"),
            AuditKeyError::Random(err) => write!(f, "no randomness for a new key: {err}"),
            AuditKeyError::Missing(path) => write!(
                f,
                "the signing key {} is missing, but its public key is still there: a chain was signed with it; restore the key (a new key would not continue that chain)",
                path.display()
            ),
            AuditKeyError::Mismatch(path) => write!(
                f,
                "{} holds another public key than the signing key's; it is never replaced",
                path.display()
            ),
        }
    }
}

impl std::error::Error for AuditKeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AuditKeyError::Io(err) => Some(err),
            _ => None,
        }
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic() && b != b'+')
}

fn key_id(name: &str, public: &VerifyingKey) -> [u8; 4] {
    let mut hash = Sha256::new();
    hash.update(name.as_bytes());
    hash.update(b"\n");
    hash.update([ED25519]);
    hash.update(public.as_bytes());
    let digest = hash.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

/// Splits `<name>+<id hex>+<base64>` and checks the id against the key.
fn parse_key_text(text: &str) -> Result<(String, [u8; 4], [u8; 32]), AuditKeyError> {
    // The key's base64 may itself hold `+`: split off two parts only.
    let mut parts = text.trim().splitn(3, '+');
    let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(AuditKeyError::Malformed(
            "expected <name>+<key id>+<key>, three parts",
        ));
    };
    if !valid_name(name) {
        return Err(AuditKeyError::InvalidName);
    }
    let id = u32::from_str_radix(id, 16)
        .ok()
        .filter(|_| id.len() == 8)
        .ok_or(AuditKeyError::Malformed("the key id is not 8 hex digits"))?
        .to_be_bytes();
    let raw = BASE64
        .decode(key)
        .map_err(|_| AuditKeyError::Malformed("the key is not base64"))?;
    let [alg, rest @ ..] = raw.as_slice() else {
        return Err(AuditKeyError::Malformed("the key is empty"));
    };
    if *alg != ED25519 {
        return Err(AuditKeyError::Malformed(
            "not an Ed25519 key (algorithm byte 0x01)",
        ));
    }
    let key: [u8; 32] = rest
        .try_into()
        .map_err(|_| AuditKeyError::Malformed("an Ed25519 key is 32 bytes"))?;
    Ok((name.to_owned(), id, key))
}

/// The Ed25519 key that signs an audit chain's checkpoints.
///
/// Its `Debug` form names the key, never its secret.
#[derive(Clone)]
pub struct AuditSigner {
    name: String,
    key: SigningKey,
    id: [u8; 4],
}

impl fmt::Debug for AuditSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSigner")
            .field("public", &self.verifier().to_string())
            .finish_non_exhaustive()
    }
}

impl AuditSigner {
    /// A new key named `name`, from the system's random source.
    pub fn generate(name: &str) -> Result<Self, AuditKeyError> {
        if !valid_name(name) {
            return Err(AuditKeyError::InvalidName);
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|err| AuditKeyError::Random(err.to_string()))?;
        Ok(Self::from_seed(name, seed))
    }

    fn from_seed(name: &str, seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let id = key_id(name, &key.verifying_key());
        AuditSigner {
            name: name.to_owned(),
            key,
            id,
        }
    }

    /// Reads the signing key in `path`; when there is no such file, makes a
    /// new key named `name`, saves it there (readable by its owner only, on
    /// Unix) and says so with `true`.
    ///
    /// Its public key lives beside it, in `path` with `.pub` appended: written
    /// once, when the key is made (never replaced), checked against the key
    /// when it is read (written if missing). A missing key whose `.pub` is
    /// still there is [`AuditKeyError::Missing`]: a chain was signed with it,
    /// and a new key would not continue that chain.
    pub fn load_or_generate(path: &Path, name: &str) -> Result<(Self, bool), AuditKeyError> {
        let public_path = public_path(path);
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let signer: AuditSigner = text.parse()?;
                let public = signer.verifier().to_string();
                match std::fs::read_to_string(&public_path) {
                    Ok(saved) if saved.trim() == public => {}
                    Ok(_) => {
                        return Err(AuditKeyError::Mismatch(public_path));
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                        write_new(&public_path, &public, 0o644)?;
                    }
                    Err(err) => return Err(AuditKeyError::Io(err)),
                }
                return Ok((signer, false));
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(AuditKeyError::Io(err)),
        }
        if public_path.exists() {
            return Err(AuditKeyError::Missing(path.to_owned()));
        }
        let signer = Self::generate(name)?;
        write_new(path, &signer.to_secret_text(), 0o600)?;
        write_new(&public_path, &signer.verifier().to_string(), 0o644)?;
        Ok((signer, true))
    }

    /// The key in its secret text form,
    /// `PRIVATE+KEY+<name>+<key id>+<base64>`. Keep it secret.
    pub fn to_secret_text(&self) -> String {
        let mut raw = Vec::with_capacity(33);
        raw.push(ED25519);
        raw.extend_from_slice(self.key.as_bytes());
        format!(
            "PRIVATE+KEY+{}+{}+{}",
            self.name,
            hex(&self.id),
            BASE64.encode(raw)
        )
    }

    /// The public half, for verifying.
    pub fn verifier(&self) -> AuditVerifier {
        AuditVerifier {
            name: self.name.clone(),
            key: self.key.verifying_key(),
            id: self.id,
        }
    }

    /// The signed checkpoint of `instance`'s tree of `size` entries with
    /// root `root`, signed at `time`.
    pub(crate) fn checkpoint(
        &self,
        instance: &str,
        size: u64,
        root: &[u8; 32],
        last: &[u8; 32],
        time: SystemTime,
    ) -> String {
        let body = note_body(
            instance,
            size,
            root,
            &humantime::format_rfc3339_millis(time).to_string(),
            last,
        );
        self.sign_note(&body)
    }

    /// `note` (a signed note) with this key's signature added.
    pub(crate) fn cosign(&self, note: &str) -> String {
        let body = match note.split_once("\n\n") {
            Some((body, _)) => format!("{body}\n"),
            None => note.to_owned(),
        };
        format!("{note}{}", self.signature_line(&body))
    }

    /// `body` (each line ending in a newline) as a signed note with this
    /// key's signature.
    pub(crate) fn sign_note(&self, body: &str) -> String {
        format!("{body}\n{}", self.signature_line(body))
    }

    /// This key's signature line over `body`.
    fn signature_line(&self, body: &str) -> String {
        let signature = self.key.sign(body.as_bytes());
        let mut signed = Vec::with_capacity(68);
        signed.extend_from_slice(&self.id);
        signed.extend_from_slice(&signature.to_bytes());
        format!("{DASH}{} {}\n", self.name, BASE64.encode(signed))
    }
}

impl FromStr for AuditSigner {
    type Err = AuditKeyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let rest = text
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(AuditKeyError::Malformed(
                "a signing key starts with PRIVATE+KEY+",
            ))?;
        let (name, id, seed) = parse_key_text(rest)?;
        let signer = Self::from_seed(&name, seed);
        if signer.id != id {
            return Err(AuditKeyError::Malformed(
                "the key id does not match the key",
            ));
        }
        Ok(signer)
    }
}

/// The public key that checks an audit chain's checkpoints. Its text form
/// (`Display`, `FromStr`) is `<name>+<key id>+<base64>`.
#[derive(Clone, PartialEq, Eq)]
pub struct AuditVerifier {
    name: String,
    key: VerifyingKey,
    id: [u8; 4],
}

impl fmt::Debug for AuditVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AuditVerifier")
            .field(&self.to_string())
            .finish()
    }
}

impl fmt::Display for AuditVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = Vec::with_capacity(33);
        raw.push(ED25519);
        raw.extend_from_slice(self.key.as_bytes());
        write!(f, "{}+{}+{}", self.name, hex(&self.id), BASE64.encode(raw))
    }
}

impl FromStr for AuditVerifier {
    type Err = AuditKeyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim().starts_with("PRIVATE+KEY+") {
            return Err(AuditKeyError::Malformed(
                "this is a signing key (secret); give its public key",
            ));
        }
        let (name, id, key) = parse_key_text(text)?;
        let key = VerifyingKey::from_bytes(&key)
            .map_err(|_| AuditKeyError::Malformed("not a valid Ed25519 public key"))?;
        if key_id(&name, &key) != id {
            return Err(AuditKeyError::Malformed(
                "the key id does not match the key",
            ));
        }
        Ok(AuditVerifier { name, key, id })
    }
}

impl AuditVerifier {
    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks that `note` carries a valid signature by this key, and no
    /// line naming this key that does not verify (a junk signature line
    /// beside a real one is refused, not skipped). Lines of other keys
    /// (a witness's cosignature) are left alone.
    pub(crate) fn check(&self, note: &Note) -> Result<(), &'static str> {
        match self.signs(note) {
            Signed::Valid => Ok(()),
            Signed::Bad => Err(BAD_SIGNATURE),
            Signed::Absent => Err(NOT_SIGNED),
        }
    }

    /// What this key's lines in `note` say.
    pub(crate) fn signs(&self, note: &Note) -> Signed {
        self.signs_body(&note.body, &note.signatures)
    }

    /// What this key's lines among `signatures` say of `body`.
    pub(crate) fn signs_body(&self, body: &str, signatures: &[SignatureLine]) -> Signed {
        let mut found = Signed::Absent;
        for (name, id, signature) in signatures {
            if *name != self.name || *id != self.id {
                continue;
            }
            let signature = Signature::from_bytes(signature);
            if self.key.verify_strict(body.as_bytes(), &signature).is_err() {
                return Signed::Bad;
            }
            found = Signed::Valid;
        }
        found
    }
}

/// What one key's signature lines in a note say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signed {
    /// At least one line of the key, and every one verifies.
    Valid,
    /// A line of the key that does not verify.
    Bad,
    /// No line of the key.
    Absent,
}

/// Why a note's signature by a key does not stand.
pub(crate) const BAD_SIGNATURE: &str = "checkpoint signature does not verify";
/// A note without a line of the key.
pub(crate) const NOT_SIGNED: &str = "checkpoint is not signed by the given key";

fn note_body(instance: &str, size: u64, root: &[u8; 32], time: &str, last: &[u8; 32]) -> String {
    format!(
        "{ORIGIN}{instance}\n{size}\n{}\ntime {time}\nlast {}\n",
        BASE64.encode(root),
        BASE64.encode(last)
    )
}

/// A checkpoint's line in the chain: `{"checkpoint":NOTE,"peaks":[...]}`,
/// canonical JSON, `peaks` the base64 roots of the tree's perfect subtrees
/// (largest first), from which a restarted writer grows the tree on.
pub(crate) fn line(note: &str, tree: &super::merkle::Tree) -> String {
    let peaks: Vec<String> = tree.peaks().map(|p| BASE64.encode(p)).collect();
    serde_json::to_string(&serde_json::json!({ "checkpoint": note, "peaks": peaks }))
        .expect("strings serialise")
}

/// The peaks of a checkpoint line, decoded.
pub(crate) fn peaks(value: &serde_json::Value) -> Option<Vec<[u8; 32]>> {
    value
        .as_array()?
        .iter()
        .map(|p| BASE64.decode(p.as_str()?).ok()?.try_into().ok())
        .collect()
}

/// A parsed checkpoint.
#[derive(Debug)]
pub(crate) struct Note {
    /// The signed text.
    pub(crate) body: String,
    pub(crate) instance: String,
    /// The tree's size: the seq of the last entry it covers.
    pub(crate) size: u64,
    /// The Merkle tree's root.
    pub(crate) root: [u8; 32],
    /// The leaf hash of the last entry it covers.
    pub(crate) last: [u8; 32],
    pub(crate) signatures: Vec<SignatureLine>,
}

/// A signature line's parts: the key's name, its id, the signature.
pub(crate) type SignatureLine = (String, [u8; 4], [u8; 64]);

/// Splits a signed note into its body (each line ending in a newline) and
/// its signature lines, checking their form (not the signatures).
pub(crate) fn split_signed(text: &str) -> Result<(String, Vec<SignatureLine>), &'static str> {
    let (body, signatures) = text
        .split_once("\n\n")
        .ok_or("note has no blank line before its signatures")?;
    let body = format!("{body}\n");
    let mut parsed: Vec<SignatureLine> = Vec::new();
    let signatures = signatures
        .strip_suffix('\n')
        .ok_or("note does not end with a newline")?;
    for line in signatures.split('\n') {
        let rest = line
            .strip_prefix(DASH)
            .ok_or("note signature line does not start with an em dash")?;
        let (name, sig) = rest
            .split_once(' ')
            .ok_or("note signature line has no key name")?;
        let raw = BASE64
            .decode(sig)
            .map_err(|_| "note signature is not base64")?;
        let (id, signature) = (raw.get(..4), raw.get(4..));
        let (Some(id), Some(signature)) = (id, signature) else {
            return Err("note signature is too short");
        };
        let id: [u8; 4] = id.try_into().expect("four bytes");
        let signature: [u8; 64] = signature
            .try_into()
            .map_err(|_| "note signature is not 64 bytes after its key id")?;
        if parsed.iter().any(|(n, i, _)| n == name && *i == id) {
            return Err("note carries two signature lines of one key");
        }
        parsed.push((name.to_owned(), id, signature));
    }
    Ok((body, parsed))
}

/// Reads a checkpoint's text, checking its form (not its signatures).
pub(crate) fn parse(text: &str) -> Result<Note, &'static str> {
    let (body, signatures) = split_signed(text)?;
    let [origin, size, root, time, last] =
        five_lines(&body).ok_or("checkpoint body is not five lines")?;
    let instance = origin_instance(origin, ORIGIN)
        .ok_or("checkpoint origin is not tower-idempotency/audit/<instance>")?;
    let size: u64 = size
        .parse()
        .ok()
        .filter(|_| !size.starts_with('0') || size == "0")
        .ok_or("checkpoint tree size is not a decimal number")?;
    let root: [u8; 32] = BASE64
        .decode(root)
        .ok()
        .and_then(|raw| raw.try_into().ok())
        .ok_or("checkpoint root is not the base64 of 32 bytes")?;
    let time = time_line(time).ok_or("checkpoint has no `time` line with an RFC 3339 time")?;
    let last: [u8; 32] = last
        .strip_prefix("last ")
        .and_then(|l| BASE64.decode(l).ok())
        .and_then(|raw| raw.try_into().ok())
        .ok_or("checkpoint has no `last` line with the base64 of the last entry's leaf hash")?;
    if body != note_body(instance, size, &root, time, &last) {
        return Err("checkpoint body is not in canonical form");
    }
    Ok(Note {
        instance: instance.to_owned(),
        body,
        size,
        root,
        last,
        signatures,
    })
}

/// The lines of a note's body, when it has exactly five.
pub(crate) fn five_lines(body: &str) -> Option<[&str; 5]> {
    let mut lines = body.lines();
    let five = [
        lines.next()?,
        lines.next()?,
        lines.next()?,
        lines.next()?,
        lines.next()?,
    ];
    lines.next().is_none().then_some(five)
}

/// The valid instance name an origin line gives after `prefix`.
pub(crate) fn origin_instance<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    line.strip_prefix(prefix)
        .filter(|i| super::entry::valid_instance(i))
}

/// The time of a `time <RFC 3339>` line.
pub(crate) fn time_line(line: &str) -> Option<&str> {
    line.strip_prefix("time ")
        .filter(|t| humantime::parse_rfc3339(t).is_ok())
}

/// 64 lowercase hex digits as 32 bytes.
pub(crate) fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    parse_hex(text)
}

/// `2 * N` lowercase hex digits as `N` bytes.
pub(crate) fn parse_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let bytes = text.as_bytes();
    if bytes.len() != 2 * N {
        return None;
    }
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Whether `body` is signed by one of `keys` with no bad line among theirs:
/// one valid signature of a trusted key, and no line of a trusted key that
/// fails (a junk line under a trusted key's name is not skipped).
pub(crate) fn signed_by_any(
    keys: &[AuditVerifier],
    body: &str,
    signatures: &[SignatureLine],
) -> Result<(), &'static str> {
    let mut valid = false;
    for key in keys {
        match key.signs_body(body, signatures) {
            Signed::Valid => valid = true,
            Signed::Bad => return Err(BAD_SIGNATURE),
            Signed::Absent => {}
        }
    }
    if valid { Ok(()) } else { Err(NOT_SIGNED) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_their_text_forms() {
        // Many keys, so that some have `+` in their base64.
        for seed in 0..64u8 {
            let signer = AuditSigner::from_seed("k", [seed; 32]);
            let public: AuditVerifier = signer.verifier().to_string().parse().unwrap();
            assert_eq!(public, signer.verifier());
            let again: AuditSigner = signer.to_secret_text().parse().unwrap();
            assert_eq!(again.verifier(), signer.verifier());
        }
        let signer = AuditSigner::generate("booking-audit").unwrap();
        let again: AuditSigner = signer.to_secret_text().parse().unwrap();
        assert_eq!(again.verifier(), signer.verifier());
        let public: AuditVerifier = signer.verifier().to_string().parse().unwrap();
        assert_eq!(public, signer.verifier());
        assert!(!format!("{signer:?}").contains(&signer.to_secret_text()[12..]));
    }

    #[test]
    fn bad_keys_are_named() {
        let signer = AuditSigner::generate("k").unwrap();
        let public = signer.verifier().to_string();
        // The base64 part may hold `+` itself: everything after the second.
        let wrong_id = format!("k+00000000+{}", public.splitn(3, '+').nth(2).unwrap());
        for (text, why) in [
            ("nonsense", "three parts"),
            (wrong_id.as_str(), "key id does not match"),
            ("k+0000000g+AQ==", "8 hex digits"),
            ("k+00000000+AQ==", "32 bytes"),
            ("k+00000000+AgAA", "Ed25519"),
            (signer.to_secret_text().as_str(), "signing key"),
        ] {
            let err = text.parse::<AuditVerifier>().unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
        // A key whose base64 holds `+` round-trips (about half of them do).
        let with_plus = (0..200)
            .map(|_| AuditSigner::generate("k").unwrap())
            .find(|s| {
                s.verifier()
                    .to_string()
                    .splitn(3, '+')
                    .nth(2)
                    .unwrap()
                    .contains('+')
            })
            .expect("one in 200 keys has a `+` in its base64");
        let text = with_plus.verifier().to_string();
        assert_eq!(text.parse::<AuditVerifier>().unwrap(), with_plus.verifier());
        let secret: AuditSigner = with_plus.to_secret_text().parse().unwrap();
        assert_eq!(secret.verifier(), with_plus.verifier());
        assert!(AuditSigner::generate("a+b").is_err());
        assert!(AuditSigner::generate("").is_err());
    }

    #[test]
    fn a_checkpoint_verifies_with_its_key_only() {
        let signer = AuditSigner::generate("k").unwrap();
        let other = AuditSigner::generate("k").unwrap();
        let text = signer.checkpoint("api-1", 42, &[7; 32], &[0; 32], SystemTime::UNIX_EPOCH);
        assert!(
            text.starts_with("tower-idempotency/audit/api-1\n42\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\ntime 1970-01-01T00:00:00.000Z\nlast AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\n\u{2014} k "),
            "{text}"
        );
        let note = parse(&text).unwrap();
        assert_eq!(
            (note.size, note.root, note.instance.as_str()),
            (42, [7; 32], "api-1")
        );
        signer.verifier().check(&note).unwrap();
        assert!(other.verifier().check(&note).is_err());
        let forged = text.replace("\n42\n", "\n43\n");
        let forged = parse(&forged).unwrap();
        assert_eq!(
            signer.verifier().check(&forged),
            Err("checkpoint signature does not verify")
        );
    }

    /// A signature line of the key that does not verify is refused even
    /// beside a valid one; another key's line (a witness) is left alone;
    /// two lines of one key are refused.
    #[test]
    fn junk_and_duplicated_signature_lines_are_refused() {
        let signer = AuditSigner::from_seed("k", [1; 32]);
        let witness = AuditSigner::from_seed("witness", [2; 32]);
        let text = signer.checkpoint("api-1", 3, &[9; 32], &[1; 32], SystemTime::UNIX_EPOCH);
        let (body, real) = text.split_once("\n\n").unwrap();
        let mut junk = Vec::from(signer.id);
        junk.extend_from_slice(&[0u8; 64]);
        let junk = format!("{DASH}k {}\n", BASE64.encode(junk));
        let junk_only = format!("{body}\n\n{junk}");
        assert_eq!(
            signer.verifier().check(&parse(&junk_only).unwrap()),
            Err("checkpoint signature does not verify")
        );
        let with_junk = format!("{body}\n\n{junk}{real}");
        assert_eq!(
            parse(&with_junk).unwrap_err(),
            "note carries two signature lines of one key"
        );
        let cosigned = witness.sign_note(&format!("{body}\n"));
        let cosignature = cosigned.split_once("\n\n").unwrap().1;
        let with_witness = format!("{body}\n\n{real}{cosignature}");
        signer
            .verifier()
            .check(&parse(&with_witness).unwrap())
            .unwrap();
        witness
            .verifier()
            .check(&parse(&with_witness).unwrap())
            .unwrap();
        let twice = format!("{body}\n\n{real}{real}");
        assert_eq!(
            parse(&twice).unwrap_err(),
            "note carries two signature lines of one key"
        );
    }
}
