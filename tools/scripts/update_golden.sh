#!/usr/bin/env bash
# Rewrites the golden plans from the current compiler: builds mmoc-compile in the given build folder (default:
# build-ptests) and runs the golden tests with UPDATE_GOLDEN=1: `passes_golden` (tests/golden/*.txt, whole
# pipeline) and `passes_golden_per_pass` (tests/golden/passes/*.txt, each pass on its frozen input). To add a golden
# plan, create a file holding only the line `; command: mmoc-compile <args>` and run this.
# The frozen inputs of the per-pass goldens (tests/golden/passes/inputs/) are rewritten only with --inputs (after a
# change of the plan format, say): UPDATE_GOLDEN=1 check_golden.py on that folder.
# Review the result with `git diff tests/golden` before committing.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
build="${1:-build-ptests}"   # usage: update_golden.sh [build-dir] [--inputs]
case "$build" in /*) ;; *) build="$root/$build" ;; esac
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S "$root" -B "$build" -G Ninja -DMMOC_WITH_ENGINE=OFF
fi
cmake --build "$build" --target mmoc-compile
if [ "${2:-}" = "--inputs" ]; then
  UPDATE_GOLDEN=1 python3 "$root/tests/golden/check_golden.py" --compiler "$build/tools/compile/mmoc-compile" \
    --root "$root" --golden-dir "$root/tests/golden/passes/inputs"
fi
UPDATE_GOLDEN=1 ctest --test-dir "$build" -R '^passes_golden' -V
