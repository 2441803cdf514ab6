//! The gRPC demo through a real tonic server and the tonic client, over TCP
//! on loopback: replays, reused keys, concurrent duplicates, a client
//! deadline shorter than the booking (the seed incident over gRPC),
//! released statuses, trailers, and the rejections.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use grpc_booking::{
    BOOK, Bookings, authenticate, idempotency,
    proto::{
        BookRequest, Booking, ListBookingsRequest, bookings_client::BookingsClient,
        bookings_server::BookingsServer,
    },
};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{
    Code, Status,
    transport::{Channel, server::TcpIncoming},
};
use tower_idempotency::{
    BoxStore, IdempotencyLayer, MemoryStore,
    store::{Fault, FaultyStore, Op},
};

/// A running server; stops when dropped.
struct Server {
    addr: SocketAddr,
    bookings: Bookings,
    _stop: oneshot::Sender<()>,
}

impl Server {
    async fn client(&self) -> BookingsClient<Channel> {
        BookingsClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }
}

/// The demo's server, behind `layer`.
async fn start(layer: IdempotencyLayer<BoxStore>) -> Server {
    start_with(layer, tower::layer::util::Identity::new()).await
}

/// The demo's server, behind `layer`, with `inner` between the idempotency
/// layer and the tonic service (to shape what the service answers).
async fn start_with<L>(layer: IdempotencyLayer<BoxStore>, inner: L) -> Server
where
    L: tower::Layer<tonic::service::Routes> + Clone + Send + Sync + 'static,
    L::Service: tower::Service<
            http::Request<tower_idempotency::RequestBody<tonic::body::Body>>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    <L::Service as tower::Service<
        http::Request<tower_idempotency::RequestBody<tonic::body::Body>>,
    >>::Future: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bookings = Bookings::default();
    let (stop, stopped) = oneshot::channel::<()>();
    let service = BookingsServer::new(bookings.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(tower::util::MapRequestLayer::new(authenticate))
            .layer(layer)
            .layer(inner)
            .add_service(service)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
    });
    Server {
        addr,
        bookings,
        _stop: stop,
    }
}

fn memory() -> IdempotencyLayer<BoxStore> {
    idempotency(BoxStore::new(MemoryStore::default()))
}

fn booking(slot: &str, delay_ms: u64) -> BookRequest {
    BookRequest {
        caller: "ada".into(),
        slot: slot.into(),
        provider: "dr-who".into(),
        delay_ms,
    }
}

/// A `Book` call with `key` (if any) and a bearer token.
fn call(
    key: Option<&str>,
    token: Option<&str>,
    message: BookRequest,
) -> tonic::Request<BookRequest> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
    }
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

fn replayed(response: &tonic::Response<Booking>) -> bool {
    response
        .metadata()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

/// The status of a rejection, with the stable code it carries.
fn rejected(status: &Status) -> (Code, &str) {
    let code = status
        .metadata()
        .get("idempotency-rejection")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        status.message().starts_with(code),
        "grpc-message starts with the code: {status:?}"
    );
    (status.code(), code)
}

#[tokio::test]
async fn a_retry_replays_the_same_booking_with_replay_metadata() {
    let server = start(memory()).await;
    let mut client = server.client().await;
    let first = client
        .book(call(Some("k-1"), Some("ada.v1"), booking("09:00", 0)))
        .await
        .unwrap();
    assert!(!replayed(&first), "the first answer is not a replay");
    let retry = client
        .book(call(Some("k-1"), Some("ada.v1"), booking("09:00", 0)))
        .await
        .unwrap();
    assert!(replayed(&retry));
    assert_eq!(retry.get_ref(), first.get_ref(), "the same Booking");
    // A refreshed token of the same caller replays too.
    let refreshed = client
        .book(call(Some("k-1"), Some("ada.v2"), booking("09:00", 0)))
        .await
        .unwrap();
    assert!(replayed(&refreshed));
    assert_eq!(refreshed.get_ref(), first.get_ref());
    assert_eq!(server.bookings.rows().len(), 1, "one row");
    // Another caller with the same key is another intent.
    let other = client
        .book(call(Some("k-1"), Some("bob.v1"), booking("09:00", 0)))
        .await
        .unwrap();
    assert!(!replayed(&other));
    assert_eq!(server.bookings.rows().len(), 2);
}

#[tokio::test]
async fn a_different_request_with_the_same_key_is_failed_precondition() {
    let server = start(memory()).await;
    let mut client = server.client().await;
    client
        .book(call(Some("k-2"), Some("ada.v1"), booking("09:00", 0)))
        .await
        .unwrap();
    let status = client
        .book(call(Some("k-2"), Some("ada.v1"), booking("10:00", 0)))
        .await
        .unwrap_err();
    assert_eq!(rejected(&status), (Code::FailedPrecondition, "key-reused"));
    assert_eq!(server.bookings.rows().len(), 1, "no second row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_duplicate_is_aborted_and_one_booking_is_made() {
    let server = start(memory()).await;
    let client = server.client().await;
    let calls = (0..2).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .book(call(Some("k-3"), Some("ada.v1"), booking("11:00", 800)))
                .await
        })
    });
    let mut booked = Vec::new();
    let mut aborted = 0;
    for answer in calls.collect::<Vec<_>>() {
        match answer.await.unwrap() {
            Ok(response) => booked.push(response.into_inner()),
            Err(status) => {
                assert_eq!(rejected(&status), (Code::Aborted, "request-in-flight"));
                assert!(status.metadata().contains_key("grpc-retry-pushback-ms"));
                aborted += 1;
            }
        }
    }
    assert_eq!((booked.len(), aborted), (1, 1));
    assert_eq!(server.bookings.rows().len(), 1);
    let retry = client
        .clone()
        .book(call(Some("k-3"), Some("ada.v1"), booking("11:00", 800)))
        .await
        .unwrap();
    assert!(replayed(&retry));
    assert_eq!(retry.into_inner(), booked[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_mode_a_concurrent_duplicate_waits_and_replays() {
    let server = start(memory().with_wait(Duration::from_secs(10))).await;
    let client = server.client().await;
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .book(call(Some("k-4"), Some("ada.v1"), booking("12:00", 300)))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    assert_eq!(answers.iter().filter(|a| !replayed(a)).count(), 1);
    assert!(answers.iter().all(|a| a.get_ref() == answers[0].get_ref()));
    assert_eq!(server.bookings.rows().len(), 1);
}

/// Waits for the booking that went on without its client, then retries:
/// the retry replays it (an `ABORTED` in between means the record is about
/// to land).
async fn retry_after_commit(server: &Server, key: &str, message: BookRequest) {
    let mut client = server.client().await;
    assert!(server.bookings.rows().is_empty(), "not committed yet");
    let mut waited = 0;
    while server.bookings.rows().is_empty() {
        waited += 1;
        assert!(waited < 500, "the booking never committed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut retry = client
        .book(call(Some(key), Some("ada.v1"), message.clone()))
        .await;
    while let Err(status) = &retry {
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        retry = client
            .book(call(Some(key), Some("ada.v1"), message.clone()))
            .await;
    }
    let retry = retry.unwrap();
    assert!(replayed(&retry));
    assert_eq!(retry.get_ref(), &server.bookings.rows()[0]);
    assert_eq!(server.bookings.rows().len(), 1, "booked once");
}

/// The seed incident over gRPC: the client gives up at 500 ms, the booking
/// commits at 1.5 s, and the retry replays it instead of booking again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deadline_shorter_than_the_booking_then_a_retry_books_once() {
    let server = start(memory()).await;
    let mut client = server.client().await;
    let message = booking("13:00", 1500);
    let first = client.book(call(Some("k-5"), Some("ada.v1"), message.clone()));
    let gave_up = tokio::time::timeout(Duration::from_millis(500), first).await;
    assert!(gave_up.is_err(), "the client's deadline ran out first");
    retry_after_commit(&server, "k-5", message).await;
}

/// The same with the deadline sent as `grpc-timeout`, which the tonic
/// server enforces itself: the call ends (as `CANCELLED`, "Timeout
/// expired", in tonic) while the booking goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_timeout_shorter_than_the_booking_then_a_retry_books_once() {
    let server = start(memory()).await;
    let mut client = server.client().await;
    let message = booking("13:30", 1500);
    let mut first = call(Some("k-5b"), Some("ada.v1"), message.clone());
    first.set_timeout(Duration::from_millis(500));
    let status = client.book(first).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    retry_after_commit(&server, "k-5b", message).await;
}

#[tokio::test]
async fn a_server_raised_unavailable_is_not_recorded_and_the_retry_books() {
    let server = start(memory()).await;
    let mut client = server.client().await;
    server.bookings.fail_next(1);
    let status = client
        .book(call(Some("k-6"), Some("ada.v1"), booking("14:00", 0)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        !status.metadata().contains_key("idempotency-rejection"),
        "the service's own status"
    );
    let retry = client
        .book(call(Some("k-6"), Some("ada.v1"), booking("14:00", 0)))
        .await
        .unwrap();
    assert!(!replayed(&retry), "executed, not replayed");
    assert_eq!(server.bookings.rows().len(), 1);
}

/// Moves the status of a trailers-only error into trailers after an empty
/// body, as servers that send their headers first answer.
fn status_in_trailers(
    response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let (mut parts, body) = response.into_parts();
    let Some(status) = parts.headers.remove("grpc-status") else {
        return http::Response::from_parts(parts, body);
    };
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", status);
    if let Some(message) = parts.headers.remove("grpc-message") {
        trailers.insert("grpc-message", message);
    }
    let body = http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .with_trailers(async move { Some(Ok::<_, std::convert::Infallible>(trailers)) });
    http::Response::from_parts(parts, tonic::body::Body::new(body))
}

#[tokio::test]
async fn unavailable_in_the_trailers_is_not_recorded_either() {
    let server = start_with(
        memory(),
        tower::util::MapResponseLayer::new(status_in_trailers),
    )
    .await;
    let mut client = server.client().await;
    server.bookings.fail_next(1);
    let status = client
        .book(call(Some("k-7"), Some("ada.v1"), booking("15:00", 0)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let retry = client
        .book(call(Some("k-7"), Some("ada.v1"), booking("15:00", 0)))
        .await
        .unwrap();
    assert!(!replayed(&retry));
    assert_eq!(server.bookings.rows().len(), 1);

    // A status that is recorded, in the trailers: INVALID_ARGUMENT replays.
    let empty = BookRequest::default();
    let first = client
        .book(call(Some("k-8"), Some("ada.v1"), empty.clone()))
        .await
        .unwrap_err();
    assert_eq!(first.code(), Code::InvalidArgument);
    let again = client
        .book(call(Some("k-8"), Some("ada.v1"), empty))
        .await
        .unwrap_err();
    assert_eq!(
        (again.code(), again.message()),
        (first.code(), first.message())
    );
    assert!(again.metadata().contains_key("idempotent-replayed"));
}

/// Adds custom trailers to every response, one of them binary.
fn stamp_trailers(
    response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    response.map(|body| {
        tonic::body::Body::new(
            body.map_frame(|frame: Frame<Bytes>| match frame.into_trailers() {
                Ok(mut trailers) => {
                    trailers.insert("x-audit-ref", "audit-4711".parse().unwrap());
                    trailers.insert("x-trace-bin", "AAEC/w==".parse().unwrap());
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            }),
        )
    })
}

#[tokio::test]
async fn custom_trailers_survive_a_replay_byte_for_byte() {
    let server = start_with(memory(), tower::util::MapResponseLayer::new(stamp_trailers)).await;
    let mut client = server.client().await;
    let first = client
        .book(call(Some("k-9"), Some("ada.v1"), booking("16:00", 0)))
        .await
        .unwrap();
    let retry = client
        .book(call(Some("k-9"), Some("ada.v1"), booking("16:00", 0)))
        .await
        .unwrap();
    assert!(replayed(&retry));
    let text = |r: &tonic::Response<Booking>| {
        r.metadata()
            .get("x-audit-ref")
            .map(|v| v.as_bytes().to_vec())
    };
    assert_eq!(text(&first).as_deref(), Some(&b"audit-4711"[..]));
    assert_eq!(text(&retry), text(&first));
    let bin = |r: &tonic::Response<Booking>| {
        r.metadata()
            .get_bin("x-trace-bin")
            .map(|v| v.to_bytes().unwrap())
    };
    assert_eq!(bin(&first).as_deref(), Some(&[0u8, 1, 2, 255][..]));
    assert_eq!(bin(&retry), bin(&first));
    assert_eq!(retry.get_ref(), first.get_ref());
    assert_eq!(server.bookings.rows().len(), 1);
}

#[tokio::test]
async fn missing_invalid_and_anonymous_keys_get_their_statuses() {
    let server = start(memory()).await;
    let mut client = server.client().await;
    let missing = client
        .book(call(None, Some("ada.v1"), booking("17:00", 0)))
        .await
        .unwrap_err();
    assert_eq!(rejected(&missing), (Code::InvalidArgument, "missing-key"));
    let too_long = "k".repeat(256);
    let invalid = client
        .book(call(Some(&too_long), Some("ada.v1"), booking("17:00", 0)))
        .await
        .unwrap_err();
    assert_eq!(rejected(&invalid), (Code::InvalidArgument, "invalid-key"));
    let anonymous = client
        .book(call(Some("k-10"), None, booking("17:00", 0)))
        .await
        .unwrap_err();
    assert_eq!(
        rejected(&anonymous),
        (Code::Unauthenticated, "anonymous-request")
    );
    assert!(server.bookings.rows().is_empty(), "nothing booked");
    // The read is not protected: no key needed.
    let list = client
        .list_bookings(tonic::Request::new(ListBookingsRequest {}))
        .await
        .unwrap();
    assert!(list.into_inner().bookings.is_empty());
}

#[tokio::test]
async fn a_store_that_is_down_is_unavailable_and_nothing_is_booked() {
    let store = FaultyStore::new(MemoryStore::default());
    store.set_fault(Op::Claim, Some(Fault::Unavailable));
    let server = start(idempotency(BoxStore::new(store.clone()))).await;
    let mut client = server.client().await;
    let status = client
        .book(call(Some("k-11"), Some("ada.v1"), booking("18:00", 0)))
        .await
        .unwrap_err();
    assert_eq!(rejected(&status), (Code::Unavailable, "store-unavailable"));
    assert!(status.metadata().contains_key("grpc-retry-pushback-ms"));
    assert!(server.bookings.rows().is_empty());
    store.set_fault(Op::Claim, None);
    let booked = client
        .book(call(Some("k-11"), Some("ada.v1"), booking("18:00", 0)))
        .await
        .unwrap();
    assert!(!replayed(&booked));
    assert_eq!(server.bookings.rows().len(), 1);
}

#[test]
fn the_protected_path_is_the_generated_services() {
    use tonic::server::NamedService;
    assert_eq!(
        BOOK,
        format!("/{}/Book", <BookingsServer<Bookings> as NamedService>::NAME)
    );
}
