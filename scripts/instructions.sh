#!/usr/bin/env bash
# The relay's instructions per proxied HTTP request, counted by valgrind's callgrind: one
# keep-alive client sends plain GETs one after another through the express lane to a
# pass-through edge, and the count covers the whole relay process (the lane, quinn, tokio,
# libc) between the first request and the last.
#
# For changes too small for wall-clock measures on a shared machine: the count repeats to
# within a few instructions run after run, where requests/s and CPU time per request
# spread by several percent. One request at a time is not the load of `compare.sh` (no
# batching: quinn's share per request is larger), so read differences, not totals.
#
# Usage: scripts/instructions.sh [binary] [requests]
#        (default: target/release/examples/http_reverse_proxy, 3000 requests)
# Needs: valgrind (Debian `valgrind`), curl, python3, and the load backend that
#        `scripts/compare.sh` builds (run it once).
# Example, a change against the build before it:
#   cp target/release/examples/http_reverse_proxy /tmp/before   # then change and rebuild
#   scripts/instructions.sh /tmp/before; scripts/instructions.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${COMPARE_TARGET_DIR:-$REPO/target}"
PROXY="${1:-$TARGET_DIR/release/examples/http_reverse_proxy}"
REQUESTS="${2:-3000}"
BACKEND="$TARGET_DIR/release/backhaul-load-backend"

fail() { printf 'instructions: %s\n' "$*" >&2; exit 1; }
for tool in valgrind callgrind_control curl python3; do
    command -v "$tool" >/dev/null || { printf 'instructions: needs %s\n' "$tool" >&2; exit 2; }
done
[[ -x "$PROXY" ]] || fail "no proxy binary at $PROXY"
[[ -x "$BACKEND" ]] || fail "no load backend at $BACKEND: run scripts/compare.sh once"

WORK="$(mktemp -d /tmp/backhaul-instructions.XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

free_port() { # tcp|udp
    python3 -c "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_STREAM if sys.argv[1]=='tcp' else socket.SOCK_DGRAM); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])" "$1"
}
wait_for() { # description command...
    local description="$1"
    shift
    for _ in $(seq 120); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    fail "$description"
}

BACKEND_PORT="$(free_port tcp)"
QUIC_PORT="$(free_port udp)"
PUBLIC_PORT="$(free_port tcp)"
ADMIN_PORT="$(free_port tcp)"
HOST="bench.localhost:$PUBLIC_PORT"

"$BACKEND" "127.0.0.1:$BACKEND_PORT" >"$WORK/backend.log" 2>&1 &
PIDS+=($!)
# One thread, so that the count is the same whichever shard would have taken the edge.
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out" \
    "$PROXY" --worker-threads 1 relay --quic-listen "127.0.0.1:$QUIC_PORT" \
    --http-listen "127.0.0.1:$PUBLIC_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
    --cert-out "$WORK/cert.pem" --edge-token bench=instructions >"$WORK/relay.log" 2>&1 &
RELAY=$!
PIDS+=("$RELAY")
wait_for "the relay wrote no certificate: $(tail -3 "$WORK/relay.log")" test -s "$WORK/cert.pem"
RUST_LOG=warn "$PROXY" edge --relay "127.0.0.1:$QUIC_PORT" --relay-cert "$WORK/cert.pem" \
    --name bench --token instructions --expose "web=http://127.0.0.1:$BACKEND_PORT" \
    --pass-through web >"$WORK/edge.log" 2>&1 &
PIDS+=($!)
wait_for "no answer through the tunnel: $(tail -3 "$WORK/edge.log")" \
    curl -fsS -H "Host: $HOST" "http://127.0.0.1:$PUBLIC_PORT/"

# One keep-alive connection, `count` GETs one after another, each answer read whole.
cat >"$WORK/client.py" <<'EOF'
import socket, sys
port, host, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
connection = socket.create_connection(("127.0.0.1", port))
request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
for _ in range(count):
    connection.sendall(request)
    answer = b""
    while not answer.endswith(b"hello from the backend\n"):
        chunk = connection.recv(4096)
        if not chunk:
            sys.exit("the relay closed the connection")
        answer += chunk
EOF
# Warm up (streams open, pool filled), then count from zero.
python3 "$WORK/client.py" "$PUBLIC_PORT" "$HOST" 200
callgrind_control --zero "$RELAY" >/dev/null
python3 "$WORK/client.py" "$PUBLIC_PORT" "$HOST" "$REQUESTS"
callgrind_control --dump "$RELAY" >/dev/null
DUMP="$(ls -t "$WORK"/callgrind.out.* | head -1)"
TOTAL="$(awk '/^totals:/ { print $2; exit }' "$DUMP")"
[[ -n "$TOTAL" ]] || fail "no totals in $DUMP"
echo "relay instructions per request: $((TOTAL / REQUESTS)) ($REQUESTS requests, $PROXY)"
echo "per function: callgrind_annotate --auto=no $DUMP"
trap - EXIT
cleanup
