#!/usr/bin/env bash
# backhaul against the tunnels a user would pick instead, under the same load in one run,
# each way measured with wrk in interleaved rounds so that a busy machine slows every way
# alike:
#   direct         the backend itself
#   rathole        rathole 0.5 (TCP tunnel, its default plain-TCP transport: unencrypted)
#   rathole-noise  rathole 0.5 with its Noise transport (encrypted, as backhaul always is)
#   rathole-1t     rathole with one tokio worker thread per process (TOKIO_WORKER_THREADS=1)
#   bore           bore 0.6 (TCP tunnel)
#   backhaul-tcp   backhaul's TCP forwarding (relay --tcp, edge tcp://): their service
#   backhaul       backhaul's HTTP proxy (relay routes by Host on its express lane, edge
#                  parses with to_local)
#   backhaul-pass  the same with the edge's --pass-through (streams spliced unparsed)
#   backhaul-pass-full  backhaul-pass with the relay's --no-express (every request through
#                  hyper's server and client: the full path)
#   backhaul-pass-shared, backhaul-tcp-shared
#                  backhaul-pass and backhaul-tcp with the relay on tokio's multi-thread
#                  runtime (--shared-runtime) instead of its default runtime per thread
#   backhaul-lanes, backhaul-pass-lanes, backhaul-tcp-lanes
#                  the same ways with the edge's --lanes 2 (two QUIC connections)
#   backhaul-pass-1t, backhaul-tcp-1t
#                  backhaul-pass and backhaul-tcp with relay and edge on one thread each
#                  (--worker-threads 1)
#   quinn          the ceiling of the relay-to-edge hop: HTTP/1 GETs over raw quinn streams
#                  between two processes with backhaul's QUIC settings
#                  (examples/quic_ceiling.rs, its own load generator: wrk speaks no QUIC)
#
# rathole and bore are installed with `cargo install --root` into a local folder (once;
# later runs reuse it). The backend is a tiny axum "hello" server built as a throwaway crate
# pinned to the repo's Cargo.lock. Everything listens on 127.0.0.1, and every process the
# script starts is stopped on exit.
#
# Besides requests/s and latency, it reads each tunnel process's CPU time (utime + stime
# from /proc) around every wrk run and reports CPU microseconds per request for the
# public-side process (relay / server) and the backend-side one (edge / client).
#
# Usage: scripts/compare.sh
# Env:   ROUNDS=3 DURATION=5s THREADS=1 CONNECTIONS=64   wrk settings (per way and round)
#        WAYS="direct rathole rathole-1t rathole-noise bore backhaul-tcp backhaul-tcp-1t backhaul
#              backhaul-pass backhaul-pass-1t backhaul-pass-full quinn"
#        PEERS_DIR   where rathole and bore are installed (default <repo>/target/peers)
#        COMPARE_TARGET_DIR   cargo target dir (default <repo>/target)
#        KEEP_TMP=1  keep the temp dir (configs, logs, wrk output); its path is printed
# Needs: cargo, wrk (apt-get install wrk), curl, python3.
# Exit:  0 measured, 1 failure, 2 missing tool.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${COMPARE_TARGET_DIR:-$REPO/target}"
PEERS_DIR="${PEERS_DIR:-$REPO/target/peers}"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5s}"
THREADS="${THREADS:-1}"
CONNECTIONS="${CONNECTIONS:-64}"
WAYS="${WAYS:-direct rathole rathole-1t rathole-noise bore backhaul-tcp backhaul-tcp-1t backhaul backhaul-pass backhaul-pass-1t backhaul-pass-full quinn}"
export RUST_LOG="${RUST_LOG:-warn}"
export NO_COLOR=1

say() { printf 'compare: %s\n' "$*" >&2; }
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

WORK="$(mktemp -d "${TMPDIR:-/tmp}/backhaul-compare.XXXXXX")"
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

wait_for() { # description command...
    local what="$1"
    shift
    for _ in $(seq 150); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    fail "$what"
}

# --- builds -------------------------------------------------------------------------------

if [[ ! -x "$PEERS_DIR/bin/rathole" || ! -x "$PEERS_DIR/bin/bore" ]]; then
    say "installing rathole 0.5.0 and bore-cli 0.6.0 into $PEERS_DIR (once)"
    # Their lock files first; rathole 0.5.0's pins `time` 0.3.29, which newer compilers
    # reject, so without them (today's compatible versions) if that fails.
    for peer in rathole@0.5.0 bore-cli@0.6.0; do
        cargo install --quiet --locked --root "$PEERS_DIR" "$peer" 2>/dev/null ||
            cargo install --quiet --root "$PEERS_DIR" "$peer" ||
            fail "cargo install of $peer failed"
    done
fi
RATHOLE="$PEERS_DIR/bin/rathole"
BORE="$PEERS_DIR/bin/bore"

say "building the example (release)"
cargo build --quiet --release --manifest-path "$REPO/Cargo.toml" \
    --target-dir "$TARGET_DIR" --example http_reverse_proxy --example quic_ceiling
PROXY="$TARGET_DIR/release/examples/http_reverse_proxy"
CEILING="$TARGET_DIR/release/examples/quic_ceiling"

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
cp "$REPO/Cargo.lock" "$CRATE/Cargo.lock"
cargo build --quiet --release --offline --manifest-path "$CRATE/Cargo.toml" \
    --target-dir "$TARGET_DIR" 2>"$WORK/backend-build.log" ||
    fail "backend build failed: $(tail -20 "$WORK/backend-build.log")"
BACKEND="$TARGET_DIR/release/backhaul-load-backend"

# --- processes ----------------------------------------------------------------------------

BACKEND_PORT="$(free_port tcp)"
"$BACKEND" "127.0.0.1:$BACKEND_PORT" >"$WORK/backend.log" 2>&1 &
PIDS+=($!)
BACKEND_PID=$!
wait_for "the backend did not start" curl -fsS "http://127.0.0.1:$BACKEND_PORT/"

declare -A URL HEADER PUBLIC_PID PRIVATE_PID
URL[direct]="http://127.0.0.1:$BACKEND_PORT/"

start_rathole() { # way [noise]
    local way="$1" transport="${2:-}" control public token="compare-$RANDOM$RANDOM"
    local server_transport="" client_transport=""
    control="$(free_port tcp)"
    public="$(free_port tcp)"
    if [[ "$transport" == noise ]]; then
        # Noise_NK, rathole's default pattern: the server holds a key pair, the client
        # pins its public half.
        local keys private_key public_key
        keys="$("$RATHOLE" --genkey)"
        private_key="$(awk '/Private Key:/ { getline; print; exit }' <<<"$keys")"
        public_key="$(awk '/Public Key:/ { getline; print; exit }' <<<"$keys")"
        [[ -n "$private_key" && -n "$public_key" ]] || fail "rathole --genkey printed: $keys"
        server_transport="$(printf '[server.transport]\ntype = "noise"\n[server.transport.noise]\nlocal_private_key = "%s"' "$private_key")"
        client_transport="$(printf '[client.transport]\ntype = "noise"\n[client.transport.noise]\nremote_public_key = "%s"' "$public_key")"
    fi
    cat >"$WORK/$way-server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$control"
$server_transport
[server.services.web]
token = "$token"
bind_addr = "127.0.0.1:$public"
EOF
    cat >"$WORK/$way-client.toml" <<EOF
[client]
remote_addr = "127.0.0.1:$control"
$client_transport
[client.services.web]
token = "$token"
local_addr = "127.0.0.1:$BACKEND_PORT"
EOF
    env ${PEER_ENV:-} "$RATHOLE" --server "$WORK/$way-server.toml" >"$WORK/$way-server.log" 2>&1 &
    PIDS+=($!)
    PUBLIC_PID[$way]=$!
    env ${PEER_ENV:-} "$RATHOLE" --client "$WORK/$way-client.toml" >"$WORK/$way-client.log" 2>&1 &
    PIDS+=($!)
    PRIVATE_PID[$way]=$!
    URL[$way]="http://127.0.0.1:$public/"
    wait_for "$way did not tunnel: $(tail -3 "$WORK/$way-server.log")" \
        curl -fsS --max-time 1 "${URL[$way]}"
}

start_bore() {
    local public secret="compare-$RANDOM$RANDOM"
    public="$(free_port tcp)"
    # bore's control port is fixed (7835).
    "$BORE" server --bind-addr 127.0.0.1 --secret "$secret" >"$WORK/bore-server.log" 2>&1 &
    PIDS+=($!)
    PUBLIC_PID[bore]=$!
    sleep 0.3
    "$BORE" local "$BACKEND_PORT" --local-host 127.0.0.1 --to 127.0.0.1 --port "$public" \
        --secret "$secret" >"$WORK/bore-client.log" 2>&1 &
    PIDS+=($!)
    PRIVATE_PID[bore]=$!
    URL[bore]="http://127.0.0.1:$public/"
    wait_for "bore did not tunnel: $(tail -3 "$WORK/bore-server.log")" \
        curl -fsS --max-time 1 "${URL[bore]}"
}

start_backhaul() { # way [edge flags...]
    local way="$1" quic http admin token="compare-$RANDOM$RANDOM"
    shift
    quic="$(free_port udp)"
    http="$(free_port tcp)"
    admin="$(free_port tcp)"
    "$PROXY" ${PROXY_FLAGS:-} relay --quic-listen "127.0.0.1:$quic" --http-listen "127.0.0.1:$http" \
        --admin-listen "127.0.0.1:$admin" --cert-out "$WORK/$way-cert.pem" \
        --edge-token "bench=$token" ${RELAY_FLAGS:-} >"$WORK/$way-relay.log" 2>&1 &
    PIDS+=($!)
    PUBLIC_PID[$way]=$!
    wait_for "the relay wrote no certificate" test -s "$WORK/$way-cert.pem"
    "$PROXY" ${PROXY_FLAGS:-} edge --relay "127.0.0.1:$quic" --relay-cert "$WORK/$way-cert.pem" \
        --name bench --token "$token" --expose "web=http://127.0.0.1:$BACKEND_PORT" "$@" \
        >"$WORK/$way-edge.log" 2>&1 &
    PIDS+=($!)
    PRIVATE_PID[$way]=$!
    URL[$way]="http://127.0.0.1:$http/"
    HEADER[$way]="Host: bench.localhost:$http"
    wait_for "the edge did not register: $(tail -3 "$WORK/$way-edge.log")" \
        curl -fsS --max-time 1 -H "${HEADER[$way]}" "${URL[$way]}"
}

start_backhaul_tcp() { # way [edge flags...]
    local way="$1" quic public admin token="compare-$RANDOM$RANDOM"
    shift
    quic="$(free_port udp)"
    public="$(free_port tcp)"
    admin="$(free_port tcp)"
    "$PROXY" ${PROXY_FLAGS:-} relay --quic-listen "127.0.0.1:$quic" --http-listen "127.0.0.1:$(free_port tcp)" \
        --admin-listen "127.0.0.1:$admin" --cert-out "$WORK/$way-cert.pem" \
        --tcp "$public=bench/web" --edge-token "bench=$token" ${RELAY_FLAGS:-} >"$WORK/$way-relay.log" 2>&1 &
    PIDS+=($!)
    PUBLIC_PID[$way]=$!
    wait_for "the relay wrote no certificate" test -s "$WORK/$way-cert.pem"
    "$PROXY" ${PROXY_FLAGS:-} edge --relay "127.0.0.1:$quic" --relay-cert "$WORK/$way-cert.pem" \
        --name bench --token "$token" --expose "web=tcp://127.0.0.1:$BACKEND_PORT" "$@" \
        >"$WORK/$way-edge.log" 2>&1 &
    PIDS+=($!)
    PRIVATE_PID[$way]=$!
    URL[$way]="http://127.0.0.1:$public/"
    wait_for "the TCP tunnel did not answer: $(tail -3 "$WORK/$way-edge.log")" \
        curl -fsS --max-time 1 "${URL[$way]}"
}

start_quinn() {
    local port
    port="$(free_port udp)"
    "$CEILING" server "127.0.0.1:$port" "$WORK/ceiling-cert.pem" >"$WORK/ceiling.log" 2>&1 &
    PIDS+=($!)
    PRIVATE_PID[quinn]=$!
    URL[quinn]="127.0.0.1:$port"
    wait_for "the quinn ceiling server wrote no certificate" test -s "$WORK/ceiling-cert.pem"
}

for way in $WAYS; do
    case "$way" in
    direct) ;;
    rathole) start_rathole rathole ;;
    rathole-noise) start_rathole rathole-noise noise ;;
    rathole-1t) PEER_ENV=TOKIO_WORKER_THREADS=1 start_rathole rathole-1t ;;
    bore) start_bore ;;
    backhaul) start_backhaul backhaul ;;
    backhaul-pass) start_backhaul backhaul-pass --pass-through web ;;
    backhaul-pass-full) RELAY_FLAGS=--no-express start_backhaul backhaul-pass-full --pass-through web ;;
    backhaul-pass-shared) RELAY_FLAGS=--shared-runtime start_backhaul backhaul-pass-shared --pass-through web ;;
    backhaul-tcp-shared) RELAY_FLAGS=--shared-runtime start_backhaul_tcp backhaul-tcp-shared ;;
    backhaul-lanes) start_backhaul backhaul-lanes --lanes 2 ;;
    backhaul-pass-lanes) start_backhaul backhaul-pass-lanes --pass-through web --lanes 2 ;;
    backhaul-tcp) start_backhaul_tcp backhaul-tcp ;;
    backhaul-tcp-lanes) start_backhaul_tcp backhaul-tcp-lanes --lanes 2 ;;
    backhaul-pass-1t) PROXY_FLAGS="--worker-threads 1" start_backhaul backhaul-pass-1t --pass-through web ;;
    backhaul-tcp-1t) PROXY_FLAGS="--worker-threads 1" start_backhaul_tcp backhaul-tcp-1t ;;
    quinn)
        start_quinn
        continue
        ;;
    *) fail "unknown way $way (direct, rathole, rathole-1t, rathole-noise, bore, backhaul-tcp, backhaul-tcp-lanes, backhaul, backhaul-lanes, backhaul-pass, backhaul-pass-full, backhaul-pass-shared, backhaul-tcp-shared, backhaul-pass-lanes, backhaul-pass-1t, backhaul-tcp-1t, quinn)" ;;
    esac
    answer="$(curl -fsS ${HEADER[$way]:+-H "${HEADER[$way]}"} "${URL[$way]}")"
    [[ "$answer" == "hello from the backend" ]] || fail "$way answered '$answer'"
done

# --- measurement --------------------------------------------------------------------------

cpu_ticks() { # pid: utime + stime in clock ticks
    [[ -n "${1:-}" ]] || {
        echo 0
        return
    }
    awk '{ print $14 + $15 }' "/proc/$1/stat"
}

# The ceiling's client prints "requests/s p50_ms p99_ms requests"; this puts it in wrk's
# words for the parsing below. Its CPU is the load generator's, not counted (as wrk's).
run_ceiling() { # seconds
    local rps p50 p99 requests
    read -r rps p50 p99 requests < <("$CEILING" client "${URL[quinn]}" "$WORK/ceiling-cert.pem" \
        "$CONNECTIONS" "$1")
    printf 'Requests/sec: %s\n50%% %sms\n99%% %sms\n%s requests in %ss\n' \
        "$rps" "$p50" "$p99" "$requests" "$1"
}

# The machine's idle and total CPU ticks (all cores), to tell a run the cores bound from one
# that left them idle (latency-bound: the tunnel waits on something other than CPU).
machine_ticks() {
    awk '/^cpu / { print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; exit }' /proc/stat
}

RESULTS="$WORK/results.tsv"
: >"$RESULTS"
run_wrk() { # way round
    local way="$1" round="$2" out="$WORK/wrk-$1-$2.txt"
    local header=()
    [[ -n "${HEADER[$way]:-}" ]] && header=(-H "${HEADER[$way]}")
    local public_before private_before
    public_before="$(cpu_ticks "${PUBLIC_PID[$way]:-}")"
    private_before="$(cpu_ticks "${PRIVATE_PID[$way]:-}")"
    local idle_before total_before backend_before
    read -r idle_before total_before < <(machine_ticks)
    backend_before="$(cpu_ticks "$BACKEND_PID")"
    if [[ "$way" == quinn ]]; then
        run_ceiling "${DURATION%s}" >"$out"
    else
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "${header[@]}" "${URL[$way]}" >"$out"
    fi
    local public_after private_after
    public_after="$(cpu_ticks "${PUBLIC_PID[$way]:-}")"
    private_after="$(cpu_ticks "${PRIVATE_PID[$way]:-}")"
    local idle_after total_after backend_after
    read -r idle_after total_after < <(machine_ticks)
    backend_after="$(cpu_ticks "$BACKEND_PID")"
    if grep -qE 'Non-2xx|Socket errors' "$out"; then
        cat "$out" >&2
        fail "$way: errors during the run"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$way" "$round" \
        "$(awk '/^Requests\/sec:/ { print $2 }' "$out")" \
        "$(awk '$1 == "50%" { print $2; exit }' "$out")" \
        "$(awk '$1 == "99%" { print $2; exit }' "$out")" \
        "$(awk '/requests in/ { print $1; exit }' "$out")" \
        "$((public_after - public_before))" "$((private_after - private_before))" \
        "$(((idle_after - idle_before) * 1000 / (total_after - total_before + 1)))" \
        "$((total_after - total_before - idle_after + idle_before))" \
        "$((backend_after - backend_before))" >>"$RESULTS"
}

say "warming up"
for way in $WAYS; do
    if [[ "$way" == quinn ]]; then
        run_ceiling 2 >/dev/null
        continue
    fi
    header=()
    [[ -n "${HEADER[$way]:-}" ]] && header=(-H "${HEADER[$way]}")
    wrk -t"$THREADS" -c"$CONNECTIONS" -d2s "${header[@]}" "${URL[$way]}" >/dev/null
done
for round in $(seq "$ROUNDS"); do
    for way in $WAYS; do
        say "round $round/$ROUNDS: $way"
        run_wrk "$way" "$round"
    done
done

echo
echo "backhaul compare ($(date -u +%Y-%m-%d), $(nproc) cores, git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION, GET / (23-byte body), $ROUNDS interleaved rounds, medians; all on 127.0.0.1"
python3 - "$RESULTS" "$(getconf CLK_TCK)" <<'EOF'
import statistics, sys

path, ticks_per_s = sys.argv[1], int(sys.argv[2])

def ms(value):
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    for unit in ("us", "ms", "s"):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * units[unit]
    return float(value)

ways, rows = [], {}
for line in open(path):
    way, _round, rps, p50, p99, requests, public, private, idle, busy, backend = line.split("\t")
    if way not in rows:
        ways.append(way)
        rows[way] = []
    per_request = lambda ticks: int(ticks) * 1e6 / ticks_per_s / max(int(requests), 1)
    rows[way].append((float(rps), ms(p50), ms(p99), per_request(public), per_request(private), int(idle) / 10,
                       per_request(busy), per_request(backend)))

def median(way, index):
    return statistics.median(row[index] for row in rows[way])

base = "rathole" if "rathole" in rows else None
def round_spread(way):
    """The lowest and highest of each round's ratio to rathole in that same round."""
    pairs = [row[0] / rows[base][i][0] for i, row in enumerate(rows[way]) if i < len(rows[base])]
    return f"{min(pairs):.2f}-{max(pairs):.2f}" if pairs else ""

print(f"{'way':<20} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU µs/req public':>18} {'private':>8} {'vs rathole':>10} {'rounds':>9} {'idle %':>6} {'backend':>7} {'machine':>7}")
for way in ways:
    rps = median(way, 0)
    cpu = (
        "" if way in ("direct", "quinn") else f"{median(way, 3):.1f}",
        "" if way == "direct" else f"{median(way, 4):.1f}",
    )
    ratio = f"{rps / median(base, 0):.2f}x" if base else ""
    spread = round_spread(way) if base else ""
    print(f"{way:<20} {rps:>9.0f} {median(way, 1):>7.2f} {median(way, 2):>7.2f} {cpu[0]:>18} {cpu[1]:>8} {ratio:>10} {spread:>9} {median(way, 5):>6.1f} {median(way, 7):>7.1f} {median(way, 6):>7.1f}")
print("public = relay / server process, private = edge / client process (CPU time over the run / requests);")
print("rounds = the lowest and highest ratio to rathole of single rounds (each against rathole's same round)")
print("backend = the backend's CPU µs/req; machine = all the cores' busy time / requests (wrk and the kernel included)")
print("idle = the machine's idle CPU share over the run (all cores): near 0, the cores bound the rate")
print("quinn = HTTP/1 over raw quinn streams between two processes (the relay-edge hop's ceiling), private = its server")
EOF
