#!/usr/bin/env bash
# The request path's cost over loopback, this build beside another one, in
# one run: the demo server (release build) as
#   none     the same API without the layer (IDEMPOTENCY_STORE=none)
#   memory   with the layer on the in-memory store
# and, with BASELINE set to another build of the demo binary (an earlier
# commit's `target/release/examples/booking_server`), the same two as
# `base-none` and `base-mem`. Every request is a POST with a key of its own
# (so each is a first execution), from one wrk thread over CONNECTIONS
# (default 32) connections, LOAD_SECONDS (default 4) each, the targets
# alternating for ROUNDS rounds (default 5). Prints each run, then the
# medians and the ratios to `none` and to the baseline.
#   bash scripts/perf.sh
#   BASELINE=/tmp/base/booking_server bash scripts/perf.sh
# A baseline binary of a commit:
#   git worktree add /tmp/base <commit> && (cd /tmp/base && cargo build --release --all-features --example booking_server)
# Needs wrk, from Debian's packages; installed with apt-get when missing (as
# root), else: apt-get update && apt-get install -y wrk
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-5}
seconds=${LOAD_SECONDS:-4}
connections=${CONNECTIONS:-32}
baseline=${BASELINE:-}
if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  else
    echo "perf: needs wrk: apt-get update && apt-get install -y wrk" >&2
    exit 1
  fi
fi
if [ -n "$baseline" ] && [ ! -x "$baseline" ]; then
  echo "perf: BASELINE=$baseline is not an executable" >&2
  exit 1
fi
cargo build --release --all-features --example booking_server
dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

cat > "$dir/keys.lua" <<'LUA'
local counter = 0
local prefix = tostring(os.time()) .. "-" .. tostring(math.random(1, 1e9))
wrk.method = "POST"
wrk.body = '{"caller":"load","slot":"09:00","provider":"dr-load"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer load.v1"
request = function()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = prefix .. "-" .. counter
  return wrk.format(nil, "/appointments")
end
LUA

names=(none memory)
binaries=(./target/release/examples/booking_server ./target/release/examples/booking_server)
stores=(none memory)
if [ -n "$baseline" ]; then
  names+=(base-none base-mem)
  binaries+=("$baseline" "$baseline")
  stores+=(none memory)
fi
port=39140
addrs=()
for i in "${!names[@]}"; do
  addr=127.0.0.1:$((port + i))
  IDEMPOTENCY_STORE=${stores[$i]} "${binaries[$i]}" "$addr" >/dev/null 2>"$dir/${names[$i]}.log" &
  pids+=($!)
  addrs+=("$addr")
done
for addr in "${addrs[@]}"; do
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://$addr/appointments" && break
    sleep 0.1
  done
  curl -s -o /dev/null "http://$addr/appointments" || { echo "perf: nothing answers at $addr" >&2; exit 1; }
done

run() { # index
  local out rps p99
  out=$(wrk -t1 -c"$connections" -d"${seconds}s" --latency -s "$dir/keys.lua" "http://${addrs[$1]}/appointments")
  if grep -q -e "Non-2xx" -e "Socket errors" <<<"$out"; then
    echo "perf: ${names[$1]} answered errors:" >&2
    echo "$out" >&2
    exit 1
  fi
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  printf '%-10s %10s req/s  p99 %8s\n' "${names[$1]}" "$rps" "$p99"
  echo "${names[$1]} $rps" >>"$dir/results"
}

for round in $(seq 1 "$rounds"); do
  echo "round $round"
  for i in "${!names[@]}"; do run "$i"; done
done

median() { # name
  awk -v n="$1" '$1 == n {print $2}' "$dir/results" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'
}
echo "medians (req/s)"
for name in "${names[@]}"; do printf '%-10s %10.0f\n' "$name" "$(median "$name")"; done
ratio() { awk -v a="$(median "$1")" -v b="$(median "$2")" 'BEGIN {printf "%.3f", a / b}'; }
echo "memory / none:        $(ratio memory none)"
if [ -n "$baseline" ]; then
  echo "base-mem / base-none: $(ratio base-mem base-none)"
  echo "memory / base-mem:    $(ratio memory base-mem)"
  echo "none / base-none:     $(ratio none base-none)"
fi
