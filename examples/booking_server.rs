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
//! `IDEMPOTENCY_LEASE_SECS`, and `IDEMPOTENCY_STORE`: unset or `memory` for
//! the in-memory store, a `redis://` URL (build with `--features redis`) or a
//! `postgres://` URL (build with `--features postgres`) for a store that
//! several instances of the server can share.

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
    serve::ListenerExt,
};
use serde::{Deserialize, Serialize};
use tower_idempotency::{BoxStore, IdempotencyLayer, MemoryStore};

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
/// `Authorization` (the default).
pub(crate) fn idempotency(
    store: BoxStore,
    ttl: Option<Duration>,
    lease: Option<Duration>,
) -> IdempotencyLayer<BoxStore> {
    let mut layer = IdempotencyLayer::new(store).with_required_key(true);
    if let Some(ttl) = ttl {
        layer = layer.with_ttl(ttl);
    }
    if let Some(lease) = lease {
        layer = layer.with_lease(lease);
    }
    layer
}

/// The booking API, with the layer on the POST route.
pub(crate) fn app(layer: IdempotencyLayer<BoxStore>) -> Router {
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

/// The store named by `IDEMPOTENCY_STORE`, and a name for it.
pub(crate) async fn store_from_env() -> Result<(BoxStore, &'static str), String> {
    let spec = std::env::var("IDEMPOTENCY_STORE").unwrap_or_default();
    if spec.is_empty() || spec == "memory" {
        return Ok((BoxStore::new(MemoryStore::default()), "memory"));
    }
    if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        #[cfg(feature = "redis")]
        {
            let store = tower_idempotency::store::RedisStore::connect(&spec)
                .await
                .map_err(|e| format!("IDEMPOTENCY_STORE: cannot connect to Redis: {e}"))?;
            return Ok((BoxStore::new(store), "redis"));
        }
        #[cfg(not(feature = "redis"))]
        return Err("IDEMPOTENCY_STORE is a Redis URL: build with `--features redis`".into());
    }
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        {
            let pool = sqlx::PgPool::connect(&spec)
                .await
                .map_err(|e| format!("IDEMPOTENCY_STORE: cannot connect to PostgreSQL: {e}"))?;
            let store = tower_idempotency::store::PostgresStore::new(pool);
            store
                .migrate()
                .await
                .map_err(|e| format!("IDEMPOTENCY_STORE: cannot create the table: {e}"))?;
            return Ok((BoxStore::new(store), "postgres"));
        }
        #[cfg(not(feature = "postgres"))]
        return Err(
            "IDEMPOTENCY_STORE is a PostgreSQL URL: build with `--features postgres`".into(),
        );
    }
    Err(format!(
        "IDEMPOTENCY_STORE must be `memory`, a redis:// URL or a postgres:// URL, got {spec:?}"
    ))
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
    let (store, store_name) = store_from_env().await?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    // With a remote store the response head goes out before the record is
    // written and the body after it: without TCP_NODELAY, Nagle's algorithm
    // and the client's delayed ACK hold the body back by up to 40 ms.
    let listener = listener.tap_io(|stream| {
        if let Err(err) = stream.set_nodelay(true) {
            eprintln!("booking_server: cannot set TCP_NODELAY: {err}");
        }
    });
    println!("listening on http://{bound}");
    eprintln!("idempotency store: {store_name}");
    axum::serve(listener, app(idempotency(store, ttl, lease)))
        .await
        .map_err(|e| format!("server failed: {e}"))
}
