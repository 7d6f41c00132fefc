#!/usr/bin/env bash
# Checks that `/metrics` of a worker and of `klingq serve` parse with the reference parser.
#
# Starts, on free loopback ports and in a fresh namespace of the local Redis: SeaweedFS (the S3
# store, .ci/install-seaweedfs.sh), the Runflow simulator with signed callbacks, `klingq serve`
# and one `klingq worker` with its health port. Runs three jobs through them, so the histograms
# and the callback counters have samples, then scrapes both `/metrics` twice: as Prometheus text
# 0.0.4 (no Accept header) and as OpenMetrics 1.0.0 (the Accept header Prometheus sends). Each
# answer must carry the matching Content-Type, parse with the official Python client's parser
# (`prometheus_client.parser` for text 0.0.4, the strict `prometheus_client.openmetrics.parser`
# for OpenMetrics; pinned, hash-checked, in a venv under .tools/) and hold every expected
# metric. Stops what it started and deletes the namespace's keys, also on failure.
#
# Environment:
#   KLINGQ_REDIS_URL   Redis to use (default redis://127.0.0.1:6379; must answer)
#   KLINGQ_BIN         a built klingq binary (default: cargo build -p klingq)
#   METRICS_FORMATS    formats to check (default "text openmetrics")
#   METRICS_DUMP_DIR   when set, writes each scrape's series (name, type, labels) there
set -euo pipefail

workspace="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$workspace"
export CARGO_TERM_COLOR=never
log() { printf '[check-metrics] %s\n' "$*" >&2; }

parser_version="0.23.1"
parser_sha256="dd1913e6e76b59cfe44e7a4b83e01afc9873c1bdfd2ed8739f1e76aeca115f99"
venv="$workspace/.tools/metrics-parser"
if [ ! -f "$venv/installed-$parser_version" ]; then
    log "installing prometheus-client $parser_version (the reference parser) into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    printf 'prometheus-client==%s --hash=sha256:%s\n' "$parser_version" "$parser_sha256" \
        >"$venv/requirements.txt"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --require-hashes \
        -r "$venv/requirements.txt"
    touch "$venv/installed-$parser_version"
fi

if [ -z "${KLINGQ_BIN:-}" ]; then
    log "building klingq"
    cargo build --quiet --locked -p klingq
    KLINGQ_BIN="$workspace/target/debug/klingq"
fi
bin="$KLINGQ_BIN"
weed="$(bash .ci/install-seaweedfs.sh)"

redis_url="${KLINGQ_REDIS_URL:-redis://127.0.0.1:6379}"
redis-cli -u "$redis_url" ping >/dev/null 2>&1 \
    || { log "Redis does not answer at $redis_url: start one (redis-server --daemonize yes)"; exit 1; }

# Free loopback ports: simulator, API, worker health, and SeaweedFS's s3, master, volume,
# filer, admin and their gRPC ports.
read -r -a ports <<<"$(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(12)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)"
sim_port=${ports[0]} api_port=${ports[1]} health_port=${ports[2]} s3_port=${ports[3]}
namespace="metrics-check-$$-$(date +%s)"
work="$(mktemp -d "${TMPDIR:-/tmp}/klingq-metrics.XXXXXX")"
pids=()

cleanup() {
    local status=$?
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    redis-cli -u "$redis_url" --scan --pattern "{$namespace}*" 2>/dev/null \
        | xargs -r -n 500 redis-cli -u "$redis_url" del >/dev/null 2>&1 || true
    if [ "$status" -ne 0 ]; then
        for f in "$work"/*.log; do
            [ -f "$f" ] || continue
            log "--- last lines of $(basename "$f")"
            tail -n 20 "$f" >&2
        done
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# Polls a command until it succeeds, at most $1 seconds.
poll() {
    local secs=$1 deadline
    shift
    deadline=$(($(date +%s) + secs))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

log "namespace $namespace; sim :$sim_port, api :$api_port, worker health :$health_port, s3 :$s3_port"
mkdir -p "$work/weed/data"
cat >"$work/weed/s3.json" <<JSON
{"identities":[{"name":"admin","credentials":[{"accessKey":"test","secretKey":"testtesttest"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
(cd "$work/weed" && exec "$weed" mini -dir="$work/weed/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.port="$s3_port" -master.port="${ports[4]}" -volume.port="${ports[5]}" \
    -filer.port="${ports[6]}" -admin.port="${ports[7]}" \
    -master.port.grpc="${ports[8]}" -volume.port.grpc="${ports[9]}" \
    -filer.port.grpc="${ports[10]}" -admin.port.grpc="${ports[11]}" \
    -s3.config="$work/weed/s3.json" -webdav=false -admin.ui=false \
    -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false -volume.max=5 \
    >"$work/weed.log" 2>&1) &
pids+=($!)

callback_secret="whsec_metrics_$(date +%s)"
"$bin" sim --port "$sim_port" --time-scale 0.02 --video-bytes-per-second 20000 \
    --balance-usd 1000 --tail-probability 0 --callback-secret "$callback_secret" \
    >"$work/sim.log" 2>&1 &
pids+=($!)

export KLINGQ_REDIS_URL="$redis_url"
export KLINGQ_NAMESPACE="$namespace"
export KLINGQ_PROVIDER_BASE_URL="http://127.0.0.1:$sim_port"
export KLINGQ_PROVIDER_CALLBACK_SECRET="$callback_secret"
export KLINGQ_PROVIDER_CALLBACK_URL="http://127.0.0.1:$api_port/v1/provider/callbacks/runflow"
export RUNFLOW_API_KEY="metrics-key"
export KLINGQ_S3_ENDPOINT="http://127.0.0.1:$s3_port"
export KLINGQ_S3_BUCKET="metrics"
export KLINGQ_S3_FORCE_PATH_STYLE=true
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=testtesttest AWS_REGION=us-east-1
export KLINGQ_DOWNLOAD_ALLOW_CIDRS=127.0.0.0/8,::1
export KLINGQ_WORKER_HEALTH_BIND="127.0.0.1:$health_port"
export RUST_LOG="${RUST_LOG:-info}"

api="http://127.0.0.1:$api_port"
worker="http://127.0.0.1:$health_port"
s3_answers() { [ "$(curl -s -m 1 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$s3_port/")" != "000" ]; }
poll 120 s3_answers || { log "SeaweedFS did not start"; exit 1; }
poll 30 curl -sf "http://127.0.0.1:$sim_port/v1/health" || { log "the simulator did not start"; exit 1; }
"$bin" serve --bind "127.0.0.1:$api_port" >"$work/api.log" 2>&1 &
pids+=($!)
"$bin" worker >"$work/worker.log" 2>&1 &
pids+=($!)
poll 60 curl -sf "$api/readyz" || { log "the API did not start"; exit 1; }
poll 60 curl -sf "$worker/readyz" || { log "the worker did not start"; exit 1; }

jobs=3
for n in $(seq 1 "$jobs"); do
    "$bin" enqueue --image "https://example.com/metrics/$n.png" --prompt "metrics take $n" \
        --duration 5 >/dev/null
done
succeeded() {
    curl -sf "$api/metrics" | grep -qx "klingq_jobs_finished_total{outcome=\"succeeded\"} $jobs"
}
poll 240 succeeded || { log "the $jobs jobs did not succeed in time"; exit 1; }
log "$jobs jobs succeeded; scraping"

# Sample names each process must expose (as the parser reports them, so in both formats).
common="klingq_queue_jobs klingq_queue_oldest_waiting_seconds klingq_jobs_parked
klingq_jobs_finished_total klingq_spend_usd_total klingq_webhook_deliveries_total
klingq_redis_errors_total klingq_build_info"
worker_expected="$common klingq_job_attempts_total klingq_step_duration_seconds_bucket
klingq_step_duration_seconds_sum klingq_step_duration_seconds_count
klingq_provider_finish_lag_seconds_bucket klingq_provider_finish_lag_seconds_count
klingq_provider_runs_adopted_total klingq_provider_unknown_outcomes_total
klingq_provider_credit_pauses_total klingq_bytes_rehosted_total klingq_provider_requests_total
klingq_worker_jobs_in_flight klingq_provider_slot_releases_pending
klingq_provider_slot_releases_deferred_total klingq_provider_limit_in_use
klingq_provider_limit_cap"
api_expected="$common klingq_provider_callbacks_total klingq_tenant_in_flight
klingq_tenant_jobs klingq_tenant_spend_today_usd"

openmetrics_accept="application/openmetrics-text;version=1.0.0;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
failed=0
for format in ${METRICS_FORMATS:-text openmetrics}; do
    for target in worker api; do
        if [ "$target" = worker ]; then url="$worker/metrics" expected="$worker_expected"; else url="$api/metrics" expected="$api_expected"; fi
        accept=()
        [ "$format" = openmetrics ] && accept=(-H "Accept: $openmetrics_accept")
        content_type="$(curl -sf "${accept[@]}" -o "$work/$target.$format" -w '%{content_type}' "$url")"
        dump=""
        [ -n "${METRICS_DUMP_DIR:-}" ] && mkdir -p "$METRICS_DUMP_DIR" && dump="$METRICS_DUMP_DIR/$target.$format.series"
        if "$venv/bin/python" - "$format" "$content_type" "$work/$target.$format" "$dump" $expected <<'PY'
import sys

fmt, content_type, path, dump, expected = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
text = open(path, encoding="utf-8").read()
if fmt == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
    want_type = "application/openmetrics-text; version=1.0.0"
else:
    from prometheus_client.parser import text_string_to_metric_families
    want_type = "text/plain; version=0.0.4"
problems = []
if not content_type.startswith(want_type):
    problems.append(f"Content-Type {content_type!r}, expected {want_type!r}")
try:
    families = list(text_string_to_metric_families(text))
except Exception as error:  # the parser's own words name the bad line
    print(f"does not parse as {fmt}: {error}", file=sys.stderr)
    sys.exit(1)
series = set()
names = set()
for family in families:
    for sample in family.samples:
        names.add(sample.name)
        labels = dict(sample.labels)
        if "le" in labels:
            labels["le"] = repr(float(labels["le"]))
        rendered = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        series.add(f"{family.type} {sample.name}{{{rendered}}}")
problems += [f"{name} missing" for name in expected if name not in names]
if dump:
    with open(dump, "w", encoding="utf-8") as out:
        out.write("\n".join(sorted(series)) + "\n")
if problems:
    print("; ".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"{len(families)} families, {len(series)} series")
PY
        then
            log "$target /metrics as $format: parses, all expected metrics present"
        else
            log "$target /metrics as $format: FAILED (Content-Type $content_type); the body:"
            cat "$work/$target.$format" >&2
            failed=1
        fi
    done
done
[ "$failed" -eq 0 ] || exit 1
log "metrics parse with the reference parser"
