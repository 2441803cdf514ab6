//! Parsing the `Idempotency-Key` header value.
//!
//! Two spellings are accepted and mean the same key:
//! - the IETF form, an RFC 8941 sf-string: `"abc"`, where `\"` and `\\` are the
//!   only escapes;
//! - the bare form many clients send: `abc`.
//!
//! After unquoting, a key is 1 to [`MAX_KEY_LEN`] characters of visible ASCII
//! (0x21 to 0x7E). A value that begins with `"` is an sf-string and must be a
//! valid one.

use std::{borrow::Cow, fmt};

use http::HeaderValue;

/// The longest key accepted, in characters (after unquoting).
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key, unquoted.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Box<str>);

impl IdempotencyKey {
    /// Parses a header value, accepting both the sf-string and the bare form.
    ///
    /// ```
    /// use http::HeaderValue;
    /// use tower_idempotency::IdempotencyKey;
    ///
    /// let quoted = IdempotencyKey::parse(&HeaderValue::from_static(r#""order-7""#)).unwrap();
    /// let bare = IdempotencyKey::parse(&HeaderValue::from_static("order-7")).unwrap();
    /// assert_eq!(quoted, bare);
    /// assert_eq!(bare.as_str(), "order-7");
    /// ```
    pub fn parse(value: &HeaderValue) -> Result<Self, KeyError> {
        parse_bytes(value.as_bytes())
    }

    /// The key as the client chose it, unquoted.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    // Keys may be guessable secrets of a sort (an order number); keep them out
    // of logs unless asked for explicitly through `as_str`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey(<{} chars>)", self.0.len())
    }
}

/// Why a header value is not a valid key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The value is empty (or only whitespace, or `""`).
    Empty,
    /// More than [`MAX_KEY_LEN`] characters after unquoting.
    TooLong,
    /// A byte outside visible ASCII (0x21 to 0x7E), such as a space, a control
    /// character or a non-ASCII byte.
    InvalidCharacter,
    /// The value starts with `"` but is not a valid RFC 8941 sf-string: an
    /// unterminated string, an escape other than `\"` or `\\`, or text after
    /// the closing quote.
    BadQuoting,
    /// The header appears more than once, so the key is ambiguous.
    Repeated,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyError::Empty => "the key is empty",
            KeyError::TooLong => "the key is longer than 255 characters",
            KeyError::InvalidCharacter => {
                "the key may only contain visible ASCII characters (0x21 to 0x7E)"
            }
            KeyError::BadQuoting => {
                "the key starts with '\"' but is not a valid RFC 8941 string: \
                 it must end with '\"', use only the escapes \\\" and \\\\, \
                 and have nothing after the closing quote"
            }
            KeyError::Repeated => "the key header was sent more than once",
        })
    }
}

impl std::error::Error for KeyError {}

fn is_visible(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

fn trim_ows(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

pub(crate) fn parse_bytes(raw: &[u8]) -> Result<IdempotencyKey, KeyError> {
    parse_borrowed(raw).map(|key| IdempotencyKey(key.into()))
}

/// Parses and validates a key, borrowing it from the header value when it
/// needs no unquoting (the common, bare case).
pub(crate) fn parse_borrowed(raw: &[u8]) -> Result<Cow<'_, str>, KeyError> {
    let raw = trim_ows(raw);
    let key = match raw.first() {
        None => return Err(KeyError::Empty),
        Some(b'"') => Cow::Owned(unquote(&raw[1..])?),
        Some(_) => {
            if !raw.iter().copied().all(is_visible) {
                return Err(KeyError::InvalidCharacter);
            }
            Cow::Borrowed(std::str::from_utf8(raw).map_err(|_| KeyError::InvalidCharacter)?)
        }
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    Ok(key)
}

/// Unquotes the inside of an sf-string (the opening quote already consumed).
fn unquote(inner: &[u8]) -> Result<String, KeyError> {
    let mut out = String::with_capacity(inner.len());
    let mut bytes = inner.iter().copied();
    loop {
        match bytes.next() {
            // Unterminated.
            None => return Err(KeyError::BadQuoting),
            Some(b'"') => break,
            Some(b'\\') => match bytes.next() {
                Some(c @ (b'"' | b'\\')) => out.push(char::from(c)),
                _ => return Err(KeyError::BadQuoting),
            },
            // A legal sf-string character that a key may not hold.
            Some(b' ') => return Err(KeyError::InvalidCharacter),
            Some(c) if is_visible(c) => out.push(char::from(c)),
            Some(_) => return Err(KeyError::InvalidCharacter),
        }
    }
    if bytes.next().is_some() {
        return Err(KeyError::BadQuoting);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[u8]) -> Result<String, KeyError> {
        parse_bytes(s).map(|k| k.as_str().to_owned())
    }

    #[test]
    fn bare_and_quoted_forms_are_the_same_key() {
        assert_eq!(parse(b"abc").unwrap(), "abc");
        assert_eq!(parse(b"\"abc\"").unwrap(), "abc");
        assert_eq!(parse(b"  abc\t").unwrap(), "abc");
    }

    #[test]
    fn escapes_are_unquoted() {
        assert_eq!(parse(br#""a\"b""#).unwrap(), "a\"b");
        assert_eq!(parse(br#""a\\b""#).unwrap(), "a\\b");
    }

    #[test]
    fn every_bad_input_is_named() {
        assert_eq!(parse(b""), Err(KeyError::Empty));
        assert_eq!(parse(b"   "), Err(KeyError::Empty));
        assert_eq!(parse(b"\"\""), Err(KeyError::Empty));
        assert_eq!(parse(b"\"abc"), Err(KeyError::BadQuoting));
        assert_eq!(parse(b"\"abc\"x"), Err(KeyError::BadQuoting));
        assert_eq!(parse(br#""a\nb""#), Err(KeyError::BadQuoting));
        assert_eq!(parse(b"\"a b\""), Err(KeyError::InvalidCharacter));
        assert_eq!(parse(b"a b"), Err(KeyError::InvalidCharacter));
        assert_eq!(
            parse("caf\u{e9}".as_bytes()),
            Err(KeyError::InvalidCharacter)
        );
        assert_eq!(parse(&[b'a'; 256]), Err(KeyError::TooLong));
        assert_eq!(parse(&[b'a'; 255]).unwrap().len(), 255);
    }

    #[test]
    fn length_is_counted_after_unquoting() {
        let mut quoted = vec![b'"'];
        quoted.extend([b'k'; 255]);
        quoted.push(b'"');
        assert_eq!(parse(&quoted).unwrap().len(), 255);
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let key = parse_bytes(b"secret-order-9").unwrap();
        assert!(!format!("{key:?}").contains("secret"));
    }
}
