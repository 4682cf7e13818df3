#!/usr/bin/env python3
"""bench/trace_compare.py against traces the compiler writes: a trace against itself matches (ratio 1.000, no excess),
a measured trace with one forward stretched shows that instruction first with its excess and a step error, and bad
input exits 2. Usage: trace_compare_test.py ROOT MMOC_COMPILE"""
import json, os, re, subprocess, sys, tempfile

root, compiler = sys.argv[1], sys.argv[2]
tool = os.path.join(root, "bench", "trace_compare.py")
fails = []
def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok: fails.append(what)

with tempfile.TemporaryDirectory() as tmp:
    pred = os.path.join(tmp, "p.json")
    r = subprocess.run([compiler, "--model", "tiny-8l", "--hardware", "h200x2", "--gpus", "2", "--seq-len", "32", "--microbatches", "4",
                        "--v", "2", "--schedule", "interleaved-1f1b", "-q", "-o", os.path.join(tmp, "plan.json"), "--trace", pred],
                       cwd=root, capture_output=True, text=True)
    check(r.returncode == 0 and os.path.exists(pred), "mmoc-compile writes a trace (%s)" % r.stderr[-200:])
    r = subprocess.run([sys.executable, tool, pred, pred], capture_output=True, text=True)
    check(r.returncode == 0 and "GPU 0: step" in r.stdout and "GPU 1: step" in r.stdout and "(+0.0%)" in r.stdout
          and re.search(r"comp +forward +\d+ .* 1\.000", r.stdout) is not None, "itself: both GPUs, +0.0%, ratio 1.000\n" + r.stdout[:600])
    # stretch GPU 0's first forward by 5 ms and shift everything after it
    t = json.load(open(pred))
    ev = t["traceEvents"] if isinstance(t, dict) else t
    fw = min((e for e in ev if e.get("ph") == "X" and e["pid"] == 0 and e["args"].get("op") == "forward"), key=lambda e: e["ts"])
    t0 = fw["ts"]
    fw["dur"] += 5000.0
    for e in ev:
        if e.get("ph") == "X" and e["pid"] == 0 and e["ts"] > t0: e["ts"] += 5000.0
    meas = os.path.join(tmp, "m.json")
    json.dump(t, open(meas, "w"))
    r = subprocess.run([sys.executable, tool, pred, meas, "--top", "1"], capture_output=True, text=True)
    first = re.search(r"largest excess.*\n +%(\d+) +(\S+ \S+ \S+)", r.stdout)
    check(r.returncode == 0 and first is not None and first.group(1) == str(fw["args"]["instr"]) and "+5.00 ms" in r.stdout
          and re.search(r"GPU 0: step .* \(-\d", r.stdout) is not None, "a stretched forward is the first excess, +5.00 ms, step under-predicted\n" + r.stdout[:900])
    r = subprocess.run([sys.executable, tool, pred, os.path.join(tmp, "missing.json")], capture_output=True, text=True)
    check(r.returncode == 2 and "missing.json" in r.stderr, "a missing trace: exit 2 naming it (%s)" % r.stderr.strip())
print("%d check(s) failed" % len(fails) if fails else "all trace_compare checks passed")
sys.exit(1 if fails else 0)
