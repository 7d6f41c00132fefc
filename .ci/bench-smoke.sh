#!/usr/bin/env bash
# Runs every benchmark at a tiny size (200 jobs, 1 MB, 50 in flight, BullMQ 200 jobs) just to
# check that they run. Benchmarks are not tests: no figures are asserted.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TERM_COLOR=never
# CI checks behaviour, not speed: the debug binary `cargo test` already built will do.
cargo build --locked -p klingq
export KLINGQ_BIN="${KLINGQ_BIN:-$PWD/target/debug/klingq}"
if [ ! -d bench/bullmq/node_modules/bullmq ]; then
    # npm 11 leaves some of msgpackr's optional platform packages out of the lock file, which
    # `npm ci` then refuses; the versions are pinned exactly in package.json either way.
    (cd bench/bullmq && { npm ci --no-audit --no-fund || npm install --no-audit --no-fund; })
fi
mkdir -p bench/out
bench_dir="bench/out/smoke-$(date -u +%Y%m%dT%H%M%SZ)"
BENCH_OUT="$PWD/$bench_dir" bash bench/run-all.sh --smoke >"$bench_dir.json" 2>"$bench_dir.log" || {
    status=$?
    tail -n 60 "$bench_dir.log" >&2
    exit $status
}
python3 -c 'import json,sys;json.load(open(sys.argv[1]));print("bench smoke: every benchmark ran")' "$bench_dir.json"
