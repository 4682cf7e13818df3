#!/usr/bin/env python3
"""bench/limit_summary.py on made-up files: the LIMIT lines the issue-14 bench case prints (limits, fractions, the
median step of an even and an odd count, tokens/s of that step, peak memory, allocator retries, the simulator's error)
and the lines for missing inputs.

    python3 tests/bench/limit_summary_test.py SOURCE_DIR
"""
import json
import os
import subprocess
import sys
import tempfile


def run(src, out, *args):
    p = subprocess.run([sys.executable, os.path.join(src, "bench", "limit_summary.py"), out, *args],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def write_run(out, budget, steps, retries, predicted):
    G = 2**30
    with open(os.path.join(out, f"mmoc-7b-{budget}.jsonl"), "w") as f:
        for i, s in enumerate(steps):
            f.write(json.dumps({"step": i + 1, "step_s": s, "tokens_per_s": 32768 / s, "mfu": 1.2 / s, "hfu": 1.5 / s,
                                "peak_bytes": [int(100 * G)], "device_peak_bytes": [int((100 + i) * G)],
                                "alloc_retries": [retries[i]]}) + "\n")
    with open(os.path.join(out, f"compile-7b-{budget}.log"), "w") as f:
        f.write(f"plan: ...\npredicted: step {predicted} s, 1 tokens/s, bubble 0.0%\n")


def main():
    src = sys.argv[1]
    fails = []

    def check(cond, what):
        if not cond:
            fails.append(what)

    with tempfile.TemporaryDirectory() as out:
        with open(os.path.join(out, "limits.log"), "w") as f:
            f.write("layer fwd 6.50 ms\nRESULT peer=limits model=llama2-7b layer_fwd_ms=6.5 layer_fwdbwd_ms=20.0 x=1\n")
        # 130: 4 steady steps (even): median (2.90 + 2.92) / 2 = 2.91 s; 48: 3 steady steps (odd): median 3.5 s
        write_run(out, 130, [9.0, 2.95, 2.90, 2.92, 2.80], [7, 3, 3, 2, 3], 2.827)
        write_run(out, 48, [9.0, 3.6, 3.5, 3.4], [0, 0, 0, 0], 3.5)
        lines = run(src, out, "32", "4", "130", "48", "80")
        text = "\n".join(lines)
        print(text)
        check(lines[0] == "LIMIT layer: forward 6.50 ms, forward+backward 20.00 ms -> limit with recompute 32 x 4 x "
              "(20.00 + 6.50) ms = 3.392 s, without recompute 32 x 4 x 20.00 ms = 2.560 s", "the limits line")
        l130 = next((l for l in lines if l.startswith("LIMIT 7b-130:")), "")
        check("11260 tokens/s (2.910 s/step)" in l130, "130: the median of an even count and its tokens/s")
        check("MFU 41.2%, HFU 51.5%" in l130, "130: MFU and HFU of the median step")
        check("3.392 s with recompute (116.6% of it), 2.560 s without (88.0%)" in l130, "130: fractions of the limits")
        check("peak 104.0 of 130 GiB (80%)" in l130, "130: the largest device peak of the steady steps")
        check("allocator retries per step 3/3/2/3" in l130, "130: retries of the steady steps")
        check("simulator 2.827 s vs 2.910 s measured (-2.9%)" in l130, "130: the simulator's error")
        l48 = next((l for l in lines if l.startswith("LIMIT 7b-48:")), "")
        check("9362 tokens/s (3.500 s/step)" in l48, "48: the median of an odd count")
        check("simulator 3.500 s vs 3.500 s measured (+0.0%)" in l48, "48: the simulator's error")
        check("LIMIT 7b-80: no run to summarise (0 steps in mmoc-7b-80.jsonl)" in lines, "80: a missing run")
        os.remove(os.path.join(out, "limits.log"))
        lines = run(src, out, "32", "4", "48")
        check(lines[0] == "LIMIT: no layer times from limits.py (limits.log); the limits are left out", "no limits.log")
        check(len(lines) > 1 and lines[1].startswith("LIMIT 7b-48: 9362 tokens/s") and "with recompute" not in lines[1],
              "without limits.log the fractions are left out")
    for f in fails:
        print("FAIL:", f)
    print("limit_summary_test: %d failure(s)" % len(fails))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
