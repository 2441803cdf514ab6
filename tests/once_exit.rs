//! `AtMostOnce` in a process that exits: a CLI agent or a serverless
//! function whose completion the store refused. Each run is a real child
//! process (this test binary, run again for one test) against a real
//! Redis; exiting without `drain` loses the record and the next start runs
//! the work again, exiting after `drain` does not.
//!
//! Needs `REDIS_URL` (for example `redis://127.0.0.1:6379`); without it the
//! test says it skipped.

use std::{process::Command, time::Duration};

use serde_json::json;
use tower_idempotency::{
    once::AtMostOnce,
    store::{Fault, FaultyStore, Op, RedisStore},
};

const MODE: &str = "ONCE_EXIT_CHILD";

/// The child's part: runs the booking once through `AtMostOnce` (the store
/// refusing completions when `ONCE_EXIT_REFUSE` is set, until the drain
/// when the mode is `drain`), prints its output, then exits at once or
/// after draining. Does nothing in an ordinary test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child() {
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    let url = std::env::var("REDIS_URL").unwrap();
    let prefix = std::env::var("ONCE_EXIT_PREFIX").unwrap();
    let store = FaultyStore::new(
        RedisStore::connect(&url)
            .await
            .unwrap()
            .with_prefix(&prefix),
    );
    let refuse = std::env::var("ONCE_EXIT_REFUSE").is_ok();
    if refuse {
        store.set_fault(Op::Complete, Some(Fault::Unavailable));
    }
    let once = AtMostOnce::new(store.clone())
        .with_lease(Duration::from_millis(400))
        .with_wait(Duration::from_secs(10));
    let counter = format!("{prefix}runs");
    let booked: u64 = once
        .run(
            "agent",
            "book-slot-9",
            &json!({"slot": 9}),
            |_| async move {
                let client = redis::Client::open(url).unwrap();
                let mut connection = client.get_multiplexed_async_connection().await.unwrap();
                let runs: u64 = redis::cmd("INCR")
                    .arg(&counter)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                Ok::<_, std::io::Error>(runs)
            },
        )
        .await
        .unwrap();
    println!("output: {booked}");
    if mode == "drain" {
        if refuse {
            // The store comes back while the process drains.
            let store = store.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                store.clear_faults();
            });
        }
        let drained = once.drain(Duration::from_secs(20)).await;
        println!("drained: {}", drained.is_complete());
    }
    // Exits here, whatever is still running in the background.
    std::process::exit(0);
}

/// Runs the child once; its output, and whether its drain was complete.
fn run_child(mode: &str, prefix: &str, refuse: bool) -> (u64, Option<bool>) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "child", "--nocapture", "--test-threads", "1"])
        .env(MODE, mode)
        .env("ONCE_EXIT_PREFIX", prefix);
    if refuse {
        command.env("ONCE_EXIT_REFUSE", "1");
    } else {
        command.env_remove("ONCE_EXIT_REFUSE");
    }
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child {mode}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.split_once(name).map(|(_, v)| v.trim().to_owned()))
    };
    let output = field("output: ")
        .unwrap_or_else(|| panic!("no output line: {stdout}"))
        .parse()
        .unwrap();
    let drained = field("drained: ").map(|d| d == "true");
    (output, drained)
}

fn prefix(test: &str) -> String {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("tower-idempotency-test:{test}:{nonce}:")
}

#[test]
fn a_process_that_drains_before_it_exits_keeps_its_record() {
    if std::env::var(MODE).is_ok() {
        return;
    }
    if std::env::var("REDIS_URL").is_err() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipped: REDIS_URL is not set (for example redis://127.0.0.1:6379)"
        );
        return;
    }
    // Exits straight after `run`: the record never landed, and the next
    // start (once the lease lapsed) books again.
    let lost = prefix("exit-lost");
    assert_eq!(run_child("exit", &lost, true), (1, None));
    assert_eq!(
        run_child("drain", &lost, false),
        (2, Some(true)),
        "without a drain, the work ran twice"
    );

    // Drains first: the record lands before the process exits, and the
    // next start gets the first output without booking.
    let kept = prefix("exit-kept");
    assert_eq!(run_child("drain", &kept, true), (1, Some(true)));
    assert_eq!(
        run_child("drain", &kept, false),
        (1, Some(true)),
        "the next start replays the booking"
    );
}
