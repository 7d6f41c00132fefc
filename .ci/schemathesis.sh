#!/usr/bin/env bash
# Fuzzes the HTTP API against its own OpenAPI document with Schemathesis.
#
# Installs the pinned Schemathesis from PyPI into <workspace>/.tools/schemathesis (a venv;
# idempotent, safe to run concurrently), builds `klingq`, starts `klingq serve` on a free
# loopback port with a fresh bearer token against the local Redis in a fresh namespace, runs
# `schemathesis run` with every check, then stops the server and deletes the namespace's keys.
# Exits non-zero when Schemathesis finds a failure.
#
# Every check includes both directions: data the document says is valid must be accepted
# (positive_data_acceptance) and data it says is invalid must be refused
# (negative_data_rejection), and every status must be documented. The document states the
# parsers' rules (crates/producer/src/api/openapi/input_schema.rs): `oneOf` for `prompt` vs
# `multi_prompt`, every combination of shot durations adding up to at most 15 s, at most one
# video element (`maxContains`), the event cursor for the server's partition count. Where a
# rule cannot be said exactly (a URL's host as the WHATWG parser reads it, a data: URI's
# non-ASCII characters) the schema states a stricter form, and metadata's 16 KB cap is only
# described; where a rule ties a header or query
# parameter to the body (`Idempotency-Key` on POST /v1/jobs, a batch's query-string options),
# that parameter is described in prose only.
#
# Environment:
#   KLINGQ_TEST_REDIS_URL        Redis to use (default redis://127.0.0.1:6379)
#   KLINGQ_BIN                   a built klingq binary (default: cargo build -p klingq)
#   SCHEMATHESIS_MAX_EXAMPLES    examples per operation (default 40)
#   SCHEMATHESIS_TOOLS_DIR       install directory (default <workspace>/.tools/schemathesis)
#   PYTHON                       interpreter for the venv (default python3)
set -euo pipefail

version="4.32.5"

workspace="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_dir="${SCHEMATHESIS_TOOLS_DIR:-$workspace/.tools/schemathesis}"
venv="$tools_dir/venv"
st="$venv/bin/schemathesis"
marker="$tools_dir/installed-$version"
python="${PYTHON:-python3}"

log() { printf '%s\n' "$*" >&2; }

install() {
    mkdir -p "$tools_dir"
    exec 9>"$tools_dir/.lock"
    flock 9
    if [ -f "$marker" ] && [ -x "$st" ]; then
        return
    fi
    log "installing schemathesis $version into $venv"
    rm -rf "$venv" "$tools_dir"/installed-*
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
    "$st" --version >&2
    touch "$marker"
}

install

redis_url="${KLINGQ_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
if [ -z "${KLINGQ_BIN:-}" ]; then
    log "building klingq"
    (cd "$workspace" && cargo build --quiet -p klingq)
    KLINGQ_BIN="$workspace/target/debug/klingq"
fi

port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
namespace="schemathesis-$$-$(date +%s)"
token="st-$("$python" -c 'import secrets; print(secrets.token_hex(16))')"
work="$(mktemp -d)"
server_pid=""

cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if command -v redis-cli >/dev/null 2>&1; then
        redis-cli -u "$redis_url" --scan --pattern "{$namespace}:*" 2>/dev/null \
            | xargs -r -n 500 redis-cli -u "$redis_url" del >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

log "starting klingq serve on 127.0.0.1:$port (namespace $namespace)"
KLINGQ_REDIS_URL="$redis_url" \
    KLINGQ_NAMESPACE="$namespace" \
    KLINGQ_API_TOKENS="$token" \
    KLINGQ_API_EVENTS_STREAM_MAX_SECS=1 \
    RUST_LOG="${RUST_LOG:-warn}" \
    "$KLINGQ_BIN" serve --bind "127.0.0.1:$port" >"$work/server.log" 2>&1 &
server_pid=$!

for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        log "klingq serve exited:"
        cat "$work/server.log" >&2
        exit 1
    fi
    sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null

status=0
(
    cd "$work"
    "$st" --no-color run "http://127.0.0.1:$port/openapi.json" \
        --header "Authorization: Bearer $token" \
        --checks all \
        --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-40}" \
        --request-timeout 10 \
        --seed "${SCHEMATHESIS_SEED:-$RANDOM}"
) || status=$?

if [ "$status" -ne 0 ]; then
    log "schemathesis found failures; server log:"
    tail -n 50 "$work/server.log" >&2
fi
exit "$status"
