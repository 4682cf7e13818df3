#!/usr/bin/env bash
set -u
L=$OUT/s2; mkdir -p $L
ninja -C build-gpu mmoc-profile > $L/build.log 2>&1 || { P=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)'); cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P" -DMMOC_WITH_TESTS=OFF -DTORCH_CUDA_ARCH_LIST=9.0 > $L/cmake.log 2>&1; ninja -C build-gpu mmoc-profile > $L/build.log 2>&1 || { grep -E "error|FAILED" $L/build.log | head; exit 1; }; }
MMOC_PROFILE_STUDY=1 timeout 150 build-gpu/tools/profile/mmoc-profile --base h200x1 --model llama2-7b --mbs 8 --seq 1024 --device cuda --quick --repeats 20 --recompute --warm-s 1 -o $L/prof.json > $L/prof.log 2>&1
echo "exit $?"; grep -E "STUDY|decoder (fwd|bwd)|SM clock|failed" $L/prof.log
