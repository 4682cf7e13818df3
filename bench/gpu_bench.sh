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
  ninja -C "$build" mmoc-run mmoc-compile > "$OUT/build.log" 2>&1 || { grep -E "error|FAILED" "$OUT/build.log" | head -30; exit 1; }
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
esac
