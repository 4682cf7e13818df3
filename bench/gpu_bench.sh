#!/usr/bin/env bash
# mmoc vs the FSDP2+CPU-offload peer on one device machine, in one call. Run from the repo root on the device:
#   bash bench/gpu_bench.sh <what> ; what = smoke | hfcheck | families | small-3b | llama31-8b | tier | nvme-7b | nvme-peer | stretch | startup | h100-7b | limit | h200x2 (= h200x2-7b + h200x2-13b + h200x2-seed)
#                                   | h200x2-peer | h200x4 | peers | fsdp2 | ds-zero2 | ds-zero3 | ds-nvme | limits  (bench/README.md)
# SKIP_PEER=1 leaves the peer out of h100-7b and h200x2-7b; NOTAR=1 leaves the logs unpacked in $OUT (for several runs in one call)
# CALIBRATE=1 compiles each h200x2/h200x4 job for its hardware file as calibrated here by mmoc-profile at the job's shape.
# The peers are the project's own scripts in bench/peers/. The DeepSpeed cases install DeepSpeed offline from .carry/
# (made on the dev machine by bench/peers/fetch_wheels.sh; the device call carries it: carry [".carry"]). Logs go to $OUT.
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
  ninja -C "$build" mmoc-run mmoc-compile mmoc-profile mmoc-eval > "$OUT/build.log" 2>&1 || { grep -E "error|FAILED" "$OUT/build.log" | head -30; exit 1; }
  log "built in $(( $(date +%s) - t0 )) s"
fi
C="$build/tools/compile/mmoc-compile"; R="$build/tools/run/mmoc-run"
gen_data() {  # gen_data PATH ROWS SEQ [VOCAB]: random tokens, rows of seq tokens, ids below VOCAB (default 32000)
  python3 - "$1" "$2" "$3" "${4:-32000}" <<'PY'
import json, random, sys
path, rows, seq, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
random.seed(0)
with open(path, "w") as f:
    for _ in range(rows): f.write(json.dumps({"input_ids": [random.randrange(vocab) for _ in range(seq)]}) + "\n")
PY
}
preset_vocab() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab'])" "configs/models/$1.json"; }
# median_tps JSONL: tokens/s at the median step time of steps 2.. (the mean of the two middle ones for an even count)
median_tps() { python3 -c "
import json,sys; r=[json.loads(l) for l in open('$1')][1:]; t=sorted(x['step_s'] for x in r); n=len(t)
m=(t[n//2] if n%2 else (t[n//2-1]+t[n//2])/2) if n else 0; print(r[0]['tokens_per_s']*r[0]['step_s']/m if n else 0)"; }
peak_gib() { python3 -c "
import json; r=[json.loads(l) for l in open('$1')]; print(' '.join('%.1f'%(b/2**30) for b in r[-1]['peak_bytes']))"; }

# smi_start: sample every GPU's SM clock, power, utilisation, temperature and clock-limit reasons every 100 ms into $OUT/smi.csv;
# smi_mark start|end NAME brackets a part of the call; smi_stop ends the sampling and prints bench/clock_summary.py's
# CLOCK line per part (a GPU at its power limit clocks down under sustained load: docs/profile.md)
smi_start() {
  local q=timestamp,index,clocks.sm,power.draw,utilization.gpu,temperature.gpu
  : > "$OUT/windows.txt"
  if nvidia-smi --query-gpu=$q,clocks_event_reasons.active --format=csv,noheader >/dev/null 2>&1; then q=$q,clocks_event_reasons.active
  else q=$q,clocks_throttle_reasons.active; fi
  nvidia-smi --query-gpu=$q --format=csv,noheader,nounits -lms 100 > "$OUT/smi.csv" 2>/dev/null &
  smi_pid=$!
}
smi_mark() { echo "$(date +%s.%N) $1 $2" >> "$OUT/windows.txt"; }
smi_stop() { kill "$smi_pid" 2>/dev/null; wait "$smi_pid" 2>/dev/null; python3 bench/clock_summary.py "$OUT/smi.csv" "$OUT/windows.txt"; }

# mmoc_job NAME "COMPILE ARGS" DATA STEPS: compile (prediction printed), run with a measured trace, print the run's tail
# (RUN_ARGS: more mmoc-run options, e.g. "--prefetch-pool comp")
mmoc_job() {
  local name=$1 cargs=$2 data=$3 steps=$4
  log "mmoc $name: mmoc-compile $cargs"
  $C $cargs --precision bf16 -o "$OUT/plan-$name.json" --trace "$OUT/predicted-$name.json" > "$OUT/compile-$name.log" 2>&1 \
    || { cat "$OUT/compile-$name.log"; return 1; }
  grep -v "^  S\|candidate" "$OUT/compile-$name.log"
  MMOC_WATCHDOG_S=${WATCHDOG:-60} timeout ${RUN_TIMEOUT:-300} $R "$OUT/plan-$name.json" --data "$data" --steps $steps --device ${DEVICE:-cuda} \
    --metrics "$OUT/mmoc-$name.jsonl" --trace "$OUT/measured-$name.json" ${RUN_ARGS:-} > "$OUT/mmoc-$name.log" 2>&1
  echo "mmoc-run $name exit $?"; grep -v "^     %" "$OUT/mmoc-$name.log" | tail -${TAIL:-14}
  python3 - "$OUT/mmoc-$name.jsonl" "$OUT/compile-$name.log" "$name" <<'PY'
import json, re, sys
try:
    r = [json.loads(l) for l in open(sys.argv[1])]
except OSError:
    sys.exit(0)
if len(r) < 2: sys.exit(0)
c = open(sys.argv[2]).read()
pred = float(re.search(r"predicted: step ([0-9.]+) s", c).group(1))
bound = [float(x) for x in re.findall(r"bound ([0-9.]+) GiB", c)]
simpk = [float(x) for x in re.findall(r"simulated peak ([0-9.]+) GiB", c)]
t = sorted(x["step_s"] for x in r[1:]); n = len(t)
steady = t[n // 2] if n % 2 else (t[n // 2 - 1] + t[n // 2]) / 2  # the median (mean of the middle two when even)
G = 2**30
print("SUMMARY %s: step %.3f s measured (median of steps 2..%d) vs %.3f s predicted (%+.1f%%)" % (sys.argv[3], steady, len(r), pred, 100 * (pred - steady) / steady))
med = lambda k: r[1].get(k, 0) * r[1]["step_s"] / steady  # tokens and FLOPs per step are fixed: the median step's rate
print("SUMMARY %s: %.0f tokens/s, MFU %.1f%%, HFU %.1f%% of %.0f TFLOP/s bf16 peak per GPU (at the median step of steps 2..%d)"
      % (sys.argv[3], med("tokens_per_s"), 100 * med("mfu"), 100 * med("hfu"), r[-1].get("peak_tflops", 0), len(r)))
last = r[-1]
for g, (res, al) in enumerate(zip(last["peak_bytes"], last.get("peak_allocated_bytes", last["peak_bytes"]))):
    dev = last.get("device_peak_bytes", [0] * len(last["peak_bytes"]))[g]
    print("SUMMARY %s g%d: allocated peak %.2f GiB, reserved peak %.2f GiB, device total %.2f GiB; compiler: simulated %.2f, bound %.2f GiB (allocated vs simulated %+.1f%%)"
          % (sys.argv[3], g, al / G, res / G, dev / G, simpk[g], bound[g], 100 * (al / G - simpk[g]) / max(simpk[g], 1e-9)))
PY
}
# hw NAME MODEL MBS SEQ BASE: the hardware file a job compiles for: BASE, or with CALIBRATE=1 BASE calibrated here by
# mmoc-profile at the job's shape (calibrated_ms for its layers), so the job's prediction is the calibrated one
hw() {
  if [ "${CALIBRATE:-0}" = 1 ]; then
    log "calibrating $5 for $1: mmoc-profile --model $2 --mbs $3 --seq $4 --quick" >&2
    if timeout 150 $build/tools/profile/mmoc-profile --base configs/hardware/$5.json --model $2 --mbs $3 --seq $4 \
         --device cuda --quick -o "$OUT/calibrated-$1.json" > "$OUT/profile-$1.log" 2>&1; then
      echo "$OUT/calibrated-$1.json"; return
    fi
    log "calibration for $1 failed (profile-$1.log); compiling for $5" >&2
  fi
  echo "$5"
}
# peer NAME GPUS "ARGS" [SCRIPT]: a peer from bench/peers (default the FSDP2+CPU-offload one)
peer() {
  local script=${4:-fsdp2_offload.py}
  log "peer $1: torchrun --nproc_per_node=$2 bench/peers/$script $3"
  timeout ${PEER_TIMEOUT:-300} torchrun --standalone --nproc_per_node=$2 "$root/bench/peers/$script" $3 > "$OUT/$1.log" 2>&1
  echo "peer $1 exit $?"; grep -E "RESULT|^step|Error|error|Killed" "$OUT/$1.log" | tail -6
  log "host memory now: $(free -g | awk '/Mem/{print $3}') GiB used"
}
# ds_setup: DeepSpeed $DS_VERSION installed offline from .carry/ (bench/peers/fetch_wheels.sh) into build-gpu/ds-site
# (kept while the machine stays warm), libaio extracted from its .deb files for ZeRO-Infinity's NVMe path; sets
# PYTHONPATH, PATH and the compiler's paths for DeepSpeed's JIT-built ops (cached in build-gpu/torch_extensions)
DS_VERSION=${DS_VERSION:-0.19.8}
ds_setup() {
  local site="$build/ds-site" W="$root/.carry/wheels" aio="$build/libaio"
  local L="$aio/usr/lib/x86_64-linux-gnu"
  if [ ! -f "$aio/usr/include/libaio.h" ]; then
    ls "$root"/.carry/debs/*.deb > /dev/null 2>&1 || { log "no .carry/debs: run bench/peers/fetch_wheels.sh on the dev machine, carry .carry"; return 1; }
    for d in "$root"/.carry/debs/*.deb; do dpkg -x "$d" "$aio" || return 1; done
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH" TORCH_EXTENSIONS_DIR="$build/torch_extensions"
  # a JIT build killed by a timeout leaves its lock file, and the next build would wait on it for ever
  find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2> /dev/null
  export CPATH="$aio/usr/include${CPATH:+:$CPATH}" LIBRARY_PATH="$L${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export LD_LIBRARY_PATH="$L${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" CFLAGS="-I$aio/usr/include" LDFLAGS="-L$L"
  if python3 -c "import deepspeed, sys; sys.exit(deepspeed.__version__ != '$DS_VERSION')" 2> /dev/null; then return 0; fi
  [ -f "$W/deepspeed-$DS_VERSION.tar.gz" ] || { log "no $W/deepspeed-$DS_VERSION.tar.gz: run bench/peers/fetch_wheels.sh on the dev machine, carry .carry"; return 1; }
  local t0=$(date +%s) tools="$build/ds-build-tools"
  # the sdist is built against this machine's torch (--no-build-isolation) with the carried setuptools (an older one
  # may lack bdist_wheel without the `wheel` package); it is on the path for the build only
  [ -d "$tools/setuptools" ] || python3 -m pip install -q --no-index --target "$tools" "$W"/setuptools-*.whl || return 1
  PYTHONPATH="$tools:$PYTHONPATH" python3 -m pip install -q --no-index --find-links "$W" --target "$site" --no-deps \
    --no-build-isolation $(ls "$W"/*.whl | grep -v /setuptools-) "$W/deepspeed-$DS_VERSION.tar.gz" > "$OUT/ds-install.log" 2>&1 \
    || { tail -20 "$OUT/ds-install.log"; return 1; }
  log "DeepSpeed $(python3 -c 'import deepspeed; print(deepspeed.__version__)') installed offline in $(( $(date +%s) - t0 )) s"
}
# the job of the peer cases: MODEL (preset or HF config.json), LAYERS (override; default: the preset's), MBS, SEQ, MB
# (micro-batches per step and GPU), PSTEPS (timed steps), GPUS (default: all)
peer_args() { echo "--model ${MODEL:-llama2-7b} ${LAYERS:+--layers $LAYERS} --mbs ${MBS:-8} --seq ${SEQ:-1024} --microbatches ${MB:-4} --steps ${PSTEPS:-3}"; }
# ds NAME "EXTRA ARGS": the DeepSpeed peer (installed first)
ds() {
  ds_setup || { echo "RESULT $1: DeepSpeed could not be installed"; return 1; }
  # DeepSpeed's JIT op builders (async_io for the NVMe swap) parse TORCH_CUDA_ARCH_LIST as numbers: an entry like 9.0a
  # (as set on the GPU machine) fails int('0a'), so name the GPUs' plain compute capability
  TORCH_CUDA_ARCH_LIST="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | sort -u | tr '\n' ';' | sed 's/;$//')" \
    PEER_TIMEOUT=${PEER_TIMEOUT:-540} peer "$1" ${GPUS:-$ngpu} "$(peer_args) $2" ds_offload.py
}
# profile_nvme PATHS: mmoc-profile --storage-only on the NVMe tier's paths into $OUT/hw-nvme.json (the hardware file the
# tier jobs compile for), probing NVME_MIB (default 4096) MiB per path: the size of the tier's objects
profile_nvme() {
  ninja -C "$build" mmoc-profile > "$OUT/build-tier.log" 2>&1 || { tail -20 "$OUT/build-tier.log"; exit 1; }
  timeout 200 "$build/tools/profile/mmoc-profile" --storage-only --base configs/hardware/h200x1.json --nvme "$1" \
    --nvme-mib ${NVME_MIB:-4096} -o "$OUT/hw-nvme.json" > "$OUT/profile-nvme.log" 2>&1 || { tail -20 "$OUT/profile-nvme.log"; exit 1; }
}
# ratio LABEL MMOC_NAME PEER_NAME
ratio() {
  local m f
  m=$(median_tps "$OUT/mmoc-$2.jsonl" 2>/dev/null || echo 0); f=$(grep RESULT "$OUT/$3.log" 2>/dev/null | sed 's/.*tokens_per_s=\([0-9]*\).*/\1/')
  python3 -c "print('RESULT $1: mmoc %.0f tokens/s, fsdp2 %s tokens/s, ratio %.2f' % (float('${m:-0}' or 0), '${f:-n/a}', float('${m:-0}' or 0)/max(1.0, float('${f:-0}' or 0))))"
}
# compute_limit NAME MODEL LAYERS MBS SEQ MICROBATCHES GPUS: one decoder layer's forward and backward measured now
# (mmoc-profile) x layers x micro-batches, plus the recompute forward, over the GPUs; mmoc's fraction of it
compute_limit() {
  [ -s "$OUT/profile-$1.log" ] || timeout 150 $build/tools/profile/mmoc-profile --base configs/hardware/h200x2.json --model $2 --mbs $4 --seq $5 \
     --device cuda --quick -o "$OUT/calibrated-$1.json" > "$OUT/profile-$1.log" 2>&1; grep -E "decoder|head" "$OUT/profile-$1.log"
  python3 - "$OUT/profile-$1.log" "$OUT/mmoc-$1.jsonl" $3 $4 $5 $6 $7 "$1" <<'PY'
import json, re, sys
L, mbs, seq, M, G = map(int, sys.argv[3:8])
t = {m.group(1): float(m.group(2)) for m in re.finditer(r"decoder (fwd|bwd) %dx%d\s+([0-9.]+)" % (mbs, seq), open(sys.argv[1]).read())}
r = [json.loads(l) for l in open(sys.argv[2])][1:]
if not r or "fwd" not in t or "bwd" not in t:
    print("RESULT %s: no compute-bound figure (mmoc steps: %d, layer times measured: %s)" % (sys.argv[8], len(r), sorted(t)))
    sys.exit(0)
tps = sorted(x["tokens_per_s"] for x in r)[len(r) // 2]
tokens = M * mbs * seq
limit_s = L * M * (2 * t["fwd"] + t["bwd"]) / 1000 / G
print("RESULT %s: mmoc %.0f tokens/s (%.2f s/step); compute-bound limit %.2f s/step -> %.0f%% of it" % (sys.argv[8], tps, tokens / tps, limit_s, 100 * limit_s / (tokens / tps)))
PY
}
# the FSDP2 peer for the h200x2 7B job (same shape and tokens per step: 2 ranks x 8 x 1024 x accum 4) and the ratio
peer_h200x2_7b() {
  peer fsdp2-7b 2 "--model llama2-7b --mbs 8 --seq 1024 --microbatches 4 --steps ${PEER_STEPS:-3}"
  ratio h200x2-7b 7b fsdp2-7b
}
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
families)
  # every family's preset on one H200 (48 GiB budget, 32,768 tokens per step: 8 x 1024 tokens per micro-batch x 4): the
  # compiler's prediction (step time, memory) against the measured run. MODELS overrides the list. The tied 3B models
  # run 2 x 1024 x 16 here (as when a tied model had to stay in one stage); `small-3b` runs them at 8 x 1024 x 4.
  # Unless SKIP_PEER=1, the FSDP2 peer (bench/peers, the real HF shapes of the presets) runs the two 3B models at the
  # same tokens per step.
  gen_data "$OUT/tok.jsonl" 160 1024
  for m in ${MODELS:-llama3.2-3b qwen2.5-3b gpt2-xl qwen3-8b mistral-7b qwen2.5-7b llama3.1-8b}; do
    case $m in llama3.2-3b|qwen2.5-3b) mb="2 --microbatches 16";; *) mb="8 --microbatches 4";; esac
    mmoc_job $m "--model $m --hardware h200x1 --gpus 1 --v ${V:-auto} --schedule ${SCHED:-auto} --budget 48 --micro-batch-size $mb --seq-len 1024" "$OUT/tok.jsonl" ${STEPS:-4}
  done
  if [ "${SKIP_PEER:-0}" != 1 ]; then
    peer fsdp2-llama3.2-3b 1 "--model llama3.2-3b --mbs 8 --seq 1024 --microbatches 4 --steps 3"
    ratio families-llama3.2-3b llama3.2-3b fsdp2-llama3.2-3b
    peer fsdp2-qwen2.5-3b 1 "--model qwen2.5-3b --mbs 8 --seq 1024 --microbatches 4 --steps 3"
    ratio families-qwen2.5-3b qwen2.5-3b fsdp2-qwen2.5-3b
  fi
  ;;
llama31-8b)
  # issue 11: Llama-3.1-8B (128,256 vocabulary, GQA, llama3 rope) on one H200, 48 GiB budget, 8 x 1024 x 4 tokens per
  # step, v/schedule/offload/recompute auto; the compiler predicts ~112 GiB of the 125 GiB host (mmoc-compile prints it).
  # The run's peak RSS against that prediction, then (NVME=1) the same job with --host-budget ${HB:-64} and the NVMe tier
  # on NVME_PATHS (default .bench-nvme in the checkout). FSDP2 with CPU offload needs more host memory than the machine
  # has at this size (118 GiB at 7B): no peer.
  gen_data "$OUT/tok-8b.jsonl" 160 1024 "$(preset_vocab llama3.1-8b)"
  job8="--model llama3.1-8b --hardware h200x1 --gpus 1 --v ${V:-auto} --schedule ${SCHED:-auto} --budget 48 --micro-batch-size 8 --microbatches ${MB:-4} --seq-len 1024"
  mmoc_job llama31-8b "$job8" "$OUT/tok-8b.jsonl" ${STEPS:-3}
  if [ "${NVME:-0}" = 1 ]; then
    paths="${NVME_PATHS:-$root/.bench-nvme}"; IFS=, read -ra dirs <<< "$paths"; mkdir -p "${dirs[@]}"
    mmoc_job llama31-8b-nvme "$job8 --host-budget ${HB:-64} --nvme $paths" "$OUT/tok-8b.jsonl" ${STEPS:-3}
    rm -rf "${dirs[@]}"
  fi
  ;;
small-3b)
  # issue 11: the tied 3B presets (Llama-3.2-3B, Qwen2.5-3B: lm_head is the token embedding, split over stages with one
  # master copy) on one H200, 48 GiB budget, 32,768 tokens per step (8 x 1024 x 4), v and schedule auto, against the
  # FSDP2+CPU-offload peer at the same shape, in the same call; random tokens over each model's whole vocabulary
  # (128,256 / 151,936). MODELS overrides the list, STEPS / PSTEPS the steps of mmoc / the peer.
  for m in ${MODELS:-llama3.2-3b qwen2.5-3b}; do
    gen_data "$OUT/tok-$m.jsonl" 160 1024 "$(preset_vocab $m)"
    mmoc_job $m "--model $m --hardware h200x1 --gpus 1 --v ${V:-auto} --schedule ${SCHED:-auto} --budget 48 --micro-batch-size 8 --microbatches 4 --seq-len 1024" "$OUT/tok-$m.jsonl" ${STEPS:-4}
    # where the prediction and the measurement part (the tied presets were 17-24% slower than predicted)
    python3 bench/trace_compare.py "$OUT/predicted-$m.json" "$OUT/measured-$m.json" --top 10 | tee "$OUT/trace-compare-$m.log"
    if [ "${SKIP_PEER:-0}" != 1 ]; then
      peer fsdp2-$m 1 "--model $m --mbs 8 --seq 1024 --microbatches 4 --steps ${PSTEPS:-3}"
      ratio small-3b-$m $m fsdp2-$m
    fi
  done
  ;;
h100-7b)
  # LLaMA-2-7B shape, 1 GPU, 48 GiB budget, 8 x 1024 tokens per micro-batch, 4 micro-batches (32,768 tokens/step); HW=<hardware
  # file> (default h100x1, the case's first machine) and SCHED=<schedule> (default grouped) change the compile
  if [ "${SKIP_PEER:-0}" != 1 ]; then python3 bench/peers/limits.py --model llama2-7b --mbs 8 --seq 1024 > "$OUT/limits.log" 2>&1 & lim=$!; fi
  gen_data "$OUT/tok.jsonl" 160 1024
  $C --model llama2-7b --hardware ${HW:-h100x1} --gpus 1 --v ${V:-auto} --schedule ${SCHED:-grouped} --budget 48 --micro-batch-size 8 \
     --microbatches 4 --seq-len 1024 --precision bf16 -o "$OUT/plan.json" --trace "$OUT/predicted.json" | grep -v "^  S"
  if [ "${SKIP_PEER:-0}" != 1 ]; then wait $lim; cat "$OUT/limits.log"; fi
  timeout ${RUN_TIMEOUT:-400} $R "$OUT/plan.json" --data "$OUT/tok.jsonl" --steps ${STEPS:-4} --device cuda --metrics "$OUT/mmoc.jsonl" \
     --trace "$OUT/measured.json" > "$OUT/mmoc.log" 2>&1
  echo "mmoc-run exit $?"; grep -v "^     %" "$OUT/mmoc.log" | tail -${TAIL:-20}
  if [ "${SKIP_PEER:-0}" != 1 ]; then
    timeout 300 torchrun --standalone --nproc_per_node=1 bench/peers/fsdp2_offload.py --model llama2-7b --mbs 8 --seq 1024 --microbatches 4 --steps 3 > "$OUT/fsdp2.log" 2>&1
    grep -E "RESULT|^step" "$OUT/fsdp2.log"
    m=$(median_tps "$OUT/mmoc.jsonl"); f=$(grep RESULT "$OUT/fsdp2.log" | sed 's/.*tokens_per_s=\([0-9]*\).*/\1/')
    python3 -c "print('RESULT h100-7b: mmoc %.0f tokens/s, fsdp2 %s tokens/s, ratio %.2f' % ($m, '$f', $m/max(1.0, float('${f:-0}' or 0))))"
  fi
  ;;
h200x2|h200x2-7b|h200x2-13b|h200x2-seed)
  # issue 4 on nvidia-h200-x2, 48 GiB per GPU: 7B (65,536 tokens/step) vs FSDP2; 13B (FSDP2+offload exhausts host memory
  # there) against the compute-bound limit; the seed's l20x4 setting run on 2 GPUs, predicted vs measured
  gen_data "$OUT/tok.jsonl" 256 1024
  if [ "$what" = h200x2 ] || [ "$what" = h200x2-7b ]; then
    mmoc_job 7b "--model llama2-7b --hardware $(hw 7b llama2-7b 8 1024 h200x2) --gpus 2 --v ${V:-auto} --schedule ${SCHED:-grouped} --budget 48 --micro-batch-size 8 --microbatches 8 --seq-len 1024" "$OUT/tok.jsonl" ${STEPS:-4}
    [ "${SKIP_PEER:-0}" = 1 ] || peer_h200x2_7b
  fi
  if [ "$what" = h200x2 ] || [ "$what" = h200x2-13b ]; then
    mmoc_job 13b "--model llama2-13b --hardware $(hw 13b llama2-13b 8 1024 h200x2) --gpus 2 --v ${V13:-auto} --schedule grouped --budget 48 --micro-batch-size 8 --microbatches 8 --seq-len 1024" "$OUT/tok.jsonl" ${STEPS:-3}
    compute_limit 13b llama2-13b 40 8 1024 8 2
  fi
  if [ "$what" = h200x2 ] || [ "$what" = h200x2-seed ]; then
    # the seed's job (7B, v=2, batch 8 x 8 x 128, 44 GiB), compiled for its own l20x4 machine on 2 GPUs (prediction only)
    # and for the machine it runs on here
    $C configs/jobs/seed-llama2-7b-l20x4.json --gpus 2 -o "$OUT/plan-seed-l20.json" | grep -E "^predicted|g[0-9]  sim"
    gen_data "$OUT/tok128.jsonl" 512 128
    mmoc_job seed "configs/jobs/seed-llama2-7b-l20x4.json --gpus 2 --hardware $(hw seed llama2-7b 8 128 h200x2)" "$OUT/tok128.jsonl" ${STEPS:-6}
  fi
  ;;
h200x2-peer)
  # the FSDP2 peer for h200x2-7b on its own (run after h200x2-7b with SKIP_PEER=1 NOTAR=1 into the same $OUT)
  peer_h200x2_7b
  ;;
h200x4)
  # issue 6 on nvidia-h200-x4: the seed's configuration (v=2, 8 x 8 x 128 tokens per step) on 4 GPUs, 48 GiB per GPU,
  # 7B and 13B, against FSDP2+offload with the same tokens per step (4 GPUs x 8 x 128 x accum 2)
  gen_data "$OUT/tok128.jsonl" 512 128
  mmoc_job seed4-7b "configs/jobs/seed-llama2-7b-l20x4.json --hardware $(hw seed4-7b llama2-7b 8 128 h200x4) --gpus 4 --v 2 --budget 48" "$OUT/tok128.jsonl" ${STEPS:-6}
  peer fsdp2-seed4-7b 4 "--model llama2-7b --mbs 8 --seq 128 --microbatches 2 --steps 3"
  ratio h200x4-seed-7b seed4-7b fsdp2-seed4-7b
  mmoc_job seed4-13b "configs/jobs/seed-llama2-13b-l20x4.json --hardware $(hw seed4-13b llama2-13b 8 128 h200x4) --gpus 4 --v 2 --budget 48" "$OUT/tok128.jsonl" ${STEPS:-6}
  peer fsdp2-seed4-13b 4 "--model llama2-13b --mbs 8 --seq 128 --microbatches 2 --steps 3"
  ratio h200x4-seed-13b seed4-13b fsdp2-seed4-13b
  ;;
tier)
  # issue 13: the NVMe tier's I/O layer on this machine's disk(s): dd with direct I/O vs TierStore (threads; uring where
  # built with liburing and working), two processes with and without the device token, mmoc-profile --storage-only.
  # NVME_PATHS=dir[,dir] (default /tmp/mmoc-tier), NVME_MIB (default 4096), SWEEP=1 adds request size x queue depth
  paths="${NVME_PATHS:-/tmp/mmoc-tier}"; IFS=, read -ra dirs <<< "$paths"; mkdir -p "${dirs[@]}"
  ninja -C "$build" mmoc_tier_bench mmoc-profile > "$OUT/build-tier.log" 2>&1 || { tail -20 "$OUT/build-tier.log"; exit 1; }
  "$build/engine/tier/mmoc_tier_bench" --paths "$paths" --size-mib ${NVME_MIB:-4096} ${SWEEP:+--sweep} 2>&1 | tee "$OUT/bench-tier.log"
  "$build/tools/profile/mmoc-profile" --storage-only --base configs/hardware/h200x1.json --nvme "$paths" -o "$OUT/hw-storage.json" 2>&1 | tail -12
  ;;
nvme-7b)
  # issue 13 on nvidia-h200: LLaMA-2-7B with --host-budget ${HB:-48} GiB and the NVMe tier on this machine's disk
  # (NVME_PATHS=dir[,dir], default .bench-nvme in the checkout), in one call:
  #  - mmoc-profile --storage-only on the paths (direct I/O read/write GB/s, into the hardware file the job compiles for),
  #  - the tier run: measured peak RSS (getrusage of the worker) vs the budget, NVMe traffic rate (tier bytes / time the
  #    reads and writes took) vs the profiled bandwidth, predicted vs measured step time,
  #  - the all-in-host-memory run of the same job: tokens/s of both.
  # MB micro-batches of 8 x 1024 per step (default 16; the compiler predicts ~50 s/step, I/O-bound: ~45 GiB of optimizer
  # state each way per step at the default 2 GB/s), STEPS (default 3), BUDGET GiB per GPU (default 48).
  # The I/O hidden under compute (bench/README.md): BUDGET=130 MB=48 ORDERS=0 STEPS=2 (the grouped schedule updates each
  # stage after its own backward, so the tier's reads and writes run while the lower stages compute; the compiler
  # predicts the tier plan within 1% of the all-in-host-memory plan).
  # The profile's probe is NVME_MIB (default 4096) MiB per path, the size of the tier's objects (GB-sized stage states),
  # not a burst a disk's cache absorbs; dd with direct I/O (8 GiB, 16 MiB blocks) is reported beside it.
  paths="${NVME_PATHS:-$root/.bench-nvme}"; IFS=, read -ra dirs <<< "$paths"; mkdir -p "${dirs[@]}"
  log "disk: $(df -h "${dirs[0]}" | tail -1)"
  dd if=/dev/zero of="${dirs[0]}/dd.bin" bs=16M count=512 oflag=direct conv=fsync 2> "$OUT/dd-write.log"
  dd if="${dirs[0]}/dd.bin" of=/dev/null bs=16M iflag=direct 2> "$OUT/dd-read.log"; rm -f "${dirs[0]}/dd.bin"
  log "dd (direct I/O, 8 GiB): write $(tail -1 "$OUT/dd-write.log" | awk -F, '{print $NF}'), read $(tail -1 "$OUT/dd-read.log" | awk -F, '{print $NF}')"
  profile_nvme "$paths"
  grep -iE "GB/s|read|write" "$OUT/profile-nvme.log" | tail -6
  gen_data "$OUT/tok.jsonl" 400 1024
  job="--model llama2-7b --gpus 1 --v ${V:-auto} --schedule grouped --budget ${BUDGET:-48} --micro-batch-size 8 --microbatches ${MB:-16} --seq-len 1024"
  mmoc_job nvme7b "$job --hardware $OUT/hw-nvme.json --host-budget ${HB:-48} --nvme $paths" "$OUT/tok.jsonl" ${STEPS:-3}
  grep -E "^host memory|nvme" "$OUT/compile-nvme7b.log" | head -4
  mmoc_job host7b "$job --hardware $OUT/hw-nvme.json" "$OUT/tok.jsonl" ${STEPS:-3}
  python3 - "$OUT/mmoc-nvme7b.jsonl" "$OUT/mmoc-host7b.jsonl" "$OUT/hw-nvme.json" "${HB:-48}" <<'PY'
import json, sys
def rows(p):
    try: return [json.loads(l) for l in open(p)]
    except OSError: return []
t, h = rows(sys.argv[1]), rows(sys.argv[2])
hw = json.load(open(sys.argv[3])); st = hw.get("storage", [])
G = 2**30
if not t:
    print("RESULT nvme-7b: the tier run produced no steps"); sys.exit(0)
rss = max(r.get("host_peak_rss_bytes", [0])[0] for r in t)
print("RESULT nvme-7b: peak RSS %.1f GiB with --host-budget %s GiB (%s)" % (rss / G, sys.argv[4], "within" if rss <= float(sys.argv[4]) * G else "OVER"))
steady = t[1:] or t
rb = sum(sum(r.get("tier_read_bytes", [0])) for r in steady); wb = sum(sum(r.get("tier_write_bytes", [0])) for r in steady)
rs = sum(sum(r.get("tier_read_s", [0])) for r in steady); ws = sum(sum(r.get("tier_write_s", [0])) for r in steady)
pr = sum(p.get("read_gbps", 0) for p in st); pw = sum(p.get("write_gbps", 0) for p in st)
if rs > 0 and ws > 0 and pr > 0 and pw > 0:
    print("RESULT nvme-7b: NVMe read %.1f GB/step at %.2f GB/s (%.0f%% of profiled %.2f), write %.1f GB/step at %.2f GB/s (%.0f%% of profiled %.2f)"
          % (rb / 1e9 / len(steady), rb / 1e9 / rs, 100 * rb / 1e9 / rs / pr, pr, wb / 1e9 / len(steady), wb / 1e9 / ws, 100 * wb / 1e9 / ws / pw, pw))
tps = lambda r: sorted(x["tokens_per_s"] for x in (r[1:] or r))[len(r[1:] or r) // 2] if r else 0
print("RESULT nvme-7b: tokens/s with the tier %.0f, all in host memory %.0f (ratio %.2f)" % (tps(t), tps(h), tps(t) / max(tps(h), 1e-9)))
PY
  # the update order (docs/nvme-tier.md, "The alternating update order"): the same tier job with --update-order fixed
  # and alternate, STEPS_ORDER steps each (default 5: two steady steps of each parity after the first); per step the
  # tier bytes measured against the compiler's prediction, and tokens/s. ORDERS=0 leaves it out.
  if [ "${ORDERS:-1}" = 1 ]; then
    for o in fixed alternate; do
      mmoc_job "nvme7b-$o" "$job --hardware $OUT/hw-nvme.json --host-budget ${HB:-48} --nvme $paths --update-order $o" "$OUT/tok.jsonl" ${STEPS_ORDER:-5}
      grep -E "^nvme tier|^update order" "$OUT/compile-nvme7b-$o.log"
    done
    python3 - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
res = {}
for o in ("fixed", "alternate"):
    try: r = [json.loads(l) for l in open(f"{out}/mmoc-nvme7b-{o}.jsonl")]
    except OSError: r = []
    c = open(f"{out}/compile-nvme7b-{o}.log").read()
    m = re.search(r"([0-9.]+) GB read \+ ([0-9.]+) GB written per step", c)
    pred_gb = float(m.group(1)) + float(m.group(2)) if m else 0
    pred_s = float(re.search(r"predicted: step ([0-9.]+) s", c).group(1))
    steady = r[1:] or r
    gb = [(sum(x.get("tier_read_bytes", [0])) + sum(x.get("tier_write_bytes", [0]))) / 1e9 for x in steady]
    tps = sorted(x["tokens_per_s"] for x in steady)
    res[o] = (pred_gb, gb, pred_s, tps[len(tps) // 2] if tps else 0)
    print("RESULT nvme-7b order %s: tier I/O per step predicted %.1f GB, measured %s GB; predicted step %.1f s; tokens/s %.0f"
          % (o, pred_gb, " ".join("%.1f" % g for g in gb), pred_s, res[o][3]))
if all(res[o][1] for o in res):
    f, a = res["fixed"], res["alternate"]
    mean = lambda v: sum(v) / len(v)
    print("RESULT nvme-7b order: alternate/fixed tier I/O measured %.3f (predicted %.3f), tokens/s %.3f (predicted %.3f)"
          % (mean(a[1]) / mean(f[1]), a[0] / max(f[0], 1e-9), a[3] / max(f[3], 1e-9), f[2] / max(a[2], 1e-9)))
PY
  fi
  [ "${KEEP_NVME:-0}" = 1 ] || rm -rf "${dirs[@]}"
  ;;
nvme-peer)
  # issue 13's peer in one call: DeepSpeed ZeRO-Infinity (bench/peers/ds_offload.py --stage 3 --nvme: parameters and
  # optimizer state on NVMe) against mmoc with every stage offloaded and all optimizer state on the NVMe tier
  # (--offload all --nvme-place all; the weights stay in host memory), the same job on the same disk. The model is
  # LLaMA-2-7B's shape with LAYERS (default 8) decoder layers, 1.9B parameters: ZeRO-Infinity puts at least 14 B/param
  # on the disk (fp32 master weights and AdamW moments, bf16 parameters), ~95 GB for the full 7B, more than the GPU
  # machine's 64 GB disk. MB micro-batches of 8 x 1024 (default 4), STEPS (default 3), PSTEPS (default 2).
  paths="${NVME_PATHS:-$root/.bench-nvme}"; IFS=, read -ra dirs <<< "$paths"; mkdir -p "${dirs[@]}"
  log "disk: $(df -h "${dirs[0]}" | tail -1)"
  profile_nvme "$paths"
  grep -iE "GB/s" "$OUT/profile-nvme.log" | tail -2
  L=${LAYERS:-8}
  python3 -c "import json,sys; m=json.load(open('configs/models/llama2-7b.json')); m.update(name='llama2-7b-l$L', layers=$L, comment='LLaMA-2-7B shape, $L layers'); json.dump(m, open(sys.argv[1], 'w'))" "$OUT/llama2-7b-l$L.json"
  gen_data "$OUT/tok.jsonl" 200 1024
  mmoc_job nvmepeer "--model $OUT/llama2-7b-l$L.json --gpus 1 --v auto --schedule grouped --budget 48 --micro-batch-size 8 --microbatches ${MB:-4} --seq-len 1024 --offload all --hardware $OUT/hw-nvme.json --nvme $paths --nvme-place all" "$OUT/tok.jsonl" ${STEPS:-3}
  grep -E "^nvme tier" "$OUT/compile-nvmepeer.log"
  rm -rf "${dirs[@]}"; mkdir -p "${dirs[0]}/ds"
  PEER_TIMEOUT=${PEER_TIMEOUT:-360} PSTEPS=${PSTEPS:-2} MODEL=llama2-7b LAYERS=$L MB=${MB:-4} ds ds-nvme "--stage 3 --nvme ${dirs[0]}/ds"
  m=$(median_tps "$OUT/mmoc-nvmepeer.jsonl" 2>/dev/null || echo 0); f=$(grep RESULT "$OUT/ds-nvme.log" 2>/dev/null | sed 's/.*tokens_per_s=\([0-9.]*\).*/\1/')
  python3 -c "print('RESULT nvme-peer (LLaMA-2-7B shape, $L layers): mmoc with the NVMe tier %.0f tokens/s, DeepSpeed ZeRO-Infinity NVMe %s tokens/s, ratio %.2f' % (float('${m:-0}' or 0), '${f:-n/a}', float('${m:-0}' or 0)/max(1.0, float('${f:-0}' or 0))))"
  [ "${KEEP_NVME:-0}" = 1 ] || rm -rf "${dirs[@]}"
  ;;
stretch)
  # issue 13's stretch on nvidia-h200: the largest LLaMA on one H200 with host memory and disk. LLaMA-2-13B at --budget 130
  # with --host-budget ${HB:-64} GiB and the NVMe tier on this disk (the compiler puts ~35 GiB of optimizer state there
  # at 64), MB micro-batches of 8 x 1024 (default 8), STEPS (default 2); then the compiler's answer for the next size up
  # (CodeLlama-34B, the LLaMA-2 family's next checkpoint): it needs more host memory than the node has even with all of
  # its optimizer state on the tier (gradients and weight staging stay in host memory), and says how much.
  paths="${NVME_PATHS:-$root/.bench-nvme}"; IFS=, read -ra dirs <<< "$paths"; mkdir -p "${dirs[@]}"
  log "disk: $(df -h "${dirs[0]}" | tail -1)"
  profile_nvme "$paths"
  gen_data "$OUT/tok.jsonl" 200 1024
  job="--model llama2-13b --gpus 1 --budget 130 --micro-batch-size 8 --microbatches ${MB:-8} --seq-len 1024"
  mmoc_job stretch13b "$job --hardware $OUT/hw-nvme.json --host-budget ${HB:-64} --nvme $paths" "$OUT/tok.jsonl" ${STEPS:-2}
  grep -E "^predicted|^host memory|^nvme tier|  g0  predicted" "$OUT/compile-stretch13b.log" | head -5
  python3 - "$OUT/mmoc-stretch13b.jsonl" "${HB:-64}" <<'PY'
import json, sys
try: r = [json.loads(l) for l in open(sys.argv[1])]
except OSError: r = []
if not r: print("RESULT stretch: LLaMA-2-13B produced no steps"); sys.exit(0)
rss = max(x.get("host_peak_rss_bytes", [0])[0] for x in r); s = r[1:] or r
print("RESULT stretch: LLaMA-2-13B on one H200, --host-budget %s GiB + NVMe: %d steps, %.0f tokens/s (step %.1f s), loss %s, peak RSS %.1f GiB"
      % (sys.argv[2], len(r), sorted(x["tokens_per_s"] for x in s)[len(s) // 2], s[-1]["step_s"], r[-1].get("loss"), rss / 2**30))
PY
  "$C" --model codellama-34b --hardware "$OUT/hw-nvme.json" --gpus 1 --budget 130 --micro-batch-size 8 --microbatches 8 --seq-len 1024 \
    --nvme "$paths" -q -o "$OUT/cl34.plan" > "$OUT/compile-cl34.log" 2>&1
  echo "RESULT stretch: next size up, CodeLlama-34B, mmoc-compile exit $?: $(grep error "$OUT/compile-cl34.log" | cut -c1-400)"
  [ "${KEEP_NVME:-0}" = 1 ] || rm -rf "${dirs[@]}"
  ;;
startup)
  # issue 10 item 4 on nvidia-h200, one call: the disk's write and read bandwidth (dd, O_DIRECT, 8 GiB), then
  #  - 7B ready to train from random init (goal: within 15 s of launch),
  #  - 7B ready from an HF checkpoint (bf16 shards written here) against the disk's read time (goal: read time + 5 s),
  #  - a 1.9B model (7B-wide, 8 layers; 22.5 GB of weights and AdamW state) saved against the write bandwidth
  #    (goal: >= 80%), resumed from it, and saved in the background every step (the optimizer's wait);
  # DISK=<folder> puts the files elsewhere (default: .bench-disk in the checkout, on the machine's disk)
  D="${DISK:-$root/.bench-disk}"; rm -rf "$D"; mkdir -p "$D"
  log "disk: $(df -h "$D" | tail -1)"
  dd if=/dev/zero of="$D/dd.bin" bs=16M count=512 oflag=direct conv=fsync 2> "$OUT/dd-write.log"; tail -1 "$OUT/dd-write.log"
  dd if="$D/dd.bin" of=/dev/null bs=16M iflag=direct 2> "$OUT/dd-read.log"; tail -1 "$OUT/dd-read.log"
  rm -f "$D/dd.bin"
  gen_data "$OUT/tok.jsonl" 64 1024
  job7="--model llama2-7b --hardware h200x1 --gpus 1 --v ${V:-auto} --schedule grouped --budget 48 --micro-batch-size 8 --microbatches 4 --seq-len 1024 --precision bf16"
  $C $job7 -o "$OUT/plan-7b.json" -q || exit 1
  log "7B from random init, 1 step"
  timeout ${RUN_TIMEOUT:-400} $R "$OUT/plan-7b.json" --data "$OUT/tok.jsonl" --steps 1 --device cuda --metrics "$OUT/init-7b.jsonl" > "$OUT/init-7b.log" 2>&1
  echo "exit $?"; grep -E "ready after|^step|error" "$OUT/init-7b.log"
  log "7B HF checkpoint (bf16, 5 GB shards) written by transformers-free python, then --init"
  python3 - "$D/hf7b" <<'PY'
import json, os, sys, torch
from safetensors.torch import save_file
out = sys.argv[1]; os.makedirs(out, exist_ok=True)
L, H, F, V = 32, 4096, 11008, 32000
names = [("model.embed_tokens.weight", (V, H))]
for i in range(L):
    p = f"model.layers.{i}."
    names += [(p + "input_layernorm.weight", (H,)), (p + "self_attn.q_proj.weight", (H, H)), (p + "self_attn.k_proj.weight", (H, H)),
              (p + "self_attn.v_proj.weight", (H, H)), (p + "self_attn.o_proj.weight", (H, H)), (p + "post_attention_layernorm.weight", (H,)),
              (p + "mlp.gate_proj.weight", (F, H)), (p + "mlp.up_proj.weight", (F, H)), (p + "mlp.down_proj.weight", (H, F))]
names += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
g = torch.Generator(device="cuda").manual_seed(0)
shards, cur, size = [], {}, 0
for n, s in names:
    t = torch.randn(s, generator=g, device="cuda", dtype=torch.bfloat16).mul_(0.02).cpu() if len(s) == 2 else torch.ones(s, dtype=torch.bfloat16)
    if cur and size + t.numel() * 2 > 5e9: shards.append(cur); cur, size = {}, 0
    cur[n] = t; size += t.numel() * 2
shards.append(cur)
wm, total = {}, 0
for k, sh in enumerate(shards):
    fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(sh, os.path.join(out, fn), metadata={"format": "pt"})
    for n, t in sh.items(): wm[n] = fn; total += t.numel() * 2
json.dump({"metadata": {"total_size": total}, "weight_map": wm}, open(os.path.join(out, "model.safetensors.index.json"), "w"))
json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": F, "num_hidden_layers": L,
           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": V, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "max_position_embeddings": 4096, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
          open(os.path.join(out, "config.json"), "w"))
os.sync()
print("wrote %.2f GB in %d shards" % (total / 1e9, len(shards)))
PY
  timeout ${RUN_TIMEOUT:-400} $R "$OUT/plan-7b.json" --data "$OUT/tok.jsonl" --steps 1 --device cuda --init "$D/hf7b" --metrics "$OUT/hf-7b.jsonl" > "$OUT/hf-7b.log" 2>&1
  echo "exit $?"; grep -E "ready after|^step|error" "$OUT/hf-7b.log"; rm -rf "$D/hf7b"
  # 1.9B: the 7B's shape with 8 layers
  python3 -c "import json; m = json.load(open('configs/models/llama2-7b.json')); m.update(name='llama2-7b-8l', layers=8); json.dump(m, open('$OUT/llama2-7b-8l.json', 'w'))"
  $C --model "$OUT/llama2-7b-8l.json" --hardware h200x1 --gpus 1 --v ${V19:-auto} --schedule grouped --budget 48 --micro-batch-size 8 \
     --microbatches 4 --seq-len 1024 --precision bf16 -o "$OUT/plan-19.json" -q || exit 1
  log "1.9B: 2 steps, a background save after step 1, the final save after step 2"
  timeout ${RUN_TIMEOUT:-400} $R "$OUT/plan-19.json" --data "$OUT/tok.jsonl" --steps 2 --device cuda --save "$D/ck19" --save-every 1 \
     --metrics "$OUT/save-19.jsonl" > "$OUT/save-19.log" 2>&1
  echo "exit $?"; grep -E "ready after|^step|saved|error" "$OUT/save-19.log"
  # the disk again right after the saves (this virtual disk's rate drifts between and within calls)
  dd if=/dev/zero of="$D/dd.bin" bs=16M count=512 oflag=direct conv=fsync 2> "$OUT/dd-write2.log"; tail -1 "$OUT/dd-write2.log"; rm -f "$D/dd.bin"
  log "1.9B: resume (weights + AdamW state), then --init of its HF shards (fp32)"
  timeout ${RUN_TIMEOUT:-400} $R "$OUT/plan-19.json" --data "$OUT/tok.jsonl" --steps 3 --device cuda --resume "$D/ck19" --metrics "$OUT/resume-19.jsonl" > "$OUT/resume-19.log" 2>&1
  echo "exit $?"; grep -E "ready after|^step|error" "$OUT/resume-19.log"
  timeout ${RUN_TIMEOUT:-400} $R "$OUT/plan-19.json" --data "$OUT/tok.jsonl" --steps 1 --device cuda --init "$D/ck19" --metrics "$OUT/init-19.jsonl" > "$OUT/init-19.log" 2>&1
  echo "exit $?"; grep -E "ready after|^step|error" "$OUT/init-19.log"
  du -sh "$D/ck19"; rm -rf "$D"
  python3 - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
def dd(path):  # "8589934592 bytes (8.6 GB, 8.0 GiB) copied, 3.9 s, 2.2 GB/s"
    m = re.search(r"^(\d+) bytes .* copied, ([0-9.]+) s", open(path).read(), re.M)
    return int(m.group(1)) / float(m.group(2)) if m else float("nan")
def first(path):
    try: return json.loads(open(path).readline())
    except (OSError, ValueError): return {}
def lines(path):
    try: return [json.loads(l) for l in open(path)]
    except (OSError, ValueError): return []
w, r = dd(out + "/dd-write.log"), dd(out + "/dd-read.log")
print("RESULT disk: write %.2f GB/s, read %.2f GB/s (dd, O_DIRECT, 16 MiB blocks, 8 GiB)" % (w / 1e9, r / 1e9))
w2 = dd(out + "/dd-write2.log")
if w2 == w2:  # the write rate measured again right after the saves; the saves are compared with the higher of the two
    print("RESULT disk after the saves: write %.2f GB/s (dd as above)" % (w2 / 1e9))
    w = max(w, w2)
i7 = first(out + "/init-7b.jsonl")
if i7: print("RESULT 7B random init: ready %.1f s after launch (goal <= 15 s; %s), of which set-up %.1f s and init %.1f s"
           % (i7.get("launch_ready_s", i7.get("ready_s", -1)), "met" if i7.get("launch_ready_s", 99) <= 15 else "NOT met", i7.get("setup_s", -1), i7.get("init_s", -1)))
h7 = first(out + "/hf-7b.jsonl")
if h7 and h7.get("load_bytes"):
    t_disk = h7["load_bytes"] / r
    print("RESULT 7B HF --init: ready %.1f s after launch, weights %.1f s for %.2f GB (reads %.1f s at %.2f GB/s); disk read time %.1f s + 5 s = %.1f s -> %s"
          % (h7.get("launch_ready_s", -1), h7["load_s"], h7["load_bytes"] / 1e9, h7["load_read_s"], h7["load_bytes"] / 1e9 / max(h7["load_read_s"], 1e-9),
             t_disk, t_disk + 5, "met" if h7.get("launch_ready_s", 1e9) <= t_disk + 5 else "NOT met"))
sv = [x for x in lines(out + "/save-19.jsonl") if "save_step" in x]
for x in sv:  # the final save end to end (writes, fsyncs, the swap); a background one by its writing time
    t = x["save_write_s"] if x["save_background"] else x["save_s"]
    rate = x["save_bytes"] / t
    print("RESULT 1.9B save (%s, step %d): %.2f GB in %.1f s (%.1f s of it writing, %.1f s completing the folder), %.2f GB/s = %.0f%% of the disk's write bandwidth (goal >= 80%%)%s"
          % ("background" if x["save_background"] else "final", x["save_step"], x["save_bytes"] / 1e9, t, x["save_write_s"], x.get("save_finalize_s", -1), rate / 1e9, 100 * rate / w,
             "; the next step's updates waited %.1f s for it" % x.get("save_optimizer_wait_s", 0) if x["save_background"] else ""))
for name, f in (("resume", "/resume-19.jsonl"), ("HF --init (fp32 shards)", "/init-19.jsonl")):
    x = first(out + f)
    if x.get("load_bytes"):
        print("RESULT 1.9B %s: %.2f GB in %.1f s (reads %.1f s, %.2f GB/s = %.0f%% of the disk's read bandwidth); ready %.1f s after launch"
              % (name, x["load_bytes"] / 1e9, x["load_s"], x["load_read_s"], x["load_bytes"] / 1e9 / max(x["load_read_s"], 1e-9),
                 100 * x["load_bytes"] / max(x["load_read_s"], 1e-9) / r, x.get("launch_ready_s", -1)))
PY
  ;;
hfcheck)
  # mmoc's model on CUDA against HF transformers' AutoModelForCausalLM on the same safetensors (fp32 and bf16), and the
  # first bf16 training step's loss, for every family (llama, llama3, qwen2, qwen3, mistral, gpt2): random mid-size
  # models that transformers writes here, plus the project's HF fixtures, made here by the project's script
  # (transformers of the machine)
  python3 tools/scripts/make_hf_fixtures.py "$OUT/fixtures" || exit 1
  python3 tests/gpu/hf_gpu_check.py "$build" "$OUT/hfcheck" --fixtures "$OUT/fixtures/hf-tiny" 2>&1 | grep --line-buffered -v "it/s\]" | tee "$OUT/hfcheck.log"
  rm -rf "$OUT/hfcheck" "$OUT/fixtures"
  ;;
peers)
  # issue 10's comparison in one call: mmoc (48 GiB budget) and FSDP2 at MODEL with LAYERS decoder layers (default the
  # 16-layer 7B-wide model, 3.5B, where DeepSpeed fits the 125 GiB host), 8 x 1024 x 4 tokens per step and GPU; the
  # DeepSpeed stages are separate calls (ds-zero2, ds-zero3: their install and JIT builds take minutes)
  MODEL=${MODEL:-llama2-7b}; LAYERS=${LAYERS:-16}
  python3 - "$MODEL" "$LAYERS" "$OUT/model.json" <<'PY'
import json, os, sys
m, L, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
j = json.load(open(m if m.endswith(".json") else os.path.join("configs/models", m + ".json")))
j["layers"] = L; j["name"] = f"{j.get('name', 'model')}-{L}l"; j.pop("comment", None)
json.dump(j, open(out, "w"))
PY
  gen_data "$OUT/tok.jsonl" 256 ${SEQ:-1024}
  mmoc_job peers "--model $OUT/model.json --hardware ${HW:-h200x1} --gpus ${GPUS:-$ngpu} --v ${V:-auto} --schedule ${SCHED:-auto} --budget ${BUDGET:-48} --micro-batch-size ${MBS:-8} --microbatches ${MB:-4} --seq-len ${SEQ:-1024}" "$OUT/tok.jsonl" ${STEPS:-4}
  peer fsdp2-peers ${GPUS:-$ngpu} "$(peer_args)"
  ratio peers peers fsdp2-peers
  ;;
fsdp2)
  # the FSDP2 peer alone at MODEL / LAYERS / MBS / SEQ / MB (e.g. MODEL=qwen2.5-3b for issue 11)
  peer fsdp2 ${GPUS:-$ngpu} "$(peer_args)"
  ;;
ds-zero2)
  # DeepSpeed ZeRO-Offload: stage 2, optimizer state and step on the CPU
  ds ds-zero2 "--stage 2"
  ;;
ds-zero3)
  # DeepSpeed ZeRO-Infinity with CPU offload: stage 3, parameters and optimizer state on the CPU
  ds ds-zero3 "--stage 3"
  ;;
ds-nvme)
  # ZeRO-Infinity to NVMe: NVME=<folder on the NVMe disk> (default $OUT/nvme)
  mkdir -p "${NVME:-$OUT/nvme}"
  ds ds-nvme "--stage 3 --nvme ${NVME:-$OUT/nvme}"
  rm -rf "${NVME:-$OUT/nvme}"
  ;;
limit)
  # issue 14 on nvidia-h200, one call: LLaMA-2-7B (8 x 1024 tokens x 4 micro-batches, bf16, auto v/schedule/offload/
  # recompute) at budgets BUDGETS (default 20 48 80 130 GiB), after limits.py once at the job's shape (alone on the GPU);
  # per budget: tokens/s, MFU, the recompute-inclusive limit L x M x (fwd+bwd + fwd) and the no-recompute limit
  # L x M x (fwd+bwd) from limits.py's layer, the fraction of each, the measured peak memory against the budget and the
  # simulator's step against the measured one (bench/README.md)
  # HW=<hardware file> compiles for another file (e.g. a larger reserve_gib: the plan leaves the caching allocator
  # headroom under the engine's cap, which stays budget - memory outside the allocator); LIMITS_LOG=<file> reuses a
  # limits.py log of the same call instead of measuring again; LIMIT_ARGS adds mmoc-compile options (e.g.
  # "--gpu-optim-stream comp": the resident stages' AdamW in line on the compute stream, as before its own stream);
  # PROFILE_ARGS adds mmoc-profile options (e.g. "--warm-s 10")
  if [ -n "${LIMITS_LOG:-}" ]; then cp "$LIMITS_LOG" "$OUT/limits.log"; else
    log "limits.py at the job's shape"
    timeout 200 python3 bench/peers/limits.py --model llama2-7b --mbs 8 --seq 1024 --transfer-mib 512 --adam-params 2e7 \
      --memcpy-mib 256 > "$OUT/limits.log" 2>&1; echo "limits.py exit $?"
  fi; grep -E "layer|RESULT" "$OUT/limits.log"
  # the engine's own layer alone (the reference of "what the engine adds to a layer" below), timed at the GPU's
  # sustained clock (mmoc-profile's warm-up); the SM clock is sampled through the profile and every run
  smi_start
  log "mmoc-profile at the job's shape"
  smi_mark start mmoc-profile
  timeout 200 "$build/tools/profile/mmoc-profile" --base h200x1 --model llama2-7b --mbs 8 --seq 1024 --device cuda --quick \
    --repeats 20 --recompute ${PROFILE_ARGS:-} -o "$OUT/profile-layer.json" > "$OUT/profile-layer.log" 2>&1; echo "mmoc-profile exit $?"
  smi_mark end mmoc-profile
  grep -E "decoder (fwd|bwd)|SM clock" "$OUT/profile-layer.log"
  gen_data "$OUT/tok.jsonl" 160 1024
  for b in ${BUDGETS:-20 48 80 130}; do
    smi_mark start mmoc-run-7b-$b
    TAIL=${TAIL:-4} mmoc_job 7b-$b "--model llama2-7b --hardware ${HW:-h200x1} --gpus 1 --v ${V:-auto} --schedule ${SCHED:-auto} --budget $b --micro-batch-size 8 --microbatches 4 --seq-len 1024 ${LIMIT_ARGS:-}" "$OUT/tok.jsonl" ${STEPS:-3}
    smi_mark end mmoc-run-7b-$b
  done
  smi_stop
  python3 bench/limit_summary.py "$OUT" 32 4 ${BUDGETS:-20 48 80 130}
  # what the engine adds to a layer: the one-layer stages' forward/backward in the measured trace vs the engine's layer
  # alone (mmoc-profile), and vs HF's (limits.py)
  for b in ${BUDGETS:-20 48 80 130}; do
    echo "budget $b GiB:"
    python3 bench/layer_overhead.py "$OUT/measured-7b-$b.json" "$OUT/plan-7b-$b.json" "$OUT/profile-layer.log"
    python3 bench/layer_overhead.py "$OUT/measured-7b-$b.json" "$OUT/plan-7b-$b.json" "$OUT/limits.log"
  done
  ;;
limits)
  # the machine's limits at the job's shape (pinned H2D/D2H, bf16 matmul, one decoder layer, CPU AdamW, host memcpy)
  python3 bench/peers/limits.py --model ${MODEL:-llama2-7b} ${LAYERS:+--layers $LAYERS} --mbs ${MBS:-8} --seq ${SEQ:-1024} 2>&1 | tee "$OUT/limits.log"
  ;;
*)
  echo "gpu_bench.sh: unknown case '$what'"; exit 2
  ;;
esac
# what comes back from the device is at most 8 files: pack everything but the logs' summary into one archive
[ "${NOTAR:-0}" = 1 ] && exit 0
( cd "$OUT" && ls | grep -v '^results-.*\.tgz$\|^bench.*\.log$' > .list && tar czf "results-$what.tgz" -T .list && xargs rm -rf < .list; rm -f .list )
