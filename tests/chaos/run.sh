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
# --redis cluster: a Redis Cluster of 3 primaries and 3 replicas (AOF, appendfsync always),
# entered through seed nodes that do not own the namespace's slot. --redis sentinel: a primary,
# a replica and 3 sentinels. Both set KLINGQ_REDIS_MIN_REPLICAS_ACK=1 and add a fault: the
# primary serving the namespace is SIGKILLed (after 20 s, then again at about a third and two
# thirds of the jobs), a replica must be promoted within 60 s, and the killed node is restarted
# on its port with its data until it is back as a replica of the new primary, in sync.
#
# --partitions N: the namespace spread over N partitions (queue.partitions), so with --redis
# cluster its jobs live on every shard; the primary killed owns partition 0 (the global keys).
#
# Usage: tests/chaos/run.sh [--jobs N] [--workers W] [--batch-size B] [--timeout SECS]
#                           [--s3-outage SECS] [--redis standalone|cluster|sentinel]
#                           [--partitions N]
# Env: KLINGQ_BIN (default target/release/klingq, built if missing), KLINGQ_WEED_BIN.
# Logs: tests/chaos/out/<time>/ (gitignored); Redis data lives in a temporary directory that is
# removed on exit, with every Redis process this script started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root="$PWD"

jobs=1000
workers=3
batch_size=100
timeout_secs=900
kill_every=10
s3_outage_secs=30
redis_mode=standalone
partitions=1
while [ $# -gt 0 ]; do
    case "$1" in
        --jobs) jobs="$2"; shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        --batch-size) batch_size="$2"; shift 2 ;;
        --timeout) timeout_secs="$2"; shift 2 ;;
        --s3-outage) s3_outage_secs="$2"; shift 2 ;;
        --redis) redis_mode="$2"; shift 2 ;;
        --partitions) partitions="$2"; shift 2 ;;
        -h|--help) sed -n 2,27p "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
case "$redis_mode" in
    standalone|cluster|sentinel) ;;
    *) echo "--redis must be standalone, cluster or sentinel, not $redis_mode" >&2; exit 2 ;;
esac

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
# Redis servers and sentinels of --redis cluster|sentinel, by port (a restarted node replaces its
# entry), and the temporary directory with their data and config files.
declare -A redis_pid=()
redis_tmp=""
cleanup() {
    local status=$?
    set +e
    for pid in "${worker_pids[@]}" "${pids[@]}" "${redis_pid[@]}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null
    done
    sleep 1
    for pid in "${worker_pids[@]}" "${pids[@]}" "${redis_pid[@]}"; do
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
    done
    wait 2>/dev/null
    rm -rf "$out/weed/data"
    if [ -n "$redis_tmp" ]; then
        # Keep the config files (nodes.conf, sentinel rewrites) with the logs; drop the data.
        (cd "$redis_tmp" && find . -name '*.conf' -exec cp --parents {} "$out/redis-conf/" \;) 2>/dev/null
        rm -rf "$redis_tmp"
    fi
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Free loopback ports: redis, sim, api, receiver, proxy, worker health (unused), and SeaweedFS's
# s3, master, volume, filer, admin and their gRPC ports; then six for Redis Cluster or Sentinel
# nodes, below 55536 with port + 10000 (the cluster bus) free as well.
read -r -a ports <<<"$(python3 - <<'PY'
import random
import socket
socks = []
def grab(port):
    s = socket.socket(); s.bind(("127.0.0.1", port)); socks.append(s); return s
picked = [grab(0).getsockname()[1] for _ in range(16)]
while len(picked) < 22:
    port = random.randint(20000, 29999)
    try:
        grab(port); grab(port + 10000)
    except OSError:
        continue
    picked.append(port)
print(" ".join(map(str, picked)))
PY
)"
redis_port=${ports[0]} sim_port=${ports[1]} api_port=${ports[2]} receiver_port=${ports[3]}
proxy_port=${ports[4]} s3_port=${ports[5]}
node_ports=("${ports[@]:16:6}")
namespace="chaos"
ns_key="{$namespace}"

log "jobs=$jobs workers=$workers batch_size=$batch_size redis=$redis_mode partitions=$partitions out=$out"

# Polls a command until it succeeds, at most $1 seconds; prints its output.
poll() {
    local secs=$1 deadline
    shift
    deadline=$(($(date +%s) + secs))
    while true; do
        if "$@" 2>/dev/null; then return 0; fi
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}
topo() { python3 tests/chaos/topology.py "$@"; }
pong() { [ "$(redis-cli -p "$1" ping 2>/dev/null)" = PONG ]; }
all_pong() { local p; for p in "$@"; do pong "$p" || return 1; done; }
cluster_ok() { local p; for p in "$@"; do redis-cli -p "$p" cluster info | grep -q '^cluster_state:ok' || return 1; done; }
# Data nodes of cluster and sentinel mode: AOF with fsync on every write, replicas resync at once.
node_args=(--appendonly yes --appendfsync always --save "" --repl-diskless-sync-delay 0)
cluster_args=(--cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000)
# Starts (or restarts, with the data and config it left) the Redis node of port $1.
start_node() {
    local port=$1
    mkdir -p "$redis_tmp/$port"
    if [ "$redis_mode" = cluster ]; then
        redis-server --bind 127.0.0.1 --port "$port" --dir "$redis_tmp/$port" \
            --logfile "$out/redis-$port.log" "${node_args[@]}" "${cluster_args[@]}" &
    else
        # A config file, so that a sentinel's CONFIG REWRITE (promotion, demotion) sticks.
        redis-server "$redis_tmp/$port/redis.conf" &
    fi
    redis_pid[$port]=$!
}
node_conf() {  # port [primary port]: a sentinel-mode node's config file
    mkdir -p "$redis_tmp/$1"
    {
        printf 'port %s\nbind 127.0.0.1\ndir %s\nlogfile %s\n' "$1" "$redis_tmp/$1" "$out/redis-$1.log"
        printf 'appendonly yes\nappendfsync always\nsave ""\nrepl-diskless-sync-delay 0\n'
        [ -z "${2:-}" ] || printf 'replicaof 127.0.0.1 %s\n' "$2"
    } >"$redis_tmp/$1/redis.conf"
}

# --- Redis ---------------------------------------------------------------------------------
case "$redis_mode" in
standalone)
    redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
        --logfile "$out/redis.log" &
    pids+=($!)
    for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    redis-cli -p "$redis_port" ping >/dev/null
    redis_url="redis://127.0.0.1:$redis_port"
    ;;
cluster)
    redis_tmp="$(mktemp -d "${TMPDIR:-/tmp}/klingq-chaos-redis.XXXXXX")"
    mkdir -p "$out/redis-conf"
    for p in "${node_ports[@]}"; do start_node "$p"; done
    poll 20 all_pong "${node_ports[@]}" || { log "Redis nodes did not start (see $out/redis-*.log)"; exit 1; }
    redis-cli --cluster create $(printf '127.0.0.1:%s ' "${node_ports[@]}") \
        --cluster-replicas 1 --cluster-yes >"$out/cluster-create.log" 2>&1 \
        || { log "redis-cli --cluster create failed (see $out/cluster-create.log)"; exit 1; }
    poll 60 cluster_ok "${node_ports[@]}" || { log "the cluster never reached cluster_state:ok"; exit 1; }
    poll 60 topo all-synced "${node_ports[0]}" || { log "the cluster's replicas never came in sync"; exit 1; }
    read -r ns_slot ns_owner ns_replicas < <(topo owner "${node_ports[0]}" "$ns_key")
    # Seeds: the other primaries, so that every command for the namespace starts with MOVED.
    seeds=()
    for p in $(topo primaries "${node_ports[0]}"); do [ "$p" = "$ns_owner" ] || seeds+=("$p"); done
    redis_url="$(printf 'redis://127.0.0.1:%s,' "${seeds[@]}")"
    redis_url="${redis_url%,}"
    log "cluster on ports ${node_ports[*]}: slot $ns_slot of $ns_key is on $ns_owner (replica $ns_replicas); seeds ${seeds[*]}"
    ;;
sentinel)
    redis_tmp="$(mktemp -d "${TMPDIR:-/tmp}/klingq-chaos-redis.XXXXXX")"
    mkdir -p "$out/redis-conf"
    data_ports=("${node_ports[0]}" "${node_ports[1]}")
    sentinel_ports=("${node_ports[@]:2:3}")
    node_conf "${data_ports[0]}"
    node_conf "${data_ports[1]}" "${data_ports[0]}"
    for p in "${data_ports[@]}"; do start_node "$p"; done
    poll 20 all_pong "${data_ports[@]}" || { log "Redis nodes did not start (see $out/redis-*.log)"; exit 1; }
    poll 60 topo synced "${data_ports[1]}" "${data_ports[0]}" || { log "the replica never came in sync"; exit 1; }
    for s in "${sentinel_ports[@]}"; do
        mkdir -p "$redis_tmp/sentinel-$s"
        printf '%s\n' "port $s" "bind 127.0.0.1" "dir $redis_tmp/sentinel-$s" \
            "logfile $out/sentinel-$s.log" \
            "sentinel monitor mymaster 127.0.0.1 ${data_ports[0]} 2" \
            "sentinel down-after-milliseconds mymaster 2000" \
            "sentinel failover-timeout mymaster 5000" >"$redis_tmp/sentinel-$s/sentinel.conf"
        redis-server "$redis_tmp/sentinel-$s/sentinel.conf" --sentinel &
        redis_pid[$s]=$!
    done
    poll 60 topo sentinel-ready "${data_ports[1]}" "${sentinel_ports[@]}" \
        || { log "the sentinels never agreed on the primary, its replica and each other"; exit 1; }
    redis_url="redis+sentinel://$(printf '127.0.0.1:%s,' "${sentinel_ports[@]}")"
    redis_url="${redis_url%,}/mymaster"
    log "sentinel: primary ${data_ports[0]}, replica ${data_ports[1]}, sentinels ${sentinel_ports[*]}"
    ;;
esac

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
export KLINGQ_REDIS_URL="$redis_url"
export KLINGQ_NAMESPACE="$namespace"
export KLINGQ_QUEUE_PARTITIONS="$partitions"
if [ "$redis_mode" != standalone ]; then
    # Every primary has a replica (again, once a killed node is back): enqueues and the
    # checkpoint before a paid call wait until one holds them.
    export KLINGQ_REDIS_MIN_REPLICAS_ACK=1
fi
export KLINGQ_PROVIDER_BASE_URL="http://127.0.0.1:$sim_port"
# Runflow's callbacks go to the API, which wakes parked generations; some are lost, some come
# twice or late (the simulator's faults below).
callback_secret="whsec_chaos_$(date +%s)"
export KLINGQ_PROVIDER_CALLBACK_SECRET="$callback_secret"
export KLINGQ_PROVIDER_CALLBACK_URL="http://127.0.0.1:$api_port/v1/provider/callbacks/runflow"
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
    --callback-secret "$callback_secret" --callback-drop 0.2 --callback-duplicate 0.1 \
    --callback-delay-ms 300 \
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
# Jobs in a terminal state, in thirds of all jobs (0 when the API does not answer).
thirds_done() {
    local terminal total
    read -r terminal total < <(python3 tests/chaos/status.py "$api" "$out/batches.txt" --terminal || true) || true
    echo $((${terminal:-0} * 3 / (${total:-0} > 0 ? total : 1)))
}
started=$(date +%s)
kills=0
redis_dropped=0
s3_down_at=""
s3_outages=0
next_kill=$((started + kill_every))
victim=0

# Primary kills (cluster, sentinel): idle -> promoting (the primary serving the namespace was
# SIGKILLed, waiting for a replica to take over) -> rejoining (the killed node was restarted,
# waiting until it replicates the new primary) -> idle. The first after 20 s, the next ones once
# a third and two thirds of the jobs are done, each 15 s or more after the previous one ended.
failover_first_secs=20
failover_deadline_secs=60
fo_state=idle
fo_attempts=0
failovers=0
fo_failures=0
fo_killed="" fo_new="" fo_killed_at=0 fo_deadline=0 fo_done_at=0
fo_promote_secs=() fo_rejoin_secs=()
current_primary() {
    if [ "$redis_mode" = cluster ]; then
        local slot owner replicas
        read -r slot owner replicas < <(topo owner "${seeds[0]}" "$ns_key") && echo "$owner"
    else
        topo sentinel-primary "${sentinel_ports[@]}"
    fi
}
others() {  # the cluster's nodes other than $1
    local p
    for p in "${node_ports[@]}"; do [ "$p" = "$1" ] || echo "$p"; done
}
failover_due() {
    [ "$redis_mode" != standalone ] && [ "$fo_state" = idle ] || return 1
    [ "$fo_attempts" -lt 3 ] || return 1
    if [ "$fo_attempts" -eq 0 ]; then
        [ "$elapsed" -ge "$failover_first_secs" ]
    else
        [ $((now - fo_done_at)) -ge 15 ] && [ "$(thirds_done)" -ge "$fo_attempts" ]
    fi
}
failover_step() {
    local pid new
    case "$fo_state" in
    idle)
        fo_killed="$(current_primary)" || { log "primary kill: cannot tell the primary; later"; return 0; }
        pid=${redis_pid[$fo_killed]}
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        redis_pid[$fo_killed]=""
        fo_attempts=$((fo_attempts + 1))
        fo_killed_at=$(date +%s)
        fo_deadline=$((fo_killed_at + failover_deadline_secs))
        fo_state=promoting
        log "SIGKILLed the Redis primary on port $fo_killed (pid $pid, primary kill $fo_attempts)"
        ;;
    promoting)
        if [ "$redis_mode" = cluster ]; then
            # shellcheck disable=SC2046
            new="$(topo promoted "$ns_key" "$fo_killed" $(others "$fo_killed") 2>/dev/null)" || new=""
        else
            new="$(topo sentinel-promoted "$fo_killed" "${sentinel_ports[@]}" 2>/dev/null)" || new=""
        fi
        if [ -n "$new" ]; then
            failovers=$((failovers + 1))
            fo_promote_secs+=($(($(date +%s) - fo_killed_at)))
            log "port $new was promoted after ${fo_promote_secs[-1]}s; restarting $fo_killed with its data"
        elif [ "$(date +%s)" -ge "$fo_deadline" ]; then
            fo_failures=$((fo_failures + 1))
            log "FAILOVER: no replica was promoted within ${failover_deadline_secs}s of killing $fo_killed; restarting it"
        else
            return 0
        fi
        fo_new="$new"
        if [ "$redis_mode" = sentinel ] && [ -n "$new" ]; then
            # Back as a replica of the new primary at once, never as a second primary.
            sed -i -e '/^replicaof /d' -e '/^slaveof /d' "$redis_tmp/$fo_killed/redis.conf"
            printf 'replicaof 127.0.0.1 %s\n' "$new" >>"$redis_tmp/$fo_killed/redis.conf"
        fi
        echo "=== restarted after SIGKILL ===" >>"$out/redis-$fo_killed.log"
        start_node "$fo_killed"
        fo_deadline=$(($(date +%s) + failover_deadline_secs))
        fo_state=rejoining
        ;;
    rejoining)
        if [ -n "$fo_new" ] && topo synced "$fo_killed" "$fo_new" 2>/dev/null \
            && { [ "$redis_mode" = cluster ] || topo sentinel-ready "$fo_killed" "${sentinel_ports[@]}" 2>/dev/null; }; then
            fo_rejoin_secs+=($(($(date +%s) - fo_killed_at)))
            log "port $fo_killed is a replica of $fo_new again, in sync ${fo_rejoin_secs[-1]}s after the kill: $(progress)"
        elif [ "$(date +%s)" -ge "$fo_deadline" ]; then
            fo_failures=$((fo_failures + 1))
            log "FAILOVER: port $fo_killed did not come back as an in-sync replica within ${failover_deadline_secs}s"
        else
            return 0
        fi
        fo_state=idle
        fo_done_at=$(date +%s)
        ;;
    esac
}
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
    if [ "$redis_dropped" -eq 0 ] && [ "$elapsed" -ge 12 ] && [ "$fo_state" = idle ]; then
        # Every primary's clients (one node standalone, all primaries of a cluster, the
        # Sentinel primary; the sentinels' own connections to it included).
        case "$redis_mode" in
            standalone) targets=("$redis_port") ;;
            cluster) read -r -a targets < <(topo primaries "${seeds[0]}") ;;
            sentinel) targets=("$(current_primary)") ;;
        esac
        n=0
        for p in "${targets[@]}"; do
            n=$((n + $(redis-cli -p "$p" CLIENT KILL TYPE normal)))
        done
        redis_dropped=1
        log "dropped $n Redis client connections (on port ${targets[*]})"
    fi
    if [ "$fo_state" != idle ] || failover_due; then
        failover_step
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
    if [ -z "$s3_down_at" ] && [ "$s3_outages" -eq 1 ] && [ "$redis_dropped" -eq 1 ] \
        && { [ "$redis_mode" = standalone ] || { [ "$fo_attempts" -ge 1 ] && [ "$fo_state" = idle ]; }; } \
        && all_done; then
        break
    fi
    sleep 1
done
rm -f "$out/s3.down"
run_secs=$(($(date +%s) - started))
log "batches done after ${run_secs}s (kills: $kills, primary kills: $fo_attempts, failovers: $failovers): $(progress)"

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

json_list() { local IFS=,; echo "[$*]"; }
extra="{\"redis_mode\": \"$redis_mode\", \"partitions\": $partitions, \"min_replicas_ack\": ${KLINGQ_REDIS_MIN_REPLICAS_ACK:-0}, \"worker_kills\": $kills, \"redis_connection_drops\": $redis_dropped, \"primary_kills\": $fo_attempts, \"failovers\": $failovers, \"failover_problems\": $fo_failures, \"promotion_seconds\": $(json_list "${fo_promote_secs[@]}"), \"replica_back_seconds\": $(json_list "${fo_rejoin_secs[@]}"), \"s3_outage_secs\": $s3_outage_secs, \"run_seconds\": $run_secs}"
set +e
python3 tests/chaos/check.py "$api" "http://127.0.0.1:$sim_port" "$out/batches.txt" "$out/webhooks.jsonl" "$jobs" "$extra" | tee "$out/report.txt"
status=${PIPESTATUS[0]}
set -e
exit "$status"
