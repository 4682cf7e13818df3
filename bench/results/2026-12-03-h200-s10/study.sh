#!/usr/bin/env bash
# device call: what makes the engine's no-grad forward slower in a step than alone (issue 14), with the GPU's clocks
set -u
L=$OUT/s; mkdir -p $L
P=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P" -DMMOC_WITH_TESTS=OFF -DTORCH_CUDA_ARCH_LIST=9.0 > $L/cmake.log 2>&1 || { tail -30 $L/cmake.log; exit 1; }
ninja -C build-gpu mmoc-run mmoc-compile mmoc-profile mmoc-eval > $L/build.log 2>&1 || { grep -E "error|FAILED" $L/build.log | head -30; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
Q=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_event_reasons.active
nvidia-smi --query-gpu=$Q --format=csv -lms 20 > $L/smi.csv 2>&1 &
smi=$!
sleep 1; head -3 $L/smi.csv
nvidia-smi -q -d POWER,CLOCK,PERFORMANCE > $L/smi-q.txt 2>&1
MMOC_PROFILE_STUDY=1 timeout 150 build-gpu/tools/profile/mmoc-profile --base h200x1 --model llama2-7b --mbs 8 --seq 1024 --device cuda --quick --repeats 20 --recompute -o $L/prof.json > $L/prof.log 2>&1
echo "profile exit $?"; grep -E "STUDY|decoder (fwd|bwd)" $L/prof.log
date +%s.%N > $L/run-start.txt
( OUT=$L/limit STEPS=4 BUDGETS="48" LIMITS_LOG=.carry/limits-s9.log NOTAR=1 bash bench/gpu_bench.sh limit ) > $L/limit.out 2>&1
date +%s.%N > $L/run-end.txt
kill $smi
grep -h "LAYER\|RESULT\|SUMMARY\|exit\|rror" $L/limit.out | head -40
cd $L && rm -f limit/predicted*.json limit/tok.jsonl; gzip -f limit/measured*.json limit/plan*.json smi.csv
