#!/usr/bin/env python3
"""The folders depend one way (docs/design.md, "Layers"): every #include "<folder>/..." of a project header in a
source of a library folder must name that folder itself or one below it. Prints each offending include (file:line)
and exits 1; exits 0 when the layering holds. Python stdlib only."""
import os
import re
import sys

# folder -> the project folders its sources may include (besides itself)
ALLOWED = {
    "common": set(),
    "ir": {"common"},
    "arch": {"common", "ir"},
    "cost": {"common", "ir", "arch"},
    "passes": {"common", "ir", "arch", "cost"},
    "compiler": {"common", "ir", "arch", "cost", "passes"},
    "engine": {"common", "ir", "arch"},
}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([A-Za-z0-9_]+)/')


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..")
    known = {d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))}
    bad, files = [], 0
    for folder, allowed in ALLOWED.items():
        top = os.path.join(root, folder)
        if not os.path.isdir(top):
            continue
        for dirpath, _, names in os.walk(top):
            for n in sorted(names):
                if not n.endswith((".cpp", ".hpp", ".h", ".inc")):
                    continue
                path = os.path.join(dirpath, n)
                files += 1
                with open(path, encoding="utf-8", errors="replace") as f:
                    for lineno, line in enumerate(f, 1):
                        m = INCLUDE.match(line)
                        if not m or m.group(1) not in known:
                            continue
                        dep = m.group(1)
                        if dep != folder and dep not in allowed:
                            bad.append("%s:%d: %s/ includes %s/ (allowed: %s)" % (os.path.relpath(path, root), lineno, folder,
                                                                                 dep, ", ".join(sorted(allowed)) or "nothing"))
    for b in bad:
        print(b)
    print("%d files checked: %s" % (files, "layering holds" if not bad else "%d include(s) against the layering" % len(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
