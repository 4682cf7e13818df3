#!/usr/bin/env bash
# next session, device call 1 (planned 2026-12-02): issue 14 at 130 GiB, the allocator pool of prefetched weights
# (--prefetch-pool h2d vs comp, same call, same limits.py log, 5 steps each: allocator retries per step and the head's
# forward), then issue 13's peer (nvme-peer: DeepSpeed ZeRO-Infinity vs the tier, 12-layer 7B shape) in the time left.
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1; set -u
O=$OUT; T0=$(date +%s); left() { echo $(( ${DEADLINE:-580} - ($(date +%s) - T0) )); }
mkdir -p $O/la $O/lb $O/np
OUT=$O/la NOTAR=1 BUDGETS=130 STEPS=5 RUN_TIMEOUT=70 timeout 200 bash bench/gpu_bench.sh limit > $O/limit-h2d.log 2>&1; echo "limit h2d exit $? at $(( $(date +%s)-T0 )) s"
grep -E "LIMIT|LAYER|built" $O/limit-h2d.log
OUT=$O/lb NOTAR=1 BUDGETS=130 STEPS=5 RUN_TIMEOUT=70 RUN_ARGS="--prefetch-pool comp" LIMITS_LOG=$O/la/limits.log timeout 90 bash bench/gpu_bench.sh limit > $O/limit-comp.log 2>&1; echo "limit comp-pool exit $? at $(( $(date +%s)-T0 )) s"
grep -E "LIMIT 7b|LAYER" $O/limit-comp.log | sed 's/^/comp-pool: /'
( ninja -C build-gpu mmoc_adamw_bench > $O/adamw-build.log 2>&1 && timeout 90 build-gpu/engine/optim/mmoc_adamw_bench --params 200000000 --iters 3 --memcpy-mib 2048 --grad bf16 --out bf16 --pin > $O/adamw-2e8.log 2>&1; echo "adamw bench exit $?"; cat $O/adamw-2e8.log | tail -20 ); echo "adamw done at $(( $(date +%s)-T0 )) s"
rm -rf .bench-nvme
cd $O && tar -czf results.tgz --exclude='tok.jsonl' --exclude='predicted-*.json' *.log la lb np 2>/dev/null; rm -rf la lb np; ls -la $O
