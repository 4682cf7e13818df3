#!/usr/bin/env bash
# Run HERE (a machine with a package index), not on the GPU machine: downloads what the DeepSpeed peer needs there,
# where there is no package index, into the git-ignored .carry/ folder that a device call carries along
# (run's `carry: [".carry"]`); bench/gpu_bench.sh installs it offline when a DeepSpeed case runs (bench/README.md).
#
#   bash bench/peers/fetch_wheels.sh [DEST (default .carry)]
#
#   DEST/wheels/  deepspeed-0.19.8.tar.gz (PyPI has no wheel of it: the sdist is built there, against the machine's
#                 torch) and wheels of its requirements (its requirements/requirements.txt, without torch and numpy,
#                 which the GPU machine has) plus nvidia-ml-py (setup.py adds it where torch sees CUDA) and setuptools
#                 (to build the sdist there: >= 70.1, which needs no `wheel` package, and < 82, torch 2.11's bound),
#                 for CPython $PY_VERSION (3.12, the GPU machine's) on manylinux x86_64 (glibc <= $GLIBC, 2.39 = Ubuntu 24.04)
#   DEST/debs/    libaio's runtime and -dev packages (ZeRO-Infinity's NVMe path JIT-builds DeepSpeed's async_io op
#                 against libaio.h / libaio.so): this machine's apt's (`apt-get download`, signature-checked by apt);
#                 gpu_bench.sh only extracts them (dpkg -x), so any Debian/Ubuntu amd64 build of libaio works
#   DEST/SHA256SUMS
# Environment: PYTHON (a python with pip, default python3), DS_VERSION (0.19.8), PY_VERSION (3.12), GLIBC (2.39).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest="${1:-$root/.carry}"
PY="${PYTHON:-python3}"
DS="${DS_VERSION:-0.19.8}"
PYV="${PY_VERSION:-3.12}"
GLIBC="${GLIBC:-2.39}"
log() { echo "[fetch_wheels] $*" >&2; }
mkdir -p "$dest/wheels" "$dest/debs"
W="$dest/wheels"
pip=("$PY" -m pip --disable-pip-version-check)

log "deepspeed==$DS (source distribution)"
"${pip[@]}" download -q --no-deps --no-binary=:all: "deepspeed==$DS" -d "$W"
sdist="$W/deepspeed-$DS.tar.gz"
[ -f "$sdist" ] || { log "no $sdist after pip download"; exit 1; }

# its install requirements, read from the sdist itself
mapfile -t reqs < <(tar -xzOf "$sdist" "deepspeed-$DS/requirements/requirements.txt" \
  | sed 's/#.*//; s/[[:space:]]//g' | grep -v '^$' | grep -viE '^(torch|numpy)([<>=!~;[]|$)')
# setuptools: >= 70.1 builds wheels without the `wheel` package; torch 2.11 requires < 82
reqs+=(nvidia-ml-py "setuptools>=70.1,<82")
log "requirements for CPython $PYV, manylinux x86_64 (glibc <= $GLIBC): ${reqs[*]}"
"${pip[@]}" download -q --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform "manylinux_${GLIBC/./_}_x86_64" --platform manylinux2014_x86_64 --platform any \
  -d "$W" "${reqs[@]}"

log "libaio packages (apt-get download)"
if apt-cache show libaio1t64 > /dev/null 2>&1; then rt=libaio1t64; else rt=libaio1; fi
( cd "$dest/debs" && rm -f ./*.deb && apt-get download -q -o APT::Sandbox::User=root "$rt" libaio-dev > /dev/null )
ls "$dest/debs"/*.deb > /dev/null

( cd "$dest" && find wheels debs -type f | sort | xargs sha256sum > SHA256SUMS )
log "done: $(ls "$W" | wc -l) files in $W, $(ls "$dest/debs" | wc -l) in $dest/debs, $(du -sh "$dest" | cut -f1) in all"
ls -1 "$W" "$dest/debs" >&2
