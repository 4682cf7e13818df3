#!/usr/bin/env bash
# device call A: build (tests on), RopeQKV's CUDA test, mmoc-profile A/B (fused vs MMOC_KERNELS=aten) with kernel tables
set -u
L=$OUT/a; mkdir -p $L
P=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P" -DMMOC_WITH_TESTS=ON -DTORCH_CUDA_ARCH_LIST=9.0 > $L/cmake.log 2>&1 || { tail -30 $L/cmake.log; exit 1; }
ninja -C build-gpu mmoc-run mmoc-compile mmoc-profile mmoc-eval mmoc_model_test > $L/build.log 2>&1 || { grep -E "error|FAILED" $L/build.log | head -30; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
T=$(find build-gpu -name mmoc_model_test -type f | head -1)
$T -tc="mmoc*CUDA kernels*" > $L/test-rope.log 2>&1; rc=$?; echo "kernels test exit $rc"; tail -4 $L/test-rope.log; grep -B3 -A10 "ERROR" $L/test-rope.log | head -60
M=build-gpu/tools/profile/mmoc-profile
for g in fused aten; do
  if [ $g = aten ]; then export MMOC_KERNELS=aten; else unset MMOC_KERNELS; fi
  $M --base h200x1 --model llama2-7b --mbs 8 --seq 1024 --device cuda --quick --repeats 20 --recompute --kernels 22 -o $L/prof-$g.json > $L/prof-$g.log 2>&1
  echo "== $g exit $?"; grep -E "decoder|kernels of" $L/prof-$g.log | head -8
done
unset MMOC_KERNELS
grep -A23 "kernels of the decoder forward+backward" $L/prof-fused.log | head -24

if [ "${LIMIT:-0}" = 1 ]; then
  export NOTAR=1
  ( OUT=$L/limit STEPS=${STEPS:-4} bash bench/gpu_bench.sh limit ) > $L/limit.out 2>&1
  grep -h "LIMIT\|RESULT\|SUMMARY\|layer\|exit\|predicted\|rror" $L/limit.out | head -60
  (cd $L/limit && rm -f plan*.json predicted*.json tok.jsonl; gzip -f measured*.json 2>/dev/null)
fi
tar czf $OUT/logs-a.tgz -C $OUT a && rm -rf $L
