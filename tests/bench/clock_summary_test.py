#!/usr/bin/env python3
"""bench/clock_summary.py on made-up nvidia-smi samples: busy samples only, medians, the power-cap share, bad input."""
import os
import subprocess
import sys
import tempfile

root = sys.argv[1]
script = os.path.join(root, "bench", "clock_summary.py")


def run(*args):
    p = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


with tempfile.TemporaryDirectory() as d:
    smi, win = os.path.join(d, "smi.csv"), os.path.join(d, "windows.txt")
    # 2026/12/03 04:40:14 UTC = 1796272814
    rows = ["2026/12/03 04:40:14.000, 0, 1980, 80.0, 0, 38, 0x0000000000000001",     # idle: not counted
            "2026/12/03 04:40:14.100, 0, 1500, 690.0, 100, 60, 0x0000000000000004",
            "2026/12/03 04:40:14.200, 0, 1400, 700.0, 99, 61, 0x0000000000000004",
            "2026/12/03 04:40:14.300, 0, 1900, 400.0, 97, 55, 0x0000000000000000",
            "2026/12/03 04:40:14.400, 0, [N/A], 400.0, 97, 55, 0x0",                  # unreadable: skipped
            "2026/12/03 04:40:14.420, 0, 1500, 400.0, 97, 0x0",                       # a field short: skipped
            "2026/12/03 04:40:15.500, 0, 1980, 300.0, 100, 50, 0x0000000000000000"]  # after the window
    open(smi, "w").write("\n".join(rows) + "\n")
    open(win, "w").write("1796272813.9 start 7b-48\n1796272814.45 end 7b-48\n1796272815.0 start idle\n1796272815.2 end idle\n")
    rc, out = run(smi, win)
    assert rc == 0, out
    assert "CLOCK 7b-48: SM 1500 MHz median (1400..1900) over 3 busy samples, 690 W and 60 C median, power-capped in 67%" in out, out
    assert "CLOCK idle: no busy GPU samples" in out, out
    rc, out = run(smi)
    assert rc == 2 and "SMI_CSV WINDOWS" in out, out
    rc, out = run(smi, os.path.join(d, "missing.txt"))
    assert rc == 2 and "missing.txt" in out, out
    open(win, "w").write("")
    rc, out = run(smi, win)
    assert rc == 0 and "CLOCK: no windows" in out, out
print("clock_summary_test: ok")
