//! At-most-once work on the in-memory store: races, duplicates, mismatched
//! inputs, errors, panics, take-overs and store failures. The same race on
//! Redis, Redis Cluster and PostgreSQL is in their own test files.

mod common;

use std::time::Duration;

use common::Counter;
use serde_json::json;
use tower_idempotency::{
    MemoryStore,
    once::{AtMostOnce, OnceError},
    store::{Fault, FaultyStore, Op},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_calls_run_once_and_all_get_the_output() {
    common::at_most_once_races(MemoryStore::default(), "tools").await;
}

#[tokio::test]
async fn a_redelivered_message_returns_the_recorded_output() {
    let once = AtMostOnce::new(MemoryStore::default());
    let counter = Counter::default();
    for _ in 0..3 {
        let c = counter.clone();
        let id: u64 = once
            .run(
                "queue",
                "msg-1",
                &json!({"slot": "09:00"}),
                |_| async move { Ok::<_, std::io::Error>(c.hit() as u64 * 100) },
            )
            .await
            .unwrap();
        assert_eq!(id, 100);
    }
    assert_eq!(counter.get(), 1);
    // Map order in the input does not matter.
    let again: u64 = once
        .run("queue", "msg-1", &json!({"slot": "09:00"}), |_| async {
            Ok::<_, std::io::Error>(0)
        })
        .await
        .unwrap();
    assert_eq!(again, 100);
    // Another scope is another namespace.
    let other: u64 = once
        .run(
            "other-queue",
            "msg-1",
            &json!({"slot": "09:00"}),
            |_| async { Ok::<_, std::io::Error>(7) },
        )
        .await
        .unwrap();
    assert_eq!(other, 7);
}

#[tokio::test]
async fn a_different_input_with_the_key_is_refused() {
    let once = AtMostOnce::new(MemoryStore::default());
    once.run("s", "k", &json!({"a": 1}), |_| async {
        Ok::<_, std::io::Error>(1)
    })
    .await
    .unwrap();
    let err = once
        .run("s", "k", &json!({"a": 2}), |_| async {
            panic!("must not run");
            #[allow(unreachable_code)]
            Ok::<u32, std::io::Error>(2)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, OnceError::InputMismatch), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_while_the_first_runs_is_in_flight_or_waits() {
    let once = AtMostOnce::new(MemoryStore::default());
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let first = {
        let once = once.clone();
        tokio::spawn(async move {
            once.run("s", "k", &json!({}), |_| async move {
                started_tx.send(()).unwrap();
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok::<_, std::io::Error>("done".to_owned())
            })
            .await
        })
    };
    started.await.unwrap();
    let err = once
        .run("s", "k", &json!({}), |_| async {
            Ok::<_, std::io::Error>("again".to_owned())
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, OnceError::InFlight { retry_after } if retry_after <= Duration::from_secs(1)),
        "{err}"
    );
    let waiting = once.clone().with_wait(Duration::from_secs(5));
    let waited = waiting
        .run("s", "k", &json!({}), |_| async {
            Ok::<_, std::io::Error>("again".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(waited, "done");
    assert_eq!(first.await.unwrap().unwrap(), "done");
}

#[tokio::test]
async fn an_error_releases_the_key_and_the_next_call_runs() {
    let once = AtMostOnce::new(MemoryStore::default());
    let counter = Counter::default();
    for expected in [Err("card network down"), Ok(2)] {
        let c = counter.clone();
        let result = once
            .run("pay", "inv-7", &json!({"amount": 12.5}), |_| async move {
                match c.hit() {
                    1 => Err("card network down"),
                    n => Ok(n),
                }
            })
            .await;
        match (result, expected) {
            (Err(OnceError::Failed(e)), Err(want)) => assert_eq!(e, want),
            (Ok(n), Ok(want)) => assert_eq!(n, want),
            (other, want) => panic!("{other:?} vs {want:?}"),
        }
    }
    assert_eq!(counter.get(), 2);
}

#[tokio::test]
async fn a_recorded_error_is_returned_to_every_duplicate() {
    let once = AtMostOnce::new(MemoryStore::default());
    let counter = Counter::default();
    for _ in 0..3 {
        let c = counter.clone();
        let err = once
            .run_recording_errors("pay", "inv-8", &json!({"amount": 99}), |_| async move {
                c.hit();
                Err::<u64, _>("card declined".to_owned())
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, OnceError::Failed(e) if e == "card declined"),
            "{err}"
        );
    }
    assert_eq!(counter.get(), 1, "a refusal is final");
}

#[tokio::test]
async fn a_panic_releases_the_key_then_resumes() {
    let once = AtMostOnce::new(MemoryStore::default());
    let panicked = {
        let once = once.clone();
        tokio::spawn(async move {
            once.run("s", "k", &json!({}), |_| async {
                panic!("tool crashed");
                #[allow(unreachable_code)]
                Ok::<u8, std::io::Error>(0)
            })
            .await
        })
        .await
    };
    assert!(panicked.unwrap_err().is_panic());
    let after = once
        .run("s", "k", &json!({}), |_| async {
            Ok::<_, std::io::Error>(5u8)
        })
        .await
        .unwrap();
    assert_eq!(after, 5, "the key was released");
}

/// A caller that stops driving its call (its process died) leaves the claim
/// to lapse; the next call with the same input takes it over and is told so.
#[tokio::test(start_paused = true)]
async fn a_call_abandoned_mid_work_is_taken_over_with_the_flag() {
    let once = AtMostOnce::new(MemoryStore::default()).with_lease(Duration::from_secs(3));
    let input = json!({"x": 1});
    let abandoned = once.run("s", "k", &input, |_| async {
        std::future::pending::<()>().await;
        Ok::<u8, std::io::Error>(0)
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(10), abandoned)
            .await
            .is_err()
    );
    tokio::time::advance(Duration::from_secs(4)).await;
    let took_over = once
        .run("s", "k", &json!({"x": 1}), |ctx| async move {
            Ok::<_, std::io::Error>(ctx.took_over())
        })
        .await
        .unwrap();
    assert!(took_over);
}

/// The lease is renewed while the work runs: a duplicate long after the
/// lease would have lapsed still finds the call in flight.
#[tokio::test(start_paused = true)]
async fn the_lease_is_renewed_while_the_work_runs() {
    let once = AtMostOnce::new(MemoryStore::default()).with_lease(Duration::from_secs(3));
    let first = {
        let once = once.clone();
        tokio::spawn(async move {
            once.run("s", "k", &json!({}), |_| async {
                tokio::time::sleep(Duration::from_secs(20)).await;
                Ok::<_, std::io::Error>(1u8)
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(10)).await;
    let err = once
        .run("s", "k", &json!({}), |_| async {
            Ok::<_, std::io::Error>(2u8)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, OnceError::InFlight { .. }), "{err}");
    assert_eq!(first.await.unwrap().unwrap(), 1);
}

#[tokio::test]
async fn a_store_that_is_down_runs_nothing() {
    let store = FaultyStore::new(MemoryStore::default());
    store.set_fault(Op::Claim, Some(Fault::Unavailable));
    let once = AtMostOnce::new(store.clone());
    let err = once
        .run("s", "k", &json!({}), |_| async {
            panic!("must not run");
            #[allow(unreachable_code)]
            Ok::<u8, std::io::Error>(0)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, OnceError::Store(_)), "{err}");
}

/// The store fails to take the output: the caller still gets it, and the
/// completion lands in the background once the store is back, so the next
/// duplicate gets it too.
#[tokio::test(start_paused = true)]
async fn an_output_the_store_refused_is_recorded_later() {
    let store = FaultyStore::new(MemoryStore::default());
    let once = AtMostOnce::new(store.clone());
    store.set_fault(Op::Complete, Some(Fault::Unavailable));
    let first = once
        .run("s", "k", &json!({}), |_| async {
            Ok::<_, std::io::Error>(9u8)
        })
        .await
        .unwrap();
    assert_eq!(first, 9);
    store.set_fault(Op::Complete, None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let replayed = once
        .run("s", "k", &json!({}), |_| async {
            Ok::<_, std::io::Error>(0u8)
        })
        .await
        .unwrap();
    assert_eq!(replayed, 9);
}

#[tokio::test]
async fn bad_inputs_and_unreadable_outputs_are_named() {
    let once = AtMostOnce::new(MemoryStore::default());
    // Integers beyond what JSON doubles carry are refused, as intent keys
    // refuse them: two neighbours would otherwise be one input wherever
    // the input passed through JSON text.
    let big = |n: u64| json!({"n": n});
    let err = once
        .run("s", "big", &big(9007199254740993), |_| async {
            Ok::<_, std::io::Error>(1u8)
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            OnceError::Input(tower_idempotency::client::IntentKeyError::UnsafeInteger(_))
        ),
        "{err}"
    );
    let mut non_string_keys = std::collections::HashMap::new();
    non_string_keys.insert(vec![1u8], 1);
    let err = once
        .run("s", "k", &non_string_keys, |_| async {
            Ok::<u8, std::io::Error>(0)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, OnceError::Input(_)), "{err}");
    once.run("s", "typed", &json!({}), |_| async {
        Ok::<_, std::io::Error>("text".to_owned())
    })
    .await
    .unwrap();
    let err = once
        .run("s", "typed", &json!({}), |_| async {
            Ok::<_, std::io::Error>(1u64)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, OnceError::Unreadable(_)), "{err}");
}

/// An output that cannot be serialised is recorded as unreadable: the work
/// never runs a second time.
#[tokio::test]
async fn an_output_that_does_not_serialise_is_never_run_again() {
    #[derive(Debug)]
    struct Opaque;
    impl serde::Serialize for Opaque {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("not serialisable"))
        }
    }
    impl<'de> serde::Deserialize<'de> for Opaque {
        fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
            Ok(Opaque)
        }
    }
    let once = AtMostOnce::new(MemoryStore::default());
    let counter = Counter::default();
    let c = counter.clone();
    once.run("s", "k", &json!({}), |_| async move {
        c.hit();
        Ok::<_, std::io::Error>(Opaque)
    })
    .await
    .unwrap();
    let c = counter.clone();
    let err = once
        .run("s", "k", &json!({}), |_| async move {
            c.hit();
            Ok::<_, std::io::Error>(Opaque)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, OnceError::Unreadable(_)), "{err}");
    assert_eq!(counter.get(), 1);
}

/// A closure that panics before it returns its future releases the key too.
#[tokio::test]
async fn a_panic_before_the_future_releases_the_key() {
    let once = AtMostOnce::new(MemoryStore::default())
        .with_completion_retry_limit(Duration::MAX)
        .with_ttl(Duration::MAX);
    let panicked = {
        let once = once.clone();
        tokio::spawn(async move {
            once.run(
                "s",
                "k",
                &json!({}),
                |_| -> std::future::Ready<Result<u8, std::io::Error>> {
                    panic!("the closure itself panicked")
                },
            )
            .await
        })
        .await
    };
    assert!(panicked.unwrap_err().is_panic());
    let after = once
        .run("s", "k", &json!({}), |_| async {
            Ok::<_, std::io::Error>(3u8)
        })
        .await
        .unwrap();
    assert_eq!(after, 3);
}

/// Big integers that arrive as JSON text are refused before anything runs
/// (two of them would share one double, and the second would get the
/// first's output); `10` and `10.0` are one input, as in an intent key.
#[tokio::test]
async fn big_integers_from_json_text_are_refused_and_ten_is_ten_point_zero() {
    let once = AtMostOnce::new(MemoryStore::default());
    let counter = Counter::default();
    for text in [
        r#"{"order":123456789012345678901234}"#,
        r#"{"order":123456789012345678901235}"#,
    ] {
        let input: serde_json::Value = serde_json::from_str(text).unwrap();
        let c = counter.clone();
        let refused = once
            .run("payments", "big", &input, |_ctx| async move {
                c.hit();
                Ok::<_, std::io::Error>(1u64)
            })
            .await;
        assert!(
            matches!(
                refused,
                Err(OnceError::Input(
                    tower_idempotency::client::IntentKeyError::UnsafeInteger(_)
                ))
            ),
            "{text}: {refused:?}"
        );
    }
    assert_eq!(counter.get(), 0, "nothing ran");
    for text in [r#"{"amount":10}"#, r#"{"amount":10.0}"#] {
        let input: serde_json::Value = serde_json::from_str(text).unwrap();
        let c = counter.clone();
        let paid: u64 = once
            .run("payments", "ten", &input, |_ctx| async move {
                Ok::<_, std::io::Error>(c.hit() as u64)
            })
            .await
            .unwrap();
        assert_eq!(paid, 1, "{text}");
    }
    assert_eq!(counter.get(), 1);
}

/// Renewals fail past the lease (a store outage), a redelivery takes the
/// claim over and runs: the first execution's caller never gets `Ok`. It
/// gets `Fenced`, carrying its output to compensate; its work is told
/// (`ctx.fenced()`) once a renewal is refused; the second gets `Ok`.
#[tokio::test(start_paused = true)]
async fn a_run_taken_over_while_it_works_is_fenced_never_ok() {
    let store = FaultyStore::new(MemoryStore::default());
    let once = AtMostOnce::new(store.clone()).with_lease(Duration::from_secs(3));
    let counter = Counter::default();
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    store.set_fault(Op::Renew, Some(Fault::Unavailable));
    let first = {
        let (once, counter, gate) = (once.clone(), counter.clone(), gate.clone());
        tokio::spawn(async move {
            once.run(
                "pay",
                "charge-1",
                &json!({"amount": 10}),
                |ctx| async move {
                    let n = counter.hit() as u64;
                    gate.notified().await;
                    // The work learns it lost its claim before its side effect.
                    tokio::time::timeout(Duration::from_secs(5), ctx.fenced())
                        .await
                        .expect("the work is told its claim was lost");
                    assert!(ctx.is_fenced());
                    Ok::<_, std::io::Error>(n)
                },
            )
            .await
        })
    };
    common::until_count(&counter, 1).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let second: u64 = once
        .run(
            "pay",
            "charge-1",
            &json!({"amount": 10}),
            |ctx| async move {
                assert!(ctx.took_over());
                Ok::<_, std::io::Error>(counter.hit() as u64)
            },
        )
        .await
        .unwrap();
    assert_eq!(second, 2);
    // The first one's next renewal is refused for its token.
    store.set_fault(Op::Renew, None);
    gate.notify_one();
    match first.await.unwrap() {
        Err(OnceError::Fenced(fenced)) => {
            assert!(fenced.taken_over());
            assert_eq!(fenced.output::<u64>().unwrap(), 1, "its own output");
        }
        other => panic!("the fenced run must not be Ok: {other:?}"),
    }
    let replayed: u64 = once
        .run("pay", "charge-1", &json!({"amount": 10}), |_| async {
            Ok::<_, std::io::Error>(0)
        })
        .await
        .unwrap();
    assert_eq!(replayed, 2, "duplicates get the recorded run's output");
}

/// Work that blocks its thread (a synchronous client, `std::thread::sleep`)
/// for three leases on a multi-thread runtime: the lease is renewed from a
/// task of its own, so a duplicate meanwhile is told in flight and the work
/// runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_that_blocks_its_thread_keeps_its_claim() {
    let once = AtMostOnce::new(MemoryStore::default()).with_lease(Duration::from_millis(600));
    let counter = Counter::default();
    let first = {
        let (once, counter) = (once.clone(), counter.clone());
        tokio::spawn(async move {
            once.run("jobs", "blocking", &json!({}), |_| async move {
                counter.hit();
                std::thread::sleep(Duration::from_millis(1800));
                Ok::<_, std::io::Error>(1u8)
            })
            .await
        })
    };
    common::until_count(&counter, 1).await;
    let mut in_flight = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let c = counter.clone();
        match once
            .run("jobs", "blocking", &json!({}), |_| async move {
                c.hit();
                Ok::<_, std::io::Error>(2u8)
            })
            .await
        {
            Err(OnceError::InFlight { .. }) => in_flight += 1,
            Ok(output) => assert_eq!(output, 1, "a replay of the first run"),
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert!(in_flight > 0, "duplicates during the work were in flight");
    assert_eq!(counter.get(), 1, "the work ran once");
}

/// A process that must not exit before its record lands (a CLI agent)
/// drains: with the store refusing completions, `drain` says the record
/// did not land; once the store takes it, `drain` says every record landed.
#[tokio::test(start_paused = true)]
async fn drain_waits_until_the_record_has_landed_or_says_it_has_not() {
    let store = FaultyStore::new(MemoryStore::default());
    let once = AtMostOnce::new(store.clone());
    store.set_fault(Op::Complete, Some(Fault::Unavailable));
    let booked: u8 = once
        .run("s", "k", &json!({}), |_| async {
            Ok::<_, std::io::Error>(7)
        })
        .await
        .unwrap();
    assert_eq!(booked, 7);
    let drained = once.drain(Duration::from_secs(2)).await;
    assert!(!drained.is_complete());
    assert_eq!(drained.abandoned_completions, 1);
    store.set_fault(Op::Complete, None);
    let drained = once.drain(Duration::from_secs(30)).await;
    assert!(drained.is_complete(), "{drained}");
    let replayed: u8 = once
        .run("s", "k", &json!({}), |_| async {
            Ok::<_, std::io::Error>(0)
        })
        .await
        .unwrap();
    assert_eq!(replayed, 7);
}

/// Under `Lapse::Settle`, a lapsed claim is never run again: the duplicate
/// that finds it, and every later one, gets `OutcomeUnknown`.
#[tokio::test(start_paused = true)]
async fn under_settle_a_lapsed_claim_is_outcome_unknown_and_never_runs_again() {
    let once = AtMostOnce::new(MemoryStore::default())
        .with_lease(Duration::from_secs(3))
        .with_lapse(tower_idempotency::Lapse::Settle);
    let input = json!({"x": 1});
    let abandoned = once.run("s", "k", &input, |_| async {
        std::future::pending::<()>().await;
        Ok::<u8, std::io::Error>(0)
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(10), abandoned)
            .await
            .is_err()
    );
    tokio::time::advance(Duration::from_secs(4)).await;
    let counter = Counter::default();
    for _ in 0..2 {
        let c = counter.clone();
        let err = once
            .run("s", "k", &json!({"x": 1}), |_| async move {
                c.hit();
                Ok::<u8, std::io::Error>(1)
            })
            .await
            .unwrap_err();
        assert!(matches!(err, OnceError::OutcomeUnknown), "{err}");
    }
    assert_eq!(counter.get(), 0, "nothing ran again");
}
