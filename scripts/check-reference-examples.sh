#!/usr/bin/env bash
# Builds and runs the quic-reverse crate's own `edge` and `relay` examples against backhaul.
#
# The examples are the API yardstick: with `quic_reverse` renamed to `backhaul` (and
# `quic_reverse_transport::` paths pointed at backhaul's root) they must build and run
# against this crate. They are not ours to copy into the project, so this script copies them
# from ../shared/reference/quic-reverse-examples into a throwaway crate under a temp dir,
# rewrites the crate names with sed, builds both, runs relay + edge on 127.0.0.1, and checks
# the relay's log for the echo reply and the rejection of 'foobar', and that the edge exits 0.
#
# Usage: scripts/check-reference-examples.sh
# Env:   REFERENCE_EXAMPLES   examples directory (default: <repo>/../shared/reference/quic-reverse-examples)
#        CHECK_TARGET_DIR     cargo target dir (default: $CARGO_TARGET_DIR, else <repo>/target,
#                             to reuse compiled deps)
#        KEEP_TMP=1           keep the temp dir (its path is printed) for inspection
#        STRICT_CLOSE=1       also require the edge to report the relay's close
#        VERBOSE=1            print both logs on success too
# Exit:  0 pass, 1 failure, 2 examples directory missing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXAMPLES="${REFERENCE_EXAMPLES:-$REPO/../shared/reference/quic-reverse-examples}"
TARGET_DIR="${CHECK_TARGET_DIR:-${CARGO_TARGET_DIR:-$REPO/target}}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-900}"
RUN_TIMEOUT="${RUN_TIMEOUT:-60}"

say() { printf 'check-reference-examples: %s\n' "$*" >&2; }
fail() {
    say "FAIL: $*"
    exit 1
}

for file in edge.rs relay.rs common/mod.rs; do
    if [[ ! -f "$EXAMPLES/$file" ]]; then
        say "reference examples not found: $EXAMPLES/$file is missing"
        say "(expected the quic-reverse examples at ../shared/reference/quic-reverse-examples relative to the repo)"
        exit 2
    fi
done
command -v cargo >/dev/null || fail "cargo not found"

# Run from `cargo test`, this script inherits the variables cargo sets for a test binary
# (CARGO_MANIFEST_DIR, CARGO_PKG_*...). Build scripts in the shared target dir track some of
# them (ring's tracks CARGO_MANIFEST_DIR), so passing them on would make the nested build, and
# then every ordinary build after it, rebuild ring and everything above it.
while IFS= read -r var; do
    case "$var" in
    CARGO_MANIFEST_DIR | CARGO_MANIFEST_PATH | CARGO_PKG_* | CARGO_CRATE_NAME | CARGO_BIN_NAME | \
        CARGO_BIN_EXE_* | CARGO_TARGET_TMPDIR | CARGO_PRIMARY_PACKAGE | CARGO_RUSTC_CURRENT_DIR | OUT_DIR)
        unset "$var"
        ;;
    esac
done < <(compgen -e)

WORK="$(mktemp -d "${TMPDIR:-/tmp}/backhaul-reference-examples.XXXXXX")"
RELAY_PID=""
EDGE_PID=""
cleanup() {
    local status=$?
    for pid in "$EDGE_PID" "$RELAY_PID"; do
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    if [[ "${KEEP_TMP:-0}" == 1 ]]; then
        say "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ----- the throwaway crate ------------------------------------------------------------------
CRATE="$WORK/crate"
mkdir -p "$CRATE/examples/common" "$CRATE/src"
cp "$EXAMPLES/edge.rs" "$EXAMPLES/relay.rs" "$CRATE/examples/"
cp "$EXAMPLES/common/mod.rs" "$CRATE/examples/common/"
sed -i -e 's/quic_reverse_transport::/backhaul::/g' -e 's/quic_reverse/backhaul/g' \
    "$CRATE/examples/edge.rs" "$CRATE/examples/relay.rs" "$CRATE/examples/common/mod.rs"
if grep -n 'quic_reverse' "$CRATE"/examples/*.rs "$CRATE"/examples/common/mod.rs; then
    fail "quic_reverse names left after the rewrite"
fi
: >"$CRATE/src/lib.rs"

# Distinct example names, so the binaries never overwrite examples of the repo itself in the
# shared target dir. Dependencies and profiles mirror what `cargo test` builds backhaul with
# (its dev-dependencies, its profiles), so that every dependency compiled for the tests is
# reused here: only backhaul and the two examples are compiled again. Otherwise, on a clean
# target dir, other features and profiles rebuild the whole dependency tree (95 s in CI).
# section NAME: the lines of Cargo.toml's [NAME] section, header and comments excluded.
section() {
    awk -v header="[$1]" '
        /^\[/ { inside = ($0 == header); next }
        inside && NF && !/^#/ { print }
    ' "$REPO/Cargo.toml"
}
# profiles: every [profile...] section of Cargo.toml, headers included.
profiles() {
    awk '
        /^\[/ { inside = ($0 ~ /^\[profile/) }
        inside { print }
    ' "$REPO/Cargo.toml"
}
{
    cat <<EOF
[package]
name = "backhaul-reference-examples"
version = "0.0.0"
edition = "2021"
publish = false
autoexamples = false

[dependencies]
backhaul = { path = "$REPO", features = ["redis"] }
EOF
    # backhaul's dev-dependencies (its own line is the one above), and the normal ones the
    # examples use, as backhaul declares them.
    section dev-dependencies | grep -v '^backhaul *='
    section dependencies | grep -E '^(rustls|tracing) *=' | sed 's/, *optional *= *true//'
    cat <<EOF

[[example]]
name = "reference-edge"
path = "examples/edge.rs"

[[example]]
name = "reference-relay"
path = "examples/relay.rs"

[workspace]

EOF
    profiles
    # backhaul is a workspace member there and a dependency here: build it alike.
    printf '\n[profile.dev.package.backhaul]\nopt-level = 0\n'
} >"$CRATE/Cargo.toml"
# The repo's lock pins the same dependency versions backhaul is tested with.
cp "$REPO/Cargo.lock" "$CRATE/Cargo.lock"

# ----- build --------------------------------------------------------------------------------
say "building the reference examples against backhaul ($REPO) in $TARGET_DIR"
build_started=$SECONDS
if ! CARGO_TARGET_DIR="$TARGET_DIR" timeout "$BUILD_TIMEOUT" \
    cargo build --quiet --manifest-path "$CRATE/Cargo.toml" --examples 2>"$WORK/build.log"; then
    cat "$WORK/build.log" >&2
    fail "the reference examples do not build against backhaul (compiler output above)"
fi
if [[ -s "$WORK/build.log" ]]; then
    cat "$WORK/build.log" >&2
fi
say "built in $((SECONDS - build_started)) s"
BIN="$TARGET_DIR/debug/examples"
[[ -x "$BIN/reference-relay" && -x "$BIN/reference-edge" ]] || fail "example binaries missing in $BIN"

# ----- run ----------------------------------------------------------------------------------
# The relay writes its certificate to $TMPDIR/quic-reverse-relay.der and the edge reads it
# from there: a private TMPDIR keeps parallel runs apart.
RUN="$WORK/run"
mkdir -p "$RUN"
export NO_COLOR=1

port_in_use() { ss -Huln "sport = :$1" 2>/dev/null | grep -q .; }

start_relay() {
    local port=$1
    rm -f "$RUN/quic-reverse-relay.der"
    TMPDIR="$RUN" timeout "$RUN_TIMEOUT" "$BIN/reference-relay" "127.0.0.1:$port" \
        >"$WORK/relay.log" 2>&1 &
    RELAY_PID=$!
    local waited=0
    while [[ ! -s "$RUN/quic-reverse-relay.der" ]]; do
        if ! kill -0 "$RELAY_PID" 2>/dev/null; then
            wait "$RELAY_PID" 2>/dev/null || true
            RELAY_PID=""
            return 1
        fi
        sleep 0.1
        waited=$((waited + 1))
        if ((waited > 300)); then
            cat "$WORK/relay.log" >&2
            fail "the relay did not write its certificate within 30 s"
        fi
    done
}

PORT=""
for _ in $(seq 1 20); do
    candidate=$((20000 + RANDOM % 40000))
    port_in_use "$candidate" && continue
    if start_relay "$candidate"; then
        PORT=$candidate
        break
    fi
done
[[ -n "$PORT" ]] || { cat "$WORK/relay.log" >&2; fail "could not start the relay on a free port"; }
say "relay listening on 127.0.0.1:$PORT"

run_started=$SECONDS
edge_status=0
TMPDIR="$RUN" timeout "$RUN_TIMEOUT" "$BIN/reference-edge" "127.0.0.1:$PORT" \
    >"$WORK/edge.log" 2>&1 &
EDGE_PID=$!
wait "$EDGE_PID" || edge_status=$?
EDGE_PID=""
say "edge finished in $((SECONDS - run_started)) s with status $edge_status"

# The relay serves forever; give its last log lines a moment, then stop it.
sleep 0.5
kill "$RELAY_PID" 2>/dev/null || true
wait "$RELAY_PID" 2>/dev/null || true
RELAY_PID=""

strip() { sed -e 's/\x1b\[[0-9;]*m//g' "$1"; }
strip "$WORK/relay.log" >"$WORK/relay.txt"
strip "$WORK/edge.log" >"$WORK/edge.txt"

show_logs() {
    say "----- relay log -----"
    cat "$WORK/relay.txt" >&2
    say "----- edge log -----"
    cat "$WORK/edge.txt" >&2
}

problems=()
((edge_status == 0)) || problems+=("the edge exited with status $edge_status (124 = timed out)")
expect_relay() {
    grep -qF -- "$1" "$WORK/relay.txt" || problems+=("relay log lacks: $1")
}
expect_edge() {
    grep -qF -- "$1" "$WORK/edge.txt" || problems+=("edge log lacks: $1")
}
grep -qE 'Received timestamp from edge: [0-9]+' "$WORK/relay.txt" ||
    problems+=("relay log lacks a timestamp from the 'time' service")
expect_relay 'Echo response: "Hello from the relay!"'
expect_relay "Service 'foobar' rejected as expected"
expect_relay 'unknown service: foobar'
expect_relay 'Edge session complete'
expect_edge 'Session established with relay (agent: Some("relay/1.0"))'
expect_relay 'Session established with edge (agent: Some("edge/1.0"))'
expect_edge "Unknown service requested: foobar"
# Not required unless STRICT_CLOSE=1: the relay example drops its connection right after
# close(), and quinn discards stream data not yet sent, so the edge can miss the close. With
# quic-reverse on both sides that happens in about 1 run in 10; tests/interop.rs checks the
# delivery of closes deterministically.
if ! grep -qF 'Relay closed session: Normal (Demo complete)' "$WORK/edge.txt"; then
    if [[ "${STRICT_CLOSE:-0}" == 1 ]]; then
        problems+=("edge log lacks: Relay closed session: Normal (Demo complete)")
    else
        say "note: the edge did not report the relay's close this time (STRICT_CLOSE=1 makes this fail)"
    fi
fi
expect_edge 'Edge device disconnected'
if grep -qE 'Failed to open|Unexpectedly succeeded|Edge connection error' "$WORK/relay.txt"; then
    problems+=("relay log reports an error")
fi

if ((${#problems[@]} > 0)); then
    show_logs
    for problem in "${problems[@]}"; do
        say "problem: $problem"
    done
    fail "the reference examples did not run correctly against backhaul"
fi
if [[ "${VERBOSE:-0}" == 1 ]]; then
    show_logs
fi
say "PASS: reference edge and relay built and ran against backhaul (run took $((SECONDS - run_started)) s)"
