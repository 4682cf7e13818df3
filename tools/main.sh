#!/usr/bin/env bash
# The main job: set up, build, compile the seed's LLaMA-2-7B plan for 4x L20 and print its summary,
# then train the tiny LLaMA on the sample data with that machinery (on the CPU when there is no GPU).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$(bash "$here/tools/build.sh")"
out="${MMOC_OUT:-$here/out}"
mkdir -p "$out"
echo "== mmoc-compile: the seed's job (LLaMA-2-7B, 4x L20, v=2, batch 64 x 128)"
"$build/tools/compile/mmoc-compile" "$here/configs/jobs/seed-llama2-7b-l20x4.json" -o "$out/seed-7b.plan.json" --trace "$out/seed-7b.trace.json"
if [ -x "$build/tools/run/mmoc-run" ]; then
  echo "== mmoc-run: tiny LLaMA on the sample data, 2 pipeline workers"
  "$build/tools/compile/mmoc-compile" "$here/configs/jobs/tiny-cpu.json" -o "$out/tiny.plan.json" -q
  "$build/tools/run/mmoc-run" "$out/tiny.plan.json" --data "$here/data/sample/tiny_tokens.jsonl" --steps "${MMOC_STEPS:-20}" \
      --metrics "$out/tiny.metrics.jsonl" --save "$out/tiny-ckpt"
fi
