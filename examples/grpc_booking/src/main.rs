//! The gRPC booking demo: a tonic server for `proto/booking.proto` with
//! `Book` protected by the idempotency layer.
//!
//! ```text
//! cargo run -p grpc_booking                    # listens on 127.0.0.1:50051
//! cargo run -p grpc_booking -- 127.0.0.1:50052
//! ```
//!
//! Binds its first argument, else `$ADDR`, else `127.0.0.1:50051`, and
//! prints `listening on http://ADDR` once bound. `IDEMPOTENCY_STORE` picks
//! the store as in the HTTP demo: unset or `memory`, a `redis://` URL,
//! `redis+cluster://HOST:PORT[,HOST:PORT...]` or a `postgres://` URL. On
//! Ctrl-C or SIGTERM it stops accepting calls, lets open ones finish, drains
//! the layer (`IDEMPOTENCY_DRAIN_SECS`, default 20), prints `drained: ...`
//! and exits 0.

use std::{net::SocketAddr, time::Duration};

use grpc_booking::{Bookings, idempotency, serve};
use tower_idempotency::{BoxStore, MemoryStore};

fn bind_address() -> Result<SocketAddr, String> {
    let spec = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:50051".to_owned());
    spec.parse().map_err(|e| {
        format!("cannot listen on {spec:?}: {e} (expected HOST:PORT, such as 127.0.0.1:50051)")
    })
}

async fn store_from_env() -> Result<BoxStore, String> {
    let spec = std::env::var("IDEMPOTENCY_STORE").unwrap_or_default();
    if spec.is_empty() || spec == "memory" {
        return Ok(BoxStore::new(MemoryStore::default()));
    }
    if spec.starts_with("redis://") || spec.starts_with("redis+cluster://") {
        let store = tower_idempotency::store::RedisStore::connect(&spec)
            .await
            .map_err(|e| format!("IDEMPOTENCY_STORE: cannot connect to Redis: {e}"))?;
        return Ok(BoxStore::new(store));
    }
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        let pool = sqlx_pool(&spec).await?;
        let store = tower_idempotency::store::PostgresStore::new(pool);
        store
            .migrate()
            .await
            .map_err(|e| format!("IDEMPOTENCY_STORE: cannot create the table: {e}"))?;
        return Ok(BoxStore::new(store));
    }
    Err(format!(
        "IDEMPOTENCY_STORE must be `memory`, a redis:// URL, redis+cluster://HOST:PORT[,HOST:PORT...] or a postgres:// URL, got {spec:?}"
    ))
}

async fn sqlx_pool(url: &str) -> Result<sqlx::PgPool, String> {
    sqlx::PgPool::connect(url)
        .await
        .map_err(|e| format!("IDEMPOTENCY_STORE: cannot connect to PostgreSQL: {e}"))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

async fn run() -> Result<(), String> {
    let addr = bind_address()?;
    let store = store_from_env().await?;
    let drain_secs: u64 = match std::env::var("IDEMPOTENCY_DRAIN_SECS") {
        Ok(secs) => secs
            .parse()
            .map_err(|_| format!("IDEMPOTENCY_DRAIN_SECS must be whole seconds, got {secs:?}"))?,
        Err(_) => 20,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    println!("listening on http://{bound}");
    let layer = idempotency(store);
    serve(
        listener,
        layer.clone(),
        Bookings::default(),
        shutdown_signal(),
    )
    .await
    .map_err(|e| format!("server failed: {e}"))?;
    let drained = layer.drain(Duration::from_secs(drain_secs)).await;
    println!("drained: {drained}");
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(err) = run().await {
        eprintln!("grpc_booking: {err}");
        std::process::exit(1);
    }
}
