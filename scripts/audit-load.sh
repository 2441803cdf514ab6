#!/usr/bin/env bash
# The demo's keyed throughput with the audit chain off, on, and on with
# receipts, on the memory store, alternating (off, on, receipts, off, ...) in
# one run so all see the same machine:
#   bash scripts/audit-load.sh
# Each run is bounded by LOAD_SECONDS (default 10). The chain goes to a
# temporary directory, verified with its public key after each run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --all-features --example booking_server --example audit_verify
cargo bench --all-features --bench load --no-run
port=39128
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for round in 1 2; do
  for audit in off on receipts; do
    rm -f "$dir"/audit.jsonl*
    if [ "$audit" = receipts ]; then
      IDEMPOTENCY_AUDIT="$dir/audit.jsonl" IDEMPOTENCY_AUDIT_RECEIPTS=1 ./target/release/examples/booking_server "127.0.0.1:$port" >/dev/null 2>&1 &
    elif [ "$audit" = on ]; then
      IDEMPOTENCY_AUDIT="$dir/audit.jsonl" ./target/release/examples/booking_server "127.0.0.1:$port" >/dev/null 2>&1 &
    else
      ./target/release/examples/booking_server "127.0.0.1:$port" >/dev/null 2>&1 &
    fi
    server=$!
    for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/appointments" && break; sleep 0.1; done
    printf 'round %s audit %-8s ' "$round" "$audit"
    TARGET="http://127.0.0.1:$port" cargo bench --all-features --bench load 2>/dev/null | grep requests
    kill -TERM $server; wait $server 2>/dev/null || true
    if [ "$audit" != off ]; then
      printf '  chain: '
      ./target/release/examples/audit_verify "$dir/audit.jsonl" --public-key "$dir/audit.jsonl.key.pub" 2>/dev/null
    fi
  done
done
