#!/usr/bin/env python3
"""A diverged step never becomes a checkpoint (python3 stdlib only).

    nonfinite_test.py <mmoc-run> <mmoc-compile> <source dir>

- lr 1e4 diverges: exit 4, one stderr line, no checkpoint written, an existing --save folder untouched; with
  clipping (gradnorm in the plan) and without (the norm summed at the end of the step); with --save-every the last
  saved checkpoint is a finite step.
- --on-nonfinite skip (plan compiled with --on-nonfinite skip: gradnorm without clipping): a NaN injected into one
  rank's gradients (MMOC_TEST_FAULT) is skipped by every rank: no weight or optimizer state changes (the checkpoint
  equals one saved a step earlier, bit for bit), the skip is counted in the metrics and the progress line, and K
  skips in a row stop the run (exit 4).
- Ranks agree (gloo, 2 ranks): a NaN on rank 1 only stops both ranks at the same step; on rank 0 only, too.
- skip on a plan whose updates do not wait for the norm is refused (exit 2).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ckpt_util as cu  # noqa: E402
from ckpt_util import FAILS, check, metrics_of, must, sh  # noqa: E402

RUN, COMPILE, SRC = (os.path.abspath(p) for p in sys.argv[1:4])
TOKENS = os.path.join(SRC, "data/sample/tiny_tokens.jsonl")
T0 = time.time()


def plan(tmp, name, **train):
    with open(os.path.join(SRC, "configs/jobs/tiny-cpu.json")) as f:
        job = json.load(f)
    job["train"].update(train)
    jp = os.path.join(tmp, name + ".job.json")
    with open(jp, "w") as f:
        json.dump(job, f)
    out = os.path.join(tmp, name + ".plan.json")
    must(sh([COMPILE, jp, "-o", out, "-q"]), "mmoc-compile " + name)
    return out


def diverged(p, name, step=None):
    err = p.stderr.strip().splitlines()
    check(p.returncode == 4, f"{name}: exit code 4, got {p.returncode} (stderr: {p.stderr.strip()!r})")
    check(len(err) == 1 and err[0].startswith("mmoc-run: error: step ") and "non-finite" in err[0],
          f"{name}: one stderr line naming the step and the non-finite value: {err}")
    if step is not None:
        check(bool(err) and err[0].startswith(f"mmoc-run: error: step {step}:"), f"{name}: stopped at step {step}: {err}")
    check("saved checkpoint" not in p.stdout, f"{name}: nothing saved after the divergence")


def main():
    tmp = tempfile.mkdtemp(prefix="mmoc-nonfinite-")
    try:
        run_all(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"nonfinite_test: {len(FAILS)} failure(s), {time.time() - T0:.1f} s")
    return 1 if FAILS else 0


def run_all(tmp):
    j = lambda *p: os.path.join(tmp, *p)
    good = plan(tmp, "good")
    base = ["--data", TOKENS, "-q"]

    # ---- lr 1e4: the run stops, no checkpoint, the existing one untouched ------------------------------------
    ck = j("ckpt", "ck")
    must(sh([RUN, good, *base, "--steps", 2, "--save", ck]), "good run")
    digest = cu.tree_digest(ck)
    for name, extra in (("clip", {}), ("noclip", {"max_grad_norm": 0})):
        bad = plan(tmp, "lr1e4-" + name, lr=1e4, **extra)
        m = j(f"m-{name}.jsonl")
        p = sh([RUN, bad, *base, "--steps", 8, "--save", ck, "--metrics", m])
        diverged(p, f"lr 1e4 ({name})")
        check(cu.tree_digest(ck) == digest, f"lr 1e4 ({name}): the existing checkpoint is untouched")
        check(sorted(os.listdir(j("ckpt"))) == ["ck"], f"lr 1e4 ({name}): nothing written beside it: {os.listdir(j('ckpt'))}")
        ms = metrics_of(m)
        check(len(ms) >= 1 and ms[-1].get("nonfinite") is True and all("nonfinite" not in r for r in ms[:-1]),
              f"lr 1e4 ({name}): the last metrics line is the non-finite step: {ms[-1:]}")
        # --save-every 1: the steps before the divergence are saved, and that checkpoint is finite
        ck2 = j("every-" + name)
        p = sh([RUN, bad, *base, "--steps", 8, "--save", ck2, "--save-every", 1, "--metrics", j("m2.jsonl")])
        check(p.returncode == 4, f"lr 1e4 ({name}) --save-every 1: exit 4, got {p.returncode}")
        last_good = len(metrics_of(j("m2.jsonl"))) - 1
        st = json.load(open(os.path.join(ck2, "mmoc_state/trainer_state.json")))
        check(st["step"] == last_good, f"lr 1e4 ({name}) --save-every 1: checkpoint of step {last_good}, the last finite one: {st['step']}")
        check(cu.all_finite(ck2), f"lr 1e4 ({name}) --save-every 1: every saved tensor is finite")

    # ---- skip mode: one rank's NaN is skipped by both, counted, and K in a row stop the run -----------------
    skip = plan(tmp, "skip", max_grad_norm=0, on_nonfinite="skip")
    with open(skip) as f:
        check(json.load(f)["train"].get("on_nonfinite") == "skip", "the plan records train.on_nonfinite = skip")
    ref, sk, moved = j("ref4"), j("skip5"), j("plain5")
    must(sh([RUN, skip, *base, "--steps", 4, "--save", ref]), "skip plan, 4 steps")
    must(sh([RUN, skip, *base, "--steps", 5, "--save", moved]), "skip plan, 5 steps")
    m = j("m-skip.jsonl")
    p = sh([RUN, skip, "--data", TOKENS, "--steps", 5, "--save", sk, "--metrics", m], fault="nonfinite:1:5")
    check(p.returncode == 0, f"skip: a skipped step is not an error (rc {p.returncode}, stderr {p.stderr.strip()!r})")
    ms = metrics_of(m)
    check(len(ms) == 5 and ms[4].get("skipped") is True and ms[4].get("skipped_steps") == 1 and ms[4].get("nonfinite") is True,
          f"skip: step 5 is marked skipped and counted: {ms[-1:]}")
    check(all("skipped" not in r and "skipped_steps" not in r for r in ms[:4]), "skip: steps 1-4 are not marked")
    line5 = [l for l in p.stdout.splitlines() if l.startswith("step 5/5")]
    check(len(line5) == 1 and "SKIPPED" in line5[0] and "skipped 1" in line5[0], f"skip: the progress line says so: {line5}")
    a, b, c = cu.state(sk), cu.state(ref), cu.state(moved)
    check(a == b, "skip: after a skipped step 5 every weight, moment and step count equals the 4-step checkpoint (both ranks skipped)")
    check(a != c, "skip: ... while a normal step 5 changes them (the comparison is not vacuous)")
    # K skips in a row: rank 0's gradients NaN from step 2 on, --max-skips 3 -> stops after step 4
    p = sh([RUN, skip, *base, "--steps", 8, "--max-skips", 3, "--save", j("k"), "--metrics", j("mk.jsonl")], fault="nonfinite:0:2-8")
    diverged(p, "skip: 3 skips in a row", step=4)
    check(p.stderr.count("3 steps in a row") == 1, f"skip: the message counts the skips: {p.stderr.strip()!r}")
    check(not os.path.exists(j("k")), "skip: no checkpoint after the stop")
    mk = metrics_of(j("mk.jsonl"))
    check([r.get("skipped_steps", 0) for r in mk] == [0, 1, 2, 3], f"skip: the counter runs 1, 2, 3: {[r.get('skipped_steps') for r in mk]}")
    # a skip after a finite step starts the count again: NaN at steps 2-3 and 5-6 with --max-skips 3 -> runs through
    p = sh([RUN, skip, *base, "--steps", 7, "--max-skips", 3, "--metrics", j("mr.jsonl")], fault="nonfinite:1:2-3")
    check(p.returncode == 0 and metrics_of(j("mr.jsonl"))[-1].get("skipped_steps") == 2, f"skip: 2 skips then finite steps run on (rc {p.returncode})")

    # ---- stop mode, ranks agree: a NaN on one rank stops both at that step ----------------------------------
    noclip = plan(tmp, "noclip", max_grad_norm=0)
    for pl, name in ((noclip, "no gradnorm"), (good, "gradnorm")):
        for r in (0, 1):
            p = sh([RUN, pl, *base, "--steps", 5, "--save", j("agree")], fault=f"nonfinite:{r}:3")
            diverged(p, f"stop ({name}), NaN on rank {r} at step 3", step=3)
            check(not os.path.exists(j("agree")), f"stop ({name}), NaN on rank {r}: no checkpoint")

    # ---- skip needs the norm before the updates ----------------------------------------------------------------
    p = sh([RUN, noclip, *base, "--steps", 2, "--on-nonfinite", "skip"])
    err = p.stderr.strip().splitlines()
    check(p.returncode == 2 and len(err) == 1 and "--on-nonfinite skip" in err[0] and "gradient norm" in err[0],
          f"skip on a plan without gradnorm: exit 2 and one line: rc {p.returncode}, {err}")
    p = sh([RUN, good, *base, "--steps", 2, "--on-nonfinite", "skip"], fault="nonfinite:1:2")
    check(p.returncode == 0, f"skip with a clipping plan (its gradnorm precedes the updates): rc {p.returncode} {p.stderr.strip()!r}")


if __name__ == "__main__":
    sys.exit(main())
