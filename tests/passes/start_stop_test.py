#!/usr/bin/env python3
"""mmoc-compile --stop-after / --start-after (as llc's): stopping after any pass writes the plan as that pass left it
(text or JSON), and starting after that pass from the written plan gives exactly the plan of a straight compile;
bad combinations exit 2 with one line and write nothing. Also: the docs/passes.md check fails on a stale copy.
Python stdlib only."""
import argparse
import os
import re
import subprocess
import sys
import tempfile

failures = []
PASSES = ["partition", "cross-map", "schedule", "comm-lowering", "tied-embeddings", "offload-insertion", "overlap",
          "linearize"]
JOBS = {
    "tiny-grouped": ["--model", "tiny-8l", "--hardware", "h200x2", "--gpus", "2", "--seq-len", "32", "--microbatches", "4",
                     "--v", "2", "--schedule", "grouped", "--offload", "all"],
    "tiny-1f1b-l20": ["--model", "tiny-8l", "--hardware", "l20x4", "--gpus", "4", "--seq-len", "32", "--microbatches", "8",
                      "--v", "1", "--schedule", "1f1b"],
    "clip": ["tests/golden/jobs/tiny-8l-clip-h200x2.json"],
    "tied": ["--model", "tiny-tied", "--hardware", "h200x2", "--gpus", "2", "--seq-len", "32", "--microbatches", "4",
             "--v", "2", "--schedule", "grouped", "--offload", "all", "--on-nonfinite", "skip"],
}


def check(cond, what):
    print(("ok    " if cond else "FAIL  ") + what)
    if not cond:
        failures.append(what)


def run(compiler, root, args):
    return subprocess.run([compiler] + args, cwd=root, capture_output=True, text=True)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compiler", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--doc-check", required=True, help="tests/passes/check_passes_doc.py")
    a = ap.parse_args()
    C, R = a.compiler, a.root
    with tempfile.TemporaryDirectory() as tmp:
        for name, job in JOBS.items():
            full = os.path.join(tmp, name + ".full.txt")
            p = run(C, R, job + ["--emit", "text", "-q", "-o", full])
            check(p.returncode == 0, "%s: straight compile (%s)" % (name, p.stderr.strip()))
            want = read(full) if p.returncode == 0 else None
            for k, x in enumerate(PASSES):
                for emit in ("text", "json"):
                    stop = os.path.join(tmp, "%s.after-%s.%s" % (name, x, emit))
                    p = run(C, R, job + ["--stop-after=" + x, "--emit", emit, "-o", stop])
                    check(p.returncode == 0 and os.path.exists(stop), "%s: --stop-after=%s --emit %s writes the plan (%s)"
                          % (name, x, emit, p.stderr.strip()))
                    if not os.path.exists(stop):
                        continue
                    if x != "linearize":
                        check("stopped after " + x in p.stdout, "%s: --stop-after=%s says where it stopped" % (name, x))
                        check(re.search(r"^predicted |\"predicted\"", read(stop), re.M) is None,
                              "%s: --stop-after=%s: no predicted section (not timed)" % (name, x))
                    out = os.path.join(tmp, "%s.from-%s.%s.txt" % (name, x, emit))
                    # with the job's knobs, and (from offload-insertion on, where no pass reads the job's knobs any
                    # more) also with nothing but the plan
                    alone = emit == "text" and k >= PASSES.index("offload-insertion")
                    for args in ([job, []] if alone else [job]):
                        p = run(C, R, args + ["--start-after=" + x, "--input", stop, "--emit", "text", "-q", "-o", out])
                        check(p.returncode == 0 and os.path.exists(out) and read(out) == want,
                              "%s: --start-after=%s from the %s plan%s gives the straight compile's plan (%s)"
                              % (name, x, emit, "" if args else " alone", p.stderr.strip()[-300:]))
                        if os.path.exists(out):
                            os.remove(out)
                # stopping right where it starts runs no pass: the plan comes back as it was
                if x != "linearize":
                    same = os.path.join(tmp, "same.txt")
                    src = os.path.join(tmp, "%s.after-%s.text" % (name, x))
                    p = run(C, R, job + ["--start-after=" + x, "--stop-after=" + x, "--input", src, "--emit", "text", "-q",
                                         "-o", same])
                    check(p.returncode == 0 and read(same) == read(src),
                          "%s: --start-after=%s --stop-after=%s returns the plan unchanged" % (name, x, x))

        tiny = JOBS["tiny-grouped"]
        after_schedule = os.path.join(tmp, "tiny-grouped.after-schedule.text")
        truncated = os.path.join(tmp, "truncated.txt")
        with open(truncated, "w") as f:
            f.write(read(after_schedule)[: len(read(after_schedule)) // 2])
        bad = [
            ("--start-after without --input", tiny + ["--start-after=schedule"], r"--start-after and --input go together"),
            ("--input without --start-after", tiny + ["--input", after_schedule], r"--start-after and --input go together"),
            ("unknown --stop-after pass", tiny + ["--stop-after=nosuch"], r"--stop-after: unknown pass 'nosuch'"),
            ("unknown --start-after pass", tiny + ["--start-after=nosuch", "--input", after_schedule],
             r"--start-after: unknown pass 'nosuch'"),
            ("--stop-after before --start-after", tiny + ["--start-after=schedule", "--stop-after=partition", "--input",
                                                          after_schedule], r"comes before --start-after"),
            ("plan of other hardware", ["--model", "tiny-8l", "--hardware", "l20x4", "--start-after=schedule", "--input",
                                        after_schedule], r"made for hardware 'h200x2', not 'l20x4'"),
            ("plan of another model", ["--model", "tiny-gqa", "--hardware", "h200x2", "--start-after=schedule", "--input",
                                       after_schedule], r"model 'tiny-8l' is not the model 'tiny-gqa'"),
            ("truncated input plan", tiny + ["--start-after=schedule", "--input", truncated], r"truncated|line [0-9]+"),
            ("input plan said to be later than it is", tiny + ["--start-after=offload-insertion", "--input", after_schedule],
             r"not one that --start-after=offload-insertion can continue"),
            ("--trace when stopping early", tiny + ["--stop-after=schedule", "--trace", os.path.join(tmp, "t.json")],
             r"--trace: the plan is not timed"),
        ]
        for name, args, pat in bad:
            out = os.path.join(tmp, "bad-out.txt")
            p = run(C, R, args + ["--emit", "text", "-o", out])
            lines = [l for l in p.stderr.splitlines() if l.strip()]
            check(p.returncode == 2, "%s: exit 2 (got %d: %s)" % (name, p.returncode, p.stderr.strip()[-200:]))
            check(bool(lines) and lines[0].startswith("mmoc-compile: error: ") and re.search(pat, p.stderr) is not None,
                  "%s: message matches /%s/ (got %r)" % (name, pat, p.stderr.strip()[:300]))
            check(not os.path.exists(out), "%s: no output file written" % name)

        # the generated docs/passes.md: up to date, and a stale copy is caught
        doc = os.path.join(R, "docs", "passes.md")
        p = subprocess.run([sys.executable, a.doc_check, "--compiler", C, "--doc", doc], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "UPDATE_GOLDEN"})
        check(p.returncode == 0, "docs/passes.md is up to date (%s)" % p.stdout.strip()[-300:])
        stale = os.path.join(tmp, "passes.md")
        with open(stale, "w", encoding="utf-8") as f:
            f.write(read(doc).replace("## 3. schedule", "## 3. scheduling", 1))
        p = subprocess.run([sys.executable, a.doc_check, "--compiler", C, "--doc", stale], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "UPDATE_GOLDEN"})
        check(p.returncode == 1 and "out of date" in p.stdout, "a stale docs/passes.md fails the check")
    if failures:
        print("%d check(s) failed" % len(failures))
        return 1
    print("all --start-after/--stop-after checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
