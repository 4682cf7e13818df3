"""Shared parts of mmoc's benchmark peers (bench/peers/*.py): the job's arguments, the model's HF config from an mmoc
preset or an HF config.json, the data, host memory figures, and the one RESULT line each peer prints.

The model:
  --model NAME          an mmoc preset, configs/models/NAME.json (family llama, mistral, qwen2, qwen3 or gpt2;
                        llama when the preset names none), turned into the family's HF config;
  --model PATH          an HF config.json, or a folder holding one (any model_type transformers' AutoModelForCausalLM
                        knows: Llama-3.x, Qwen2/2.5, Qwen3, Mistral, GPT-2, ...).
  --layers N            overrides the number of decoder layers (e.g. a 16-layer 7B-wide model).
The job: --mbs (micro-batch size per GPU), --seq, --microbatches (per step and GPU; gradient accumulation), --steps
(timed steps; one untimed warm-up step runs first).

Errors in the arguments: one line on stderr naming the problem, exit status 2.
"""
import argparse
import json
import os
import random
import resource
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIGS = os.path.normpath(os.path.join(HERE, "..", "..", "configs", "models"))
GiB = float(1 << 30)


class UsageError(Exception):
    pass


def die(prog, msg):
    print(f"{prog}: {msg}", file=sys.stderr)
    sys.exit(2)


def add_job_args(ap, mbs=8, seq=1024, microbatches=4, steps=3):
    g = ap.add_argument_group("model and job")
    g.add_argument("--model", default="llama2-7b", help="mmoc preset name (configs/models) or HF config.json / folder")
    g.add_argument("--configs", default=DEFAULT_CONFIGS, help="folder of mmoc model presets (default: the repo's)")
    g.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    g.add_argument("--mbs", type=int, default=mbs, help="micro-batch size per GPU (default %(default)s)")
    g.add_argument("--seq", type=int, default=seq, help="sequence length (default %(default)s)")
    g.add_argument("--microbatches", "--accum", dest="microbatches", type=int, default=microbatches,
                   help="micro-batches per step and GPU, gradients accumulated (default %(default)s)")
    g.add_argument("--steps", type=int, default=steps, help="timed steps after one warm-up step (default %(default)s)")
    g.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                   help="HF attention implementation (default %(default)s)")
    g.add_argument("--dry-run", action="store_true",
                   help="resolve the model and the configuration, print them as one JSON line, and exit")
    return g


def check_job_args(a):
    for k in ("mbs", "seq", "microbatches", "steps"):
        if getattr(a, k) < 1:
            raise UsageError(f"--{k} must be >= 1, got {getattr(a, k)}")
    if a.layers is not None and a.layers < 1:
        raise UsageError(f"--layers must be >= 1, got {a.layers}")
    if a.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {a.lr}")


# ---- the model --------------------------------------------------------------------------------------------------
_PRESET_KEYS = {"comment", "name", "family", "layers", "hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab",
                "max_seq", "max_positions", "rope_theta", "norm_eps", "tied_embeddings", "sliding_window",
                "rope_scaling", "qkv_bias", "qk_norm"}


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise UsageError(f"{path}: cannot read {what}: {e.strerror}")
    except ValueError as e:
        raise UsageError(f"{path}: not valid JSON: {e}")


def preset_to_hf(p, origin):
    """mmoc model preset (configs/README.md) -> (model_type, HF config kwargs)."""
    unknown = sorted(set(p) - _PRESET_KEYS)
    if unknown:
        raise UsageError(f"{origin}: unknown key '{unknown[0]}' for a model preset")
    for k in ("layers", "hidden", "ffn", "heads", "vocab"):
        if not isinstance(p.get(k), int):
            raise UsageError(f"{origin}: key '{k}' must be an integer")
    fam = p.get("family", "llama")
    heads = p["heads"]
    kv = p.get("kv_heads", heads)
    max_seq = p.get("max_seq", 4096)
    if fam == "gpt2":
        return "gpt2", dict(n_embd=p["hidden"], n_layer=p["layers"], n_head=heads, n_inner=p["ffn"],
                            vocab_size=p["vocab"], n_positions=p.get("max_positions", max_seq),
                            layer_norm_epsilon=p.get("norm_eps", 1e-5), tie_word_embeddings=True,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if fam not in ("llama", "mistral", "qwen2", "qwen3"):
        raise UsageError(f"{origin}: family '{fam}' is not one of llama, mistral, qwen2, qwen3, gpt2")
    kw = dict(hidden_size=p["hidden"], intermediate_size=p["ffn"], num_hidden_layers=p["layers"],
              num_attention_heads=heads, num_key_value_heads=kv, vocab_size=p["vocab"],
              max_position_embeddings=p.get("max_positions", max_seq), rms_norm_eps=p.get("norm_eps", 1e-5),
              tie_word_embeddings=bool(p.get("tied_embeddings", False)))
    if "head_dim" in p:
        kw["head_dim"] = p["head_dim"]
    rope = {"rope_type": "default", "rope_theta": float(p.get("rope_theta", 10000.0))}
    if isinstance(p.get("rope_scaling"), dict):
        rope.update(p["rope_scaling"])
        rope.setdefault("rope_type", "llama3")
    kw["rope_parameters"] = rope
    if fam == "mistral":
        kw["sliding_window"] = p.get("sliding_window") or None
    if fam in ("qwen2", "qwen3"):
        kw["use_sliding_window"] = False
    return fam, kw


def resolve_model(a):
    """-> (HF config, description). Reads a preset or an HF config.json; applies --layers."""
    m = a.model
    if os.path.isdir(m):
        m = os.path.join(m, "config.json")
    if m.endswith(".json") or os.sep in m:
        j = _read_json(m, "the model config")
        origin = m
    else:
        path = os.path.join(a.configs, m + ".json")
        if not os.path.isfile(path):
            names = sorted(f[:-5] for f in os.listdir(a.configs) if f.endswith(".json")) if os.path.isdir(a.configs) else []
            raise UsageError(f"unknown model '{m}' (presets in {a.configs}: {', '.join(names)}; or give an HF config.json)")
        j = _read_json(path, "the model preset")
        origin = path
    if not isinstance(j, dict):
        raise UsageError(f"{origin}: a model config must be a JSON object")
    if "model_type" in j:  # an HF config.json
        mt = j["model_type"]
        kw = {k: v for k, v in j.items() if k not in ("model_type", "architectures", "transformers_version")}
        name = j.get("_name_or_path") or os.path.basename(os.path.dirname(os.path.abspath(origin)))
    else:
        mt, kw = preset_to_hf(j, origin)
        name = j.get("name", os.path.basename(origin)[:-5])
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.for_model(mt, **kw)
    except (ValueError, KeyError) as e:
        raise UsageError(f"{origin}: transformers does not know model_type '{mt}': {e}")
    if a.layers is not None:
        if hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = a.layers
            if getattr(cfg, "layer_types", None) is not None:
                cfg.layer_types = (list(cfg.layer_types) * a.layers)[: a.layers]
        else:
            cfg.n_layer = a.layers
        name += f"-{a.layers}l"
    maxpos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if maxpos and a.seq > maxpos:
        raise UsageError(f"--seq {a.seq} is longer than the model's {maxpos} positions")
    cfg.use_cache = False
    return cfg, name


def decoder_layers(model):
    """The ModuleList of decoder blocks of an HF causal LM (model.model.layers, transformer.h, ...)."""
    base = model.base_model
    for attr in ("layers", "h", "blocks"):
        if hasattr(base, attr):
            return getattr(base, attr)
    raise UsageError(f"{type(model).__name__}: cannot find its decoder layers")


def meta_model(cfg, attn="sdpa"):
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)


def count_params(model):
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += getattr(p, "ds_numel", None) or p.numel()
    return n


def init_meta_materialised(model):
    """After to_empty(): HF's own init of every parameter and buffer (rotary inv_freq included), shard by shard.
    Where HF's init fails on sharded parameters, a plain one: normal(0, initializer_range) for matrices, 1 for norm
    weights, 0 for biases, and the rotary frequencies recomputed."""
    import torch
    for m in model.modules():
        if hasattr(m, "_is_hf_initialized"):
            m._is_hf_initialized = False
    for t in list(model.parameters()) + list(model.buffers()):
        if hasattr(t, "_is_hf_initialized"):
            t._is_hf_initialized = False
    try:
        model.initialize_weights()
        return
    except Exception as e:  # noqa: BLE001 (any failure of HF's init on DTensors: fall back, say so)
        print(f"peer: HF's init failed on the sharded model ({type(e).__name__}: {e}); plain init instead",
              file=sys.stderr, flush=True)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        for m in model.modules():
            if "RotaryEmbedding" in type(m).__name__ and hasattr(m, "inv_freq"):
                rt = getattr(m, "rope_type", "default")
                fn = m.compute_default_rope_parameters if rt == "default" else ROPE_INIT_FUNCTIONS[rt]
                inv, _ = fn(m.config, m.inv_freq.device)
                m.inv_freq.copy_(inv)
                if hasattr(m, "original_inv_freq"):
                    m.original_inv_freq.copy_(inv)


# ---- data ---------------------------------------------------------------------------------------------------
def batch(vocab, mbs, seq, seed, step, micro, rank, device):
    """Random tokens of one micro-batch of one rank, the same whatever the number of ranks that run it."""
    import torch
    g = torch.Generator().manual_seed(((seed * 1000003 + step) * 10007 + micro) * 1009 + rank)
    return torch.randint(0, vocab, (mbs, seq), generator=g).to(device)


def vocab_of(cfg):
    return cfg.vocab_size


# ---- measurements --------------------------------------------------------------------------------------------
def rss_peak_bytes():
    """Peak resident set size of this process (includes pinned host memory once touched)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class HostMemSampler:
    """Peak of the machine's used host memory (MemTotal - MemAvailable), sampled every `period` s in a thread."""

    def __init__(self, period=0.2):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self.base = self.used()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def used():
        try:
            info = {}
            with open("/proc/meminfo") as f:
                for line in f:
                    k, v = line.split(":", 1)
                    info[k] = int(v.split()[0]) * 1024
            return info["MemTotal"] - info["MemAvailable"]
        except (OSError, KeyError, ValueError):
            return 0

    def _run(self):
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self.used())

    def stop(self):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.used())
        return self.peak


def result_line(peer, **kv):
    """One machine-readable line: RESULT peer=<name> key=value ... (no spaces inside values)."""
    parts = [f"peer={peer}"]
    for k, v in kv.items():
        if isinstance(v, float):
            v = f"{v:.4g}" if abs(v) < 100 else f"{v:.0f}"
        parts.append(f"{k}={str(v).replace(' ', '')}")
    return "RESULT " + " ".join(parts)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def now():
    return time.perf_counter()


def seed_all(seed):
    import torch
    random.seed(seed)
    torch.manual_seed(seed)
