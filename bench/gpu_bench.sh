#!/usr/bin/env bash
# mmoc vs the FSDP2+CPU-offload peer on one device machine, in one call. Run from the repo root on the device:
#   bash bench/gpu_bench.sh <what> ; what = smoke | h100-7b | h200x2-7b | h200x2-13b | seed-l20x4-2gpu
# Needs the peer scripts in .carry/ (fsdp2_offload.py, limits.py from ../shared/peers). Logs go to $OUT.
set -uo pipefail
what="${1:-smoke}"
OUT="${OUT:-/tmp/mmoc-bench}"; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
root="$(pwd)"
log() { echo "[bench $(date +%H:%M:%S)] $*"; }
machine="$(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | sed 's/^ *//' | tr '\n' ' ')"
ngpu=$(nvidia-smi -L | wc -l)
log "machine: $machine($ngpu GPU), $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB host"
build="$root/build-gpu"
if [ ! -x "$build/tools/run/mmoc-run" ]; then
  P=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P" -DMMOC_WITH_TESTS=OFF \
        -DTORCH_CUDA_ARCH_LIST=9.0 > "$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
  t0=$(date +%s)
  ninja -C "$build" mmoc-run mmoc-compile mmoc-profile > "$OUT/build.log" 2>&1 || { grep -E "error|FAILED" "$OUT/build.log" | head -30; exit 1; }
  log "built in $(( $(date +%s) - t0 )) s"
fi
C="$build/tools/compile/mmoc-compile"; R="$build/tools/run/mmoc-run"
gen_data() {  # random tokens: rows of seq tokens, vocab 32000
  python3 - "$1" "$2" "$3" <<'PY'
import json, random, sys
path, rows, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
random.seed(0)
with open(path, "w") as f:
    for _ in range(rows): f.write(json.dumps({"input_ids": [random.randrange(32000) for _ in range(seq)]}) + "\n")
PY
}
median_tps() { python3 -c "
import json,sys; r=[json.loads(l) for l in open('$1')][1:]; t=sorted(x['tokens_per_s'] for x in r); print(t[len(t)//2] if t else 0)"; }
peak_gib() { python3 -c "
import json; r=[json.loads(l) for l in open('$1')]; print(' '.join('%.1f'%(b/2**30) for b in r[-1]['peak_bytes']))"; }

case "$what" in
smoke)
  # the tiny model on the GPU against the same plan on the CPU (fp32: to rounding), and bf16 against fp32
  for off in all none; do
    $C configs/jobs/tiny-cpu.json --gpus 1 --v 2 --offload $off -o "$OUT/tiny-$off.json" -q
    for dev in cpu cuda; do
      $R "$OUT/tiny-$off.json" --data data/sample/tiny_tokens.jsonl --steps 5 --device $dev -q --metrics "$OUT/tiny-$off-$dev.jsonl" 2>&1 | tail -5
    done
    python3 - "$OUT/tiny-$off-cpu.jsonl" "$OUT/tiny-$off-cuda.jsonl" <<'PY'
import json, sys
a = [json.loads(l)["loss"] for l in open(sys.argv[1])]; b = [json.loads(l)["loss"] for l in open(sys.argv[2])]
d = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print("tiny fp32 cpu vs cuda losses:", ["%.6f/%.6f" % (x, y) for x, y in zip(a, b)], "max rel diff %.2e" % d, "OK" if d < 1e-4 and len(a) == len(b) == 5 else "MISMATCH")
PY
  done
  ;;
h100-7b)
  # LLaMA-2-7B shape, 1 GPU, 48 GiB budget, 8 x 1024 tokens per micro-batch, 4 micro-batches (32,768 tokens/step)
  if [ "${SKIP_PEER:-0}" != 1 ]; then python3 .carry/limits.py > "$OUT/limits.log" 2>&1 & lim=$!; fi
  gen_data "$OUT/tok.jsonl" 160 1024
  $C --model llama2-7b --hardware h100x1 --gpus 1 --v ${V:-auto} --schedule grouped --budget 48 --micro-batch-size 8 \
     --microbatches 4 --seq-len 1024 --precision bf16 -o "$OUT/plan.json" --trace "$OUT/predicted.json" | grep -v "^  S"
  if [ "${SKIP_PEER:-0}" != 1 ]; then wait $lim; cat "$OUT/limits.log"; fi
  timeout ${RUN_TIMEOUT:-400} $R "$OUT/plan.json" --data "$OUT/tok.jsonl" --steps ${STEPS:-4} --device cuda --metrics "$OUT/mmoc.jsonl" \
     --trace "$OUT/measured.json" > "$OUT/mmoc.log" 2>&1
  echo "mmoc-run exit $?"; grep -v "^     %" "$OUT/mmoc.log" | tail -${TAIL:-20}
  if [ "${SKIP_PEER:-0}" != 1 ]; then
    timeout 300 torchrun --nproc_per_node=1 .carry/fsdp2_offload.py --layers 32 --mbs 8 --seq 1024 --accum 4 --steps 3 > "$OUT/fsdp2.log" 2>&1
    grep -E "RESULT|^step" "$OUT/fsdp2.log"
    m=$(median_tps "$OUT/mmoc.jsonl"); f=$(grep RESULT "$OUT/fsdp2.log" | sed 's/.*tokens_per_s=\([0-9]*\).*/\1/')
    python3 -c "print('RESULT h100-7b: mmoc %.0f tokens/s, fsdp2 %s tokens/s, ratio %.2f' % ($m, '$f', $m/max(1.0, float('${f:-0}' or 0))))"
  fi
  ;;
h200x2-7b)
  # LLaMA-2-7B shape on 2 GPUs, 48 GiB budget each, 65,536 tokens per step (FSDP2: 8 x 1024 x accum 4 per GPU)
  gen_data "$OUT/tok.jsonl" 256 1024
  $C --model llama2-7b --hardware h200x2 --gpus 2 --v ${V:-auto} --schedule ${SCHED:-grouped} --budget 48 --micro-batch-size 8 \
     --microbatches 8 --seq-len 1024 --precision bf16 -o "$OUT/plan7.json" --trace "$OUT/predicted7.json" | grep -v "^  S"
  timeout ${RUN_TIMEOUT:-300} $R "$OUT/plan7.json" --data "$OUT/tok.jsonl" --steps ${STEPS:-4} --device cuda --metrics "$OUT/mmoc7.jsonl" \
     --trace "$OUT/measured7.json" > "$OUT/mmoc7.log" 2>&1
  echo "mmoc-run exit $?"; grep -v "^     %" "$OUT/mmoc7.log" | tail -${TAIL:-12}
  if [ "${SKIP_PEER:-0}" != 1 ]; then
    timeout 300 torchrun --nproc_per_node=2 .carry/fsdp2_offload.py --layers 32 --mbs 8 --seq 1024 --accum 4 --steps 3 > "$OUT/fsdp2-7.log" 2>&1
    grep -E "RESULT|^step" "$OUT/fsdp2-7.log"
    m=$(median_tps "$OUT/mmoc7.jsonl"); f=$(grep RESULT "$OUT/fsdp2-7.log" | sed 's/.*tokens_per_s=\([0-9]*\).*/\1/')
    python3 -c "print('RESULT h200x2-7b: mmoc %.0f tokens/s, fsdp2 %s tokens/s, ratio %.2f' % ($m, '$f', $m/max(1.0, float('${f:-0}' or 0))))"
  fi
  ;;
h200x2-13b)
  # LLaMA-2-13B shape on 2 GPUs, 48 GiB budget each, 65,536 tokens per step; FSDP2+offload exhausts host memory here
  [ -f "$OUT/tok.jsonl" ] || gen_data "$OUT/tok.jsonl" 256 1024
  $C --model llama2-13b --hardware h200x2 --gpus 2 --v ${V:-auto} --schedule grouped --budget 48 --micro-batch-size 8 \
     --microbatches 8 --seq-len 1024 --precision bf16 -o "$OUT/plan13.json" --trace "$OUT/predicted13.json" | grep -v "^  S"
  timeout ${RUN_TIMEOUT:-400} $R "$OUT/plan13.json" --data "$OUT/tok.jsonl" --steps ${STEPS:-3} --device cuda --metrics "$OUT/mmoc13.jsonl" \
     --trace "$OUT/measured13.json" > "$OUT/mmoc13.log" 2>&1
  echo "mmoc-run exit $?"; grep -v "^     %" "$OUT/mmoc13.log" | tail -${TAIL:-12}
  # the compute-bound limit: one 13B decoder layer's forward and backward measured now, x layers x micro-batches,
  # plus the recompute forward, over 2 GPUs
  timeout 150 $build/tools/profile/mmoc-profile --base configs/hardware/h200x2.json --model llama2-13b --mbs 8 --seq 1024 \
     --device cuda --quick -o "$OUT/h200x2-13b-calibrated.json" > "$OUT/profile13.log" 2>&1; grep -E "decoder|head" "$OUT/profile13.log"
  python3 - "$OUT/profile13.log" "$OUT/mmoc13.jsonl" <<'PY'
import json, re, sys
t = {m.group(1): float(m.group(2)) for m in re.finditer(r"decoder (fwd|bwd) 8x1024\s+([0-9.]+)", open(sys.argv[1]).read())}
r = [json.loads(l) for l in open(sys.argv[2])][1:]
tps = sorted(x["tokens_per_s"] for x in r)[len(r) // 2]
limit_s = 40 * 8 * (2 * t["fwd"] + t["bwd"]) / 1000 / 2
print("RESULT h200x2-13b: mmoc %.0f tokens/s (%.2f s/step); compute-bound limit %.2f s/step -> %.0f%% of it" % (tps, 65536 / tps, limit_s, 100 * limit_s / (65536 / tps)))
PY
  ;;
esac
