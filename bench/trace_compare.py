#!/usr/bin/env python3
"""Where a plan's predicted step and its measured step part: the simulator's trace (`mmoc-compile --trace P`) against
the engine's (`mmoc-run --trace M`, the last step), matched instruction by instruction (GPU, instruction index).

  python3 bench/trace_compare.py PREDICTED.json MEASURED.json [--top 12]

Prints, per GPU: the step (first start to last end) predicted and measured; per stream and op (forward, backward,
optim, prefetch, ...) the summed durations and their ratio; the busy and idle time of the compute stream; and the
instructions whose measured duration exceeds the prediction the most. Stdlib only; .json or .json.gz.
"""
import argparse
import collections
import gzip
import json
import sys


def load(path):
    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rt") as f:
        t = json.load(f)
    ev = t["traceEvents"] if isinstance(t, dict) else t
    threads = {}
    for e in ev:
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    out = {}  # (gpu, instr) -> (stream, op, name, ts, dur)
    for e in ev:
        if e.get("ph") != "X":
            continue
        a = e.get("args", {})
        if "instr" not in a:
            continue
        key = (e["pid"], int(a["instr"]))
        out[key] = (threads.get((e["pid"], e["tid"]), str(e["tid"])), a.get("op", e.get("cat", "?")), e["name"],
                    float(e["ts"]), float(e["dur"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predicted")
    ap.add_argument("measured")
    ap.add_argument("--top", type=int, default=12, help="instructions listed with the largest excess (default 12)")
    a = ap.parse_args()
    try:
        p, m = load(a.predicted), load(a.measured)
    except (OSError, ValueError, KeyError) as e:
        print("trace_compare: %s" % e, file=sys.stderr)
        return 2
    if not p or not m:
        print("trace_compare: a trace without instructions (%d predicted, %d measured)" % (len(p), len(m)), file=sys.stderr)
        return 2
    for g in sorted({k[0] for k in p} | {k[0] for k in m}):
        pk = {k: v for k, v in p.items() if k[0] == g}
        mk = {k: v for k, v in m.items() if k[0] == g}
        span = lambda d: (max(v[3] + v[4] for v in d.values()) - min(v[3] for v in d.values())) / 1e3 if d else 0.0
        ps, ms = span(pk), span(mk)
        print("GPU %d: step %.1f ms predicted, %.1f ms measured (%+.1f%%); %d / %d instructions"
              % (g, ps, ms, 100.0 * (ps - ms) / ms if ms else 0.0, len(pk), len(mk)))
        tot = collections.defaultdict(lambda: [0.0, 0.0, 0])
        for k in set(pk) | set(mk):
            stream, op = (pk.get(k) or mk.get(k))[:2]
            row = tot[(stream, op)]
            row[0] += pk[k][4] / 1e3 if k in pk else 0.0
            row[1] += mk[k][4] / 1e3 if k in mk else 0.0
            row[2] += 1
        print("  %-6s %-12s %6s %12s %12s %7s" % ("stream", "op", "count", "predicted", "measured", "ratio"))
        for (stream, op), (pt, mt, n) in sorted(tot.items(), key=lambda x: -max(x[1][0], x[1][1])):
            print("  %-6s %-12s %6d %9.1f ms %9.1f ms %7s" % (stream, op, n, pt, mt, "%.3f" % (mt / pt) if pt > 0 else "-"))
        for name, d, s in (("predicted", pk, ps), ("measured", mk, ms)):
            busy = sum(v[4] for v in d.values() if v[0] == "comp") / 1e3
            print("  compute stream %s: busy %.1f ms, idle %.1f ms of the step" % (name, busy, s - busy))
        both = [k for k in pk if k in mk]
        both.sort(key=lambda k: -(mk[k][4] - pk[k][4]))
        print("  largest excess (measured - predicted):")
        for k in both[:a.top]:
            print("    %%%-5d %-34s %8.2f ms predicted %8.2f ms measured %+8.2f ms"
                  % (k[1], pk[k][2][:34], pk[k][4] / 1e3, mk[k][4] / 1e3, (mk[k][4] - pk[k][4]) / 1e3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
