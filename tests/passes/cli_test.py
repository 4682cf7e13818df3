#!/usr/bin/env python3
"""mmoc-compile's command line: bad input exits 2 with one clear line on stderr and writes no output file;
--print-after prints the plan; --v auto and --schedule auto produce a plan; the seed jobs compile in < 1 s
(the summary's `compile time:` line). Python stdlib only."""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

failures = []
TINY = ["--model", "tiny-8l", "--hardware", "h200x2", "--gpus", "2", "--seq-len", "32"]


def check(cond, what):
    print(("ok    " if cond else "FAIL  ") + what)
    if not cond:
        failures.append(what)


def run(compiler, root, args):
    return subprocess.run([compiler] + args, cwd=root, capture_output=True, text=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compiler", required=True)
    ap.add_argument("--root", required=True)
    a = ap.parse_args()
    C, R = a.compiler, a.root
    with tempfile.TemporaryDirectory() as tmp:
        bad_json = os.path.join(tmp, "bad.json")
        with open(bad_json, "w") as f:
            f.write('{"model": "tiny-8l", "gpus": 2,')
        unknown_field = os.path.join(tmp, "unknown.json")
        with open(unknown_field, "w") as f:
            json.dump({"model": "tiny-8l", "hardware": "h200x2", "gpus": 2, "seq_len": 32, "micro_batchsize": 4}, f)
        seed7 = "configs/jobs/seed-llama2-7b-l20x4.json"
        seed13 = "configs/jobs/seed-llama2-13b-l20x4.json"
        # (name, args, regex the one stderr line must match)
        bad = [
            ("unknown model", ["--model", "llama9-1t", "--hardware", "h200x2"], r"unknown model 'llama9-1t'.*available: .*tiny-8l"),
            ("unknown hardware", ["--model", "tiny-8l", "--hardware", "tpu-v9"], r"unknown hardware 'tpu-v9'.*available: .*l20x4"),
            ("malformed job JSON", [bad_json], r"bad\.json: invalid JSON"),
            ("unknown job field", [unknown_field], r"unknown key 'micro_batchsize'"),
            ("v x N more than layers", TINY + ["--v", "6"], r"6 x 2 = 12 stages.*only 10 partitionable layers"),
            ("interleaved-1f1b, microbatches % gpus != 0",
             TINY + ["--v", "2", "--schedule", "interleaved-1f1b", "--microbatches", "3"], r"divisible by gpus"),
            ("1f1b with v=2", TINY + ["--v", "2", "--schedule", "1f1b"], r"1f1b takes v=1"),
            ("unknown schedule", TINY + ["--schedule", "zigzag"], r"unknown schedule 'zigzag'"),
            ("budget too small", [seed7, "--budget", "4"], r"too small.*smallest budget that fits is [0-9]+\.[0-9]+ GiB"),
            ("budget above the GPU", [seed7, "--budget", "80"], r"exceeds"),
            ("more GPUs than the hardware", ["--model", "tiny-8l", "--hardware", "h200x2", "--gpus", "3", "--seq-len", "32"],
             r"--gpus 3 but hardware 'h200x2' has 2"),
            ("seq-len above the model's maximum", ["--model", "tiny-8l", "--hardware", "h200x2", "--seq-len", "128"], r"exceeds tiny-8l's maximum 64"),
            ("missing job file", [os.path.join(tmp, "nope.json")], r"cannot read job file"),
            ("unknown --print-after pass", TINY + ["--print-after", "nosuchpass"], r"unknown pass 'nosuchpass'"),
            # the NVMe tier holds whole stages of one pipeline: refused with data or tensor parallelism
            ("--nvme with --dp 2", ["--model", "tiny-8l", "--hardware", "h200x2", "--gpus", "1", "--dp", "2", "--seq-len", "32",
                                    "--microbatches", "2", "--nvme", "/nonexistent-nvme0/mmoc"],
             r"--nvme \(the NVMe tier\) with --dp 2 --tp 1 is not supported"),
            ("--nvme with --tp 2", ["--model", "tiny-8l", "--hardware", "h200x2", "--gpus", "1", "--tp", "2", "--seq-len", "32",
                                    "--microbatches", "2", "--nvme", "/nonexistent-nvme0/mmoc"],
             r"--nvme \(the NVMe tier\) with --dp 1 --tp 2 is not supported"),
            ("negative --bucket-mib", TINY + ["--bucket-mib", "-1"], r"--bucket-mib must be a size in MiB >= 0 .*got -1"),
        ]
        for name, args, pat in bad:
            for emit in ("json", "text"):
                out = os.path.join(tmp, "out-%d.%s" % (len(failures), emit))
                p = run(C, R, args + ["--emit", emit, "-o", out])
                lines = [l for l in p.stderr.splitlines() if l.strip()]
                check(p.returncode == 2, "%s (--emit %s): exit 2 (got %d)" % (name, emit, p.returncode))
                check(len(lines) == 1, "%s: one stderr line (got %d: %r)" % (name, len(lines), p.stderr[:300]))
                check(bool(lines) and lines[0].startswith("mmoc-compile: error: ") and re.search(pat, lines[0]) is not None,
                      "%s: message matches /%s/ (got %r)" % (name, pat, lines[0] if lines else ""))
                check(not os.path.exists(out), "%s: no output file written" % name)
                check(sorted(os.listdir(tmp)) == ["bad.json", "unknown.json"], "%s: no temporary left behind" % name)
        # the smallest budget named in the message fits
        p = run(C, R, [seed7, "--budget", "4", "-q"])
        m = re.search(r"smallest budget that fits is ([0-9.]+) GiB", p.stderr)
        if m:
            q = run(C, R, [seed7, "--budget", m.group(1), "-q"])
            check(q.returncode == 0, "the named smallest budget %s GiB compiles (got %d: %s)" % (m.group(1), q.returncode, q.stderr.strip()))

        # defaults: v, schedule, recompute and offload are auto -- the newcomer's command compiles (issue 10), at 48 and
        # 20 GiB, with the search's progress on stderr and a few seconds at most
        NEWCOMER = ["--model", "llama2-7b", "--hardware", "h200x1", "--gpus", "1", "--micro-batch-size", "8",
                    "--microbatches", "4", "--seq-len", "1024"]
        for b in ("48", "20"):
            p = run(C, R, NEWCOMER + ["--budget", b])
            check(p.returncode == 0, "7B on h200x1 at --budget %s with the defaults: exit 0 (%s)" % (b, p.stderr.strip()[-300:]))
            check("candidate v=" in p.stderr, "7B at %s: the search's progress on stderr" % b)
            m = re.search(r"^compile time: ([0-9.]+) ms \(([0-9]+) candidates\)", p.stdout, re.M)
            check(m is not None and int(m.group(2)) > 1, "7B at %s: several candidates searched" % b)
            if m:
                print("      7B at --budget %s: compile time %s ms, %s candidates" % (b, m.group(1), m.group(2)))
                check(float(m.group(1)) < 5000, "7B at %s: search under 5 s" % b)
            hm = re.search(r"^  g0  predicted ([0-9.]+) GiB", p.stdout, re.M)
            check(hm is not None, "7B at %s: the summary prints predicted host memory per rank" % b)
        # a fixed value stays the user's override
        p = run(C, R, NEWCOMER + ["--budget", "100", "--v", "2", "--schedule", "grouped", "-q", "-o", os.path.join(tmp, "o.txt"), "--emit", "text"])
        if p.returncode == 0:
            with open(os.path.join(tmp, "o.txt")) as f:
                text = f.read()
            os.remove(os.path.join(tmp, "o.txt"))
            check(re.search(r"^plan .*schedule=grouped gpus=1 v=2 ", text, re.M) is not None, "--v 2 --schedule grouped: kept as given")
        else:
            check(False, "--v 2 --schedule grouped at 100 GiB: exit 0 (%s)" % p.stderr.strip()[-300:])

        # nothing fits: the smallest budget over every candidate (v, schedule, recompute, offload), and it compiles
        p = run(C, R, NEWCOMER + ["--budget", "8"])
        lines = [l for l in p.stderr.splitlines() if l.startswith("mmoc-compile: error: ")]
        check(p.returncode == 2 and len(lines) == 1, "7B at 8 GiB: exit 2 with one error line (got %d)" % p.returncode)
        m = re.search(r"smallest budget that fits is ([0-9.]+) GiB", lines[0] if lines else "")
        needs = [float(x) for x in re.findall(r"needs a budget of ([0-9.]+) GiB", p.stderr)]
        check(m is not None and needs, "7B at 8 GiB: names the smallest budget (%r)" % (lines[0][:300] if lines else p.stderr[-300:]))
        if m and needs:
            check(abs(float(m.group(1)) - min(needs)) < 1e-9,
                  "7B at 8 GiB: the named budget %s GiB is the smallest over all candidates (%.2f; the last was %.2f)"
                  % (m.group(1), min(needs), needs[-1]))
            q = run(C, R, NEWCOMER + ["--budget", m.group(1), "-q"])
            check(q.returncode == 0, "7B at the named %s GiB compiles (got %d: %s)" % (m.group(1), q.returncode, q.stderr.strip()[-300:]))

        # host memory: 13B on h200x1 is refused naming host memory (needed vs available), not a GPU figure
        p = run(C, R, ["--model", "llama2-13b"] + NEWCOMER[2:] + ["--budget", "48", "-q"])
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        check(p.returncode == 2 and len(lines) == 1, "13B on h200x1: exit 2, one line (got %d: %r)" % (p.returncode, p.stderr[-300:]))
        check(bool(lines) and re.search(r"host memory: the plan needs [0-9.]+ GiB of host memory but 'h200x1' has 125\.00 GiB", lines[0])
              is not None and "smallest budget" not in lines[0], "13B on h200x1: names host memory needed vs available (%r)"
              % (lines[0][:300] if lines else ""))

        # ... and with --nvme the tier makes it fit the host (no --host-budget): the search keeps the candidates the
        # tier placement rescues, and the plan's host= (with the tier) is within the node's 125 GiB
        nv = os.path.join(tmp, "nvme-13b.txt")
        p = run(C, R, ["--model", "llama2-13b"] + NEWCOMER[2:] + ["--budget", "48", "--nvme", "/nonexistent-nvme0/mmoc", "--emit", "text", "-o", nv])
        check(p.returncode == 0, "13B on h200x1 with --nvme: exit 0 (%s)" % p.stderr.strip()[-300:])
        if p.returncode == 0:
            with open(nv) as f:
                text = f.read()
            os.remove(nv)
            hb = re.search(r"^plan .* host=([0-9]+) ", text, re.M)
            check("home=nvme" in text and hb is not None and int(hb.group(1)) <= 125 << 30,
                  "13B with --nvme: state on the tier, host= within 125 GiB (%s)" % (hb.group(1) if hb else None))
            check(re.search(r"^host memory: at most [0-9.]+ GiB per node, within 125\.00 GiB", p.stdout, re.M) is not None,
                  "13B with --nvme: the summary prints the node's host memory with the tier")

        # NVMe space (MMOC_NVME_FREE_GIB: the free space on the machine the plan is for). 13B at 130 GiB with
        # --host-budget 110: the most offloaded residency choice needs 69 GiB on the tier; with 36 GiB free another
        # choice (fewer stages offloaded) fits. A choice short of disk space once ended the whole candidate.
        dev = os.path.join(tmp, "nvme-dev")
        os.makedirs(dev, exist_ok=True)
        def run_free(free, args):
            env = dict(os.environ, MMOC_NVME_FREE_GIB=free)
            return subprocess.run([C] + args, cwd=R, capture_output=True, text=True, env=env)
        big = ["--model", "llama2-13b", "--hardware", "h200x1", "--gpus", "1", "--micro-batch-size", "8", "--seq-len", "1024",
               "--budget", "130", "--microbatches", "8", "--v", "42", "--schedule", "grouped",
                                                          "--host-budget", "110", "--nvme", dev, "-q", "-o", os.path.join(tmp, "n13.txt"), "--emit", "text"]
        p = run_free("36", big)
        check(p.returncode == 0, "13B, --host-budget 110, 36 GiB free on the tier: a choice that fits (%s)" % p.stderr.strip()[-300:])
        # no space at all, every offloaded stage on the tier: exit 2, one line naming the path and the missing bytes
        p = run_free("0", ["--model", "tiny-8l", "--hardware", "h200x2", "--gpus", "2", "--seq-len", "32", "--microbatches", "4",
                           "--offload", "all", "--nvme", dev, "--nvme-place", "all", "-q", "-o", os.path.join(tmp, "n0.txt")])
        lines = [l for l in p.stderr.splitlines() if l.strip() and not l.startswith("  ")]
        check(p.returncode == 2 and len(lines) == 1 and re.search(r"NVMe tier is too small: .*nvme path '.*nvme-dev': .* needs [0-9.]+ .* "
                                                                     r"but only 0\.00 GiB is free \([0-9.]+ .* missing\)", lines[0]) is not None
              and not os.path.exists(os.path.join(tmp, "n0.txt")),
              "no NVMe space: exit 2, one line naming the path and what is missing, no plan file (%r)" % p.stderr[-400:])
        p = run_free("x", ["--model", "tiny-8l", "--hardware", "h200x2", "--gpus", "2", "--seq-len", "32", "--microbatches", "4",
                           "--offload", "all", "--nvme", dev, "--nvme-place", "all", "-q", "-o", os.path.join(tmp, "n0.txt")])
        check(p.returncode == 2 and "MMOC_NVME_FREE_GIB='x'" in p.stderr, "MMOC_NVME_FREE_GIB=x: exit 2 naming it (%r)" % p.stderr[-300:])

        # --layout auto with --nvme: only the layouts the tier supports (dp 1, tp 1) are candidates; the others are
        # refused by name on the progress lines, and the plan is a pipeline with the tier's paths
        la = os.path.join(tmp, "auto-nvme.txt")
        p = run(C, R, ["--model", "tiny-8l", "--hardware", "h200x2", "--gpus", "2", "--seq-len", "32", "--microbatches", "4",
                       "--layout", "auto", "--nvme", "/nonexistent-nvme0/mmoc", "--emit", "text", "-o", la])
        check(p.returncode == 0, "--layout auto --nvme: exit 0 (%s)" % p.stderr.strip()[-300:])
        if p.returncode == 0:
            with open(la) as f:
                head = re.search(r"^plan .*$", f.read(), re.M).group(0)
            os.remove(la)
            check(" gpus=2 " in head and " dp=" not in head.replace(" dp=1 ", " ") and " tp=" not in head.replace(" tp=1 ", " ")
                  and "nvme=" in head, "--layout auto --nvme: pp 2 x dp 1 x tp 1 with the tier's path (%s)" % head[:300])
            check("layout pp 1 x dp 2 x tp 1: infeasible" in p.stderr and "layout pp 1 x dp 1 x tp 2: infeasible" in p.stderr,
                  "--layout auto --nvme: dp 2 and tp 2 refused (%s)" % p.stderr.strip()[-400:])

        # budgets: a plain number is GiB; GiB/GB (10^9 bytes) with or without a space; job JSON number or string
        def budget_of(args):
            out = os.path.join(tmp, "b.txt")
            p = run(C, R, args + ["-q", "--emit", "text", "-o", out])
            if p.returncode != 0:
                return None, p
            with open(out) as f:
                b = int(re.search(r"^plan .* budget=([0-9]+)", f.read(), re.M).group(1))
            os.remove(out)
            return b, p
        TINYB = TINY + ["--v", "1", "--schedule", "1f1b", "--microbatches", "2"]
        for text, want in [("48", 48 << 30), ("48GiB", 48 << 30), ("48 GiB", 48 << 30), ("48gib", 48 << 30),
                           ("48GB", 48 * 10**9), ("48 GB", 48 * 10**9), ("2.5", 5 << 29), ("2560MiB", 5 << 29)]:
            b, p = budget_of(TINYB + ["--budget", text])
            check(b == want, "--budget %r: %s bytes (got %s: %s)" % (text, want, b, p.stderr.strip()[-200:]))
        for text in ["48G", "abc", "-3", "48 GiBs", "", "4 8", "1e3"]:
            p = run(C, R, TINYB + ["--budget", text, "-q"])
            lines = [l for l in p.stderr.splitlines() if l.strip()]
            check(p.returncode == 2 and len(lines) == 1 and "--budget" in lines[0],
                  "--budget %r: exit 2 naming --budget (got %d: %r)" % (text, p.returncode, p.stderr[-200:]))
        for value, want in [(48, 48 << 30), ("48GiB", 48 << 30), ("48GB", 48 * 10**9)]:
            job = os.path.join(tmp, "budget.json")
            with open(job, "w") as f:
                json.dump({"model": "tiny-8l", "hardware": "h200x2", "gpus": 2, "seq_len": 32, "v": 1, "schedule": "1f1b",
                           "microbatches": 2, "budget_gib": value}, f)
            b, p = budget_of([job])
            check(b == want, "job budget_gib %r: %s bytes (got %s: %s)" % (value, want, b, p.stderr.strip()[-200:]))
        for value in ["lots", "48G", True, [48]]:
            with open(job, "w") as f:
                json.dump({"model": "tiny-8l", "hardware": "h200x2", "gpus": 2, "seq_len": 32, "budget_gib": value}, f)
            p = run(C, R, [job, "-q"])
            lines = [l for l in p.stderr.splitlines() if l.strip()]
            check(p.returncode == 2 and len(lines) == 1 and "budget_gib" in lines[0],
                  "job budget_gib %r: exit 2 naming budget_gib (got %d: %r)" % (value, p.returncode, p.stderr[-200:]))
        # --host-budget and host_budget_gib: the same forms (common/size parse_gib), recorded as host_budget=
        def host_budget_of(args):
            out = os.path.join(tmp, "hb.txt")
            p = run(C, R, args + ["-q", "--emit", "text", "-o", out])
            if p.returncode != 0:
                return None, p
            with open(out) as f:
                m = re.search(r"^plan .* host_budget=([0-9]+)", f.read(), re.M)
            os.remove(out)
            return (int(m.group(1)) if m else None), p
        for text, want in [("100", 100 << 30), ("100GiB", 100 << 30), ("100 GiB", 100 << 30), ("100GB", 100 * 10**9)]:
            b, p = host_budget_of(TINYB + ["--host-budget", text])
            check(b == want, "--host-budget %r: %s bytes (got %s: %s)" % (text, want, b, p.stderr.strip()[-200:]))
        for text in ["48G", "abc", "-3"]:
            p = run(C, R, TINYB + ["--host-budget", text, "-q"])
            lines = [l for l in p.stderr.splitlines() if l.strip()]
            check(p.returncode == 2 and len(lines) == 1 and "--host-budget" in lines[0],
                  "--host-budget %r: exit 2 naming --host-budget (got %d: %r)" % (text, p.returncode, p.stderr[-200:]))
        for value, want in [(100, 100 << 30), ("100GiB", 100 << 30), ("100GB", 100 * 10**9)]:
            with open(job, "w") as f:
                json.dump({"model": "tiny-8l", "hardware": "h200x2", "gpus": 2, "seq_len": 32, "v": 1, "schedule": "1f1b",
                           "microbatches": 2, "host_budget_gib": value}, f)
            b, p = host_budget_of([job])
            check(b == want, "job host_budget_gib %r: %s bytes (got %s: %s)" % (value, want, b, p.stderr.strip()[-200:]))
        for value in ["lots", "48G", True]:
            with open(job, "w") as f:
                json.dump({"model": "tiny-8l", "hardware": "h200x2", "gpus": 2, "seq_len": 32, "host_budget_gib": value}, f)
            p = run(C, R, [job, "-q"])
            lines = [l for l in p.stderr.splitlines() if l.strip()]
            check(p.returncode == 2 and len(lines) == 1 and "host_budget_gib" in lines[0],
                  "job host_budget_gib %r: exit 2 naming host_budget_gib (got %d: %r)" % (value, p.returncode, p.stderr[-200:]))
        os.remove(job)

        # --print-after=schedule prints the plan after that pass
        PIN = ["--v", "1", "--schedule", "grouped"]  # the defaults are auto: pin the plan these checks read
        p = run(C, R, TINY + PIN + ["--microbatches", "2", "--print-after=schedule", "-q"])
        check(p.returncode == 0, "--print-after=schedule: exit 0")
        check("; ---- plan after schedule ----" in p.stdout, "--print-after=schedule: header printed")
        check(re.search(r"^plan hardware=h200x2 schedule=grouped gpus=2", p.stdout, re.M) is not None, "--print-after: plan header")
        check("forward S0 m0 @comp" in p.stdout and "backward S1 m1 @comp" in p.stdout, "--print-after: programs printed")
        check("send " not in p.stdout and "; ---- plan after comm-lowering" not in p.stdout,
              "--print-after=schedule: only that pass (no send/recv yet)")
        p = run(C, R, TINY + PIN + ["--microbatches", "2", "--print-after-all", "-q"])
        check(p.returncode == 0 and p.stdout.count("; ---- plan after ") == 10, "--print-after-all: ten passes printed")

        # --v auto and --schedule auto produce a plan
        for name, extra in [("--v auto", ["--v", "auto", "--schedule", "grouped"]),
                            ("--schedule auto", ["--v", "2", "--schedule", "auto"]),
                            ("--v auto --schedule auto", ["--v", "auto", "--schedule", "auto"])]:
            out = os.path.join(tmp, "auto.json")
            p = run(C, R, TINY + ["--microbatches", "4"] + extra + ["-o", out])
            check(p.returncode == 0, "%s: exit 0 (%s)" % (name, p.stderr.strip()[-200:]))
            check(re.search(r"compile time: [0-9.]+ ms \(([0-9]+) candidates\)", p.stdout) is not None, "%s: several candidates" % name)
            ok = False
            if os.path.exists(out):
                with open(out) as f:
                    plan = json.load(f)
                ok = plan.get("format") == "mmoc-plan" and len(plan.get("programs", [])) == 2
                os.remove(out)
            check(ok, "%s: a plan file with 2 programs" % name)
        p = run(C, R, [seed7, "--v", "auto", "--schedule", "auto", "-q", "-o", os.path.join(tmp, "s.txt"), "--emit", "text"])
        check(p.returncode == 0, "seed 7B with --v auto --schedule auto: exit 0 (%s)" % p.stderr.strip()[-300:])
        if os.path.exists(os.path.join(tmp, "s.txt")):
            os.remove(os.path.join(tmp, "s.txt"))

        # compile time of the seed jobs (the summary's line): printed; checked only against a gross regression, since
        # a loaded 2-core CI machine stretches it several times (~0.3 s alone, over 1 s once at load 9)
        for job in (seed7, seed13):
            p = run(C, R, [job])
            m = re.search(r"^compile time: ([0-9.]+) ms", p.stdout, re.M)
            check(p.returncode == 0 and m is not None, "%s: compiles and prints its compile time" % job)
            if m:
                ms = float(m.group(1))
                print("      %s: compile time %.1f ms" % (job, ms))
                check(ms < 10000, "%s: compile time %.1f ms < 10 s" % (job, ms))
    if failures:
        print("%d check(s) failed" % len(failures))
        return 1
    print("all CLI checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
