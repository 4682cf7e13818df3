#!/usr/bin/env python3
"""Writes mmoc's HF test fixtures: tiny random checkpoints saved by transformers itself, with HF's own results.

    make_hf_fixtures.py OUT_DIR [--only NAME ...] [--force]
    make_hf_fixtures.py --list

For every fixture, OUT_DIR/hf-tiny/<name>/ holds what `save_pretrained` wrote (config.json, model.safetensors or
shards + model.safetensors.index.json, generation_config.json) and HF's results on one fixed batch, computed on the
CPU in fp32 from the checkpoint as reloaded from disk (weights upcast to fp32), in train mode with dropout 0:
  hf_reference.safetensors  input_ids [B,T] int64, labels [B,T] int64 (the first `ignored_prefix` positions of each
                            row are -100, the rest equal input_ids), logits [B,T,V] fp32, grad.<param> for every
                            parameter after loss.backward(), after_adamw.<param> every parameter after one
                            torch.optim.AdamW step (one parameter group, weight decay on every parameter);
  hf_reference.json         loss (mean next-token cross-entropy over labels != -100; HF shifts the labels inside),
                            AdamW hyper-parameters, attention implementation, seed, batch shape, versions, and what
                            the family's checks found (see below).
<param> names are those of `named_parameters()` (a tied lm_head appears once, as the embedding).

Each fixture's weights come from its own seed (torch CPU RNG), so the output is the same on every run on one machine
(torch runs single-threaded here). Beyond HF's init (normal(0, initializer_range), norms 1, biases 0), every norm
weight and bias is randomised (1 + 0.1 N(0,1), 0.1 N(0,1)) so a missing or misplaced norm or bias changes the result.

The script checks what each fixture must show and stops (exit 1) when one does not hold:
  - every fixture: the reloaded checkpoint gives the logits of the model that was saved; "sdpa" gives the "eager"
    logits (the references use "eager");
  - llama3: rope_type llama3 leaves some frequencies as they are, smooths some and divides some by `factor`;
  - mistral: the sliding window is shorter than T and changes the logits (against the same weights, window off);
  - qwen2: q/k/v carry a bias, o_proj none; qwen3: q_norm/k_norm present, head_dim != hidden/heads;
  - gpt2: Conv1D weights ([in, out]), tied head;
  - sharded / bf16 / legacy-names variants: the same weights as the fixture they derive from.

OUT_DIR gets a `.complete` stamp last, holding the script's hash; when it is there and matches, the script exits at
once (the build runs it on every build). It is written under a temporary name and renamed, so a concurrent run
or an interrupted one never leaves a half-written OUT_DIR. Exit status: 0 done, 1 a check failed, 2 bad usage /
transformers missing.

The build generates them (CMake target `mmoc_hf_fixtures`, ctest fixture `fixtures.hf`) into
~/.cache/mmoc/fixtures/hf-<hash of this script and of the torch/transformers pins>; see tests/README.md.
"""
import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import time

ROOT_SUB = "hf-tiny"
SCRIPT_HASH = hashlib.sha256(open(os.path.abspath(__file__), "rb").read()).hexdigest()

# One fixed AdamW step, the same for every fixture.
ADAMW = {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "steps": 1}
ATTN = "eager"
IGNORED_PREFIX = 5  # labels: the first 5 positions of every row are -100

_LLAMA_GQA = dict(initializer_range=0.1, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=101, max_position_embeddings=64, rms_norm_eps=1e-6,
                  rope_theta=10000.0, bos_token_id=1, eos_token_id=2, head_dim=16)
_LLAMA3 = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, vocab_size=113, max_position_embeddings=8192, rms_norm_eps=1e-5,
               bos_token_id=1, eos_token_id=2, initializer_range=0.1,
               # head_dim 32: wavelengths 2*pi*500000^(i/16), i = 0..15: 6.3, 14, 32, 74, 167, 380, 862, 1958, ...
               # With original context 1024, low_freq_factor 1, high_freq_factor 4: 5 below 256 kept, 380 and 862
               # smoothed, 9 above 1024 divided by factor 8.
               rope_scaling={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})
_QWEN2 = dict(initializer_range=0.1, hidden_size=64, intermediate_size=144, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=107, max_position_embeddings=128, rms_norm_eps=1e-6,
              rope_theta=1000000.0, bos_token_id=1, eos_token_id=2, use_sliding_window=False)
_QWEN3 = dict(initializer_range=0.1, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=24, vocab_size=103, max_position_embeddings=128, rms_norm_eps=1e-6,
              rope_theta=1000000.0, bos_token_id=1, eos_token_id=2, attention_bias=False, use_sliding_window=False)
_MISTRAL = dict(initializer_range=0.1, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=109, max_position_embeddings=128, rms_norm_eps=1e-5,
                rope_theta=10000.0, bos_token_id=1, eos_token_id=2, sliding_window=7)
_GPT2 = dict(initializer_range=0.1, n_embd=64, n_layer=3, n_head=4, n_positions=64, vocab_size=97, activation_function="gelu_new",
             layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
             eos_token_id=2, tie_word_embeddings=True)

# name -> spec. base: the fixture whose weights this one re-saves (other dtype / shards / names).
# B, T: the reference batch. Names, folders and keys are stable: tests and other branches use them.
FIXTURES = {
    # LLaMA-2 style (the shapes of the fixtures mmoc's tests were written against)
    "llama-gqa-fp32": dict(cls="LlamaForCausalLM", cfg="LlamaConfig", config=dict(_LLAMA_GQA, tie_word_embeddings=False),
                           seed=1, B=2, T=16),
    "llama-gqa-fp32-sharded": dict(base="llama-gqa-fp32", shard="48KB"),
    "llama-gqa-bf16": dict(base="llama-gqa-fp32", dtype="bfloat16"),
    "llama-tied-mha-fp32": dict(cls="LlamaForCausalLM", cfg="LlamaConfig",
                                config=dict(_LLAMA_GQA, num_key_value_heads=4, tie_word_embeddings=True), seed=2, B=2, T=16),
    # Llama-3.x: rope_type llama3, GQA; Llama-3.2 style tied head
    "llama3-gqa-fp32": dict(cls="LlamaForCausalLM", cfg="LlamaConfig", config=dict(_LLAMA3, tie_word_embeddings=False),
                            seed=3, B=2, T=24),
    "llama3-tied-fp32": dict(cls="LlamaForCausalLM", cfg="LlamaConfig", config=dict(_LLAMA3, tie_word_embeddings=True),
                             seed=4, B=2, T=24),
    # Qwen2 / Qwen2.5: bias on q/k/v
    "qwen2-fp32": dict(cls="Qwen2ForCausalLM", cfg="Qwen2Config", config=dict(_QWEN2, tie_word_embeddings=False),
                       seed=5, B=2, T=24),
    "qwen2-fp32-sharded": dict(base="qwen2-fp32", shard="40KB"),
    "qwen2-tied-fp32": dict(cls="Qwen2ForCausalLM", cfg="Qwen2Config", config=dict(_QWEN2, tie_word_embeddings=True),
                            seed=6, B=2, T=24),
    # Qwen3: q_norm / k_norm, head_dim 24 != 64 / 4
    "qwen3-fp32": dict(cls="Qwen3ForCausalLM", cfg="Qwen3Config", config=dict(_QWEN3, tie_word_embeddings=False),
                       seed=7, B=2, T=24),
    "qwen3-tied-fp32": dict(cls="Qwen3ForCausalLM", cfg="Qwen3Config", config=dict(_QWEN3, tie_word_embeddings=True),
                            seed=8, B=2, T=24),
    # Mistral: sliding window 7 over T = 32
    "mistral-fp32": dict(cls="MistralForCausalLM", cfg="MistralConfig", config=dict(_MISTRAL, tie_word_embeddings=False),
                         seed=9, B=2, T=32),
    # GPT-2: learned positions, LayerNorm with bias, GELU (tanh) MLP, Conv1D weights, tied head
    "gpt2-fp32": dict(cls="GPT2LMHeadModel", cfg="GPT2Config", config=_GPT2, seed=10, B=2, T=24),
    # the same weights under the names of the GPT-2 files on the Hub (no "transformer." prefix), one file
    "gpt2-legacy-names-fp32": dict(base="gpt2-fp32", strip_prefix="transformer."),
}


def fail(msg, code=1):
    print(f"make_hf_fixtures: {msg}", file=sys.stderr)
    sys.exit(code)


def stamp_ok(out):
    try:
        with open(os.path.join(out, ".complete")) as f:
            st = json.load(f)
    except (OSError, ValueError):
        return False
    if st.get("script_sha256") != SCRIPT_HASH:
        return False
    return all(os.path.isfile(os.path.join(out, ROOT_SUB, n, "hf_reference.json")) for n in st.get("fixtures", []))


def covers(out, names):
    """OUT_DIR is complete for this script and holds every fixture in names."""
    if not stamp_ok(out):
        return False
    with open(os.path.join(out, ".complete")) as f:
        return set(names) <= set(json.load(f)["fixtures"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="output folder (gets hf-tiny/<name>/ and .complete)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these fixtures (and the ones they derive from)")
    ap.add_argument("--force", action="store_true", help="regenerate even when OUT_DIR is complete")
    ap.add_argument("--list", action="store_true", help="print the fixture names and exit")
    a = ap.parse_args()
    if a.list:
        print("\n".join(FIXTURES))
        return 0
    if not a.out:
        ap.error("OUT_DIR is required")
    out = os.path.abspath(a.out)
    names = list(FIXTURES)
    if a.only:
        bad = [n for n in a.only if n not in FIXTURES]
        if bad:
            fail(f"unknown fixture {', '.join(bad)} (known: {', '.join(FIXTURES)})", 2)
        want = set()
        for n in a.only:
            while n:
                want.add(n)
                n = FIXTURES[n].get("base")
        names = [n for n in FIXTURES if n in want]
    if not a.force and covers(out, names):
        return 0

    try:
        import torch
        import transformers
        from safetensors.torch import load_file, save_file
    except ImportError as e:
        fail(f"needs torch, transformers and safetensors (the venv of tools/setup.sh): {e}", 2)

    t0 = time.time()
    parent = os.path.dirname(out) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, ROOT_SUB))
    try:
        gen = Generator(torch, transformers, load_file, save_file, os.path.join(tmp, ROOT_SUB))
        for n in names:
            t1 = time.time()
            gen.make(n)
            print(f"make_hf_fixtures: {n} ({time.time() - t1:.1f} s)", file=sys.stderr)
        with open(os.path.join(tmp, ".complete"), "w") as f:
            json.dump({"script_sha256": SCRIPT_HASH, "fixtures": names, "transformers": transformers.__version__,
                       "torch": torch.__version__}, f, indent=1)
        if os.path.exists(out) and not a.force and covers(out, names):
            pass  # another run finished first with the same result: keep its folder (it may be in use)
        else:
            if os.path.exists(out):
                # --force, an older or partial set: replace it (rename the old one away first, then remove it)
                old = f"{out}.old-{os.getpid()}"
                os.rename(out, old)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(tmp, out)
            except OSError:
                if not covers(out, names):  # lost a race to another run: fine when it made the same set
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"make_hf_fixtures: {len(names)} fixtures in {out}/{ROOT_SUB} ({time.time() - t0:.1f} s)", file=sys.stderr)
    return 0


class Generator:
    def __init__(self, torch, transformers, load_file, save_file, root):
        self.torch, self.tf, self.load_file, self.save_file, self.root = torch, transformers, load_file, save_file, root
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        self.made = {}  # name -> (the model as saved, spec)

    # ---- building and checking -------------------------------------------------------------------------------
    def new_model(self, spec):
        torch, tf = self.torch, self.tf
        cfg = getattr(tf, spec["cfg"])(**spec["config"])
        torch.manual_seed(spec["seed"])
        model = getattr(tf, spec["cls"])._from_config(cfg, attn_implementation=ATTN, dtype=torch.float32)
        with torch.no_grad():
            for n, p in model.named_parameters():
                leaf = n.rsplit(".", 1)[-1]
                if leaf == "bias":
                    p.copy_(0.1 * torch.randn_like(p))
                elif p.dim() == 1:  # norm weights (RMSNorm, LayerNorm, q_norm / k_norm)
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
        return model

    def load(self, folder, attn=ATTN, **cfg_overrides):
        tf = self.tf
        m = tf.AutoModelForCausalLM.from_pretrained(folder, dtype="auto", attn_implementation=attn, **cfg_overrides)
        return m.float()

    def logits(self, model, ids):
        with self.torch.no_grad():
            model.eval()
            return model(input_ids=ids).logits.float()

    def batch(self, spec, vocab):
        torch = self.torch
        g = torch.Generator().manual_seed(1000 + spec["seed"])
        ids = torch.randint(0, vocab, (spec["B"], spec["T"]), generator=g, dtype=torch.int64)
        labels = ids.clone()
        labels[:, :IGNORED_PREFIX] = -100
        return ids, labels

    def check(self, ok, what):
        if not ok:
            fail(f"check failed: {what}")
        return what

    def make(self, name):
        spec = dict(FIXTURES[name])
        d = os.path.join(self.root, name)
        torch = self.torch
        notes = []
        if "base" in spec:
            base_model, base_spec = self.made[spec["base"]]
            full = dict(base_spec, **{k: v for k, v in spec.items() if k != "base"})
            model = copy.deepcopy(base_model)
            dtype = spec.get("dtype", "float32")
            if dtype != "float32":
                with torch.no_grad():  # fp32 weights rounded to the stored dtype (buffers such as inv_freq stay fp32)
                    for p in model.parameters():
                        p.copy_(p.to(getattr(torch, dtype)).float())
                copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(d, max_shard_size=spec.get("shard", "50GB"))
            else:
                model.save_pretrained(d, max_shard_size=spec.get("shard", "50GB"))
            if "strip_prefix" in spec:
                self.strip_prefix(d, spec["strip_prefix"])
                notes.append(f"tensor names without the '{spec['strip_prefix']}' prefix (as in the Hub's GPT-2 files)")
            spec = full
            notes.append(f"the weights of {FIXTURES[name]['base']}" + (f", stored in {dtype}" if dtype != "float32" else "")
                         + (f", in shards of at most {spec['shard']}" if "shard" in FIXTURES[name] else ""))
        else:
            model = self.new_model(spec)
            model.save_pretrained(d)
        vocab = model.config.vocab_size
        ids, labels = self.batch(spec, vocab)
        want = self.logits(model, ids)

        # reload from disk: the reference is what HF computes from the files
        ref_model = self.load(d)
        got = self.logits(ref_model, ids)
        self.check(torch.equal(got, want), f"{name}: the reloaded checkpoint gives the saved model's logits")
        sdpa = self.logits(self.load(d, attn="sdpa"), ids)
        diff = (sdpa - got).abs().max().item()
        self.check(diff < 1e-4, f"{name}: sdpa logits equal eager ones (max |diff| {diff:.2e})")
        notes.extend(self.family_checks(name, spec, d, ref_model, ids, got))

        # the reference: train mode (dropout is 0), loss, gradients, one AdamW step
        ref_model.train()
        out = ref_model(input_ids=ids, labels=labels)
        out.loss.backward()
        params = list(ref_model.named_parameters())
        tensors = {"input_ids": ids, "labels": labels, "logits": out.logits.detach().float().contiguous()}
        for n, p in params:
            self.check(p.grad is not None, f"{name}: {n} has a gradient")
            tensors["grad." + n] = p.grad.detach().float().contiguous().clone()
        opt = torch.optim.AdamW([p for _, p in params], lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]), eps=ADAMW["eps"],
                                weight_decay=ADAMW["weight_decay"], foreach=False, fused=False)
        opt.step()
        for n, p in params:
            tensors["after_adamw." + n] = p.detach().float().contiguous().clone()
        self.save_file(tensors, os.path.join(d, "hf_reference.safetensors"))
        cfg = ref_model.config
        info = {
            "loss": out.loss.item(),
            "loss_definition": "mean next-token cross-entropy over labels != -100 (HF shifts labels inside)",
            "adamw": ADAMW,
            "adamw_param_groups": "one group: every parameter, weight decay on all of them",
            "weights_dtype_on_disk": f"torch.{spec.get('dtype', 'float32')}",
            "model_type": cfg.model_type,
            "architecture": type(ref_model).__name__,
            "attn_implementation": ATTN,
            "mode": "train() with every dropout 0; CPU, fp32 (weights as stored, upcast), 1 thread",
            "seed": spec["seed"],
            "batch": {"B": spec["B"], "T": spec["T"], "ignored_prefix": IGNORED_PREFIX,
                      "labels": "input_ids with the first ignored_prefix positions of each row set to -100"},
            "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
            "num_parameters": sum(p.numel() for _, p in params),
            "parameters": [n for n, _ in params],
            "notes": notes,
            "generated_by": "tools/scripts/make_hf_fixtures.py",
            "script_sha256": SCRIPT_HASH,
            "transformers": self.tf.__version__,
            "torch": torch.__version__,
        }
        with open(os.path.join(d, "hf_reference.json"), "w") as f:
            json.dump(info, f, indent=1)
            f.write("\n")
        self.made[name] = (model, spec)

    def strip_prefix(self, d, prefix):
        path = os.path.join(d, "model.safetensors")
        sd = self.load_file(path)
        self.check(all(k.startswith(prefix) for k in sd), f"every tensor of {path} starts with {prefix}")
        self.save_file({k[len(prefix):]: v for k, v in sd.items()}, path, metadata={"format": "pt"})

    def family_checks(self, name, spec, d, model, ids, logits):
        torch = self.torch
        cfg = model.config
        notes = []
        sd_names = [n for n, _ in model.named_parameters()]
        if cfg.model_type == "llama" and cfg.rope_parameters.get("rope_type") == "llama3":
            rp = cfg.rope_parameters
            inv = model.model.rotary_emb.inv_freq.double()
            hd = cfg.head_dim
            base = 1.0 / (rp["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
            wl = 2 * torch.pi / base
            lo, hi = rp["original_max_position_embeddings"] / rp["low_freq_factor"], rp["original_max_position_embeddings"] / rp["high_freq_factor"]
            kept = int(((inv - base).abs() <= 1e-6 * base).sum())
            scaled = int(((inv - base / rp["factor"]).abs() <= 1e-6 * base).sum())
            smooth = len(inv) - kept - scaled
            self.check(kept > 0 and scaled > 0 and smooth > 0,
                       f"{name}: llama3 rope keeps, smooths and scales frequencies (kept {kept}, smoothed {smooth}, scaled {scaled})")
            self.check(int((wl < hi).sum()) == kept and int((wl > lo).sum()) == scaled, f"{name}: llama3 wavelength bands")
            notes.append(f"rope llama3: of {len(inv)} frequencies {kept} kept (wavelength < {hi:g}), {smooth} smoothed, "
                         f"{scaled} divided by factor {rp['factor']:g} (wavelength > {lo:g})")
        if cfg.model_type == "mistral":
            T = ids.shape[1]
            W = cfg.sliding_window
            self.check(W is not None and W < T, f"{name}: sliding_window {W} < T {T}")
            full = self.logits(self.load(d, sliding_window=None), ids)
            diff = (full - logits).abs().max().item()
            self.check(diff > 1e-3, f"{name}: the sliding window changes the logits (max |diff| {diff:.3g} against no window)")
            # positions < W see the same keys with and without the window
            early = (full[:, :W] - logits[:, :W]).abs().max().item()
            self.check(early < 1e-5, f"{name}: positions < window unchanged ({early:.2e})")
            notes.append(f"sliding_window {W} < T {T}: query i attends keys j with i - {W} < j <= i "
                         f"(HF's mask: kv_idx > q_idx - sliding_window); without the window the logits differ by "
                         f"up to {diff:.3g}, positions < {W} by {early:.1g}")
        if cfg.model_type == "qwen2":
            self.check(all(f"model.layers.0.self_attn.{p}_proj.bias" in sd_names for p in "qkv")
                       and "model.layers.0.self_attn.o_proj.bias" not in sd_names, f"{name}: qwen2 q/k/v bias, no o bias")
            notes.append("bias on q_proj, k_proj, v_proj; none on o_proj or the MLP")
        if cfg.model_type == "qwen3":
            self.check("model.layers.0.self_attn.q_norm.weight" in sd_names and "model.layers.0.self_attn.k_norm.weight" in sd_names,
                       f"{name}: qwen3 q_norm / k_norm")
            self.check(cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size, f"{name}: head_dim independent of hidden/heads")
            notes.append(f"q_norm / k_norm: RMSNorm over head_dim {cfg.head_dim} per head, before rope; "
                         f"heads x head_dim = {cfg.num_attention_heads * cfg.head_dim} != hidden {cfg.hidden_size}")
        if cfg.model_type == "gpt2":
            w = dict(model.named_parameters())["transformer.h.0.attn.c_attn.weight"]
            self.check(list(w.shape) == [cfg.n_embd, 3 * cfg.n_embd], f"{name}: Conv1D c_attn weight is [in, out]")
            self.check(model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), f"{name}: tied head")
            notes.append(f"Conv1D weights are [in, out] (y = x W + b); activation {cfg.activation_function}; "
                         f"learned positions wpe [{cfg.n_positions}, {cfg.n_embd}]; lm_head tied to transformer.wte")
        if getattr(cfg, "tie_word_embeddings", False):
            emb = model.get_input_embeddings().weight
            self.check(model.get_output_embeddings().weight.data_ptr() == emb.data_ptr(), f"{name}: head tied to the embedding")
        return notes


if __name__ == "__main__":
    sys.exit(main())
