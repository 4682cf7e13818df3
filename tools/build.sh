#!/usr/bin/env bash
# Configures and builds mmoc into build/ (or $MMOC_BUILD_DIR) after tools/setup.sh. Extra args: ninja targets.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$here/tools/setup.sh")"
build="${MMOC_BUILD_DIR:-$here/build}"
prefix="$("$venv/bin/python" -c 'import torch;print(torch.utils.cmake_prefix_path)')"
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/mmoc/ccache}"
# Paths relative to the checkout's parent, so clones and worktrees side by side share cache hits.
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$(dirname "$here")}"
if [ ! -f "$build/build.ninja" ]; then
  cmake -S "$here" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_PREFIX_PATH="$prefix" \
        -DPython3_EXECUTABLE="$venv/bin/python" -DMMOC_VENV="$venv" >&2
fi
jobs="${MMOC_JOBS:-$(nproc)}"
cmake --build "$build" -j "$jobs" ${1:+--target "$@"} >&2
echo "$build"
