//! A load client for the demo server: keyed bookings from many connections
//! at once, reporting throughput and latency percentiles. It targets one
//! loopback server and stops by itself after a bounded time and count.
//!
//! ```text
//! cargo run --release --all-features --example booking_server 127.0.0.1:3000 &
//! TARGET=http://127.0.0.1:3000 cargo bench --bench load
//! ```
//!
//! Each connection books as its own principal (`Bearer load<N>.v1`).
//! `scripts/load.sh` runs it against the demo without the layer
//! (`IDEMPOTENCY_STORE=none`), then on the memory, Redis and PostgreSQL
//! stores, in turn. Settings: `TARGET` (default `http://127.0.0.1:3000`),
//! `CONNECTIONS` (32), `LOAD_SECONDS` (10), `MAX_REQUESTS` (2 000 000).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {value:?}")),
        Err(_) => default,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; this is not a criterion bench.
    let target = std::env::var("TARGET").unwrap_or_else(|_| "http://127.0.0.1:3000".into());
    let host = target
        .strip_prefix("http://")
        .and_then(|rest| rest.split(['/', ':']).next())
        .unwrap_or("");
    assert!(
        host == "localhost" || host.starts_with("127.") || host == "[::1]",
        "TARGET must be a loopback address, got {target}"
    );
    let connections: usize = setting("CONNECTIONS", 32);
    let seconds: u64 = setting("LOAD_SECONDS", 10);
    let max_requests: usize = setting("MAX_REQUESTS", 2_000_000);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (latencies, errors, elapsed) = rt.block_on(async {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(connections)
            .build_http();
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let per_worker = max_requests / connections.max(1);
        let started = Instant::now();
        let mut workers = Vec::new();
        for worker in 0..connections {
            let (client, target) = (client.clone(), target.clone());
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(16 * 1024);
                let mut errors = 0usize;
                for n in 0..per_worker {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let req = Request::post(format!("{target}/appointments"))
                        .header("content-type", "application/json")
                        .header("authorization", format!("Bearer load{worker}.v1"))
                        .header(
                            "idempotency-key",
                            format!("load-{}-{worker}-{n}", std::process::id()),
                        )
                        .body(Full::new(Bytes::from_static(
                            br#"{"caller":"load","slot":"09:00","provider":"dr-load"}"#,
                        )))
                        .unwrap();
                    let sent = Instant::now();
                    match client.request(req).await {
                        Ok(response) if response.status() == 201 => {
                            let _ = response.into_body().collect().await;
                            latencies.push(sent.elapsed().as_micros() as u32);
                        }
                        Ok(response) => {
                            let _ = response.into_body().collect().await;
                            errors += 1;
                        }
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            }));
        }
        let mut latencies = Vec::new();
        let mut errors = 0;
        for worker in workers {
            let (mut l, e) = worker.await.unwrap();
            latencies.append(&mut l);
            errors += e;
        }
        (latencies, errors, started.elapsed())
    });
    let mut latencies = latencies;
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{} requests in {:.1} s over {connections} connections: {:.0} req/s, p50 {} us, p99 {} us, {} errors",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        errors
    );
}
