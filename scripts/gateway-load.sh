#!/usr/bin/env bash
# The gateway's load comparison, one run, one upstream on loopback:
#   direct   wrk -> upstream
#   nginx    wrk -> nginx (plain reverse proxy, keep-alive pool) -> upstream
#   forward  wrk -> idempotency-gateway, the operation marked `off` -> upstream
#            (forwarding alone, to tell the proxy's cost from the layer's)
#   gateway  wrk -> idempotency-gateway (memory store) -> upstream
# Every request is a POST to a transactional operation with a key of its
# own, so the gateway claims, forwards and records each one. The three run
# alternating, ROUNDS times (default 3), LOAD_SECONDS each (default 10), with
# CONNECTIONS open connections (default 32) from one wrk thread.
#   bash scripts/gateway-load.sh
# With BASELINE set to another build of the gateway binary (an earlier
# commit's, say), it runs as two more targets, `base-fwd` and `base-gw`, in
# the same rounds, so the two builds are compared side by side:
#   BASELINE=/path/to/idempotency-gateway bash scripts/gateway-load.sh
# Needs wrk and nginx, from Debian's packages; installed here with apt-get
# when missing (as root), else install them yourself:
#   apt-get update && apt-get install -y wrk nginx-light
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
seconds=${LOAD_SECONDS:-10}
connections=${CONNECTIONS:-32}
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light >/dev/null
  else
    echo "gateway-load: needs wrk and nginx: apt-get update && apt-get install -y wrk nginx-light" >&2
    exit 1
  fi
fi
cargo build --release -p idempotency-gateway --bin idempotency-gateway --example bench_upstream
dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$dir/nginx.pid" ] && kill "$(cat "$dir/nginx.pid")" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

upstream=127.0.0.1:39180
nginx_at=127.0.0.1:39181
gateway_at=127.0.0.1:39182
forward_at=127.0.0.1:39183
base_gateway_at=127.0.0.1:39184
base_forward_at=127.0.0.1:39185
baseline=${BASELINE:-}
if [ -n "$baseline" ] && [ ! -x "$baseline" ]; then
  echo "gateway-load: BASELINE=$baseline is not an executable" >&2
  exit 1
fi

cat > "$dir/api.yaml" <<'YAML'
openapi: 3.1.0
info: { title: Clinic, version: "1" }
paths:
  /appointments:
    post:
      x-side-effects: transactional
YAML
sed 's/x-side-effects: transactional/x-idempotency: "off"/' "$dir/api.yaml" > "$dir/api-off.yaml"

cat > "$dir/nginx.conf" <<NGINX
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  upstream api { server $upstream; keepalive 64; }
  server {
    listen $nginx_at;
    location / {
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$proxy_host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
    }
  }
}
NGINX

# A key of its own for every request: thread id and a counter.
cat > "$dir/keys.lua" <<'LUA'
local counter = 0
local prefix = tostring(os.time()) .. "-" .. tostring(math.random(1, 1e9))
wrk.method = "POST"
wrk.body = '{"patient":"p-1","slot":"09:00"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer load-test"
request = function()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = prefix .. "-" .. counter
  return wrk.format(nil, "/appointments")
end
LUA

./target/release/examples/bench_upstream "$upstream" >/dev/null &
pids+=($!)
nginx -c "$dir/nginx.conf" -e "$dir/nginx-error.log"
GATEWAY_SCOPE_SECRET=load-test ./target/release/idempotency-gateway \
  --upstream "http://$upstream" --listen "$gateway_at" --openapi "$dir/api.yaml" \
  >/dev/null 2>"$dir/gateway.log" &
pids+=($!)
GATEWAY_SCOPE_SECRET=load-test ./target/release/idempotency-gateway \
  --upstream "http://$upstream" --listen "$forward_at" --openapi "$dir/api-off.yaml" \
  >/dev/null 2>"$dir/forward.log" &
pids+=($!)
targets=("$upstream" "$nginx_at" "$gateway_at" "$forward_at")
if [ -n "$baseline" ]; then
  GATEWAY_SCOPE_SECRET=load-test "$baseline" \
    --upstream "http://$upstream" --listen "$base_gateway_at" --openapi "$dir/api.yaml" \
    >/dev/null 2>"$dir/base-gateway.log" &
  pids+=($!)
  GATEWAY_SCOPE_SECRET=load-test "$baseline" \
    --upstream "http://$upstream" --listen "$base_forward_at" --openapi "$dir/api-off.yaml" \
    >/dev/null 2>"$dir/base-forward.log" &
  pids+=($!)
  targets+=("$base_gateway_at" "$base_forward_at")
fi
for at in "${targets[@]}"; do
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://$at/" && break
    sleep 0.1
  done
  curl -s -o /dev/null "http://$at/" || { echo "gateway-load: nothing answers at $at" >&2; exit 1; }
done

run() { # name address
  local out rps p50 p99
  out=$(wrk -t1 -c"$connections" -d"${seconds}s" --latency -s "$dir/keys.lua" "http://$2/appointments")
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  if grep -q -e "Non-2xx" -e "Socket errors" <<<"$out"; then
    echo "gateway-load: $1 answered errors:" >&2
    echo "$out" >&2
    exit 1
  fi
  printf '%-8s %10s req/s  p50 %8s  p99 %8s\n' "$1" "$rps" "$p50" "$p99"
}

for round in $(seq 1 "$rounds"); do
  echo "round $round"
  run direct "$upstream"
  run nginx "$nginx_at"
  [ -z "$baseline" ] || run base-fwd "$base_forward_at"
  run forward "$forward_at"
  [ -z "$baseline" ] || run base-gw "$base_gateway_at"
  run gateway "$gateway_at"
done
