#!/usr/bin/env python3
"""Golden plans: each tests/golden/*.txt starts with `; command: mmoc-compile <args>` (args relative to the
repository root); the rest of the file is the plan text that `mmoc-compile <args> --emit text -o <file>` writes.
This reruns every command and compares byte for byte, printing the first difference as a unified diff.
With UPDATE_GOLDEN=1 in the environment it rewrites the files instead (a file holding only its command line is
filled in: that is how to add a golden plan). Exit 0 = all match (or updated), 1 = a difference, 2 = bad setup."""
import argparse
import difflib
import os
import shlex
import subprocess
import sys
import tempfile

PREFIX = "; command: mmoc-compile "


def run(compiler, root, args, tmpdir):
    out = os.path.join(tmpdir, "plan.txt")
    if os.path.exists(out):
        os.remove(out)
    cmd = [compiler] + args + ["--emit", "text", "-q", "-o", out]
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError("`%s` exited %d: %s" % (" ".join(shlex.quote(c) for c in cmd), p.returncode, p.stderr.strip()))
    with open(out, "rb") as f:
        return f.read().decode("utf-8")


def first_difference(name, want, got):
    diff = list(difflib.unified_diff(want.splitlines(True), got.splitlines(True), fromfile=name + " (golden)",
                                     tofile=name + " (now)", n=2))
    # header + the first hunk only
    out, hunks = [], 0
    for line in diff:
        if line.startswith("@@"):
            hunks += 1
            if hunks > 1:
                out.append("... (more differences)\n")
                break
        out.append(line if line.endswith("\n") else line + "\n")
    return "".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compiler", required=True, help="path of the built mmoc-compile")
    ap.add_argument("--root", required=True, help="repository root (commands run there)")
    ap.add_argument("--golden-dir", default=None, help="default: <root>/tests/golden")
    a = ap.parse_args()
    gdir = a.golden_dir or os.path.join(a.root, "tests", "golden")
    update = os.environ.get("UPDATE_GOLDEN", "") not in ("", "0")
    files = sorted(f for f in os.listdir(gdir) if f.endswith(".txt"))
    if not files:
        print("no golden files in " + gdir)
        return 2
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for fn in files:
            path = os.path.join(gdir, fn)
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
            first, _, body = text.partition("\n")
            if not first.startswith(PREFIX):
                print("%s: first line must be '%s<args>'" % (fn, PREFIX))
                bad += 1
                continue
            args = shlex.split(first[len(PREFIX):])
            try:
                got = run(a.compiler, a.root, args, tmp)
            except RuntimeError as e:
                print("%s: %s" % (fn, e))
                bad += 1
                continue
            if got == body:
                print("ok       %s" % fn)
                continue
            if update:
                tmp_path = path + ".tmp"
                with open(tmp_path, "wb") as f:
                    f.write((first + "\n" + got).encode("utf-8"))
                os.replace(tmp_path, path)
                print("UPDATED  %s (UPDATE_GOLDEN=1: rewrote the golden plan)" % fn)
                continue
            bad += 1
            print("DIFFERS  %s" % fn)
            sys.stdout.write(first_difference(fn, first + "\n" + body, first + "\n" + got))  # file line numbers
    if update:
        print("UPDATE_GOLDEN=1: golden files rewritten where they differed; review with `git diff tests/golden`")
    if bad:
        print("%d golden plan(s) differ; if the change is intended run tools/scripts/update_golden.sh" % bad)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
