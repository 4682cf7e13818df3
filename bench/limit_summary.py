#!/usr/bin/env python3
"""The `limit` case's summary (bench/gpu_bench.sh limit): per budget, mmoc's 7B run against the machine's limits.

    python3 bench/limit_summary.py OUT LAYERS MICROBATCHES BUDGET_GIB...

Reads OUT/limits.log (limits.py: RESULT ... layer_fwd_ms=.. layer_fwdbwd_ms=..) and, per budget B, OUT/mmoc-7b-B.jsonl
(mmoc-run --metrics) and OUT/compile-7b-B.log (mmoc-compile's summary: "predicted: step X s"). Prints one line per
budget:
  LIMIT 7b-B: tokens/s, MFU, HFU; limit with recompute LAYERS x MB x (fwd+bwd + fwd) and without LAYERS x MB x
  (fwd+bwd), mmoc's fraction of each (limit / measured step); measured peak GPU memory (the process's: allocator
  reserved + context/NCCL) against the budget; the simulator's step against the measured one and its error.
Steps after the first count: the median step time (the mean of the two middle ones for an even count), and tokens/s,
MFU and HFU of that step time (so tokens/s and s/step always agree). A missing file gives a line saying so. Exit 0
always (a summary, not a check).
"""
import json
import re
import sys

G = 2**30


def median(xs):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def main(argv):
    if len(argv) < 4:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out, L, M = argv[0], int(argv[1]), int(argv[2])
    budgets = argv[3:]
    fwd = fwdbwd = None
    try:
        m = re.search(r"^RESULT peer=limits .*", open(f"{out}/limits.log").read(), re.M)
        if m:
            kv = dict(x.split("=", 1) for x in m.group(0).split()[1:])
            fwd, fwdbwd = float(kv["layer_fwd_ms"]), float(kv["layer_fwdbwd_ms"])
    except (OSError, KeyError, ValueError):
        pass
    if fwd is None:
        print("LIMIT: no layer times from limits.py (limits.log); the limits are left out")
    else:
        rc, norc = L * M * (fwdbwd + fwd) / 1e3, L * M * fwdbwd / 1e3
        print("LIMIT layer: forward %.2f ms, forward+backward %.2f ms -> limit with recompute %d x %d x (%.2f + %.2f) ms = %.3f s,"
              " without recompute %d x %d x %.2f ms = %.3f s" % (fwd, fwdbwd, L, M, fwdbwd, fwd, rc, L, M, fwdbwd, norc))
    for b in budgets:
        name = f"7b-{b}"
        try:
            r = [json.loads(x) for x in open(f"{out}/mmoc-{name}.jsonl") if x.strip()]
        except (OSError, ValueError):
            r = []
        if len(r) < 2:
            print(f"LIMIT {name}: no run to summarise ({len(r)} steps in mmoc-{name}.jsonl)")
            continue
        steady = r[1:]
        step = median([x["step_s"] for x in steady])
        # per step: tokens and FLOPs are fixed, so the rates of the median step are each rate x its step / the median
        rate = lambda k: median([x.get(k, 0) * x["step_s"] for x in steady]) / step
        tps, mfu, hfu = rate("tokens_per_s"), rate("mfu"), rate("hfu")
        peak = max(max(x.get("device_peak_bytes", x["peak_bytes"])) for x in steady) / G
        line = f"LIMIT {name}: {tps:.0f} tokens/s ({step:.3f} s/step), MFU {100 * mfu:.1f}%, HFU {100 * hfu:.1f}%"
        if fwd is not None:
            line += f"; limits {rc:.3f} s with recompute ({100 * rc / step:.1f}% of it), {norc:.3f} s without ({100 * norc / step:.1f}%)"
        line += f"; peak {peak:.1f} of {float(b):.0f} GiB ({100 * peak / float(b):.0f}%)"
        if any("alloc_retries" in x for x in steady):  # the caching allocator at its cap: cache released, retried
            line += "; allocator retries per step " + "/".join(str(int(sum(x.get("alloc_retries", [0])))) for x in steady)
        try:
            pm = re.search(r"predicted: step ([0-9.]+) s", open(f"{out}/compile-{name}.log").read())
            pred = float(pm.group(1)) if pm else None
        except OSError:
            pred = None
        line += f"; simulator {pred:.3f} s vs {step:.3f} s measured ({100 * (pred - step) / step:+.1f}%)" if pred else "; no prediction"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
