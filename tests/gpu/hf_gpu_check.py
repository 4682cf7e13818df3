"""On a GPU machine: mmoc's model on CUDA against HF transformers' LlamaForCausalLM loading the same safetensors.

  python3 tests/gpu/hf_gpu_check.py <build dir> <fixture dir (hf-tiny/llama-gqa-fp32 of tools/scripts/make_hf_fixtures.py)> <work dir>

For the fixture and for a larger random LLaMA that transformers writes here (GQA, vocab 32000):
  - fp32 on CUDA: mmoc-eval's logits equal HF's fp32 logits (to fp32 rounding);
  - bf16 on CUDA: mmoc's logits and loss are as close to HF's fp32 result as HF's own bf16 run is (within 2x + eps):
    "within bf16 tolerance", measured rather than guessed;
  - the first training step of mmoc-run in bf16 on CUDA (--init the checkpoint) reports HF's bf16 loss.
Prints one line per check and exits 1 when any fails."""
import json, os, subprocess, sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from safetensors.torch import load_file

build, fixture, work = sys.argv[1], sys.argv[2], sys.argv[3]
EVAL, RUN, COMPILE = (os.path.join(build, "tools", t, "mmoc-" + t) for t in ("eval", "run", "compile"))
os.makedirs(work, exist_ok=True)
DEV = os.environ.get("MMOC_CHECK_DEVICE", "cuda")  # cpu: a dry run of this script without a GPU
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def hf_logits_loss(model_dir, ids, labels, dtype):
    m = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(DEV).eval()
    with torch.no_grad():
        out = m(input_ids=ids.to(DEV), labels=labels.to(DEV))
    return out.logits.float().cpu(), out.loss.float().item()


def mmoc_eval(model_dir, rows, T, precision):
    out = os.path.join(work, "logits.safetensors")
    r = subprocess.run([EVAL, model_dir, "--data", rows, "--seq-len", str(T), "--batch", "4", "--device", DEV,
                        "--precision", precision, "--logits", out], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout, r.stderr)
        return None, float("nan")
    return load_file(out)["logits"], float(r.stdout.split("loss ")[1].split(",")[0])


def first_step_loss(model_dir, cfg, rows, B, T):
    mj = os.path.join(work, "model.json")
    json.dump({"name": os.path.basename(model_dir), "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
               "ffn": cfg.intermediate_size, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
               "vocab": cfg.vocab_size, "max_seq": cfg.max_position_embeddings,
               "rope_theta": cfg.rope_parameters["rope_theta"], "norm_eps": cfg.rms_norm_eps,
               "tied_embeddings": bool(cfg.tie_word_embeddings)}, open(mj, "w"))
    plan = os.path.join(work, "plan.json")
    r = subprocess.run([COMPILE, "--model", mj, "--hardware", "h100x1", "--gpus", "1", "--v", "2", "--budget", "16",
                        "--micro-batch-size", str(B), "--microbatches", "1", "--seq-len", str(T), "--precision", "bf16",
                        "-o", plan, "-q"], capture_output=True, text=True)
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
    cfg = LlamaConfig.from_pretrained(model_dir)
    B, T = ids.shape
    rows = os.path.join(work, name + ".jsonl")
    with open(rows, "w") as f:
        for a, b in zip(ids.tolist(), labels.tolist()):
            f.write(json.dumps({"input_ids": a, "labels": b}) + "\n")
    l32, loss32 = hf_logits_loss(model_dir, ids, labels, torch.float32)
    lbf, lossbf = hf_logits_loss(model_dir, ids, labels, torch.bfloat16)
    m32, mloss32 = mmoc_eval(model_dir, rows, T, "fp32")
    mbf, mlossbf = mmoc_eval(model_dir, rows, T, "bf16")
    scale = l32.abs().max().item()
    if m32 is None or mbf is None:
        check(False, f"{name}: mmoc-eval ran on CUDA")
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
    fs = first_step_loss(model_dir, cfg, rows, B, T)
    check(abs(fs - loss32) <= 2 * el_hf + 2e-3 * abs(loss32),
          f"{name}: mmoc-run's first bf16 training step reports loss {fs:.5f} (HF bf16 {lossbf:.5f}, fp32 {loss32:.5f})")


# 1) the HF-written fixture with HF's own batch
ref = load_file(os.path.join(fixture, "hf_reference.safetensors"))
case("fixture", fixture, ref["input_ids"], ref["labels"])

# 2) a larger random LLaMA written by transformers here: GQA, LLaMA-2's vocabulary, 4 layers
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)
mid = os.path.join(work, "llama-mid")
LlamaForCausalLM(cfg).save_pretrained(mid)
ids = torch.randint(0, 32000, (4, 256))
labels = ids.clone()
labels[:, :8] = -100
case("llama-mid", mid, ids, labels)

print(f"{len(failures)} failure(s)")
sys.exit(1 if failures else 0)
