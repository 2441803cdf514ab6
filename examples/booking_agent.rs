//! A command-line agent that books against the demo server, one intent, one
//! booking, however many attempts it takes.
//!
//! ```text
//! cargo run --example booking_agent -- --server http://127.0.0.1:3000 --token alice \
//!   --caller ada --slot 2026-12-01T09:00 --provider dr-who \
//!   [--session S] [--delay-ms N] [--timeout-ms 10000] [--attempts 6] [--deadline-ms 60000]
//! ```
//!
//! - The key is derived from caller, slot, provider and session (default
//!   `default`) with [`IntentKey::derive`], so running the same command
//!   twice is one intent: the second run gets the first booking, replayed.
//! - `--token` (optional) is sent as `Authorization: Bearer TOKEN`;
//!   `--delay-ms` goes into the booking as `delay_ms` (how long the demo's
//!   backend takes to commit); `--timeout-ms` is the per-attempt timeout
//!   (default 10 000); `--attempts` the most attempts; `--deadline-ms` how
//!   long all attempts and waits may take together, the body of the
//!   answer included (default 60 000).
//! - One line per attempt on stderr (attempt number, outcome, wait); the
//!   final booking JSON as the last line of stdout.
//! - Exit codes, for a wrapping agent to read:
//!   - 0: booked (executed or replayed), the booking JSON last on stdout;
//!   - 1: refused for good, nothing was done (a final 4xx: key reused, bad
//!     request, unauthorised);
//!   - 2: not booked, and no attempt can have reached the server's handler
//!     (nothing listening, or every answer said nothing ran, until attempts
//!     or the deadline ran out);
//!   - 3: outcome unknown: an attempt may have reached the handler and no
//!     final answer came (timed out after sending, `outcome-unknown`, a
//!     stalled or cut body, still in flight at the deadline, a 5xx, a
//!     redirect, a success without a booking in its body); the last stderr
//!     line says to run the same command again to find out;
//!   - 64: bad arguments; `--help` prints the usage and exits 0.
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
use tower_idempotency::client::{AttemptOutcome, Ending, IntentKey, RetryLayer, RetryReport};

const USAGE: &str = "usage: booking_agent --server URL [--token TOKEN] --caller NAME --slot SLOT \
--provider NAME [--session S] [--delay-ms N] [--timeout-ms 10000] [--attempts 6] [--deadline-ms 60000]";

/// Exit codes.
const REFUSED: u8 = 1;
const NOT_BOOKED: u8 = 2;
const UNKNOWN: u8 = 3;
const BAD_ARGUMENTS: u8 = 64;

/// The last line for an outcome a wrapping agent must not guess at.
const RUN_AGAIN: &str = "outcome unknown: an attempt may have reached the server and no final answer came; run the same command again to find out (it carries the same key, so it cannot book twice)";

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
    deadline_ms: u64,
}

/// Why the command line was not run.
enum ArgsError {
    Help,
    Bad(String),
}

impl From<String> for ArgsError {
    fn from(why: String) -> Self {
        ArgsError::Bad(why)
    }
}

fn parse_args(mut args: impl Iterator<Item = std::ffi::OsString>) -> Result<Args, ArgsError> {
    let (mut server, mut token, mut caller, mut slot, mut provider) =
        (None, None, None, None, None);
    let (mut session, mut delay_ms, mut timeout_ms, mut attempts, mut deadline_ms) =
        (None, None, None, None, None);
    let text = |raw: std::ffi::OsString| {
        raw.into_string()
            .map_err(|raw| format!("an argument that is not UTF-8: {raw:?}"))
    };
    while let Some(flag) = args.next() {
        let flag = text(flag)?;
        let mut value = || -> Result<String, String> {
            text(args.next().ok_or_else(|| format!("{flag} needs a value"))?)
        };
        // Plain digits: `+5`, `-1` and `5ms` are refused.
        let number = |name: &str, text: String| -> Result<u64, String> {
            text.parse()
                .ok()
                .filter(|_| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("{name} takes a whole number, got {text:?}"))
        };
        match flag.as_str() {
            "--server" => once(&mut server, value()?, "--server")?,
            "--token" => once(&mut token, value()?, "--token")?,
            "--caller" => once(&mut caller, value()?, "--caller")?,
            "--slot" => once(&mut slot, value()?, "--slot")?,
            "--provider" => once(&mut provider, value()?, "--provider")?,
            "--session" => once(&mut session, value()?, "--session")?,
            "--delay-ms" => once(&mut delay_ms, number("--delay-ms", value()?)?, "--delay-ms")?,
            "--timeout-ms" => once(
                &mut timeout_ms,
                number("--timeout-ms", value()?)?,
                "--timeout-ms",
            )?,
            "--deadline-ms" => once(
                &mut deadline_ms,
                number("--deadline-ms", value()?)?,
                "--deadline-ms",
            )?,
            "--attempts" => {
                let n = number("--attempts", value()?)?;
                let n = u32::try_from(n)
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| format!("--attempts takes 1 or more, got {n}"))?;
                once(&mut attempts, n, "--attempts")?;
            }
            "-h" | "--help" => return Err(ArgsError::Help),
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let session = session.unwrap_or_else(|| "default".to_owned());
    let delay_ms = delay_ms.unwrap_or(0);
    let timeout_ms = timeout_ms.unwrap_or(10_000);
    let attempts = attempts.unwrap_or(6);
    let deadline_ms = deadline_ms.unwrap_or(60_000);
    let required = |value: Option<String>, flag: &str| {
        value
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("{flag} is required"))
    };
    let server = required(server, "--server")?;
    check_server(&server)?;
    if timeout_ms == 0 {
        return Err("--timeout-ms takes 1 or more".to_owned().into());
    }
    if deadline_ms == 0 {
        return Err("--deadline-ms takes 1 or more".to_owned().into());
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
        deadline_ms,
    })
}

/// Sets a flag's value, once.
fn once<T>(slot: &mut Option<T>, found: T, name: &str) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("{name} given twice"));
    }
    *slot = Some(found);
    Ok(())
}

/// `--server` is `http://HOST[:PORT]`, with a port that exists, and
/// nothing after the authority but an optional `/`.
fn check_server(server: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "--server must be an http://HOST[:PORT] URL ({why}), got {server:?}"
        ))
    };
    let Some(rest) = server.strip_prefix("http://") else {
        return bad("http:// only");
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return bad("a host, no path");
    }
    let Ok(parsed) = authority.parse::<http::uri::Authority>() else {
        return bad("not a host");
    };
    if parsed.host().is_empty() {
        return bad("no host");
    }
    if parsed.as_str().contains(':')
        && !parsed.host().starts_with('[')
        && parsed.port_u16().is_none()
    {
        return bad("a port from 1 to 65535");
    }
    if parsed.port_u16() == Some(0) {
        return bad("a port from 1 to 65535");
    }
    Ok(())
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
        .with_deadline(Duration::from_millis(args.deadline_ms))
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

    // The whole exchange, the answer's body included, within the deadline.
    let deadline = Duration::from_millis(args.deadline_ms);
    let exchange = async {
        let response = client.oneshot(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes());
        Ok::<_, tower_idempotency::client::RetryError>((parts, body))
    };
    let (parts, body) = match tokio::time::timeout(deadline, exchange).await {
        Err(_) => {
            eprintln!("the answer did not arrive within --deadline-ms");
            eprintln!("{RUN_AGAIN}");
            return Ok(ExitCode::from(UNKNOWN));
        }
        Ok(Err(err)) => {
            eprintln!("gave up: {err}");
            return Ok(match err.ending() {
                Ending::NothingRan => {
                    eprintln!("not booked: nothing reached the server's handler");
                    ExitCode::from(NOT_BOOKED)
                }
                _ => {
                    eprintln!("{RUN_AGAIN}");
                    ExitCode::from(UNKNOWN)
                }
            });
        }
        Ok(Ok(answer)) => answer,
    };
    let status = parts.status;
    let report = parts.extensions.get::<RetryReport>().cloned();
    let ending = report.as_ref().map_or(Ending::Done, |r| r.ending);
    let body = match body {
        Ok(body) => body,
        Err(err) => {
            // The answer started but broke off: whatever it said is lost.
            eprintln!("the answer's body broke off: {err}");
            eprintln!("{RUN_AGAIN}");
            return Ok(ExitCode::from(UNKNOWN));
        }
    };
    let text = String::from_utf8_lossy(&body);
    let shown = if text.trim().is_empty() {
        "(an empty body)".to_owned()
    } else {
        text.trim_end().to_owned()
    };
    if ending == Ending::Done && status.is_success() {
        // Booked only with a booking to show: a 2xx without one says
        // nothing of what the server did.
        let booking = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .filter(serde_json::Value::is_object);
        let Some(booking) = booking else {
            eprintln!(
                "the server answered {} without a booking (no JSON object in its body): whether it booked is unknown",
                status.as_u16()
            );
            eprintln!("{RUN_AGAIN}");
            return Ok(ExitCode::from(UNKNOWN));
        };
        let replayed = report.as_ref().is_some_and(|r| r.replayed);
        eprintln!(
            "booked{}",
            if replayed {
                " (replayed: the server had it already)"
            } else {
                ""
            }
        );
        println!("{booking}");
        return Ok(ExitCode::SUCCESS);
    }
    match ending {
        Ending::NothingRan => {
            let stopped_early = report.as_ref().is_some_and(|r| r.attempts < args.attempts);
            let waited = if stopped_early && parts.headers.contains_key(header::RETRY_AFTER) {
                "the server asked to wait past the deadline; its last answer was"
            } else if stopped_early {
                "retries stopped early (the client's retry budget, shared by its requests, or the deadline ran out); the last answer was"
            } else {
                "every try was answered"
            };
            eprintln!(
                "not booked: {waited} {} {shown}, which says nothing ran",
                status.as_u16()
            );
            Ok(ExitCode::from(NOT_BOOKED))
        }
        Ending::OutcomeUnknown => {
            eprintln!("last answer: {} {shown}", status.as_u16());
            eprintln!("{RUN_AGAIN}");
            Ok(ExitCode::from(UNKNOWN))
        }
        _ if status.is_redirection() => {
            eprintln!(
                "the server answered {} (a redirect this agent does not follow): whether it booked is unknown",
                status.as_u16()
            );
            eprintln!("{RUN_AGAIN}");
            Ok(ExitCode::from(UNKNOWN))
        }
        _ if status.is_server_error() => {
            eprintln!(
                "the server failed: {} {shown}; the booking may or may not have been made",
                status.as_u16()
            );
            eprintln!("{RUN_AGAIN}");
            Ok(ExitCode::from(UNKNOWN))
        }
        _ => {
            if status == StatusCode::UNAUTHORIZED {
                eprintln!("refused: {} (pass --token)", status.as_u16());
            } else if text.contains("key-reused") {
                eprintln!(
                    "refused: {} {shown}: this intent's key was used before with another request (another --server, --delay-ms or body); what that request did stands, and nothing was done now",
                    status.as_u16()
                );
            } else {
                eprintln!("refused: {} {shown}", status.as_u16());
            }
            Ok(ExitCode::from(REFUSED))
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(ArgsError::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(ArgsError::Bad(why)) => {
            eprintln!("booking_agent: {why}");
            eprintln!("{USAGE}");
            return ExitCode::from(BAD_ARGUMENTS);
        }
    };
    match run(args).await {
        Ok(code) => code,
        Err(err) => {
            // Only before anything was sent (the key or the request could
            // not be made).
            eprintln!("booking_agent: {err}");
            ExitCode::from(NOT_BOOKED)
        }
    }
}
