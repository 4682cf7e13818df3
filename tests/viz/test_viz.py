#!/usr/bin/env python3
"""End-to-end test of mmoc-viz (stdlib only).

1. bad inputs: exit 2, a message naming the file and the problem, no output (no temp files left);
2. a small 2-GPU plan + predicted + measured page and its --perfetto trace;
3. a large 8-GPU, v=4, 64-micro-batch trace (~12k boxes): render time measured in the page < 2000 ms;
4. a plan-only page;
5. REAL inputs (with --compile, and --run for the measured part): the seed job's plan (LLaMA-2-7B on l20x4, generated
   here by mmoc-compile) alone and with its predicted trace, a large real plan (7B, 8 GPUs, v=4, 64 micro-batches,
   interleaved-1f1b on l20x4 widened to 8 GPUs; render time < 2000 ms), and the tiny CPU job with its predicted and its
   measured trace (mmoc-run --device cpu). Lanes and boxes per lane must equal the plan's instructions per GPU/stream.
Pages are opened in headless Chromium: the dumped DOM must show the expected lanes / box counts (from the
generator's independent expectations), the statistics, and no JS errors; screenshots must show drawn boxes.
Exits 77 (ctest SKIP) after the browser-free checks when no Chromium is installed.

  test_viz.py --viz build-viz/tools_viz/mmoc-viz --work /tmp/viz_e2e [--chromium /usr/bin/chromium]
              [--compile build/tools/compile/mmoc-compile [--run build/tools/run/mmoc-run] --repo .]
"""
import argparse
import glob
import html.parser
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
GEN = os.path.join(HERE, "gen_trace.py")
FAILS = []
RENDER_LIMIT_MS = 2000.0


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILS.append(what)
    return cond


def close(a, b, rel=1e-6, abs_=1e-3):
    return abs(a - b) <= max(abs_, rel * max(abs(a), abs(b)))


def run(cmd, timeout=300):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, text=True)
    return p.returncode, p.stdout, p.stderr


def gen(work, name, *args):
    out = os.path.join(work, name + ".json")
    exp = os.path.join(work, name + ".expect.json")
    rc, _, err = run([sys.executable, GEN, "-o", out, "--expect", exp] + list(args))
    if rc != 0:
        sys.exit("generator failed: " + err)
    with open(exp) as f:
        return out, json.load(f)


# ---- DOM ----------------------------------------------------------------------------------------
class Dom(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.by_class = {}
        self.by_id = {}
        self.rows = {}  # table id -> list of tr attrs
        self.table_stack = []
        self.script_id = None
        self.scripts = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for c in (a.get("class") or "").split():
            self.by_class.setdefault(c, []).append(a)
        if "id" in a:
            self.by_id[a["id"]] = a
        if tag == "table":
            self.table_stack.append(a.get("id"))
        elif tag == "tr" and self.table_stack:
            self.rows.setdefault(self.table_stack[-1], []).append(a)
        elif tag == "script":
            self.script_id = a.get("id")
            if self.script_id:
                self.scripts[self.script_id] = ""

    def handle_endtag(self, tag):
        if tag == "table" and self.table_stack:
            self.table_stack.pop()
        elif tag == "script":
            self.script_id = None

    def handle_data(self, data):
        if self.script_id:
            self.scripts[self.script_id] += data


def chromium_args(chrome, profile):
    return [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--user-data-dir=" + profile,
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]


def open_page(chrome, path, screenshot=None):
    """Returns (Dom, stderr) of the loaded page; also writes a screenshot when asked."""
    url = "file://" + os.path.abspath(path)
    profile = tempfile.mkdtemp(prefix="viz-chrome-")
    try:
        rc, out, err = run(chromium_args(chrome, profile) + ["--dump-dom", url], timeout=180)
        check(rc == 0 and "</html>" in out, f"chromium --dump-dom {os.path.basename(path)} (rc={rc})")
        check("Uncaught" not in err, f"{os.path.basename(path)}: no 'Uncaught' in the browser log")
        d = Dom()
        d.feed(out)
        if screenshot:
            rc2, _, err2 = run(chromium_args(chrome, profile) + ["--screenshot=" + screenshot,
                                                                  "--window-size=1600,1000", url], timeout=180)
            check(rc2 == 0 and os.path.exists(screenshot), f"chromium --screenshot {os.path.basename(screenshot)}")
            check("Uncaught" not in err2, f"{os.path.basename(screenshot)}: no 'Uncaught' in the browser log")
        return d, err
    finally:
        shutil.rmtree(profile, ignore_errors=True)


# ---- PNG (to check that the canvas really drew boxes) --------------------------------------------
def png_pixels(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, w = 8, b"", None
    while pos < len(data):
        n, typ = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if typ == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and interlace == 0, "unsupported PNG layout"
            bpp = 3 if ctype == 2 else 4
        elif typ == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = w * bpp
    prev = bytearray(stride)
    rows = []
    i = 0
    for _ in range(h):
        ft = raw[i]
        line = bytearray(raw[i + 1:i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if ft == 1:
                line[x] = (line[x] + a) & 255
            elif ft == 2:
                line[x] = (line[x] + b) & 255
            elif ft == 3:
                line[x] = (line[x] + ((a + b) >> 1)) & 255
            elif ft == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows


def count_colour(png, rgb, tol=6):
    w, h, bpp, rows = png
    n = 0
    for r in rows:
        for x in range(0, w * bpp, bpp):
            if abs(r[x] - rgb[0]) <= tol and abs(r[x + 1] - rgb[1]) <= tol and abs(r[x + 2] - rgb[2]) <= tol:
                n += 1
    return n


FORWARD_RGB, BACKWARD_RGB = (0x4e, 0x79, 0xa7), (0xf2, 0x8e, 0x2b)


def check_screenshot(path, min_kb=15):
    size = os.path.getsize(path) if os.path.exists(path) else 0
    check(size > min_kb * 1024, f"{os.path.basename(path)} is non-trivial ({size} bytes > {min_kb} KiB)")
    if size:
        png = png_pixels(path)
        f, b = count_colour(png, FORWARD_RGB), count_colour(png, BACKWARD_RGB)
        check(f > 300 and b > 300, f"{os.path.basename(path)} shows forward ({f} px) and backward ({b} px) boxes")


# ---- page checks --------------------------------------------------------------------------------
def check_page_basics(d, name):
    errs = d.by_id.get("viz-errors", {})
    check(errs.get("data-count") == "0", f"{name}: page reported no JS errors (viz-errors data-count={errs.get('data-count')})")
    st = d.by_id.get("viz-status", {})
    check(st.get("data-ready") == "1", f"{name}: page script finished (data-ready={st.get('data-ready')})")
    return st


def check_lanes(d, name, role, exp):
    labels = [a for a in d.by_class.get("lane-label", []) if a.get("data-trace") == role]
    ncpu = len(exp["lane_names"]) - 4
    check(len(labels) == exp["gpus"] * (4 + ncpu), f"{name}/{role}: {len(labels)} lane labels == {exp['gpus']} GPUs x {4 + ncpu} lanes")
    got = {(a["data-gpu"], a["data-tid"]): a for a in labels}
    bad = []
    for key, n in exp["lanes"].items():
        g, l = key.split("/")
        a = got.get((g, l))
        if a is None or int(a["data-boxes"]) != n or a["data-lane"] != exp["lane_names"][int(l)]:
            bad.append((key, n, a and a.get("data-boxes"), a and a.get("data-lane")))
    check(not bad, f"{name}/{role}: boxes per lane match the generator ({len(exp['lanes'])} lanes) {bad[:4]}")
    total = sum(int(a["data-boxes"]) for a in labels)
    check(total == exp["boxes"], f"{name}/{role}: {total} boxes == {exp['boxes']}")
    mem = [a for a in d.by_class.get("mem-label", []) if a.get("data-trace") == role]
    check(len(mem) == exp["gpus"] and all(int(a["data-points"]) > 0 for a in mem), f"{name}/{role}: one memory curve per GPU")


def check_summary(d, name, role, exp):
    s = json.loads(d.scripts.get("viz-summary", "{}"))
    tr = [t for t in s.get("traces", []) if t["role"] == role]
    if not check(len(tr) == 1, f"{name}/{role}: summary present"):
        return
    t = tr[0]
    check(close(t["step_us"], exp["step_us"]), f"{name}/{role}: step {t['step_us']:.3f} us == {exp['step_us']:.3f}")
    gs = t["gpus"]
    check(len(gs) == exp["gpus"], f"{name}/{role}: stats for {len(gs)} GPUs")
    ok = all(close(g["busy_us"], exp["busy_us"][i]) for i, g in enumerate(gs))
    check(ok, f"{name}/{role}: comp busy per GPU matches")
    ok = all(close(g["bubble"], 1 - exp["busy_us"][i] / exp["step_us"]) for i, g in enumerate(gs))
    check(ok, f"{name}/{role}: bubble = 1 - busy/step per GPU")
    ok = all(g["peak_bytes"] == exp["peak_bytes"][i] for i, g in enumerate(gs))
    check(ok, f"{name}/{role}: peak memory per GPU matches {[g['peak_bytes'] for g in gs]}")
    ok = all(g["h2d_bytes"] == exp["h2d_bytes"][i] and g["d2h_bytes"] == exp["d2h_bytes"][i] for i, g in enumerate(gs))
    check(ok, f"{name}/{role}: h2d/d2h bytes per GPU match")


def check_bad_inputs(viz, work, good_trace, plan_nopred):
    bad = os.path.join(work, "bad")
    os.makedirs(bad, exist_ok=True)
    notjson = os.path.join(bad, "notjson.json")
    with open(notjson, "w") as f:
        f.write("this is { not json")
    neither = os.path.join(bad, "neither.json")
    with open(neither, "w") as f:
        json.dump({"hello": [1, 2, 3]}, f)
    nots = os.path.join(bad, "nots.json")
    with open(nots, "w") as f:
        json.dump({"traceEvents": [{"ph": "X", "name": "forward S0 m0", "pid": 0, "tid": 0, "dur": 5}]}, f)
    missing = os.path.join(bad, "does_not_exist.json")
    plan_pred = os.path.join(work, "small.plan.json")
    cases = [
        ("not JSON", ["--predicted", notjson], notjson, "not valid JSON"),
        ("neither plan nor trace", ["--measured", neither], neither, "neither"),
        ("missing file", ["--predicted", missing], missing, "cannot open"),
        ("plan passed as trace", ["--predicted", plan_pred], plan_pred, "mmoc plan"),
        ("trace passed as plan", ["--plan", good_trace], good_trace, "Chrome trace"),
        ("X event without ts", ["--predicted", nots], nots, "traceEvents[0]"),
        ("neither plan as plan", ["--plan", neither, "--predicted", good_trace], neither, "neither"),
        ("plan without predicted, no trace", ["--plan", plan_nopred], plan_nopred, "predicted"),
        ("no inputs", [], None, "nothing to show"),
        ("no -o", ["--predicted", good_trace, "NO_OUTPUT"], None, "--output"),
    ]
    for what, args, fname, needle in cases:
        out = os.path.join(bad, "out.html")
        perf = os.path.join(bad, "out.perfetto.json")
        cmd = [viz] + [a for a in args if a != "NO_OUTPUT"]
        if "NO_OUTPUT" not in args:
            cmd += ["-o", out, "--perfetto", perf]
        rc, _, err = run(cmd)
        msg = err.strip().splitlines()[-1] if err.strip() else ""
        check(rc == 2, f"bad input '{what}': exit 2 (got {rc})")
        check(needle in err and (fname is None or fname in err), f"bad input '{what}': message names file and problem: {msg!r}")
        left = glob.glob(os.path.join(bad, "out.*"))
        check(not left, f"bad input '{what}': nothing written {left}")


def check_perfetto(path, exp_pred, exp_meas):
    with open(path) as f:
        doc = json.load(f)
    ev = doc.get("traceEvents")
    if not check(isinstance(ev, list), "perfetto: traceEvents is an array"):
        return
    phs = {e.get("ph") for e in ev}
    check(phs <= {"X", "M", "C"}, f"perfetto: only ph X/M/C ({sorted(phs)})")
    xs = [e for e in ev if e["ph"] == "X"]
    check(len(xs) == exp_pred["boxes"] + exp_meas["boxes"], f"perfetto: {len(xs)} X events == both inputs")
    check(all(isinstance(e["ts"], (int, float)) and e["ts"] >= 0 and isinstance(e["dur"], (int, float)) and e["dur"] >= 0
              and isinstance(e["pid"], int) and isinstance(e.get("tid"), int) for e in xs), "perfetto: X events with us ts>=0, dur, int pid/tid")
    pids = {e["pid"] for e in xs}
    check(pids == set(range(exp_pred["gpus"])) | {1000 + g for g in range(exp_meas["gpus"])}, f"perfetto: pid offsets {sorted(pids)}")
    pn = {e["pid"]: e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "process_name"}
    check(all(p in pn for p in pids) and pn.get(0, "").startswith("predicted") and pn.get(1000, "").startswith("measured"),
          f"perfetto: process names {sorted(pn.values())[:4]}")
    tn = {(e["pid"], e["tid"]) for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    check(all((e["pid"], e["tid"]) in tn for e in xs), "perfetto: every lane has a thread_name")
    cs = [e for e in ev if e["ph"] == "C"]
    check(len(cs) > 0 and all(e["name"] == "mem" and e["ts"] >= 0 for e in cs), f"perfetto: {len(cs)} mem counters")
    meas_x = sorted(e["ts"] for e in xs if e["pid"] >= 1000)
    check(meas_x and meas_x[0] < 1.0, "perfetto: measured trace re-based to start at 0")


# Injected into a copy of a page: zoom (buttons + wheel), pan (drag), hover tooltip; results into #harness.
HARNESS = """<script>
(function () {
  var out = document.createElement('div'); out.id = 'harness'; document.body.appendChild(out);
  function rng() { return document.getElementById('viz-range').textContent; }
  function later(f) { setTimeout(f, 250); }  // after the page's redraw (rAF or its 100 ms timer)
  var c = document.querySelector('canvas.timeline'), r = c.getBoundingClientRect(), res = { range0: rng() };
  try {
    document.getElementById('btn-zoom-in').click();
    document.getElementById('btn-zoom-in').click();
    c.dispatchEvent(new WheelEvent('wheel', { deltaY: -300, clientX: r.left + r.width * 0.3, clientY: r.top + 30, bubbles: true, cancelable: true }));
  } catch (e) { res.exc = String(e); }
  later(function () {
    res.range1 = rng();
    c.dispatchEvent(new MouseEvent('mousedown', { clientX: r.left + 600, clientY: r.top + 30, bubbles: true }));
    window.dispatchEvent(new MouseEvent('mousemove', { clientX: r.left + 450, clientY: r.top + 30 }));
    window.dispatchEvent(new MouseEvent('mouseup', {}));
    later(function () {
      res.range2 = rng();
      var tip = document.getElementById('tooltip');
      res.tip = '';
      document.querySelectorAll('canvas.timeline').forEach(function (cv) {  // the first comp lane of each timeline
        var rr = cv.getBoundingClientRect();
        for (var x = 1; x < rr.width && !res.tip; x += 2) {
          cv.dispatchEvent(new MouseEvent('mousemove', { clientX: rr.left + x, clientY: rr.top + 30, bubbles: true }));
          if (tip.style.display === 'block') res.tip = tip.textContent;
        }
      });
      document.getElementById('btn-fit').click();
      later(function () {
        res.range3 = rng();
        var al = document.getElementById('btn-align');
        if (al.style.display === 'none') {
          res.errors = window.__vizErrors.slice();
          out.setAttribute('data-result', JSON.stringify(res));
          return;
        }
        al.click();  // 'align steps' on: the shorter trace gets a stretch note; off again: none
        later(function () {
          res.aligned = document.querySelectorAll('.scale-note').length;
          al.click();
          later(function () {
            res.unaligned = document.querySelectorAll('.scale-note').length;
            res.errors = window.__vizErrors.slice();
            out.setAttribute('data-result', JSON.stringify(res));
          });
        });
      });
    });
  });
})();
</script>"""


def check_interaction(chrome, page_path, work, align=False):
    with open(page_path, encoding="utf-8") as f:
        page = f.read()
    path = os.path.join(work, "interact.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page.replace("</body>", HARNESS + "</body>"))
    d, _ = open_page(chrome, path)
    res = json.loads(d.by_id.get("harness", {}).get("data-result", "{}"))
    print("     interaction:", res, flush=True)
    check(res.get("errors") == [] and "exc" not in res, "interaction: no JS errors")
    check(res.get("range1") and res["range1"] != res["range0"], "interaction: zoom (buttons + wheel) changes the view")
    check(res.get("range2") and res["range2"] != res["range1"], "interaction: drag pans the view")
    check("duration" in res.get("tip", "") and "instruction" in res.get("tip", ""), "interaction: hover shows a tooltip with duration / instruction")
    check(res.get("range3") == res.get("range0"), "interaction: fit restores the full view")
    if align:
        check(res.get("aligned", 0) >= 1 and res.get("unaligned") == 0,
              f"interaction: 'align steps' stretches the shorter trace and back ({res.get('aligned')}, {res.get('unaligned')})")


# ---- real inputs (mmoc-compile / mmoc-run) -------------------------------------------------------
STREAM_TID = {"comp": 0, "h2d": 1, "d2h": 2, "p2p": 3, "cpu": 4, "opt": 6}


def plan_expect(plan_path):
    """What a page of this plan + a complete trace of it must show: per GPU lanes comp/h2d/d2h/p2p, plus cpu where the
    plan has instructions on the cpu stream (optim @cpu); boxes per lane = instructions per GPU/stream."""
    with open(plan_path) as f:
        plan = json.load(f)
    lanes = {}
    for pr in plan["programs"]:
        g = pr["gpu"]
        for l in range(4):
            lanes.setdefault((g, l), 0)
        for ins in pr["instrs"]:
            k = (g, STREAM_TID[ins["stream"]])
            lanes[k] = lanes.get(k, 0) + 1
    return plan, lanes


def check_real_lanes(d, name, role, lanes):
    labels = [a for a in d.by_class.get("lane-label", []) if a.get("data-trace") == role]
    got = {(int(a["data-gpu"]), int(a["data-tid"])): int(a["data-boxes"]) for a in labels}
    ncpu = sum(1 for (g, l) in lanes if l >= 4)
    gpus = len({g for g, _ in lanes})
    check(set(got) == set(lanes), f"{name}/{role}: lanes = {gpus} GPUs x comp/h2d/d2h/p2p + {ncpu} cpu lane(s) "
          f"({len(got)} == {len(lanes)}; extra {sorted(set(got) - set(lanes))[:4]}, missing {sorted(set(lanes) - set(got))[:4]})")
    bad = [(k, n, got.get(k)) for k, n in sorted(lanes.items()) if got.get(k) != n]
    check(not bad, f"{name}/{role}: boxes per lane == plan instructions per GPU/stream {bad[:4]}")
    names = {(int(a["data-gpu"]), int(a["data-tid"])): a["data-lane"] for a in labels}
    check(all(names[k] == ("comp", "h2d", "d2h", "p2p", "cpu", "io", "opt")[k[1]] for k in names),
          f"{name}/{role}: lanes named comp/h2d/d2h/p2p/cpu/io/opt by their stream")
    total = sum(got.values())
    check(total == sum(lanes.values()), f"{name}/{role}: {total} boxes == {sum(lanes.values())} plan instructions")


def check_real_page(d, name, plan, warnings_expected=0):
    st = check_page_basics(d, name)
    w = d.by_id.get("viz-warnings", {}).get("data-count")
    check(w == str(warnings_expected), f"{name}: {w} plan/trace consistency warnings (expected {warnings_expected})")
    stages = [r for r in d.rows.get("stage-table", []) if "data-stage" in r]
    check(len(stages) == len(plan["stages"]), f"{name}: stage table {len(stages)} rows == {len(plan['stages'])} stages")
    prog = {int(r["data-gpu"]): r for r in d.rows.get("program-table", []) if "data-gpu" in r}
    ok = len(prog) == len(plan["programs"]) and all(
        int(prog[pr["gpu"]]["data-instrs"]) == len(pr["instrs"]) and
        all(int(prog[pr["gpu"]]["data-" + sname]) == sum(1 for i in pr["instrs"] if i["stream"] == sname) for sname in STREAM_TID)
        for pr in plan["programs"])
    check(ok, f"{name}: program table = instructions per GPU and stream")
    return st


def real_inputs(a, viz, work):
    """Generates the real plans/traces and pages (browser-free checks); returns the list of browser checks to run."""
    comp = os.path.abspath(a.compile)
    repo = os.path.abspath(a.repo)
    rw = os.path.join(work, "real")
    os.makedirs(rw)
    todo = []

    def compile_(what, args):
        t = time.time()
        rc, out, err = run([comp] + args + ["-q"], timeout=120)
        check(rc == 0, f"{what}: mmoc-compile ok in {time.time() - t:.2f} s {err.strip()[-300:]}")
        return rc == 0

    def viz_(what, args, out):
        rc, _, err = run([viz] + args + ["-o", out])
        check(rc == 0 and os.path.exists(out), f"{what}: mmoc-viz ok")
        check("warning" not in err, f"{what}: mmoc-viz printed no warning {err.strip()[:400]!r}")
        return rc == 0

    # the seed: LLaMA-2-7B on 4x L20, grouped v=2 (job file of the repository)
    seed_plan, seed_pred = os.path.join(rw, "seed.plan.json"), os.path.join(rw, "seed.pred.json")
    if compile_("seed", [os.path.join(repo, "configs/jobs/seed-llama2-7b-l20x4.json"), "-o", seed_plan, "--trace", seed_pred]):
        plan, lanes = plan_expect(seed_plan)
        check(len(plan["programs"]) == 4 and "predicted" in plan, "seed: 4 programs and a predicted section")
        only = os.path.join(rw, "seed-plan.html")
        if viz_("seed plan alone", ["--plan", seed_plan], only):
            todo.append(("seed plan alone", only, None, plan, None, None))
        page = os.path.join(rw, "seed.html")
        if viz_("seed plan + predicted", ["--plan", seed_plan, "--predicted", seed_pred], page):
            todo.append(("seed", page, os.path.join(rw, "seed.png"), plan, lanes, ["predicted"]))
        # the same plan in the text form (mmoc-viz reads plans with ir::load_plan_file): the same tables
        seed_txt = os.path.join(rw, "seed.plan.txt")
        if compile_("seed (text)", [os.path.join(repo, "configs/jobs/seed-llama2-7b-l20x4.json"), "--emit", "text",
                                    "-o", seed_txt]):
            page_txt = os.path.join(rw, "seed-text.html")
            if viz_("seed text plan + predicted", ["--plan", seed_txt, "--predicted", seed_pred], page_txt) and \
                    os.path.exists(page):
                def tables(path):
                    with open(path, encoding="utf-8") as f:
                        html = f.read()
                    return [html[html.find(f'id="{t}"'):html.find("</table>", html.find(f'id="{t}"'))]
                            for t in ("summary", "stage-table", "program-table")]
                check(tables(page_txt) == tables(page) and all(tables(page)),
                      "seed: the text-form plan gives the same summary, stage and program tables as the JSON plan")

    # a large real plan: 7B on 8 GPUs, v=4, 64 micro-batches, interleaved-1f1b. The hardware is the seed's l20x4 with
    # 8 GPUs in 4 host groups (made here from configs/hardware/l20x4.json, so that it follows that file's format)
    with open(os.path.join(repo, "configs/hardware/l20x4.json")) as f:
        hw = json.load(f)
    hw.update(name="l20x8-test", gpus=8, host_groups=[[0, 1], [2, 3], [4, 5], [6, 7]])
    hw8 = os.path.join(rw, "hw8.json")
    with open(hw8, "w") as f:
        json.dump(hw, f, indent=1)
    big_plan, big_pred = os.path.join(rw, "big.plan.json"), os.path.join(rw, "big.pred.json")
    if compile_("big", ["--model", "llama2-7b", "--hardware", hw8, "--gpus", "8", "--v", "4",
                        "--microbatches", "64", "--schedule", "interleaved-1f1b", "-o", big_plan, "--trace", big_pred]):
        plan, lanes = plan_expect(big_plan)
        check(sum(lanes.values()) >= 10000, f"big: {sum(lanes.values())} instructions (>= 10k boxes)")
        page = os.path.join(rw, "big.html")
        if viz_("big plan + predicted", ["--plan", big_plan, "--predicted", big_pred], page):
            todo.append(("big-real", page, os.path.join(rw, "big.png"), plan, lanes, ["predicted"]))

    # the tiny CPU job: predicted (mmoc-compile --trace) and measured (mmoc-run --trace) traces of one plan
    tiny_plan, tiny_pred, tiny_meas = (os.path.join(rw, n) for n in ("tiny.plan.json", "tiny.pred.json", "tiny.meas.json"))
    if compile_("tiny", [os.path.join(repo, "configs/jobs/tiny-cpu.json"), "-o", tiny_plan, "--trace", tiny_pred]):
        plan, lanes = plan_expect(tiny_plan)
        check(any(l == 4 for _, l in lanes), "tiny: the plan has optimizer steps on the cpu stream")
        roles = ["predicted"]
        args = ["--plan", tiny_plan, "--predicted", tiny_pred]
        if a.run:
            t = time.time()
            rc, out, err = run([os.path.abspath(a.run), tiny_plan, "--data", os.path.join(repo, "data/sample/tiny_tokens.jsonl"),
                                "--steps", "2", "--trace", tiny_meas, "--device", "cpu", "-q"], timeout=180)
            check(rc == 0 and os.path.exists(tiny_meas), f"tiny: mmoc-run --trace ok in {time.time() - t:.1f} s {err.strip()[-300:]}")
            if os.path.exists(tiny_meas):
                roles.append("measured")
                args += ["--measured", tiny_meas]
        else:
            print("SKIP: no --run (engine not built): the measured part of the tiny job is not checked", flush=True)
        page = os.path.join(rw, "tiny.html")
        perf = os.path.join(rw, "tiny.perfetto.json")
        if viz_("tiny plan + " + " + ".join(roles), args + ["--perfetto", perf], page):
            todo.append(("tiny", page, os.path.join(rw, "tiny.png"), plan, lanes, roles))
            n = sum(lanes.values())
            with open(perf) as f:
                xs = [e for e in json.load(f)["traceEvents"] if e["ph"] == "X"]
            check(len(xs) == n * len(roles), f"tiny: perfetto trace has {len(xs)} X events == {len(roles)} x {n}")
    return todo


def real_browser_checks(chrome, todo, work):
    times = {}
    for name, page, png, plan, lanes, roles in todo:
        d, _ = open_page(chrome, page, screenshot=png)
        st = check_real_page(d, name, plan)
        if roles is None:  # plan alone
            check(st.get("data-boxes") == "0" and not d.by_class.get("timeline"), f"{name}: no timeline, tables only")
            s = json.loads(d.scripts.get("viz-summary", "{}"))
            check(s.get("plan_predicted", {}).get("step_s") == plan["predicted"]["step_s"], f"{name}: plan.predicted in the summary")
            continue
        for role in roles:
            check_real_lanes(d, name, role, lanes)
        s = json.loads(d.scripts.get("viz-summary", "{}"))
        tr = {t["role"]: t for t in s.get("traces", [])}
        pp = plan["predicted"]
        if "predicted" in tr:
            t = tr["predicted"]
            check(close(t["step_us"], pp["step_s"] * 1e6), f"{name}/predicted: step {t['step_us']:.1f} us == plan {pp['step_s'] * 1e6:.1f} us")
            check([g["peak_bytes"] for g in t["gpus"]] == pp["peak"], f"{name}/predicted: peak memory per GPU == plan.predicted.peak")
            check(close(t["bubble"], pp["bubble"], rel=1e-3, abs_=1e-3), f"{name}/predicted: bubble {t['bubble']:.4f} == plan {pp['bubble']:.4f}")
            mem = [a for a in d.by_class.get("mem-label", []) if a.get("data-trace") == "predicted"]
            check(len(mem) == len(plan["programs"]) and all(int(a["data-points"]) > 0 for a in mem), f"{name}/predicted: a memory curve per GPU")
        if "measured" in tr:
            with open(tr["measured"]["file"]) as f:
                meta = json.load(f)["metadata"]
            check(close(tr["measured"]["step_us"], meta["step_s"] * 1e6), f"{name}/measured: step == metadata.step_s")
            rows = [r for r in d.rows.get("diff-table", []) if "data-gpu" in r]
            check(len(rows) == len(plan["programs"]), f"{name}: predicted-vs-measured table has a row per GPU ({len(rows)})")
            check(len(d.by_class.get("timeline", [])) == 2, f"{name}: two timelines (predicted above measured)")
        ms = float(st.get("data-render-ms", "nan"))
        times[name] = ms
        print(f"     {name}: render time in page {ms:.1f} ms ({st.get('data-boxes')} boxes, {st.get('data-lanes')} lanes, "
              f"drawn rects {st.get('data-drawn')})", flush=True)
        check(0 < ms < RENDER_LIMIT_MS, f"{name}: render time {ms:.1f} ms < {RENDER_LIMIT_MS:.0f} ms")
        check_screenshot(png)
        if name == "tiny":
            check_interaction(chrome, page, work, align="measured" in roles)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--viz", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--chromium", default=None)
    ap.add_argument("--compile", help="mmoc-compile: also check real plans and predicted traces")
    ap.add_argument("--run", help="mmoc-run: also check a measured trace (CPU engine)")
    ap.add_argument("--repo", default=REPO, help="source tree (configs/, data/)")
    a = ap.parse_args()
    viz = os.path.abspath(a.viz)
    work = os.path.abspath(a.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    # inputs
    small_pred, exp_sp = gen(work, "small", "--gpus", "2", "--v", "2", "--mb", "8", "--plan", os.path.join(work, "small.plan.json"))
    small_meas, exp_sm = gen(work, "small_meas", "--gpus", "2", "--v", "2", "--mb", "8", "--source", "measured",
                             "--scale", "1.08", "--jitter", "0.05", "--offset-us", "1.7e12", "--no-step", "--seed", "7")
    big_pred, exp_big = gen(work, "big", "--gpus", "8", "--v", "4", "--mb", "64")
    check(exp_big["boxes"] >= 10000, f"large trace has {exp_big['boxes']} boxes (>= 10k)")
    plan_nopred = os.path.join(work, "plan_nopred.json")
    with open(os.path.join(work, "small.plan.json")) as f:
        p = json.load(f)
    del p["predicted"]
    with open(plan_nopred, "w") as f:
        json.dump(p, f)

    # 1. bad inputs
    check_bad_inputs(viz, work, small_pred, plan_nopred)

    # 2. outputs (browser-free checks)
    small_html = os.path.join(work, "small.html")
    perf = os.path.join(work, "small.perfetto.json")
    rc, _, err = run([viz, "--plan", os.path.join(work, "small.plan.json"), "--predicted", small_pred,
                      "--measured", small_meas, "-o", small_html, "--perfetto", perf])
    check(rc == 0 and os.path.exists(small_html) and os.path.exists(perf), f"small: mmoc-viz ok ({err.strip()})")
    if os.path.exists(perf):
        check_perfetto(perf, exp_sp, exp_sm)
    if os.path.exists(small_html):
        with open(small_html, encoding="utf-8") as f:
            page = f.read()
        check("http://" not in page and "https://" not in page and "src=" not in page,
              "small: page references no network resources")
    big_html = os.path.join(work, "big.html")
    t = time.time()
    rc, _, err = run([viz, "--predicted", big_pred, "-o", big_html])
    check(rc == 0 and os.path.exists(big_html), f"big: mmoc-viz ok in {time.time() - t:.2f} s ({err.strip()})")
    plan_html = os.path.join(work, "planonly.html")
    rc, _, err = run([viz, "--plan", os.path.join(work, "small.plan.json"), "-o", plan_html])
    check(rc == 0 and os.path.exists(plan_html), "plan-only: mmoc-viz ok")
    real = real_inputs(a, viz, work) if a.compile else []
    if not a.compile:
        print("SKIP: no --compile: the real-input checks are not run", flush=True)

    chrome = a.chromium or shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chrome:
        print("SKIP: no chromium found; browser checks not run", flush=True)
        return 1 if FAILS else 77

    # 3. small page: both traces, diff table, plan tables
    d, _ = open_page(chrome, small_html, screenshot=os.path.join(work, "small.png"))
    check_page_basics(d, "small")
    check_lanes(d, "small", "predicted", exp_sp)
    check_lanes(d, "small", "measured", exp_sm)
    check_summary(d, "small", "predicted", exp_sp)
    check_summary(d, "small", "measured", exp_sm)
    check(len([r for r in d.rows.get("diff-table", []) if "data-gpu" in r]) == 2, "small: diff table has a row per GPU")
    check(len([r for r in d.rows.get("gpu-table-measured", []) if "data-gpu" in r]) == 2, "small: per-GPU table (measured)")
    check(len([r for r in d.rows.get("stage-table", []) if "data-stage" in r]) == 4, "small: stage table from the plan")
    check(len(d.by_class.get("timeline", [])) == 2, "small: two timelines (predicted above measured)")
    check_screenshot(os.path.join(work, "small.png"))
    check_interaction(chrome, small_html, work)

    # 4. large page: render time
    d, _ = open_page(chrome, big_html, screenshot=os.path.join(work, "big.png"))
    st = check_page_basics(d, "big")
    check_lanes(d, "big", "predicted", exp_big)
    check_summary(d, "big", "predicted", exp_big)
    ms = float(st.get("data-render-ms", "nan"))
    print(f"     big: render time in page {ms:.1f} ms, drawn rects {st.get('data-drawn')}, last draw {st.get('data-last-draw-ms')} ms")
    check(0 < ms < RENDER_LIMIT_MS, f"big: render time {ms:.1f} ms < {RENDER_LIMIT_MS:.0f} ms")
    check_screenshot(os.path.join(work, "big.png"))

    # 5. plan-only page
    d, _ = open_page(chrome, plan_html)
    st = check_page_basics(d, "plan-only")
    check(st.get("data-boxes") == "0" and len([r for r in d.rows.get("stage-table", []) if "data-stage" in r]) == 4,
          "plan-only: no boxes, stage table present")

    # 6. real inputs
    if real:
        times = real_browser_checks(chrome, real, work)
        print("     render times (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), flush=True)

    print(f"{len(FAILS)} failure(s)" if FAILS else "all checks passed", flush=True)
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
