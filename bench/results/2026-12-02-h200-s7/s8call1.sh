#!/usr/bin/env bash
# session 8, device call 1: issue 14's "done when" with the head's loss in pieces and selective recompute (auto): all
# four budgets in one call, 4 steps each; then, with the time left, 130 GiB with --selective off (A/B, same limits.log)
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1; set -u
O=$OUT; T0=$(date +%s)
mkdir -p $O/l $O/off
OUT=$O/l NOTAR=1 STEPS=4 RUN_TIMEOUT=90 timeout 450 bash bench/gpu_bench.sh limit > $O/limit.log 2>&1; echo "limit exit $? at $(( $(date +%s)-T0 )) s"
grep -E "LIMIT|LAYER|built|budget|selective" $O/limit.log | head -60
if [ $(( $(date +%s)-T0 )) -lt 470 ]; then
  OUT=$O/off NOTAR=1 STEPS=4 RUN_TIMEOUT=90 BUDGETS=130 LIMITS_LOG=$O/l/limits.log LIMIT_ARGS="--selective off" timeout $(( 575-($(date +%s)-T0) )) bash bench/gpu_bench.sh limit > $O/limit-off.log 2>&1; echo "limit-off exit $? at $(( $(date +%s)-T0 )) s"
  grep -E "LIMIT" $O/limit-off.log
fi
cd $O && tar -czf results.tgz --exclude='tok.jsonl' --exclude='predicted-*.json' *.log l off 2>/dev/null; rm -rf l off; ls -la $O
