//! The versioned encoding of a recorded response.
//!
//! Stores hold a record's response as opaque bytes; this module is the only
//! place that writes or reads them. Layout of version 1 (all integers
//! big-endian):
//!
//! ```text
//! "TI" 0x01                      magic and version
//! u16 status
//! u8  flags                      bit 0: body retained, bit 1: trailers present
//! u32 n, n x (u16 len, name, u32 len, value)     headers, in order
//! [u64 len, body]                if retained
//! [u32 n, n x (u16 len, name, u32 len, value)]   trailers, if present
//! ```
//!
//! Decoding is zero-copy: the body and header values are slices of the
//! stored bytes. It is fallible wherever a length or a count comes from the
//! bytes: a damaged record is an error, never a panic.
//!
//! A head (headers or trailers) holds at most [`MAX_FIELDS`] field values.
//! A response with more is recorded without its headers, trailers and body,
//! as "not retained": the decoder refuses such counts, so a record it could
//! not read back is never written.
//!
//! During a rolling deploy, instances of two versions of the crate read each
//! other's records. A record in an encoding version this build does not know
//! is an error ([`Corrupt::UnknownVersion`], answered 503
//! `store-unavailable`): never decoded with the wrong layout, never taken for
//! an absent record and executed again. A new encoding version therefore
//! ships first as a reader only, and is written only by a later release.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};

const MAGIC: &[u8; 2] = b"TI";
/// The encoding version this build writes, and the only one it reads.
const VERSION: u8 = 1;
const RETAINED: u8 = 1;
const HAS_TRAILERS: u8 = 2;

/// The most field values a recorded head (headers, or trailers) holds.
/// `http`'s `HeaderMap` cannot hold many more distinct names (about 24,000),
/// and no real response comes near it.
pub(crate) const MAX_FIELDS: usize = 8192;

/// A response read back from a store.
#[derive(Debug)]
pub(crate) struct Recorded {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    /// `None` when the body was over the response limit and not retained.
    pub(crate) body: Option<Bytes>,
    pub(crate) trailers: Option<HeaderMap>,
}

/// The record could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Corrupt {
    /// Written in an encoding version this build does not know (by a newer
    /// release, during a rolling deploy).
    UnknownVersion(u8),
    /// Not a record of this crate, or damaged.
    Damaged,
}

impl std::fmt::Display for Corrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Corrupt::UnknownVersion(v) => write!(
                f,
                "record encoding version {v} is unknown to this build (which reads version {VERSION})"
            ),
            Corrupt::Damaged => f.write_str("not a record of this crate, or damaged"),
        }
    }
}

/// Whether a response header is kept in the record.
///
/// Hop-by-hop headers describe one connection, not the response, and are
/// never replayed; `Set-Cookie` is replayed only when enabled, since it may
/// carry a session minted for the first caller.
/// Fields that describe one connection, never the response.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        *name,
        header::CONNECTION
            | header::TRANSFER_ENCODING
            | header::UPGRADE
            | header::TE
            | header::TRAILER
            | header::PROXY_AUTHENTICATE
            | header::PROXY_AUTHORIZATION
    ) || name == "keep-alive"
        || name == "proxy-connection"
}

pub(crate) fn is_replayable(name: &HeaderName, connection: &HeaderMap, keep_cookies: bool) -> bool {
    if is_hop_by_hop(name) || (!keep_cookies && *name == header::SET_COOKIE) {
        return false;
    }
    // Headers named by `Connection` are hop-by-hop too.
    !connection
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| name.as_str().eq_ignore_ascii_case(token.trim()))
}

/// Builds a record while the response body streams past.
///
/// The head is written when the response arrives; body bytes are appended as
/// they go by, so the body is copied once, straight into the record.
#[derive(Debug)]
pub(crate) struct RecordBuilder {
    buf: BytesMut,
    flags_at: usize,
    body_at: usize,
    limit: usize,
    retained: bool,
    /// Whether the head is recorded (it has at most [`MAX_FIELDS`] values).
    head_fits: bool,
    /// What the head's `Content-Length` fields say the body holds:
    /// `None` without one, `Some(None)` when they disagree or do not parse.
    declared: Option<Option<u64>>,
}

impl RecordBuilder {
    pub(crate) fn new(
        status: StatusCode,
        headers: &HeaderMap,
        keep_cookies: bool,
        limit: usize,
        expected_body: usize,
    ) -> Self {
        let keep = |name: &HeaderName| is_replayable(name, headers, keep_cookies);
        // A head the decoder would refuse is not kept: the record says only
        // that the request ran, and with which status.
        let head_fits = headers.len() <= MAX_FIELDS
            || headers.iter().filter(|(name, _)| keep(name)).count() <= MAX_FIELDS;
        let retained = head_fits && expected_body <= limit;
        let head_len = MAGIC.len() + 1 + 2 + 1 + headers_len(headers, keep) + 8;
        let head_len = if head_fits { head_len } else { 16 };
        let mut buf = BytesMut::with_capacity(head_len + if retained { expected_body } else { 0 });
        buf.put_slice(MAGIC);
        buf.put_u8(VERSION);
        buf.put_u16(status.as_u16());
        let flags_at = buf.len();
        buf.put_u8(0);
        if head_fits {
            put_headers(&mut buf, headers, keep);
        } else {
            tracing::warn!(
                values = headers.len(),
                "response head has more header values than a record keeps ({MAX_FIELDS}); recorded as not retained"
            );
            put_headers(&mut buf, &HeaderMap::new(), |_| true);
        }
        let body_at = buf.len();
        buf.put_u64(0);
        let mut declared = None;
        for value in headers.get_all(header::CONTENT_LENGTH) {
            let len = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            declared = match declared {
                None => Some(len),
                Some(earlier) if earlier == len => Some(len),
                Some(_) => Some(None),
            };
        }
        RecordBuilder {
            buf,
            flags_at,
            body_at,
            limit,
            retained,
            head_fits,
            declared,
        }
    }

    /// Appends a chunk of body; past the limit the body is dropped and the
    /// record becomes "not retained".
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        if !self.retained {
            return;
        }
        let body_len = self.buf.len() - self.body_at - 8;
        if body_len + chunk.len() > self.limit {
            self.give_up_body();
            return;
        }
        self.buf.put_slice(chunk);
    }

    /// Whether the body is still kept (not over the limit, not given up).
    pub(crate) fn is_retained(&self) -> bool {
        self.retained
    }

    /// Drops the body collected so far: the record will keep status and
    /// headers only.
    pub(crate) fn give_up_body(&mut self) {
        self.retained = false;
        self.buf.truncate(self.body_at + 8);
    }

    /// Finishes the record: the response is complete, trailers included.
    pub(crate) fn finish(mut self, trailers: Option<&HeaderMap>) -> Bytes {
        let trailers = match trailers {
            Some(trailers) if trailers.len() > MAX_FIELDS => {
                tracing::warn!(
                    values = trailers.len(),
                    "response trailers have more values than a record keeps ({MAX_FIELDS}); recorded as not retained"
                );
                self.give_up_body();
                None
            }
            _ if !self.head_fits => None,
            other => other,
        };
        if self.retained && self.head_fits {
            let body_len = (self.buf.len() - self.body_at - 8) as u64;
            // A body its head's length does not describe cannot be replayed
            // whole on a connection: keep the outcome only.
            if self
                .declared
                .is_some_and(|declared| declared != Some(body_len))
            {
                self.give_up_body();
            }
        }
        let mut flags = 0;
        if self.retained {
            flags |= RETAINED;
            let body_len = (self.buf.len() - self.body_at - 8) as u64;
            self.buf[self.body_at..self.body_at + 8].copy_from_slice(&body_len.to_be_bytes());
        } else {
            self.buf.truncate(self.body_at);
        }
        if let Some(trailers) = trailers {
            flags |= HAS_TRAILERS;
            put_headers(&mut self.buf, trailers, |name| !is_hop_by_hop(name));
        }
        self.buf[self.flags_at] = flags;
        // A body of unannounced length grew the buffer by doubling: give the
        // slack back rather than keep it for the record's lifetime.
        if self.buf.capacity() - self.buf.len() > 64 + self.buf.len() / 8 {
            return Bytes::copy_from_slice(&self.buf);
        }
        self.buf.freeze()
    }

    /// The same record with its body given up, for a store that has no room
    /// for the whole response.
    pub(crate) fn without_body(payload: &Bytes) -> Result<Bytes, Corrupt> {
        let recorded = decode(payload.clone())?;
        let mut builder = RecordBuilder::new(recorded.status, &recorded.headers, true, 0, 0);
        builder.give_up_body();
        Ok(builder.finish(recorded.trailers.as_ref()))
    }
}

/// Encoded size of the headers `put_headers` writes.
fn headers_len(headers: &HeaderMap, keep: impl Fn(&HeaderName) -> bool) -> usize {
    4 + headers
        .iter()
        .filter(|(name, _)| keep(name))
        .map(|(name, value)| 2 + name.as_str().len() + 4 + value.len())
        .sum::<usize>()
}

fn put_headers(buf: &mut BytesMut, headers: &HeaderMap, keep: impl Fn(&HeaderName) -> bool) {
    let count_at = buf.len();
    buf.put_u32(0);
    let mut count = 0u32;
    for (name, value) in headers {
        if !keep(name) {
            continue;
        }
        count += 1;
        // Header names are short and values are bounded by the server's
        // header limits, far below these widths.
        buf.put_u16(name.as_str().len() as u16);
        buf.put_slice(name.as_str().as_bytes());
        buf.put_u32(value.len() as u32);
        buf.put_slice(value.as_bytes());
    }
    buf[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
}

/// Reads a record written by [`RecordBuilder`].
pub(crate) fn decode(mut bytes: Bytes) -> Result<Recorded, Corrupt> {
    if !bytes.starts_with(MAGIC) {
        return Err(Corrupt::Damaged);
    }
    match bytes.get(MAGIC.len()) {
        Some(&VERSION) => {}
        Some(&other) => return Err(Corrupt::UnknownVersion(other)),
        None => return Err(Corrupt::Damaged),
    }
    if bytes.len() < MAGIC.len() + 1 + 3 {
        return Err(Corrupt::Damaged);
    }
    bytes.advance(MAGIC.len() + 1);
    let status = StatusCode::from_u16(bytes.get_u16()).map_err(|_| Corrupt::Damaged)?;
    // Only final responses are recorded.
    if status.is_informational() {
        return Err(Corrupt::Damaged);
    }
    let flags = bytes.get_u8();
    if flags & !(RETAINED | HAS_TRAILERS) != 0 {
        return Err(Corrupt::Damaged);
    }
    let headers = take_headers(&mut bytes)?;
    let body = if flags & RETAINED != 0 {
        let len = take_len(&mut bytes, 8)?;
        Some(bytes.split_to(len))
    } else {
        None
    };
    let trailers = if flags & HAS_TRAILERS != 0 {
        Some(take_headers(&mut bytes)?)
    } else {
        None
    };
    if bytes.has_remaining() {
        return Err(Corrupt::Damaged);
    }
    // A length that is not the body's would desynchronise the connection
    // the replay goes out on.
    if let Some(body) = &body {
        let lengths = headers.get_all(header::CONTENT_LENGTH);
        if lengths.iter().any(|v| {
            v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) != Some(body.len() as u64)
        }) {
            return Err(Corrupt::Damaged);
        }
    }
    Ok(Recorded {
        status,
        headers,
        body,
        trailers,
    })
}

/// Reads a length of `width` bytes and checks that many bytes follow it.
fn take_len(bytes: &mut Bytes, width: usize) -> Result<usize, Corrupt> {
    if bytes.remaining() < width {
        return Err(Corrupt::Damaged);
    }
    let len = match width {
        2 => u64::from(bytes.get_u16()),
        4 => u64::from(bytes.get_u32()),
        _ => bytes.get_u64(),
    };
    let len = usize::try_from(len).map_err(|_| Corrupt::Damaged)?;
    if bytes.remaining() < len {
        return Err(Corrupt::Damaged);
    }
    Ok(len)
}

fn take_headers(bytes: &mut Bytes) -> Result<HeaderMap, Corrupt> {
    let count = take_count(bytes)?;
    // Each header takes at least 6 bytes: refuse counts the input cannot hold
    // before reserving room for them, and counts no record is written with.
    if count > MAX_FIELDS || count > bytes.remaining() / 6 {
        return Err(Corrupt::Damaged);
    }
    // One spare slot: a replay adds `Idempotent-Replayed`.
    let mut headers = HeaderMap::try_with_capacity(count + 1).map_err(|_| Corrupt::Damaged)?;
    for _ in 0..count {
        let len = take_len(bytes, 2)?;
        let name = HeaderName::from_bytes(&bytes.split_to(len)).map_err(|_| Corrupt::Damaged)?;
        let len = take_len(bytes, 4)?;
        let value =
            HeaderValue::from_maybe_shared(bytes.split_to(len)).map_err(|_| Corrupt::Damaged)?;
        // Never written: hop-by-hop fields describe one connection, and a
        // replay carrying them would be misread by the client.
        if is_hop_by_hop(&name) {
            return Err(Corrupt::Damaged);
        }
        headers
            .try_append(name, value)
            .map_err(|_| Corrupt::Damaged)?;
    }
    Ok(headers)
}

fn take_count(bytes: &mut Bytes) -> Result<usize, Corrupt> {
    if bytes.remaining() < 4 {
        return Err(Corrupt::Damaged);
    }
    Ok(bytes.get_u32() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.append("content-type", HeaderValue::from_static("application/json"));
        h.append("x-multi", HeaderValue::from_static("one"));
        h.append("x-multi", HeaderValue::from_static("two"));
        h.append("set-cookie", HeaderValue::from_static("s=1"));
        h.append("connection", HeaderValue::from_static("x-private"));
        h.append("x-private", HeaderValue::from_static("hop"));
        h.append("transfer-encoding", HeaderValue::from_static("chunked"));
        h
    }

    #[test]
    fn round_trip_keeps_order_repeats_body_and_trailers() {
        let mut b = RecordBuilder::new(StatusCode::CREATED, &sample_headers(), false, 100, 0);
        b.push(b"hello ");
        b.push(b"world");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let rec = decode(b.finish(Some(&trailers))).unwrap();
        assert_eq!(rec.status, StatusCode::CREATED);
        assert_eq!(rec.body.as_deref(), Some(&b"hello world"[..]));
        let multi: Vec<_> = rec.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["one", "two"]);
        for dropped in ["set-cookie", "connection", "x-private", "transfer-encoding"] {
            assert!(!rec.headers.contains_key(dropped), "{dropped} was kept");
        }
        assert_eq!(rec.trailers.unwrap()["grpc-status"], "0");
    }

    #[test]
    fn cookies_kept_when_enabled() {
        let b = RecordBuilder::new(StatusCode::OK, &sample_headers(), true, 100, 0);
        let rec = decode(b.finish(None)).unwrap();
        assert_eq!(rec.headers["set-cookie"], "s=1");
        assert!(rec.trailers.is_none());
    }

    #[test]
    fn over_the_limit_is_not_retained() {
        let mut b = RecordBuilder::new(StatusCode::OK, &HeaderMap::new(), false, 8, 0);
        b.push(b"12345");
        b.push(b"6789");
        b.push(b"more");
        let rec = decode(b.finish(None)).unwrap();
        assert_eq!(rec.status, StatusCode::OK);
        assert!(rec.body.is_none());
    }

    #[test]
    fn without_body_keeps_the_head() {
        let mut b = RecordBuilder::new(StatusCode::ACCEPTED, &sample_headers(), false, 100, 0);
        b.push(b"body");
        let slim = RecordBuilder::without_body(&b.finish(None)).unwrap();
        let rec = decode(slim).unwrap();
        assert_eq!(rec.status, StatusCode::ACCEPTED);
        assert!(rec.body.is_none());
        assert_eq!(rec.headers.get_all("x-multi").iter().count(), 2);
    }

    #[test]
    fn every_truncation_and_garbage_is_an_error_not_a_panic() {
        let mut b = RecordBuilder::new(StatusCode::OK, &sample_headers(), false, 100, 0);
        b.push(b"payload");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let full = b.finish(Some(&trailers));
        for cut in 0..full.len() {
            assert_eq!(
                decode(full.slice(..cut)).unwrap_err(),
                Corrupt::Damaged,
                "cut {cut}"
            );
        }
        let mut extended = full.to_vec();
        extended.push(0);
        assert!(decode(extended.into()).is_err());
        assert!(decode(Bytes::from_static(b"{\"json\":true}")).is_err());
        let mut bad_status = full.to_vec();
        bad_status[3..5].copy_from_slice(&1000u16.to_be_bytes());
        assert!(decode(bad_status.into()).is_err());
        let mut huge_count = full.to_vec();
        huge_count[6..10].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(huge_count.into()).is_err());
    }

    #[test]
    fn a_record_in_another_encoding_version_is_refused_never_misread() {
        let mut b = RecordBuilder::new(StatusCode::CREATED, &sample_headers(), false, 100, 0);
        b.push(b"booking 1");
        let written = b.finish(None);
        assert_eq!(&written[..3], b"TI\x01", "magic, then the version byte");
        assert!(decode(written.clone()).is_ok());
        for version in [0u8, 2, 3, 0x7f, 0xff] {
            let mut other = written.to_vec();
            other[2] = version;
            assert_eq!(
                decode(other.into()).unwrap_err(),
                Corrupt::UnknownVersion(version),
                "version {version}"
            );
        }
        // A body that would decode with this layout does not change that.
        let mut newer = written.to_vec();
        newer[2] = 2;
        assert!(RecordBuilder::without_body(&newer.into()).is_err());
    }

    #[test]
    fn trailers_past_the_field_limit_keep_only_the_status() {
        let mut b = RecordBuilder::new(StatusCode::OK, &sample_headers(), false, 100, 0);
        b.push(b"payload");
        let mut trailers = HeaderMap::new();
        for i in 0..=MAX_FIELDS {
            trailers.append("x-t", HeaderValue::from(i));
        }
        let rec = decode(b.finish(Some(&trailers))).unwrap();
        assert_eq!(rec.status, StatusCode::OK);
        assert!(rec.body.is_none() && rec.trailers.is_none());
    }

    #[test]
    fn a_head_at_the_field_limit_is_kept_and_one_past_it_is_not() {
        for (count, kept) in [(MAX_FIELDS, true), (MAX_FIELDS + 1, false)] {
            let mut headers = HeaderMap::new();
            for i in 0..count {
                headers.append("x-h", HeaderValue::from(i));
            }
            let mut b = RecordBuilder::new(StatusCode::CREATED, &headers, false, 100, 0);
            b.push(b"ok");
            let rec = decode(b.finish(None)).unwrap();
            assert_eq!(rec.status, StatusCode::CREATED);
            assert_eq!(rec.body.is_some(), kept, "{count}");
            let expected = if kept { count } else { 0 };
            assert_eq!(rec.headers.len(), expected, "{count}");
        }
    }

    /// Records that would be misread on the wire are refused on replay:
    /// hop-by-hop fields, a `Content-Length` that is not the body's, an
    /// informational status. The builder never writes them.
    #[test]
    fn heads_a_connection_would_misread_are_refused() {
        let head = |status: u16, fields: &[(&str, &str)], body: &[u8]| {
            let mut record = b"TI\x01".to_vec();
            record.extend_from_slice(&status.to_be_bytes());
            record.push(RETAINED);
            record.extend_from_slice(&(fields.len() as u32).to_be_bytes());
            for (name, value) in fields {
                record.extend_from_slice(&(name.len() as u16).to_be_bytes());
                record.extend_from_slice(name.as_bytes());
                record.extend_from_slice(&(value.len() as u32).to_be_bytes());
                record.extend_from_slice(value.as_bytes());
            }
            record.extend_from_slice(&(body.len() as u64).to_be_bytes());
            record.extend_from_slice(body);
            decode(Bytes::from(record))
        };
        assert!(head(201, &[("content-length", "2")], b"{}").is_ok());
        for (status, fields) in [
            (201, &[("transfer-encoding", "chunked")][..]),
            (201, &[("connection", "close")][..]),
            (201, &[("keep-alive", "timeout=5")][..]),
            (201, &[("content-length", "100")][..]),
            (201, &[("content-length", "1")][..]),
            (201, &[("content-length", "2"), ("content-length", "3")][..]),
            (201, &[("content-length", "two")][..]),
            (100, &[][..]),
            (101, &[][..]),
            (103, &[][..]),
        ] {
            assert_eq!(
                head(status, fields, b"{}").unwrap_err(),
                Corrupt::Damaged,
                "{status} {fields:?}"
            );
        }
        // What the builder writes for such a response decodes: a length
        // that is not the body's keeps the outcome only.
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        let mut b = RecordBuilder::new(StatusCode::CREATED, &headers, false, 1000, 0);
        b.push(b"{}");
        let mut trailers = HeaderMap::new();
        trailers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let rec = decode(b.finish(Some(&trailers))).unwrap();
        assert!(rec.body.is_none(), "not retained");
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        let mut b = RecordBuilder::new(StatusCode::CREATED, &headers, false, 1000, 2);
        b.push(b"{}");
        let rec = decode(b.finish(Some(&trailers))).unwrap();
        assert_eq!(rec.body.as_deref(), Some(&b"{}"[..]));
        let trailers = rec.trailers.unwrap();
        assert!(!trailers.contains_key(header::CONNECTION) && trailers.contains_key("grpc-status"));
    }

    fn a_record() -> impl proptest::strategy::Strategy<Value = Bytes> {
        use proptest::prelude::*;
        let field = ("[a-z-]{1,12}", proptest::collection::vec(32u8..127, 0..20));
        (
            200u16..600,
            proptest::collection::vec(field.clone(), 0..8),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
            proptest::option::of(proptest::collection::vec(field, 0..4)),
        )
            .prop_map(|(status, headers, body, trailers)| {
                let map = |fields: Vec<(String, Vec<u8>)>| {
                    let mut map = HeaderMap::new();
                    for (name, value) in fields {
                        map.append(
                            HeaderName::from_bytes(name.as_bytes()).unwrap(),
                            HeaderValue::from_bytes(&value).unwrap(),
                        );
                    }
                    map
                };
                let status = StatusCode::from_u16(status).unwrap();
                let limit = if body.is_some() { 64 } else { 0 };
                let mut b = RecordBuilder::new(status, &map(headers), true, limit, 0);
                b.push(body.as_deref().unwrap_or(b"x"));
                b.finish(trailers.map(map).as_ref())
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        /// Whatever the bytes, decoding answers (a record or an error) and
        /// never panics; bytes not starting with the magic are `Damaged`.
        #[test]
        fn any_bytes_decode_or_fail_without_panic(
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            magic in proptest::prelude::any::<bool>(),
        ) {
            let mut bytes = if magic { b"TI\x01".to_vec() } else { Vec::new() };
            bytes.extend_from_slice(&tail);
            let starts = bytes.starts_with(MAGIC);
            match decode(bytes.into()) {
                Ok(rec) => proptest::prop_assert!(rec.headers.len() <= MAX_FIELDS),
                Err(Corrupt::UnknownVersion(_)) => proptest::prop_assert!(starts),
                Err(Corrupt::Damaged) => {}
            }
        }

        /// A record this build wrote decodes; the same record with any byte
        /// changed, cut or extended decodes or fails, never panics, and a
        /// decoded record can always be slimmed and read again.
        #[test]
        fn damaged_records_fail_without_panic(
            record in a_record(),
            at in proptest::prelude::any::<proptest::sample::Index>(),
            byte in proptest::prelude::any::<u8>(),
            how in 0u8..3,
        ) {
            proptest::prop_assert!(decode(record.clone()).is_ok());
            let mut damaged = record.to_vec();
            let i = at.index(damaged.len());
            match how {
                0 => damaged[i] = byte,
                1 => damaged.truncate(i),
                _ => damaged.insert(i, byte),
            }
            let damaged = Bytes::from(damaged);
            if decode(damaged.clone()).is_ok() {
                let slim = RecordBuilder::without_body(&damaged).unwrap();
                proptest::prop_assert!(decode(slim).is_ok());
            }
        }
    }
}
