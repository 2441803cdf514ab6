//! The client's endings and the at-most-once runner's answers under odd and
//! hostile answers: what each ending claims must be true of the handler.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{Layer, ServiceExt, service_fn};
use tower_idempotency::{
    MemoryStore,
    client::{Answer, Ending, IntentKey, Judgement, LearntTimeout, Reach, RetryLayer, RetryReport},
    once::{AtMostOnce, OnceError},
    store::{Fault, FaultyStore, Op},
};

fn keyed_post() -> Request<Full<Bytes>> {
    let mut request = Request::post("http://api.example/bookings")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let key = IntentKey::derive("book", &serde_json::json!({"slot": "09:00"})).unwrap();
    request.extensions_mut().insert(key);
    request
}

/// One scripted answer: status, headers, body.
type Scripted = (u16, Vec<(&'static str, &'static str)>, &'static str);

/// A service that answers with `answers` in turn (status, headers, body);
/// `None` means "hang forever".
fn scripted(
    answers: Vec<Option<Scripted>>,
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = std::io::Error,
    Future: Send,
> + Clone
+ Send
+ 'static {
    let answers = Arc::new(Mutex::new(std::collections::VecDeque::from(answers)));
    service_fn(move |_req: Request<Full<Bytes>>| {
        let answers = answers.clone();
        let n = calls.fetch_add(1, Ordering::SeqCst);
        let _ = n;
        async move {
            let next = answers.lock().unwrap().pop_front().flatten();
            match next {
                None => std::future::pending().await,
                Some((status, headers, body)) => {
                    let mut r = Response::builder().status(status);
                    for (k, v) in headers {
                        r = r.header(k, v);
                    }
                    Ok(r.body(Full::new(Bytes::from_static(body.as_bytes())))
                        .unwrap())
                }
            }
        }
    })
}

/// Through reqwest: an attempt that may have reached the handler (it timed
/// out after the server read the request), then a refused connection. The
/// caller must not get a bare connect error (which says nothing ran): it
/// gets the `RetryError` saying `OutcomeUnknown`.
#[cfg(feature = "reqwest")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_a_timeout_after_sending_then_a_refusal_is_outcome_unknown() {
    use tower_idempotency::client::RetryMiddleware;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler_reached = Arc::new(AtomicUsize::new(0));
    let reached = handler_reached.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let (mut socket, _) = listener.accept().await.unwrap();
        drop(listener); // every later attempt is refused
        let mut buf = vec![0u8; 4096];
        let n = socket.read(&mut buf).await.unwrap();
        assert!(n > 0);
        reached.fetch_add(1, Ordering::SeqCst); // the "handler" got it
        tokio::time::sleep(Duration::from_secs(30)).await; // never answers
        drop(socket);
    });
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::from(
            RetryLayer::new()
                .with_attempts(2)
                .with_attempt_timeout(Duration::from_millis(300))
                .with_backoff(Duration::from_millis(1), Duration::from_millis(1)),
        ))
        .build();
    let key = IntentKey::derive("book", &serde_json::json!({"slot": "f1"})).unwrap();
    let err = client
        .post(format!("http://{addr}/book"))
        .with_extension(key)
        .body("x")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        handler_reached.load(Ordering::SeqCst),
        1,
        "attempt 1 reached the server"
    );
    // What a caller can learn: the error is reqwest's, `is_connect()`.
    let says_connect = matches!(&err, reqwest_middleware::Error::Reqwest(e) if e.is_connect());
    // Is there any RetryReport / Ending anywhere in the error?
    let mut has_report = false;
    if let reqwest_middleware::Error::Middleware(e) = &err {
        has_report = e
            .downcast_ref::<tower_idempotency::client::RetryError>()
            .is_some_and(|r| r.ending() == Ending::OutcomeUnknown);
    }
    assert!(
        has_report && !says_connect,
        "attempt 1 may have run, but the caller got `{err}` (is_connect = {says_connect}) \
         and no RetryReport saying OutcomeUnknown"
    );
}

/// The same through `RetryLayer` over hyper-util.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_a_timeout_after_sending_then_a_refusal_is_outcome_unknown() {
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let (mut socket, _) = listener.accept().await.unwrap();
        drop(listener);
        let mut buf = vec![0u8; 4096];
        let _ = socket.read(&mut buf).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let client = RetryLayer::new()
        .with_attempts(2)
        .with_attempt_timeout(Duration::from_millis(300))
        .with_backoff(Duration::from_millis(1), Duration::from_millis(1))
        .layer(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let mut req = Request::post(format!("http://{addr}/book"))
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    req.extensions_mut()
        .insert(IntentKey::derive("book", &serde_json::json!({"slot": "f1c"})).unwrap());
    let err = client.oneshot(req).await.unwrap_err();
    assert_eq!(err.ending(), Ending::OutcomeUnknown);
}

/// A learnt timeout with a huge or infinite margin stays within its
/// ceiling instead of overflowing the clock.
#[tokio::test(start_paused = true)]
async fn a_learnt_timeout_with_a_huge_margin_does_not_panic() {
    for margin in [f64::INFINITY, 1e300] {
        let calls = Arc::new(AtomicUsize::new(0));
        let client = RetryLayer::new()
            .with_learnt_timeout(LearntTimeout::new().with_margin(margin))
            .layer(scripted(
                (0..10).map(|_| Some((201, vec![], "ok"))).collect(),
                calls,
            ));
        let outcome = tokio::spawn(async move {
            for _ in 0..10 {
                let r = client.clone().oneshot(keyed_post()).await.unwrap();
                assert_eq!(r.status(), 201);
            }
        })
        .await;
        assert!(
            outcome.is_ok(),
            "with_margin({margin}) made the client panic: {:?}",
            outcome.err().map(|e| e.to_string())
        );
    }
}

/// A background completion that ends fenced (another run took the key
/// over while the store was down) never landed: `drain` says so.
#[tokio::test(start_paused = true)]
async fn drain_counts_a_background_completion_that_was_fenced() {
    let memory = MemoryStore::default();
    let store = FaultyStore::new(memory.clone());
    let lease = Duration::from_millis(300);
    let a = AtMostOnce::new(store.clone()).with_lease(lease);
    let b = AtMostOnce::new(memory.clone()).with_lease(lease);
    let input = serde_json::json!({"job": 1});
    let runs = Arc::new(AtomicUsize::new(0));

    store.set_fault(Op::Complete, Some(Fault::Unavailable));
    store.set_fault(Op::Renew, Some(Fault::Unavailable));
    let r = runs.clone();
    let out_a: u32 = a
        .run("s", "k", &input, |_| async move {
            r.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(1)
        })
        .await
        .expect("a: Ok while its record is pending (documented)");
    assert_eq!(out_a, 1);
    // a's store stays down past the lease; b takes the key over and runs it.
    tokio::time::sleep(lease * 3).await;
    let r = runs.clone();
    let out_b: u32 = b
        .run("s", "k", &input, |ctx| async move {
            assert!(ctx.took_over());
            r.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(2)
        })
        .await
        .unwrap();
    assert_eq!(out_b, 2);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the work ran twice");
    // a's store comes back; its background completion is fenced.
    store.clear_faults();
    let drained = a.drain(Duration::from_secs(60)).await;
    assert!(
        !drained.is_complete(),
        "a's output never landed and the work was repeated by b, but drain says: {drained}"
    );
}

/// `exhausted` means the attempts, budget or deadline ran out: never for a
/// keyless POST, which is sent once by rule.
#[tokio::test(start_paused = true)]
async fn a_keyless_post_that_failed_once_is_not_exhausted() {
    let svc = service_fn(|_req: Request<Full<Bytes>>| async {
        Err::<Response<Full<Bytes>>, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ))
    });
    let client = RetryLayer::new().layer(svc);
    let keyless = Request::post("http://api.example/bookings")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let err = client.oneshot(keyless).await.unwrap_err();
    assert_eq!(err.report().attempts, 1);
    assert!(
        !err.report().exhausted,
        "a keyless POST is never retried: nothing ran out, but exhausted = true"
    );
}

/// A 409 in flight followed by a final refusal ends `Done`: the refusal is
/// the final answer about this request.
#[tokio::test(start_paused = true)]
async fn in_flight_then_a_final_refusal_is_done() {
    const IN_FLIGHT: &str = r#"{"type":"x","title":"t","status":409,"code":"request-in-flight"}"#;
    const REUSED: &str = r#"{"type":"x","title":"t","status":400,"code":"key-reused"}"#;
    let calls = Arc::new(AtomicUsize::new(0));
    let client = RetryLayer::new()
        .with_backoff(Duration::from_millis(10), Duration::from_millis(10))
        .layer(scripted(
            vec![
                Some((
                    409,
                    vec![("content-type", "application/problem+json")],
                    IN_FLIGHT,
                )),
                Some((
                    400,
                    vec![("content-type", "application/problem+json")],
                    REUSED,
                )),
            ],
            calls,
        ));
    let response = client.oneshot(keyed_post()).await.unwrap();
    let ending = response.extensions().get::<RetryReport>().unwrap().ending;
    assert_eq!(
        ending,
        Ending::Done,
        "a final refusal is a final answer about the request"
    );
}

/// A custom policy that retries an answer the handler gave
/// (`Judgement::Retry { reach: Reach::Answered }`) never ends `NothingRan`.
#[tokio::test(start_paused = true)]
async fn a_retry_of_an_answered_attempt_is_not_nothing_ran() {
    let calls = Arc::new(AtomicUsize::new(0));
    let client = RetryLayer::new()
        .with_attempts(2)
        .with_backoff(Duration::from_millis(10), Duration::from_millis(10))
        .with_policy(|answer: &Answer<'_>| {
            if answer.status() == 500 {
                Judgement::Retry {
                    after: None,
                    reach: Reach::Answered,
                }
            } else {
                Judgement::done()
            }
        })
        .layer(scripted(
            vec![Some((500, vec![], "boom")), Some((500, vec![], "boom"))],
            calls,
        ));
    let response = client.oneshot(keyed_post()).await.unwrap();
    let ending = response.extensions().get::<RetryReport>().unwrap().ending;
    assert_ne!(
        ending,
        Ending::NothingRan,
        "the handler answered twice (Reach::Answered), yet the ending says nothing ran"
    );
}

/// An empty `Idempotency-Key` is no key: the POST is sent once, like any
/// keyless POST.
#[tokio::test(start_paused = true)]
async fn a_post_with_an_empty_key_is_sent_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let client = RetryLayer::new()
        .with_attempt_timeout(Duration::from_secs(1))
        .layer(scripted(
            vec![None, Some((201, vec![], "ok"))],
            calls.clone(),
        ));
    let request = Request::post("http://api.example/bookings")
        .header("idempotency-key", "")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let _ = client.oneshot(request).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a POST with an empty Idempotency-Key was sent more than once"
    );
}

/// A 201 whose body breaks off: the report was made from the head, and the
/// body's error says the outcome is unknown.
#[tokio::test(start_paused = true)]
async fn a_body_cut_off_says_the_outcome_is_unknown() {
    type Frames = futures_util::stream::Iter<
        std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::io::Error>>,
    >;
    let svc = service_fn(|_req: Request<Full<Bytes>>| async {
        let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"{\"id\":"))),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "cut",
            )),
        ];
        let body: StreamBody<Frames> = StreamBody::new(futures_util::stream::iter(frames));
        Ok::<_, std::io::Error>(Response::builder().status(201).body(body).unwrap())
    });
    let client = RetryLayer::new().layer(svc);
    let response = client.oneshot(keyed_post()).await.unwrap();
    let body = response.into_body().collect().await;
    let err = body.expect_err("the body was cut off");
    assert!(
        err.to_string().contains("outcome is unknown"),
        "the body's error says what the caller knows: {err}"
    );
}

/// A final answer whose body the policy would read, longer than 64 KiB and
/// without a length (chunked), is judged without its body and stays final:
/// never retried, handed back whole.
fn big_body(code: &str) -> Bytes {
    let pad = "x".repeat(70 * 1024);
    Bytes::from(format!(
        r#"{{"type":"x","code":"{code}","detail":"{pad}"}}"#
    ))
}

#[tokio::test(start_paused = true)]
async fn a_final_answer_with_a_long_body_is_final_in_any_framing() {
    for (status, code) in [(409u16, "key-reused"), (500, "internal")] {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let svc = service_fn(move |_req: Request<Full<Bytes>>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move {
                // No exact size hint, no content-length: chunked on the wire.
                let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> =
                    vec![Ok(http_body::Frame::data(big_body(code)))];
                let body = StreamBody::new(futures_util::stream::iter(frames));
                Ok::<_, std::io::Error>(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/problem+json")
                        .body(body)
                        .unwrap(),
                )
            }
        });
        let client = RetryLayer::new()
            .with_attempts(3)
            .with_backoff(Duration::from_millis(10), Duration::from_millis(10))
            .layer(svc);
        let result = client.oneshot(keyed_post()).await;
        let (attempts, ending) = match &result {
            Ok(r) => {
                let rep = r.extensions().get::<RetryReport>().unwrap();
                (rep.attempts, rep.ending)
            }
            Err(e) => (e.report().attempts, e.ending()),
        };
        assert!(
            calls.load(Ordering::SeqCst) == 1 && result.is_ok() && ending == Ending::Done,
            "a final {status} {code} with a 70 KiB chunked problem body: sent {} times, \
             attempts {attempts}, ending {ending:?}, result {}",
            calls.load(Ordering::SeqCst),
            match &result {
                Ok(_) => "Ok".to_string(),
                Err(e) => e.to_string(),
            }
        );
    }
}

/// `10` and `10.0` are one input; integers beyond 2^53 are refused.
#[tokio::test]
async fn at_most_once_numbers() {
    let once = AtMostOnce::new(MemoryStore::default());
    let a: u32 = once
        .run("s", "n", &serde_json::json!({"n": 10}), |_| async {
            Ok::<_, std::io::Error>(1)
        })
        .await
        .unwrap();
    let b: u32 = once
        .run("s", "n", &serde_json::json!({"n": 10.0}), |_| async {
            Ok::<_, std::io::Error>(2)
        })
        .await
        .unwrap();
    assert_eq!((a, b), (1, 1));
    for big in [
        serde_json::json!({"n": 9007199254740992u64}),
        serde_json::json!({"n": -9007199254740992i64}),
        serde_json::json!({"n": 1e16}),
        serde_json::json!({"n": [u64::MAX]}),
    ] {
        let r = once
            .run("s", "big", &big, |_| async { Ok::<u32, std::io::Error>(3) })
            .await;
        assert!(matches!(r, Err(OnceError::Input(_))), "{big}: {r:?}");
    }
    let r = once
        .run("s", "big128", &(u128::MAX), |_| async {
            Ok::<u32, std::io::Error>(3)
        })
        .await;
    assert!(matches!(r, Err(OnceError::Input(_))), "u128: {r:?}");
}

/// reqwest follows redirects: a POST the handler processed and answered
/// `303 See Other` whose `Location` cannot be connected to fails with a
/// connect error for *another* URL, which says nothing of this request's
/// handler: the ending is never `NothingRan`.
#[cfg(feature = "reqwest")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_a_redirect_that_fails_after_the_handler_ran_is_not_nothing_ran() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower_idempotency::client::RetryMiddleware;
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // dropped: nothing listens there
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bookings = Arc::new(AtomicUsize::new(0));
    let made = bookings.clone();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            n += 1;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let k = socket.read(&mut chunk).await.unwrap();
                if k == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..k]);
            }
            let answer = if n == 1 {
                made.fetch_add(1, Ordering::SeqCst); // the booking is made
                format!(
                    "HTTP/1.1 303 See Other\r\nlocation: http://127.0.0.1:{closed_port}/bookings/1\r\n\
                     content-length: 0\r\nconnection: close\r\n\r\n"
                )
            } else {
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_owned()
            };
            socket.write_all(answer.as_bytes()).await.unwrap();
            let _ = socket.shutdown().await;
        }
    });
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::from(
            RetryLayer::new()
                .with_attempts(2)
                .with_backoff(Duration::from_millis(1), Duration::from_millis(1)),
        ))
        .build();
    let key = IntentKey::derive("book", &serde_json::json!({"slot": "f12"})).unwrap();
    let response = client
        .post(format!("http://{addr}/book"))
        .with_extension(key)
        .body("x")
        .send()
        .await
        .unwrap();
    let report = response.extensions().get::<RetryReport>().cloned().unwrap();
    assert_eq!(
        bookings.load(Ordering::SeqCst),
        1,
        "the first attempt's handler ran"
    );
    assert_ne!(
        report.ending,
        Ending::NothingRan,
        "the handler ran on attempt 1, but the report says NothingRan: {report:?}"
    );
}

/// Through reqwest too: a final 409 whose chunked body is longer than the
/// 64 KiB read to judge it is final, sent once, and handed back whole.
#[cfg(feature = "reqwest")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_a_final_answer_with_a_long_chunked_body_is_final() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower_idempotency::client::RetryMiddleware;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let body = big_body("key-reused");
    let expected = body.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let mut out = b"HTTP/1.1 409 Conflict\r\ncontent-type: application/problem+json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
                for chunk in body.chunks(8192) {
                    out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    out.extend_from_slice(chunk);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
                let _ = socket.write_all(&out).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::from(RetryLayer::new().with_backoff(
            Duration::from_millis(1),
            Duration::from_millis(1),
        )))
        .build();
    let key = IntentKey::derive("book", &serde_json::json!({"slot": "long"})).unwrap();
    let response = client
        .post(format!("http://{addr}/book"))
        .with_extension(key)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    let report = response.extensions().get::<RetryReport>().cloned().unwrap();
    assert_eq!((report.attempts, report.ending), (1, Ending::Done));
    assert_eq!(response.bytes().await.unwrap(), expected);
    assert_eq!(served.load(Ordering::SeqCst), 1);
}

#[derive(serde::Serialize)]
struct Pay {
    amount: Option<f64>,
}

/// Non-finite numbers (which JSON cannot carry, and serde_json writes as
/// `null`) are refused as inputs: `+inf`, `-inf` and NaN are never one input
/// with `null` that replays another's output.
#[tokio::test]
async fn non_finite_numbers_are_refused_as_inputs() {
    let once = AtMostOnce::new(MemoryStore::default());
    let none: u32 = once
        .run("s", "k", &Pay { amount: None }, |_| async {
            Ok::<_, std::io::Error>(1)
        })
        .await
        .unwrap();
    assert_eq!(none, 1);
    for other in [f64::INFINITY, f64::NEG_INFINITY, f64::NAN] {
        let ran = Arc::new(AtomicUsize::new(0));
        let counted = ran.clone();
        let second = once
            .run(
                "s",
                "k",
                &Pay {
                    amount: Some(other),
                },
                |_| async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    Ok::<u32, std::io::Error>(2)
                },
            )
            .await;
        assert!(
            matches!(second, Err(OnceError::Input(_))),
            "{other}: {second:?}"
        );
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }
}

/// Intent keys refuse non-finite numbers too: `+inf`, `-inf` and `null`
/// are never one key.
#[test]
fn intent_keys_refuse_non_finite_numbers() {
    use tower_idempotency::client::IntentKeyError;
    for amount in [f64::INFINITY, f64::NEG_INFINITY, f64::NAN] {
        let err = IntentKey::derive(
            "pay",
            &Pay {
                amount: Some(amount),
            },
        )
        .unwrap_err();
        assert!(matches!(err, IntentKeyError::NonFinite), "{amount}: {err}");
    }
    IntentKey::derive("pay", &Pay { amount: None }).unwrap();
}
