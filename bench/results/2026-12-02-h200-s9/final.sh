#!/usr/bin/env bash
# device call: the final tree's kernels test and the layer alone (fused vs ATen)
set -u
L=$OUT/f; mkdir -p $L
P=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P" -DMMOC_WITH_TESTS=ON -DTORCH_CUDA_ARCH_LIST=9.0 > $L/cmake.log 2>&1 || { tail -30 $L/cmake.log; exit 1; }
ninja -C build-gpu mmoc-profile mmoc_model_test > $L/build.log 2>&1 || { grep -E "error|FAILED" $L/build.log | head -30; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
T=$(find build-gpu -name mmoc_model_test -type f | head -1)
$T -tc="mmoc*CUDA kernels*" > $L/test-kernels.log 2>&1; echo "kernels test exit $?"; tail -4 $L/test-kernels.log; grep -B3 -A10 "ERROR" $L/test-kernels.log | head -40
for g in fused aten; do
  if [ $g = aten ]; then export MMOC_KERNELS=aten; else unset MMOC_KERNELS; fi
  timeout 70 build-gpu/tools/profile/mmoc-profile --base h200x1 --model llama2-7b --mbs 8 --seq 1024 --device cuda --quick --repeats 20 --recompute -o $L/prof-$g.json > $L/prof-$g.log 2>&1
  echo "== $g exit $?"; grep -E "decoder (fwd|bwd)" $L/prof-$g.log
done
