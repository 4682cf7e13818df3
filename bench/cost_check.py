#!/usr/bin/env python3
"""The simulator's step time against every GPU measurement in docs/results.md that a stock hardware file describes.

  python3 bench/cost_check.py [--compile BUILD/tools/compile/mmoc-compile] [--configs DIR]
                              [--before BIN:CONFIGS] [--jobs NAME,...] [--skip NAME,...] [--check PCT]

For each job: the mmoc-compile command the bench ran (bench/gpu_bench.sh), the measured step (median of the steady
steps) read from the run's log in bench/results/, and the predicted step that `--compile` (default: this checkout's
build) gives for the same command with `--configs` (default: this checkout's configs/). `--before BIN:CONFIGS` adds a
column from another compiler and its configs folder (e.g. a build of main and `git archive main configs`), so a change
to the cost model prints its before/after table. Error = (predicted - measured) / measured. `--check PCT` exits 1
when a job's error (the last column's) exceeds PCT percent (test `bench.cost_check`). Jobs measured before the engine
ran its own CUDA kernels (2026-12-02, engine/model/kernels.hpp) are predicted with the hardware files'
"engine_kernels": false (a copy of the configs folder), as the engine then ran. Stdlib only.
"""
import argparse
import json
import os
import re
import shutil
import tempfile
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = os.path.join(ROOT, "bench", "results")
J7 = "--model llama2-7b --gpus 1 --micro-batch-size 8 --microbatches 4 --seq-len 1024"


def summary(log, name):
    """The measured step of SUMMARY <name> in a gpu_bench.sh log."""
    def read():
        with open(os.path.join(R, log)) as f:
            for line in f:
                m = re.match(r"SUMMARY %s: step ([0-9.]+) s measured" % re.escape(name), line)
                if m:
                    return float(m.group(1))
        raise ValueError("%s: no SUMMARY line for %s" % (log, name))
    read.src = log
    return read


def steps(log, first=2):
    """Median of the `step k/n ... step X s` lines from step `first` on (logs without a SUMMARY line)."""
    def read():
        with open(os.path.join(R, log)) as f:
            xs = [float(m.group(2)) for m in (re.search(r"^step (\d+)/\d+ .* step ([0-9.]+) s", l) for l in f)
                  if m and int(m.group(1)) >= first]
        if not xs:
            raise ValueError("%s: no step lines" % log)
        return statistics.median(xs)
    read.src = "%s (steps %d on)" % (log, first)
    return read


def quoted(value, src):
    """A measured step kept only as text (no log): the value and where it is written."""
    read = lambda: value
    read.src = src
    return read


# name, mmoc-compile arguments (as the bench ran them), where the measured step comes from
JOBS = [
    ("7b-h100file-48", J7 + " --hardware h100x1 --v auto --schedule grouped --budget 48 --precision bf16",
     steps("2026-12-01-h200-s3/h100-7b.log")),
    ("7b-h200-20", J7 + " --hardware h200x1 --v auto --schedule auto --budget 20",
     summary("2026-12-02-h200-s9/call1/limit.out", "7b-20")),
    ("7b-h200-48", J7 + " --hardware h200x1 --v auto --schedule auto --budget 48",
     summary("2026-12-02-h200-s9/call1/limit.out", "7b-48")),
    ("7b-h200-80", J7 + " --hardware h200x1 --v auto --schedule auto --budget 80",
     summary("2026-12-02-h200-s9/call1/limit.out", "7b-80")),
    ("7b-h200-130", J7 + " --hardware h200x1 --v auto --schedule auto --budget 130",
     summary("2026-12-02-h200-s9/call1/limit.out", "7b-130")),
    ("7b-h200-host16mb", "--model llama2-7b --gpus 1 --v auto --schedule grouped --budget 48 --micro-batch-size 8 "
     "--microbatches 16 --seq-len 1024 --hardware h200x1",
     summary("2026-12-01-h200-s2/nvme-7b.log", "host7b")),
    ("7b-h200x2", "--model llama2-7b --hardware h200x2 --gpus 2 --v auto --schedule grouped --budget 48 "
     "--micro-batch-size 8 --microbatches 8 --seq-len 1024",
     summary("h200x2-2026-11-27/bench.log", "7b")),
    ("13b-h200x2", "--model llama2-13b --hardware h200x2 --gpus 2 --v auto --schedule grouped --budget 48 "
     "--micro-batch-size 8 --microbatches 8 --seq-len 1024",
     summary("h200x2-2026-11-27/bench.log", "13b")),
    ("seed-7b-h200x2", "configs/jobs/seed-llama2-7b-l20x4.json --gpus 2 --hardware h200x2",
     summary("h200x2-2026-11-27/bench.log", "seed")),
    ("llama3.2-3b", "--model llama3.2-3b --hardware h200x1 --gpus 1 --v auto --schedule auto --budget 48 "
     "--micro-batch-size 8 --microbatches 4 --seq-len 1024",
     summary("2026-12-02-h200-s8/call5/s3b.log", "llama3.2-3b")),
    ("llama3.2-3b-s1", "--model llama3.2-3b --hardware h200x1 --gpus 1 --v auto --schedule auto --budget 48 "
     "--micro-batch-size 8 --microbatches 4 --seq-len 1024",
     steps("2026-12-01-h200/mmoc-llama3.2-3b.log")),
    # the first session kept no log of this run: docs/results.md ("measured 1.977 s and 2.081 s", 15,748-15,946
    # tokens/s for 32,768 tokens per step)
    ("qwen2.5-3b-s1", "--model qwen2.5-3b --hardware h200x1 --gpus 1 --v auto --schedule auto --budget 48 "
     "--micro-batch-size 8 --microbatches 4 --seq-len 1024",
     quoted(2.081, "docs/results.md (2026-12-01, first session)")),
]


# measured while the engine ran ATen's elementwise ops (before its kernels): every job but this session's
KERNELS = {"7b-h200-20", "7b-h200-48", "7b-h200-80", "7b-h200-130"}


def aten_configs(configs, tmp):
    """A copy of `configs` whose hardware files say "engine_kernels": false."""
    dst = os.path.join(tmp, "configs")
    if not os.path.isdir(dst):
        shutil.copytree(configs, dst)
        hw = os.path.join(dst, "hardware")
        for f in os.listdir(hw):
            if f.endswith(".json"):
                with open(os.path.join(hw, f)) as fh:
                    d = json.load(fh)
                d["engine_kernels"] = False
                with open(os.path.join(hw, f), "w") as fh:
                    json.dump(d, fh)
    return dst


def predict(binary, configs, args):
    # without -q: the summary holds the `predicted: step X s` line
    cmd = [binary] + args.split() + ["--configs", configs, "-o", os.devnull]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    m = re.search(r"^predicted: step ([0-9.]+) s", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise RuntimeError("%s: exit %d\n%s" % (" ".join(cmd), p.returncode, p.stderr[-2000:]))
    plan = re.search(r"schedule (\S+), v=(\d+)", p.stdout)
    return float(m.group(1)), ("%s v=%s" % plan.groups()) if plan else "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile", default=os.path.join(ROOT, "build", "tools", "compile", "mmoc-compile"))
    ap.add_argument("--configs", default=os.path.join(ROOT, "configs"))
    ap.add_argument("--before", help="BIN:CONFIGS of a second compiler for a before column")
    ap.add_argument("--jobs", help="comma-separated job names (default: all)")
    ap.add_argument("--skip", help="comma-separated job names to leave out")
    ap.add_argument("--check", type=float, help="exit 1 when a job's |error| exceeds this many percent")
    a = ap.parse_args()
    cols = []
    if a.before:
        b, _, c = a.before.partition(":")
        cols.append(("before", b, c or a.configs))
    cols.append(("after" if a.before else "predicted", a.compile, a.configs))
    want = set(a.jobs.split(",")) if a.jobs else None
    skip = set(a.skip.split(",")) if a.skip else set()
    unknown = ((want or set()) | skip) - {j[0] for j in JOBS}
    if unknown:
        print("cost_check: unknown job(s) %s" % ", ".join(sorted(unknown)), file=sys.stderr)
        return 2
    head = "%-18s %9s" % ("job", "measured")
    for n, _, _ in cols:
        head += " %9s %7s %-18s" % (n, "error", "plan")
    print(head + "  measured in")
    errs = {n: [] for n, _, _ in cols}
    tmp = tempfile.mkdtemp(prefix="cost_check.")
    for name, args, measured in JOBS:
        if (want and name not in want) or name in skip:
            continue
        meas = measured()
        line = "%-18s %8.3fs" % (name, meas)
        for n, b, c in cols:
            if name not in KERNELS:
                c = aten_configs(c, os.path.join(tmp, n))
            try:
                pred, plan = predict(b, c, args)
            except RuntimeError as e:
                print(e, file=sys.stderr)
                shutil.rmtree(tmp, ignore_errors=True)
                return 1
            err = (pred - meas) / meas
            errs[n].append(abs(err))
            line += " %8.3fs %+6.1f%% %-18s" % (pred, 100 * err, plan)
        print(line + "  " + measured.src)
    for n, e in errs.items():
        if e:
            print("%s: mean |error| %.1f%%, largest %.1f%%" % (n, 100 * sum(e) / len(e), 100 * max(e)))
    shutil.rmtree(tmp, ignore_errors=True)
    last = errs[cols[-1][0]]
    if a.check is not None and last and 100 * max(last) > a.check:
        print("cost_check: an error above %.1f%%" % a.check, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
