#!/usr/bin/env bash
# Rewrites the golden plans (tests/golden/*.txt) from the current compiler: builds mmoc-compile in the given build
# folder (default: build-ptests) and runs the `passes_golden` test with UPDATE_GOLDEN=1. To add a golden plan,
# create tests/golden/<name>.txt holding only the line `; command: mmoc-compile <args>` and run this.
# Review the result with `git diff tests/golden` before committing.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
build="${1:-build-ptests}"
case "$build" in /*) ;; *) build="$root/$build" ;; esac
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S "$root" -B "$build" -G Ninja -DMMOC_WITH_ENGINE=OFF
fi
cmake --build "$build" --target mmoc-compile
UPDATE_GOLDEN=1 ctest --test-dir "$build" -R '^passes_golden$' -V
