#!/usr/bin/env python3
"""CLI test of mmoc-run (python3 stdlib only).

    cli_test.py <mmoc-run> <mmoc-compile> <source dir>

A good run (progress lines, metrics JSONL, the loss goes down, the checkpoint loads back), the XSum path on the
CPU (raw {document, summary} records through the SentencePiece tokenizer), and bad input: every bad case must
exit with code 2, print exactly one stderr line naming the problem, and leave an existing --save folder (and
its parent folder) byte-for-byte untouched.
"""
import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time

RUN, COMPILE, SRC = (os.path.abspath(p) for p in sys.argv[1:4])
TOKENS = os.path.join(SRC, "data/sample/tiny_tokens.jsonl")
XSUM = os.path.join(SRC, "data/sample/xsum_sample.jsonl")
SPM = os.path.join(SRC, "data/sample/tokenizer.model")
FAILS = []
T0 = time.time()


def check(cond, what):
    if not cond:
        FAILS.append(what)
        print("FAIL: " + what, flush=True)
    return cond


def sh(args, timeout=120):
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MMOC_DEVICE"):
        env.pop(k, None)  # the launcher must start its own workers
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)


def must(p, what):
    if p.returncode != 0:
        print(f"{what} failed (rc {p.returncode})\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}", flush=True)
        sys.exit(1)
    return p


def compile_plan(out, *extra, job="configs/jobs/tiny-cpu.json"):
    must(sh([COMPILE, os.path.join(SRC, job), "-o", out, *extra]), "mmoc-compile " + job + " " + " ".join(extra))
    return out


def metrics_of(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def plan_flops(plan_path):
    """FLOPs of one step of a plan, written out here from the formulas of cost/spec.cpp (layer_fwd_flops; backward twice
    the forward): (model, hardware), hardware adding the forward of every layer its stage recomputes, less the down
    projection of each stage's last recomputed layer (not rerun)."""
    with open(plan_path) as f:
        p = json.load(f)
    md, hd = p["model"], p["plan"]
    mbs, seq, M = hd["mbs"], hd["seq"], hd["microbatches"]
    h, ffn, L, V = md["hidden"], md["ffn"], md["layers"], md["vocab"]
    head_dim = md.get("head_dim", 0) or h // md["heads"]
    qd, kvd = md["heads"] * head_dim, md["kv_heads"] * head_dim
    T = mbs * seq

    def fwd(layer):
        if layer == 0:
            return 0.0
        if layer <= L:
            return 2.0 * (2 * h * qd + 2 * h * kvd + 3 * h * ffn) * T + 2.0 * mbs * seq * seq * qd
        return 2.0 * V * h * T + 5.0 * V * T

    model = hw = 0.0
    for st in p["stages"]:
        b, e = st["layers"]
        rc = st["recompute"]
        k = (e - b if rc else 0) if isinstance(rc, bool) else rc  # true/false, or the number of recomputed first layers
        for layer in range(b, e):
            model += M * 3 * fwd(layer)
            hw += M * (3 * fwd(layer) + (fwd(layer) if layer < b + k else 0.0))
        # the last recomputed layer does not rerun its down projection (a LLaMA-style decoder layer at tp 1)
        last = b + k - 1
        if k > 0 and 1 <= last <= L and md.get("family", "llama") != "gpt2" and hd.get("tp", 1) <= 1:
            hw -= M * 2.0 * T * h * ffn
    return model, hw, hd["gpus"]


def check_flops(plan_path, rows):
    """mmoc-run's mfu/hfu: the plan's FLOPs per second over the GPUs' bf16 peak (cpu8 has none: the default 989)."""
    model, hw, gpus = plan_flops(plan_path)
    close = lambda a, b: abs(a - b) <= 1e-9 * abs(b)
    check(hw > model > 0, f"the plan recomputes (grouped, all offloaded): hardware FLOPs {hw} > model FLOPs {model}")
    for r in rows:
        ok = close(r.get("model_flops", 0), model) and close(r.get("hardware_flops", 0), hw) and r.get("peak_tflops") == 989
        ok = ok and close(r["mfu"], model / r["step_s"] / (gpus * 989e12)) and close(r["hfu"], hw / r["step_s"] / (gpus * 989e12))
        if not check(ok, f"metrics: mfu/hfu from the plan's FLOPs ({model:.6g}, {hw:.6g}) per second over {gpus} x 989 TFLOP/s: {r}"):
            break


def tree_digest(path):
    """name -> sha256 of every file under path (and the folder names)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path) + "/"] = "dir"
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def main():
    tmp = tempfile.mkdtemp(prefix="mmoc-cli-")
    try:
        run_all(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"cli_test: {len(FAILS)} failure(s), {time.time() - T0:.1f} s")
    return 1 if FAILS else 0


def run_all(tmp):
    j = lambda *p: os.path.join(tmp, *p)
    plan2 = compile_plan(j("tiny2.plan.json"))                                # 2 ranks, v=2 (README's job)
    plan1 = compile_plan(j("tiny1.plan.json"), "--gpus", "1", "--v", "1")
    plan_gqa = compile_plan(j("gqa.plan.json"), "--model", "tiny-gqa", "--gpus", "1", "--v", "1")
    plan_sp = compile_plan(j("sp.plan.json"), "--model", "tiny-sp1k", "--gpus", "1", "--v", "1")

    # ---- the README's main job: 20 steps on 2 CPU workers, saved -----------------------------------------
    ck = j("ckpt", "ck")
    m = j("m.jsonl")
    p = must(sh([RUN, plan2, "--data", TOKENS, "--steps", 20, "--save", ck, "--metrics", m]), "good run")
    prog = re.compile(r"^step (\d+)/20\s+loss (\S+)\s+tokens/s (\d+)\s+step (\S+) s\b.*\bETA (\d+) s$")
    lines = [l for l in p.stdout.splitlines() if l.startswith("step ")]
    check(len(lines) == 20, f"20 progress lines on stdout, got {len(lines)}")
    check(all(prog.match(l) for l in lines), "progress lines show step/loss/tokens/s/step time/ETA: " + (lines[0] if lines else "none"))
    check(lines and prog.match(lines[-1]) and prog.match(lines[-1]).group(5) == "0", "ETA of the last step is 0 s")
    check(all(re.search(r"  MFU [0-9.]+%  HFU [0-9.]+%  ETA", l) for l in lines), "progress lines show MFU and HFU: " + (lines[0] if lines else "none"))
    check(f"saved checkpoint {ck} (step 20)" in p.stdout, "the save is reported")
    ms = metrics_of(m)
    check([r.get("step") for r in ms] == list(range(1, 21)), "metrics: one line per step, steps 1..20")
    for r in ms:
        ok = all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in ("loss", "tokens_per_s", "step_s", "lr", "tokens"))
        if not check(ok and r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["tokens"] > 0, f"metrics line complete and finite: {r}"):
            break
    # host memory: each rank's peak resident set next to the plan's prediction, printed and in the metrics
    with open(plan2) as f:
        predicted = json.load(f)["plan"].get("host", [])
    check(len(predicted) == 2 and all(x > 0 for x in predicted), f"the plan predicts host memory per rank: {predicted}")
    hl = [l for l in p.stdout.splitlines() if l.startswith("host memory: peak resident set per rank")]
    check(len(hl) == 1 and re.search(r"g0 [0-9.]+ GiB \(plan predicts [0-9.]+ GiB, [+-][0-9.]+%\), g1 ", hl[0]) is not None,
          "the run prints each rank's peak RSS next to the prediction: " + (hl[0] if hl else "none"))
    last = ms[-1] if ms else {}
    check(len(last.get("host_peak_rss_bytes", [])) == 2 and all(x > 0 for x in last["host_peak_rss_bytes"]) and
          last.get("host_predicted_bytes") == predicted, "metrics: host_peak_rss_bytes and host_predicted_bytes per rank")
    check_flops(plan2, ms)
    losses = [r["loss"] for r in ms]
    check(len(losses) == 20 and losses[-1] < losses[0], f"loss after 20 steps below step 1: {losses[:1]} -> {losses[-1:]}")
    check(len(losses) == 20 and sum(losses[-5:]) / 5 < losses[0] - 0.1, "loss trend: mean of the last 5 steps at least 0.1 below step 1")
    check(abs(losses[0] - math.log(101)) < 0.2, f"random init starts near ln(vocab) = {math.log(101):.3f}: {losses[:1]}")
    # 4 stages: HF's sharded layout, one shard per stage, and the index
    for f in ("model.safetensors.index.json", "config.json", "mmoc_state/trainer_state.json"):
        check(os.path.isfile(os.path.join(ck, f)), "checkpoint holds " + f)
    with open(os.path.join(ck, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    check(shards == [f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5)], f"one shard per stage: {shards}")
    check(all(os.path.isfile(os.path.join(ck, s)) for s in shards), "every shard of the index is there")
    shard = shards[0] if shards else "model-00001-of-00004.safetensors"
    parent_before = sorted(os.listdir(j("ckpt")))
    check(parent_before == ["ck"], f"nothing left beside the checkpoint: {parent_before}")
    digest = tree_digest(ck)

    # The same job on one rank computes the same first-step loss (same init, same batch).
    m1 = j("m1.jsonl")
    must(sh([RUN, plan1, "--data", TOKENS, "--steps", 2, "--metrics", m1, "-q"]), "1-rank run")
    l1 = [r["loss"] for r in metrics_of(m1)]
    check(len(l1) == 2 and abs(l1[0] - losses[0]) < 1e-4 and abs(l1[1] - losses[1]) < 1e-4,
          f"1-rank and 2-rank runs agree on steps 1-2: {l1} vs {losses[:2]}")

    # The saved folder loads back (into a plan of another rank count: HF weights do not depend on the plan),
    # and it holds the trained weights: its first loss is well below the random init's.
    mi = j("mi.jsonl")
    p = must(sh([RUN, plan1, "--data", TOKENS, "--steps", 1, "--init", ck, "--metrics", mi]), "--init <saved>")
    li = [r["loss"] for r in metrics_of(mi)]
    check(len(li) == 1 and math.isfinite(li[0]) and li[0] < losses[0] - 0.1, f"--init <saved> starts from trained weights: {li} vs random {losses[0]}")
    # --resume continues at step 21
    p = must(sh([RUN, plan2, "--data", TOKENS, "--steps", 21, "--resume", ck]), "--resume <saved>")
    check(re.search(r"^step 21/21 ", p.stdout, re.M) and not re.search(r"^step 1/", p.stdout, re.M), "--resume continues at step 21")
    check(tree_digest(ck) == digest, "runs without --save leave the checkpoint alone")

    # ---- bad input -----------------------------------------------------------------------------------
    def bad(name, args, *needles, plan=plan1):
        p = sh([RUN, plan, *args, "--save", ck, "-q"] if plan else [RUN, *args, "--save", ck, "-q"])
        err = p.stderr.strip().splitlines()
        check(p.returncode == 2, f"{name}: exit code 2, got {p.returncode} (stderr: {p.stderr.strip()!r})")
        check(len(err) == 1 and err[0].startswith("mmoc-run: "), f"{name}: one stderr line, got {err}")
        text = p.stderr.lower()
        for n in needles:
            check(n.lower() in text, f"{name}: message names {n!r}: {p.stderr.strip()!r}")
        check(not re.search(r"^step ", p.stdout, re.M), f"{name}: no training step ran")
        check(tree_digest(ck) == digest, f"{name}: --save target untouched")
        check(sorted(os.listdir(j("ckpt"))) == parent_before, f"{name}: nothing written beside the --save target: {os.listdir(j('ckpt'))}")

    # corrupt / truncated safetensors through --init
    trunc = j("trunc")
    shutil.copytree(ck, trunc)
    st = os.path.join(trunc, shard)
    os.truncate(st, os.path.getsize(st) // 2)
    bad("truncated shard", ["--data", TOKENS, "--init", trunc], "trunc/" + shard, "truncated")
    hdr = j("hdr")
    shutil.copytree(ck, hdr)
    st = os.path.join(hdr, shard)
    with open(st, "r+b") as f:
        f.write(struct.pack("<Q", os.path.getsize(st) * 4))
    bad("header length beyond the file", ["--data", TOKENS, "--init", hdr], "hdr/" + shard, "header length")
    junk = j("junk")
    os.makedirs(junk)
    with open(os.path.join(junk, "model.safetensors"), "wb") as f:
        f.write(b"\x05")
    bad("a 1-byte model.safetensors", ["--data", TOKENS, "--init", junk], "junk/model.safetensors")
    empty = j("empty")
    os.makedirs(empty)
    bad("--init folder without weights", ["--data", TOKENS, "--init", empty], "empty", "model.safetensors")
    bad("--init of no folder", ["--data", TOKENS, "--init", j("nowhere")], "--init", "nowhere")
    bad("--prefetch-pool of no pool", ["--data", TOKENS, "--prefetch-pool", "gpu"], "--prefetch-pool", "gpu")

    # a checkpoint of another model
    bad("tiny-8l checkpoint into a tiny-gqa plan (4 layers)", ["--data", TOKENS, "--init", ck], "num_hidden_layers 8", plan=plan_gqa)
    bad("tiny-8l checkpoint into a vocab-1000 plan", ["--data", TOKENS, "--init", ck], "vocab_size 101", plan=plan_sp)
    bare = j("bare")  # weights only, no config.json: the tensors themselves are checked
    os.makedirs(bare)
    for f in shards + ["model.safetensors.index.json"]:
        shutil.copy(os.path.join(ck, f), bare)
    bad("tiny-8l weights into a tiny-gqa plan (4 layers)", ["--data", TOKENS, "--init", bare], "unexpected tensor", "model.layers.4.", plan=plan_gqa)
    bad("tiny-8l weights into a vocab-1000 plan", ["--data", TOKENS, "--init", bare], "model.embed_tokens.weight", "[1000,64]", plan=plan_sp)
    cfg = j("cfg")
    shutil.copytree(ck, cfg)
    with open(os.path.join(cfg, "config.json")) as f:
        c = json.load(f)
    # heads 8 / kv_heads 4 at hidden 64 has exactly the tensor shapes of heads 4 / kv_heads 2: only config.json tells
    c.update(num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    with open(os.path.join(cfg, "config.json"), "w") as f:
        json.dump(c, f)
    bad("config.json with other head counts", ["--data", TOKENS, "--init", cfg], "num_attention_heads", "config.json", plan=plan2)

    # a plan for more GPUs than there are
    ngpu = len([d for d in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", d)]) if os.path.isdir("/dev") else 0
    if ngpu == 0:
        bad("--device cuda without a GPU", ["--data", TOKENS, "--device", "cuda"], "--device cuda", "no cuda gpu", plan=plan2)
    elif ngpu < 2:
        bad("--device cuda, 2-rank plan, 1 GPU", ["--data", TOKENS, "--device", "cuda"], "2 GPU ranks", plan=plan2)
    else:
        print(f"note: {ngpu} GPUs visible, the too-many-ranks case is skipped")
    bad("--device other", ["--data", TOKENS, "--device", "tpu"], "--device")

    # malformed data
    with open(TOKENS) as f:
        good_lines = f.read().splitlines()
    badjson = j("badjson.jsonl")
    with open(badjson, "w") as f:
        f.write("\n".join(good_lines[:2] + ['{"input_ids": [1, 5,'] + good_lines[2:6]) + "\n")
    bad("bad JSON on line 3", ["--data", badjson], "badjson.jsonl:3:")
    oov = j("oov.jsonl")
    with open(oov, "w") as f:
        f.write("\n".join(good_lines[:3] + ['{"input_ids": [1, 7, 101, 2]}']) + "\n")
    bad("id = vocab on line 4", ["--data", oov], "oov.jsonl:4:", "vocab")
    neg = j("neg.jsonl")
    with open(neg, "w") as f:
        f.write('{"input_ids": [1, 7, 9, 2], "labels": [-100, 7, -3, 2]}\n')
    bad("negative label on line 1", ["--data", neg], "neg.jsonl:1:")
    bad("missing data file", ["--data", j("nodata.jsonl")], "nodata.jsonl")

    # raw text without a tokenizer
    bad("raw text, no --tokenizer", ["--data", XSUM], "xsum_sample.jsonl:1:", "tokenizer")
    bad("raw text, --tokenizer pointing nowhere", ["--data", XSUM, "--tokenizer", j("nowhere", "tokenizer.model")], "--tokenizer", "nowhere/tokenizer.model")
    not_spm = j("not-a-tokenizer.model")
    with open(not_spm, "w") as f:
        f.write("this is not a sentencepiece model\n")
    bad("raw text, --tokenizer not a model", ["--data", XSUM, "--tokenizer", not_spm], "not-a-tokenizer.model")

    # plans and checkpoints that are not there / not what they claim
    bad("missing plan file", [j("missing.plan.json"), "--data", TOKENS], "missing.plan.json", plan=None)
    bad("a job file given as the plan", [os.path.join(SRC, "configs/jobs/tiny-cpu.json"), "--data", TOKENS], "tiny-cpu.json", plan=None)
    bad("a data file given as the plan", [TOKENS, "--data", TOKENS], "tiny_tokens.jsonl", plan=None)
    bad("--resume of a folder with no checkpoint", ["--data", TOKENS, "--resume", empty], "--resume", "trainer_state.json")
    bad("--resume of an HF-only folder", ["--data", TOKENS, "--resume", junk], "--resume", "trainer_state.json")
    bad("--resume into a plan of another model", ["--data", TOKENS, "--resume", ck, "--steps", 25], "another model", plan=plan_gqa)
    # another partition of the same model resumes: the plan's stages are gathered from the saved ones
    must(sh([RUN, plan1, "--data", TOKENS, "--resume", ck, "--steps", 22, "-q"]), "--resume into another partition (4 stages -> 1)")
    few = j("few.jsonl")
    with open(few, "w") as f:
        f.write("\n".join(good_lines[:5]) + "\n")
    bad("--resume with other data", ["--data", few, "--resume", ck, "--steps", 25], "--resume", "rows", plan=plan2)
    bad("--steps negative", ["--data", TOKENS, "--steps", -1], "--steps")
    # a plan whose memory order contradicts the op table where no handler would notice: batch(m0) freed before the last
    # stage's backward (gpipe, no recompute: that backward does not read the labels again, so an engine without the
    # table ran this plan to the end), while ir::effects says backward of the first or last stage requires batch(m);
    # the engine checks every instruction against the table and fails naming it
    tp = compile_plan(j("t12.plan.json"), "--gpus", "1", "--v", "2", "--recompute", "off", "--schedule", "gpipe")
    with open(tp) as f:
        pj = json.load(f)
    ins = pj["programs"][0]["instrs"]
    src = next(i for i, x in enumerate(ins) if x["op"] == "free" and x.get("buf") == "batch(m0)")
    dst = next(i for i, x in enumerate(ins) if x["op"] == "backward" and x.get("stage") == 1 and x.get("mb") == 0)
    order = list(range(len(ins)))
    order.insert(dst, order.pop(src))
    new_of = {old: new for new, old in enumerate(order)}
    moved = []
    for old in order:
        x = dict(ins[old])
        if "after" in x:
            x["after"] = sorted(new_of[a] for a in x["after"] if new_of[a] < new_of[old])
            if not x["after"]:
                del x["after"]
        moved.append(x)
    pj["programs"][0]["instrs"] = moved
    bad_order = j("bad-order.plan.json")
    with open(bad_order, "w") as f:
        json.dump(pj, f)
    p = sh([RUN, bad_order, "--data", TOKENS, "--steps", 1, "-q"])
    check(p.returncode != 0 and f"failed at instruction %{new_of[dst]}: the op table says backward requires batch(m0), which is not on the device" in p.stderr,
          f"batch freed too early: the engine stops at the backward that needs it (rc {p.returncode}): {p.stderr.strip()[:300]!r}")
    print(f"good run and bad input: {time.time() - T0:.1f} s", flush=True)

    # ---- TASK 2: the seed's XSum path on the CPU --------------------------------------------------------
    xplan = compile_plan(j("xsum.plan.json"), job="configs/jobs/tiny-xsum-cpu.json")
    with open(xplan) as f:
        xp = json.load(f)
    check(xp["plan"]["seq"] == 192 and xp["model"]["vocab"] == 1000, "tiny-xsum-cpu plan: seq_len 192, vocab 1000")
    mx = j("mx.jsonl")
    p = must(sh([RUN, xplan, "--data", XSUM, "--tokenizer", SPM, "--steps", 10, "--metrics", mx, "--fit", "pad"]), "XSum run")
    rows = metrics_of(mx)
    lx = [r["loss"] for r in rows]
    check(len(lx) == 10 and all(math.isfinite(v) for v in lx), f"XSum: 10 finite losses: {lx}")
    check(abs(lx[0] - math.log(1000)) < 0.3, f"XSum: starts near ln(1000) = {math.log(1000):.3f}: {lx[:1]}")
    check(len(lx) == 10 and lx[-1] < lx[0] - 0.5 and sum(lx[-3:]) / 3 < sum(lx[:3]) / 3 - 0.5, f"XSum: the loss goes down over 10 steps: {lx}")
    # the document is masked: only summary tokens + eos count (10-41 tokens + eos each; 8 sequences a step);
    # the whole prompt would be ~110 tokens per example
    per_step = xp["plan"]["microbatches"] * xp["plan"]["mbs"]
    check(all(per_step * 11 <= r["tokens"] <= per_step * 42 for r in rows),
          f"XSum: tokens counted per step are the summaries only: {[r['tokens'] for r in rows]}")


if __name__ == "__main__":
    sys.exit(main())
