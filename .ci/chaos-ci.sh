#!/usr/bin/env bash
# The chaos run at CI size (150 jobs): worker SIGKILLs every 10 s, one Redis connection drop,
# 30 s of unreachable S3, provider faults. Fails when a job is lost, paid twice, stored with the
# wrong bytes, failed for a transient reason, or its webhook never arrived.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TERM_COLOR=never
# CI checks behaviour, not speed: the debug binary `cargo test` already built will do.
cargo build --locked -p klingq
export KLINGQ_BIN="${KLINGQ_BIN:-$PWD/target/debug/klingq}"
exec bash tests/chaos/run.sh --jobs 150 --batch-size 50 --timeout 420
