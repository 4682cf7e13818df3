#!/usr/bin/env bash
# device call 2 (2026-12-02): issue 13's peer alone (nvme-peer: DeepSpeed ZeRO-Infinity vs the tier, 8-layer 7B shape)
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1; set -u
O=$OUT; T0=$(date +%s); left() { echo $(( ${DEADLINE:-585} - ($(date +%s) - T0) )); }
mkdir -p $O/np
t=$(( $(left) - 10 )); echo "nvme-peer with $t s left"
OUT=$O/np NOTAR=1 STEPS=3 PSTEPS=2 RUN_TIMEOUT=120 PEER_TIMEOUT=$(( t - 200 )) timeout $t bash bench/gpu_bench.sh nvme-peer > $O/nvme-peer.log 2>&1; echo "nvme-peer exit $? at $(( $(date +%s)-T0 )) s"
grep -E "RESULT|DeepSpeed|exit|error|Error" $O/nvme-peer.log | head -20
rm -rf .bench-nvme
cd $O && tar -czf results.tgz --exclude='tok.jsonl' --exclude='predicted-*.json' *.log np 2>/dev/null; rm -rf np; ls -la $O
