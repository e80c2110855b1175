#!/usr/bin/env bash
# Load figure for the HTTP reverse proxy example: requests/s and p50/p99 latency of a small
# GET through relay + edge (separate processes, QUIC tunnel on loopback) versus the same
# backend hit directly, measured with wrk in one run.
#
# Builds the example in release mode, and a tiny axum "hello" backend as a throwaway crate
# in a temp dir (pinned to the repo's Cargo.lock, built offline into the repo's target dir),
# starts backend, relay and edge on free 127.0.0.1 ports, waits for the relay's /healthz to
# report the edge, warms up, then runs wrk against the backend and against the relay with
# `Host: bench.localhost:<port>`. Everything stays on 127.0.0.1; every process it started
# is stopped on exit.
#
# Usage: scripts/load.sh
# Env:   DURATION=10s THREADS=2 CONNECTIONS=64   wrk settings (each of the two runs)
#        RUST_LOG=warn     relay/edge log level (info logs one line per request)
#        LOAD_TARGET_DIR   cargo target dir (default: <repo>/target)
#        KEEP_TMP=1        keep the temp dir (logs, wrk output); its path is printed
# Needs: cargo, wrk (apt-get install wrk), curl, python3 (to pick free ports).
# Exit:  0 measured, 1 failure, 2 missing tool.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${LOAD_TARGET_DIR:-$REPO/target}"
DURATION="${DURATION:-10s}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-64}"
export RUST_LOG="${RUST_LOG:-warn}"
export NO_COLOR=1

say() { printf 'load: %s\n' "$*" >&2; }
fail() {
    say "FAIL: $*"
    exit 1
}
for tool in cargo wrk curl python3; do
    command -v "$tool" >/dev/null || {
        say "$tool not found (wrk: apt-get install wrk)"
        exit 2
    }
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/backhaul-load.XXXXXX")"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ "${KEEP_TMP:-}" == 1 ]]; then
        say "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

free_port() { # tcp|udp
    python3 - "$1" <<'EOF'
import socket, sys
kind = socket.SOCK_DGRAM if sys.argv[1] == "udp" else socket.SOCK_STREAM
s = socket.socket(socket.AF_INET, kind)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
EOF
}

say "building the example (release)"
cargo build --quiet --release --manifest-path "$REPO/Cargo.toml" \
    --target-dir "$TARGET_DIR" --example http_reverse_proxy
PROXY="$TARGET_DIR/release/examples/http_reverse_proxy"

say "building the backend (release, throwaway crate in $WORK)"
CRATE="$WORK/backend"
mkdir -p "$CRATE/src"
cat >"$CRATE/Cargo.toml" <<'EOF'
[package]
name = "backhaul-load-backend"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
axum = "0.8"
tokio = { version = "1", features = ["rt-multi-thread", "macros", "net"] }

[workspace]
EOF
cat >"$CRATE/src/main.rs" <<'EOF'
//! A small, fast HTTP backend: GET / answers a short text.
#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).expect("usage: backend 127.0.0.1:PORT");
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("binding");
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello from the backend\n" }));
    axum::serve(listener, app).await.expect("serving");
}
EOF
# The repo's lock pins the versions the repo already has; offline, nothing is downloaded.
cp "$REPO/Cargo.lock" "$CRATE/Cargo.lock"
cargo build --quiet --release --offline --manifest-path "$CRATE/Cargo.toml" \
    --target-dir "$TARGET_DIR" 2>"$WORK/backend-build.log" ||
    fail "backend build failed: $(tail -20 "$WORK/backend-build.log")"
BACKEND="$TARGET_DIR/release/backhaul-load-backend"

BACKEND_PORT="$(free_port tcp)"
QUIC_PORT="$(free_port udp)"
HTTP_PORT="$(free_port tcp)"
ADMIN_PORT="$(free_port tcp)"
TOKEN="load-$RANDOM$RANDOM"
HOST="bench.localhost:$HTTP_PORT"

"$BACKEND" "127.0.0.1:$BACKEND_PORT" >"$WORK/backend.log" 2>&1 &
PIDS+=($!)
"$PROXY" relay --quic-listen "127.0.0.1:$QUIC_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
    --admin-listen "127.0.0.1:$ADMIN_PORT" --cert-out "$WORK/relay-cert.pem" \
    --edge-token "bench=$TOKEN" >"$WORK/relay.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    [[ -s "$WORK/relay-cert.pem" ]] && break
    sleep 0.1
done
[[ -s "$WORK/relay-cert.pem" ]] || fail "the relay wrote no certificate: $(tail -5 "$WORK/relay.log")"
"$PROXY" edge --relay "127.0.0.1:$QUIC_PORT" --relay-cert "$WORK/relay-cert.pem" \
    --name bench --token "$TOKEN" --expose "web=http://127.0.0.1:$BACKEND_PORT" \
    >"$WORK/edge.log" 2>&1 &
PIDS+=($!)

ready=""
for _ in $(seq 100); do
    if curl -fsS "http://127.0.0.1:$ADMIN_PORT/healthz" 2>/dev/null | grep -qx 'edges 1'; then
        ready=1
        break
    fi
    sleep 0.1
done
[[ -n "$ready" ]] || fail "the edge did not register: $(tail -5 "$WORK/edge.log")"
direct="$(curl -fsS "http://127.0.0.1:$BACKEND_PORT/")"
proxied="$(curl -fsS -H "Host: $HOST" "http://127.0.0.1:$HTTP_PORT/")"
[[ "$direct" == "hello from the backend" && "$proxied" == "$direct" ]] ||
    fail "unexpected answers: direct '$direct', proxied '$proxied'"

run_wrk() { # name url [header]
    local name="$1" url="$2"
    shift 2
    wrk -t"$THREADS" -c"$CONNECTIONS" -d2s "$@" "$url" >/dev/null # warm-up
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$@" "$url" >"$WORK/wrk-$name.txt"
    if grep -qE 'Non-2xx|Socket errors' "$WORK/wrk-$name.txt"; then
        cat "$WORK/wrk-$name.txt" >&2
        fail "$name: errors during the run"
    fi
}
say "wrk -t$THREADS -c$CONNECTIONS -d$DURATION against the backend directly"
run_wrk direct "http://127.0.0.1:$BACKEND_PORT/"
say "wrk -t$THREADS -c$CONNECTIONS -d$DURATION through relay + edge (Host: $HOST)"
run_wrk proxied "http://127.0.0.1:$HTTP_PORT/" -H "Host: $HOST"

rps() { awk '/^Requests\/sec:/ { print $2 }' "$WORK/wrk-$1.txt"; }
pct() { awk -v p="$2%" '$1 == p { print $2; exit }' "$WORK/wrk-$1.txt"; }
direct_rps="$(rps direct)"
proxied_rps="$(rps proxied)"
ratio="$(awk -v a="$proxied_rps" -v b="$direct_rps" 'BEGIN { printf "%.2f", a / b }')"

echo
echo "backhaul http_reverse_proxy load figure ($(date -u +%Y-%m-%d), $(nproc) cores, git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION, GET / (23-byte body), RUST_LOG=$RUST_LOG, all on 127.0.0.1"
printf '%-24s %12s %10s %10s\n' "" "requests/s" "p50" "p99"
printf '%-24s %12s %10s %10s\n' "backend directly" "$direct_rps" "$(pct direct 50)" "$(pct direct 99)"
printf '%-24s %12s %10s %10s\n' "through relay + edge" "$proxied_rps" "$(pct proxied 50)" "$(pct proxied 99)"
echo "proxied / direct requests/s: $ratio"
