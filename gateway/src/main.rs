//! The `idempotency-gateway` binary: see `--help`.

#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() {
    let args = idempotency_gateway::Args::parse();
    if let Err(message) = idempotency_gateway::run(args).await {
        eprintln!("idempotency-gateway: {message}");
        std::process::exit(2);
    }
}
