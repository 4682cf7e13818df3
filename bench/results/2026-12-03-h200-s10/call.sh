#!/usr/bin/env bash
# device call: bash .carry/call.sh limit|peer ; logs to $OUT/logs.tgz
set -u
export NOTAR=1
what=$1
L=$OUT/logs; mkdir -p $L
if [ $what = limit ]; then ( OUT=$L/limit STEPS=${STEPS:-4} BUDGETS="${BUDGETS:-20 48 80 130}" bash bench/gpu_bench.sh limit ) > $L/limit.out 2>&1; fi
if [ $what = peer ]; then ( OUT=$L/peer HW=h200x1 SCHED=auto STEPS=4 bash bench/gpu_bench.sh h100-7b ) > $L/peer.out 2>&1; fi
grep -h "LIMIT\|RESULT\|SUMMARY\|CLOCK\|SM clock\|decoder\|LAYER\|budget\|built\|exit\|predicted\|rror" $L/$what.out | head -120
cd $L && for d in limit peer; do [ -d $d ] || continue; rm -f $d/predicted*.json $d/tok.jsonl; gzip -f $d/measured*.json $d/plan*.json $d/smi.csv 2>/dev/null; done
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $OUT/logs
