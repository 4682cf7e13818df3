#!/usr/bin/env bash
# device call (s11, calls 2 and 3): the limit case with the clock counter in the traces, then the layer alone right after the runs
# (mmoc-profile timing rounds with no gap between them)
set -u
export NOTAR=1
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
( OUT=$L/limit STEPS=4 BUDGETS="${BUDGETS:-20 48 80 130}" bash bench/gpu_bench.sh limit ) > $L/limit.out 2>&1
echo "limit case took $(( $(date +%s) - T0 )) s"
grep -h "LIMIT\|RESULT\|SUMMARY\|CLOCK\|SM clock\|decoder\|LAYER\|budget\|built\|exit\|rror" $L/limit.out | grep -v "limits.py's" | head -120
timeout ${STUDY_S:-150} build-gpu/tools/profile/mmoc-profile --base h200x1 --model llama2-7b --mbs 8 --seq 1024 --device cuda --quick --repeats 20 --recompute --warm-s 3 -o $L/prof-hot.json > $L/prof-hot.log 2>&1
echo "hot profile exit $?"; grep -E "decoder (fwd|bwd)|SM clock" $L/prof-hot.log
for b in 20 48 80; do python3 bench/layer_overhead.py $L/limit/measured-7b-$b.json $L/limit/plan-7b-$b.json $L/prof-hot.log | sed "s/^/hot $b: /"; done
echo "call took $(( $(date +%s) - T0 )) s"
cd $L && for d in limit; do rm -f $d/predicted*.json $d/tok.jsonl; gzip -f $d/measured*.json $d/plan*.json $d/smi.csv 2>/dev/null; done
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $OUT/logs
