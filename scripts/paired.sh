#!/usr/bin/env bash
# Two builds (or settings) of the proxy side by side, in pairs of wrk runs seconds apart:
# for changes too small for `scripts/compare.sh`, whose ways run minutes apart on a
# machine whose speed drifts by more than the change.
#
# It starts two relay + edge pairs, A and B, in front of one backend, then alternates wrk
# between them (A then B, B then A, ...). Each run reports requests/s and the relay's and
# edge's CPU per request, split into user and system time (from /proc). At the end: the
# medians, and B / A for each pair and its median.
#
# Usage: scripts/paired.sh [pairs]            (default 6)
# Env:   BIN_A, BIN_B         proxy binaries (default: target/release/examples/http_reverse_proxy)
#        MODE_A, MODE_B       http (the HTTP lane to a --pass-through edge, the default) or
#                             tcp (TCP forwarding)
#        ENV_A, ENV_B         extra environment for A's or B's processes ("NAME=value ...")
#        RELAY_FLAGS_A, RELAY_FLAGS_B, EDGE_FLAGS_A, EDGE_FLAGS_B   extra flags
#        DURATION=3s CONNECTIONS=64   wrk settings per run (one thread)
# Needs: the load backend `scripts/compare.sh` builds (run it once), wrk, curl, python3.
# Example, a build against the previous one:
#   cp target/release/examples/http_reverse_proxy /tmp/before   # then change and rebuild
#   BIN_A=/tmp/before scripts/paired.sh 8
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${COMPARE_TARGET_DIR:-$REPO/target}"
PAIRS="${1:-6}"
DURATION="${DURATION:-3s}"
CONNECTIONS="${CONNECTIONS:-64}"
DEFAULT_BIN="$TARGET_DIR/release/examples/http_reverse_proxy"
BACKEND="$TARGET_DIR/release/backhaul-load-backend"

fail() { printf 'paired: %s\n' "$*" >&2; exit 1; }
for tool in wrk curl python3; do
    command -v "$tool" >/dev/null || { printf 'paired: needs %s\n' "$tool" >&2; exit 2; }
done
[[ -x "$BACKEND" ]] || fail "no load backend at $BACKEND: run scripts/compare.sh once"

WORK="$(mktemp -d /tmp/backhaul-paired.XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket,sys
s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1]=="udp" else socket.SOCK_STREAM)
s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' "$1"
}

wait_ready() { # url
    for _ in $(seq 150); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    fail "not ready: $1"
}

BACKEND_PORT="$(free_port tcp)"
"$BACKEND" "127.0.0.1:$BACKEND_PORT" >"$WORK/backend.log" 2>&1 &
PIDS+=($!)

declare -A RELAY EDGE URL HOST
start() { # tag binary mode env relay-flags edge-flags
    local tag="$1" bin="$2" mode="$3" envs="$4" relay_flags="$5" edge_flags="$6"
    local quic http admin tcp token="paired-$RANDOM$RANDOM"
    quic="$(free_port udp)" http="$(free_port tcp)" admin="$(free_port tcp)"
    local forward=() expose="web=http://127.0.0.1:$BACKEND_PORT" pass=(--pass-through web)
    if [[ "$mode" == tcp ]]; then
        tcp="$(free_port tcp)"
        forward=(--tcp "$tcp=bench/web")
        expose="web=tcp://127.0.0.1:$BACKEND_PORT"
        pass=()
        URL[$tag]="http://127.0.0.1:$tcp/"
    else
        URL[$tag]="http://127.0.0.1:$http/"
    fi
    HOST[$tag]="Host: bench.localhost:$http"
    # shellcheck disable=SC2086 # flags and environment are word lists
    env RUST_LOG=warn $envs "$bin" relay --quic-listen "127.0.0.1:$quic" \
        --http-listen "127.0.0.1:$http" --admin-listen "127.0.0.1:$admin" \
        --cert-out "$WORK/cert-$tag.pem" --edge-token "bench=$token" "${forward[@]}" \
        $relay_flags >"$WORK/relay-$tag.log" 2>&1 &
    RELAY[$tag]=$!
    PIDS+=($!)
    wait_ready "http://127.0.0.1:$admin/healthz"
    # shellcheck disable=SC2086
    env RUST_LOG=warn $envs "$bin" edge --relay "127.0.0.1:$quic" \
        --relay-cert "$WORK/cert-$tag.pem" --name bench --token "$token" \
        --expose "$expose" "${pass[@]}" $edge_flags >"$WORK/edge-$tag.log" 2>&1 &
    EDGE[$tag]=$!
    PIDS+=($!)
    for _ in $(seq 150); do
        curl -fsS -o /dev/null -H "${HOST[$tag]}" "${URL[$tag]}" 2>/dev/null && return 0
        sleep 0.1
    done
    fail "edge $tag did not attach (see $WORK/edge-$tag.log)"
}

start a "${BIN_A:-$DEFAULT_BIN}" "${MODE_A:-http}" "${ENV_A:-}" "${RELAY_FLAGS_A:-}" "${EDGE_FLAGS_A:-}"
start b "${BIN_B:-$DEFAULT_BIN}" "${MODE_B:-http}" "${ENV_B:-}" "${RELAY_FLAGS_B:-}" "${EDGE_FLAGS_B:-}"

times() { awk '{print $14, $15}' "/proc/$1/stat"; } # utime stime, in clock ticks

run() { # tag
    local tag="$1" before_relay before_edge after_relay after_edge requests
    before_relay="$(times "${RELAY[$tag]}")" before_edge="$(times "${EDGE[$tag]}")"
    wrk -t1 -c"$CONNECTIONS" -d"$DURATION" -H "${HOST[$tag]}" "${URL[$tag]}" >"$WORK/wrk.out"
    after_relay="$(times "${RELAY[$tag]}")" after_edge="$(times "${EDGE[$tag]}")"
    requests="$(awk '/requests in/ {print $1}' "$WORK/wrk.out")"
    python3 - "$tag" "$requests" "${DURATION%s}" "$(getconf CLK_TCK)" \
        "$before_relay" "$after_relay" "$before_edge" "$after_edge" <<'EOF' | tee -a "$WORK/results"
import sys
tag, n, seconds, tck = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
def per_request(before, after):
    (u0, s0), (u1, s1) = map(int, before.split()), map(int, after.split())
    return [(u1 - u0) * 1e6 / tck / n, (s1 - s0) * 1e6 / tck / n]
relay = per_request(sys.argv[5], sys.argv[6])
edge = per_request(sys.argv[7], sys.argv[8])
print(tag, round(n / seconds), *(f"{v:.2f}" for v in relay + edge))
EOF
}

# Warm both up, then measure in alternating order.
wrk -t1 -c"$CONNECTIONS" -d1s -H "${HOST[a]}" "${URL[a]}" >/dev/null
wrk -t1 -c"$CONNECTIONS" -d1s -H "${HOST[b]}" "${URL[b]}" >/dev/null
printf 'way req/s relay-user relay-sys edge-user edge-sys (µs per request)\n'
for pair in $(seq "$PAIRS"); do
    if ((pair % 2)); then run a; run b; else run b; run a; fi
done

python3 - "$WORK/results" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
a = [[float(v) for v in row[1:]] for row in rows if row[0] == "a"]
b = [[float(v) for v in row[1:]] for row in rows if row[0] == "b"]
names = ["req/s", "relay user µs", "relay sys µs", "edge user µs", "edge sys µs"]
print("medians      A        B")
for i, name in enumerate(names):
    print(f"{name:14} {statistics.median(r[i] for r in a):8.2f} {statistics.median(r[i] for r in b):8.2f}")
ratios = [y[0] / x[0] for x, y in zip(a, b)]
print("B / A req/s per pair:", " ".join(f"{r:.3f}" for r in ratios),
      f"(median {statistics.median(ratios):.3f})")
EOF
