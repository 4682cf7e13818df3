#!/usr/bin/env python3
"""The GPU's SM clock and power through each part of a bench call (issue 14: a layer's time depends on its clock).

    python3 bench/clock_summary.py SMI_CSV WINDOWS

SMI_CSV: nvidia-smi --query-gpu=timestamp,index,clocks.sm,power.draw,utilization.gpu,temperature.gpu,
clocks_event_reasons.active
--format=csv,noheader,nounits -lms 100 (bench/gpu_bench.sh's smi_start); WINDOWS: lines "EPOCH_SECONDS start|end NAME"
(smi_mark). For each window, over the samples taken while a GPU was busy (utilization >= 50%): the median SM clock
and its range, the median power and temperature and the share of those samples clocked down by the power cap (reason
bit 0x4).
Prints one CLOCK line per window and exits 0; 2 on bad arguments or unreadable input.
"""
import calendar
import datetime
import statistics
import sys


def epoch(stamp):
    d = datetime.datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f")
    return calendar.timegm(d.timetuple()) + d.microsecond / 1e6  # nvidia-smi prints the machine's time; UTC here


def samples(path):
    out = []
    for line in open(path):
        f = [x.strip() for x in line.split(",")]
        if len(f) < 7:
            continue
        try:
            out.append({"t": epoch(f[0]), "gpu": int(f[1]), "mhz": float(f[2]), "w": float(f[3]),
                        "util": float(f[4]), "temp": float(f[5]), "reasons": int(f[6], 16)})
        except ValueError:
            continue  # a header or an "[N/A]" field
    return out


def windows(path):
    open_at, out = {}, []
    for line in open(path):
        f = line.split(None, 2)
        if len(f) != 3:
            continue
        t, what, name = float(f[0]), f[1], f[2].strip()
        if what == "start":
            open_at[name] = t
        elif what == "end" and name in open_at:
            out.append((name, open_at.pop(name), t))
    return out


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        s, w = samples(argv[0]), windows(argv[1])
    except OSError as e:
        print("clock_summary: %s" % e, file=sys.stderr)
        return 2
    if not w:
        print("CLOCK: no windows in %s" % argv[1])
    for name, a, b in w:
        busy = [x for x in s if a <= x["t"] <= b and x["util"] >= 50]
        if not busy:
            print("CLOCK %s: no busy GPU samples in its %.1f s" % (name, b - a))
            continue
        mhz = [x["mhz"] for x in busy]
        capped = sum(1 for x in busy if x["reasons"] & 0x4)
        print("CLOCK %s: SM %.0f MHz median (%.0f..%.0f) over %d busy samples, %.0f W and %.0f C median, power-capped in %.0f%%"
              % (name, statistics.median(mhz), min(mhz), max(mhz), len(busy), statistics.median(x["w"] for x in busy),
                 statistics.median(x["temp"] for x in busy), 100.0 * capped / len(busy)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
