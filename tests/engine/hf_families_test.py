#!/usr/bin/env python3
"""mmoc-compile + mmoc-run against HF transformers for every model family, on the CPU in fp32 (venv python).

    hf_families_test.py <mmoc-compile> <mmoc-run> <mmoc-eval> <fixtures dir holding hf-tiny/> <configs dir>

For each family fixture of tools/scripts/make_hf_fixtures.py (HF-written checkpoints with HF's loss and one
torch.optim.AdamW step on one batch):
  1. one training step: the plan is compiled from the fixture's own config.json (the compiler's HF reader) for
     N in {1, 2, 3} pipeline ranks and v in {1, 2} stages per rank (where N*v <= layers + 2; tied models too: the
     head stage gets the embedding from stage 0 and returns its gradient, and for them also with every stage offloaded,
     host master and CPU AdamW), mmoc-run starts from the checkpoint (--init: the engine's reader), trains
     one step on HF's batch with HF's AdamW hyper-parameters and saves: the step's loss and its global gradient norm
     (HF's gradients' norm, a tied matrix counted once) equal HF's to 1e-5 and every
     saved tensor equals HF's after_adamw.<name> to 1e-5 of the tensor's largest value, except where the gradient
     itself is at the 1e-5 noise floor and the step's direction is undetermined (see adamw_agreement);
  2. the config.json without its norm epsilon (rms_norm_eps / layer_norm_epsilon): the compiler and the engine both
     take HF's default for the family (transformers' own AutoConfig says which), and a one-step run reports the loss
     transformers computes for that config;
  3. transformers loads the checkpoint mmoc saved (AutoModelForCausalLM) and its logits equal mmoc's model's: a
     --steps 0 save of the fixture gives HF's reference logits exactly (tied models also saved from 4 stages on 2
     ranks: no lm_head.weight, tie_word_embeddings true);
  4. mmoc-eval (the fixture as it is, fp32): HF's logits and loss to 1e-5;
  5. a tied model on several GPUs compiles with the tied-embeddings plumbing; refusals: mmoc-run given a plan of a
     tied model over several stages without it, an unsupported model_type or architecture (named in the one-line
     error, exit code 2).
Prints one line per check; exit 1 when any fails. MMOC_FAMILIES=a,b,... runs those fixtures only.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

COMPILE, RUN, EVAL, FIX, CONFIGS = sys.argv[1:6]
FIX = os.path.join(FIX, "hf-tiny")
FAMILIES = ["llama3-gqa-fp32", "llama3-tied-fp32", "qwen2-fp32", "qwen2-tied-fp32", "qwen3-fp32", "qwen3-tied-fp32",
            "mistral-fp32", "gpt2-fp32", "llama-gqa-fp32"]
if os.environ.get("MMOC_FAMILIES"):  # a subset, comma-separated (e.g. the tied fixtures)
    FAMILIES = [f for f in os.environ["MMOC_FAMILIES"].split(",") if f]
FAILS = []
torch.set_num_threads(1)


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILS.append(what)
    return ok


def sh(args, what):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, env=env)
    if p.returncode != 0:
        check(False, f"{what}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
        return None
    return p


def rel(a, b):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-12)


def rows_file(ref, path):
    with open(path, "w") as f:
        for a, b in zip(ref["input_ids"].tolist(), ref["labels"].tolist()):
            f.write(json.dumps({"input_ids": a, "labels": b}) + "\n")


def compile_plan(work, model, meta, n, v, name="plan.json", offload="auto"):
    B, T = meta["batch"]["B"], meta["batch"]["T"]
    ad = meta["adamw"]
    job = {"model": model, "hardware": "cpu8", "gpus": n, "v": v, "micro_batch_size": B, "microbatches": 1, "seq_len": T,
           "schedule": "grouped", "offload": offload, "recompute": "auto", "budget_gib": 1,
           "train": {"precision": "fp32", "lr": ad["lr"], "beta1": ad["betas"][0], "beta2": ad["betas"][1], "eps": ad["eps"],
                     "weight_decay": ad["weight_decay"], "max_grad_norm": 0.0, "lr_schedule": "constant"}}
    jp = os.path.join(work, "job.json")
    json.dump(job, open(jp, "w"))
    plan = os.path.join(work, name)
    if not sh([COMPILE, jp, "--configs", CONFIGS, "-o", plan, "-q"], f"mmoc-compile {model} N={n} v={v}"):
        return None
    return plan


def run_step(work, plan, init, rows, steps=1, tag="run"):
    out, met = os.path.join(work, tag + "-ckpt"), os.path.join(work, tag + ".jsonl")
    shutil.rmtree(out, ignore_errors=True)
    if not sh([RUN, plan, "--data", rows, "--steps", steps, "--device", "cpu", "--init", init, "-q", "--optim-threads", 1,
               "--metrics", met, "--save", out, "--save-dtype", "fp32"], f"mmoc-run {plan} --init {init}"):
        return None, None
    rows = [json.loads(l) for l in open(met) if l.strip()] if os.path.exists(met) else []
    run_step.grad_norms = [r.get("grad_norm") for r in rows]
    return out, [r["loss"] for r in rows]


def saved_tensors(ckpt):
    t = {}
    for f in sorted(os.listdir(ckpt)):
        if f.endswith(".safetensors"):
            t.update(load_file(os.path.join(ckpt, f)))
    return t


def one_step_checks(name, work):
    d = os.path.join(FIX, name)
    meta = json.load(open(os.path.join(d, "hf_reference.json")))
    ref = load_file(os.path.join(d, "hf_reference.safetensors"))
    cfg = json.load(open(os.path.join(d, "config.json")))
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    rows = os.path.join(work, "rows.jsonl")
    rows_file(ref, rows)
    combos = [(n, v, "auto") for n in (1, 2, 3) for v in (1, 2)]
    if meta["tied_embeddings"]:  # the shared weight's master in host memory, CPU AdamW, head on another rank or not
        combos += [(1, 2, "all"), (2, 2, "all"), (3, 1, "all")]
    for n, v, off in combos:
        if n * v > layers + 2:
            print(f"skip {name} N={n} v={v}: {n * v} stages > {layers + 2} model layers", flush=True)
            continue
        plan = compile_plan(work, os.path.join(d, "config.json"), meta, n, v, offload=off)
        if not plan:
            continue
        pj = json.load(open(plan))
        stages = len(pj["stages"])
        lab = f"N={n} v={v}" + (" offload=all" if off == "all" else "")
        if off == "all":
            check(all(s["weights"] == "offload" for s in pj["stages"]), f"{name} {lab}: every stage offloaded")
        if meta["tied_embeddings"] and stages > 1:
            ops = [i["op"] for prog in pj["programs"] for i in prog["instrs"]]
            check(ops.count("addgrad") == 1, f"{name} {lab}: the plan adds the head's gradient into stage 0 once")
        ckpt, losses = run_step(work, plan, d, rows)
        if ckpt is None:
            continue
        lrel = abs(losses[0] - meta["loss"]) / abs(meta["loss"])
        check(stages == n * v and lrel <= 1e-5,
              f"{name} {lab} ({stages} stages): loss {losses[0]:.7f} vs HF {meta['loss']:.7f} (rel {lrel:.1e})")
        # the gradients: the step's global norm is HF's (a tied matrix counts once, with both its uses' gradients)
        hf_norm = torch.sqrt(sum((t.double() ** 2).sum() for k, t in ref.items() if k.startswith("grad."))).item()
        gn = run_step.grad_norms[0] if run_step.grad_norms else None
        grel = abs(gn - hf_norm) / hf_norm if gn is not None else float("inf")
        check(grel <= 1e-5, f"{name} {lab}: gradient norm {gn} vs HF's {hf_norm:.7f} (rel {grel:.1e})")
        got = saved_tensors(ckpt)
        want = {k[len("after_adamw."):]: t for k, t in ref.items() if k.startswith("after_adamw.")}
        worst, loose = adamw_agreement(got, want, ref, meta["adamw"])
        check(set(got) == set(want) and worst <= 1.0,
              f"{name} {lab}: weights after one AdamW step equal HF's ({len(want)} tensors; worst element at "
              f"{worst:.2f} of its bound; {loose} elements with a gradient below the 1e-5 noise floor"
              f"{'' if set(got) == set(want) else '; names differ: ' + str(sorted(set(got) ^ set(want)))})")


def adamw_agreement(got, want, ref, ad):
    """Largest |mmoc - HF| / bound over all elements of all tensors, and how many elements had the loose bound.

    AdamW's first step moves an element by lr * g / (|g| + eps) (plus the same decay): where |g| >> eps the update is
    lr * sign(g) and the weights must agree to 1e-5 of the tensor's largest value; where g is at the level of the
    gradients' own 1e-5 agreement (dg = 1e-5 * max|g|; e.g. a key bias, whose exact gradient is 0), the update is
    lr * dg * eps / (|g| + eps)^2 uncertain, at most 2 * lr. bound = 1e-5 * max|w| + min(2 lr, lr * eps * dg / (|g| + eps)^2).
    """
    lr, eps = ad["lr"], ad["eps"]
    worst, loose = 0.0, 0
    for k, w in want.items():
        if k not in got:
            return float("inf"), 0
        g = ref["grad." + k].double()
        dg = 1e-5 * g.abs().max().item()
        cond = (lr * eps * dg / (g.abs() + eps) ** 2).clamp(max=2 * lr)
        bound = 1e-5 * w.double().abs().max().item() + cond
        worst = max(worst, ((got[k].double() - w.double()).abs() / bound).max().item())
        loose += int((g.abs() < dg).sum())
    return worst, loose


EPS_KEY = {"gpt2": "layer_norm_epsilon"}


def default_eps_checks(name, work):
    """The config without its norm epsilon: HF's family default, in the compiler and in the engine."""
    from transformers import AutoConfig, AutoModelForCausalLM
    d = os.path.join(FIX, name)
    meta = json.load(open(os.path.join(d, "hf_reference.json")))
    ref = load_file(os.path.join(d, "hf_reference.safetensors"))
    m = os.path.join(work, name + "-no-eps")
    shutil.rmtree(m, ignore_errors=True)
    shutil.copytree(d, m)
    cfg = json.load(open(os.path.join(m, "config.json")))
    key = EPS_KEY.get(cfg["model_type"], "rms_norm_eps")
    del cfg[key]
    json.dump(cfg, open(os.path.join(m, "config.json"), "w"), indent=2)
    hf_eps = getattr(AutoConfig.from_pretrained(m), key)
    plan = compile_plan(work, os.path.join(m, "config.json"), meta, 1, 1, "plan-no-eps.json")
    if not plan:
        return
    plan_eps = json.load(open(plan))["model"]["norm_eps"]
    check(plan_eps == hf_eps, f"{name} without '{key}': the compiled plan's norm_eps {plan_eps:g} is HF's default {hf_eps:g}")
    rows = os.path.join(work, "rows.jsonl")
    rows_file(ref, rows)
    ckpt, losses = run_step(work, plan, m, rows, tag="no-eps")  # the engine's reader must agree (else --init refuses)
    if ckpt is None:
        return
    model = AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        hf_loss = model(input_ids=ref["input_ids"], labels=ref["labels"]).loss.item()
    r = abs(losses[0] - hf_loss) / abs(hf_loss)
    check(r <= 1e-5, f"{name} without '{key}': mmoc-run's loss {losses[0]:.7f} = transformers' {hf_loss:.7f} (rel {r:.1e})")


def transformers_loads(name, work, n=1, v=1):
    """--steps 0 --save: the fixture's weights as mmoc writes them; transformers gives HF's reference logits."""
    from transformers import AutoModelForCausalLM
    d = os.path.join(FIX, name)
    meta = json.load(open(os.path.join(d, "hf_reference.json")))
    ref = load_file(os.path.join(d, "hf_reference.safetensors"))
    plan = compile_plan(work, os.path.join(d, "config.json"), meta, n, v, "plan-save.json")
    rows = os.path.join(work, "rows.jsonl")
    rows_file(ref, rows)
    ckpt, _ = run_step(work, plan, d, rows, steps=0, tag="saved") if plan else (None, None)
    if ckpt is None:
        return
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    diff = (logits - ref["logits"]).abs().max().item()
    tie = ""
    if meta["tied_embeddings"]:  # saved with the tie: no lm_head.weight, the config says so, HF ties them again
        cfg = json.load(open(os.path.join(ckpt, "config.json")))
        tied_ok = (cfg.get("tie_word_embeddings") is True and "lm_head.weight" not in saved_tensors(ckpt) and
                   model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
        check(tied_ok, f"{name} N={n} v={v}: mmoc's checkpoint keeps the tie (tie_word_embeddings true, no lm_head.weight)")
        tie = " (tied)"
    check(type(model).__name__ == meta["architecture"] and diff == 0.0,
          f"{name} N={n} v={v}: transformers loads mmoc's checkpoint{tie} as {type(model).__name__}; logits max|diff| "
          f"{diff:.1e} from HF's")


def eval_checks(name, work):
    d = os.path.join(FIX, name)
    meta = json.load(open(os.path.join(d, "hf_reference.json")))
    ref = load_file(os.path.join(d, "hf_reference.safetensors"))
    rows = os.path.join(work, "rows.jsonl")
    rows_file(ref, rows)
    out = os.path.join(work, "logits.safetensors")
    p = sh([EVAL, d, "--data", rows, "--seq-len", ref["input_ids"].shape[1], "--batch", 1, "--logits", out],
           f"mmoc-eval {name}")
    if not p:
        return
    logits = load_file(out)["logits"]
    loss = float(p.stdout.split("loss ")[1].split(",")[0])
    r, lr = rel(logits, ref["logits"]), abs(loss - meta["loss"]) / meta["loss"]
    check(r <= 1e-5 and lr <= 1e-5, f"{name}: mmoc-eval's logits (rel {r:.1e}) and loss {loss:.7f} (rel {lr:.1e}) are HF's")


def refusals(work):
    """Tied embeddings across stages compile with their plumbing; mmoc-run refuses a hand-made plan without it (exit
    2, one line); unsupported architectures are named."""
    def bad(args, want, what):
        p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        check(p.returncode == 2 and len(lines) == 1 and want in lines[0], f"{what}: exit {p.returncode}, {lines}")
    tied = os.path.join(FIX, "qwen2-tied-fp32", "config.json")
    x = os.path.join(work, "x.txt")
    if sh([COMPILE, "--model", tied, "--hardware", "cpu8", "--gpus", 2, "--seq-len", 16, "--configs", CONFIGS, "-q",
           "--emit", "text", "-o", x], "mmoc-compile a tied model on 2 GPUs"):
        text = open(x).read()
        check("addgrad tiegrad(" in text and "recv tie(" in text and "send tiegrad(" in text,
              "mmoc-compile: a tied model on 2 GPUs sends the embedding to the head and its gradient back")
    plan = os.path.join(work, "untied.json")
    if sh([COMPILE, "--model", "tiny-gqa", "--hardware", "cpu8", "--gpus", 2, "--seq-len", 16, "--precision", "fp32",
           "--configs", CONFIGS, "-q", "-o", plan], "mmoc-compile tiny-gqa"):
        p = json.load(open(plan))
        p["model"]["tied"] = True
        json.dump(p, open(plan, "w"))
        rows = os.path.join(work, "rows.jsonl")
        with open(rows, "w") as f:
            f.write(json.dumps({"input_ids": list(range(16))}) + "\n")
        bad([RUN, plan, "--data", rows, "--steps", 1, "--device", "cpu"], "does not carry the tied embedding",
            "mmoc-run refuses a 2-stage plan of a tied model without the tied-embeddings plumbing")
    m = os.path.join(work, "phi")
    os.makedirs(m, exist_ok=True)
    json.dump({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_size": 64}, open(os.path.join(m, "config.json"), "w"))
    bad([COMPILE, "--model", os.path.join(m, "config.json"), "--hardware", "cpu8", "--configs", CONFIGS, "-q"],
        "model_type 'phi3' is not supported", "mmoc-compile names an unsupported model_type")
    json.dump({"architectures": ["LlamaForSequenceClassification"], "hidden_size": 64}, open(os.path.join(m, "config.json"), "w"))
    bad([COMPILE, "--model", os.path.join(m, "config.json"), "--hardware", "cpu8", "--configs", CONFIGS, "-q"],
        "architectures 'LlamaForSequenceClassification' is not supported", "mmoc-compile names an unsupported architecture")


def main():
    work = tempfile.mkdtemp(prefix="mmoc-families-")
    try:
        refusals(work)
        for name in FAMILIES:
            one_step_checks(name, work)
            transformers_loads(name, work)
            if name in ("llama3-tied-fp32", "gpt2-fp32"):
                transformers_loads(name, work, 2, 2)
            eval_checks(name, work)
        for name in ["llama3-gqa-fp32", "qwen2-fp32", "qwen3-fp32", "mistral-fp32", "gpt2-fp32"]:
            if name in FAMILIES:
                default_eps_checks(name, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(FAILS)} failure(s)")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
