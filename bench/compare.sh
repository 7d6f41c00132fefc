#!/usr/bin/env bash
# klingq and BullMQ side by side, in one run against the same (private) Redis:
#   (1) enqueue N no-op jobs: klingq's queue (`bench queue`, one batch) and its producer library
#       and HTTP API (`bench enqueue`) vs BullMQ's addBulk;
#   (2) process them with no-op handlers (queue overhead alone): `bench queue` vs a BullMQ Worker
#       at the concurrency that maximises its throughput (several tried, best reported).
# Prints both and the ratios klingq / BullMQ, ending with one JSON line.
#
# Usage: bench/compare.sh [--jobs N] [--klingq-concurrency 64,256] [--bullmq-concurrency 50,100,200,500]
# Env: KLINGQ_REDIS_URL to use an existing Redis instead of a private one.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/lib.sh"

jobs=100000
kq_conc="64,256"
bm_conc="50,100,200,500"
while [ $# -gt 0 ]; do
    case "$1" in
        --jobs) jobs="$2"; shift 2 ;;
        --klingq-concurrency) kq_conc="$2"; shift 2 ;;
        --bullmq-concurrency) bm_conc="$2"; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

bench_init "${BENCH_OUT:-$bench_root/bench/out/compare-$(date -u +%Y%m%dT%H%M%SZ)}"
[ -n "${KLINGQ_REDIS_URL:-}" ] || bench_start_redis
if [ ! -d "$here/bullmq/node_modules/bullmq" ]; then
    # npm 11 leaves some optional platform packages out of the lock file; `npm install` still
    # honours it and the exact pins in package.json.
    (cd "$here/bullmq" && { npm ci --no-audit --no-fund || npm install --no-audit --no-fund; } >&2)
fi
echo "compare: $jobs jobs; Redis $KLINGQ_REDIS_URL; load: $(uptime | sed 's/.*load average: //')" >&2

enqueue="$(bench_json "$bench_out/klingq-enqueue.log" "$bench_bin" bench enqueue --jobs "$jobs")"
queue_runs=()
for c in ${kq_conc//,/ }; do
    queue_runs+=("$(bench_json "$bench_out/klingq-queue-$c.log" "$bench_bin" bench queue --jobs "$jobs" --concurrency "$c")")
done
bullmq="$(bench_json "$bench_out/bullmq.log" node "$here/bullmq/bench.js" --jobs "$jobs" --concurrency "$bm_conc" --redis "$KLINGQ_REDIS_URL")"

python3 - "$enqueue" "$bullmq" "${queue_runs[@]}" <<'PY'
import json, sys
enqueue = json.loads(sys.argv[1])
bullmq = json.loads(sys.argv[2])
queues = [json.loads(a) for a in sys.argv[3:]]
best = max(queues, key=lambda q: q["process_jobs_per_s"])
best_enqueue = max(q["enqueue_jobs_per_s"] for q in queues)
rows = [
    ("enqueue, queue API (one batch)", best_enqueue, bullmq["enqueue_jobs_per_s"]),
    ("enqueue, producer library", enqueue["library_jobs_per_s"], bullmq["enqueue_jobs_per_s"]),
    ("enqueue, HTTP API (JSON Lines)", enqueue["http_jobs_per_s"], bullmq["enqueue_jobs_per_s"]),
    ("process no-op jobs", best["process_jobs_per_s"], bullmq["process_jobs_per_s"]),
]
print(f"{'jobs/s':34} {'klingq':>10} {'BullMQ':>10} {'klingq/BullMQ':>14}")
for name, k, b in rows:
    print(f"{name:34} {k:10.0f} {b:10.0f} {k / b:14.2f}")
print(f"klingq best concurrency {best['concurrency']}, BullMQ best concurrency {bullmq['best_concurrency']}")
print(f"Redis commands per job (enqueue + processing): klingq {best['redis_commands_per_job']:.1f}, BullMQ {bullmq['redis_commands_per_job']:.1f}")
print(json.dumps({
    "jobs": enqueue["jobs"],
    "klingq": {
        "enqueue_jobs_per_s": best_enqueue,
        "library_enqueue_jobs_per_s": enqueue["library_jobs_per_s"],
        "http_enqueue_jobs_per_s": enqueue["http_jobs_per_s"],
        "process_jobs_per_s": best["process_jobs_per_s"],
        "best_concurrency": best["concurrency"],
        "redis_commands_per_job": best["redis_commands_per_job"],
    },
    "bullmq": {k: bullmq[k] for k in ("bullmq_version", "enqueue_jobs_per_s", "process_jobs_per_s", "best_concurrency", "redis_commands_per_job")},
    "ratios": {
        "enqueue": best_enqueue / bullmq["enqueue_jobs_per_s"],
        "library_enqueue": enqueue["library_jobs_per_s"] / bullmq["enqueue_jobs_per_s"],
        "http_enqueue": enqueue["http_jobs_per_s"] / bullmq["enqueue_jobs_per_s"],
        "process": best["process_jobs_per_s"] / bullmq["process_jobs_per_s"],
    },
}))
PY
