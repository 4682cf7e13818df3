#!/usr/bin/env python3
"""mmoc-run's checkpoints on the CPU (python3 stdlib only): layout, exactness, background saves, atomicity, times.

    checkpoint_test.py <mmoc-run> <mmoc-compile> <source dir>

- Layout: one HF shard per stage (+ index), model.safetensors for one stage; every file's data at 4 KiB; fp32
  weights hold the master (no second copy), bf16 weights put the master in mmoc_state.
- A background save (--save-every) holds exactly the state of its step although the next step runs while it is
  written: it equals a synchronous save of that step bit for bit, even when the disk is slow (the next step's
  updates wait for it, and the run reports how long) and that next step then writes NaNs into the state.
- Resuming from a background checkpoint, or from one with bf16 weights, gives the uninterrupted run's state bit for
  bit.
- A crash in the middle of a save leaves the previous checkpoint as it was and usable; the next save cleans up.
- A crash after a save is swapped in, before the previous checkpoint (set aside, removed in the background) is gone,
  leaves the new checkpoint complete; the next save clears the leftover.
- Each run prints and records its set-up, init / load and save times.
"""
import json
import os
import re
import shutil
import struct
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


def plan(tmp, name, *args, **train):
    with open(os.path.join(SRC, "configs/jobs/tiny-cpu.json")) as f:
        job = json.load(f)
    job["train"].update(train)
    jp = os.path.join(tmp, name + ".job.json")
    with open(jp, "w") as f:
        json.dump(job, f)
    out = os.path.join(tmp, name + ".plan.json")
    must(sh([COMPILE, jp, "-o", out, "-q", *args]), "mmoc-compile " + name)
    return out


def data_aligned(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
    return (8 + n) % 4096 == 0


def main():
    tmp = tempfile.mkdtemp(prefix="mmoc-ckpt-")
    try:
        run_all(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"checkpoint_test: {len(FAILS)} failure(s), {time.time() - T0:.1f} s")
    return 1 if FAILS else 0


def run_all(tmp):
    j = lambda *p: os.path.join(tmp, *p)
    p2 = plan(tmp, "tiny2")                                  # 2 ranks, 4 stages, clipping
    nc = plan(tmp, "noclip", max_grad_norm=0)                # no gradnorm: updates as soon as a stage's gradient is in
    p1 = plan(tmp, "tiny1", "--gpus", "1", "--v", "1")        # one stage
    base = ["--data", TOKENS]

    # ---- layout, times printed and recorded -------------------------------------------------------------------
    ck, m = j("out", "ck"), j("m.jsonl")
    p = must(sh([RUN, p2, *base, "--steps", 4, "--save", ck, "--save-every", 2, "--metrics", m]), "run with saves")
    check(re.search(r"^rank 0: ready after [0-9.]+ s, [0-9.]+ s after launch \(set-up [0-9.]+ s: start [0-9.]+, device and host state [0-9.]+, transports [0-9.]+; weights random: [0-9.]+ s\)$", p.stdout, re.M),
          "the ready line gives set-up and init times: " + "".join(l for l in p.stdout.splitlines(True) if "ready" in l))
    saves = re.findall(r"^saved checkpoint \S+ \(step (\d+)\) in [0-9.]+ s: [0-9.]+ GB written at [0-9.]+ GB/s \(writing [0-9.]+ s, completing [0-9.]+ s\)(.*)$", p.stdout, re.M)
    check([s[0] for s in saves] == ["2", "4"], f"saves at steps 2 and 4 reported with size and rate: {saves}")
    check(len(saves) == 2 and "in the background" in saves[0][1] and "background" not in saves[1][1], f"step 2 saved in the background, step 4 not: {saves}")
    ms = metrics_of(m)
    check([r["step"] for r in ms] == [1, 2, 3, 4], f"one metrics line per step: {[r.get('step') for r in ms]}")
    check(all(k in ms[0] for k in ("ready_s", "setup_s", "setup_start_s", "setup_state_s", "setup_comm_s", "init_s", "launch_ready_s")) and "load_s" not in ms[0],
          f"step 1 records set-up and init times: {sorted(ms[0])}")
    check(ms[2].get("save_step") == 2 and ms[2].get("save_background") is True and ms[2].get("save_bytes", 0) > 0,
          "the background save of step 2 is recorded when it completes (step 3's line)")
    check(ms[3].get("save_step") == 4 and ms[3].get("save_background") is False and ms[3].get("save_s", -1) >= 0, "the final save is on the last line")
    check(0 <= ms[3].get("save_finalize_s", -1) <= ms[3]["save_s"], f"the final save's completion time (rank 0) is within its total: {ms[3]}")
    files = sorted(os.listdir(ck))
    shards = [f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5)]
    check(all(s in files for s in shards) and "model.safetensors.index.json" in files and "model.safetensors" not in files,
          f"4 stages: 4 shards and an index: {files}")
    idx = json.load(open(os.path.join(ck, "model.safetensors.index.json")))
    check(set(idx["weight_map"].values()) == set(shards) and idx["metadata"]["total_size"] == sum(
        len(v[2]) for v in cu.hf_tensors(ck).values()), "the index maps every tensor to its shard and gives the total size")
    st0 = cu.read_safetensors(os.path.join(ck, "mmoc_state", "S0.safetensors"))
    check(sorted(k for k in st0 if k != "__metadata__") == ["exp_avg", "exp_avg_sq"] and st0["__metadata__"].get("step") == "4",
          f"fp32 weights: mmoc_state holds the moments and the step, not a second master: {sorted(st0)}")
    every = [os.path.join(ck, f) for f in shards] + [os.path.join(ck, "mmoc_state", f"S{k}.safetensors") for k in range(4)]
    check(all(data_aligned(f) for f in every), "every file's data starts at a multiple of 4 KiB")
    check(sorted(os.listdir(j("out"))) == ["ck"], f"nothing left beside the checkpoint: {os.listdir(j('out'))}")
    one = j("one")
    must(sh([RUN, p1, *base, "--steps", 1, "--save", one, "-q"]), "one-stage run")
    check(os.path.isfile(os.path.join(one, "model.safetensors")) and not os.path.exists(os.path.join(one, "model.safetensors.index.json")),
          f"one stage: model.safetensors, no index: {sorted(os.listdir(one))}")
    p = must(sh([RUN, p1, *base, "--steps", 1, "--init", ck, "--metrics", j("mi.jsonl")]), "--init of the sharded checkpoint")
    mi = metrics_of(j("mi.jsonl"))[0]
    check("load_s" in mi and mi.get("load_bytes", 0) >= idx["metadata"]["total_size"], f"--init records load time and bytes: {mi}")
    check(re.search(r"weights \S+: [0-9.]+ s; read [0-9.]+ GB in [0-9.]+ s, [0-9.]+ GB/s\)$", p.stdout, re.M), "--init prints its read time and rate")

    # ---- a background save holds its step exactly, even on a slow disk with NaN updates right after ----------
    sync4, bg4, full6 = j("sync4"), j("bg4"), j("full6")
    must(sh([RUN, nc, *base, "--steps", 4, "--save", sync4, "-q"]), "synchronous save of step 4")
    mb = j("mb.jsonl")
    # rank 0 writes slowly (0.4 s a chunk) and rank 1's step-5 gradients are NaN: step 5's updates wait for the save,
    # then put NaNs into the state, and the run stops; the background checkpoint of step 4 must be that of sync4
    p = sh([RUN, nc, *base, "--steps", 6, "--save", bg4, "--save-every", 4, "--metrics", mb], fault="slow-save:0:400,nonfinite:1:5")
    check(p.returncode == 4, f"background: the run stops at the NaN step (rc {p.returncode}, {p.stderr.strip()!r})")
    check(json.load(open(os.path.join(bg4, "mmoc_state/trainer_state.json")))["step"] == 4, "background: the checkpoint is step 4's")
    a, b = cu.state(bg4), cu.state(sync4)
    check(a == b, "background: weights, moments and steps equal the synchronous save of step 4, bit for bit")
    ta, tb = (json.load(open(os.path.join(d, "mmoc_state/trainer_state.json"))) for d in (bg4, sync4))
    check(ta["data"] == tb["data"], "background: the data position is step 4's")
    ml = metrics_of(mb)
    check(len(ml) == 5 and ml[4].get("save_step") == 4 and ml[4].get("save_optimizer_wait_s", 0) > 0.05,
          f"background: step 5's updates waited for the slow save, and the metrics say how long: {ml[-1:]}")
    check(cu.all_finite(bg4), "background: nothing non-finite in it")
    # resuming from it is exact
    must(sh([RUN, nc, *base, "--steps", 6, "--save", full6, "--metrics", j("m6.jsonl"), "-q"]), "uninterrupted 6 steps")
    res6 = j("res6")
    must(sh([RUN, nc, *base, "--steps", 6, "--resume", bg4, "--save", res6, "--metrics", j("mr.jsonl"), "-q"]), "resume from the background save")
    check(cu.state(res6) == cu.state(full6), "resume from the background checkpoint: the 6-step state, bit for bit")
    l6, lr = [r["loss"] for r in metrics_of(j("m6.jsonl"))], [r["loss"] for r in metrics_of(j("mr.jsonl"))]
    check(lr == l6[4:], f"resume: steps 5-6 have the uninterrupted run's losses: {lr} vs {l6[4:]}")
    check("load_s" in metrics_of(j("mr.jsonl"))[0], "--resume records its load time")

    # ---- bf16 weights: the master goes to mmoc_state, and resuming is still exact ----------------------------
    b3, r5, f5 = j("bf3"), j("r5"), j("f5")
    must(sh([RUN, p2, *base, "--steps", 5, "--save", f5, "-q"]), "5 steps")
    must(sh([RUN, p2, *base, "--steps", 3, "--save", b3, "--save-dtype", "bf16", "-q"]), "3 steps, bf16 weights")
    t = cu.hf_tensors(b3)
    check(all(v[0] == "BF16" for v in t.values()), "bf16 weights in the shards")
    check("master" in cu.read_safetensors(os.path.join(b3, "mmoc_state", "S1.safetensors")), "bf16 weights: mmoc_state holds the fp32 master")
    must(sh([RUN, p2, *base, "--steps", 5, "--resume", b3, "--save", r5, "-q"]), "resume from bf16 weights")
    check(cu.state(r5) == cu.state(f5), "resume from a bf16-weights checkpoint: the uninterrupted state, bit for bit")

    # ---- a crash in the middle of a save: the previous checkpoint stays as it was, and usable ----------------
    digest = cu.tree_digest(ck)
    p = sh([RUN, p2, *base, "--steps", 3, "--save", ck, "--save-every", 1, "-q"], fault="crash-in-save:1")
    check(p.returncode != 0, f"crash: the run fails (rc {p.returncode})")
    check(cu.tree_digest(ck) == digest, "crash: the previous checkpoint is byte for byte what it was")
    must(sh([RUN, p2, *base, "--steps", 5, "--resume", ck, "-q"]), "crash: the previous checkpoint resumes")
    must(sh([RUN, p2, *base, "--steps", 5, "--resume", ck, "--save", ck, "-q"]), "crash: the next save")
    check(sorted(os.listdir(j("out"))) == ["ck"], f"crash: the next save cleaned up: {os.listdir(j('out'))}")
    check(json.load(open(os.path.join(ck, "mmoc_state/trainer_state.json")))["step"] == 5, "crash: the next save is in place")

    # ---- a crash after a save is in place, while the previous checkpoint is still being removed --------------
    # the previous checkpoint is renamed to <ck>.old and removed in the background; rank 0 ends right after the swap
    full6b = j("full6b")
    must(sh([RUN, p2, *base, "--steps", 6, "--save", full6b, "-q"]), "uninterrupted 6 steps (2 ranks)")
    p = sh([RUN, p2, *base, "--steps", 7, "--resume", ck, "--save", ck, "--save-every", 1, "-q"], fault="crash-after-swap:0")
    check(p.returncode != 0 and "ends after the swap" in p.stderr, f"crash after the swap: the run fails there (rc {p.returncode}, {p.stderr.strip()!r})")
    ts = lambda d: json.load(open(os.path.join(d, "mmoc_state/trainer_state.json")))["step"]
    check(ts(ck) == 6 and cu.state(ck) == cu.state(full6b), "crash after the swap: the new checkpoint is in place, complete (the uninterrupted step-6 state)")
    check(os.path.isdir(ck + ".old") and ts(ck + ".old") == 5, f"crash after the swap: the previous one sits aside: {sorted(os.listdir(j('out')))}")
    must(sh([RUN, p2, *base, "--steps", 7, "--resume", ck, "--save", ck, "-q"]), "crash after the swap: resume and save")
    check(sorted(os.listdir(j("out"))) == ["ck"] and ts(ck) == 7, f"crash after the swap: the next save cleared the leftover: {os.listdir(j('out'))}")


if __name__ == "__main__":
    sys.exit(main())
