//! The retrying client layer: what it retries and when, on paused time with
//! scripted services, and the seed incident over real TCP through a proxy
//! that forwards each request but drops the response.

mod common;

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use common::Counter;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{Layer, ServiceExt, service_fn};
use tower_idempotency::client::{
    AttemptOutcome, IntentKey, RetryErrorKind, RetryLayer, RetryReport,
};

/// What a scripted server does on each attempt.
#[derive(Clone)]
enum Answer {
    Status(u16, &'static [(&'static str, &'static str)], &'static str),
    Hang,
    Refuse,
}

/// A service answering attempt by attempt, recording the key each carried.
#[derive(Clone, Default)]
struct Script {
    answers: Arc<Mutex<VecDeque<Answer>>>,
    keys: Arc<Mutex<Vec<Option<String>>>>,
}

impl Script {
    fn new(answers: impl IntoIterator<Item = Answer>) -> Self {
        Script {
            answers: Arc::new(Mutex::new(answers.into_iter().collect())),
            keys: Arc::default(),
        }
    }

    fn attempts(&self) -> usize {
        self.keys.lock().unwrap().len()
    }

    fn service(
        &self,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = std::io::Error,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        let script = self.clone();
        service_fn(move |req: Request<Full<Bytes>>| {
            let script = script.clone();
            async move {
                let key = req
                    .headers()
                    .get("idempotency-key")
                    .map(|v| v.to_str().unwrap().to_owned());
                script.keys.lock().unwrap().push(key);
                let answer = script
                    .answers
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or(Answer::Status(200, &[], "default"));
                match answer {
                    Answer::Status(code, headers, body) => {
                        let mut response = Response::builder().status(code);
                        for (name, value) in headers {
                            response = response.header(*name, *value);
                        }
                        Ok(response
                            .body(Full::new(Bytes::from_static(body.as_bytes())))
                            .unwrap())
                    }
                    Answer::Hang => std::future::pending().await,
                    Answer::Refuse => Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        "connection refused",
                    )),
                }
            }
        })
    }
}

fn keyed_post() -> Request<Full<Bytes>> {
    let mut request = Request::post("http://api.example/bookings")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let key = IntentKey::derive("book", &serde_json::json!({"slot": "09:00"})).unwrap();
    request.extensions_mut().insert(key);
    request
}

const IN_FLIGHT: &str =
    r#"{"type":"x","title":"t","status":409,"detail":"d","code":"request-in-flight"}"#;
const REUSED: &str = r#"{"type":"x","title":"t","status":409,"detail":"d","code":"key-reused"}"#;
const PROBLEM: &[(&str, &str)] = &[("content-type", "application/problem+json")];
const PROBLEM_RETRY_2: &[(&str, &str)] = &[
    ("content-type", "application/problem+json"),
    ("retry-after", "2"),
];

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_the_key_is_the_same_on_every_attempt() {
    let script = Script::new([
        Answer::Status(503, &[("retry-after", "2")], "busy"),
        Answer::Status(409, PROBLEM_RETRY_2, IN_FLIGHT),
        Answer::Status(201, &[("idempotent-replayed", "true")], "booked"),
    ]);
    let client = RetryLayer::new().layer(script.service());
    let start = Instant::now();
    let response = client.oneshot(keyed_post()).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_secs(4),
        "waited Retry-After twice"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    let report = response.extensions().get::<RetryReport>().unwrap().clone();
    assert_eq!(
        (report.attempts, report.replayed, report.exhausted),
        (3, true, false)
    );
    let keys = script.keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 3);
    assert!(
        keys.iter().all(|k| k.is_some() && *k == keys[0]),
        "{keys:?}"
    );
    assert_eq!(keys[0].as_deref(), report.key.as_deref());
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "booked"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_http_date_is_honoured() {
    let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3));
    let headers: &'static [(&'static str, &'static str)] =
        Box::leak(vec![("retry-after", &*Box::leak(later.into_boxed_str()))].into_boxed_slice());
    let script = Script::new([Answer::Status(429, headers, "slow down")]);
    let client = RetryLayer::new().layer(script.service());
    let start = Instant::now();
    client.oneshot(keyed_post()).await.unwrap();
    assert_eq!(script.attempts(), 2);
    // An HTTP date has whole seconds: between 2 and 3 seconds from now.
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn final_answers_are_never_retried() {
    for (code, headers, body) in [
        (400, PROBLEM, "{}"),
        (422, PROBLEM, "{}"),
        (404, &[][..], ""),
        (401, &[][..], ""),
        (500, &[][..], "the work may have happened"),
        (409, PROBLEM, REUSED),
        (409, &[][..], "a plain conflict"),
    ] {
        let script = Script::new([Answer::Status(code, headers, body)]);
        let client = RetryLayer::new().layer(script.service());
        let response = client.oneshot(keyed_post()).await.unwrap();
        assert_eq!(script.attempts(), 1, "{code} {body}");
        assert_eq!(response.status().as_u16(), code);
        // The body of a 409 the layer read is still whole.
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            body
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_keyless_post_is_sent_once_and_a_keyless_get_is_retried() {
    let script = Script::new([Answer::Status(503, &[], ""), Answer::Refuse]);
    let client = RetryLayer::new().layer(script.service());
    let post = Request::post("http://api.example/bookings")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.clone().oneshot(post).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(script.attempts(), 1, "no key: never retried");
    let err = client
        .clone()
        .oneshot(
            Request::post("http://api.example/bookings")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (err.kind(), err.report().attempts),
        (RetryErrorKind::Failed, 1)
    );

    let script = Script::new([
        Answer::Status(503, &[], ""),
        Answer::Status(200, &[], "list"),
    ]);
    let client = RetryLayer::new().layer(script.service());
    let get = Request::get("http://api.example/bookings")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(client.oneshot(get).await.unwrap().status(), 200);
    assert_eq!(script.attempts(), 2);
}

#[tokio::test(start_paused = true)]
async fn attempt_timeouts_and_connection_errors_are_retried() {
    let script = Script::new([Answer::Hang, Answer::Refuse, Answer::Status(201, &[], "ok")]);
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let client = RetryLayer::new()
        .with_attempt_timeout(Duration::from_secs(3))
        .on_attempt(move |event| seen.lock().unwrap().push(event.clone()))
        .layer(script.service());
    let response = client.oneshot(keyed_post()).await.unwrap();
    assert_eq!(response.status(), 201);
    let events = events.lock().unwrap().clone();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].outcome, AttemptOutcome::TimedOut);
    assert!(matches!(&events[1].outcome, AttemptOutcome::Failed(e) if e.contains("refused")));
    assert!(events[0].wait.is_some() && events[1].wait.is_some() && events[2].wait.is_none());
    assert_eq!(
        events[2].outcome,
        AttemptOutcome::Status {
            status: StatusCode::CREATED,
            replayed: false
        }
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_and_the_attempt_count_bound_the_retries() {
    // Always 503: attempts run out first.
    let script = Script::new(std::iter::repeat_n(Answer::Status(503, &[], ""), 20));
    let client = RetryLayer::new()
        .with_attempts(4)
        .with_backoff(Duration::from_millis(100), Duration::from_millis(100))
        .layer(script.service());
    let response = client.oneshot(keyed_post()).await.unwrap();
    assert_eq!(script.attempts(), 4);
    let report = response.extensions().get::<RetryReport>().unwrap();
    assert!(report.exhausted);

    // Always hanging: the deadline runs out first.
    let script = Script::new(std::iter::repeat_n(Answer::Hang, 20));
    let client = RetryLayer::new()
        .with_attempts(20)
        .with_attempt_timeout(Duration::from_secs(3))
        .with_deadline(Duration::from_secs(10))
        .layer(script.service());
    let start = Instant::now();
    let err = client.oneshot(keyed_post()).await.unwrap_err();
    assert_eq!(err.kind(), RetryErrorKind::TimedOut);
    assert!(
        start.elapsed() <= Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(script.attempts() >= 3);

    // A Retry-After past the deadline ends the retries at once.
    let script = Script::new([Answer::Status(503, &[("retry-after", "120")], "")]);
    let client = RetryLayer::new()
        .with_deadline(Duration::from_secs(30))
        .layer(script.service());
    let start = Instant::now();
    let response = client.oneshot(keyed_post()).await.unwrap();
    assert_eq!((response.status().as_u16(), script.attempts()), (503, 1));
    assert!(start.elapsed() < Duration::from_secs(1));
}

/// An upstream that counts executions behind the server layer, and a proxy
/// that forwards each request to it but drops the first `drops` responses
/// (the upstream committed, the client never heard), over real TCP.
mod dropped_responses {
    use super::*;
    use hyper_util::rt::TokioIo;
    use tower_idempotency::{IdempotencyLayer, MemoryStore};

    pub(super) async fn upstream(counter: Counter) -> String {
        let app =
            common::booking_router(counter).layer(IdempotencyLayer::new(MemoryStore::default()));
        common::fleet::serve(app).await
    }

    /// The proxy's address.
    pub(super) async fn proxy(upstream: String, drops: usize) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let forwarded = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let client = common::fleet::client();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (client, upstream, forwarded) =
                    (client.clone(), upstream.clone(), forwarded.clone());
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (client, upstream, forwarded) =
                                (client.clone(), upstream.clone(), forwarded.clone());
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body.collect().await.unwrap().to_bytes();
                                let mut forward = Request::builder()
                                    .method(parts.method)
                                    .uri(format!("{upstream}{}", parts.uri.path()));
                                for (name, value) in &parts.headers {
                                    forward = forward.header(name, value);
                                }
                                let response = client
                                    .request(forward.body(Full::new(body)).unwrap())
                                    .await
                                    .unwrap();
                                let (head, body) = response.into_parts();
                                let body = body.collect().await.unwrap().to_bytes();
                                let n = forwarded.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                if n < drops {
                                    // The upstream answered; the client never hears.
                                    return Err(std::io::Error::other("response dropped"));
                                }
                                Ok::<_, std::io::Error>(Response::from_parts(head, Full::new(body)))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        format!("http://{addr}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_dropped_on_the_way_back_still_mean_one_execution() {
    let counter = Counter::default();
    let upstream = dropped_responses::upstream(counter.clone()).await;
    let proxy = dropped_responses::proxy(upstream, 2).await;
    let client = RetryLayer::new()
        .with_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .layer(common::fleet::client());
    let mut request = Request::post(format!("{proxy}/book"))
        .header("authorization", common::AUTH)
        .body(Full::new(Bytes::from_static(b"slot 9")))
        .unwrap();
    request
        .extensions_mut()
        .insert(IntentKey::derive("book", &serde_json::json!({"slot": 9})).unwrap());
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let report = response.extensions().get::<RetryReport>().unwrap().clone();
    assert_eq!((report.attempts, report.replayed), (3, true));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "booking 1: slot 9");
    assert_eq!(counter.get(), 1, "one execution across every attempt");
}

/// The same through `reqwest` and `reqwest-middleware`.
#[cfg(feature = "reqwest")]
mod through_reqwest {
    use super::*;
    use tower_idempotency::client::RetryMiddleware;

    fn client(layer: RetryLayer) -> reqwest_middleware::ClientWithMiddleware {
        reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(RetryMiddleware::from(layer))
            .build()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn responses_dropped_on_the_way_back_still_mean_one_execution() {
        let counter = Counter::default();
        let upstream = dropped_responses::upstream(counter.clone()).await;
        let proxy = dropped_responses::proxy(upstream, 2).await;
        let client = client(
            RetryLayer::new().with_backoff(Duration::from_millis(10), Duration::from_millis(50)),
        );
        let key = IntentKey::derive("book", &serde_json::json!({"slot": 9})).unwrap();
        let response = client
            .post(format!("{proxy}/book"))
            .header("authorization", common::AUTH)
            .with_extension(key)
            .body("slot 9")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let report = response.extensions().get::<RetryReport>().unwrap().clone();
        assert_eq!((report.attempts, report.replayed), (3, true));
        assert_eq!(response.text().await.unwrap(), "booking 1: slot 9");
        assert_eq!(counter.get(), 1, "one execution across every attempt");
    }

    /// A 409 in flight is retried after its `Retry-After` and the retry
    /// replays; a reused key is final; a keyless POST is sent once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_flight_is_retried_and_final_answers_are_not() {
        use tower_idempotency::{IdempotencyLayer, MemoryStore};
        let counter = Counter::default();
        let (router, gate) = common::gated_stream_router(&counter);
        let upstream =
            common::fleet::serve(router.layer(IdempotencyLayer::new(MemoryStore::default()))).await;
        let book = |client: &reqwest::Client, body: &'static str| {
            client
                .post(format!("{upstream}/book"))
                .header("authorization", common::AUTH)
                .header("idempotency-key", "k-stream")
                .body(body)
        };
        // The first request's head is out and its body still streams: the
        // key is in flight.
        let first = book(&reqwest::Client::new(), "slot 9")
            .send()
            .await
            .unwrap();
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let client = client(RetryLayer::new().on_attempt(move |event| {
            let _ = events_tx.send(event.clone());
        }));
        let duplicate = {
            let request = client
                .post(format!("{upstream}/book"))
                .header("authorization", common::AUTH)
                .header("idempotency-key", "k-stream")
                .body("slot 9");
            tokio::spawn(async move { request.send().await.unwrap() })
        };
        let event = events.recv().await.unwrap();
        assert_eq!(
            event.outcome,
            AttemptOutcome::Status {
                status: StatusCode::CONFLICT,
                replayed: false
            }
        );
        assert_eq!(event.wait, Some(Duration::from_secs(1)), "Retry-After: 1");
        gate.send(true).unwrap();
        assert_eq!(first.text().await.unwrap(), "head;tail");
        let replay = duplicate.await.unwrap();
        let report = replay.extensions().get::<RetryReport>().unwrap().clone();
        assert_eq!((report.attempts, report.replayed), (2, true));
        assert_eq!(replay.text().await.unwrap(), "head;tail");

        let reused = client
            .post(format!("{upstream}/book"))
            .header("authorization", common::AUTH)
            .header("idempotency-key", "k-stream")
            .body("another slot")
            .send()
            .await
            .unwrap();
        assert_eq!(reused.status(), 400, "a reused key is final");
        assert_eq!(
            reused.extensions().get::<RetryReport>().unwrap().attempts,
            1
        );
        assert_eq!(counter.get(), 1);

        // No key, through a proxy that drops every answer: sent once.
        let plain = Counter::default();
        let proxy =
            dropped_responses::proxy(dropped_responses::upstream(plain.clone()).await, usize::MAX)
                .await;
        let err = client
            .post(format!("{proxy}/book"))
            .header("authorization", common::AUTH)
            .body("no key")
            .send()
            .await
            .unwrap_err();
        // It reached the handler: never a bare reqwest error (whose kinds
        // would read as "could not connect"), but the report saying so.
        let reqwest_middleware::Error::Middleware(err) = err else {
            panic!("a bare reqwest error for a request that ran: {err}");
        };
        let retry = err
            .downcast_ref::<tower_idempotency::client::RetryError>()
            .unwrap();
        assert_eq!(
            retry.ending(),
            tower_idempotency::client::Ending::OutcomeUnknown
        );
        assert_eq!(
            plain.get(),
            1,
            "the keyless POST ran once and was not sent again"
        );
    }
}

/// The readiness `poll_ready` reserved is the one the first attempt uses: a
/// concurrency limit of 1 under the layer does not starve its own attempts.
#[tokio::test(start_paused = true)]
async fn a_concurrency_limit_under_the_layer_is_not_deadlocked() {
    let script = Script::new([Answer::Status(503, &[], ""), Answer::Status(201, &[], "ok")]);
    let client = RetryLayer::new()
        .with_deadline(Duration::MAX)
        .layer(tower::limit::ConcurrencyLimit::new(script.service(), 1));
    let response = client.oneshot(keyed_post()).await.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(
        response.extensions().get::<RetryReport>().unwrap().attempts,
        2
    );
}

/// Each way the retries can end says what the caller knows: done (the
/// final answer), nothing ran (every attempt refused or answered "not
/// processed"), or outcome unknown (an attempt may have reached the
/// handler and no final answer came).
#[tokio::test(start_paused = true)]
async fn every_ending_says_whether_anything_may_have_run() {
    use tower_idempotency::client::Ending;
    const UNKNOWN: &str =
        r#"{"type":"x","title":"t","status":500,"detail":"d","code":"outcome-unknown"}"#;
    const STORE_DOWN: &str =
        r#"{"type":"x","title":"t","status":503,"detail":"d","code":"store-unavailable"}"#;
    const CHUNKED_IN_FLIGHT: &[(&str, &str)] =
        &[("content-type", "Application/Problem+JSON; charset=utf-8")];
    let ending = |answers: Vec<Answer>| async move {
        let script = Script::new(answers);
        let client = RetryLayer::new()
            .with_attempts(3)
            .with_attempt_timeout(Duration::from_secs(2))
            .with_backoff(Duration::from_millis(10), Duration::from_millis(10))
            .layer(script.service());
        match client.oneshot(keyed_post()).await {
            Ok(response) => response.extensions().get::<RetryReport>().unwrap().ending,
            Err(err) => err.ending(),
        }
    };
    let s = Answer::Status;
    for (answers, expected, why) in [
        (vec![s(201, &[], "ok")], Ending::Done, "a success"),
        (
            vec![Answer::Hang, s(201, &[], "ok")],
            Ending::Done,
            "a timeout, then the replay",
        ),
        (
            vec![s(400, PROBLEM, REUSED)],
            Ending::Done,
            "a final refusal",
        ),
        (
            vec![Answer::Refuse; 3],
            Ending::NothingRan,
            "every connection refused",
        ),
        (
            vec![s(503, PROBLEM, STORE_DOWN); 3],
            Ending::NothingRan,
            "503 store-unavailable every time",
        ),
        (
            vec![s(503, &[], ""); 3],
            Ending::OutcomeUnknown,
            "a 503 without a code, as a proxy answers after forwarding",
        ),
        (
            vec![Answer::Refuse, s(429, &[], ""), s(503, PROBLEM, STORE_DOWN)],
            Ending::NothingRan,
            "refused, then 'not processed'",
        ),
        (
            vec![Answer::Hang; 3],
            Ending::OutcomeUnknown,
            "every attempt timed out after sending",
        ),
        (
            vec![Answer::Hang, s(503, &[], ""), s(503, &[], "")],
            Ending::OutcomeUnknown,
            "one timeout among 503s",
        ),
        (
            vec![s(500, PROBLEM, UNKNOWN)],
            Ending::OutcomeUnknown,
            "500 outcome-unknown",
        ),
        (
            vec![s(409, PROBLEM, IN_FLIGHT); 3],
            Ending::OutcomeUnknown,
            "in flight at the end",
        ),
        (
            vec![s(409, CHUNKED_IN_FLIGHT, IN_FLIGHT); 3],
            Ending::OutcomeUnknown,
            "in flight, media type in another case",
        ),
        (
            vec![s(504, &[], ""); 3],
            Ending::OutcomeUnknown,
            "a gateway timeout",
        ),
    ] {
        assert_eq!(ending(answers).await, expected, "{why}");
    }
}

/// `Retry-After` is plain digits or a date (`+5` is neither, so the backoff
/// decides); a delay too large for the clock ends the retries at once, as
/// a wait past the deadline does, never read as absent. `exhausted` is
/// true only when attempts or the deadline ran out; a request no retry can
/// fix (a relative URI) is sent once.
#[tokio::test(start_paused = true)]
async fn retry_after_is_read_strictly_and_exhausted_means_the_budget_ran_out() {
    use tower_idempotency::client::Ending;
    let waits = |answers: Vec<Answer>, request: Request<Full<Bytes>>| async move {
        let script = Script::new(answers);
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let client = RetryLayer::new()
            .with_attempts(3)
            .with_deadline(Duration::from_secs(30))
            .on_attempt(move |event| seen.lock().unwrap().push(event.clone()))
            .layer(script.service());
        let result = client.oneshot(request).await;
        let events = events.lock().unwrap().clone();
        (script.attempts(), events, result)
    };
    let plus: &[(&str, &str)] = &[("retry-after", "+5")];
    let (_, events, _) = waits(
        vec![
            Answer::Status(503, plus, ""),
            Answer::Status(201, &[], "ok"),
        ],
        keyed_post(),
    )
    .await;
    assert!(
        events[0].wait.unwrap() < Duration::from_secs(5),
        "{:?}",
        events[0].wait
    );

    let huge: &[(&str, &str)] = &[("retry-after", "99999999999999999999999")];
    let (attempts, _, result) = waits(vec![Answer::Status(429, huge, "")], keyed_post()).await;
    assert_eq!(attempts, 1, "a wait past the deadline ends the retries");
    let report = result
        .unwrap()
        .extensions()
        .get::<RetryReport>()
        .cloned()
        .unwrap();
    assert!(
        !report.exhausted,
        "the server asked to wait; the budget did not run out"
    );
    assert_eq!(report.ending, Ending::NothingRan);

    let keyless = Request::post("http://api.example/bookings")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (attempts, _, result) = waits(vec![Answer::Status(503, &[], "")], keyless).await;
    assert_eq!(attempts, 1);
    let report = result
        .unwrap()
        .extensions()
        .get::<RetryReport>()
        .cloned()
        .unwrap();
    assert!(
        !report.exhausted,
        "a keyless POST is never retried: nothing ran out"
    );

    let (attempts, _, result) = waits(vec![s503(), s503(), s503()], keyed_post()).await;
    assert_eq!(attempts, 3);
    assert!(
        result
            .unwrap()
            .extensions()
            .get::<RetryReport>()
            .unwrap()
            .exhausted
    );

    let mut relative = Request::post("/bookings")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let key = IntentKey::derive("book", &serde_json::json!({"slot": "10:00"})).unwrap();
    relative.extensions_mut().insert(key);
    let (attempts, _, _) = waits(
        vec![Answer::Refuse, Answer::Refuse, Answer::Refuse],
        relative,
    )
    .await;
    assert_eq!(attempts, 1, "a relative URI is not retried");
}

fn s503() -> Answer {
    Answer::Status(503, &[], "")
}

/// Through reqwest, an error of reqwest's own comes back as reqwest's,
/// with its kinds: a refused connection `is_connect`, not a middleware
/// error.
#[cfg(feature = "reqwest")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_errors_keep_their_kinds() {
    use tower_idempotency::client::RetryMiddleware;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::from(
            RetryLayer::new()
                .with_attempts(2)
                .with_backoff(Duration::from_millis(1), Duration::from_millis(1)),
        ))
        .build();
    let key = IntentKey::derive("book", &serde_json::json!({"slot": 11})).unwrap();
    let err = client
        .post(format!("http://127.0.0.1:{port}/book"))
        .with_extension(key)
        .body("x")
        .send()
        .await
        .unwrap_err();
    match err {
        reqwest_middleware::Error::Reqwest(err) => assert!(err.is_connect(), "{err}"),
        other => panic!("a middleware error: {other}"),
    }
}

/// In an outage (every answer 503), the client's shared retry budget stops
/// the retries after a few failures: 50 requests of up to 6 attempts make
/// about 55 attempts, not 300. Without the budget they make 300; once
/// answers come back, retries resume.
#[tokio::test(start_paused = true)]
async fn a_shared_retry_budget_bounds_the_attempts_in_an_outage() {
    let outage = |layer: RetryLayer| async move {
        let script = Script::new(std::iter::repeat_n(s503(), 400));
        let client = layer
            .with_attempts(6)
            .with_backoff(Duration::from_millis(1), Duration::from_millis(1))
            .layer(script.service());
        for _ in 0..50 {
            let response = client.clone().oneshot(keyed_post()).await.unwrap();
            assert_eq!(response.status(), 503);
        }
        script.attempts()
    };
    let budgeted = outage(RetryLayer::new()).await;
    assert!((50..=60).contains(&budgeted), "{budgeted} attempts");
    assert_eq!(outage(RetryLayer::new().without_retry_budget()).await, 300);

    // Answers coming back refill it: after 70 final answers, a failing
    // request is retried again.
    let script = Script::new(
        std::iter::repeat_n(s503(), 10)
            .chain(std::iter::repeat_n(Answer::Status(201, &[], "ok"), 70))
            .chain([s503(), Answer::Status(201, &[], "ok")]),
    );
    let client = RetryLayer::new()
        .with_backoff(Duration::from_millis(1), Duration::from_millis(1))
        .layer(script.service());
    // Six requests meet the ten 503s (the first is retried until the
    // budget is half spent), then 70 are answered.
    for _ in 0..(6 + 70) {
        let _ = client.clone().oneshot(keyed_post()).await.unwrap();
    }
    let before = script.attempts();
    let last = client.clone().oneshot(keyed_post()).await.unwrap();
    assert_eq!(last.status(), 201, "retried after the 503");
    assert_eq!(script.attempts() - before, 2);
}

/// The deadline bounds the answer's body too: a 201 whose body stalls ends
/// with an error at the deadline, not minutes later.
#[tokio::test(start_paused = true)]
async fn a_stalled_body_ends_at_the_deadline() {
    use futures_util::StreamExt;
    let stalled = service_fn(|_req: Request<Full<Bytes>>| async {
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(http_body::Frame::data(
            Bytes::from_static(b"{\"id\":"),
        ))]);
        let body = http_body_util::StreamBody::new(first.chain(futures_util::stream::pending()));
        Ok::<_, std::io::Error>(Response::builder().status(201).body(body).unwrap())
    });
    let client = RetryLayer::new()
        .with_deadline(Duration::from_secs(10))
        .layer(stalled);
    let start = Instant::now();
    let response = client.oneshot(keyed_post()).await.unwrap();
    assert_eq!(response.status(), 201);
    let err = response.into_body().collect().await.unwrap_err();
    assert!(err.to_string().contains("deadline"), "{err}");
    let waited = start.elapsed();
    assert!(
        (Duration::from_secs(10)..Duration::from_secs(11)).contains(&waited),
        "{waited:?}"
    );
}

/// A service answering from `answers` in turn, each body streamed in two
/// frames with no length (`None` for a body that stalls after its first
/// frame), then 201.
fn streamed(
    answers: Vec<(u16, &'static str, Option<&'static str>)>,
    calls: Arc<std::sync::atomic::AtomicUsize>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>>,
    Error = std::io::Error,
    Future: Send,
> + Clone
+ Send
+ 'static {
    use futures_util::StreamExt;
    use http_body_util::{StreamBody, combinators::UnsyncBoxBody};
    let answers = Arc::new(answers);
    let count = calls;
    service_fn(move |_req: Request<Full<Bytes>>| {
        let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let answer = answers.get(n).copied();
        async move {
            let (status, media_type, body) = answer.unwrap_or((201, "text/plain", Some("booked")));
            let frame = |s: &str| {
                Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(s.to_owned())))
            };
            let body: UnsyncBoxBody<Bytes, std::io::Error> = match body {
                Some(text) => {
                    let (head, tail) = text.split_at(text.len() / 2);
                    UnsyncBoxBody::new(StreamBody::new(futures_util::stream::iter([
                        frame(head),
                        frame(tail),
                    ])))
                }
                None => UnsyncBoxBody::new(StreamBody::new(
                    futures_util::stream::iter([frame("{\"code\":")])
                        .chain(futures_util::stream::pending()),
                )),
            };
            Ok::<_, std::io::Error>(
                Response::builder()
                    .status(status)
                    .header("content-type", media_type)
                    .body(body)
                    .unwrap(),
            )
        }
    })
}

/// A 409 in flight is recognised whatever its framing: streamed with no
/// length, its media type in any case, the IETF draft's problem without a
/// `code`, Stripe's `idempotency_key_in_use`; a 409 body that stalls is cut
/// at the attempt timeout and retried. A reused key is still final.
#[tokio::test(start_paused = true)]
async fn in_flight_409s_are_recognised_in_any_framing() {
    use tower_idempotency::client::Ending;
    let ietf = r#"{"type":"https://example.com/outstanding","title":"A request is outstanding for this key"}"#;
    let stripe = r#"{"error":{"type":"invalid_request_error","code":"idempotency_key_in_use"}}"#;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let service = streamed(
        vec![
            (409, "Application/Problem+JSON", Some(IN_FLIGHT)),
            (409, "application/problem+json", Some(ietf)),
            (409, "application/json; charset=utf-8", Some(stripe)),
            (409, "application/problem+json", None),
        ],
        calls.clone(),
    );
    let client = RetryLayer::new()
        .with_attempts(6)
        .with_attempt_timeout(Duration::from_secs(2))
        .with_backoff(Duration::from_millis(1), Duration::from_millis(1))
        .layer(service);
    let response = client.oneshot(keyed_post()).await.unwrap();
    assert_eq!(response.status(), 201);
    let report = response.extensions().get::<RetryReport>().unwrap().clone();
    assert_eq!((report.attempts, report.ending), (5, Ending::Done));
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 5);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "booked"
    );

    // A reused key, streamed the same way: final, and its body handed
    // back whole.
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let service = streamed(
        vec![(409, "application/problem+json", Some(REUSED))],
        calls.clone(),
    );
    let response = RetryLayer::new()
        .layer(service)
        .oneshot(keyed_post())
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        REUSED
    );
}

/// The classification is a policy: replaced for a whole client, and for one
/// request through its extensions.
#[tokio::test(start_paused = true)]
async fn the_retry_policy_is_replaceable_per_client_and_per_request() {
    use tower_idempotency::client::{
        Answer as Seen, DefaultPolicy, Ending, Judgement, Reach, RequestPolicy, RetryPolicy,
    };
    // A server whose "still running" is a 423 with a header.
    let locked: &[(&str, &str)] = &[("x-still-running", "1")];
    let script = Script::new([
        Answer::Status(423, locked, ""),
        Answer::Status(423, locked, ""),
    ]);
    let client = RetryLayer::new()
        .with_backoff(Duration::from_millis(1), Duration::from_millis(1))
        .with_policy(|answer: &Seen<'_>| {
            if answer.status() == 423 && answer.headers().contains_key("x-still-running") {
                Judgement::Retry {
                    after: answer.retry_after(),
                    reach: Reach::Maybe,
                }
            } else {
                DefaultPolicy.judge(answer)
            }
        })
        .layer(script.service());
    let response = client.clone().oneshot(keyed_post()).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(script.attempts(), 3, "both 423s were retried");

    // The client's policy hands everything else to the default: a 503 is
    // retried.
    let script = Script::new([s503()]);
    let client = RetryLayer::new()
        .with_backoff(Duration::from_millis(1), Duration::from_millis(1))
        .with_policy(|answer: &Seen<'_>| DefaultPolicy.judge(answer))
        .layer(script.service());
    let _ = client.clone().oneshot(keyed_post()).await.unwrap();
    assert_eq!(script.attempts(), 2);

    // One request that takes a 503 as final, and one whose policy reads a
    // body the default would not.
    let script = Script::new([s503(), Answer::Status(400, &[], "busy: try later")]);
    let client = RetryLayer::new()
        .with_backoff(Duration::from_millis(1), Duration::from_millis(1))
        .layer(script.service());
    let mut request = keyed_post();
    request
        .extensions_mut()
        .insert(RequestPolicy::new(|_: &Seen<'_>| Judgement::done()));
    let response = client.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), 503);
    let report = response.extensions().get::<RetryReport>().unwrap();
    assert_eq!((report.attempts, report.ending), (1, Ending::Done));

    struct BusyText;
    impl RetryPolicy for BusyText {
        fn reads_body(&self, status: StatusCode, _: &http::HeaderMap) -> bool {
            status == 400
        }
        fn judge(&self, answer: &Seen<'_>) -> Judgement {
            match answer.body() {
                Some(body) if body.starts_with(b"busy") => Judgement::Retry {
                    after: None,
                    reach: Reach::Nothing,
                },
                _ => DefaultPolicy.judge(answer),
            }
        }
    }
    let mut request = keyed_post();
    request
        .extensions_mut()
        .insert(RequestPolicy::new(BusyText));
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200, "the 400 that said busy was retried");
    assert_eq!(script.attempts(), 3);
}

/// Through reqwest over real TCP: a 409 in flight sent chunked, then one
/// whose body ends with the connection (no length at all), are both
/// recognised and retried; a request's own policy applies there too.
#[cfg(feature = "reqwest")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_recognises_in_flight_409s_in_any_framing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower_idempotency::client::{
        Answer as Seen, Ending, Judgement, RequestPolicy, RetryMiddleware,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        let chunked = format!(
            "HTTP/1.1 409 Conflict\r\ncontent-type: Application/Problem+JSON\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{IN_FLIGHT}\r\n0\r\n\r\n",
            IN_FLIGHT.len()
        );
        let ietf = r#"{"type":"https://example.com/outstanding","title":"outstanding"}"#;
        let unlengthed = format!(
            "HTTP/1.1 409 Conflict\r\ncontent-type: application/problem+json\r\nconnection: close\r\n\r\n{ietf}"
        );
        let booked = "HTTP/1.1 201 Created\r\ncontent-length: 6\r\nconnection: close\r\n\r\nbooked"
            .to_owned();
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let answer = match n % 3 {
                0 => chunked.clone(),
                1 => unlengthed.clone(),
                _ => booked.clone(),
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = socket.write_all(answer.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::from(RetryLayer::new().with_backoff(
            Duration::from_millis(1),
            Duration::from_millis(5),
        )))
        .build();
    let key = IntentKey::derive("book", &serde_json::json!({"slot": 12})).unwrap();
    let response = client
        .post(format!("http://{addr}/book"))
        .with_extension(key.clone())
        .body("slot 12")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let report = response.extensions().get::<RetryReport>().unwrap().clone();
    assert_eq!((report.attempts, report.ending), (3, Ending::Done));
    assert_eq!(response.text().await.unwrap(), "booked");

    // This request's policy takes every answer as final: the chunked 409
    // comes back, its body whole.
    let response = client
        .post(format!("http://{addr}/book"))
        .with_extension(key)
        .with_extension(RequestPolicy::new(|_: &Seen<'_>| Judgement::done()))
        .body("slot 12")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    assert_eq!(
        response.extensions().get::<RetryReport>().unwrap().attempts,
        1
    );
    assert_eq!(response.text().await.unwrap(), IN_FLIGHT);
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 4);
}

/// The seed incident's second lesson: a 3 s attempt timeout in front of an
/// endpoint that takes 4.2 s one call in four. Without learning, every slow
/// call times out on each attempt and fails; with it, the timeout stretches
/// after a few calls and the slow calls are answered on their first
/// attempt. Another endpoint keeps its own figures.
#[tokio::test(start_paused = true)]
async fn a_learnt_timeout_stretches_to_the_endpoints_latency() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower_idempotency::client::LearntTimeout;
    let run = |layer: RetryLayer| async move {
        let calls = Arc::new(AtomicUsize::new(0));
        let count = calls.clone();
        let slow = service_fn(move |req: Request<Full<Bytes>>| {
            count.fetch_add(1, Ordering::SeqCst);
            async move {
                // One slot in four is slow.
                let slot: u64 = req.uri().query().unwrap().parse().unwrap();
                let took = if slot.is_multiple_of(4) { 4200 } else { 900 };
                tokio::time::sleep(Duration::from_millis(took)).await;
                Ok::<_, std::io::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        });
        let timeouts = Arc::new(Mutex::new(Vec::new()));
        let seen = timeouts.clone();
        let client = layer
            .with_attempt_timeout(Duration::from_secs(3))
            .with_attempts(4)
            .with_deadline(Duration::from_secs(60))
            .with_backoff(Duration::from_millis(1), Duration::from_millis(1))
            .without_retry_budget()
            .on_attempt(move |event| {
                seen.lock()
                    .unwrap()
                    .push((event.timeout, event.outcome.clone()));
            })
            .layer(slow);
        let mut failed = Vec::new();
        for slot in 0..24u64 {
            let mut request = Request::post(format!("http://api.example/bookings?{slot}"))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            let key = IntentKey::derive("book", &serde_json::json!({"slot": slot})).unwrap();
            request.extensions_mut().insert(key);
            if client.clone().oneshot(request).await.is_err() {
                failed.push(slot);
            }
        }
        let events = timeouts.lock().unwrap().clone();
        (failed, events, calls.load(Ordering::SeqCst))
    };

    let (failed, _, _) = run(RetryLayer::new()).await;
    assert_eq!(failed, [0, 4, 8, 12, 16, 20], "each slow call fails");

    let (failed, events, calls) =
        run(RetryLayer::new().with_learnt_timeout(LearntTimeout::new())).await;
    // Slot 0 is the first call: its four attempts time out at 3 s (four
    // samples, one short of learning). Slot 1's 0.9 s makes five: from
    // slot 2 on, attempts get 4.5 s (3 s × 1.5), so slot 4 is answered on
    // its first attempt, and so is every later slow call.
    assert_eq!(failed, [0], "only the first call fails");
    let timed_out = events
        .iter()
        .filter(|(_, o)| *o == AttemptOutcome::TimedOut)
        .count();
    assert_eq!(timed_out, 4, "{events:?}");
    assert_eq!(calls, 4 + 23, "every later call made one attempt");
    assert_eq!(events[4].0, Duration::from_secs(3), "not learnt yet");
    let learnt = events[5].0;
    assert!(
        (Duration::from_millis(4500)..Duration::from_millis(4560)).contains(&learnt),
        "learnt from 3 s (the sketch keeps two digits): {learnt:?}"
    );
    let (last_timeout, _) = events.last().unwrap();
    assert!(
        (Duration::from_millis(6200)..Duration::from_millis(6500)).contains(last_timeout),
        "p95 4.2 s × 1.5: {last_timeout:?}"
    );
    assert_eq!(
        events[0].0,
        Duration::from_secs(3),
        "starts from the set timeout"
    );
}

/// Through reqwest too, the deadline bounds the body: a 201 whose body
/// stalls after its first bytes ends with an error at the deadline, and
/// the response keeps its URL and headers.
#[cfg(feature = "reqwest")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_a_stalled_body_ends_at_the_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower_idempotency::client::RetryMiddleware;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = socket.read(&mut buf).await;
        socket
            .write_all(
                b"HTTP/1.1 201 Created\r\ncontent-length: 100\r\nx-booking: 7\r\n\r\n{\"id\":",
            )
            .await
            .unwrap();
        // Never the rest, never closed.
        std::future::pending::<()>().await;
        drop(socket);
    });
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::from(
            RetryLayer::new().with_deadline(Duration::from_millis(800)),
        ))
        .build();
    let key = IntentKey::derive("book", &serde_json::json!({"slot": 13})).unwrap();
    let response = client
        .post(format!("http://{addr}/book"))
        .with_extension(key)
        .body("slot 13")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-booking"], "7");
    assert_eq!(response.url().path(), "/book");
    assert!(response.extensions().get::<RetryReport>().is_some());
    // The guard only turns a hang into a failure; the deadline is 0.8 s.
    let read = tokio::time::timeout(Duration::from_secs(60), response.text())
        .await
        .expect("the body read ended");
    let err = read.unwrap_err();
    let mut chain = Vec::new();
    let mut cause: Option<&dyn std::error::Error> = Some(&err);
    while let Some(e) = cause {
        chain.push(e.to_string());
        cause = e.source();
    }
    assert!(chain.iter().any(|e| e.contains("deadline")), "{chain:?}");
}
