//! A small booking API protected by the idempotency layer.
//!
//! ```text
//! cargo run --example booking_server            # listens on 127.0.0.1:3000
//! cargo run --example booking_server 127.0.0.1:4000
//!
//! curl -i http://127.0.0.1:3000/appointments \
//!   -H 'Authorization: Bearer ada.v1' \
//!   -H 'Idempotency-Key: 8e0f6c1a' -H 'Content-Type: application/json' \
//!   -d '{"caller":"ada","slot":"2026-12-01T09:00","provider":"dr-who","delay_ms":2000}'
//! curl http://127.0.0.1:3000/appointments      # every booking ever stored
//! ```
//!
//! Send the POST twice with the same key: one booking, and the second answer
//! is the first one replayed (`Idempotent-Replayed: true`). Interrupt the
//! first curl during its delay and retry: still one booking. Retry with a
//! refreshed token of the same caller (`Bearer ada.v2`): still a replay.
//!
//! Authentication, as a real app does it: a middleware maps the bearer token
//! to a principal (the part before the first `.`, so `ada.v1` and `ada.v2`
//! are two tokens of `ada`) and puts it into the request extensions; a POST
//! without a bearer token gets 401. The idempotency layer sits inside that
//! middleware, so keys are scoped per principal. The list of bookings is
//! open, for inspecting the demo.
//!
//! The handler reads the [`IdempotencyContext`]: each booking row keeps the
//! key of the intent that made it, and the table holds one row per intent
//! (as a unique index would), so an execution that took over a stalled
//! earlier one finds that one's row instead of booking again.
//!
//! Shutdown: on Ctrl-C or SIGTERM the server stops accepting connections,
//! lets open ones finish, then drains the layer: a booking whose client went
//! away is still recorded before the process exits (for up to
//! `IDEMPOTENCY_DRAIN_SECS`, default 20), so a retry sent to another instance
//! replays it. It prints `drained: ...` and exits 0.
//!
//! `GET /metrics` serves the layer's metrics in the Prometheus text format
//! when the crate is built with `--features metrics`.
//!
//! Audit: with `IDEMPOTENCY_AUDIT=PATH` every decision is written to the
//! tamper-evident chain in the JSON Lines file `PATH` (instance
//! `IDEMPOTENCY_AUDIT_INSTANCE`, default `booking-server`), its checkpoints
//! signed with the Ed25519 key in `IDEMPOTENCY_AUDIT_SIGNING_KEY` (default
//! `PATH.key`), which is generated and saved there when the file does not
//! exist. The public key is printed at start (`audit public key: ...`) and
//! saved beside the signing key as `.pub`, for
//! `cargo run --example audit_verify -- PATH --public-key KEY.pub`. With
//! `IDEMPOTENCY_AUDIT_RECEIPTS=1` every audited response carries a signed
//! `Idempotency-Receipt` header, which `audit_verify --receipt FILE` checks
//! against the chain. With `IDEMPOTENCY_AUDIT_MAX_BYTES=N` the file is
//! closed once it holds N bytes, as `PATH.<last seq>`, and the chain goes on
//! in a new `PATH` (`audit_verify $(ls PATH.[0-9]*) PATH ...` checks them all).
//!
//! Logs: the layer's warnings go to stderr (`RUST_LOG=debug` for more).
//!
//! Environment: `ADDR` (when no argument is given), `IDEMPOTENCY_TTL_SECS`,
//! `IDEMPOTENCY_LEASE_SECS`, `IDEMPOTENCY_DRAIN_SECS`, and
//! `IDEMPOTENCY_STORE`: unset or `memory` for
//! the in-memory store, a `redis://` URL or a Redis Cluster as
//! `redis+cluster://HOST:PORT[,HOST:PORT...]` (build with `--features redis`)
//! or a `postgres://` URL (build with `--features postgres`) for a store that
//! several instances of the server can share, or `none` for the same API
//! without the idempotency layer (to measure what the layer costs).

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Extension, Json, Router,
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::ListenerExt,
};
use serde::{Deserialize, Serialize};
use tower_idempotency::{
    BoxStore, IdempotencyContext, IdempotencyLayer, MemoryStore, Principal,
    audit::{AuditLog, AuditSigner, JsonlSink},
};

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
    /// The key of the intent that made this booking (not shown to clients).
    #[serde(skip)]
    intent: String,
}

/// The bookings table: rows, and a unique index on the intent key.
#[derive(Default)]
struct Table {
    rows: Vec<Appointment>,
    by_intent: HashMap<String, usize>,
}

#[derive(Clone, Default)]
struct Bookings(Arc<Mutex<Table>>);

impl Bookings {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn create(
    State(bookings): State<Bookings>,
    Extension(intent): Extension<IdempotencyContext>,
    Json(new): Json<NewAppointment>,
) -> impl IntoResponse {
    if new.delay_ms > 0 {
        // A zero-length sleep would still wait for the timer's next tick.
        tokio::time::sleep(Duration::from_millis(new.delay_ms)).await;
    }
    // The intent: this key in this scope, for this very booking request.
    let mut intent_key = intent.derive("booking");
    intent_key.push('-');
    for b in &intent.fingerprint().as_bytes()[..8] {
        let _ = write!(intent_key, "{b:02x}");
    }
    let appointment = {
        let mut table = bookings.lock();
        // An execution that took over a stalled one (or that one, finishing
        // late) finds the row the other wrote, and books nothing.
        match table.by_intent.get(&intent_key) {
            Some(&row) => {
                eprintln!(
                    "booking_server: intent already booked (took over: {})",
                    intent.took_over()
                );
                table.rows[row].clone()
            }
            None => {
                let appointment = Appointment {
                    id: table.rows.len() as u64 + 1,
                    caller: new.caller,
                    slot: new.slot,
                    provider: new.provider,
                    intent: intent_key.clone(),
                };
                let row = table.rows.len();
                table.rows.push(appointment.clone());
                table.by_intent.insert(intent_key, row);
                appointment
            }
        }
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
    Json(bookings.lock().rows.clone())
}

/// The principal a bearer token stands for: the part before the first `.`.
fn principal_of(req: &Request) -> Option<Principal> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let id = token.trim().split('.').next()?;
    (!id.is_empty()).then(|| Principal::new(id))
}

/// The authentication middleware: 401 without a bearer token, else the
/// principal goes into the request extensions.
async fn authenticate(mut req: Request, next: Next) -> Response {
    let Some(principal) = principal_of(&req) else {
        let problem = serde_json::json!({
            "type": "about:blank",
            "title": "Unauthorized",
            "status": 401,
            "detail": "Send `Authorization: Bearer <caller>.<anything>`.",
        });
        return (
            StatusCode::UNAUTHORIZED,
            [
                (header::CONTENT_TYPE, "application/problem+json"),
                (header::WWW_AUTHENTICATE, "Bearer"),
            ],
            problem.to_string(),
        )
            .into_response();
    };
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// The layer as the demo configures it: keys required, scoped by the
/// principal the authentication middleware found (the default scope).
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

/// The booking API: the POST route behind authentication and then the
/// layer (layers added later wrap those added earlier), or without the
/// layer when `layer` is `None`.
pub(crate) fn app(layer: Option<IdempotencyLayer<BoxStore>>) -> Router {
    let book = match layer {
        Some(layer) => post(create).layer(layer),
        // Same contract, unprotected: every request books, under one
        // intent per request.
        None => post(create_unprotected),
    };
    Router::new()
        .route(
            "/appointments",
            book.layer(middleware::from_fn(authenticate)).get(list),
        )
        .with_state(Bookings::default())
}

/// The handler without the layer: each request is its own intent.
async fn create_unprotected(
    State(bookings): State<Bookings>,
    Json(new): Json<NewAppointment>,
) -> Response {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    if new.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(new.delay_ms)).await;
    }
    let intent = format!("unprotected-{n}");
    let mut table = bookings.lock();
    let appointment = Appointment {
        id: table.rows.len() as u64 + 1,
        caller: new.caller,
        slot: new.slot,
        provider: new.provider,
        intent: intent.clone(),
    };
    // The same table work as the protected handler, its intent index
    // included, so that the two differ by the layer alone.
    let row = table.rows.len();
    table.rows.push(appointment.clone());
    table.by_intent.insert(intent, row);
    drop(table);
    (
        StatusCode::CREATED,
        [(
            header::LOCATION,
            format!("/appointments/{}", appointment.id),
        )],
        Json(appointment),
    )
        .into_response()
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

/// The store named by `IDEMPOTENCY_STORE` (`None` for `none`: no layer),
/// and a name for it.
pub(crate) async fn store_from_env() -> Result<(Option<BoxStore>, &'static str), String> {
    let spec = std::env::var("IDEMPOTENCY_STORE").unwrap_or_default();
    if spec.is_empty() || spec == "memory" {
        return Ok((Some(BoxStore::new(MemoryStore::default())), "memory"));
    }
    if spec == "none" {
        return Ok((None, "none (no idempotency layer)"));
    }
    if spec.starts_with("redis://")
        || spec.starts_with("rediss://")
        || spec.starts_with("redis+cluster://")
    {
        #[cfg(feature = "redis")]
        {
            let store = tower_idempotency::store::RedisStore::connect(&spec)
                .await
                .map_err(|e| format!("IDEMPOTENCY_STORE: cannot connect to Redis: {e}"))?;
            let name = if spec.starts_with("redis+cluster://") {
                "redis cluster"
            } else {
                "redis"
            };
            return Ok((Some(BoxStore::new(store)), name));
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
            return Ok((Some(BoxStore::new(store)), "postgres"));
        }
        #[cfg(not(feature = "postgres"))]
        return Err(
            "IDEMPOTENCY_STORE is a PostgreSQL URL: build with `--features postgres`".into(),
        );
    }
    Err(format!(
        "IDEMPOTENCY_STORE must be `memory`, a redis:// URL, redis+cluster://HOST:PORT[,HOST:PORT...], a postgres:// URL or `none`, got {spec:?}"
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
    // The layer's warnings (a Redis that may lose records, a claim lost
    // while its handler ran) go to stderr; `RUST_LOG` picks more.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if let Err(message) = run().await {
        eprintln!("booking_server: {message}");
        std::process::exit(2);
    }
}

async fn run() -> Result<(), String> {
    let addr = bind_address()?;
    let ttl = seconds_from_env("IDEMPOTENCY_TTL_SECS")?;
    let lease = seconds_from_env("IDEMPOTENCY_LEASE_SECS")?;
    let drain_within =
        seconds_from_env("IDEMPOTENCY_DRAIN_SECS")?.unwrap_or(Duration::from_secs(20));
    let (store, store_name) = store_from_env().await?;
    let audit = audit_from_env().await?;
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
    let shutdown = shutdown_signal();
    println!("listening on http://{bound}");
    eprintln!("idempotency store: {store_name}");
    let layer = store.map(|store| {
        let layer = idempotency(store, ttl, lease);
        match &audit {
            Some(audit) => layer.with_audit(audit.clone()),
            None => layer,
        }
    });
    // The layer's metrics (with `--features metrics`) in the Prometheus
    // text format.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    let app = app(layer.clone()).route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move { metrics.render() }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| format!("server failed: {e}"))?;
    // No connection is left; what runs now runs for clients that went away.
    if let Some(layer) = layer {
        let drained = layer.drain(drain_within).await;
        println!("drained: {drained}");
    }
    if let Some(audit) = audit {
        let summary = audit
            .close()
            .await
            .map_err(|e| format!("audit chain: {e}"))?;
        eprintln!("audit chain closed at seq {}", summary.seq);
    }
    Ok(())
}

/// The audit chain `IDEMPOTENCY_AUDIT` names, if any: see the module docs.
async fn audit_from_env() -> Result<Option<AuditLog>, String> {
    let Some(path) = std::env::var_os("IDEMPOTENCY_AUDIT") else {
        return Ok(None);
    };
    let path = std::path::PathBuf::from(path);
    let key_file = match std::env::var_os("IDEMPOTENCY_AUDIT_SIGNING_KEY") {
        Some(file) => std::path::PathBuf::from(file),
        None => {
            let mut file = path.clone().into_os_string();
            file.push(".key");
            file.into()
        }
    };
    let instance =
        std::env::var("IDEMPOTENCY_AUDIT_INSTANCE").unwrap_or_else(|_| "booking-server".into());
    // A chain that holds entries is continued only with its own key: never
    // a new one made because the key file went missing.
    let chain_holds_entries = JsonlSink::holds_chain(&path);
    if chain_holds_entries && !key_file.exists() {
        return Err(format!(
            "IDEMPOTENCY_AUDIT_SIGNING_KEY {}: missing, but the chain {} holds entries signed with it; restore the key",
            key_file.display(),
            path.display()
        ));
    }
    // Makes the key (and KEY.pub, once) if there is none.
    let (signer, created) = AuditSigner::load_or_generate(&key_file, "booking-server-audit")
        .map_err(|e| format!("IDEMPOTENCY_AUDIT_SIGNING_KEY {}: {e}", key_file.display()))?;
    let public = signer.verifier().to_string();
    let mut sink = JsonlSink::open(&path).map_err(|e| format!("IDEMPOTENCY_AUDIT: {e}"))?;
    match std::env::var("IDEMPOTENCY_AUDIT_MAX_BYTES") {
        Err(_) => {}
        Ok(bytes) => match bytes.parse::<u64>() {
            Ok(bytes) if bytes > 0 => sink = sink.with_max_bytes(bytes),
            _ => {
                return Err(format!(
                    "IDEMPOTENCY_AUDIT_MAX_BYTES={bytes:?}: use a number of bytes, at least 1"
                ));
            }
        },
    }
    let mut builder = AuditLog::builder(instance, signer);
    match std::env::var("IDEMPOTENCY_AUDIT_RECEIPTS").as_deref() {
        Err(_) | Ok("0") => {}
        Ok("1") => builder = builder.with_receipts(),
        Ok(other) => {
            return Err(format!(
                "IDEMPOTENCY_AUDIT_RECEIPTS={other:?}: use 1 (receipts) or 0 (none)"
            ));
        }
    }
    let audit = builder
        .start(sink)
        .await
        .map_err(|e| format!("IDEMPOTENCY_AUDIT {}: {e}", path.display()))?;
    println!("audit public key: {public}");
    eprintln!(
        "audit chain: {} (signing key {}{})",
        path.display(),
        key_file.display(),
        if created { ", generated" } else { "" }
    );
    Ok(Some(audit))
}

/// Resolves on SIGTERM (what a deploy sends) or Ctrl-C. The handlers are
/// installed at the call, before the server says it is listening: a signal
/// that comes early drains the server and closes its audit chain instead of
/// killing it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let installed = {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(terminate), Ok(interrupt)) => Some((terminate, interrupt)),
            (Err(err), _) | (_, Err(err)) => {
                eprintln!("booking_server: cannot listen for SIGTERM and SIGINT: {err}");
                None
            }
        }
    };
    async move {
        #[cfg(unix)]
        match installed {
            Some((mut terminate, mut interrupt)) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            None => std::future::pending::<()>().await,
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        eprintln!("shutting down: no new connections; draining");
    }
}
