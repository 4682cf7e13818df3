#!/usr/bin/env bash
# next session, device call 2: the FSDP2 peer against mmoc at 48 GiB in one call (h100-7b case), with the chunked loss
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1; set -u
O=$OUT; T0=$(date +%s)
mkdir -p $O/h
OUT=$O/h NOTAR=1 timeout 570 bash bench/gpu_bench.sh h100-7b > $O/h100-7b.log 2>&1; echo "h100-7b exit $? at $(( $(date +%s)-T0 )) s"
grep -E "RESULT|LIMIT|SUMMARY" $O/h100-7b.log
cd $O && tar -czf results.tgz --exclude='tok.jsonl' --exclude='predicted-*.json' *.log h 2>/dev/null; rm -rf h; ls -la $O
