#!/usr/bin/env python3
"""Synthetic mmoc traces for the mmoc-viz tests (stdlib only).

Simulates a toy pipelined, offloaded schedule (gpus x v virtual stages, chunked GPipe order) with list
scheduling and writes a Chrome trace in the shape of docs/plan-format.md ("Simulator trace"):
X events on lanes 0 comp, 1 h2d, 2 d2h, 3 p2p, 4.. cpu threads, "mem" counters, thread_name metadata.
Next to it (--expect) it writes what a correct visualiser must find, computed here independently:
boxes per (gpu, lane), step time, comp busy time, peak memory and bytes per link direction.

  gen_trace.py --gpus 2 --v 2 --mb 8 --source predicted -o t.json --expect t.expect.json [--plan plan.json]
"""
import argparse
import json
import random


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--v", type=int, default=2)
    ap.add_argument("--mb", type=int, default=8)
    ap.add_argument("--source", default="predicted", choices=["predicted", "measured"])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply all durations")
    ap.add_argument("--jitter", type=float, default=0.0, help="random relative jitter of durations")
    ap.add_argument("--offset-us", type=float, default=0.0, help="absolute start time (measured traces)")
    ap.add_argument("--cpu-threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-step", action="store_true", help="omit metadata.step_s (viewer must derive it)")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--expect", help="write expected statistics here")
    ap.add_argument("--plan", help="also write a matching mmoc plan JSON (with a predicted section)")
    a = ap.parse_args()

    rnd = random.Random(a.seed)
    G, V, M = a.gpus, a.v, a.mb
    S = G * V
    GiB = 1 << 30
    W_BYTES = 96 << 20       # weights of one stage
    ACT_BYTES = 24 << 20     # stash of one (stage, micro-batch)
    ACT_MSG = 1 << 20        # activation / gradient message between stages
    BASE = 2 * GiB           # resident state per GPU
    BUDGET = 12 * GiB
    LINK = 25e9              # bytes/s per direction

    def d(us):
        return us * a.scale * (1.0 + (rnd.uniform(-a.jitter, a.jitter) if a.jitter else 0.0))

    FWD, BWD, XFER, PREF, EVW, EVG, OPT, LOAD = 300.0, 620.0, ACT_MSG / LINK * 1e6, W_BYTES / LINK * 1e6, 4.0, W_BYTES / LINK * 1e6, 900.0, 12.0

    gpu_of = lambda s: s % G
    free = {(g, l): 0.0 for g in range(G) for l in range(4 + a.cpu_threads)}
    events, memdelta = [], {g: [] for g in range(G)}
    ninstr = [0] * G

    def emit(g, lane, name, op, start, dur, stage=-1, mb=-1, nbytes=0, deps=()):
        idx = ninstr[g]
        ninstr[g] += 1
        args = {"op": op, "stage": stage, "mb": mb, "bytes": nbytes, "instr": idx,
                "deps": ",".join("%" + str(x) for x in deps)}
        events.append({"ph": "X", "name": name, "cat": op, "pid": g, "tid": lane,
                       "ts": round(start + a.offset_us, 3), "dur": round(dur, 3), "args": args})
        free[(g, lane)] = start + dur
        return idx, start + dur

    def mem(g, t, delta):
        memdelta[g].append((t, delta))

    def run(g, lane, name, op, ready, dur, **kw):
        start = max(free[(g, lane)], ready)
        return emit(g, lane, name, op, start, dur, **kw)

    w_ready, sendfree = {}, {}
    # forward phase, chunk by chunk; weights of a chunk prefetched when the previous chunk starts
    fwd_end = {}
    for c in range(V):
        for s in range(c * G, c * G + G):
            g = gpu_of(s)
            idx, end = run(g, 1, f"prefetch w(S{s}) <- host", "prefetch", 0.0, d(PREF), stage=s, nbytes=W_BYTES)
            mem(g, end, W_BYTES)
            w_ready[s] = (idx, end)
        for m in range(M):
            for s in range(c * G, c * G + G):
                g = gpu_of(s)
                ready = w_ready[s][1]
                deps = [w_ready[s][0]]
                if s == 0:
                    li, le = run(g, 0, f"load_batch m{m}", "load_batch", 0.0, d(LOAD), mb=m, nbytes=0)
                    ready = max(ready, le)
                else:
                    ready = max(ready, fwd_end[(s - 1, m)][1])
                    deps.append(fwd_end[(s - 1, m)][0])
                idx, end = run(g, 0, f"forward S{s} m{m}", "forward", ready, d(FWD), stage=s, mb=m, deps=deps)
                mem(g, end - 1e-3, ACT_BYTES)
                fwd_end[(s, m)] = (idx, end)
                if s + 1 < S and gpu_of(s + 1) != g:  # send/recv rendezvous on both p2p lanes
                    h = gpu_of(s + 1)
                    t = max(end, sendfree.get(g, 0.0))  # toy model: sends of a GPU in order, recvs not reserved
                    du = d(XFER)
                    sendfree[g] = t + du
                    emit(g, 3, f"send act(S{s},m{m}) -> g{h}", "send", t, du, stage=s, mb=m, nbytes=ACT_MSG, deps=[idx])
                    ri, re = emit(h, 3, f"recv act(S{s},m{m}) <- g{g}", "recv", t, du, stage=s, mb=m, nbytes=ACT_MSG)
                    mem(h, t, ACT_MSG)
                    fwd_end[(s, m)] = (ri, re)  # the consumer waits for the recv
        for s in range(c * G, c * G + G):
            g = gpu_of(s)
            idx, end = run(g, 2, f"evict w(S{s})", "evict", free[(g, 0)], d(EVW), stage=s)
            mem(g, end, -W_BYTES)
    # backward phase, chunks in reverse
    bwd_end = {}
    for c in reversed(range(V)):
        for s in range(c * G, c * G + G):
            g = gpu_of(s)
            idx, end = run(g, 1, f"prefetch w(S{s}) <- host", "prefetch", 0.0, d(PREF), stage=s, nbytes=W_BYTES)
            mem(g, end, W_BYTES)
            w_ready[s] = (idx, end)
        for m in range(M):
            for s in reversed(range(c * G, c * G + G)):
                g = gpu_of(s)
                ready, deps = w_ready[s][1], [w_ready[s][0]]
                if s + 1 < S:
                    ready = max(ready, bwd_end[(s + 1, m)][1])
                    deps.append(bwd_end[(s + 1, m)][0])
                idx, end = run(g, 0, f"backward S{s} m{m}", "backward", ready, d(BWD), stage=s, mb=m, deps=deps)
                if m == 0:
                    mem(g, end - 1e-3, W_BYTES)  # wgrad(S) allocated
                mem(g, end, -ACT_BYTES)
                if s > 0 and gpu_of(s - 1) != g:
                    mem(g, end, -ACT_MSG)  # received input activation consumed
                bwd_end[(s, m)] = (idx, end)
                if s > 0 and gpu_of(s - 1) != g:
                    h = gpu_of(s - 1)
                    t = max(end, sendfree.get(g, 0.0))  # toy model: sends of a GPU in order, recvs not reserved
                    du = d(XFER)
                    sendfree[g] = t + du
                    emit(g, 3, f"send grad(S{s-1},m{m}) -> g{h}", "send", t, du, stage=s, mb=m, nbytes=ACT_MSG, deps=[idx])
                    ri, re = emit(h, 3, f"recv grad(S{s-1},m{m}) <- g{g}", "recv", t, du, stage=s - 1, mb=m, nbytes=ACT_MSG)
                    bwd_end[(s, m)] = (ri, re)
        for s in range(c * G, c * G + G):
            g = gpu_of(s)
            ei, ee = run(g, 2, f"evict wgrad(S{s}) -> host", "evict", free[(g, 0)], d(EVG), stage=s, nbytes=W_BYTES)
            mem(g, ee, -W_BYTES)
            wi, we = run(g, 2, f"evict w(S{s})", "evict", ee, d(EVW), stage=s)
            mem(g, we, -W_BYTES)
            lane = 4 + (s // G) % a.cpu_threads
            run(g, lane, f"optim S{s}", "optim", ee, d(OPT), stage=s, deps=[ei])

    # memory counters (cumulative), peaks
    peaks = []
    for g in range(G):
        cur = BASE
        pts = [(0.0, cur)]
        for t, delta in sorted(memdelta[g], key=lambda x: x[0]):
            if delta == 0:
                continue
            cur += delta
            pts.append((t, cur))
        peaks.append(max(b for _, b in pts))
        for t, b in pts:
            events.append({"ph": "C", "name": "mem", "pid": g, "ts": round(t + a.offset_us, 3), "args": {"bytes": b}})
    lane_names = ["comp", "h2d", "d2h", "p2p"] + [f"cpu{k}" for k in range(a.cpu_threads)]
    meta_events = []
    for g in range(G):
        meta_events.append({"ph": "M", "name": "process_name", "pid": g, "tid": 0, "args": {"name": f"g{g}"}})
        for l, n in enumerate(lane_names):
            meta_events.append({"ph": "M", "name": "thread_name", "pid": g, "tid": l, "args": {"name": n}})
    xs = [e for e in events if e["ph"] == "X"]
    # Expected values use the rounded numbers that are written to the file.
    t_min = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in xs) - t_min
    metadata = {"source": a.source, "budget_bytes": BUDGET, "gpus": G, "peak_bytes": peaks,
                "tokens_per_s": M * 8 * 128 / (end * 1e-6)}
    if not a.no_step:
        metadata["step_s"] = end * 1e-6
        metadata["pcie_bytes_per_s"] = LINK
    doc = {"traceEvents": meta_events + events, "metadata": metadata}
    with open(a.output, "w") as f:
        json.dump(doc, f)

    if a.expect:
        exp = {"gpus": G, "step_us": end, "boxes": len(xs), "lanes": {}, "busy_us": [], "peak_bytes": peaks,
               "h2d_bytes": [], "d2h_bytes": [], "lane_names": lane_names}
        for g in range(G):
            for l in range(len(lane_names)):
                exp["lanes"][f"{g}/{l}"] = sum(1 for e in xs if e["pid"] == g and e["tid"] == l)
            comp = sorted((e["ts"], e["ts"] + e["dur"]) for e in xs if e["pid"] == g and e["tid"] == 0)
            busy, cs, ce = 0.0, None, None
            for s0, e0 in comp:
                if ce is None or s0 > ce:
                    if ce is not None:
                        busy += ce - cs
                    cs, ce = s0, e0
                else:
                    ce = max(ce, e0)
            if ce is not None:
                busy += ce - cs
            exp["busy_us"].append(busy)
            exp["h2d_bytes"].append(sum(e["args"]["bytes"] for e in xs if e["pid"] == g and e["tid"] == 1))
            exp["d2h_bytes"].append(sum(e["args"]["bytes"] for e in xs if e["pid"] == g and e["tid"] == 2))
        with open(a.expect, "w") as f:
            json.dump(exp, f, indent=1)

    if a.plan:
        per = [1 + 32 // S] * S
        stages, lb = [], 0
        for s in range(S):
            stages.append({"id": s, "gpu": gpu_of(s), "layers": [lb, lb + per[s]], "recompute": True, "weights": "offload",
                           "optim": "cpu", "params": W_BYTES // 2, "fwd_ws": 64 << 20, "bwd_ws": 128 << 20,
                           "fwd_ms": FWD / 1000, "bwd_ms": BWD / 1000})
            lb += per[s]
        plan = {"format": "mmoc-plan", "version": 1,
                "plan": {"hardware": "synthetic", "schedule": "grouped", "gpus": G, "v": V, "dp": 1, "microbatches": M,
                         "mbs": 8, "seq": 128, "budget": BUDGET, "order": list(range(G))},
                "model": {"name": "synthetic-llama", "layers": lb - 2, "hidden": 4096, "ffn": 11008, "heads": 32,
                          "kv_heads": 32, "vocab": 32000, "rope_theta": 10000.0, "norm_eps": 1e-05, "tied": False},
                "train": {"precision": "bf16", "lr": 1e-05, "beta1": 0.9, "beta2": 0.999, "eps": 1e-08, "wd": 0.0,
                          "clip": 0.0, "lr_schedule": "constant", "warmup": 0, "total": 0, "seed": 0},
                "stages": stages,
                "buffers": [{"buf": f"w(S{s})", "bytes": W_BYTES, "home": "host"} for s in range(S)],
                "predicted": {"step_s": end * 1e-6, "tokens_per_s": M * 8 * 128 / (end * 1e-6), "bubble": 0.3,
                              "peak": peaks, "bound": peaks},
                "programs": []}
        # one instruction per box, on the box's stream (all cpu threads are the one "cpu" stream of the plan)
        streams = ["comp", "h2d", "d2h", "p2p"]
        for g in range(G):
            xs = sorted((e for e in events if e["ph"] == "X" and e["pid"] == g), key=lambda e: e["args"]["instr"])
            assert [e["args"]["instr"] for e in xs] == list(range(len(xs)))
            plan["programs"].append({"gpu": g, "instrs": [
                {"op": e["args"]["op"], "stream": streams[e["tid"]] if e["tid"] < 4 else "cpu"} for e in xs]})
        with open(a.plan, "w") as f:
            json.dump(plan, f, indent=1)


if __name__ == "__main__":
    main()
