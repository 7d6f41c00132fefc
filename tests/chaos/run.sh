#!/usr/bin/env bash
# Chaos run: the whole system under faults, then proof that nothing was lost and nothing paid twice.
#
# Starts its own Redis, SeaweedFS (`weed mini`, private ports and data), a TCP proxy in front of
# SeaweedFS's S3 port, the simulator with faults, the API (`klingq serve`), a webhook receiver
# that verifies signatures itself, and several `klingq worker`s. Submits N jobs as batches (half
# with `klingq batch submit`, half through `POST /v1/batches`), and meanwhile SIGKILLs a worker
# every 10 s (and restarts it), drops every Redis client connection once, and makes S3
# unreachable for 30 s. When every batch is done and the webhooks have drained, check.py prints a
# report ending with one JSON line; the exit status is non-zero when a check fails.
#
# Usage: tests/chaos/run.sh [--jobs N] [--workers W] [--batch-size B] [--timeout SECS]
# Env: KLINGQ_BIN (default target/release/klingq, built if missing), KLINGQ_WEED_BIN.
# Logs: tests/chaos/out/<time>/ (gitignored).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root="$PWD"

jobs=1000
workers=3
batch_size=100
timeout_secs=900
kill_every=10
s3_outage_secs=30
while [ $# -gt 0 ]; do
    case "$1" in
        --jobs) jobs="$2"; shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        --batch-size) batch_size="$2"; shift 2 ;;
        --timeout) timeout_secs="$2"; shift 2 ;;
        --s3-outage) s3_outage_secs="$2"; shift 2 ;;
        -h|--help) sed -n 2,14p "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

bin="${KLINGQ_BIN:-$root/target/release/klingq}"
if [ ! -x "$bin" ]; then
    echo "building $bin" >&2
    cargo build --release -p klingq >&2
fi
weed="${KLINGQ_WEED_BIN:-}"
if [ -z "$weed" ]; then
    weed="$(bash .ci/install-seaweedfs.sh)"
fi

out="$root/tests/chaos/out/$(date -u +%Y%m%dT%H%M%SZ)-$$"
mkdir -p "$out"
ln -sfn "$out" "$root/tests/chaos/out/latest"
log() { printf '[chaos %s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$out/chaos.log"; }

pids=()
worker_pids=()
cleanup() {
    local status=$?
    set +e
    for pid in "${worker_pids[@]}" "${pids[@]}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null
    done
    sleep 1
    for pid in "${worker_pids[@]}" "${pids[@]}"; do
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
    done
    wait 2>/dev/null
    rm -rf "$out/weed/data"
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Free loopback ports: redis, sim, api, receiver, proxy, worker health (unused), and SeaweedFS's
# s3, master, volume, filer, admin and their gRPC ports.
read -r -a ports <<<"$(python3 - <<'PY'
import socket
socks = []
for _ in range(16):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)"
redis_port=${ports[0]} sim_port=${ports[1]} api_port=${ports[2]} receiver_port=${ports[3]}
proxy_port=${ports[4]} s3_port=${ports[5]}

log "jobs=$jobs workers=$workers batch_size=$batch_size out=$out"

# --- Redis ---------------------------------------------------------------------------------
redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
    --logfile "$out/redis.log" &
pids+=($!)
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$redis_port" ping >/dev/null

# --- SeaweedFS and the S3 proxy -------------------------------------------------------------
mkdir -p "$out/weed/data"
cat >"$out/weed/s3.json" <<JSON
{"identities":[{"name":"admin","credentials":[{"accessKey":"test","secretKey":"testtesttest"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
(cd "$out/weed" && exec "$weed" mini -dir="$out/weed/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.port="$s3_port" -master.port="${ports[6]}" -volume.port="${ports[7]}" \
    -filer.port="${ports[8]}" -admin.port="${ports[9]}" \
    -master.port.grpc="${ports[10]}" -volume.port.grpc="${ports[11]}" \
    -filer.port.grpc="${ports[12]}" -admin.port.grpc="${ports[13]}" \
    -s3.config="$out/weed/s3.json" -webdav=false -admin.ui=false \
    -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false -volume.max=20 \
    >"$out/weed.log" 2>&1) &
pids+=($!)
for _ in $(seq 1 600); do
    code="$(curl -s -m 1 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$s3_port/" || true)"
    [ "$code" != "000" ] && break
    sleep 0.1
done
[ "$code" != "000" ] || { log "SeaweedFS did not start (see $out/weed.log)"; exit 1; }
python3 tests/chaos/proxy.py "$proxy_port" "127.0.0.1:$s3_port" "$out/s3.down" >"$out/proxy.log" 2>&1 &
pids+=($!)

# --- Shared settings ---------------------------------------------------------------------------
secret="whsec_$(python3 -c 'import base64,os;print(base64.b64encode(os.urandom(32)).decode())')"
export KLINGQ_REDIS_URL="redis://127.0.0.1:$redis_port"
export KLINGQ_NAMESPACE="chaos"
export KLINGQ_PROVIDER_BASE_URL="http://127.0.0.1:$sim_port"
export RUNFLOW_API_KEY="chaos-key"
export KLINGQ_S3_ENDPOINT="http://127.0.0.1:$proxy_port"
export KLINGQ_S3_BUCKET="chaos"
export KLINGQ_S3_FORCE_PATH_STYLE=true
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=testtesttest AWS_REGION=us-east-1
export KLINGQ_WEBHOOK_SECRET="$secret"
export KLINGQ_WEBHOOK_ALLOW_CIDRS=127.0.0.1/32
# The simulator serves its videos on loopback, which the download's SSRF guard refuses otherwise.
export KLINGQ_DOWNLOAD_ALLOW_CIDRS=127.0.0.0/8,::1
export KLINGQ_WEBHOOK_RETRY_SCHEDULE="1s,2s,5s,10s,20s,30s,60s,60s,60s"
export KLINGQ_LEASE_TIMEOUT_SECS=10
export KLINGQ_RECLAIM_INTERVAL_SECS=2
export KLINGQ_MAX_RETRY_DELAY_SECS=8
export KLINGQ_PROVIDER_CONCURRENCY=400
export KLINGQ_PROVIDER_THROTTLE_RECOVERY_SECS=2
export KLINGQ_PROVIDER_LIMIT_WAIT_SECS=1
export KLINGQ_WORKER_CONCURRENCY=128
export KLINGQ_WORKER_SHUTDOWN_GRACE_SECS=2
export KLINGQ_DOWNLOAD_RETRIES=12
export KLINGQ_SUBMIT_RETRIES=12
export KLINGQ_WORKER_HEALTH_BIND=""
export RUST_LOG="${RUST_LOG:-info}"

# --- Simulator ---------------------------------------------------------------------------------
# time scale 0.02: a median 120 s clip takes 2.4 s; 20 kB per second of video (100 kB clips).
"$bin" sim --port "$sim_port" --time-scale 0.02 --video-bytes-per-second 20000 \
    --balance-usd 100000000 --tail-probability 0 --retry-after-secs 1 \
    --fail-429 0.10 --fail-5xx 0.05 --lost-response 0.02 --download-reset 0.02 --moderation 0.01 \
    >"$out/sim.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$sim_port/v1/health" >/dev/null && break; sleep 0.1; done

# --- Webhook receiver and API ------------------------------------------------------------------
: >"$out/webhooks.jsonl"
python3 tests/chaos/receiver.py "$receiver_port" "$secret" "$out/webhooks.jsonl" >"$out/receiver.log" 2>&1 &
pids+=($!)
"$bin" serve --bind "127.0.0.1:$api_port" >"$out/api.log" 2>&1 &
pids+=($!)
api="http://127.0.0.1:$api_port"
for _ in $(seq 1 100); do curl -sf "$api/healthz" >/dev/null && break; sleep 0.1; done
curl -sf "$api/healthz" >/dev/null || { log "the API did not start (see $out/api.log)"; exit 1; }

# --- Workers -------------------------------------------------------------------------------------
start_worker() {
    local n=$1
    "$bin" worker >>"$out/worker-$n.log" 2>&1 &
    worker_pids[n]=$!
}
for n in $(seq 0 $((workers - 1))); do start_worker "$n"; done

# --- Submit ------------------------------------------------------------------------------------
webhook="http://127.0.0.1:$receiver_port/hooks"
: >"$out/batches.txt"
submitted=0
b=0
while [ "$submitted" -lt "$jobs" ]; do
    size=$((jobs - submitted < batch_size ? jobs - submitted : batch_size))
    file="$out/batch-$b.jsonl"
    for i in $(seq "$submitted" $((submitted + size - 1))); do
        printf '{"start_image_url":"https://example.com/chaos/%d.png","prompt":"chaos take %d","metadata":{"n":%d}}\n' "$i" "$i" "$i"
    done >"$file"
    if [ $((b % 2)) -eq 0 ]; then
        id="$("$bin" batch submit "$file" --webhook "$webhook" --json | python3 -c 'import json,sys;print(json.loads(sys.stdin.readline())["id"])')"
    else
        id="$(curl -sf -X POST "$api/v1/batches?webhook_url=$webhook" -H 'content-type: application/x-ndjson' \
            --data-binary "@$file" | python3 -c 'import json,sys;v=json.load(sys.stdin);print(v.get("data",v)["id"])')"
    fi
    echo "$id" >>"$out/batches.txt"
    submitted=$((submitted + size))
    b=$((b + 1))
done
log "submitted $jobs jobs in $b batches"

# --- Chaos while waiting -------------------------------------------------------------------------
all_done() { python3 tests/chaos/status.py "$api" "$out/batches.txt" >/dev/null; }
progress() { python3 tests/chaos/status.py "$api" "$out/batches.txt" || true; }
started=$(date +%s)
kills=0
redis_dropped=0
s3_down_at=""
s3_outages=0
next_kill=$((started + kill_every))
victim=0
while true; do
    now=$(date +%s)
    elapsed=$((now - started))
    if [ "$elapsed" -ge "$timeout_secs" ]; then
        log "timed out after ${timeout_secs}s: $(progress)"
        break
    fi
    if [ -z "$s3_down_at" ] && [ "$s3_outages" -eq 0 ] && [ "$elapsed" -ge 5 ]; then
        touch "$out/s3.down"; s3_down_at=$now; s3_outages=1
        log "S3 unreachable for ${s3_outage_secs}s"
    fi
    if [ -n "$s3_down_at" ] && [ $((now - s3_down_at)) -ge "$s3_outage_secs" ]; then
        rm -f "$out/s3.down"; s3_down_at=""
        log "S3 reachable again"
    fi
    if [ "$redis_dropped" -eq 0 ] && [ "$elapsed" -ge 12 ]; then
        n="$(redis-cli -p "$redis_port" CLIENT KILL TYPE normal)"
        redis_dropped=1
        log "dropped $n Redis client connections"
    fi
    if [ "$now" -ge "$next_kill" ]; then
        pid=${worker_pids[victim]}
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        kills=$((kills + 1))
        log "SIGKILLed worker $victim (pid $pid, kill $kills); restarting it: $(progress)"
        echo "=== restarted after SIGKILL ===" >>"$out/worker-$victim.log"
        start_worker "$victim"
        victim=$(((victim + 1) % workers))
        next_kill=$((now + kill_every))
    fi
    if [ -z "$s3_down_at" ] && [ "$s3_outages" -eq 1 ] && [ "$redis_dropped" -eq 1 ] && all_done; then
        break
    fi
    sleep 1
done
rm -f "$out/s3.down"
run_secs=$(($(date +%s) - started))
log "batches done after ${run_secs}s (kills: $kills): $(progress)"

# --- Let the webhooks drain ------------------------------------------------------------------
expected_terminal="$jobs"
for _ in $(seq 1 120); do
    got="$(python3 -c '
import json,sys
ids=set()
for line in open(sys.argv[1]):
    d=json.loads(line)
    if d["valid"] and d.get("job_id") and d["type"].startswith("job."): ids.add(d["job_id"])
print(len(ids))' "$out/webhooks.jsonl")"
    [ "$got" -ge "$expected_terminal" ] && break
    sleep 1
done
log "webhooks received for $got of $expected_terminal jobs"

extra="{\"worker_kills\": $kills, \"redis_connection_drops\": $redis_dropped, \"s3_outage_secs\": $s3_outage_secs, \"run_seconds\": $run_secs}"
set +e
python3 tests/chaos/check.py "$api" "http://127.0.0.1:$sim_port" "$out/batches.txt" "$out/webhooks.jsonl" "$jobs" "$extra" | tee "$out/report.txt"
status=${PIPESTATUS[0]}
set -e
exit "$status"
