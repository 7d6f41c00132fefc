#!/usr/bin/env bash
# Runs every klingq benchmark against a private Redis and SeaweedFS, then the side-by-side with
# BullMQ (bench/compare.sh), and ends with one JSON line of all figures.
#
#   enqueue    `klingq bench enqueue`: one batch through the producer library and the HTTP API
#   queue      `klingq bench queue` at backlogs of 1k and N (queue overhead alone; must stay flat)
#   pipeline   `klingq bench pipeline`: the real worker, simulator at zero latency, tiny videos, S3
#   inflight   `klingq bench inflight`: jobs in flight in one worker against a slow simulator
#   rehost     `klingq bench rehost` (vs a plain streamed download) and `curl | curl -T -` into
#              the same S3 store as a second ceiling
#   compare    bench/compare.sh (BullMQ)
#
# Usage: bench/run-all.sh [--smoke] [--jobs N] [--pipeline-jobs N] [--inflight N] [--sizes 1,50,500]
#   --smoke: tiny sizes (200 jobs, 1 MB, 50 in flight, BullMQ 200 jobs), to check they run.
# Logs: bench/out/<time>/ (gitignored).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/lib.sh"

jobs=100000
pipeline_jobs=100000
inflight=10000
inflight_secs=20
sizes="1,50,500"
small_backlog=1000
bm_conc="50,100,200,500"
kq_conc="64,256"
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) jobs=200; pipeline_jobs=200; inflight=50; inflight_secs=2; sizes=1; small_backlog=100
                 bm_conc=50; kq_conc=64; shift ;;
        --jobs) jobs="$2"; shift 2 ;;
        --pipeline-jobs) pipeline_jobs="$2"; shift 2 ;;
        --inflight) inflight="$2"; shift 2 ;;
        --sizes) sizes="$2"; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

bench_init "${BENCH_OUT:-$bench_root/bench/out/$(date -u +%Y%m%dT%H%M%SZ)}"
bench_start_redis
bench_start_s3
out="$bench_out"
{
    echo "machine: $(nproc) CPUs; $(free -h | awk '/^Mem:/ {print $2 " RAM"}'); $(redis-server --version | cut -d' ' -f1-3)"
    echo "$(rustc --version 2>/dev/null || echo rustc: n/a); node $(node --version 2>/dev/null || echo n/a); load: $(uptime | sed 's/.*load average: //')"
} | tee "$out/machine.txt" >&2

step() { printf '\n==> %s\n' "$*" >&2; }

step "enqueue: $jobs jobs"
enqueue="$(bench_json "$out/enqueue.log" "$bench_bin" bench enqueue --jobs "$jobs")"

step "queue overhead: backlog $small_backlog and $jobs"
queue_small="$(bench_json "$out/queue-small.log" "$bench_bin" bench queue --jobs "$small_backlog")"
queue_large="$(bench_json "$out/queue-large.log" "$bench_bin" bench queue --jobs "$jobs")"

step "pipeline: $pipeline_jobs jobs through the real worker, simulator and S3"
pipeline="$(bench_json "$out/pipeline.log" "$bench_bin" bench pipeline --jobs "$pipeline_jobs")"

step "in flight: $inflight jobs"
inflight_json="$(bench_json "$out/inflight.log" "$bench_bin" bench inflight --jobs "$inflight" --seconds "$inflight_secs")"

step "re-host: $sizes MB"
rehost="$(bench_json "$out/rehost.log" "$bench_bin" bench rehost --size-mb "$sizes")"

# `curl | curl -T -`: the simulator's bytes streamed into the same S3 store by curl.
curl_results=()
for size in ${sizes//,/ }; do
    port="$(bench_free_ports 1)"
    "$bench_bin" sim --port "$port" --time-scale 0.001 --video-bytes-per-second $((size * 1000000 / 5)) \
        >"$out/curl-sim-$size.log" 2>&1 &
    sim_pid=$!
    bench_pids+=("$sim_pid")
    sim="http://127.0.0.1:$port"
    for _ in $(seq 1 100); do curl -sf "$sim/v1/health" >/dev/null && break; sleep 0.1; done
    run_id="$(curl -sf -X POST "$sim/v1/models/kuaishou/kling-video/v3/pro/image-to-video/runs" \
        -H 'authorization: Bearer bench' -H 'content-type: application/json' \
        -d '{"input":{"prompt":"bench","start_image_url":"https://example.com/a.png"}}' |
        python3 -c 'import json,sys;print(json.load(sys.stdin)["id"])')"
    url=""
    for _ in $(seq 1 600); do
        url="$(curl -sf -H 'authorization: Bearer bench' "$sim/v1/runs/$run_id" | python3 -c '
import json,sys
r=json.load(sys.stdin)
if r.get("status_code")=="succeeded":
    o=r.get("output") or {}
    print((o.get("video") or {}).get("url") or o["outputs"][0]["url"])')"
        [ -n "$url" ] && break
        sleep 0.1
    done
    start=$(date +%s.%N)
    /usr/bin/time -f '%M' -o "$out/curl-$size.rss" bash -c "curl -sf '$url' | curl -sf -T - \
        --aws-sigv4 'aws:amz:us-east-1:s3' --user test:testtesttest '$bench_s3_url/klingq-bench/curl-$size.mp4' >/dev/null"
    end=$(date +%s.%N)
    curl_results+=("$(python3 -c 'import json,sys;s=float(sys.argv[2])-float(sys.argv[1]);mb=int(sys.argv[3]);print(json.dumps({"size_mb":mb,"seconds":s,"mb_per_s":mb/s,"peak_rss_mib":int(open(sys.argv[4]).read().split()[-1])/1024}))' \
        "$start" "$end" "$size" "$out/curl-$size.rss")")
    echo "curl | curl -T -: ${curl_results[-1]}" >&2
    kill "$sim_pid" 2>/dev/null || true
done
curl_json="[$(IFS=,; echo "${curl_results[*]}")]"

step "side by side with BullMQ"
compare="$(BENCH_OUT="$out/compare" bench_json "$out/compare.log" bash "$here/compare.sh" --jobs "$jobs" \
    --bullmq-concurrency "$bm_conc" --klingq-concurrency "$kq_conc")"

python3 - "$enqueue" "$queue_small" "$queue_large" "$pipeline" "$inflight_json" "$rehost" "$curl_json" "$compare" <<'PY'
import json, sys
names = ["enqueue", "queue_small_backlog", "queue_large_backlog", "pipeline", "inflight", "rehost", "rehost_curl", "compare"]
figures = {name: json.loads(arg) for name, arg in zip(names, sys.argv[1:])}
qs, ql = figures["queue_small_backlog"], figures["queue_large_backlog"]
figures["queue_flatness"] = ql["process_jobs_per_s"] / qs["process_jobs_per_s"]
print(f"queue throughput at backlog {ql['jobs']} / at {qs['jobs']}: {figures['queue_flatness']:.2f}", file=sys.stderr)
print(json.dumps(figures))
PY
