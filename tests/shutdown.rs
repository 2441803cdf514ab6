//! A deploy, through real processes: two instances of the demo server share
//! one Redis (or one Redis Cluster); a booking whose client has gone is still
//! running on the first when it gets SIGTERM. It exits only after recording
//! the booking, and a retry sent to the second instance replays it.
//!
//! Needs `REDIS_URL` (and `REDIS_CLUSTER_URLS` for the cluster run); without
//! it a test says it skipped and passes. Uses
//! the demo binary that `cargo test --all-features` builds (built here if it
//! is missing).

mod common;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::io::AsyncWriteExt;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn redis_url() -> Option<String> {
    let url = std::env::var("REDIS_URL").ok();
    if url.is_none() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipped: REDIS_URL is not set (for example redis://127.0.0.1:6379)"
        );
    }
    url
}

/// The demo binary `cargo test --all-features` builds.
fn demo_binary() -> PathBuf {
    common::example("booking_server")
}

/// A demo server on a free loopback port, on the Redis at `redis`.
struct Server {
    child: Child,
    base: String,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Server {
    fn start(redis: &str) -> Server {
        let mut child = Command::new(demo_binary())
            .arg("127.0.0.1:0")
            .env("IDEMPOTENCY_STORE", redis)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the demo server starts");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Server {
            child,
            base,
            stdout,
        }
    }

    /// Sends SIGTERM, then waits for the process to exit and returns what
    /// it printed after its first line.
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let status = self.child.wait().unwrap();
        let mut rest = String::new();
        for line in (&mut self.stdout).lines() {
            rest.push_str(&line.unwrap());
            rest.push('\n');
        }
        (status, rest)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn booking_json(delay_ms: u64) -> String {
    format!(
        r#"{{"caller":"grace","slot":"2026-12-02T10:00","provider":"dr-drain","delay_ms":{delay_ms}}}"#
    )
}

fn book(base: &str, key: &str, json: &str) -> Request<Full<Bytes>> {
    Request::post(format!("{base}/appointments"))
        .header("host", "bookings.example")
        .header("content-type", "application/json")
        .header("authorization", "Bearer grace.v1")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from(json.to_owned())))
        .unwrap()
}

async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> (StatusCode, bool, Bytes) {
    let response = client.request(req).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    (
        status,
        replayed,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// The demo's `IDEMPOTENCY_STORE` for the cluster in `REDIS_CLUSTER_URLS`.
fn cluster_store() -> Option<String> {
    let Ok(urls) = std::env::var("REDIS_CLUSTER_URLS") else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipped: REDIS_CLUSTER_URLS is not set (bash scripts/redis-cluster.sh start prints it)"
        );
        return None;
    };
    let nodes: Vec<&str> = urls
        .split(',')
        .map(|url| url.trim().trim_start_matches("redis://"))
        .collect();
    Some(format!("redis+cluster://{}", nodes.join(",")))
}

/// Whether a Redis key ending in `key` exists on the server, or on any node
/// of the cluster, that `store` names.
async fn holds(store: &str, key: &str) -> bool {
    let nodes: Vec<String> = match store.strip_prefix("redis+cluster://") {
        Some(nodes) => nodes.split(',').map(|n| format!("redis://{n}")).collect(),
        None => vec![store.to_owned()],
    };
    for node in nodes {
        let client = redis::Client::open(node.as_str()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(format!("*{key}"))
            .query_async(&mut connection)
            .await
            .unwrap();
        if !found.is_empty() {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_records_a_detached_booking_before_exiting() {
    let Some(redis) = redis_url() else {
        return;
    };
    a_detached_booking_survives_sigterm(&redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_records_a_detached_booking_before_exiting_on_a_redis_cluster() {
    let Some(cluster) = cluster_store() else {
        return;
    };
    a_detached_booking_survives_sigterm(&cluster).await;
}

async fn a_detached_booking_survives_sigterm(redis: &str) {
    let a = Server::start(redis);
    let b = Server::start(redis);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let key = format!("shutdown-{nonce}");
    let json = booking_json(3000);

    // The booking goes to A over a raw connection, which is then closed: its
    // client is gone while the handler still runs. Both instances are
    // reached under one public name, as behind a load balancer.
    let authority = a.base.strip_prefix("http://").unwrap().to_owned();
    let mut stream = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let raw = format!(
        "POST /appointments HTTP/1.1\r\nhost: bookings.example\r\ncontent-type: application/json\r\n\
         authorization: Bearer grace.v1\r\nidempotency-key: {key}\r\ncontent-length: {}\r\n\r\n{json}",
        json.len()
    );
    stream.write_all(raw.as_bytes()).await.unwrap();
    // Wait until A holds the claim, read straight from Redis.
    let mut attempts = 0;
    while !holds(redis, &key).await {
        attempts += 1;
        assert!(attempts < 500, "A never claimed the key");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _, _) = send(&client, book(&b.base, &key, &json)).await;
    assert_eq!(status, StatusCode::CONFLICT, "B sees A's claim");
    drop(stream);

    let (status, printed) = tokio::task::spawn_blocking(move || a.terminate())
        .await
        .unwrap();
    assert!(status.success(), "A exits cleanly after SIGTERM: {status}");
    assert!(
        printed.contains("drained: every background request and completion finished"),
        "A says it drained: {printed:?}"
    );

    let (status, replayed, body) = send(&client, book(&b.base, &key, &json)).await;
    assert_eq!(
        (status, replayed),
        (StatusCode::CREATED, true),
        "B replays the booking A recorded before it exited: {body:?}"
    );
    let booking: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(booking["provider"], "dr-drain");
    let list = Request::get(format!("{}/appointments", b.base))
        .body(Full::default())
        .unwrap();
    let (_, _, rows) = send(&client, list).await;
    assert_eq!(&rows[..], b"[]", "B never booked it itself");
}
