//! The command line: every flag also read from a `GATEWAY_*` variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use http::HeaderName;

/// A reverse proxy that makes the writes of any HTTP API safe to retry.
///
/// Requests for operations the OpenAPI document marks `x-idempotency:
/// required` (or `x-side-effects: transactional`) must carry an
/// `Idempotency-Key`; the first request with a key reaches the upstream,
/// every retry gets the recorded response, and a key reused for a different
/// request is rejected. `POST` and `PATCH` are protected when a key is sent;
/// everything else is forwarded as it is.
#[derive(Debug, Clone, Parser)]
#[command(name = "idempotency-gateway", version, about, long_about = None, args_override_self = true)]
pub struct Args {
    /// The API to forward to: http://HOST:PORT, with an optional base path.
    #[arg(long, env = "GATEWAY_UPSTREAM", value_name = "URL")]
    pub upstream: String,

    /// The address to listen on.
    #[arg(
        long,
        env = "GATEWAY_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:3100"
    )]
    pub listen: SocketAddr,

    /// The API's OpenAPI 3.0 or 3.1 document, YAML or JSON.
    #[arg(long, env = "GATEWAY_OPENAPI", value_name = "FILE")]
    pub openapi: PathBuf,

    /// Where records are kept: `memory`, redis://HOST:PORT,
    /// redis+cluster://HOST:PORT[,HOST:PORT...] or postgres://... (every
    /// gateway in front of one API must share it).
    #[arg(
        long,
        env = "GATEWAY_STORE",
        value_name = "URL",
        default_value = "memory"
    )]
    pub store: String,

    /// Write every decision into a tamper-evident chain at PATH (JSON
    /// Lines), signed with the key at PATH.key (created if missing; the
    /// public key is saved as PATH.key.pub).
    #[arg(long, env = "GATEWAY_AUDIT", value_name = "PATH")]
    pub audit: Option<PathBuf>,

    /// Give every audited response a signed `Idempotency-Receipt` header:
    /// the chain's word that it holds the decision (needs --audit).
    #[arg(long, env = "GATEWAY_AUDIT_RECEIPTS", requires = "audit")]
    pub audit_receipts: bool,

    /// Close the audit file once it holds N bytes, as PATH.SEQ (its last
    /// entry's seq, 20 digits), and go on in a new PATH that names its final
    /// checkpoint (needs --audit).
    #[arg(long, env = "GATEWAY_AUDIT_MAX_BYTES", value_name = "N", requires = "audit",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_max_bytes: Option<u64>,

    /// Close the audit file once it has been written for N seconds, the
    /// same way (needs --audit).
    #[arg(long, env = "GATEWAY_AUDIT_MAX_AGE_SECS", value_name = "N", requires = "audit",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_max_age_secs: Option<u64>,

    /// The name of this gateway in the audit chain.
    #[arg(
        long,
        env = "GATEWAY_AUDIT_INSTANCE",
        value_name = "NAME",
        default_value = "idempotency-gateway"
    )]
    pub audit_instance: String,

    /// How long a completed record is replayed.
    #[arg(long, env = "GATEWAY_TTL_SECS", value_name = "N", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub ttl_secs: u64,

    /// How long a claim is honoured without renewal, should this gateway
    /// die holding it.
    #[arg(long, env = "GATEWAY_LEASE_SECS", value_name = "N", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub lease_secs: u64,

    /// How long the upstream has for a response. A keyed request past it is
    /// settled as `outcome-unknown` (500 to every retry; the write may have
    /// happened); others get 504.
    #[arg(long, env = "GATEWAY_UPSTREAM_TIMEOUT_SECS", value_name = "N", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub upstream_timeout_secs: u64,

    /// Take over a claim whose gateway stopped renewing it (stalled, cut off
    /// from the store, or dead) after one lease, and forward the request
    /// again with `Idempotent-Take-Over: true`, for an upstream that checks
    /// what a first execution left behind. By default a claim is never
    /// forwarded twice: retries get 409 until the first forward ends or
    /// the upstream timeout plus one lease passes, and then the key is
    /// settled as `outcome-unknown`.
    #[arg(long, env = "GATEWAY_TAKE_OVER")]
    pub take_over: bool,

    /// How long an idle pooled connection to the upstream is kept: below
    /// the upstream's own keep-alive timeout (gunicorn's is 2 s, Node's
    /// 5 s), so the gateway never sends a request into a connection the
    /// upstream is closing.
    #[arg(long, env = "GATEWAY_UPSTREAM_IDLE_SECS", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub upstream_idle_secs: u64,

    /// How long a connection to the upstream may take; a failed connection
    /// is a 502 and releases the key.
    #[arg(long, env = "GATEWAY_CONNECT_TIMEOUT_SECS", value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout_secs: u64,

    /// The proxies in front of the gateway (a TLS load balancer, say),
    /// as CIDR blocks (`10.0.0.0/8`, `::1/128`) or single addresses, comma
    /// separated: their `X-Forwarded-For`, `-Proto` and `-Host`,
    /// `Forwarded`, `X-Real-IP` and `True-Client-IP` are kept. From any
    /// other client those are removed, and the gateway sets
    /// `X-Forwarded-For` to the client's address, `-Proto` to `http` and
    /// `-Host` to its `Host`.
    #[arg(long, env = "GATEWAY_TRUSTED_PROXIES", value_name = "CIDR", value_delimiter = ',',
          value_parser = parse_cidr)]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// The header whose value scopes keys, so two clients' keys never meet
    /// (hashed, never stored).
    #[arg(
        long,
        env = "GATEWAY_SCOPE_HEADER",
        value_name = "NAME",
        default_value = "authorization"
    )]
    pub scope_header: HeaderName,

    /// The secret the scope header's value is hashed with (HMAC-SHA-256);
    /// the same on every gateway sharing a store. Prefer the variable.
    #[arg(
        long,
        env = "GATEWAY_SCOPE_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub scope_secret: Option<String>,

    /// Accept keyed requests without the scope header into one shared
    /// scope (default: 401).
    #[arg(long, env = "GATEWAY_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,

    /// Answer 404 for paths the document does not describe (and 405 for
    /// methods it does not describe on a path), instead of forwarding them.
    #[arg(long, env = "GATEWAY_REJECT_UNKNOWN_PATHS")]
    pub reject_unknown_paths: bool,

    /// Compare the literal text of paths case-sensitively. By default
    /// `/Appointments` is `/appointments`, as Express and ASP.NET Core
    /// route it; set this only when the upstream routes case-sensitively.
    #[arg(long, env = "GATEWAY_CASE_SENSITIVE_PATHS")]
    pub case_sensitive_paths: bool,

    /// Wait up to N seconds for an in-flight duplicate to finish and replay
    /// it, instead of answering 409 at once.
    #[arg(long, env = "GATEWAY_WAIT_SECS", value_name = "N")]
    pub wait_secs: Option<u64>,

    /// The largest request body of a keyed request (it is read whole to be
    /// fingerprinted); larger ones get 413.
    #[arg(
        long,
        env = "GATEWAY_REQUEST_BODY_LIMIT",
        value_name = "BYTES",
        default_value_t = 1024 * 1024
    )]
    pub request_body_limit: usize,

    /// The largest response body recorded; larger ones stream through, and
    /// retries get 410.
    #[arg(
        long,
        env = "GATEWAY_RESPONSE_BODY_LIMIT",
        value_name = "BYTES",
        default_value_t = 1024 * 1024
    )]
    pub response_body_limit: usize,

    /// How long a client has to send a request head in full, from the
    /// moment its connection is ready for one (a new connection, or the end
    /// of the previous response): bounds half-sent heads and idle
    /// keep-alive connections alike. Closed past it.
    #[arg(long, env = "GATEWAY_HEADER_READ_TIMEOUT_SECS", value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_secs: u64,

    /// How long a request body may go without sending anything; a keyed
    /// body (read whole to be fingerprinted) must also have arrived in full
    /// within it. Cut past it: a keyed request is answered 400 and nothing
    /// runs, an unkeyed one is cut on its way to the upstream.
    #[arg(long, env = "GATEWAY_BODY_READ_TIMEOUT_SECS", value_name = "N", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub body_read_timeout_secs: u64,

    /// The most client connections open at once; one more is answered 503
    /// and closed.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// The most requests in progress at once, over every connection; one
    /// more is answered 503 (`overloaded`, with Retry-After) and not
    /// forwarded.
    #[arg(long, env = "GATEWAY_MAX_REQUESTS", value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_requests: u64,

    /// The most bytes of keyed request bodies held at once (each is read
    /// whole to be fingerprinted, reserved by its Content-Length, or the
    /// request body limit without one); a keyed request that would pass it
    /// is answered 503 (`overloaded`) before its body is read.
    #[arg(long, env = "GATEWAY_MAX_BUFFERED_BYTES", value_name = "BYTES",
          default_value_t = 64 * 1024 * 1024)]
    pub max_buffered_bytes: usize,

    /// On SIGTERM, how long the gateway has to stop: open connections get
    /// the first half, then requests whose clients went away are finished
    /// or settled, and the audit chain is closed, all within N seconds.
    #[arg(
        long,
        env = "GATEWAY_DRAIN_SECS",
        value_name = "N",
        default_value_t = 20
    )]
    pub drain_secs: u64,
}

/// A CIDR block, or one address as a block of one.
fn parse_cidr(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<ipnet::IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<std::net::IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| format!("{text:?} is not a CIDR block (10.0.0.0/8) or an address"))
}

impl Args {
    /// `--ttl-secs` as a duration.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs)
    }

    /// `--lease-secs` as a duration.
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs)
    }

    /// `--upstream-timeout-secs` as a duration.
    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_secs(self.upstream_timeout_secs)
    }

    /// `--drain-secs` as a duration.
    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_secs)
    }
}
