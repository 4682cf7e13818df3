#!/usr/bin/env python3
"""Where a decoder layer's time goes, kernel by kernel (the HF family's own layer, as bench/peers/limits.py times it):

    python3 bench/layer_profile.py --model llama2-7b --mbs 8 --seq 1024 [--top 25]

Runs the layer's forward (no autograd) and forward+backward under torch.profiler on the GPU and prints, for each,
the CUDA kernels by total time (summed over --repeats runs, divided by the repeats), grouped into GEMM, attention and
everything else (elementwise, norms, copies). A diagnostic for choosing what to fuse; the numbers are per call.
"""
import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))
import common  # noqa: E402
import limits  # noqa: E402

PROG = "layer_profile.py"


def kind(name):
    n = name.lower()
    if "gemm" in n or "cutlass" in n or "sm90_xmma" in n or "nvjet" in n or "cublas" in n:
        return "gemm"
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    return "other"


def main(argv=None):
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_job_args(ap, microbatches=1, steps=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    try:
        common.check_job_args(a)
        if a.repeats < 1 or a.top < 1:
            raise common.UsageError("--repeats and --top must be >= 1")
        cfg, name = common.resolve_model(a)
    except common.UsageError as e:
        common.die(PROG, str(e))
    import torch
    from torch.profiler import ProfilerActivity, profile
    if not torch.cuda.is_available():
        common.die(PROG, "needs a CUDA device")
    _, _, fwd, fwdbwd = limits.one_layer(cfg, a, torch, torch.device("cuda"), torch.bfloat16)
    for what, fn in (("forward", fwd), ("forward+backward", fwdbwd)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.repeats):
                fn()
            torch.cuda.synchronize()
        per = collections.defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per[e.name][0] += e.device_time / 1e3 / a.repeats
                per[e.name][1] += 1
        tot = collections.Counter()
        for n, (ms, _) in per.items():
            tot[kind(n)] += ms
        allms = sum(tot.values())
        print(f"== {name} {what}, {a.mbs}x{a.seq}: kernels {allms:.2f} ms per call: " +
              ", ".join(f"{k} {v:.2f} ms ({100 * v / allms:.0f}%)" for k, v in tot.most_common()))
        for n, (ms, c) in sorted(per.items(), key=lambda kv: -kv[1][0])[:a.top]:
            print(f"  {ms:7.3f} ms  x{c // a.repeats:<3d} {kind(n):9s} {n[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
