#!/usr/bin/env python3
"""Benchmark peer: DeepSpeed ZeRO-Offload (stage 2: optimizer state and step on the CPU) and ZeRO-Infinity (stage 3:
parameters and optimizer offloaded to the CPU, or with --nvme PATH to NVMe), full fine-tuning of an HF causal LM.

    torchrun --nproc_per_node=G bench/peers/ds_offload.py --stage 2 --model llama2-7b --mbs 8 --seq 1024 --microbatches 4 --steps 3
    torchrun --nproc_per_node=G bench/peers/ds_offload.py --stage 3 [--nvme /path/on/nvme] ...

Random init, HF's (stage 3: transformers' ZeRO-3 path, inside deepspeed.zero.Init, so each rank only holds its
partition, then HF's init module by module on the gathered parameters; stage 2: built on the
GPU, DeepSpeed keeps the bf16 copy there and the fp32 master on the CPU), bf16, activation checkpointing of every
decoder layer (HF gradient checkpointing), DeepSpeed's CPU AdamW (DeepSpeedCPUAdam, adamw mode). Each step runs
--microbatches micro-batches per GPU (gradient_accumulation_steps) of random tokens (labels = inputs). Step 0 is a
warm-up; the figures are the median of the --steps timed steps. Rank 0 prints one line

  RESULT peer=deepspeed stage=.. offload=cpu|nvme ... step_s=.. tokens_per_s=.. tflops_per_gpu=..
         peak_gpu_alloc_gib=.. peak_gpu_reserved_gib=.. host_rss_gib=.. host_used_peak_gib=.. init_s=..

and a LOSSES line. --dry-run prints the model and the DeepSpeed configuration as JSON without importing DeepSpeed.
DeepSpeed 0.19.8 is installed offline on the GPU machine by bench/gpu_bench.sh from bench/peers/fetch_wheels.sh's
files (bench/README.md); its CPU Adam and async I/O ops are JIT-built on first use (ninja, the CUDA toolkit, libaio).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PROG = "ds_offload.py"


def parse(argv=None):
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_job_args(ap)
    ap.add_argument("--stage", type=int, default=2, choices=[2, 3], help="ZeRO stage (default 2)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a smoke run with DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) and gloo")
    ap.add_argument("--nvme", default="", metavar="PATH",
                    help="stage 3 only: offload parameters and optimizer state to NVMe swap files in PATH (a folder)")
    ap.add_argument("--no-ckpt", dest="ckpt", action="store_false", help="no activation checkpointing")
    ap.add_argument("--aio-threads", type=int, default=4, help="with --nvme: libaio thread count (default 4)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # deepspeed launcher
    a = ap.parse_args(argv)
    try:
        common.check_job_args(a)
        if a.nvme:
            if a.stage != 3:
                raise common.UsageError("--nvme needs --stage 3 (ZeRO-Infinity offloads parameters only in stage 3)")
            if not os.path.isdir(a.nvme):
                raise common.UsageError(f"--nvme {a.nvme}: not a folder")
            if not os.access(a.nvme, os.W_OK):
                raise common.UsageError(f"--nvme {a.nvme}: not writable")
        if a.aio_threads < 1:
            raise common.UsageError(f"--aio-threads must be >= 1, got {a.aio_threads}")
    except common.UsageError as e:
        common.die(PROG, str(e))
    return a


def ds_config(a, largest_param):
    """The DeepSpeed configuration of the job. largest_param: the largest parameter's element count (NVMe buffers
    must hold it)."""
    pin = a.device == "cuda"
    dev = {"device": "nvme", "nvme_path": os.path.abspath(a.nvme), "pin_memory": pin} if a.nvme else \
          {"device": "cpu", "pin_memory": pin}
    zero = {"stage": a.stage, "offload_optimizer": dict(dev), "overlap_comm": True, "contiguous_gradients": True,
            "reduce_bucket_size": 5e8}
    if a.stage == 2:
        zero.update({"allgather_bucket_size": 5e8})
    else:
        zero["offload_param"] = dict(dev)
        zero.update({"stage3_max_live_parameters": 1e9, "stage3_prefetch_bucket_size": 5e8,
                     "stage3_param_persistence_threshold": 1e6, "sub_group_size": 1e9})
    cfg = {"train_micro_batch_size_per_gpu": a.mbs, "gradient_accumulation_steps": a.microbatches,
           "bf16": {"enabled": True}, "zero_optimization": zero, "gradient_clipping": 0.0,
           "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
           "optimizer": {"type": "AdamW", "params": {"lr": a.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}}}
    if a.nvme:
        # every parameter swapped in occupies one buffer until it is released: the live and prefetched parameters
        # (up to stage3_max_live_parameters elements, a LLaMA layer's 7 matrices are 16.8-45.1M each) need that many
        # buffers, or DeepSpeed stops with "Not enough swap in buffers" (5, its default, failed on LLaMA-2-7B's shape)
        # Prefetch off: with it, DeepSpeed 0.19.8's NVMe parameter prefetch swaps in a parameter that already holds a
        # buffer ("param 59 already assigned swap buffer id 21", nvidia-h200, 2026-12-02; the same stack as
        # deepspeedai/Megatron-DeepSpeed#196), so ZeRO-Infinity runs here without parameter prefetch
        zero.update({"stage3_max_live_parameters": 3e8, "stage3_prefetch_bucket_size": 0})
        zero["offload_param"].update({"buffer_count": 32, "buffer_size": int(max(1e8, largest_param))})
        zero["offload_optimizer"].update({"buffer_count": 4, "fast_init": False})
        cfg["aio"] = {"block_size": 1 << 20, "queue_depth": 16, "thread_count": a.aio_threads,
                      "single_submit": False, "overlap_events": True}
    return cfg


def main(argv=None):
    a = parse(argv)
    try:
        cfg, name = common.resolve_model(a)
    except common.UsageError as e:
        common.die(PROG, str(e))
    meta = common.meta_model(cfg, a.attn)
    nparams = common.count_params(meta)
    largest = max(p.numel() for p in meta.parameters())
    del meta
    dsc = ds_config(a, largest)
    if a.dry_run:
        world = int(os.environ.get("WORLD_SIZE", 1))
        print(json.dumps({"peer": "deepspeed", "model": name, "model_type": cfg.model_type, "params": nparams,
                          "world": world, "mbs": a.mbs, "seq": a.seq, "microbatches": a.microbatches, "steps": a.steps,
                          "tokens_per_step": a.mbs * a.seq * a.microbatches * world, "stage": a.stage,
                          "offload": "nvme" if a.nvme else "cpu", "activation_checkpointing": a.ckpt, "attn": a.attn,
                          "deepspeed_config": dsc}))
        return 0

    import torch
    import torch.distributed as dist
    try:
        import deepspeed
    except ImportError as e:
        print(f"{PROG}: DeepSpeed is not installed ({e}); on the GPU machine bench/gpu_bench.sh installs it from "
              f".carry/ (bench/peers/fetch_wheels.sh)", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM

    t_start = common.now()
    host = common.HostMemSampler()
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        common.die(PROG, "--device cuda but no CUDA device here")
    if cuda:
        deepspeed.init_distributed()
    else:
        deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    common.seed_all(a.seed)
    if a.stage == 3:
        # what transformers does under ZeRO-3 (its HfDeepSpeedConfig path needs `accelerate`): built inside
        # deepspeed.zero.Init without init, then HF's init module by module on the gathered parameters (a bare
        # zero.Init context would leave torch's default init, N(0, 1) embeddings: a loss near 60 for a tied head)
        from transformers.initialization import no_init_weights
        from transformers.integrations.deepspeed import initialize_weights_zero3
        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=dsc):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=a.attn, dtype=torch.float32)
        initialize_weights_zero3(model)
        model.tie_weights()
    else:
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=a.attn, dtype=torch.float32)
    if a.ckpt:
        model.gradient_checkpointing_enable()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=dsc)
    engine.train()
    vocab = common.vocab_of(cfg)
    dist.barrier()
    init_s = common.now() - t_start

    times, losses = [], []
    for step in range(a.steps + 1):
        sync()
        t0 = common.now()
        tot = torch.zeros((), dtype=torch.float64, device=dev)
        for i in range(a.microbatches):
            x = common.batch(vocab, a.mbs, a.seq, a.seed, step, i, rank, dev)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()  # an optimizer step at the accumulation boundary only
            tot += loss.detach().double() / a.microbatches
        sync()
        times.append(common.now() - t0)
        dist.all_reduce(tot)
        losses.append(tot.item() / world)
        if rank == 0:
            print(f"step {step} loss {losses[-1]:.6f} {times[-1]:.3f} s", flush=True)

    st = common.median(times[1:])
    tokens = a.mbs * a.seq * a.microbatches * world
    rss = torch.tensor([float(common.rss_peak_bytes())], dtype=torch.float64, device=dev)
    rss_max = rss.clone()
    dist.all_reduce(rss)
    dist.all_reduce(rss_max, op=dist.ReduceOp.MAX)
    host_peak = host.stop()
    if rank == 0:
        G = common.GiB
        print(common.result_line(
            "deepspeed", stage=a.stage, offload="nvme" if a.nvme else "cpu", device=a.device, model=name, model_type=cfg.model_type,
            params=nparams, gpus=world, mbs=a.mbs, seq=a.seq, microbatches=a.microbatches, ckpt=int(a.ckpt),
            step_s=st, tokens_per_s=tokens / st, tflops_per_gpu=6 * nparams * tokens / st / world / 1e12,
            peak_gpu_alloc_gib=torch.cuda.max_memory_allocated() / G if cuda else 0.0,
            peak_gpu_reserved_gib=torch.cuda.max_memory_reserved() / G if cuda else 0.0,
            host_rss_gib=rss.item() / G, host_rss_max_rank_gib=rss_max.item() / G,
            host_used_peak_gib=host_peak / G, host_used_start_gib=host.base / G, init_s=init_s), flush=True)
        print("LOSSES " + json.dumps(losses), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
