#!/usr/bin/env bash
# session 8, device call 3: issue 14's "done when" again with SwiGluDown on every LLaMA layer (one cat instead of the
# narrows' zero-filled gradients): all four budgets, 4 steps each, with the layer-overhead lines
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1; set -u
O=$OUT; T0=$(date +%s)
mkdir -p $O/l
OUT=$O/l NOTAR=1 STEPS=4 RUN_TIMEOUT=90 timeout 540 bash bench/gpu_bench.sh limit > $O/limit.log 2>&1; echo "limit exit $? at $(( $(date +%s)-T0 )) s"
grep -E "LIMIT|LAYER|built|budget [0-9]+ GiB:" $O/limit.log | head -60
cd $O && tar -czf results.tgz --exclude='tok.jsonl' --exclude='predicted-*.json' --exclude='plan-*.json' *.log l 2>/dev/null; rm -rf l; ls -la $O
