#!/usr/bin/env python3
"""What the engine adds to a decoder layer (issue 14): a layer inside a training step against the same layer alone.

    python3 bench/layer_overhead.py MEASURED_TRACE PLAN LIMITS_LOG

MEASURED_TRACE: mmoc-run --trace (the last step's instructions, GPU-timed on the compute stream); PLAN: the plan it
ran (JSON); LIMITS_LOG: bench/peers/limits.py's output at the job's shape, run in the same call (RESULT ...
layer_fwd_ms=.. layer_fwdbwd_ms=..). Over the stages that hold exactly one decoder layer and neither the embedding nor
the head, the median `forward` is compared with the layer's forward alone, and the median `backward` of a stage that
recomputes (its forward again, with autograd, then the backward) with the layer's forward+backward alone; a stage that
keeps its stash runs only the backward, compared with forward+backward minus forward alone (an estimate: the alone
figures have no separate backward). Prints one LAYER line each and exits 0.
"""
import json
import re
import statistics
import sys


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    trace, plan, lim = argv
    ev = json.load(open(trace))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    p = json.load(open(plan))
    nlayers = p["model"]["layers"]
    m = re.search(r"layer_fwd_ms=([0-9.]+) layer_fwdbwd_ms=([0-9.]+)", open(lim).read())
    if not m:
        print("LAYER: no layer timing in %s" % lim)
        return 0
    fwd_alone, fwdbwd_alone = float(m.group(1)), float(m.group(2))
    # model layer ids: 0 = embedding, 1..L = decoder layers, L+1 = head (plan stages' half-open [begin, end))
    one = {}
    for s in p["stages"]:
        b, e = s["layers"]
        if e - b == 1 and 1 <= b <= nlayers:
            one[s["id"]] = s
    fw, bw_rc, bw_keep = [], [], []
    for e in ev:
        if e.get("ph") != "X":
            continue
        a = e.get("args", {})
        st = one.get(a.get("stage"))
        if st is None:
            continue
        ms = e["dur"] / 1000.0
        if a.get("op") == "forward":
            fw.append(ms)
        elif a.get("op") == "backward":
            # JSON recompute: false | true | k (the first k layers recompute): a one-layer stage recomputes or not
            (bw_rc if st.get("recompute") else bw_keep).append(ms)
    if fw:
        f = statistics.median(fw)
        print("LAYER forward in the step %.2f ms (median of %d) vs alone %.2f ms: %+.1f%%" % (f, len(fw), fwd_alone, 100 * (f / fwd_alone - 1)))
    if bw_rc:
        b = statistics.median(bw_rc)
        ref = fwdbwd_alone  # the recompute (forward with autograd) and the backward
        print("LAYER backward with recompute in the step %.2f ms (median of %d) vs alone (fwd+bwd) %.2f ms: %+.1f%%" % (b, len(bw_rc), ref, 100 * (b / ref - 1)))
    if bw_keep:
        b = statistics.median(bw_keep)
        print("LAYER backward (stash kept) in the step %.2f ms (median of %d) vs alone (fwd+bwd - fwd) %.2f ms: %+.1f%%" % (b, len(bw_keep), fwdbwd_alone - fwd_alone, 100 * (b / (fwdbwd_alone - fwd_alone) - 1)))
    if not (fw or bw_rc or bw_keep):
        print("LAYER: no stage of exactly one decoder layer in the plan")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
