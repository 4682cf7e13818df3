"""On a GPU machine: mmoc's model on CUDA against HF transformers' AutoModelForCausalLM on the same safetensors, for
every model family. One command, self-checking:

  python3 tests/gpu/hf_gpu_check.py <build dir> <work dir> [--fixtures DIR] [--only NAME,...]

For each family transformers writes a random mid-size model here (GQA, real vocabularies, every family feature on:
Llama-3.2-style llama3 rope and tied head, Qwen2.5 q/k/v biases, Qwen3 q/k norms with head_dim != hidden/heads and a
tied head, Mistral's sliding window shorter than the sequence, GPT-2), with norm weights and biases randomised so a
missing one shows; --fixtures adds the checkpoints in DIR (a folder of HF checkpoints with hf_reference.safetensors,
e.g. the project's hf-tiny/), each with HF's own batch. For each model:
  - fp32 on CUDA: mmoc-eval's logits equal HF's fp32 logits (to fp32 rounding) and so does the loss;
  - bf16 on CUDA: mmoc's logits and loss are as close to HF's fp32 result as HF's own bf16 run is (within 2x + eps):
    "within bf16 tolerance", measured rather than guessed;
  - the first training step of mmoc-run in bf16 on CUDA (plan compiled from the checkpoint's own config.json,
    --init the checkpoint; 2 stages, a tied head getting stage 0's embedding) reports HF's loss within the same tolerance.
Prints one line per check and exits 1 when any fails. MMOC_CHECK_DEVICE=cpu: a dry run without a GPU."""
import argparse, json, os, shutil, subprocess, sys

import torch
import transformers
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file

ap = argparse.ArgumentParser()
ap.add_argument("build")
ap.add_argument("work")
ap.add_argument("--fixtures", default=None, help="folder of HF checkpoints with hf_reference.safetensors (e.g. hf-tiny/)")
ap.add_argument("--only", default="", help="comma-separated case names")
a = ap.parse_args()
EVAL, RUN, COMPILE = (os.path.join(a.build, "tools", t, "mmoc-" + t) for t in ("eval", "run", "compile"))
work = a.work
os.makedirs(work, exist_ok=True)
DEV = os.environ.get("MMOC_CHECK_DEVICE", "cuda")  # cpu: a dry run of this script without a GPU
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def hf_logits_loss(model_dir, ids, labels, dtype):
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(DEV).eval()
    with torch.no_grad():
        out = m(input_ids=ids.to(DEV), labels=labels.to(DEV))
    r = out.logits.float().cpu(), out.loss.float().item()
    del m
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return r


def mmoc_eval(model_dir, rows, T, B, precision):
    out = os.path.join(work, "logits.safetensors")
    r = subprocess.run([EVAL, model_dir, "--data", rows, "--seq-len", str(T), "--batch", str(B), "--device", DEV,
                        "--precision", precision, "--logits", out], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout, r.stderr)
        return None, float("nan")
    return load_file(out)["logits"], float(r.stdout.split("loss ")[1].split(",")[0])


def first_step_loss(model_dir, rows, B, T, tied):
    plan = os.path.join(work, "plan.json")
    r = subprocess.run([COMPILE, "--model", os.path.join(model_dir, "config.json"), "--hardware", "h100x1", "--gpus", "1",
                        "--v", "2", "--budget", "32", "--micro-batch-size", str(B), "--microbatches", "1",
                        "--seq-len", str(T), "--precision", "bf16", "-o", plan, "-q"], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr)
        return float("nan")
    met = os.path.join(work, "metrics.jsonl")
    r = subprocess.run([RUN, plan, "--data", rows, "--steps", "1", "--device", DEV, "--init", model_dir, "-q",
                        "--metrics", met], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout, r.stderr)
        return float("nan")
    return json.loads(open(met).readline())["loss"]


def case(name, model_dir, ids, labels):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    tied = cfg.get("tie_word_embeddings", cfg.get("model_type") == "gpt2")
    B, T = ids.shape
    rows = os.path.join(work, name + ".jsonl")
    with open(rows, "w") as f:
        for x, y in zip(ids.tolist(), labels.tolist()):
            f.write(json.dumps({"input_ids": x, "labels": y}) + "\n")
    l32, loss32 = hf_logits_loss(model_dir, ids, labels, torch.float32)
    lbf, lossbf = hf_logits_loss(model_dir, ids, labels, torch.bfloat16)
    m32, mloss32 = mmoc_eval(model_dir, rows, T, B, "fp32")
    mbf, mlossbf = mmoc_eval(model_dir, rows, T, B, "bf16")
    scale = l32.abs().max().item()
    if m32 is None or mbf is None:
        check(False, f"{name}: mmoc-eval ran on {DEV}")
        return
    d32 = (m32 - l32).abs().max().item()
    check(d32 <= 1e-4 * max(1.0, scale), f"{name}: fp32 logits equal HF's (max abs diff {d32:.2e}, logit scale {scale:.2f})")
    check(abs(mloss32 - loss32) <= 1e-5 * abs(loss32), f"{name}: fp32 loss {mloss32:.6f} vs HF {loss32:.6f}")
    e_hf = (lbf - l32).abs().max().item()
    e_m = (mbf - l32).abs().max().item()
    check(e_m <= 2 * e_hf + 1e-3 * max(1.0, scale),
          f"{name}: bf16 logits: mmoc's max deviation from fp32 {e_m:.3e}, HF bf16's {e_hf:.3e}; mmoc vs HF bf16 {(mbf - lbf).abs().max().item():.3e}")
    el_hf, el_m = abs(lossbf - loss32), abs(mlossbf - loss32)
    check(el_m <= 2 * el_hf + 2e-3 * abs(loss32),
          f"{name}: bf16 loss mmoc {mlossbf:.5f}, HF bf16 {lossbf:.5f}, HF fp32 {loss32:.5f}")
    fs = first_step_loss(model_dir, rows, B, T, tied)
    check(abs(fs - loss32) <= 2 * el_hf + 2e-3 * abs(loss32),
          f"{name}: mmoc-run's first bf16 training step reports loss {fs:.5f} (HF bf16 {lossbf:.5f}, fp32 {loss32:.5f})")


# Mid-size random models, one per family (and LLaMA-2 as before), written by transformers here.
MID = {
    "llama-mid": ("LlamaConfig", dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "llama3-mid": ("LlamaConfig", dict(vocab_size=128256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                       num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=131072,
                                       rms_norm_eps=1e-5, tie_word_embeddings=True,
                                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192})),
    "qwen2-mid": ("Qwen2Config", dict(vocab_size=151936, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                      num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                                      rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False)),
    "qwen3-mid": ("Qwen3Config", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                                      rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False)),
    "mistral-mid": ("MistralConfig", dict(vocab_size=32768, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4,
                                          num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768,
                                          rms_norm_eps=1e-5, sliding_window=96, tie_word_embeddings=False)),
    "gpt2-mid": ("GPT2Config", dict(vocab_size=50257, n_embd=1024, n_layer=4, n_head=16, n_positions=1024,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
}
only = set(x for x in a.only.split(",") if x)


def write_mid(name, cls, kw):
    d = os.path.join(work, name)
    if not os.path.exists(os.path.join(d, "config.json")):
        torch.manual_seed(0)
        cfg = getattr(transformers, cls)(**kw)
        m = AutoModelForCausalLM.from_config(cfg).float()
        with torch.no_grad():  # randomise what HF initialises to 1 / 0, so a missing norm or bias shows
            for n, p in m.named_parameters():
                if p.dim() == 1:
                    is_norm_weight = ("norm" in n or "ln_" in n) and n.endswith("weight")
                    p.copy_((1.0 if is_norm_weight else 0.0) + 0.1 * torch.randn_like(p))
        m.save_pretrained(d)
    return d


torch.manual_seed(0)
for name, (cls, kw) in MID.items():
    if only and name not in only:
        continue
    d = write_mid(name, cls, kw)
    V = kw["vocab_size"]
    ids = torch.randint(0, V, (4, 256))
    labels = ids.clone()
    labels[:, :8] = -100
    case(name, d, ids, labels)
    shutil.rmtree(d, ignore_errors=True)

if a.fixtures:
    for name in sorted(os.listdir(a.fixtures)):
        d = os.path.join(a.fixtures, name)
        if (only and name not in only) or not os.path.exists(os.path.join(d, "hf_reference.safetensors")):
            continue
        ref = load_file(os.path.join(d, "hf_reference.safetensors"))
        case(name, d, ref["input_ids"], ref["labels"])

print(f"{len(failures)} failure(s)")
sys.exit(1 if failures else 0)
