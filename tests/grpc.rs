//! The gRPC record policy and read-ahead at the level of the layer, with
//! gRPC-shaped responses (`application/grpc`, messages, then trailers). The
//! same behaviour through a real tonic server is in
//! `examples/grpc_booking/tests/grpc.rs`.

mod common;

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use common::Counter;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt, service_fn};
use tower_idempotency::{IdempotencyLayer, MemoryStore, Outcome, RejectionKind};

/// What a gRPC body does next.
#[derive(Clone)]
enum Step {
    Data(&'static [u8]),
    Trailers(&'static str),
    Pending,
    Fail,
}

/// A response body that plays its steps in order; `Pending` wakes itself.
struct Scripted(VecDeque<Step>);

impl Body for Scripted {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.0.pop_front() {
            None => Poll::Ready(None),
            Some(Step::Data(data)) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(data))))),
            Some(Step::Trailers(status)) => {
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static(status));
                trailers.insert("x-custom", HeaderValue::from_static("kept"));
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Some(Step::Pending) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Step::Fail) => Poll::Ready(Some(Err(std::io::Error::other("stream broke")))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

const BOOK: &str = "/booking.v1.Bookings/Book";

fn call(key: &str) -> Request<Full<Bytes>> {
    Request::post(BOOK)
        .header("content-type", "application/grpc")
        .header("authorization", common::AUTH)
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
        .unwrap()
}

/// A gRPC service whose executions count, answering with `steps`.
fn service(
    counter: Counter,
    steps: Vec<Step>,
) -> impl tower::Service<
    Request<tower_idempotency::RequestBody<Full<Bytes>>>,
    Response = Response<Scripted>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    let steps = Arc::new(Mutex::new(steps));
    service_fn(move |_req| {
        let (counter, steps) = (counter.clone(), steps.clone());
        async move {
            counter.hit();
            let steps = steps.lock().unwrap().clone();
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "application/grpc")
                    .body(Scripted(steps.into()))
                    .unwrap(),
            )
        }
    })
}

fn layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default()).with_grpc([BOOK])
}

async fn frames<B>(response: Response<B>) -> (Vec<Bytes>, Option<HeaderMap>)
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut body = std::pin::pin!(response.into_body());
    let (mut data, mut trailers) = (Vec::new(), None);
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        match frame.into_data() {
            Ok(d) => data.push(d),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    (data, trailers)
}

/// A unary response (one message, then its trailers, both ready) is
/// recorded before its head goes out: a retry sent the moment the head
/// arrives replays it.
#[tokio::test]
async fn a_ready_message_and_its_trailers_are_recorded_before_the_head() {
    let counter = Counter::default();
    let svc = layer().layer(service(
        counter.clone(),
        vec![Step::Data(b"\0\0\0\0\x03abc"), Step::Trailers("0")],
    ));
    let first = svc.clone().oneshot(call("k")).await.unwrap();
    // The first body is not read yet.
    let retry = svc.clone().oneshot(call("k")).await.unwrap();
    assert_eq!(
        retry.extensions().get::<Outcome>(),
        Some(&Outcome::Replayed)
    );
    let (first_data, first_trailers) = frames(first).await;
    let (retry_data, retry_trailers) = frames(retry).await;
    assert_eq!(first_data, retry_data);
    assert_eq!(first_trailers, retry_trailers);
    assert_eq!(retry_trailers.unwrap()["x-custom"], "kept");
    assert_eq!(counter.get(), 1);
}

/// Two ready messages and trailers: joined into one frame ahead of the
/// head, byte for byte the same stream.
#[tokio::test]
async fn two_ready_messages_are_joined_and_replayed_intact() {
    let counter = Counter::default();
    let svc = layer().layer(service(
        counter.clone(),
        vec![
            Step::Data(b"one;"),
            Step::Data(b"two;"),
            Step::Pending,
            Step::Data(b"three"),
            Step::Trailers("0"),
        ],
    ));
    let (data, trailers) = frames(svc.clone().oneshot(call("k")).await.unwrap()).await;
    assert_eq!(data.concat(), b"one;two;three");
    let replay = svc.clone().oneshot(call("k")).await.unwrap();
    assert_eq!(
        replay.extensions().get::<Outcome>(),
        Some(&Outcome::Replayed)
    );
    let (again, again_trailers) = frames(replay).await;
    assert_eq!(again.concat(), b"one;two;three");
    assert_eq!(again_trailers, trailers);
    assert_eq!(counter.get(), 1);
}

/// The status arrives after the body waited: still decided at the end.
#[tokio::test]
async fn a_status_after_a_wait_is_decided_at_the_end() {
    for (status, executions) in [("14", 2), ("4", 2), ("0", 1), ("13", 1)] {
        let counter = Counter::default();
        let svc = layer().layer(service(
            counter.clone(),
            vec![Step::Data(b"msg"), Step::Pending, Step::Trailers(status)],
        ));
        for _ in 0..2 {
            frames(svc.clone().oneshot(call("k")).await.unwrap()).await;
        }
        assert_eq!(counter.get(), executions, "grpc-status {status}");
    }
}

/// A stream that breaks right after its first message: the message goes out
/// first, then the error; the record keeps status and headers only, so a
/// retry learns that the call ran (`FAILED_PRECONDITION`,
/// `response-not-retained`) and nothing runs twice.
#[tokio::test]
async fn a_stream_that_breaks_after_its_first_message_is_not_run_again() {
    let counter = Counter::default();
    let svc = layer().layer(service(
        counter.clone(),
        vec![Step::Data(b"msg"), Step::Fail],
    ));
    let first = svc.clone().oneshot(call("k")).await.unwrap();
    let mut body = std::pin::pin!(first.into_body());
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "msg", "the message first");
    assert!(body.frame().await.unwrap().is_err(), "then the error");
    let retry = svc.clone().oneshot(call("k")).await.unwrap();
    assert_eq!(
        retry.extensions().get::<Outcome>(),
        Some(&Outcome::Rejected(RejectionKind::ResponseNotRetained))
    );
    assert_eq!(retry.headers()["grpc-status"], "9");
    assert_eq!(counter.get(), 1);
}

/// Calls to methods not named in `with_grpc` pass through: streaming ones
/// are never buffered.
#[tokio::test]
async fn unnamed_methods_pass_through() {
    let counter = Counter::default();
    let svc = layer().layer(service(
        counter.clone(),
        vec![Step::Data(b"msg"), Step::Trailers("0")],
    ));
    for _ in 0..2 {
        let mut request = call("k");
        *request.uri_mut() = "/booking.v1.Bookings/Watch".parse().unwrap();
        let response = svc.clone().oneshot(request).await.unwrap();
        assert_eq!(response.extensions().get::<Outcome>(), None);
        frames(response).await;
    }
    assert_eq!(counter.get(), 2);
}

/// A unary response that says `UNAVAILABLE`, message and trailers ready
/// together: the key is released before the head goes out, so a retry sent
/// at once executes instead of meeting the first call in flight.
#[tokio::test]
async fn a_ready_message_with_unavailable_trailers_is_released_before_the_head() {
    let counter = Counter::default();
    let svc = layer().layer(service(
        counter.clone(),
        vec![Step::Data(b"partial"), Step::Trailers("14")],
    ));
    let first = svc.clone().oneshot(call("k")).await.unwrap();
    let retry = svc.clone().oneshot(call("k")).await.unwrap();
    assert_eq!(
        retry.extensions().get::<Outcome>(),
        Some(&Outcome::Executed)
    );
    assert_eq!(counter.get(), 2, "the retry executed");
    let (_, trailers) = frames(first).await;
    assert_eq!(
        trailers.unwrap()["grpc-status"],
        "14",
        "the client still gets the status"
    );
}

/// A body that broke after the message it sent announces no exact length,
/// so no HTTP/1 `content-length` promises a complete response.
#[tokio::test]
async fn a_body_that_broke_after_a_message_announces_no_length() {
    let svc = layer().layer(service(
        Counter::default(),
        vec![Step::Data(b"msg"), Step::Fail],
    ));
    let response = svc.oneshot(call("k")).await.unwrap();
    assert_eq!(response.body().size_hint().exact(), None);
}
