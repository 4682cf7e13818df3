#!/usr/bin/env bash
# device call: Llama-3.2-3B at 48 GiB on one H200 (bench/cost_check.py's llama3.2-3b job), no peer
set -u
mkdir -p $OUT/s3b
( OUT=$OUT/s3b MODELS=llama3.2-3b SKIP_PEER=1 STEPS=4 NOTAR=1 RUN_TIMEOUT=150 bash bench/gpu_bench.sh small-3b ) > $OUT/s3b.log 2>&1
grep -E "SUMMARY|built|exit|rror" $OUT/s3b.log | head
rm -f $OUT/s3b/plan*.json $OUT/s3b/predicted*.json $OUT/s3b/tok*.jsonl $OUT/s3b/measured*.json
