#!/usr/bin/env python3
"""The NVMe tier end to end on the CPU (python3 stdlib only; docs/nvme-tier.md).

    nvme_test.py <mmoc-run> <mmoc-compile> <source dir>

- Plans: --nvme puts `read opt(S) <- nvme` / `write opt(S) -> nvme` on the io stream around the CPU optimizer steps of
  the stages whose opt(S) has home nvme; --nvme-place all takes every offloaded stage; a host budget takes only what
  it needs; too small a budget names the missing host memory (exit 2); a path without space names the missing bytes.
- Bit-identity (fp32): for several plans (1 and 2 ranks, grouped / gpipe, interleaved-1f1b for the resume, clipping or not, some stages
  resident) the final weights, moments and steps with the tier on two temporary directories equal the run without
  it, bit for bit; the run reports the tier's traffic and nothing is left in the directories.
- Resume with the state on the tier: 2 steps + save, then resume to 4 with the tier = the uninterrupted 4 steps.
- Errors before training: an unwritable path, a missing path, a wrong number of --nvme override paths: exit 2 with
  one message naming the path, no checkpoint written.
- Host memory: a 55M-parameter model with a host budget that forces most stages onto the tier: the measured peak
  resident set of the worker stays within --host-budget, and is lower than the all-in-host run's by at least half of
  the saving the host-memory predictions (cost/host_memory.hpp) predict.
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

RUN, COMPILE, SRC = (os.path.abspath(p) for p in sys.argv[1:4])
TOKENS = os.path.join(SRC, "data/sample/tiny_tokens.jsonl")
FAILS = []
T0 = time.time()
GiB = 1 << 30


def check(cond, what):
    if not cond:
        FAILS.append(what)
        print("FAIL: " + what, flush=True)
    else:
        print("ok: " + what.split(":")[0], flush=True)
    return cond


def sh(args, timeout=400):
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MMOC_DEVICE", "MMOC_TEST_FAULT"):
        env.pop(k, None)
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)


def must(p, what):
    if p.returncode != 0:
        print(f"{what} failed (rc {p.returncode})\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}", flush=True)
        sys.exit(1)
    return p


def metrics_of(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def compile_plan(out, *args):
    budget = [] if "--budget" in args else ["--budget", "1"]
    p = must(sh([COMPILE, "--model", "tiny-8l", "--hardware", "cpu8", *budget, "--micro-batch-size", "2", "--microbatches", "4",
                 "--seq-len", "32", "--precision", "fp32", "-o", out, "--emit", "text", *args]), "mmoc-compile " + " ".join(args))
    with open(out) as f:
        return f.read(), p.stdout


def nvme_stages(text):
    return sorted({int(m) for m in re.findall(r"^buffer opt\(S(\d+)\) bytes=\d+ home=nvme$", text, re.M)})


def empty_dirs(*dirs):
    return all(not os.listdir(d) for d in dirs)


def run_all(tmp):
    j = lambda *p: os.path.join(tmp, *p)
    d1, d2 = j("nvme0"), j("nvme1")
    os.makedirs(d1)
    os.makedirs(d2)
    tier = ["--nvme", f"{d1},{d2}", "--nvme-place", "all"]
    base = ["--data", TOKENS]

    # ---- plans -------------------------------------------------------------------------------------------------
    txt, _ = compile_plan(j("a.txt"), "--gpus", "1", "--v", "4", "--schedule", "grouped", "--offload", "all", *tier, "--update-order", "fixed")
    check(nvme_stages(txt) == [0, 1, 2, 3], f"--nvme-place all: every stage's opt(S) on nvme: {nvme_stages(txt)}")
    check(re.search(r"^plan .* nvme=" + re.escape(f"{d1},{d2}") + r" nvme_weights=1,1$", txt, re.M), "the plan line names the two paths and their weights")
    reads = re.findall(r"= read opt\(S(\d)\) <- nvme @io", txt)
    writes = re.findall(r"= write opt\(S(\d)\) -> nvme @io after\(%\d+\)", txt)
    check(sorted(reads) == ["0", "1", "2", "3"] and sorted(writes) == ["0", "1", "2", "3"], f"one read and one write per stage on the io stream: {reads} {writes}")
    check(re.search(r"= optim S\d @cpu after\([^)]*\)", txt), "optim steps wait for their reads")
    txt_none, _ = compile_plan(j("n.txt"), "--gpus", "1", "--v", "4", "--schedule", "grouped", "--offload", "all")
    check("nvme" not in txt_none and " io" not in txt_none, "without --nvme the plan has no tier")
    # the summary prints the node's host memory with the tier (cost/host_memory.hpp, the one model)
    _, out = compile_plan(j("b.txt"), "--gpus", "1", "--v", "4", "--schedule", "grouped", "--offload", "all", "--nvme", f"{d1},{d2}", "--verbose")
    m = re.search(r"host memory: at most ([0-9.]+) GiB", out)
    check(m is not None, "the summary reports the host bound: " + out)
    p = sh([COMPILE, "--model", "tiny-8l", "--hardware", "cpu8", "--budget", "1", "--gpus", "1", "--v", "4", "--schedule", "grouped", "--offload", "all",
            "--precision", "fp32", "--seq-len", "32", "--host-budget", "1.0", "-o", j("bad.txt")])
    check(p.returncode == 2 and "host memory" in p.stderr and "missing" in p.stderr and "--nvme" in p.stderr and not os.path.exists(j("bad.txt")),
          "over the host budget without --nvme: exit 2 naming the missing host memory: " + p.stderr)
    p = sh([COMPILE, "--model", "tiny-8l", "--hardware", "cpu8", "--budget", "1", "--gpus", "1", "--v", "4", "--schedule", "grouped", "--offload", "all",
            "--precision", "fp32", "--seq-len", "32", "--host-budget", "1.0", "--nvme", d1, "-o", j("bad.txt")])
    check(p.returncode == 2 and "even with the optimizer state of all 4 offloaded stages" in p.stderr and "missing" in p.stderr,
          "over the host budget even with everything on the tier: exit 2 naming the missing host memory: " + p.stderr)
    shm = os.statvfs("/dev/shm")
    check(shm.f_bavail * shm.f_frsize < 70e9, "/dev/shm has less free space than 7B's optimizer state (the next check needs that)")
    p = sh([COMPILE, "--model", "llama2-7b", "--hardware", "h200x1", "--gpus", "1", "--v", "16", "--schedule", "grouped", "--budget", "48",
            "--offload", "all", "--nvme", "/dev/shm", "--nvme-place", "all", "-q", "-o", j("big.json")])
    check(p.returncode == 2 and "nvme path '/dev/shm'" in p.stderr and "missing" in p.stderr,
          "a path without the space the tier needs: exit 2 naming the path and the missing bytes: " + p.stderr)

    # ---- bit-identity over several plans ---------------------------------------------------------------------
    cases = [
        ("1r-grouped-v4", ["--gpus", "1", "--v", "4", "--schedule", "grouped", "--offload", "all"]),
        ("2r-grouped-clip", ["--gpus", "2", "--v", "2", "--schedule", "grouped", "--offload", "all", "--on-nonfinite", "skip"]),
        ("2r-gpipe-auto", ["--gpus", "2", "--v", "2", "--schedule", "gpipe", "--offload", "auto", "--budget", "0.005"]),
    ]
    for name, args in cases:
        ref_plan, tier_plan = j(name + ".ref.txt"), j(name + ".tier.txt")
        compile_plan(ref_plan, *args)
        tt, _ = compile_plan(tier_plan, *args, *tier)
        on = nvme_stages(tt)
        check(len(on) >= 1, f"{name}: stages on the tier: {on}")
        ref_ck, tier_ck, mt = j(name + ".ref"), j(name + ".tier"), j(name + ".m.jsonl")
        must(sh([RUN, ref_plan, *base, "--steps", 3, "--save", ref_ck, "-q"]), name + " without the tier")
        must(sh([RUN, tier_plan, *base, "--steps", 3, "--save", tier_ck, "--metrics", mt, "-q"]), name + " with the tier")
        a, b = cu.state(ref_ck), cu.state(tier_ck)
        check(a == b, f"{name}: final weights, moments and steps bit-identical with the tier on two paths ({len(on)} stages on it)")
        ms = metrics_of(mt)
        rb = sum(ms[-1].get("tier_read_bytes", [0]))
        check(rb > 0 and sum(ms[-1].get("tier_write_bytes", [0])) == rb, f"{name}: the tier's reads and writes are reported: {ms[-1].get('tier_read_bytes')}")
        check(empty_dirs(d1, d2), f"{name}: nothing left in the tier's directories")

    # ---- resume with the state on the tier ---------------------------------------------------------------------
    args = ["--gpus", "2", "--v", "2", "--schedule", "interleaved-1f1b", "--offload", "all"]
    tp = j("res.tier.txt")
    compile_plan(tp, *args, *tier)
    full, half, res = j("res.full"), j("res.half"), j("res.resumed")
    must(sh([RUN, tp, *base, "--steps", 4, "--save", full, "-q"]), "4 steps with the tier")
    must(sh([RUN, tp, *base, "--steps", 2, "--save", half, "-q"]), "2 steps with the tier")
    must(sh([RUN, tp, *base, "--steps", 4, "--resume", half, "--save", res, "-q"]), "resume to 4 with the tier")
    check(cu.state(full) == cu.state(res), "resume with the state on the tier: the uninterrupted run's state, bit for bit")
    other1, other2 = j("other0"), j("other1")
    os.makedirs(other1)
    os.makedirs(other2)
    r2 = j("res.other")
    must(sh([RUN, tp, *base, "--steps", 4, "--resume", half, "--save", r2, "--nvme", f"{other1},{other2}", "-q"]), "resume with --nvme elsewhere")
    check(cu.state(full) == cu.state(r2), "mmoc-run --nvme: other directories for the same plan, the same state")

    run_alternate(tmp, d1, d2)

    # ---- errors before training ----------------------------------------------------------------------------------
    ro = j("ro")
    os.makedirs(ro)
    os.chmod(ro, 0o555)
    writable = os.access(ro, os.W_OK)  # root writes anywhere: use /proc then
    bad = "/proc" if writable else ro
    ck = j("never")
    p = sh([RUN, tp, *base, "--steps", 1, "--save", ck, "--nvme", f"{bad},{d2}"])
    check(p.returncode == 2 and bad in p.stderr and "ready" not in p.stdout and not os.path.exists(ck),
          f"an unwritable tier path: exit 2 naming it before training, no checkpoint: rc {p.returncode} {p.stderr.strip()}")
    p = sh([RUN, tp, *base, "--steps", 1, "--nvme", f"{j('missing')},{d2}"])
    check(p.returncode == 2 and "missing" in p.stderr, f"a missing tier path: exit 2 naming it: {p.stderr.strip()}")
    p = sh([RUN, tp, *base, "--steps", 1, "--nvme", d1])
    check(p.returncode == 2 and "2 path(s)" in p.stderr, f"--nvme with the wrong number of paths: exit 2: {p.stderr.strip()}")
    os.chmod(ro, 0o755)

    # ---- host memory within --host-budget ------------------------------------------------------------------------
    # a 55M-parameter model (16 layers of 512): 16 B/param in host memory without the tier (~0.85 GiB), 8 with it
    # (fp32), plus cpu8's process base (0.5 GiB) and checkpoint staging (0.5 GiB) in the prediction
    model = j("rss-model.json")
    with open(model, "w") as f:
        json.dump({"name": "rss-55m", "layers": 16, "hidden": 512, "ffn": 1408, "heads": 8, "kv_heads": 4, "vocab": 8000,
                   "max_seq": 64, "rope_theta": 10000.0, "norm_eps": 1e-06, "tied_embeddings": False}, f)
    common = ["--model", model, "--hardware", "cpu8", "--budget", "4", "--gpus", "1", "--v", "18", "--schedule", "grouped", "--offload", "all",
              "--micro-batch-size", "1", "--microbatches", "2", "--seq-len", "32", "--precision", "fp32", "--emit", "text"]
    host_plan, nv_plan = j("rss.host.txt"), j("rss.nvme.txt")
    out_h = must(sh([COMPILE, *common, "--nvme", d1, "-o", host_plan]), "compile the all-in-host plan").stdout
    budget_gib = 1.60
    out_n = must(sh([COMPILE, *common, "--host-budget", str(budget_gib), "--nvme", f"{d1},{d2}", "-o", nv_plan]), "compile within the host budget").stdout
    bound = lambda o: float(re.search(r"host memory: at most ([0-9.]+) GiB", o).group(1)) * GiB
    with open(host_plan) as f:
        check("home=nvme" not in f.read(), "without a host budget nothing goes to the tier")
    with open(nv_plan) as f:
        nt = f.read()
    check(len(nvme_stages(nt)) >= 8 and bound(out_n) <= budget_gib * GiB, f"the host budget moves stages onto the tier: {nvme_stages(nt)}; {out_n}")
    predicted = bound(out_h) - bound(out_n)
    mh, mn = j("rss.host.jsonl"), j("rss.nvme.jsonl")
    must(sh([RUN, host_plan, *base, "--steps", 2, "--metrics", mh, "-q", "--optim-threads", "2"]), "all-in-host run")
    must(sh([RUN, nv_plan, *base, "--steps", 2, "--metrics", mn, "-q", "--optim-threads", "2"]), "run with the tier")
    rss_h = metrics_of(mh)[-1]["host_peak_rss_bytes"][0]
    rss_n = metrics_of(mn)[-1]["host_peak_rss_bytes"][0]
    print(f"peak RSS: all in host {rss_h / 2**20:.0f} MiB, with the tier {rss_n / 2**20:.0f} MiB, budget {budget_gib * 1024:.0f} MiB; "
          f"predicted host memory {bound(out_h) / 2**20:.0f} -> {bound(out_n) / 2**20:.0f} MiB", flush=True)
    check(rss_n <= budget_gib * GiB, f"measured peak RSS within --host-budget: {rss_n / 2**20:.0f} MiB <= {budget_gib * 1024:.0f} MiB")
    check(rss_h - rss_n >= 0.5 * predicted,
          f"the tier lowers the measured peak RSS by at least half the predicted saving: {rss_h / 2**20:.0f} -> {rss_n / 2**20:.0f} MiB, predicted {predicted / 2**20:.0f} MiB less")
    # the alternating update order keeps state in the staging slots across steps: the same host memory
    alt_plan, ma = j("rss.alt.txt"), j("rss.alt.jsonl")
    out_a = must(sh([COMPILE, *common, "--host-budget", str(budget_gib), "--nvme", f"{d1},{d2}", "--update-order", "alternate", "-o", alt_plan]),
                 "compile within the host budget, alternating order").stdout
    with open(alt_plan) as f:
        check(" odd {" in f.read() and bound(out_a) <= budget_gib * GiB, "the alternating plan within the host budget: " + out_a)
    must(sh([RUN, alt_plan, *base, "--steps", 3, "--metrics", ma, "-q", "--optim-threads", "2"]), "run with the tier, alternating order")
    rss_a = max(m["host_peak_rss_bytes"][0] for m in metrics_of(ma))
    check(rss_a <= budget_gib * GiB, f"alternating order: measured peak RSS within --host-budget: {rss_a / 2**20:.0f} MiB <= {budget_gib * 1024:.0f} MiB")


def opt_bytes(text):
    return {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"^buffer opt\(S(\d+)\) bytes=(\d+) home=nvme$", text, re.M)}


def header_ints(text, key):
    m = re.search(r"^plan .*\b" + key + r"=([0-9,]+)", text, re.M)
    return [int(x) for x in m.group(1).split(",")] if m else []


def body_ops(text, odd):
    """The tier reads and writes (stage lists) of each gpu block of one body."""
    out = {}
    for m in re.finditer(r"^gpu g(\d+)( odd)? \{\n(.*?)^\}", text, re.M | re.S):
        if bool(m.group(2)) != odd:
            continue
        out[int(m.group(1))] = (re.findall(r"= read opt\(S(\d+)\) <- nvme", m.group(3)), re.findall(r"= write opt\(S(\d+)\) -> nvme", m.group(3)),
                                re.findall(r"= optim S(\d+) @cpu", m.group(3)))
    return out


def run_alternate(tmp, d1, d2):
    """The alternating (cache-friendly) update order: plans, bit-identity, traffic measured against the prediction, resume."""
    j = lambda *p: os.path.join(tmp, *p)
    base = ["--data", TOKENS]
    tier = ["--nvme", f"{d1},{d2}", "--nvme-place", "all"]
    job = j("bad-order.json")
    with open(job, "w") as f:
        json.dump({"model": "tiny-8l", "hardware": "cpu8", "gpus": 1, "seq_len": 32, "update_order": "sideways"}, f)
    p = sh([COMPILE, job, "-o", j("never.json")])
    check(p.returncode == 2 and "update_order" in p.stderr and not os.path.exists(j("never.json")),
          f"job update_order sideways: exit 2 naming the key: {p.stderr.strip()}")
    for name, args in [("alt1", ["--gpus", "1", "--v", "4", "--schedule", "grouped", "--offload", "all"]),
                       ("alt2", ["--gpus", "2", "--v", "4", "--schedule", "gpipe", "--offload", "all", "--on-nonfinite", "skip"])]:
        fixed_t, fo = compile_plan(j(name + ".fixed.txt"), *args, *tier, "--update-order", "fixed")
        alt_t, ao = compile_plan(j(name + ".alt.txt"), *args, *tier, "--update-order", "alternate", "--verbose")
        ref_t, _ = compile_plan(j(name + ".ref.txt"), *args)
        check(" odd {" not in fixed_t and "carry_" not in fixed_t, f"{name}: --update-order fixed: one body")
        ce, co = header_ints(alt_t, "carry_even"), header_ints(alt_t, "carry_odd")
        even, odd, fx = body_ops(alt_t, False), body_ops(alt_t, True), body_ops(fixed_t, False)
        ok = len(ce) == 2 * len(fx) and len(co) == 2 * len(fx) and set(even) == set(odd) == set(fx)
        for g, (r, w, o) in fx.items():
            er, ew, eo = even[g]
            orr, ow, oo = odd[g]
            n = len(o)
            # even: the fixed order, the first two kept from the odd step (no read), the last two kept (no write);
            # odd: the reverse order, the same rule
            ok = ok and eo == o and oo == o[::-1] and er == o[2:] and ew == o[:n - 2] and orr == o[::-1][2:] and ow == o[::-1][:n - 2]
            ok = ok and sorted(map(int, o[-2:])) == sorted(s for s in co if str(s) in o) and sorted(map(int, o[:2])) == sorted(s for s in ce if str(s) in o)
        check(ok, f"{name}: alternate: odd-step bodies in the reverse order, two stages per rank kept in host memory across each step "
                  f"(carry_even {ce}, carry_odd {co}): fixed {fx} even {even} odd {odd}")
        check("update order: fixed" in ao and "alternate (asked)" in ao, f"{name}: --verbose names the decision with both simulations: {ao}")
        ob = opt_bytes(alt_t)
        total = sum(ob.values())
        m = re.search(r"update order: alternate \(even steps [0-9.]+ s, (\d+) bytes of tier I/O; odd steps [0-9.]+ s, (\d+) bytes", ao)
        pred = (int(m.group(1)), int(m.group(2))) if m else None
        want = 2 * total - sum(ob[s] for s in ce) - sum(ob[s] for s in co)
        check(pred == (want, want), f"{name}: the compiler predicts {want} bytes of tier I/O per step (fixed {2 * total}): {pred}")
        for steps in ((3, 4) if name == "alt1" else (4,)):  # an odd and an even number of steps (one plan is enough for both)
            ck = {k: j(f"{name}.{k}.{steps}") for k in ("ref", "fixed", "alt")}
            ma = j(f"{name}.alt.{steps}.jsonl")
            must(sh([RUN, j(name + ".ref.txt"), *base, "--steps", steps, "--save", ck["ref"], "-q"]), f"{name} without the tier")
            must(sh([RUN, j(name + ".fixed.txt"), *base, "--steps", steps, "--save", ck["fixed"], "-q"]), f"{name} fixed order")
            must(sh([RUN, j(name + ".alt.txt"), *base, "--steps", steps, "--save", ck["alt"], "--metrics", ma, "-q"]), f"{name} alternating order")
            a = cu.state(ck["alt"])
            check(a == cu.state(ck["ref"]) and a == cu.state(ck["fixed"]),
                  f"{name}, {steps} steps: alternating order bit-identical to the fixed order and to the run without the tier")
            check(empty_dirs(d1, d2), f"{name}: nothing left in the tier's directories")
            if steps == 4:
                ms = metrics_of(ma)
                got = [(sum(x["tier_read_bytes"]), sum(x["tier_write_bytes"])) for x in ms]
                # step 0 also reads what the plan expects kept (nothing was kept before it); from step 1 on the carry
                # of the step's parity is neither read nor (by the step before) written
                want_rw = [(total - sum(ob[s] for s in (ce if k % 2 == 0 else co)), total - sum(ob[s] for s in (co if k % 2 == 0 else ce)))
                           for k in range(4)]
                want_rw[0] = (total, want_rw[0][1])
                check(got == want_rw, f"{name}: measured tier bytes (read, written) per step {got} == {want_rw} (fixed: {total} each)")
    # resume from a checkpoint after an odd and after an even number of steps
    tp = j("alt1.alt.txt")
    full = j("altres.full")
    must(sh([RUN, tp, *base, "--steps", 5, "--save", full, "-q"]), "5 steps, alternating order")
    for k in (2, 3):
        half, res = j(f"altres.{k}"), j(f"altres.{k}.resumed")
        must(sh([RUN, tp, *base, "--steps", k, "--save", half, "-q"]), f"{k} steps, alternating order")
        must(sh([RUN, tp, *base, "--steps", 5, "--resume", half, "--save", res, "-q"]), f"resume after {k} steps to 5")
        check(cu.state(full) == cu.state(res), f"alternating order: resume after {k} steps ({'odd' if k % 2 else 'even'}) is exact")
    # a checkpoint in the middle of the run (--save-every) and the final one: both complete
    mid = j("altres.every")
    must(sh([RUN, tp, *base, "--steps", 5, "--save", mid, "--save-every", 2, "-q"]), "5 steps with a checkpoint every 2")
    check(cu.state(full) == cu.state(mid), "alternating order with checkpoints every 2 steps: the same final state")


def main():
    tmp = tempfile.mkdtemp(prefix="mmoc-nvme-test-")
    try:
        run_all(tmp)
    finally:
        for root, dirs, _ in os.walk(tmp):
            for d in dirs:
                try:
                    os.chmod(os.path.join(root, d), 0o755)
                except OSError:
                    pass
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"nvme_test: {len(FAILS)} failure(s) in {time.time() - T0:.0f} s")
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
