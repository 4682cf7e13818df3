#!/usr/bin/env bash
# A checkpoint save on the CPU against the disk's write bandwidth, in one call (issue 10 item 4, reproducible without a
# GPU): dd (O_DIRECT, 16 MiB blocks, conv=fsync) into the folder, then mmoc-run saves a wide model with few layers
# (LLaMA-2-7B's width, LAYERS (1) layers: ~0.46B parameters, 5.6 GB of fp32 weights and AdamW state) twice (a
# background save after step 1, the final save after step 2, which replaces the first), then dd again. Prints both
# saves' rates and the final save's end-to-end rate over the higher dd rate.
#   bash bench/save_bw.sh [BUILD_DIR (build)]   DISK=<folder> (default .bench-disk in the checkout), DD_GIB (4), LAYERS (1)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$(cd "${1:-$root/build}" && pwd)"
D="${DISK:-$root/.bench-disk}"; gib=${DD_GIB:-4}; layers=${LAYERS:-1}
R="$build/tools/run/mmoc-run" C="$build/tools/compile/mmoc-compile"
[ -x "$R" ] && [ -x "$C" ] || { echo "save_bw: $build: mmoc-run or mmoc-compile not built" >&2; exit 2; }
rm -rf "$D"; mkdir -p "$D"
tmp=$(mktemp -d); trap 'rm -rf "$tmp" "$D"' EXIT
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); disk: $(df -h "$D" | tail -1 | awk '{print $1, $2, "size,", $4, "free"}'), $(findmnt -no FSTYPE -T "$D")"
ddw() { dd if=/dev/zero of="$D/dd.bin" bs=16M count=$((gib * 64)) oflag=direct conv=fsync 2>&1 | tail -1; rm -f "$D/dd.bin"; }
ddw > "$tmp/dd1.log"; cat "$tmp/dd1.log"
python3 -c "import json; m = json.load(open('$root/configs/models/llama2-7b.json')); m.update(name='llama2-7b-${layers}l', layers=$layers); json.dump(m, open('$tmp/model.json', 'w'))"
"$C" --model "$tmp/model.json" --hardware cpu8 --gpus 1 --v 1 --schedule grouped --budget 16 --micro-batch-size 1 --microbatches 1 \
  --seq-len 16 --precision fp32 -o "$tmp/plan.json" -q
"$R" "$tmp/plan.json" --data "$root/data/sample/tiny_tokens.jsonl" --device cpu --steps 2 --save "$D/ck" --save-every 1 \
  --metrics "$tmp/m.jsonl" > "$tmp/run.log" 2>&1 || { tail -5 "$tmp/run.log"; exit 1; }
grep -E "^saved" "$tmp/run.log"
ddw > "$tmp/dd2.log"; cat "$tmp/dd2.log"
python3 - "$tmp" <<'PY'
import json, re, sys
tmp = sys.argv[1]
def dd(p):
    m = re.search(r"^(\d+) bytes .* copied, ([0-9.]+) s", open(p).read(), re.M)
    return int(m.group(1)) / float(m.group(2))
w1, w2 = dd(tmp + "/dd1.log"), dd(tmp + "/dd2.log")
w = max(w1, w2)
print("RESULT disk: write %.2f GB/s before, %.2f GB/s after the saves (dd, O_DIRECT, 16 MiB blocks)" % (w1 / 1e9, w2 / 1e9))
for x in (json.loads(l) for l in open(tmp + "/m.jsonl")):
    if "save_step" not in x: continue
    t = x["save_write_s"] if x["save_background"] else x["save_s"]
    print("RESULT save (%s, step %d): %.2f GB in %.2f s (writing %.2f s, completing %.2f s): %.2f GB/s = %.0f%% of the disk's write bandwidth%s"
          % ("background, by its writing time" if x["save_background"] else "final, end to end", x["save_step"], x["save_bytes"] / 1e9, t,
             x["save_write_s"], x.get("save_finalize_s", -1), x["save_bytes"] / t / 1e9, 100 * x["save_bytes"] / t / w,
             "" if x["save_background"] else " (writing alone %.0f%%)" % (100 * x["save_bytes"] / x["save_write_s"] / w)))
PY
