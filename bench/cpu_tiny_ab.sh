#!/usr/bin/env bash
# The CPU engine's speed, before and after a change: the README's main job (configs/jobs/tiny-cpu.json, the tiny
# LLaMA on the sample data, 2 CPU ranks) run by two builds in turn, RUNS times each, STEPS steps per run; prints each
# run's steps/s (mean over steps 2..STEPS) and the median per build, and the ratio new/old. Runs alternate, so load
# from other work on the machine falls on both builds alike.
#   bash bench/cpu_tiny_ab.sh OLD_BUILD_DIR NEW_BUILD_DIR [RUNS (6)] [STEPS (40)]
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,6p "$0"; exit 2; }
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
old=$1 new=$2 runs=${3:-6} steps=${4:-40}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for w in old new; do
  b=${!w}
  [ -x "$b/tools/run/mmoc-run" ] || { echo "cpu_tiny_ab: $b/tools/run/mmoc-run: not built" >&2; exit 2; }
  "$b/tools/compile/mmoc-compile" "$root/configs/jobs/tiny-cpu.json" -o "$tmp/$w.plan.json" > /dev/null
done
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); old $old, new $new; $runs runs x $steps steps"
for r in $(seq "$runs"); do
  for w in old new; do
    b=${!w}
    "$b/tools/run/mmoc-run" "$tmp/$w.plan.json" --data "$root/data/sample/tiny_tokens.jsonl" --steps "$steps" --device cpu \
      --metrics "$tmp/$w-$r.jsonl" > "$tmp/$w-$r.log" 2>&1 || { tail -5 "$tmp/$w-$r.log"; exit 1; }
  done
done
python3 - "$tmp" "$runs" <<'PY'
import json, statistics, sys
tmp, runs = sys.argv[1], int(sys.argv[2])
med = {}
for w in ("old", "new"):
    rates = []
    for r in range(1, runs + 1):
        x = [json.loads(l) for l in open(f"{tmp}/{w}-{r}.jsonl")][1:]
        rates.append(len(x) / sum(y["step_s"] for y in x))
    med[w] = statistics.median(rates)
    print(f"{w}: steps/s per run " + " ".join("%.2f" % v for v in rates) + f", median {med[w]:.2f}")
print("RESULT cpu-tiny: new/old %.3f (median steps/s %.2f vs %.2f)" % (med["new"] / med["old"], med["new"], med["old"]))
PY
