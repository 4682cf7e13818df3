#!/usr/bin/env python3
"""docs/passes.md is generated from the passes' contract strings (`mmoc-compile --passes-doc`); this fails when the
checked-in file differs from what the built compiler generates, printing the first difference. With
UPDATE_GOLDEN=1 in the environment it rewrites the file instead. Exit 0 = up to date (or updated), 1 = stale."""
import argparse
import difflib
import os
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compiler", required=True)
    ap.add_argument("--doc", required=True, help="docs/passes.md")
    a = ap.parse_args()
    got = subprocess.run([a.compiler, "--passes-doc"], capture_output=True, text=True, check=True).stdout
    want = open(a.doc, encoding="utf-8").read() if os.path.exists(a.doc) else ""
    if got == want:
        print("ok       %s is up to date with the passes' contracts" % a.doc)
        return 0
    if os.environ.get("UPDATE_GOLDEN", "") not in ("", "0"):
        tmp = a.doc + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(got)
        os.replace(tmp, a.doc)
        print("UPDATED  %s (UPDATE_GOLDEN=1)" % a.doc)
        return 0
    diff = list(difflib.unified_diff(want.splitlines(True), got.splitlines(True), fromfile=a.doc + " (checked in)",
                                     tofile=a.doc + " (generated)", n=2))
    sys.stdout.write("".join(diff[:60]))
    print("\n%s is out of date: regenerate with `mmoc-compile --passes-doc > %s` (or UPDATE_GOLDEN=1)" % (a.doc, a.doc))
    return 1


if __name__ == "__main__":
    sys.exit(main())
