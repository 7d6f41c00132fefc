#!/usr/bin/env bash
# Tests the dashboard in headless Chromium against a live `klingq demo`.
#
# Installs Debian's `chromium` when /usr/bin/chromium is missing (apt-get; needs root), installs
# the pinned playwright-core from tests/browser/package-lock.json (`npm ci`, npm registry only;
# no browser download: the test drives the system Chromium), builds `klingq` (debug) unless
# KLINGQ_BIN is given, and runs tests/browser/dashboard.test.mjs. The test starts its own demo
# on a free port in a fresh namespace of the local Redis, and deletes the namespace's keys at
# the end. Screenshots land in tests/browser/artifacts/. Idempotent; exits non-zero on failure.
#
# Environment:
#   KLINGQ_REDIS_URL   Redis to use (default redis://127.0.0.1:6379; must answer)
#   KLINGQ_BIN         a built klingq binary (default: cargo build -p klingq)
#   CHROMIUM           the browser (default /usr/bin/chromium)
set -euo pipefail

workspace="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
browser_dir="$workspace/tests/browser"
chromium="${CHROMIUM:-/usr/bin/chromium}"

log() { printf '%s\n' "$*" >&2; }

if [ ! -x "$chromium" ]; then
    log "installing Debian's chromium"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
"$chromium" --version >&2 2>/dev/null || true

# Playwright must never fetch its own browsers.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
(
    cd "$browser_dir"
    lock_hash="$(sha256sum package-lock.json | cut -d' ' -f1)"
    if [ ! -f node_modules/.klingq-lock-hash ] \
        || [ "$(cat node_modules/.klingq-lock-hash)" != "$lock_hash" ]; then
        log "installing the browser test's node modules (npm ci)"
        npm ci --no-audit --no-fund --loglevel=error
        echo "$lock_hash" >node_modules/.klingq-lock-hash
    fi
)

if [ -z "${KLINGQ_BIN:-}" ]; then
    log "building klingq"
    (cd "$workspace" && cargo build --quiet -p klingq)
    export KLINGQ_BIN="$workspace/target/debug/klingq"
fi

redis_url="${KLINGQ_REDIS_URL:-redis://127.0.0.1:6379}"
if command -v redis-cli >/dev/null 2>&1 && ! redis-cli -u "$redis_url" ping >/dev/null 2>&1; then
    log "Redis does not answer at $redis_url: start one (redis-server --daemonize yes)"
    exit 1
fi

cd "$browser_dir"
CHROMIUM="$chromium" KLINGQ_REDIS_URL="$redis_url" node dashboard.test.mjs
