//! A small booking API protected by the idempotency layer.
//!
//! ```text
//! cargo run --example booking_server            # listens on 127.0.0.1:3000
//! cargo run --example booking_server 127.0.0.1:4000
//!
//! curl -i http://127.0.0.1:3000/appointments \
//!   -H 'Idempotency-Key: 8e0f6c1a' -H 'Content-Type: application/json' \
//!   -d '{"caller":"ada","slot":"2026-12-01T09:00","provider":"dr-who","delay_ms":2000}'
//! curl http://127.0.0.1:3000/appointments      # every booking ever stored
//! ```
//!
//! Send the POST twice with the same key: one booking, and the second answer
//! is the first one replayed (`Idempotent-Replayed: true`). Interrupt the
//! first curl during its delay and retry: still one booking.
//!
//! Environment: `ADDR` (when no argument is given), `IDEMPOTENCY_TTL_SECS`,
//! `IDEMPOTENCY_LEASE_SECS`.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::post,
};
use serde::{Deserialize, Serialize};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// What a client asks for.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAppointment {
    caller: String,
    slot: String,
    provider: String,
    /// How long the "practice-management system" takes to commit.
    #[serde(default)]
    delay_ms: u64,
}

/// A stored booking.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Appointment {
    id: u64,
    caller: String,
    slot: String,
    provider: String,
}

#[derive(Clone, Default)]
struct Bookings(Arc<Mutex<Vec<Appointment>>>);

async fn create(
    State(bookings): State<Bookings>,
    Json(new): Json<NewAppointment>,
) -> impl IntoResponse {
    tokio::time::sleep(Duration::from_millis(new.delay_ms)).await;
    let appointment = {
        let mut rows = bookings.0.lock().unwrap_or_else(|e| e.into_inner());
        let appointment = Appointment {
            id: rows.len() as u64 + 1,
            caller: new.caller,
            slot: new.slot,
            provider: new.provider,
        };
        rows.push(appointment.clone());
        appointment
    };
    (
        StatusCode::CREATED,
        [(
            header::LOCATION,
            format!("/appointments/{}", appointment.id),
        )],
        Json(appointment),
    )
}

async fn list(State(bookings): State<Bookings>) -> Json<Vec<Appointment>> {
    Json(bookings.0.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// The layer as the demo configures it: keys required, scope from
/// `Authorization` (the default), in-memory store.
pub(crate) fn idempotency(
    ttl: Option<Duration>,
    lease: Option<Duration>,
) -> IdempotencyLayer<MemoryStore> {
    let mut layer = IdempotencyLayer::new(MemoryStore::default()).with_required_key(true);
    if let Some(ttl) = ttl {
        layer = layer.with_ttl(ttl);
    }
    if let Some(lease) = lease {
        layer = layer.with_lease(lease);
    }
    layer
}

/// The booking API, with the layer on the POST route.
pub(crate) fn app(layer: IdempotencyLayer<MemoryStore>) -> Router {
    Router::new()
        .route("/appointments", post(create).layer(layer).get(list))
        .with_state(Bookings::default())
}

/// Reads a whole number of seconds from `var`, if set.
fn seconds_from_env(var: &str) -> Result<Option<Duration>, String> {
    match std::env::var(var) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{var} is not valid UTF-8")),
        Ok(value) => match value.trim().parse::<u64>() {
            Ok(0) => Err(format!("{var} must be at least 1 second, got 0")),
            Ok(secs) => Ok(Some(Duration::from_secs(secs))),
            Err(_) => Err(format!(
                "{var} must be a whole number of seconds, got {value:?}"
            )),
        },
    }
}

fn bind_address() -> Result<SocketAddr, String> {
    let (source, raw) = match std::env::args().nth(1) {
        Some(arg) => ("the first argument", arg),
        None => match std::env::var("ADDR") {
            Ok(addr) => ("ADDR", addr),
            Err(_) => ("the default", "127.0.0.1:3000".to_owned()),
        },
    };
    raw.parse()
        .map_err(|_| format!("{source} {raw:?} is not an address like 127.0.0.1:3000"))
}

#[tokio::main]
async fn main() {
    if let Err(message) = run().await {
        eprintln!("booking_server: {message}");
        std::process::exit(2);
    }
}

async fn run() -> Result<(), String> {
    let addr = bind_address()?;
    let ttl = seconds_from_env("IDEMPOTENCY_TTL_SECS")?;
    let lease = seconds_from_env("IDEMPOTENCY_LEASE_SECS")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on http://{bound}");
    axum::serve(listener, app(idempotency(ttl, lease)))
        .await
        .map_err(|e| format!("server failed: {e}"))
}
