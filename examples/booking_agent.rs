//! A command-line agent that books against the demo server, one intent, one
//! booking, however many attempts it takes.
//!
//! ```text
//! cargo run --example booking_agent -- --server http://127.0.0.1:3000 --token alice \
//!   --caller ada --slot 2026-12-01T09:00 --provider dr-who \
//!   [--session S] [--delay-ms N] [--timeout-ms 3000] [--attempts 6]
//! ```
//!
//! - The key is derived from caller, slot, provider and session (default
//!   `default`) with [`IntentKey::derive`], so running the same command
//!   twice is one intent: the second run gets the first booking, replayed.
//! - `--token` (optional) is sent as `Authorization: Bearer TOKEN`;
//!   `--delay-ms` goes into the booking as `delay_ms` (how long the demo's
//!   backend takes to commit); `--timeout-ms` is the per-attempt timeout;
//!   `--attempts` the most attempts. All attempts together stop after 60 s.
//! - One line per attempt on stderr (attempt number, outcome, wait); the
//!   final booking JSON as the last line of stdout.
//! - Exit 0 when booked (executed or replayed), 1 when the server refused
//!   for good (an answer it does not retry, such as 400 or 422), 2 when
//!   attempts or the deadline ran out. 64 for bad arguments.
//!
//! With `--delay-ms 4200 --timeout-ms 3000` against the demo server it plays
//! the seed incident: the first attempt gives up at 3 s while the booking
//! commits at 4.2 s, the retry carries the same key, and there is exactly
//! one booking.

use std::{process::ExitCode, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Layer, ServiceExt};
use tower_idempotency::client::{AttemptOutcome, IntentKey, RetryLayer, RetryReport};

const USAGE: &str = "usage: booking_agent --server URL [--token TOKEN] --caller NAME --slot SLOT \
--provider NAME [--session S] [--delay-ms N] [--timeout-ms 3000] [--attempts 6]";

/// The command line, checked.
struct Args {
    server: String,
    token: Option<String>,
    caller: String,
    slot: String,
    provider: String,
    session: String,
    delay_ms: u64,
    timeout_ms: u64,
    attempts: u32,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut server, mut token, mut caller, mut slot, mut provider) =
        (None, None, None, None, None);
    let (mut session, mut delay_ms, mut timeout_ms, mut attempts) =
        ("default".to_owned(), 0u64, 3000u64, 6u32);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |name: &str, text: String| -> Result<u64, String> {
            text.parse()
                .map_err(|_| format!("{name} takes a whole number, got {text:?}"))
        };
        match flag.as_str() {
            "--server" => server = Some(value()?),
            "--token" => token = Some(value()?),
            "--caller" => caller = Some(value()?),
            "--slot" => slot = Some(value()?),
            "--provider" => provider = Some(value()?),
            "--session" => session = value()?,
            "--delay-ms" => delay_ms = number("--delay-ms", value()?)?,
            "--timeout-ms" => timeout_ms = number("--timeout-ms", value()?)?,
            "--attempts" => {
                let n = number("--attempts", value()?)?;
                attempts = u32::try_from(n)
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| format!("--attempts takes 1 or more, got {n}"))?;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let required = |value: Option<String>, flag: &str| {
        value
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("{flag} is required"))
    };
    let server = required(server, "--server")?;
    if !server.starts_with("http://") {
        return Err(format!("--server must be an http:// URL, got {server:?}"));
    }
    if timeout_ms == 0 {
        return Err("--timeout-ms takes 1 or more".to_owned());
    }
    Ok(Args {
        server: server.trim_end_matches('/').to_owned(),
        token,
        caller: required(caller, "--caller")?,
        slot: required(slot, "--slot")?,
        provider: required(provider, "--provider")?,
        session,
        delay_ms,
        timeout_ms,
        attempts,
    })
}

fn describe(outcome: &AttemptOutcome) -> String {
    match outcome {
        AttemptOutcome::Status { status, replayed } => {
            let reason = status.canonical_reason().unwrap_or("");
            let replayed = if *replayed { ", replayed" } else { "" };
            format!("{} {reason}{replayed}", status.as_u16())
        }
        other => other.to_string(),
    }
}

async fn run(args: Args) -> Result<ExitCode, String> {
    let identity = serde_json::json!({
        "caller": args.caller,
        "slot": args.slot,
        "provider": args.provider,
        "session": args.session,
    });
    let key = IntentKey::derive("book", &identity).map_err(|e| e.to_string())?;
    eprintln!("intent key {key}");
    let body = serde_json::json!({
        "caller": args.caller,
        "slot": args.slot,
        "provider": args.provider,
        "delay_ms": args.delay_ms,
    });
    let mut request = Request::post(format!("{}/appointments", args.server))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = &args.token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let mut request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    request.extensions_mut().insert(key);

    let client = RetryLayer::new()
        .with_attempts(args.attempts)
        .with_attempt_timeout(Duration::from_millis(args.timeout_ms))
        .with_deadline(Duration::from_secs(60))
        .on_attempt(|event| match event.wait {
            Some(wait) => eprintln!(
                "attempt {}: {}; retrying in {} ms",
                event.attempt,
                describe(&event.outcome),
                wait.as_millis()
            ),
            None => eprintln!("attempt {}: {}", event.attempt, describe(&event.outcome)),
        })
        .layer(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());

    let response = match client.oneshot(request).await {
        Ok(response) => response,
        Err(err) => {
            eprintln!("gave up: {err}");
            return Ok(ExitCode::from(2));
        }
    };
    let status = response.status();
    let report = response.extensions().get::<RetryReport>().cloned();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| format!("the answer's body broke off: {e}"))?;
    let text = String::from_utf8_lossy(&body);
    if status.is_success() {
        let replayed = report.as_ref().is_some_and(|r| r.replayed);
        eprintln!(
            "booked{}",
            if replayed {
                " (replayed: the server had it already)"
            } else {
                ""
            }
        );
        println!("{}", text.trim_end());
        return Ok(ExitCode::SUCCESS);
    }
    if report.is_some_and(|r| r.exhausted) {
        eprintln!(
            "gave up: still {} after every attempt: {text}",
            status.as_u16()
        );
        return Ok(ExitCode::from(2));
    }
    if status == StatusCode::UNAUTHORIZED {
        eprintln!("refused: {} (pass --token)", status.as_u16());
    } else {
        eprintln!("refused: {} {text}", status.as_u16());
    }
    Ok(ExitCode::from(1))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(why) => {
            if !why.is_empty() {
                eprintln!("booking_agent: {why}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(64);
        }
    };
    match run(args).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("booking_agent: {err}");
            ExitCode::from(2)
        }
    }
}
