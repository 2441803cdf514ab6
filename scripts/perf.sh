#!/usr/bin/env bash
# The request path's cost, this working tree beside another commit, in one
# run:
#   scripts/perf.sh [BASE_REV]
# BASE_REV defaults to the previous commit: HEAD when the tree has changes
# of its own, else HEAD~1. Both are built in release (the base in a git
# worktree with a target directory of its own, kept in target/perf-base for
# the next run), then measured alternately, base then new, ROUNDS times
# (default 3):
# - in process: the criterion groups `memory/pass-through` and
#   `memory/keyed 1 KiB` of `benches/layer.rs` (CRITERION_SECONDS of
#   measurement each, default 2);
# - over loopback: the demo server with the layer on the memory store
#   (`memory`) and the same API without it (`none`), every request a POST
#   with a key of its own from one wrk thread over CONNECTIONS (default 32)
#   connections for LOAD_SECONDS (default 4), from one principal and from
#   64 (PRINCIPALS=0 skips the second).
# Prints each run, then one table of medians with new/base ratios, and for
# the load memory/none of each build with the p99s.
# Needs wrk and python3; wrk is installed with apt-get when missing (as
# root), else: apt-get update && apt-get install -y wrk
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
rounds=${ROUNDS:-3}
seconds=${LOAD_SECONDS:-4}
connections=${CONNECTIONS:-32}
criterion_seconds=${CRITERION_SECONDS:-2}
principals=${PRINCIPALS:-64}

if [ $# -gt 1 ]; then
  echo "usage: scripts/perf.sh [BASE_REV]" >&2
  exit 2
fi
if [ $# -eq 1 ]; then
  base_rev=$1
elif [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  base_rev=HEAD
else
  base_rev=HEAD~1
fi
base_commit=$(git rev-parse --verify --quiet "$base_rev^{commit}") || {
  echo "perf: $base_rev is not a commit" >&2
  exit 2
}
command -v python3 >/dev/null || { echo "perf: needs python3" >&2; exit 1; }
if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  else
    echo "perf: needs wrk: apt-get update && apt-get install -y wrk" >&2
    exit 1
  fi
fi

dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  git -C "$root" worktree remove --force "$dir/base" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

# The layer bench's executable in a target directory, built by the caller.
bench_binary() { # target dir
  find "$1/release/deps" -maxdepth 1 -type f -executable -name 'layer-*' -printf '%T@ %p\n' \
    | sort -n | tail -n 1 | cut -d' ' -f2
}

build() { # source dir, target dir
  (cd "$1" && CARGO_TARGET_DIR=$2 cargo build --release --all-features --example booking_server -q \
    && CARGO_TARGET_DIR=$2 cargo bench -p tower-idempotency --bench layer --no-run -q)
}

echo "perf: base $(git log -1 --format='%h %s' "$base_commit" | cut -c1-72)"
echo "perf: new  the working tree at $(git log -1 --format=%h HEAD)$( [ -n "$(git status --porcelain --untracked-files=no)" ] && echo ', with changes')"
git worktree add --detach -q "$dir/base" "$base_commit"
build "$dir/base" "$root/target/perf-base"
build "$root" "$root/target"
declare -A server bench
server[base]=$root/target/perf-base/release/examples/booking_server
server[new]=$root/target/release/examples/booking_server
bench[base]=$(bench_binary "$root/target/perf-base")
bench[new]=$(bench_binary "$root/target")

lua() { # file, principals
  cat >"$1" <<LUA
local counter = 0
local prefix = tostring(os.time()) .. "-" .. tostring(math.random(1, 1e9))
wrk.method = "POST"
wrk.body = '{"caller":"load","slot":"09:00","provider":"dr-load"}'
wrk.headers["Content-Type"] = "application/json"
request = function()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = prefix .. "-" .. counter
  wrk.headers["Authorization"] = "Bearer load" .. (counter % $2) .. ".v1"
  return wrk.format(nil, "/appointments")
end
LUA
}
lua "$dir/one.lua" 1
lua "$dir/many.lua" "$principals"

port=39140
declare -A addr
for build in base new; do
  for store in none memory; do
    a=127.0.0.1:$port
    port=$((port + 1))
    IDEMPOTENCY_STORE=$store "${server[$build]}" "$a" >/dev/null 2>"$dir/$build-$store.log" &
    pids+=($!)
    addr[$build-$store]=$a
  done
done
for a in "${addr[@]}"; do
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://$a/appointments" && break
    sleep 0.1
  done
  curl -s -o /dev/null "http://$a/appointments" || { echo "perf: nothing answers at $a" >&2; exit 1; }
done

results=$dir/results
load() { # build, store, script, label
  local out rps p99
  out=$(wrk -t1 -c"$connections" -d"${seconds}s" --latency -s "$3" "http://${addr[$1-$2]}/appointments")
  if grep -q -e "Non-2xx" -e "Socket errors" <<<"$out"; then
    echo "perf: $1 $2 answered errors:" >&2
    echo "$out" >&2
    exit 1
  fi
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  printf '  %-5s %-28s %10s req/s  p99 %8s\n' "$1" "$4, $2" "$rps" "$p99"
  printf 'load\t%s\t%s\t%s\t%s\t%s\n' "$1" "$4" "$2" "$rps" "$p99" >>"$results"
}

cat >"$dir/criterion.py" <<'PY'
import re, sys
build, results = sys.argv[1], sys.argv[2]
text = sys.stdin.read()
scale = {"ps": 1e-3, "ns": 1.0, "µs": 1e3, "us": 1e3, "ms": 1e6, "s": 1e9}
with open(results, "a") as out:
    for name, value, unit in re.findall(
        r"^(memory/\S[^\n]*?)\s*(?:\n\s*)?time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", text, re.M
    ):
        ns = float(value) * scale[unit]
        print(f"  {build:<5} {name:<50} {ns:10.1f} ns")
        out.write(f"bench\t{build}\t{name}\t{ns}\n")
PY
criterion() { # build
  "${bench[$1]}" --bench "^memory/(pass-through|keyed 1 KiB)/" --warm-up-time 1 \
    --measurement-time "$criterion_seconds" --noplot 2>/dev/null \
    | python3 "$dir/criterion.py" "$1" "$results"
}

for round in $(seq 1 "$rounds"); do
  echo "round $round"
  for build in base new; do criterion "$build"; done
  for script in one many; do
    [ "$script" = many ] && [ "$principals" = 0 ] && continue
    label="1 principal"
    [ "$script" = many ] && label="$principals principals"
    for build in base new; do
      for store in none memory; do load "$build" "$store" "$dir/$script.lua" "$label"; done
    done
  done
done

cat >"$dir/table.py" <<'PY'
import statistics, sys
from collections import defaultdict
results, base = sys.argv[1], sys.argv[2]
bench, rps, p99 = defaultdict(list), defaultdict(list), defaultdict(list)
def ms(text):
    for unit, factor in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)
for line in open(results):
    kind, build, *rest = line.rstrip("\n").split("\t")
    if kind == "bench":
        name, ns = rest
        bench[(name, build)].append(float(ns))
    else:
        label, store, r, p = rest
        rps[(label, store, build)].append(float(r))
        p99[(label, store, build)].append(ms(p))
med = statistics.median
print(f"\nmedians (base {base}, new = the working tree)")
print(f"| {'in process':<50} | {'base':>10} | {'new':>10} | new/base |")
print(f"|{'-' * 52}|{'-' * 12}|{'-' * 12}|----------|")
names = sorted({name for name, _ in bench}, key=lambda n: (not n.startswith("memory/pass"), n))
for name in names:
    b, n = med(bench[(name, "base")]), med(bench[(name, "new")])
    print(f"| {name:<50} | {b:8.1f}ns | {n:8.1f}ns | {n / b:8.3f} |")
print(f"\n| {'over loopback, req/s (p99 ms)':<34} | {'base':>16} | {'new':>16} | new/base |")
print(f"|{'-' * 36}|{'-' * 18}|{'-' * 18}|----------|")
labels = sorted({label for label, _, _ in rps}, key=lambda l: int(l.split()[0]))
for label in labels:
    for store in ("none", "memory"):
        cells = []
        for build in ("base", "new"):
            k = (label, store, build)
            cells.append(f"{med(rps[k]):8.0f} ({med(p99[k]):5.2f})")
        ratio = med(rps[(label, store, "new")]) / med(rps[(label, store, "base")])
        print(f"| {label + ', ' + store:<34} | {cells[0]:>16} | {cells[1]:>16} | {ratio:8.3f} |")
    cells, ratios = [], []
    for build in ("base", "new"):
        r = med(rps[(label, "memory", build)]) / med(rps[(label, "none", build)])
        p = med(p99[(label, "memory", build)]) / med(p99[(label, "none", build)])
        cells.append(f"{r:.3f} (p99 {p:.1f}x)")
        ratios.append(r)
    print(f"| {label + ', memory/none':<34} | {cells[0]:>16} | {cells[1]:>16} | {ratios[1] / ratios[0]:8.3f} |")
PY
python3 "$dir/table.py" "$results" "$(git log -1 --format=%h "$base_commit")"
