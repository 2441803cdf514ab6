//! The booking agent example against the demo server, as processes, the way
//! a new user runs them: the seed incident ends with one booking, a second
//! run of the same command replays it, and a refusal exits 1.
//!
//! Uses the example binaries that `cargo test --all-features` builds (built
//! here if missing).

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
};

use common::example;

struct Demo {
    child: Child,
    base: String,
}

impl Demo {
    fn start() -> Demo {
        let mut child = Command::new(example("booking_server"))
            .arg("127.0.0.1:0")
            .env_remove("IDEMPOTENCY_STORE")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the demo server starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap()
            .to_owned();
        Demo { child, base }
    }

    fn bookings(&self) -> serde_json::Value {
        let output = Command::new("curl")
            .args(["-sS", &format!("{}/appointments", self.base)])
            .output()
            .expect("curl runs");
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent(demo: &Demo, extra: &[&str]) -> (i32, String, String) {
    agent_at(&demo.base, extra)
}

/// The agent against `server`, booking ada at dr-who, with `extra` flags.
fn agent_at(server: &str, extra: &[&str]) -> (i32, String, String) {
    let output = Command::new(example("booking_agent"))
        .args([
            "--server",
            server,
            "--caller",
            "ada",
            "--slot",
            "2026-12-01T09:00",
        ])
        .args(["--provider", "dr-who"])
        .args(extra)
        .output()
        .expect("the agent runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// The seed incident's flags: the client gives up at 3 s, the booking
/// commits at 4.2 s.
const SEED_INCIDENT: &[&str] = &[
    "--token",
    "alice",
    "--delay-ms",
    "4200",
    "--timeout-ms",
    "3000",
];

#[test]
fn the_seed_incident_ends_with_one_booking() {
    let demo = Demo::start();
    let (code, stdout, stderr) = agent(&demo, SEED_INCIDENT);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("attempt 1: timed out"), "{stderr}");
    let booking: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(booking["provider"], "dr-who");
    assert_eq!(
        demo.bookings().as_array().unwrap().len(),
        1,
        "exactly one booking"
    );

    // The same command again is the same intent: replayed, still one.
    let (code, again, stderr) = agent(&demo, SEED_INCIDENT);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("attempt 1: 201 Created, replayed"),
        "{stderr}"
    );
    assert_eq!(again.lines().last(), stdout.lines().last());
    // Another session is another intent.
    let (code, _, _) = agent(&demo, &["--token", "alice", "--session", "call-2"]);
    assert_eq!(code, 0);
    assert_eq!(demo.bookings().as_array().unwrap().len(), 2);
    // The same intent with another body is refused for good, not retried.
    let (code, _, stderr) = agent(&demo, &["--token", "alice"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("key-reused"), "{stderr}");
}

#[test]
fn refusals_exit_1_and_bad_arguments_64() {
    let demo = Demo::start();
    let (code, stdout, stderr) = agent(&demo, &[]);
    assert_eq!(code, 1, "no token: 401, not retried: {stderr}");
    assert!(stdout.is_empty());
    assert_eq!(stderr.matches("attempt ").count(), 1, "{stderr}");
    let (code, _, stderr) = agent(&demo, &["--attempts", "0"]);
    assert_eq!(code, 64, "{stderr}");
    let (code, _, _) = agent(&demo, &["--what"]);
    assert_eq!(code, 64);
}

#[test]
fn a_server_that_is_not_there_exits_2_after_every_attempt() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = format!("http://127.0.0.1:{port}");
    let (code, _, stderr) = agent_at(&server, &["--token", "alice", "--attempts", "3"]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.matches("attempt ").count(), 3, "{stderr}");
}

/// The queue consumer as users copy it: a redelivery that takes over from
/// a consumer that booked and then stopped finds that booking instead of
/// booking again.
#[test]
fn a_redelivery_after_a_consumer_died_finds_its_booking() {
    let output = Command::new(example("redelivery_consumer"))
        .arg("--consumer-dies")
        .output()
        .expect("the consumer runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.lines().last(),
        Some("deliveries: 2, bookings: 1"),
        "{stdout}"
    );
}

/// Exit 3 when an attempt may have reached the server and no final answer
/// came; the last line says to run the same command again, and running it
/// again finds the one booking.
#[test]
fn an_unknown_outcome_exits_3_and_the_same_command_finds_out() {
    let demo = Demo::start();
    let flags = [
        "--token",
        "alice",
        "--delay-ms",
        "2500",
        "--timeout-ms",
        "300",
        "--deadline-ms",
        "1200",
    ];
    let (code, stdout, stderr) = agent(&demo, &flags);
    assert_eq!(code, 3, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .contains("run the same command again"),
        "{stderr}"
    );
    let (code, stdout, stderr) = agent(
        &demo,
        &[
            "--token",
            "alice",
            "--delay-ms",
            "2500",
            "--deadline-ms",
            "20000",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.lines().last().unwrap().contains("dr-who"));
    assert_eq!(demo.bookings().as_array().unwrap().len(), 1, "one booking");
}

#[test]
fn help_prints_every_flag_and_exits_0() {
    let output = Command::new(example("booking_agent"))
        .arg("--help")
        .output()
        .expect("the agent runs");
    assert_eq!(output.status.code(), Some(0));
    let usage = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "--server",
        "--token",
        "--caller",
        "--slot",
        "--provider",
        "--session",
        "--delay-ms",
        "--timeout-ms",
        "--attempts",
        "--deadline-ms",
    ] {
        assert!(usage.contains(flag), "{flag} in {usage}");
    }
}

/// A server that answers every request with `answer` (a whole HTTP/1.1
/// response), on a thread of its own.
fn scripted_server(answer: &'static str) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(answer.as_bytes());
            });
        }
    });
    base
}

/// Answers that say nothing of whether the booking was made exit 3, never
/// 0 or 1: a 5xx, a redirect, a success without a booking, a 503 without
/// a code (a proxy answers so after forwarding). A 503 whose code says
/// nothing ran exits 2.
#[test]
fn answers_that_do_not_say_what_happened_exit_3() {
    let quick = ["--attempts", "2", "--deadline-ms", "3000"];
    for (answer, why) in [
        (
            "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\nconnection: close\r\n\r\nboom",
            "a 500",
        ),
        (
            "HTTP/1.1 302 Found\r\nlocation: /elsewhere\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            "a redirect",
        ),
        (
            "HTTP/1.1 201 Created\r\ncontent-length: 15\r\nconnection: close\r\n\r\nhello, not json",
            "a 201 without a booking",
        ),
        (
            "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n",
            "a 204",
        ),
        (
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            "a 503 without a code",
        ),
    ] {
        let server = scripted_server(answer);
        let (code, stdout, stderr) = agent_at(&server, &quick);
        assert_eq!(code, 3, "{why}: {stderr}");
        assert!(stdout.is_empty(), "{why}: {stdout}");
        let last = stderr.trim_end().lines().last().unwrap_or_default();
        assert!(
            last.contains("run the same command again to find out"),
            "{why}: {stderr}"
        );
    }
    let server = scripted_server(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\ncontent-length: 51\r\nconnection: close\r\n\r\n{\"type\":\"x\",\"title\":\"t\",\"code\":\"store-unavailable\"}",
    );
    let (code, _, stderr) = agent_at(&server, &quick);
    assert_eq!(code, 2, "503 store-unavailable: {stderr}");
}

/// Bad arguments exit 64: a flag given twice, a number with a sign, a
/// `--server` that is no http://HOST[:PORT], an argument that is not UTF-8.
#[test]
fn odd_arguments_exit_64() {
    for extra in [
        &["--session", "a", "--session", "b"][..],
        &["--timeout-ms", "+5"],
        &["--deadline-ms", "-1"],
    ] {
        let (code, _, stderr) = agent_at("http://127.0.0.1:9", extra);
        assert_eq!(code, 64, "{extra:?}: {stderr}");
    }
    for server in [
        "http://",
        "http://a b",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:0",
        "https://127.0.0.1:3000",
        "http://127.0.0.1:3000/api",
    ] {
        let (code, _, stderr) = agent_at(server, &[]);
        assert_eq!(code, 64, "{server}: {stderr}");
        assert!(stderr.contains("--server"), "{server}: {stderr}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let output = Command::new(example("booking_agent"))
            .args([
                "--server",
                "http://127.0.0.1:9",
                "--slot",
                "x",
                "--provider",
                "p",
            ])
            .arg("--caller")
            .arg(std::ffi::OsStr::from_bytes(b"ad\xffa"))
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(64));
    }
}
