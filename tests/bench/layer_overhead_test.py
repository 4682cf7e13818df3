#!/usr/bin/env python3
"""bench/layer_overhead.py (what the engine adds to a layer, issue 14) on a made-up trace and plan: the one-layer
stages' forwards split by whether the stage recomputes, each compared with the right figure of an mmoc-profile log
(no-autograd forward, forward, backward with recompute, backward) and of a limits.py log; stages of two layers, the
embedding and the head left out; a log with no layer figures and a plan without one-layer stages say so; with the
trace's clock counter and the profile's SM clock, the same at equal clock (and the clock over a pass). Also
bench/layer_profile.py (its companion diagnostic): a bad argument exits 2; without a GPU it says it needs one and exits
non-zero; with one it prints its kernel tables for a tiny model.
Usage: layer_overhead_test.py ROOT"""
import json
import os
import subprocess
import sys
import tempfile

root = sys.argv[1]
tool = os.path.join(root, "bench", "layer_overhead.py")
fails = []


def check(cond, what):
    if not cond:
        fails.append(what)


def run(d, trace, plan, ref):
    paths = []
    for name, obj in (("trace.json", trace), ("plan.json", plan)):
        p = os.path.join(d, name)
        with open(p, "w") as f:
            json.dump(obj, f)
        paths.append(p)
    rp = os.path.join(d, "ref.log")
    with open(rp, "w") as f:
        f.write(ref)
    r = subprocess.run([sys.executable, tool] + paths + [rp], capture_output=True, text=True)
    print(r.stdout + r.stderr)
    check(r.returncode == 0, "exit %d" % r.returncode)
    return r.stdout


# stages: S0 embedding (layer 0), S1 layer 1 kept, S2 layer 2 recomputed, S3 layers 3-4 (two layers), S4 head (5)
plan = {"model": {"layers": 4}, "stages": [
    {"id": 0, "layers": [0, 1], "recompute": False}, {"id": 1, "layers": [1, 2], "recompute": False},
    {"id": 2, "layers": [2, 3], "recompute": True}, {"id": 3, "layers": [3, 5], "recompute": True},
    {"id": 4, "layers": [5, 6], "recompute": False}]}


def ev(stage, op, ms):
    return {"ph": "X", "name": "%s S%d" % (op, stage), "dur": ms * 1000.0, "ts": 0, "args": {"stage": stage, "op": op}}


trace = {"traceEvents": [ev(1, "forward", 5.0), ev(1, "forward", 5.2), ev(1, "forward", 9.0),
                         ev(2, "forward", 4.4), ev(2, "forward", 4.6), ev(1, "backward", 10.0),
                         ev(2, "backward", 16.0), ev(3, "forward", 99.0), ev(3, "backward", 99.0),
                         ev(0, "forward", 99.0), ev(4, "backward", 99.0), ev(2, "prefetch", 99.0)]}
profile = """  decoder fwd 8x1024                  5.0000  ms       600 TFLOP/s
  decoder bwd 8x1024                 10.0000  ms       600 TFLOP/s
  decoder fwd no-grad 8x1024          4.0000  ms       (reported only)
  decoder bwd recompute 8x1024       16.0000  ms       compiler assumes fwd+bwd = 15.0
"""
with tempfile.TemporaryDirectory() as d:
    out = run(d, trace, plan, profile)
    # kept stage forwards 5.0, 5.2, 9.0: median 5.2 vs 5.0 (+4.0%); recomputing 4.4, 4.6: median 4.5 vs 4.0 (+12.5%)
    check("forward of a recomputing stage (no autograd) in the step 4.50 ms (median of 2) vs mmoc-profile's forward "
          "without autograd alone 4.00 ms: +12.5%" in out, "recomputing forward vs the no-grad forward")
    check("forward of a stage keeping its stash in the step 5.20 ms (median of 3) vs mmoc-profile's forward alone "
          "5.00 ms: +4.0%" in out, "kept forward vs the forward")
    check("backward with recompute in the step 16.00 ms (median of 1) vs mmoc-profile's forward+backward alone "
          "16.00 ms: +0.0%" in out, "recompute backward vs bwd recompute")
    check("backward (stash kept) in the step 10.00 ms (median of 1) vs mmoc-profile's backward alone 10.00 ms: +0.0%"
          in out, "kept backward vs bwd")
    check("99.00" not in out, "two-layer stages, the embedding or the head counted")
    # whole layers: kept 5.2 + 10.0 vs 5.0 + 10.0 (+1.3%), recomputing 4.5 + 16.0 vs 4.0 + 16.0 (+2.5%); all passes:
    # 5.0 + 5.2 + 9.0 + 4.4 + 4.6 + 10.0 + 16.0 = 54.2 vs 3 x 5.0 + 2 x 4.0 + 10.0 + 16.0 = 49.0 (+10.6%)
    check("whole layer (forward + backward) of a recomputing stage in the step 20.50 ms vs mmoc-profile's alone "
          "20.00 ms: +2.5%" in out, "whole recomputing layer")
    check("whole layer (forward + backward) of a stage keeping its stash in the step 15.20 ms vs mmoc-profile's alone "
          "15.00 ms: +1.3%" in out, "whole kept layer")
    check("all 7 one-layer passes of the step together 54.2 ms vs mmoc-profile's alone 49.0 ms: +10.6%" in out,
          "all passes summed")
    lim = "RESULT peer=limits model=x layer_fwd_ms=5.5 layer_fwdbwd_ms=15.5 layer_tflops=1\n"
    out = run(d, trace, plan, lim)
    check("vs limits.py's forward without autograd alone 5.50 ms: -18.2%" in out, "limits.py forward")
    check("vs limits.py's backward alone 10.00 ms" in out, "limits.py backward = fwd+bwd - fwd")
    out = run(d, trace, plan, "nothing here\n")
    check(out.startswith("LAYER: no layer timing in"), "a log without figures")
    two = {"model": {"layers": 4}, "stages": [{"id": 0, "layers": [0, 3], "recompute": False},
                                               {"id": 1, "layers": [3, 6], "recompute": True}]}
    out = run(d, trace, two, profile)
    check("LAYER: no stage of exactly one decoder layer in the plan" in out, "a plan without one-layer stages")
    check("equal clock" not in run(d, trace, plan, profile), "no clock counter, no SM clock row: no equal-clock lines")
    # the clock: mmoc-run's "clock" counter (1500 MHz through the step) against the profile's SM clock row (1600 MHz):
    # every pass scaled by 1500 / 1600 = 0.9375
    clocked = {"traceEvents": trace["traceEvents"] + [
        {"ph": "C", "name": "clock", "pid": 0, "ts": 0, "args": {"sm_mhz": 1500}}]}
    sm = "  SM clock (decoder) 8x1024             1600  MHz      median of the timed rounds, max 1980 MHz\n"
    out = run(d, clocked, plan, profile + sm)
    check("LAYER clock: the one-layer passes ran at 1500 MHz (median of their means; 1500..1500) vs mmoc-profile's "
          "1600 MHz alone" in out, "the clock line")
    # (4.5 + 16.0) x 0.9375 = 19.22 vs 20.0 (-3.9%); (5.2 + 10.0) x 0.9375 = 14.25 vs 15.0 (-5.0%); 54.2 x 0.9375 =
    # 50.8 vs 49.0 (+3.7%)
    check("LAYER at equal clock: whole layer of a recomputing stage in the step 19.22 ms at 1600 MHz vs alone 20.00 ms: "
          "-3.9%" in out, "equal clock, recomputing layer")
    check("LAYER at equal clock: whole layer of a stage keeping its stash in the step 14.25 ms at 1600 MHz vs alone "
          "15.00 ms: -5.0%" in out, "equal clock, kept layer")
    check("LAYER at equal clock: all 7 one-layer passes 50.8 ms at 1600 MHz vs alone 49.0 ms: +3.7%" in out,
          "equal clock, all passes")
    check("equal clock" not in run(d, clocked, plan, profile), "a profile log without its clock row: no equal-clock lines")
    check("equal clock" not in run(d, clocked, plan, lim), "limits.py (no clock): no equal-clock lines")

# the clock over a pass: each reading holds until the next, weighted by time
sys.path.insert(0, os.path.join(root, "bench"))
import layer_overhead as lo  # noqa: E402
tr = [(0.0, 1500.0), (6000.0, 1300.0)]
check(abs(lo.mean_clock(tr, 1000.0, 11000.0) - 1400.0) < 1e-9, "a clock change halfway through a pass")
check(lo.mean_clock(tr, 7000.0, 8000.0) == 1300.0, "a pass between two readings")
check(lo.mean_clock([(2000.0, 1500.0)], 0.0, 4000.0) == 1500.0, "no reading before the pass: from the first in it")
check(lo.mean_clock([(5000.0, 1500.0)], 0.0, 4000.0) is None, "no reading before or in the pass")

prof = os.path.join(root, "bench", "layer_profile.py")
r = subprocess.run([sys.executable, prof, "--model", "tiny-gqa", "--mbs", "0"], capture_output=True, text=True)
check(r.returncode == 2, "layer_profile.py --mbs 0 exits %d, not 2" % r.returncode)
r = subprocess.run([sys.executable, prof, "--model", "tiny-gqa", "--mbs", "2", "--seq", "32", "--repeats", "1"],
                   capture_output=True, text=True)
print(r.stdout[-2000:] + r.stderr[-2000:])
try:
    import torch
    cuda = torch.cuda.is_available()
except ImportError:
    cuda = False
if cuda:
    check(r.returncode == 0 and "forward+backward" in r.stdout and "gemm" in r.stdout, "layer_profile.py on the GPU")
else:
    check(r.returncode != 0 and "needs a CUDA device" in r.stderr, "layer_profile.py without a GPU")

for f in fails:
    print("FAIL:", f)
print("%d check(s) failed" % len(fails) if fails else "all layer_overhead checks passed")
sys.exit(1 if fails else 0)
