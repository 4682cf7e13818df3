#!/usr/bin/env bash
# device call: the decoder layer through the engine's model code, plain autograd graph vs the trimmed one (mmoc-profile)
set -u
export NOTAR=1
( OUT=$OUT/b bash bench/gpu_bench.sh none ) > $OUT/build.out 2>&1
P=build-gpu/tools/profile/mmoc-profile
for i in 1 2; do
  for g in plain trim; do
    if [ $g = plain ]; then export MMOC_LAYER_GRAPH=plain; else unset MMOC_LAYER_GRAPH; fi
    $P --base h200x1 --model llama2-7b --mbs 8 --seq 1024 --device cuda --quick --repeats 30 --recompute -o $OUT/prof-$g-$i.json > $OUT/prof-$g-$i.log 2>&1
    echo "== $g run $i"; grep -iE 'decoder' $OUT/prof-$g-$i.log | head -8
  done
done
rm -rf $OUT/b
