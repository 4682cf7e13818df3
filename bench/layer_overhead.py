#!/usr/bin/env python3
"""What the engine adds to a decoder layer (issue 14): a layer inside a training step against the same layer alone.

    python3 bench/layer_overhead.py MEASURED_TRACE PLAN REFERENCE_LOG

MEASURED_TRACE: mmoc-run --trace (the last step's instructions, GPU-timed on the compute stream); PLAN: the plan it
ran (JSON); REFERENCE_LOG: the layer alone at the job's shape, measured in the same call, either
  - mmoc-profile --recompute's output (the engine's own layer code alone: its "decoder fwd", "decoder fwd no-grad",
    "decoder bwd" and "decoder bwd recompute" rows), the issue's reference; or
  - bench/peers/limits.py's output (HF's layer: RESULT ... layer_fwd_ms=.. layer_fwdbwd_ms=..).
Over the stages that hold exactly one decoder layer and neither the embedding nor the head, split by what the stage
does: a stage that recomputes runs its forward without autograd (compared with mmoc-profile's no-grad forward) and in
backward its forward again with autograd plus the backward (compared with "bwd recompute"); a stage that keeps its
stash runs its forward with autograd ("decoder fwd") and only the backward ("decoder bwd"; with limits.py, fwd+bwd
minus fwd). A kept stage that is selective also recomputes its SwiGLU in backward, which the reference does not.
Medians; prints one LAYER line each, then the whole layer (forward + backward medians) per kind of stage, and every
one-layer pass of the step summed against the reference figure for each; exits 0.

A GPU at its power limit runs a layer slower at a lower SM clock, and the clock in a step is not the clock of the layer
alone (docs/profile.md). When the trace has mmoc-run's "clock" counter (NVML, every 2 ms) and the mmoc-profile log its
"SM clock (decoder)" row, the same comparisons follow at equal clock: each pass's time times its clock (the
time-weighted mean of the counter over the pass) over the reference's clock, i.e. in SM cycles. That scales all of a
pass's time with the clock, also its memory-bound part, which does not; and NVML's reading every 2 ms is coarse: on one
H200 these lines scattered by about +-3% between calls (bench/results/2026-12-03-h200-s11). They show which side ran
at the higher clock; the comparison in milliseconds, with mmoc-profile timing the layer back to back as a step runs it,
is the measure.
"""
import json
import re
import statistics
import sys


def reference(text):
    """{'fwd', 'fwd_nograd', 'bwd', 'bwd_rc'} in ms and the reference's name, or None."""
    rows = dict(re.findall(r"decoder (fwd|bwd|fwd no-grad|bwd recompute) \d+x\d+\s+([0-9.]+)\s+ms", text))
    if "fwd" in rows and "bwd" in rows:
        r = {"fwd": float(rows["fwd"]), "bwd": float(rows["bwd"])}
        r["fwd_nograd"] = float(rows.get("fwd no-grad", r["fwd"]))
        r["bwd_rc"] = float(rows.get("bwd recompute", r["fwd"] + r["bwd"]))
        return r, "mmoc-profile"
    m = re.search(r"layer_fwd_ms=([0-9.]+) layer_fwdbwd_ms=([0-9.]+)", text)
    if m:
        f, fb = float(m.group(1)), float(m.group(2))  # limits.py's forward runs under no_grad
        return {"fwd": f, "fwd_nograd": f, "bwd": fb - f, "bwd_rc": fb}, "limits.py"
    return None


def ref_clock(text):
    """mmoc-profile's SM clock of the layer's timed rounds (MHz), or None."""
    m = re.search(r"SM clock \(decoder\) \d+x\d+\s+([0-9.]+)\s+MHz", text)
    return float(m.group(1)) if m else None


def clock_tracks(ev):
    """{pid: [(ts, MHz), ...] sorted} from the trace's "clock" counters."""
    out = {}
    for e in ev:
        if e.get("ph") == "C" and e.get("name") == "clock" and "sm_mhz" in e.get("args", {}):
            out.setdefault(e.get("pid", 0), []).append((float(e["ts"]), float(e["args"]["sm_mhz"])))
    for v in out.values():
        v.sort()
    return out


def mean_clock(track, t0, t1):
    """The time-weighted mean of a piecewise-constant clock (each reading holds until the next) over [t0, t1]."""
    cur, acc, t = None, 0.0, t0
    for ts, mhz in track:
        if ts <= t0:
            cur = mhz
            continue
        if ts >= t1:
            break
        if cur is not None:
            acc += cur * (ts - t)
        else:
            t0 = ts  # no reading before the pass: from the first one in it
        cur, t = mhz, ts
    if cur is None:
        return None
    acc += cur * (t1 - t)
    return acc / (t1 - t0) if t1 > t0 else cur


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    trace, plan, ref_log = argv
    ev = json.load(open(trace))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    p = json.load(open(plan))
    nlayers = p["model"]["layers"]
    ref_text = open(ref_log).read()
    got = reference(ref_text)
    if not got:
        print("LAYER: no layer timing in %s" % ref_log)
        return 0
    ref, name = got
    # model layer ids: 0 = embedding, 1..L = decoder layers, L+1 = head (plan stages' half-open [begin, end))
    one = {}
    for s in p["stages"]:
        b, e = s["layers"]
        if e - b == 1 and 1 <= b <= nlayers:
            one[s["id"]] = s
    got = {k: [] for k in ("fwd_rc", "fwd_keep", "bwd_rc", "bwd_keep")}
    clk = {k: [] for k in got}  # each pass's mean SM clock, where the trace has the counter
    tracks = clock_tracks(ev)
    for e in ev:
        if e.get("ph") != "X":
            continue
        a = e.get("args", {})
        st = one.get(a.get("stage"))
        if st is None or a.get("op") not in ("forward", "backward"):
            continue
        # JSON recompute: false | true | k (the first k layers recompute): a one-layer stage recomputes or not
        kind = "rc" if st.get("recompute") else "keep"
        key = ("fwd_" if a["op"] == "forward" else "bwd_") + kind
        got[key].append(e["dur"] / 1000.0)
        track = tracks.get(e.get("pid", 0))
        clk[key].append(mean_clock(track, float(e["ts"]), float(e["ts"]) + float(e["dur"])) if track else None)
    lines = (("fwd_rc", "forward of a recomputing stage (no autograd)", "fwd_nograd", "forward without autograd"),
             ("fwd_keep", "forward of a stage keeping its stash", "fwd", "forward"),
             ("bwd_rc", "backward with recompute", "bwd_rc", "forward+backward"),
             ("bwd_keep", "backward (stash kept)", "bwd", "backward"))
    for key, what, rk, rwhat in lines:
        if got[key]:
            x, r = statistics.median(got[key]), ref[rk]
            print("LAYER %s in the step %.2f ms (median of %d) vs %s's %s alone %.2f ms: %+.1f%%"
                  % (what, x, len(got[key]), name, rwhat, r, 100 * (x / r - 1)))
    # a layer's cost in the step is its forward and its backward together (a stage that runs its forward faster and
    # its backward slower costs what the sum says), per kind of stage, and summed over every pass in the step
    refkey = {key: rk for key, _, rk, _ in lines}  # each pass's reference figure

    def sums(times):
        """[(what, in the step, alone)] per kind of stage with both passes, and (in the step, alone) over all passes."""
        whole = []
        for kind, what in (("rc", "a recomputing stage"), ("keep", "a stage keeping its stash")):
            f, b = times["fwd_" + kind], times["bwd_" + kind]
            if f and b:
                whole.append((what, statistics.median(f) + statistics.median(b),
                              ref[refkey["fwd_" + kind]] + ref[refkey["bwd_" + kind]]))
        return whole, (sum(sum(v) for v in times.values()), sum(len(v) * ref[refkey[k]] for k, v in times.items()))

    whole, (x, r) = sums(got)
    for what, wx, wr in whole:
        print("LAYER whole layer (forward + backward) of %s in the step %.2f ms vs %s's alone %.2f ms: %+.1f%%"
              % (what, wx, name, wr, 100 * (wx / wr - 1)))
    n = sum(len(v) for v in got.values())
    if n:
        print("LAYER all %d one-layer passes of the step together %.1f ms vs %s's alone %.1f ms: %+.1f%%"
              % (n, x, name, r, 100 * (x / r - 1)))
    else:
        print("LAYER: no stage of exactly one decoder layer in the plan")
    fref = ref_clock(ref_text) if name == "mmoc-profile" else None
    have = [c for v in clk.values() for c in v if c is not None]
    if n and fref and len(have) == n:
        print("LAYER clock: the one-layer passes ran at %.0f MHz (median of their means; %.0f..%.0f) vs %s's %.0f MHz alone"
              % (statistics.median(have), min(have), max(have), name, fref))
        # at equal clock: a pass's time scaled to the reference's clock (its SM cycles at that clock)
        whole, (x, r) = sums({k: [d * c / fref for d, c in zip(got[k], clk[k])] for k in got})
        for what, wx, wr in whole:
            print("LAYER at equal clock: whole layer of %s in the step %.2f ms at %.0f MHz vs alone %.2f ms: %+.1f%%"
                  % (what, wx, fref, wr, 100 * (wx / wr - 1)))
        print("LAYER at equal clock: all %d one-layer passes %.1f ms at %.0f MHz vs alone %.1f ms: %+.1f%%"
              % (n, x, fref, r, 100 * (x / r - 1)))
    elif n and fref and tracks:
        print("LAYER clock: %d of %d passes have no clock reading (trace clock counter too sparse)" % (n - len(have), n))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
