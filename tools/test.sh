#!/usr/bin/env bash
# Sets up a fresh machine (tools/setup.sh), builds everything and runs every test (ctest).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$(bash "$here/tools/build.sh")"
cd "$build"
ctest --output-on-failure -j "${MMOC_TEST_JOBS:-2}" "$@"
