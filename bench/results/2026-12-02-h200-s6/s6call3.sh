#!/usr/bin/env bash
# device call 3 (2026-12-02): issue 14 at 130 GiB, the CPU optimizer pool's dynamic schedule (new default) against the
# static one (MMOC_POOL_SCHEDULE=static) in the same call, same limits.py log; then 48 GiB (dynamic) if time is left
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1; set -u
O=$OUT; T0=$(date +%s); left() { echo $(( ${DEADLINE:-335} - ($(date +%s) - T0) )); }
mkdir -p $O/la $O/lb $O/lc
OUT=$O/la NOTAR=1 BUDGETS=130 STEPS=5 RUN_TIMEOUT=70 timeout 200 bash bench/gpu_bench.sh limit > $O/limit-dyn.log 2>&1; echo "limit dynamic exit $? at $(( $(date +%s)-T0 )) s"
grep -E "LIMIT|LAYER|built" $O/limit-dyn.log
OUT=$O/lb NOTAR=1 BUDGETS=130 STEPS=5 RUN_TIMEOUT=70 MMOC_POOL_SCHEDULE=static LIMITS_LOG=$O/la/limits.log timeout 80 bash bench/gpu_bench.sh limit > $O/limit-static.log 2>&1; echo "limit static exit $? at $(( $(date +%s)-T0 )) s"
grep -E "LIMIT 7b|LAYER" $O/limit-static.log | sed 's/^/static: /'
t=$(left); echo "48 GiB with $t s left"
[ $t -gt 75 ] && OUT=$O/lc NOTAR=1 BUDGETS=48 STEPS=4 RUN_TIMEOUT=$(( t - 15 )) LIMITS_LOG=$O/la/limits.log timeout $(( t - 5 )) bash bench/gpu_bench.sh limit > $O/limit-48.log 2>&1; echo "limit 48 exit $? at $(( $(date +%s)-T0 )) s"
grep -E "LIMIT 7b|LAYER" $O/limit-48.log 2>/dev/null | sed 's/^/48: /'
cd $O && tar -czf results.tgz --exclude='tok.jsonl' --exclude='predicted-*.json' *.log la lb lc 2>/dev/null; rm -rf la lb lc; ls -la $O
