//! `idempotency-gateway`: a reverse proxy, built on
//! [`tower_idempotency`], that makes the writes of an HTTP API in any
//! language safe for retrying clients, with nothing changed in the API.
//!
//! The API's OpenAPI document says which operations need a key
//! ([`openapi`]); the gateway claims the key in its store, forwards the
//! first request ([`forward`]), records the upstream's response and replays
//! it to every retry, and rejects a key reused for a different request. The
//! binary is [`run`] over [`Args`]; tests serve on a listener of their own
//! with [`serve`].

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod app;
pub mod config;
pub mod forward;
mod limits;
pub mod openapi;
pub mod route;

use std::{
    future::Future,
    sync::{Arc, OnceLock},
    time::Duration,
};

use hyper::{Request, body::Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tower_idempotency::{
    Anonymous, BoxStore, DefaultScope, IdempotencyLayer, Lapse, MemoryStore,
    audit::{AuditLog, AuditSigner, JsonlSink},
};

pub use crate::{app::Gateway, config::Args};
use crate::{
    app::Health,
    forward::{ClientAddr, Forwarder, Upstream},
    openapi::{Api, Protection},
};

/// Parses nothing, binds `args.listen`, and serves until SIGTERM or
/// Ctrl-C; then drains. The binary's whole life.
pub async fn run(args: Args) -> Result<(), String> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    serve(args, listener, shutdown_signal()).await
}

/// Serves the gateway on `listener` until `shutdown` resolves: prints
/// `listening on http://ADDR` once everything is ready, then, at shutdown,
/// stops accepting, lets open connections finish (up to `--drain-secs`),
/// drains the layer's background work and closes the audit chain.
pub async fn serve(
    args: Args,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let api = Api::load(&args.openapi)
        .map_err(|e| format!("--openapi {e}"))?
        .with_case_sensitive_paths(args.case_sensitive_paths);
    let upstream = Upstream::parse(&args.upstream).map_err(|e| format!("--upstream {e}"))?;
    let (store, store_name) = store_from_url(&args.store).await?;
    let audit = match &args.audit {
        Some(path) => Some(open_audit(&args, path).await?),
        None => None,
    };
    let layer = layer(&args, store.clone(), audit.clone());
    let forward = Forwarder::new(
        upstream,
        args.upstream_timeout(),
        Duration::from_secs(args.connect_timeout_secs),
        Duration::from_secs(args.upstream_idle_secs),
    )
    .with_trusted_proxies(&args.trusted_proxies)
    .with_receipts(args.audit_receipts);
    describe(&api, &args, store_name);
    let health = Health {
        store,
        store_name: store_name.to_owned(),
        audit: audit.clone(),
        timeout: Duration::from_secs(2),
    };
    let gateway = Arc::new(Gateway::new(
        api,
        &layer,
        forward,
        health,
        metrics_handle(),
        app::Rules {
            reject_unknown: args.reject_unknown_paths,
            limits: limits::Limits::new(
                usize::try_from(args.max_requests).unwrap_or(usize::MAX),
                args.max_buffered_bytes,
                args.request_body_limit,
            ),
            scope_header: args.scope_header.clone(),
            body_timeout: Duration::from_secs(args.body_read_timeout_secs),
        },
    ));
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on http://{addr}");

    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(args.header_read_timeout_secs));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(args.header_read_timeout_secs))
        .keep_alive_timeout(Duration::from_secs(args.header_read_timeout_secs));
    let open = Arc::new(tokio::sync::Semaphore::new(
        usize::try_from(args.max_connections)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    eprintln!("idempotency-gateway: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            connections.spawn(refuse_connection(stream));
            continue;
        };
        // The head and the body of a recorded response go out in separate
        // writes: without TCP_NODELAY the body waits for a delayed ACK.
        let _ = stream.set_nodelay(true);
        let gateway = gateway.clone();
        // Set by the first request: until then the connection has only the
        // header-read timeout (hyper's own timer starts only once it knows
        // the protocol, which a silent client never lets it learn).
        let spoke = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let first = spoke.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            first.store(true, std::sync::atomic::Ordering::Relaxed);
            req.extensions_mut().insert(ClientAddr(peer));
            gateway.handle(req)
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        let first_head = Duration::from_secs(args.header_read_timeout_secs);
        let served = connections.spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
        // A watchdog beside it, so the connection itself polls no timer:
        // a client that sent no request in time loses the connection.
        tokio::spawn(async move {
            tokio::time::sleep(first_head).await;
            if !spoke.load(std::sync::atomic::Ordering::Relaxed) {
                served.abort();
            }
        });
    }
    drop(listener);
    eprintln!("idempotency-gateway: shutting down");
    // One budget for every step: open connections get the first half, then
    // what the layer still runs for clients that went away, and the audit
    // chain's close, all before the deadline.
    let started = tokio::time::Instant::now();
    let deadline = started + args.drain();
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep_until(started + args.drain() / 2) => {
            // Dropping a connection's requests detaches the keyed ones: the
            // layer's drain below finishes or settles them.
            eprintln!(
                "idempotency-gateway: {} connections still open after {} s, closed",
                connections.len(),
                (args.drain() / 2).as_secs_f64()
            );
            connections.abort_all();
        }
    }
    while connections.join_next().await.is_some() {}
    // Settling what is still running takes a store write: a quarter of the
    // budget is kept for it, inside the layer's drain.
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let drained = tokio::time::timeout(left, layer.drain(left.mul_f64(0.75))).await;
    match drained {
        Ok(drained) => println!("drained: {drained}"),
        Err(_) => println!("drained: cut at the deadline"),
    }
    if let Some(audit) = audit {
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(100));
        match tokio::time::timeout(left, audit.close()).await {
            Ok(Ok(summary)) => eprintln!("audit chain closed at seq {}", summary.seq),
            Ok(Err(e)) => return Err(format!("audit chain: {e}")),
            Err(_) => {
                eprintln!("idempotency-gateway: the audit chain did not close by the deadline")
            }
        }
    }
    Ok(())
}

/// The idempotency layer `args` describe, over `store`.
fn layer(args: &Args, store: BoxStore, audit: Option<AuditLog>) -> IdempotencyLayer<BoxStore> {
    let mut scope = DefaultScope::new().with_header(args.scope_header.clone());
    if let Some(secret) = &args.scope_secret {
        scope = scope.with_secret(secret);
    }
    let mut layer = IdempotencyLayer::new(store)
        .with_ttl(args.ttl())
        .with_lease(args.lease())
        .with_max_execution(args.upstream_timeout())
        .with_lapse(if args.take_over {
            Lapse::TakeOver
        } else {
            Lapse::Settle
        })
        .with_request_body_limit(args.request_body_limit)
        // The gateway admits keyed bodies against the same bound first.
        .with_max_buffered_bytes(args.max_buffered_bytes)
        .with_response_body_limit(args.response_body_limit)
        .with_scope(scope);
    if args.allow_anonymous {
        layer = layer.with_anonymous(Anonymous::Shared);
    }
    if let Some(wait) = args.wait_secs {
        layer = layer.with_wait(Duration::from_secs(wait));
    }
    if let Some(audit) = audit {
        layer = layer.with_audit(audit);
    }
    app::configure(layer)
}

/// What the gateway will do, on standard error: an operator's first check
/// that the document's paths are the paths clients call.
fn describe(api: &Api, args: &Args, store: &str) {
    let (mut required, mut optional, mut off) = (0, 0, 0);
    for (_, _, protection) in api.operations() {
        match protection {
            Protection::Required => required += 1,
            Protection::Optional => optional += 1,
            Protection::Off => off += 1,
        }
    }
    let prefixes: Vec<&str> = api
        .prefixes()
        .iter()
        .map(|p| if p.is_empty() { "/" } else { p.as_str() })
        .collect();
    eprintln!(
        "openapi {}: {required} required, {optional} optional, {off} passed through, under {}",
        args.openapi.display(),
        prefixes.join(" and ")
    );
    eprintln!(
        "upstream {}; store {store}; scope by {}",
        args.upstream, args.scope_header
    );
    if args.scope_secret.is_none() {
        eprintln!(
            "warning: no GATEWAY_SCOPE_SECRET: scopes are plain SHA-256 hashes of {}, which someone reading the store could test guesses against",
            args.scope_header
        );
    }
}

/// The store a `--store` URL names.
pub async fn store_from_url(url: &str) -> Result<(BoxStore, &'static str), String> {
    if url == "memory" {
        return Ok((BoxStore::new(MemoryStore::default()), "memory"));
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        let store = tower_idempotency::store::RedisStore::connect(url)
            .await
            .map_err(|e| format!("--store: cannot connect to Redis: {e}"))?;
        return Ok((BoxStore::new(store), "redis"));
    }
    if url.starts_with("redis+cluster://") {
        let store = tower_idempotency::store::RedisStore::connect(url)
            .await
            .map_err(|e| format!("--store: cannot connect to the Redis Cluster: {e}"))?;
        return Ok((BoxStore::new(store), "redis cluster"));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = sqlx::PgPool::connect(url)
            .await
            .map_err(|e| format!("--store: cannot connect to PostgreSQL: {e}"))?;
        let store = tower_idempotency::store::PostgresStore::new(pool);
        store
            .migrate()
            .await
            .map_err(|e| format!("--store: cannot create the table: {e}"))?;
        return Ok((BoxStore::new(store), "postgres"));
    }
    Err(format!(
        "--store must be `memory`, a redis:// URL, redis+cluster://HOST:PORT[,HOST:PORT...] or a postgres:// URL, got {url:?}"
    ))
}

/// The audit chain at `path`, signed with the key at `path.key`.
async fn open_audit(args: &Args, path: &std::path::Path) -> Result<AuditLog, String> {
    let mut key_file = path.as_os_str().to_owned();
    key_file.push(".key");
    let key_file = std::path::PathBuf::from(key_file);
    // A chain that holds entries is continued only with its own key: never
    // a new one made because the key file went missing.
    if JsonlSink::holds_chain(path) && !key_file.exists() {
        return Err(format!(
            "--audit signing key {}: missing, but the chain {} holds entries signed with it; restore the key",
            key_file.display(),
            path.display()
        ));
    }
    // Makes the key (and KEY.pub, once) if there is none.
    let (signer, created) =
        AuditSigner::load_or_generate(&key_file, "idempotency-gateway-audit")
            .map_err(|e| format!("--audit signing key {}: {e}", key_file.display()))?;
    let public = signer.verifier().to_string();
    let mut sink = JsonlSink::open(path).map_err(|e| format!("--audit {}: {e}", path.display()))?;
    if let Some(bytes) = args.audit_max_bytes {
        sink = sink.with_max_bytes(bytes);
    }
    if let Some(secs) = args.audit_max_age_secs {
        sink = sink.with_max_age(std::time::Duration::from_secs(secs));
    }
    let mut builder = AuditLog::builder(args.audit_instance.clone(), signer);
    if let Some(secret) = &args.scope_secret {
        builder = builder.with_secret(secret);
    }
    if args.audit_receipts {
        builder = builder.with_receipts();
    }
    let audit = builder
        .start(sink)
        .await
        .map_err(|e| format!("--audit {}: {e}", path.display()))?;
    eprintln!(
        "audit chain {} (signing key {}{}); public key {public}",
        path.display(),
        key_file.display(),
        if created { ", generated" } else { "" }
    );
    Ok(audit)
}

/// The process's Prometheus recorder, installed on first use; `None` when
/// another recorder was installed first.
fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .clone()
}

/// Answers a connection past `--max-connections` with a 503 and closes it.
async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    const ANSWER: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 123\r\n\r\n{\"type\":\"about:blank\",\"title\":\"Service Unavailable\",\"status\":503,\"code\":\"overloaded\",\"detail\":\"Too many open connections.\"}";
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(ANSWER)).await;
    let _ = stream.shutdown().await;
}

/// Resolves on SIGTERM (what a deploy sends) or Ctrl-C. The handlers are
/// installed here, at the call, before the gateway says it is listening: a
/// signal that comes early drains the gateway instead of killing it.
fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let mut terminate = {
        use tokio::signal::unix::{SignalKind, signal};
        let installed = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        match installed {
            (Ok(terminate), Ok(interrupt)) => Some((terminate, interrupt)),
            (Err(err), _) | (_, Err(err)) => {
                eprintln!("idempotency-gateway: cannot listen for SIGTERM and SIGINT: {err}");
                None
            }
        }
    };
    async move {
        #[cfg(unix)]
        match &mut terminate {
            Some((terminate, interrupt)) => {
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
    }
}
