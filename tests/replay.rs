//! Replay fidelity, logging hygiene and key parsing over generated inputs.

mod common;

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use common::{Captured, body_bytes, post_with_key};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore, Outcome};

/// A body of two data frames and trailers, as a gRPC response has.
struct WithTrailers {
    /// Popped from the end.
    frames: Vec<Frame<Bytes>>,
}

impl WithTrailers {
    fn new() -> Self {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("grpc-message", HeaderValue::from_static("ok"));
        WithTrailers {
            frames: vec![
                Frame::trailers(trailers),
                Frame::data(Bytes::from_static(b"\x00binary\r\n")),
                Frame::data(Bytes::from_static(&[0x00, 0xff, 0x10])),
            ],
        }
    }
}

impl Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.frames.pop().map(Ok))
    }
}

fn rich_response() -> Response<WithTrailers> {
    let mut response = Response::new(WithTrailers::new());
    *response.status_mut() = StatusCode::ACCEPTED;
    let h = response.headers_mut();
    h.append("content-type", HeaderValue::from_static("application/grpc"));
    h.append("x-multi", HeaderValue::from_static("first"));
    h.append("link", HeaderValue::from_static("</a>; rel=a"));
    h.append("x-multi", HeaderValue::from_static("second"));
    h.append(
        "set-cookie",
        HeaderValue::from_static("session=first-caller"),
    );
    h.append("connection", HeaderValue::from_static("x-hop"));
    h.append(
        "x-hop",
        HeaderValue::from_static("only for this connection"),
    );
    h.append("keep-alive", HeaderValue::from_static("timeout=5"));
    response
}

struct Collected {
    status: StatusCode,
    headers: HeaderMap,
    data: Bytes,
    trailers: Option<HeaderMap>,
}

async fn collect<B: Body<Data = Bytes>>(response: Response<B>) -> Collected
where
    B::Error: std::fmt::Debug,
{
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    Collected {
        status: parts.status,
        headers: parts.headers,
        trailers: collected.trailers().cloned(),
        data: collected.to_bytes(),
    }
}

fn values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect()
}

#[tokio::test]
async fn replay_keeps_status_headers_in_order_bytes_and_trailers() {
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .service(service_fn(|_req| async {
            Ok::<_, Infallible>(rich_response())
        }));

    let first = collect(svc.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    let replay = collect(svc.oneshot(post_with_key("k", "x")).await.unwrap()).await;

    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert_eq!(
        first.data,
        Bytes::from_static(b"\x00\xff\x10\x00binary\r\n")
    );
    assert_eq!(first.trailers.as_ref().unwrap()["grpc-status"], "0");

    assert_eq!(replay.status, first.status);
    assert_eq!(replay.data, first.data);
    assert_eq!(replay.trailers, first.trailers);
    assert_eq!(values(&replay.headers, "x-multi"), ["first", "second"]);
    assert_eq!(values(&replay.headers, "link"), ["</a>; rel=a"]);
    assert_eq!(
        values(&replay.headers, "content-type"),
        ["application/grpc"]
    );
    assert_eq!(values(&replay.headers, "idempotent-replayed"), ["true"]);
    for dropped in ["set-cookie", "connection", "x-hop", "keep-alive"] {
        assert!(!replay.headers.contains_key(dropped), "{dropped} replayed");
    }
    // Every other header comes back, in its original order.
    let order = |headers: &HeaderMap| {
        headers
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .filter(|h| !h.starts_with("idempotent-replayed"))
            .collect::<Vec<_>>()
    };
    let mut expected = first.headers.clone();
    for dropped in ["set-cookie", "connection", "x-hop", "keep-alive"] {
        expected.remove(dropped);
    }
    assert_eq!(order(&replay.headers), order(&expected));
}

#[tokio::test]
async fn set_cookie_is_replayed_when_enabled() {
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_replay_set_cookie(true))
        .service(service_fn(|_req| async {
            Ok::<_, Infallible>(rich_response())
        }));
    collect(svc.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    let replay = collect(svc.oneshot(post_with_key("k", "x")).await.unwrap()).await;
    assert_eq!(
        values(&replay.headers, "set-cookie"),
        ["session=first-caller"]
    );
}

#[tokio::test]
async fn an_unreadable_record_is_503_and_never_a_second_execution() {
    let counter = common::Counter::default();
    let store = tower_idempotency::store::FaultyStore::new(MemoryStore::default());
    let app = common::booking_router(counter.clone()).layer(IdempotencyLayer::new(store.clone()));
    body_bytes(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
    store.set_fault(
        tower_idempotency::store::Op::Claim,
        Some(tower_idempotency::store::Fault::Corrupt),
    );
    let response = app.oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.extensions().get::<Outcome>(),
        Some(&Outcome::Rejected(
            tower_idempotency::RejectionKind::StoreUnavailable
        ))
    );
    assert_eq!(counter.get(), 1);
}

/// Sends `bodies` with `key` through the layer, one after another, with
/// `subscriber` receiving what it logs.
fn send_logged(
    subscriber: impl tracing::Subscriber + Send + Sync + 'static,
    key: &str,
    bodies: [&'static str; 3],
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let app = common::booking_router(common::Counter::default())
                .layer(IdempotencyLayer::new(MemoryStore::default()));
            for body in bodies {
                body_bytes(app.clone().oneshot(post_with_key(key, body)).await.unwrap()).await;
            }
        })
    });
}

#[test]
fn logs_carry_a_hash_of_the_key_never_the_key_or_body() {
    let captured = Captured::default();
    let subscriber = captured.subscriber(tracing::Level::TRACE);
    send_logged(
        subscriber,
        "order-key-4f1c9",
        ["patient-secret-body", "patient-secret-body", "other"],
    );
    let logs = captured.text();
    assert!(logs.contains("key="), "events carry a key hash:\n{logs}");
    assert!(logs.contains("replaying"), "{logs}");
    assert!(logs.contains("key-reused"), "{logs}");
    assert!(!logs.contains("order-key-4f1c9"), "raw key logged:\n{logs}");
    assert!(
        !logs.contains("patient-secret-body"),
        "body logged:\n{logs}"
    );
}

/// Quotes a key as an RFC 8941 sf-string.
fn quote(key: &str) -> String {
    let mut out = String::from("\"");
    for c in key.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn parse(bytes: &[u8]) -> Result<IdempotencyKey, KeyError> {
    match HeaderValue::from_bytes(bytes) {
        Ok(value) => IdempotencyKey::parse(&value),
        // Not a header value at all (a control byte): a server never hands
        // the layer one.
        Err(_) => Err(KeyError::InvalidCharacter),
    }
}

proptest! {
    /// Any key of 1 to 255 visible characters is accepted bare (unless it
    /// starts with a quote) and quoted, and both spell the same key.
    #[test]
    fn valid_keys_parse_bare_and_quoted(key in "[\\x21-\\x7e]{1,255}") {
        let quoted = parse(quote(&key).as_bytes()).unwrap();
        prop_assert_eq!(quoted.as_str(), key.as_str());
        if !key.starts_with('"') {
            let bare = parse(key.as_bytes()).unwrap();
            prop_assert_eq!(bare, quoted);
        }
    }

    /// Whatever the bytes, parsing never panics, and what it accepts is
    /// always 1 to 255 visible ASCII characters.
    #[test]
    fn any_input_is_accepted_only_as_a_valid_key(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(key) = parse(&raw) {
            prop_assert!((1..=255).contains(&key.as_str().len()));
            prop_assert!(key.as_str().bytes().all(|b| (0x21..=0x7e).contains(&b)));
        }
    }

    /// Keys over 255 characters are rejected, quoted or not.
    #[test]
    fn long_keys_are_rejected(key in "[a-z0-9]{256,400}") {
        prop_assert_eq!(parse(key.as_bytes()), Err(KeyError::TooLong));
        prop_assert_eq!(parse(quote(&key).as_bytes()), Err(KeyError::TooLong));
    }

    /// A value starting with a quote must be a whole sf-string.
    #[test]
    fn trailing_text_after_the_closing_quote_is_rejected(key in "[a-z]{1,20}", tail in "[a-z\"]{1,5}") {
        let value = format!("{}{tail}", quote(&key));
        prop_assert_eq!(parse(value.as_bytes()), Err(KeyError::BadQuoting));
    }
}

/// Every record comes back in encoding version 2.
fn written_by_a_newer_release(record: &[u8]) -> Vec<u8> {
    let mut newer = record.to_vec();
    assert_eq!(&newer[..3], b"TI\x01", "this build writes version 1");
    newer[2] = 2;
    newer
}

/// A record in an encoding version this build does not know is 503
/// `store-unavailable` on every retry: never misread, never executed again.
#[tokio::test]
async fn a_record_in_an_unknown_encoding_version_is_503_never_a_second_execution() {
    let counter = common::Counter::default();
    let app = common::booking_router(counter.clone()).layer(IdempotencyLayer::new(
        common::Altered::rewriting(written_by_a_newer_release),
    ));
    let first = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    body_bytes(first).await;
    for _ in 0..3 {
        let retry = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
        assert_eq!(
            retry.extensions().get::<Outcome>(),
            Some(&Outcome::Rejected(
                tower_idempotency::RejectionKind::StoreUnavailable
            ))
        );
        let (status, code, _) = common::problem(retry).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "store-unavailable")
        );
    }
    assert_eq!(counter.get(), 1, "the intent ran once");
}

/// Each protected request has a span with hashes of its key and scope and
/// its outcome, for an OpenTelemetry subscriber to export; never the raw
/// key or scope.
#[test]
fn each_protected_request_has_a_span_with_its_outcome() {
    use tracing_subscriber::fmt::format::FmtSpan;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_span_events(FmtSpan::CLOSE)
        .with_writer(move || writer.clone())
        .finish();
    send_logged(subscriber, "span-key-7c1d", ["x", "x", "y"]);
    let text = captured.text();
    let spans: Vec<_> = text
        .lines()
        .filter(|l| l.contains("idempotency{"))
        .collect();
    assert_eq!(spans.len(), 3, "{text}");
    for (line, outcome) in spans.iter().zip(["executed", "replayed", "key_reused"]) {
        assert!(
            line.contains(&format!("outcome=\"{outcome}\""))
                || line.contains(&format!("outcome={outcome}")),
            "{line}"
        );
        assert!(line.contains("key=") && line.contains("scope="), "{line}");
    }
    assert!(!text.contains("span-key-7c1d"), "the raw key never appears");
    assert!(!text.contains("test-caller"), "nor the credential");
}

/// A response with more header values than a record keeps: the first
/// caller gets it whole; every retry is told it ran and with which status
/// (410 `response-not-retained`), never a panic, never a second execution.
#[tokio::test]
async fn a_response_with_too_many_header_values_is_kept_as_not_retained() {
    let counter = common::Counter::default();
    let runs = counter.clone();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .service(service_fn(move |_req| {
            runs.hit();
            async {
                let mut response =
                    Response::new(http_body_util::Full::new(Bytes::from_static(b"booked")));
                *response.status_mut() = StatusCode::CREATED;
                for i in 0..30_000u32 {
                    response
                        .headers_mut()
                        .append("x-many", HeaderValue::from(i));
                }
                Ok::<_, Infallible>(response)
            }
        }));
    let first = svc.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(first.headers().get_all("x-many").iter().count(), 30_000);
    assert_eq!(body_bytes(first).await, "booked");
    for _ in 0..2 {
        let retry = svc.clone().oneshot(post_with_key("k", "x")).await.unwrap();
        let (status, code, doc) = common::problem(retry).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::GONE, "response-not-retained")
        );
        assert!(doc["detail"].as_str().unwrap().contains("201"), "{doc}");
    }
    assert_eq!(counter.get(), 1, "the intent ran once");
}

/// A record whose header count the `http` crate cannot hold (written by a
/// damaged or hostile store) is 503 on replay, not a panic.
#[tokio::test]
async fn a_record_with_a_huge_header_count_is_503_not_a_panic() {
    fn huge_head(_: &[u8]) -> Vec<u8> {
        let count = 30_000u32;
        let mut record = b"TI\x01\x00\xc9\x00".to_vec();
        record.extend_from_slice(&count.to_be_bytes());
        for _ in 0..count {
            record.extend_from_slice(&1u16.to_be_bytes());
            record.push(b'x');
            record.extend_from_slice(&1u32.to_be_bytes());
            record.push(b'1');
        }
        record
    }
    let counter = common::Counter::default();
    let store = common::Altered::rewriting(huge_head);
    let app = common::booking_router(counter.clone()).layer(IdempotencyLayer::new(store));
    let first = app.clone().oneshot(post_with_key("k", "x")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    body_bytes(first).await;
    let retry = app.oneshot(post_with_key("k", "x")).await.unwrap();
    let (status, code, _) = common::problem(retry).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "store-unavailable")
    );
    assert_eq!(counter.get(), 1);
}

/// A request body of frames given up front.
type Framed = http_body_util::StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>,
>;

/// A request whose body ends with `trailer`, and one `Content-Type` per
/// entry of `types`.
fn with_trailer(trailer: &'static str, types: &[&'static str]) -> http::Request<Framed> {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static(trailer));
    let frames = vec![
        Ok(Frame::data(Bytes::from_static(b"{\"amount\":10}"))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut req = http::Request::post("/pay")
        .header("authorization", common::AUTH)
        .header("idempotency-key", "k");
    for t in types {
        req = req.header("content-type", *t);
    }
    req.body(http_body_util::StreamBody::new(futures_util::stream::iter(
        frames,
    )))
    .unwrap()
}

/// The same key with a different request trailer, or a different second
/// `Content-Type`, is another request: `key-reused`, never a replay.
#[tokio::test]
async fn trailers_and_every_content_type_are_part_of_the_request() {
    let counter = common::Counter::default();
    let runs = counter.clone();
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .service(service_fn(move |_req| {
            runs.hit();
            async {
                Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
                    Bytes::from_static(b"paid"),
                )))
            }
        }));
    let first = svc
        .clone()
        .oneshot(with_trailer("1", &["application/json", "charset=a"]))
        .await
        .unwrap();
    assert_eq!(body_bytes(first).await, "paid");
    let same = svc
        .clone()
        .oneshot(with_trailer("1", &["application/json", "charset=a"]))
        .await
        .unwrap();
    assert_eq!(same.headers()["idempotent-replayed"], "true");
    for changed in [
        with_trailer("2", &["application/json", "charset=a"]),
        with_trailer("1", &["application/json", "charset=b"]),
        with_trailer("1", &["application/json"]),
    ] {
        let retry = svc.clone().oneshot(changed).await.unwrap();
        let (status, code, _) = common::problem(retry).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "key-reused")
        );
    }
    assert_eq!(counter.get(), 1);
}

/// A stored record whose head a connection would misread (a hop-by-hop
/// field, a `Content-Length` that is not its body's, an informational
/// status) is 503 on replay: replayed, it emptied or desynchronised the
/// client's connection.
#[tokio::test]
async fn a_record_a_connection_would_misread_is_503() {
    fn with_head(status: u16, name: &str, value: &str) -> Vec<u8> {
        let mut record = b"TI\x01".to_vec();
        record.extend_from_slice(&status.to_be_bytes());
        record.push(1);
        record.extend_from_slice(&1u32.to_be_bytes());
        record.extend_from_slice(&(name.len() as u16).to_be_bytes());
        record.extend_from_slice(name.as_bytes());
        record.extend_from_slice(&(value.len() as u32).to_be_bytes());
        record.extend_from_slice(value.as_bytes());
        record.extend_from_slice(&2u64.to_be_bytes());
        record.extend_from_slice(b"{}");
        record
    }
    let rewrites: [common::Rewrite; 4] = [
        |_| with_head(201, "transfer-encoding", "chunked"),
        |_| with_head(201, "content-length", "100"),
        |_| with_head(201, "connection", "close"),
        |_| with_head(101, "upgrade", "websocket"),
    ];
    for rewrite in rewrites {
        let counter = common::Counter::default();
        let app = common::booking_router(counter.clone())
            .layer(IdempotencyLayer::new(common::Altered::rewriting(rewrite)));
        body_bytes(app.clone().oneshot(post_with_key("k", "x")).await.unwrap()).await;
        let retry = app.oneshot(post_with_key("k", "x")).await.unwrap();
        let (status, code, _) = common::problem(retry).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "store-unavailable")
        );
        assert_eq!(counter.get(), 1);
    }
}
