"""mmoc-eval against HF transformers' own logits and loss (the fixtures of tools/scripts/make_hf_fixtures.py, fp32 on the CPU), and
its bad-input handling. Usage: eval_test.py <mmoc-eval> <fixtures dir>. Needs torch and safetensors (the venv)."""
import json, os, subprocess, sys, tempfile

import torch
from safetensors.torch import load_file

EVAL, FIX = sys.argv[1], sys.argv[2]
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def write_rows(ref, path):
    with open(path, "w") as f:
        for ids, lab in zip(ref["input_ids"].tolist(), ref["labels"].tolist()):
            f.write(json.dumps({"input_ids": ids, "labels": lab}) + "\n")


def run(*args):
    return subprocess.run([EVAL, *args], capture_output=True, text=True)


with tempfile.TemporaryDirectory() as tmp:
    for name in ["llama-gqa-fp32", "llama-gqa-bf16", "llama-tied-mha-fp32", "llama-gqa-fp32-sharded"]:
        d = os.path.join(FIX, "hf-tiny", name)
        ref = load_file(os.path.join(d, "hf_reference.safetensors"))
        want_loss = json.load(open(os.path.join(d, "hf_reference.json")))["loss"]
        rows = os.path.join(tmp, name + ".jsonl")
        write_rows(ref, rows)
        out = os.path.join(tmp, name + ".logits.safetensors")
        T = ref["input_ids"].shape[1]
        r = run(d, "--data", rows, "--seq-len", str(T), "--batch", "1", "--logits", out)
        check(r.returncode == 0, f"{name}: mmoc-eval exits 0 ({r.stderr.strip()})")
        if r.returncode != 0:
            continue
        got = load_file(out)["logits"]
        diff = (got - ref["logits"]).abs().max().item()
        check(got.shape == ref["logits"].shape and diff < 1e-4, f"{name}: logits equal HF's (max abs diff {diff:.2e})")
        loss = float(r.stdout.split("loss ")[1].split(",")[0])
        check(abs(loss - want_loss) < 1e-5 * abs(want_loss), f"{name}: loss {loss:.6f} equals HF's {want_loss:.6f}")
        if name == "llama-gqa-fp32":
            # bf16 weights and compute: close to fp32, not equal
            r = run(d, "--data", rows, "--seq-len", str(T), "--precision", "bf16")
            lb = float(r.stdout.split("loss ")[1].split(",")[0]) if r.returncode == 0 else float("nan")
            check(r.returncode == 0 and abs(lb - want_loss) < 0.02 * want_loss, f"{name}: bf16 loss {lb:.5f} within 2% of fp32")
            # a truncated batch and --max-rows
            r = run(d, "--data", rows, "--seq-len", str(T), "--max-rows", "1")
            check(r.returncode == 0 and " 1 rows" in r.stdout, "--max-rows 1 evaluates one row")

    # bad input: exit 2, one line on stderr naming the problem, no logits file written
    d = os.path.join(FIX, "hf-tiny", "llama-gqa-fp32")
    rows = os.path.join(tmp, "llama-gqa-fp32.jsonl")
    out = os.path.join(tmp, "bad.safetensors")
    for args, needle in [((os.path.join(tmp, "nope"), "--data", rows, "--seq-len", "16"), "not a checkpoint folder"),
                         ((d, "--data", os.path.join(tmp, "none.jsonl"), "--seq-len", "16"), "no such file"),
                         ((d, "--data", rows, "--seq-len", "16", "--precision", "fp8"), "--precision"),
                         ((d, "--data", rows, "--seq-len", "16", "--device", "tpu"), "--device"),
                         ((d, "--data", rows, "--seq-len", "1"), "--seq-len"),
                         ((FIX + "/hf-tiny", "--data", rows, "--seq-len", "16"), "config.json")]:
        r = run(*args, "--logits", out)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        check(r.returncode == 2 and len(lines) == 1 and needle in lines[0] and not os.path.exists(out),
              f"bad input {args[-1] if needle.startswith('--') else needle!r}: exit 2, one line ({r.returncode}: {r.stderr.strip()[:120]})")
    # token ids beyond the model's vocabulary
    badrows = os.path.join(tmp, "badvocab.jsonl")
    with open(badrows, "w") as f:
        f.write(json.dumps({"input_ids": list(range(100, 116))}) + "\n")
    r = run(d, "--data", badrows, "--seq-len", "16")
    check(r.returncode == 2 and "vocab" in r.stderr, f"ids >= vocab: exit 2 ({r.stderr.strip()[:120]})")

print(f"{len(failures)} failure(s)")
sys.exit(1 if failures else 0)
