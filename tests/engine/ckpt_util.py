"""Reading mmoc checkpoints in tests (python3 stdlib only): safetensors headers and tensors, finiteness, digests;
and the CLI tests' shared harness (check, sh, must, metrics_of)."""
import hashlib
import json
import math
import os
import struct
import subprocess
from array import array

FAILS = []  # what check() found wrong, for the test's exit status


def check(cond, what):
    if not cond:
        FAILS.append(what)
        print("FAIL: " + what, flush=True)
    return cond


def sh(args, fault=None, timeout=240):
    """Runs an mmoc tool alone: no launcher or test-fault variables inherited; `fault` sets MMOC_TEST_FAULT."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MMOC_DEVICE", "MMOC_TEST_FAULT"):
        env.pop(k, None)
    if fault:
        env["MMOC_TEST_FAULT"] = fault
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)


def must(p, what):
    if p.returncode != 0:
        print(f"{what} failed (rc {p.returncode})\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}", flush=True)
        raise SystemExit(1)
    return p


def metrics_of(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def read_safetensors(path):
    """name -> (dtype, shape, bytes); '__metadata__' -> dict."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {"__metadata__": header.pop("__metadata__", {})}
    for name, e in header.items():
        b, end = e["data_offsets"]
        out[name] = (e["dtype"], e["shape"], data[b:end])
    return out


def hf_tensors(ckpt):
    """All weight tensors of an HF checkpoint folder (model.safetensors or the index's shards): name -> (dtype, shape, bytes)."""
    idx = os.path.join(ckpt, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    out = {}
    for fn in files:
        t = read_safetensors(os.path.join(ckpt, fn))
        t.pop("__metadata__")
        out.update(t)
    return out


def floats(dtype, raw):
    if dtype == "F32":
        a = array("f")
        a.frombytes(raw)
        return a
    if dtype == "BF16":
        u = array("H")
        u.frombytes(raw)
        return [struct.unpack("<f", struct.pack("<I", x << 16))[0] for x in u]
    raise ValueError(dtype)


def all_finite(ckpt):
    """True when every weight and every optimizer-state tensor of the checkpoint is finite."""
    tensors = list(hf_tensors(ckpt).values())
    sd = os.path.join(ckpt, "mmoc_state")
    for fn in sorted(os.listdir(sd)):
        if fn.endswith(".safetensors"):
            t = read_safetensors(os.path.join(sd, fn))
            t.pop("__metadata__")
            tensors += list(t.values())
    return all(all(math.isfinite(x) for x in floats(d, raw)) for d, _, raw in tensors)


def state(ckpt):
    """The training state of a checkpoint for comparisons: weights, optimizer tensors and step of every stage."""
    out = {"w." + k: v for k, v in hf_tensors(ckpt).items()}
    sd = os.path.join(ckpt, "mmoc_state")
    for fn in sorted(os.listdir(sd)):
        if fn.endswith(".safetensors"):
            t = read_safetensors(os.path.join(sd, fn))
            out[fn + ".step"] = t.pop("__metadata__").get("step")
            for k, v in t.items():
                out[fn + "." + k] = v
    return out


def tree_digest(path):
    """name -> sha256 of every file under path (and the folder names)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path) + "/"] = "dir"
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), path)] = hashlib.sha256(fh.read()).hexdigest()
    return out
