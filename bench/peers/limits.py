#!/usr/bin/env python3
"""The machine's limits for an offloaded fine-tuning job, measured with plain PyTorch and HF (independent of mmoc):

    python3 bench/peers/limits.py --model llama2-7b --mbs 8 --seq 1024 [--device cuda|cpu] [--quick]

  - pinned host <-> GPU bandwidth: H2D, D2H, both at once on two streams; pageable H2D;
  - bf16 matmul rate (N x N x N, N = 8192; CPU mode fp32, N = 1024);
  - one decoder layer of the job's model (the HF family's own layer, built from a 1-layer config) at the job's
    micro-batch x seq: forward, and forward + backward (weights and input gradients), bf16 (CPU: fp32);
  - CPU AdamW: torch.optim.AdamW(fused=True) over --adam-params fp32 parameters, all threads;
  - host memcpy: a --memcpy-mib fp32 buffer copied by torch with all threads (read + write bytes / time).
Every figure is the median of the timed repeats after warm-up. Prints one line per figure and one machine-readable
line: RESULT peer=limits h2d_gbps=.. d2h_gbps=.. duplex_gbps=.. h2d_pageable_gbps=.. matmul_tflops=.. layer_fwd_ms=..
layer_fwdbwd_ms=.. layer_tflops=.. adamw_ms_per_1e8=.. adamw_gbps=.. memcpy_gbps=.. (GB = 1e9 bytes).

mmoc-profile measures the same things through mmoc's own code (engine::stage_forward, mmoc's AdamW) and writes a
hardware file; this script is the peer's view of the same machine.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PROG = "limits.py"


def parse(argv=None):
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_job_args(ap, microbatches=1, steps=1)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="smaller buffers, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10, --quick 3)")
    ap.add_argument("--transfer-mib", type=int, default=None, help="H2D/D2H buffer (default 2048, --quick 256)")
    ap.add_argument("--adam-params", type=float, default=None, help="AdamW size (default 2e8, --quick 2e7)")
    ap.add_argument("--memcpy-mib", type=int, default=None, help="host memcpy buffer (default 2048, --quick 256)")
    a = ap.parse_args(argv)
    q = a.quick
    for k, full, quick in (("repeats", 10, 3), ("transfer_mib", 2048, 256), ("adam_params", 2e8, 2e7), ("memcpy_mib", 2048, 256)):
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)
    a.adam_params = int(a.adam_params)
    try:
        common.check_job_args(a)
        for k in ("repeats", "transfer_mib", "adam_params", "memcpy_mib"):
            if getattr(a, k) < 1:
                raise common.UsageError(f"--{k.replace('_', '-')} must be >= 1")
    except common.UsageError as e:
        common.die(PROG, str(e))
    return a


class Timer:
    def __init__(self, torch, cuda):
        self.torch, self.cuda = torch, cuda

    def __call__(self, fn, repeats, warm=2):
        torch = self.torch
        for _ in range(warm):
            fn()
        ts = []
        for _ in range(repeats):
            if self.cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                ts.append(s.elapsed_time(e) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts)


class _Captured(Exception):
    pass


def layer_inputs(model, ids):
    """The positional and keyword arguments the model passes its first decoder layer (captured by a hook)."""
    got = {}

    def hook(mod, args, kwargs):
        got["args"], got["kwargs"] = args, kwargs
        raise _Captured()  # stop the forward here

    layers = common.decoder_layers(model)
    h = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=ids)
    except _Captured:
        pass
    finally:
        h.remove()
    return layers[0], got["args"], got["kwargs"]


def one_layer(cfg, a, torch, dev, mdt):
    """The job's model with one decoder layer (its config `one`), that layer, and its timed calls: fwd() without
    autograd, fwdbwd() forward and the gradients of its input and weights; fed what the model feeds its first layer
    (a.mbs x a.seq random tokens, a.seed, a.attn). Also used by bench/layer_profile.py."""
    from transformers import AutoModelForCausalLM
    one = cfg.__class__.from_dict(cfg.to_dict())
    if hasattr(one, "num_hidden_layers"):
        one.num_hidden_layers = 1
        if getattr(one, "layer_types", None) is not None:
            one.layer_types = list(one.layer_types)[:1]
    else:
        one.n_layer = 1
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(one, attn_implementation=a.attn, dtype=mdt).to(dev)
    ids = torch.randint(0, cfg.vocab_size, (a.mbs, a.seq), device=dev)
    layer, args, kwargs = layer_inputs(model, ids)
    hidden = args[0] if args else kwargs.pop("hidden_states")
    args = args[1:]
    hidden = hidden.detach().requires_grad_(True)

    def out_of(o):
        return o[0] if isinstance(o, tuple) else o

    def fwd():
        with torch.no_grad():
            out_of(layer(hidden, *args, **kwargs))

    def fwdbwd():
        o = out_of(layer(hidden, *args, **kwargs))
        torch.autograd.grad(o, [hidden] + list(layer.parameters()), torch.ones_like(o))
    return one, layer, fwd, fwdbwd


def main(argv=None):
    a = parse(argv)
    try:
        cfg, name = common.resolve_model(a)
    except common.UsageError as e:
        common.die(PROG, str(e))
    if a.dry_run:
        print(json.dumps({"peer": "limits", "model": name, "model_type": cfg.model_type, "mbs": a.mbs, "seq": a.seq,
                          "device": a.device, "repeats": a.repeats, "transfer_mib": a.transfer_mib,
                          "adam_params": a.adam_params, "memcpy_mib": a.memcpy_mib}))
        return 0
    import torch
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        common.die(PROG, "--device cuda but no CUDA device here (use --device cpu)")
    torch.set_num_threads(os.cpu_count() or 1)
    dev = torch.device("cuda" if cuda else "cpu")
    T = Timer(torch, cuda)
    R = a.repeats
    res = {}
    G = 1e9

    def show(key, value, text):
        res[key] = value
        print(text, flush=True)

    if cuda:
        n = a.transfer_mib << 20
        h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        d = torch.empty(n, dtype=torch.uint8, device=dev)
        h.fill_(1)
        t = T(lambda: d.copy_(h, non_blocking=True), R)
        show("h2d_gbps", n / t / G, f"H2D pinned      {n / t / G:8.1f} GB/s")
        t = T(lambda: h.copy_(d, non_blocking=True), R)
        show("d2h_gbps", n / t / G, f"D2H pinned      {n / t / G:8.1f} GB/s")
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
        h2, d2 = torch.empty_like(h, pin_memory=True), torch.empty_like(d)

        def both():
            cur = torch.cuda.current_stream()
            s1.wait_stream(cur)
            s2.wait_stream(cur)
            with torch.cuda.stream(s1):
                d.copy_(h, non_blocking=True)
            with torch.cuda.stream(s2):
                h2.copy_(d2, non_blocking=True)
            cur.wait_stream(s1)
            cur.wait_stream(s2)
        t = T(both, R)
        show("duplex_gbps", 2 * n / t / G, f"H2D+D2H at once {2 * n / t / G:8.1f} GB/s total")
        hp = torch.empty(n, dtype=torch.uint8)
        hp.fill_(1)
        t = T(lambda: d.copy_(hp), max(1, R // 3), warm=1)
        show("h2d_pageable_gbps", n / t / G, f"H2D pageable    {n / t / G:8.1f} GB/s")
        del h, d, h2, d2, hp
        torch.cuda.empty_cache()

    N = 8192 if cuda else (512 if a.quick else 1024)
    mdt = torch.bfloat16 if cuda else torch.float32
    x = torch.randn(N, N, device=dev, dtype=mdt)
    y = torch.randn(N, N, device=dev, dtype=mdt)
    t = T(lambda: x @ y, R)
    show("matmul_tflops", 2 * N ** 3 / t / 1e12, f"{'bf16' if cuda else 'fp32'} matmul {N}^3 {2 * N ** 3 / t / 1e12:8.1f} TFLOP/s")
    del x, y

    # one decoder layer of the job's model: the family's own HF layer, fed what the model feeds it
    one, layer, fwd, fwdbwd = one_layer(cfg, a, torch, dev, mdt)
    P = sum(p.numel() for p in layer.parameters())
    tf, tfb = T(fwd, R), T(fwdbwd, R)
    tokens = a.mbs * a.seq
    nh = one.num_attention_heads  # GPT2Config maps it to n_head
    hd = getattr(one, "head_dim", None) or one.hidden_size // nh
    flops = 3 * (2 * P * tokens + 2 * a.mbs * a.seq * a.seq * nh * hd)  # fwd + bwd (2x); causal attention half of 4*
    show("layer_params", P, f"decoder layer   {P / 1e6:8.1f} M params ({type(layer).__name__})")
    show("layer_fwd_ms", tf * 1e3, f"layer fwd       {tf * 1e3:8.2f} ms  ({a.mbs}x{a.seq})")
    show("layer_fwdbwd_ms", tfb * 1e3, f"layer fwd+bwd   {tfb * 1e3:8.2f} ms  ({a.mbs}x{a.seq})")
    show("layer_tflops", flops / tfb / 1e12, f"layer fwd+bwd   {flops / tfb / 1e12:8.1f} TFLOP/s")
    del layer, fwd, fwdbwd
    if cuda:
        torch.cuda.empty_cache()

    # CPU AdamW, fused, all threads
    p = torch.zeros(a.adam_params, dtype=torch.float32, requires_grad=True)
    p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW([p], lr=1e-5, fused=True)
    t = T(opt.step, max(1, R // 2), warm=1)
    # bytes touched: param, grad, exp_avg, exp_avg_sq read + param, exp_avg, exp_avg_sq written (fp32)
    show("adamw_ms_per_1e8", t * 1e3 * 1e8 / a.adam_params,
         f"CPU AdamW fused {t * 1e3 * 1e8 / a.adam_params:8.1f} ms per 1e8 params ({torch.get_num_threads()} threads)")
    show("adamw_gbps", 28 * a.adam_params / t / G, f"CPU AdamW fused {28 * a.adam_params / t / G:8.1f} GB/s (28 bytes per param)")
    del p, opt

    n = (a.memcpy_mib << 20) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = T(lambda: dst.copy_(src), R)
    show("memcpy_gbps", 2 * 4 * n / t / G, f"host memcpy     {2 * 4 * n / t / G:8.1f} GB/s (read + write)")
    print(common.result_line("limits", model=name, device=a.device, mbs=a.mbs, seq=a.seq, **res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
