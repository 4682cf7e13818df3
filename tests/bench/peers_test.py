"""The benchmark peers (bench/peers/) on the CPU: what can run without a GPU runs, the rest is checked through
--dry-run and argument validation.

    peers_test.py <repo root> <fixtures dir> args|fsdp2|limits

  args    every peer: bad arguments exit 2 with one line naming the problem; --dry-run resolves every mmoc preset and
          every HF fixture's config.json (all families of issue 11) to a model whose parameter count equals the
          fixture's; DeepSpeed's configuration for stage 2, stage 3 and stage 3 on NVMe
  fsdp2   FSDP2 with gloo on 2 CPU ranks trains a tiny LLaMA with the losses of a plain single-process loop over the
          same data (fp32); a tied GPT-2 and a Qwen3 from meta-device init in bf16 train with finite losses
  limits  the limits script's CPU mode on a LLaMA and a Qwen2 (bias) layer gives positive figures
Needs the venv's torch and transformers."""
import json
import math
import os
import subprocess
import sys
import tempfile

ROOT, FIX, WHAT = sys.argv[1], sys.argv[2], sys.argv[3]
PEERS = os.path.join(ROOT, "bench", "peers")
PY = sys.executable
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def run(script, *args, torchrun=0, timeout=600):
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else [PY]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd + [os.path.join(PEERS, script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def result(out):
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    if len(lines) != 1:
        return {}
    return dict(kv.split("=", 1) for kv in lines[0].split()[1:])


def losses(out):
    lines = [l for l in out.splitlines() if l.startswith("LOSSES ")]
    return json.loads(lines[0][7:]) if len(lines) == 1 else []


def fixtures():
    d = os.path.join(FIX, "hf-tiny")
    return sorted(os.path.join(d, n) for n in os.listdir(d)) if os.path.isdir(d) else []


def bad(script, args, needle):
    r = run(script, *args)
    err = r.stderr.strip().splitlines()
    check(r.returncode == 2 and len(err) == 1 and needle in err[0],
          f"{script} {' '.join(map(str, args))}: exit 2 naming '{needle}' (got {r.returncode}: {r.stderr.strip()[-200:]})")


def test_args():
    fx = fixtures()
    check(len(fx) >= 14, f"{len(fx)} HF fixtures found in {FIX}")
    for script in ("fsdp2_offload.py", "ds_offload.py", "limits.py"):
        bad(script, ["--model", "no-such-model", "--dry-run"], "unknown model 'no-such-model'")
        bad(script, ["--model", "tiny-gqa", "--mbs", "0", "--dry-run"], "--mbs must be >= 1")
        bad(script, ["--model", "tiny-gqa", "--seq", "65", "--dry-run"], "longer than the model's 64 positions")
        bad(script, ["--model", os.path.join(ROOT, "README.md"), "--dry-run"], "not valid JSON")
    bad("ds_offload.py", ["--model", "tiny-gqa", "--seq", "16", "--stage", "2", "--nvme", tempfile.gettempdir(), "--dry-run"],
        "--nvme needs --stage 3")
    bad("ds_offload.py", ["--model", "tiny-gqa", "--seq", "16", "--stage", "3", "--nvme", "/no/such/dir", "--dry-run"],
        "not a folder")
    bad("fsdp2_offload.py", ["--model", "tiny-gqa", "--seq", "16", "--world", "2", "--dry-run"], "--world is for --plain")
    bad("limits.py", ["--model", "tiny-gqa", "--seq", "16", "--repeats", "0", "--dry-run"], "--repeats must be >= 1")

    # presets: the 7B preset's count, a --layers override (issue 10's 16-layer 7B-wide model: 3.5B)
    r = run("fsdp2_offload.py", "--model", "llama2-7b", "--dry-run")
    d = json.loads(r.stdout) if r.returncode == 0 else {}
    check(d.get("params") == 6738415616, f"llama2-7b preset: 6,738,415,616 parameters (got {d.get('params')})")
    check(d.get("offload") is True and d.get("activation_checkpointing") is True and d.get("precision") == "bf16",
          "fsdp2 defaults: CPU offload, activation checkpointing, bf16")
    r = run("fsdp2_offload.py", "--model", "llama2-7b", "--layers", "16", "--dry-run")
    d = json.loads(r.stdout) if r.returncode == 0 else {}
    check(d.get("params") == 3500281856 and d.get("tokens_per_step") == 8 * 1024 * 4,
          f"llama2-7b --layers 16: 3,500,281,856 parameters, 32768 tokens per step (got {d.get('params')})")

    # every fixture's config.json (in this process: one import of transformers): the family's HF model, built the
    # way the peers build it, with the fixture's parameter count
    sys.path.insert(0, PEERS)
    import argparse
    import common
    for f in fx:
        want = json.load(open(os.path.join(f, "hf_reference.json")))
        ap = argparse.ArgumentParser()
        common.add_job_args(ap)
        a = ap.parse_args(["--model", f, "--seq", str(want["batch"]["T"]), "--mbs", "2"])
        cfg, name = common.resolve_model(a)
        n = common.count_params(common.meta_model(cfg, a.attn))
        check(n == want["num_parameters"] and cfg.model_type == want["model_type"],
              f"--model {os.path.basename(f)}: {want['model_type']}, {want['num_parameters']} parameters "
              f"(got {cfg.model_type}, {n})")
    r = run("ds_offload.py", "--model", fx[0], "--seq", 16, "--dry-run")
    d = json.loads(r.stdout) if r.returncode == 0 else {}
    check(d.get("model_type") == json.load(open(os.path.join(fx[0], "config.json")))["model_type"],
          f"ds_offload.py --model {os.path.basename(fx[0])} --dry-run ({r.stderr.strip()[-200:]})")

    # DeepSpeed configurations
    def dsc(*args):
        r = run("ds_offload.py", "--model", "tiny-gqa", "--seq", 32, "--mbs", 3, "--microbatches", 5, *args, "--dry-run")
        return json.loads(r.stdout)["deepspeed_config"] if r.returncode == 0 else {}
    c2, c3 = dsc("--stage", "2"), dsc("--stage", "3")
    z2, z3 = c2.get("zero_optimization", {}), c3.get("zero_optimization", {})
    check(z2.get("stage") == 2 and z2.get("offload_optimizer", {}).get("device") == "cpu" and "offload_param" not in z2,
          "ZeRO-Offload: stage 2, optimizer on the CPU, parameters on the GPU")
    check(z3.get("stage") == 3 and z3.get("offload_optimizer", {}).get("device") == "cpu"
          and z3.get("offload_param", {}).get("device") == "cpu", "ZeRO-Infinity: stage 3, parameters and optimizer on the CPU")
    check(c2.get("train_micro_batch_size_per_gpu") == 3 and c2.get("gradient_accumulation_steps") == 5
          and c2.get("bf16", {}).get("enabled") is True, "batch: micro-batch 3, 5 accumulation steps, bf16")
    with tempfile.TemporaryDirectory() as nv:
        c = dsc("--stage", "3", "--nvme", nv)
        z = c.get("zero_optimization", {})
        op, pp = z.get("offload_optimizer", {}), z.get("offload_param", {})
        check(op.get("device") == "nvme" and pp.get("device") == "nvme" and op.get("nvme_path") == os.path.abspath(nv)
              and pp.get("nvme_path") == os.path.abspath(nv) and "aio" in c,
              "ZeRO-Infinity --nvme: parameters and optimizer state on NVMe at the folder, aio settings")
        check(pp.get("buffer_size", 0) >= 101 * 64, "NVMe parameter buffers hold the largest parameter")


def test_fsdp2():
    common = ["--model", "tiny-gqa", "--seq", 32, "--mbs", 2, "--microbatches", 2, "--steps", 2, "--device", "cpu",
              "--precision", "fp32", "--lr", "1e-2", "--init", "real"]
    r = run("fsdp2_offload.py", *common, torchrun=2)
    res = result(r.stdout)
    check(r.returncode == 0 and res.get("peer") == "fsdp2" and res.get("gpus") == "2",
          f"FSDP2 on 2 CPU ranks runs (exit {r.returncode}; {r.stderr.strip()[-300:]})")
    p = run("fsdp2_offload.py", *common, "--plain", "--world", 2)
    a, b = losses(r.stdout), losses(p.stdout)
    rel = max((abs(x - y) / abs(y) for x, y in zip(a, b)), default=float("inf"))
    check(len(a) == len(b) == 3 and rel < 1e-5, f"FSDP2 losses equal the plain loop's: {a} vs {b} (max rel {rel:.1e})")
    check(len(b) == 3 and abs(b[1] - b[0]) > 1e-3, "the optimizer steps (losses move)")
    check(float(res.get("tokens_per_s", 0)) > 0 and float(res.get("host_rss_gib", 0)) > 0
          and int(res.get("params", 0)) == 197824, f"RESULT line: tokens/s, host RSS, parameters ({res})")
    for f, extra in (("gpt2-fp32", []), ("qwen3-tied-fp32", ["--no-ckpt"])):
        r = run("fsdp2_offload.py", "--model", os.path.join(FIX, "hf-tiny", f), "--seq", 24, "--mbs", 2,
                "--microbatches", 1, "--steps", 1, "--device", "cpu", "--init", "meta", *extra, torchrun=2)
        ls = losses(r.stdout)
        check(r.returncode == 0 and len(ls) == 2 and all(math.isfinite(x) and 3 < x < 7 for x in ls),
              f"FSDP2 {f} from the meta device, bf16: finite losses near ln(vocab) {ls} ({r.stderr.strip()[-300:]})")


def test_limits():
    for m in ("tiny-gqa", os.path.join(FIX, "hf-tiny", "qwen2-fp32")):
        r = run("limits.py", "--model", m, "--device", "cpu", "--quick", "--mbs", 2, "--seq", 32, "--repeats", 5)
        res = result(r.stdout)
        keys = ("matmul_tflops", "layer_fwd_ms", "layer_fwdbwd_ms", "adamw_ms_per_1e8", "memcpy_gbps")
        # (timings only positive: on 2 shared cores a median of a few runs is noise, fwd can come out above fwd+bwd)
        check(r.returncode == 0 and all(float(res.get(k, 0)) > 0 for k in keys),
              f"limits.py {os.path.basename(m)} on the CPU: {', '.join(f'{k}={res.get(k)}' for k in keys)} "
              f"({r.stderr.strip()[-300:]})")


{"args": test_args, "fsdp2": test_fsdp2, "limits": test_limits}[WHAT]()
print(f"{len(failures)} failure(s)")
sys.exit(1 if failures else 0)
