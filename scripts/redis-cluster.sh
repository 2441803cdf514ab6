#!/usr/bin/env bash
# A three-master Redis Cluster on loopback, for the cluster tests:
#   bash scripts/redis-cluster.sh start   # prints REDIS_CLUSTER_URLS=...
#   bash scripts/redis-cluster.sh stop
# Ports come from REDIS_CLUSTER_PORTS (default "7101 7102 7103"); node files
# live under REDIS_CLUSTER_DIR (default /tmp/tower-idempotency-cluster).
# `start` reuses a healthy cluster on those ports, and otherwise stops
# whatever answers there, wipes the node files and creates a new one. It
# needs redis-server and redis-cli on the PATH and fails loudly without.
set -euo pipefail
ports=(${REDIS_CLUSTER_PORTS:-7101 7102 7103})
dir=${REDIS_CLUSTER_DIR:-/tmp/tower-idempotency-cluster}

fail() { echo "redis-cluster: $*" >&2; exit 1; }

healthy() {
  for port in "${ports[@]}"; do
    redis-cli -h 127.0.0.1 -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
    [ "$(redis-cli -h 127.0.0.1 -p "$port" cluster info | sed -n 's/^cluster_known_nodes:\([0-9]*\).*/\1/p')" = "${#ports[@]}" ] || return 1
  done
}

stop() {
  for port in "${ports[@]}"; do
    redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
  done
  for port in "${ports[@]}"; do
    for _ in $(seq 1 50); do
      redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 || break
      sleep 0.1
    done
  done
}

urls() {
  local list=()
  for port in "${ports[@]}"; do list+=("redis://127.0.0.1:$port"); done
  (IFS=,; echo "REDIS_CLUSTER_URLS=${list[*]}")
}

start() {
  command -v redis-server >/dev/null || fail "redis-server is required on the PATH"
  command -v redis-cli >/dev/null || fail "redis-cli is required on the PATH"
  if healthy; then
    urls
    return
  fi
  stop
  rm -rf "$dir"
  mkdir -p "$dir"
  for port in "${ports[@]}"; do
    mkdir -p "$dir/$port"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" \
      --cluster-enabled yes --cluster-config-file "$dir/$port/nodes.conf" \
      --cluster-node-timeout 5000 --dir "$dir/$port" --logfile "$dir/$port/redis.log" \
      --save "" --appendonly no --maxmemory-policy noeviction \
      || fail "redis-server did not start on port $port"
  done
  for port in "${ports[@]}"; do
    for _ in $(seq 1 100); do
      redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
    redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 \
      || fail "node on port $port did not answer (see $dir/$port/redis.log)"
  done
  local nodes=()
  for port in "${ports[@]}"; do nodes+=("127.0.0.1:$port"); done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$dir/create.log" 2>&1 \
    || { cat "$dir/create.log" >&2; fail "redis-cli --cluster create failed"; }
  for _ in $(seq 1 100); do
    healthy && break
    sleep 0.1
  done
  healthy || fail "the cluster did not reach cluster_state:ok"
  urls
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) fail "usage: $0 start|stop" ;;
esac
