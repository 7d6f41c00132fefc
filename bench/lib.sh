# Shared helpers for bench/*.sh, .ci/bench-smoke.sh: a private Redis and SeaweedFS on free ports.
# Source it; call bench_init OUTDIR, then bench_start_redis / bench_start_s3. Everything started
# is stopped by bench_cleanup (installed as the EXIT trap by bench_init).

bench_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bench_pids=()

bench_cleanup() {
    local status=$?
    set +e
    for pid in "${bench_pids[@]}"; do kill "$pid" 2>/dev/null; done
    sleep 0.5
    for pid in "${bench_pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
    wait 2>/dev/null
    [ -n "${bench_out:-}" ] && rm -rf "$bench_out/weed/data"
    exit $status
}

bench_init() {
    bench_out="$1"
    mkdir -p "$bench_out"
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
    bench_bin="${KLINGQ_BIN:-$bench_root/target/release/klingq}"
    if [ ! -x "$bench_bin" ]; then
        echo "building $bench_bin" >&2
        (cd "$bench_root" && cargo build --release -p klingq >&2)
    fi
}

bench_free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# A private redis-server without persistence; exports KLINGQ_REDIS_URL and bench_redis_port.
bench_start_redis() {
    bench_redis_port="$(bench_free_ports 1)"
    redis-server --bind 127.0.0.1 --port "$bench_redis_port" --save "" --appendonly no \
        --logfile "$bench_out/redis.log" &
    bench_pids+=($!)
    for _ in $(seq 1 100); do redis-cli -p "$bench_redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    redis-cli -p "$bench_redis_port" ping >/dev/null
    export KLINGQ_REDIS_URL="redis://127.0.0.1:$bench_redis_port"
}

# A private SeaweedFS (`weed mini`); exports the S3 settings and bench_s3_url.
bench_start_s3() {
    local weed="${KLINGQ_WEED_BIN:-}"
    [ -n "$weed" ] || weed="$(bash "$bench_root/.ci/install-seaweedfs.sh")"
    local -a p
    read -r -a p <<<"$(bench_free_ports 9)"
    mkdir -p "$bench_out/weed/data"
    cat >"$bench_out/weed/s3.json" <<JSON
{"identities":[{"name":"admin","credentials":[{"accessKey":"test","secretKey":"testtesttest"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
    (cd "$bench_out/weed" && exec "$weed" mini -dir="$bench_out/weed/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -s3.port="${p[0]}" -master.port="${p[1]}" -volume.port="${p[2]}" -filer.port="${p[3]}" \
        -admin.port="${p[4]}" -master.port.grpc="${p[5]}" -volume.port.grpc="${p[6]}" \
        -filer.port.grpc="${p[7]}" -admin.port.grpc="${p[8]}" \
        -s3.config="$bench_out/weed/s3.json" -webdav=false -admin.ui=false \
        -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false -volume.max=20 \
        >"$bench_out/weed.log" 2>&1) &
    bench_pids+=($!)
    bench_s3_url="http://127.0.0.1:${p[0]}"
    local code=000
    for _ in $(seq 1 600); do
        code="$(curl -s -m 1 -o /dev/null -w '%{http_code}' "$bench_s3_url/" || true)"
        [ "$code" != "000" ] && break
        sleep 0.1
    done
    [ "$code" != "000" ] || { echo "SeaweedFS did not start (see $bench_out/weed.log)" >&2; return 1; }
    export KLINGQ_S3_ENDPOINT="$bench_s3_url" KLINGQ_S3_BUCKET="klingq-bench" KLINGQ_S3_FORCE_PATH_STYLE=true
    export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=testtesttest AWS_REGION=us-east-1
}

# The last line of a command's output (its JSON figures), with the whole output teed to a log.
bench_json() {
    local log="$1"; shift
    "$@" 2>"$log.err" | tee "$log" >&2
    tail -n 1 "$log"
}
