#!/usr/bin/env python3
"""Check that HF transformers loads a checkpoint folder written by mmoc and computes the expected logits.

    hf_check_load.py CKPT_DIR --reference hf_reference.safetensors [--atol 1e-4] [--device cpu|cuda]

Loads CKPT_DIR with transformers' AutoModelForCausalLM (any family mmoc writes; weights upcast to fp32), runs the reference file's
`input_ids` (and `labels`, when present, for the loss), and compares the logits with the reference's `logits`
(and the loss with --loss if given). Exit status: 0 match, 1 mismatch, 2 bad input / transformers missing.
"""
import argparse
import json
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="checkpoint folder written by mmoc (config.json + model.safetensors[.index.json])")
    ap.add_argument("--reference", required=True, help="safetensors file with input_ids [B,T] and logits [B,T,V]")
    ap.add_argument("--atol", type=float, default=1e-4, help="max abs logits difference (default 1e-4)")
    ap.add_argument("--loss", type=float, default=None, help="expected mean loss (e.g. hf_reference.json's)")
    ap.add_argument("--loss-tol", type=float, default=1e-4, help="relative loss tolerance")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    try:
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        print(f"hf_check_load: needs torch, safetensors and transformers: {e}", file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(args.ckpt, "config.json")):
        print(f"hf_check_load: {args.ckpt}: no config.json", file=sys.stderr)
        return 2
    try:
        ref = load_file(args.reference)
    except Exception as e:  # noqa: BLE001
        print(f"hf_check_load: {args.reference}: {e}", file=sys.stderr)
        return 2
    for k in ("input_ids", "logits"):
        if k not in ref:
            print(f"hf_check_load: {args.reference}: no '{k}' tensor", file=sys.stderr)
            return 2

    # Load as stored, then upcast (the fixtures' references are computed that way).
    model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype="auto").float().to(args.device).eval()
    with open(os.path.join(args.ckpt, "config.json")) as f:
        cfg = json.load(f)
    ids = ref["input_ids"].to(args.device)
    labels = ref["labels"].to(args.device) if "labels" in ref else None
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    diff = (out.logits.float().cpu() - ref["logits"].float()).abs().max().item()
    ok = diff <= args.atol
    msg = f"{args.ckpt}: dtype={cfg.get('dtype', cfg.get('torch_dtype'))} logits max|diff|={diff:.3g} (atol {args.atol:g})"
    if args.loss is not None and out.loss is not None:
        rel = abs(out.loss.item() - args.loss) / max(abs(args.loss), 1e-12)
        msg += f" loss={out.loss.item():.7g} vs {args.loss:.7g} (rel {rel:.2g})"
        ok = ok and rel <= args.loss_tol
    print(("OK " if ok else "MISMATCH ") + msg)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
