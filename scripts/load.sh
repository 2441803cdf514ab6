#!/usr/bin/env bash
# Load run against the demo server on loopback: first the same API without
# the idempotency layer (`none`), then once per store:
#   bash scripts/load.sh
# Needs Redis and PostgreSQL for their rows (REDIS_URL, DATABASE_URL, with the
# defaults below). Each run is bounded by LOAD_SECONDS (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
redis_url=${REDIS_URL:-redis://127.0.0.1:6379}
database_url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
cargo build --release --all-features --example booking_server
cargo bench --all-features --bench load --no-run
port=39127
for store in none memory "$redis_url" "$database_url"; do
  IDEMPOTENCY_STORE=$store ./target/release/examples/booking_server "127.0.0.1:$port" >/dev/null 2>&1 &
  server=$!
  for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/appointments" && break; sleep 0.1; done
  printf '%-10s ' "${store%%:*}"
  TARGET="http://127.0.0.1:$port" cargo bench --all-features --bench load 2>/dev/null | grep requests
  kill $server; wait $server 2>/dev/null || true
done
