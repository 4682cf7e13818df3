#!/usr/bin/env python3
"""Benchmark peer: PyTorch FSDP2 (fully_shard) with CPUOffloadPolicy, full fine-tuning of an HF causal LM.

    torchrun --nproc_per_node=G bench/peers/fsdp2_offload.py --model llama2-7b --mbs 8 --seq 1024 --microbatches 4 --steps 3

Random init (on the meta device, materialised shard by shard where the parameters live, then HF's own init), every
decoder layer its own FSDP unit and the root another, bf16 compute with fp32 gradient reduction
(MixedPrecisionPolicy), parameters, gradients and optimizer state on the CPU (CPUOffloadPolicy, pinned), activation
checkpointing of every decoder layer (HF gradient checkpointing, non-reentrant), fused CPU AdamW. Each step runs
--microbatches micro-batches of --mbs x --seq random tokens per GPU (labels = inputs), reduces gradients on the last,
then steps. Step 0 is a warm-up; the figures are the median of the --steps timed steps. Rank 0 prints

  RESULT peer=fsdp2 ... step_s=.. tokens_per_s=.. tflops_per_gpu=.. peak_gpu_alloc_gib=.. peak_gpu_reserved_gib=..
         host_rss_gib=.. (sum of the ranks' peak RSS) host_used_peak_gib=.. (peak of the machine's used memory,
         MemTotal - MemAvailable, sampled every 0.2 s; host_used_start_gib: at the start) init_s=..

and a LOSSES line (JSON list: every step's mean loss over micro-batches and ranks).

CPU mode (--device cpu, gloo, no offload policy; tests): with --init real every rank builds the model on the CPU from
--seed and fully_shard shards it, so the losses equal a plain single-process loop (--plain) over the same data;
--precision fp32 keeps the whole run in fp32.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PROG = "fsdp2_offload.py"


def parse(argv=None):
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_job_args(ap)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="compute precision (default bf16)")
    ap.add_argument("--no-offload", dest="offload", action="store_false", help="keep parameters on the GPU (plain FSDP2)")
    ap.add_argument("--no-ckpt", dest="ckpt", action="store_false", help="no activation checkpointing")
    ap.add_argument("--init", default=None, choices=["meta", "real"],
                    help="meta: build on the meta device, materialise the shards (default on CUDA); "
                         "real: every rank builds the whole model from --seed (default on the CPU)")
    ap.add_argument("--plain", action="store_true",
                    help="no FSDP, one process: the reference loop (data of --world ranks per micro-batch)")
    ap.add_argument("--world", type=int, default=None, help="with --plain: the number of ranks whose data to use")
    a = ap.parse_args(argv)
    try:
        common.check_job_args(a)
        if (a.device == "cpu" or a.plain) and a.offload:
            a.offload = False  # CPU: CPUOffloadPolicy would move to the CPU what is already there; plain: no FSDP
        if a.init is None:
            a.init = "meta" if a.device == "cuda" else "real"
        if a.world is not None and not a.plain:
            raise common.UsageError("--world is for --plain (torchrun sets the number of ranks)")
    except common.UsageError as e:
        common.die(PROG, str(e))
    return a


def describe(a, cfg, name, nparams, world):
    return {"peer": "fsdp2", "model": name, "model_type": cfg.model_type, "params": nparams, "world": world,
            "mbs": a.mbs, "seq": a.seq, "microbatches": a.microbatches, "steps": a.steps,
            "tokens_per_step": a.mbs * a.seq * a.microbatches * world, "device": a.device, "offload": a.offload,
            "activation_checkpointing": a.ckpt, "precision": a.precision, "init": a.init, "attn": a.attn,
            "optimizer": "torch.optim.AdamW(fused=True)" + (" on the CPU" if a.offload or a.device == "cpu" else "")}


def main(argv=None):
    a = parse(argv)
    try:
        cfg, name = common.resolve_model(a)
    except common.UsageError as e:
        common.die(PROG, str(e))
    if a.dry_run:
        model = common.meta_model(cfg, a.attn)
        world = int(os.environ.get("WORLD_SIZE", a.world or 1))
        print(json.dumps(describe(a, cfg, name, common.count_params(model), world)))
        return 0

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    t_start = common.now()
    host = common.HostMemSampler()
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        common.die(PROG, "--device cuda but no CUDA device here (use --device cpu)")
    if a.plain:
        rank, world = 0, a.world or 1
        dev = torch.device("cuda" if cuda else "cpu")
    else:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
            dev = torch.device("cuda", torch.cuda.current_device())
        else:
            dev = torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world if not a.plain else 1)))
    cdtype = torch.bfloat16 if a.precision == "bf16" else torch.float32

    common.seed_all(a.seed)
    if a.init == "meta":
        model = common.meta_model(cfg, a.attn)
    else:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=a.attn, dtype=torch.float32)
    nparams = common.count_params(model)
    if a.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if a.plain:
        if a.init == "meta":
            model.to_empty(device=dev)
            common.init_meta_materialised(model)
        model.to(dev)
        if a.precision == "bf16":
            model.to(torch.bfloat16)  # plain reference: bf16 weights (no fp32 master), for smoke runs only
    else:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
        kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=cdtype, reduce_dtype=torch.float32)}
        if a.offload:
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
        for layer in common.decoder_layers(model):
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        if a.init == "meta":
            model.to_empty(device="cpu" if a.offload else dev)
            common.seed_all(a.seed + rank)
            common.init_meta_materialised(model)
        elif not a.offload:
            model.to(dev)
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.is_floating_point() and local.numel() and not bool(torch.isfinite(local).all()):
            print(f"{PROG}: {n} is not finite after initialisation", file=sys.stderr)
            return 1
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    model.train()
    vocab = common.vocab_of(cfg)
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)
    if not a.plain:
        dist.barrier()
    init_s = common.now() - t_start

    times, losses = [], []
    for step in range(a.steps + 1):
        sync()
        t0 = common.now()
        tot = torch.zeros((), dtype=torch.float64)
        for i in range(a.microbatches):
            if not a.plain:
                model.set_requires_gradient_sync(i == a.microbatches - 1)
                x = common.batch(vocab, a.mbs, a.seq, a.seed, step, i, rank, dev)
            else:  # every rank's micro-batch in one
                x = torch.cat([common.batch(vocab, a.mbs, a.seq, a.seed, step, i, r, dev) for r in range(world)])
            loss = model(input_ids=x, labels=x).loss.float() / a.microbatches
            loss.backward()
            tot += loss.detach().double().cpu()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(common.now() - t0)
        if not a.plain:
            dist.all_reduce(tot)
            tot /= world
        losses.append(tot.item())
        if rank == 0:
            print(f"step {step} loss {losses[-1]:.6f} {times[-1]:.3f} s", flush=True)

    st = common.median(times[1:])
    tokens = a.mbs * a.seq * a.microbatches * world
    rss = torch.tensor([float(common.rss_peak_bytes())], dtype=torch.float64)
    rss_max = rss.clone()
    if not a.plain:
        dist.all_reduce(rss)
        dist.all_reduce(rss_max, op=dist.ReduceOp.MAX)
    host_peak = host.stop()
    if rank == 0:
        G = common.GiB
        print(common.result_line(
            "fsdp2" if not a.plain else "plain", model=name, model_type=cfg.model_type, params=nparams, gpus=world, device=a.device,
            mbs=a.mbs, seq=a.seq, microbatches=a.microbatches, offload=int(a.offload), ckpt=int(a.ckpt),
            precision=a.precision, step_s=st, tokens_per_s=tokens / st,
            tflops_per_gpu=6 * nparams * tokens / st / world / 1e12,
            peak_gpu_alloc_gib=torch.cuda.max_memory_allocated() / G if cuda else 0.0,
            peak_gpu_reserved_gib=torch.cuda.max_memory_reserved() / G if cuda else 0.0,
            host_rss_gib=rss.item() / G, host_rss_max_rank_gib=rss_max.item() / G,
            host_used_peak_gib=host_peak / G, host_used_start_gib=host.base / G, init_s=init_s), flush=True)
        print("LOSSES " + json.dumps(losses), flush=True)
    if not a.plain:
        # every rank done with its collectives before any tears gloo down (a rank that leaves early can make a peer's
        # gloo pair abort: SIGABRT after the results were printed)
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
