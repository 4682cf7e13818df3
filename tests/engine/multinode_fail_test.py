#!/usr/bin/env python3
"""Multi-node failure handling of mmoc-run (python3 stdlib only).

    multinode_fail_test.py <mmoc-run> <mmoc-compile> <source dir>

Two "nodes" on this machine: two mmoc-run launchers (--nnodes 2 --node-rank 0/1) of a 4-rank plan on the CPU.
Every failure must end the whole job on every node within its timeout, with non-zero exit codes and one stderr
line per process naming the rank, its node and what happened; nothing may hang:

  1. a worker of node 1 killed (SIGKILL) mid-run           -> both nodes end at once, naming rank 3 (node 1), signal 9
  2. a worker of node 1 stopped (SIGSTOP: hung, or its node  -> both end within the fail timeout: "no heartbeat"
     unreachable)
  3. rank 0 killed (node 0; the store lives in node 0's      -> node 1 is told who it was
     launcher, not in rank 0)
  4. node 1 never starts                                     -> node 0 ends after the rendezvous timeout naming ranks 2-3
  5. node 0 never starts                                     -> node 1 cannot reach the store, names its address
  6. node 1 given a wrong master address                     -> node 1 names the address, node 0 the missing ranks
  7. srun with one task per rank (rank 0 hosts the store,    -> every other rank prints one line naming rank 3
     no mmoc launcher), rank 3 killed
  8. bad launcher options                                    -> exit 2, one line, before anything starts
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

RUN, COMPILE, SRC = (os.path.abspath(p) for p in sys.argv[1:4])
TOKENS = os.path.join(SRC, "data/sample/tiny_tokens.jsonl")
FAIL_S, RDZV_S = 5, 8   # --fail-timeout, --rdzv-timeout of these runs
SLACK_S = 40            # process start-up, kill grace, a loaded 2-core machine (28.5 s seen under load 15)
FAILS = []
T0 = time.time()


def check(cond, what):
    if not cond:
        FAILS.append(what)
        print("FAIL: " + what, flush=True)
    return cond


def free_port(lo=1024, hi=65536):
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if lo <= p < hi:
            return p


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("SLURM_") or k.startswith("TORCHELASTIC_") or k.startswith("MMOC_")
                   or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                            "MASTER_ADDR", "MASTER_PORT"))}
    env.update(extra or {})
    return env


class Proc:
    """A process with stdout/stderr in files (a pipe could fill up and block it)."""

    def __init__(self, name, args, tmp, env=None):
        self.name = name
        self.err_path = os.path.join(tmp, name + ".err")
        self.out = open(os.path.join(tmp, name + ".out"), "w")
        self.err = open(self.err_path, "w")
        self.p = subprocess.Popen([str(a) for a in args], stdout=self.out, stderr=self.err, env=clean_env(env))
        self.rc = None
        self.t_end = None

    def poll(self):
        if self.rc is None:
            rc = self.p.poll()
            if rc is not None:
                self.rc, self.t_end = rc, time.time()
        return self.rc

    def stderr(self):
        self.err.flush()
        with open(self.err_path) as f:
            return f.read()

    def lines(self):
        return [l for l in self.stderr().splitlines() if l.strip()]


def wait_all(procs, limit_s):
    """Waits until every process ended or limit_s passed (then kills the rest). True when all ended in time."""
    t = time.time()
    while time.time() - t < limit_s:
        if all(p.poll() is not None for p in procs):
            return True
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.p.kill()
            p.p.wait()
            p.rc, p.t_end = -9, time.time()
    return False


def workers_of(launcher_pid):
    """{rank: pid} of the worker processes a launcher started (children with RANK in their environment)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid != launcher_pid:
                continue
            with open(f"/proc/{d}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            if b"RANK" in env:
                out[int(env[b"RANK"])] = int(d)
        except (OSError, ValueError):
            pass
    return out


def steps_done(metrics):
    try:
        with open(metrics) as f:
            return len([l for l in f if l.strip()])
    except OSError:
        return 0


def wait_steps(metrics, n, procs, limit_s=120):
    t = time.time()
    while time.time() - t < limit_s:
        if steps_done(metrics) >= n:
            return True
        if any(p.poll() is not None for p in procs):
            return False
        time.sleep(0.05)
    return False


def node(tmp, plan, r, port, addr="127.0.0.1", steps=100000, extra=(), name=None):
    args = [RUN, plan, "--data", TOKENS, "--steps", steps, "--device", "cpu", "-q", "--optim-threads", "1",
            "--nnodes", 2, "--node-rank", r, "--master-addr", addr, "--master-port", port,
            "--fail-timeout", FAIL_S, "--rdzv-timeout", RDZV_S, *extra]
    if r == 0:
        args += ["--metrics", os.path.join(tmp, "m.jsonl")]
    return Proc(name or f"node{r}", args, tmp)


def expect_lines(p, what, *needles, n=1):
    lines = p.lines()
    check(len(lines) == n, f"{what}: {p.name}: {n} stderr line(s), got {len(lines)}: {lines}")
    text = "\n".join(lines)
    for s in needles:
        check(re.search(s, text, re.M) is not None, f"{what}: {p.name}: stderr matches {s!r}: {lines}")


def main():
    tmp = tempfile.mkdtemp(prefix="mmoc-mnfail-")
    try:
        run_all(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"multinode_fail_test: {len(FAILS)} failure(s), {time.time() - T0:.1f} s")
    return 1 if FAILS else 0


def case_dir(tmp, name):
    d = os.path.join(tmp, name)
    os.makedirs(d)
    return d


def run_all(tmp):
    plan = os.path.join(tmp, "p4.json")
    p = subprocess.run([COMPILE, os.path.join(SRC, "configs/jobs/tiny-cpu.json"), "--gpus", "4", "--v", "1", "-o", plan],
                       capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stdout, p.stderr)
        sys.exit(1)

    # 1 ---- SIGKILL of a worker on node 1 mid-run -------------------------------------------------------------
    d = case_dir(tmp, "kill")
    port = free_port()
    n1, n0 = node(d, plan, 1, port), node(d, plan, 0, port)
    if check(wait_steps(os.path.join(d, "m.jsonl"), 3, [n0, n1]), "kill: the job trains (3 steps) before the kill"):
        w = workers_of(n1.p.pid)
        check(sorted(w) == [2, 3], f"kill: node 1 runs ranks 2 and 3 (contiguous blocks): {sorted(w)}")
        t_kill = time.time()
        os.kill(w[3], signal.SIGKILL)
        ended = wait_all([n0, n1], 30)
        check(ended, "kill: both nodes end (no hang)")
        for p in (n0, n1):
            check(p.rc not in (0, None), f"kill: {p.name} exits non-zero: {p.rc}")
            check(p.t_end - t_kill < 10, f"kill: {p.name} ends within 10 s of the kill (well before the {FAIL_S} s "
                                         f"heartbeat timeout is needed): {p.t_end - t_kill:.1f} s")
            expect_lines(p, "kill", rf"^mmoc-run: node {p.name[-1]}: the job failed: rank 3 \(node 1, host [^)]+\) \(pid \d+\) "
                                    r"was killed by signal 9 \(Killed\)")
    else:
        wait_all([n0, n1], 1)
    print(f"kill: {time.time() - T0:.1f} s", flush=True)

    # 2 ---- SIGSTOP of a worker on node 1: a hung process / an unreachable node ---------------------------------
    d = case_dir(tmp, "stop")
    port = free_port()
    n1, n0 = node(d, plan, 1, port), node(d, plan, 0, port)
    if check(wait_steps(os.path.join(d, "m.jsonl"), 3, [n0, n1]), "stop: the job trains before the stop"):
        w = workers_of(n1.p.pid)
        t_stop = time.time()
        os.kill(w[3], signal.SIGSTOP)
        ended = wait_all([n0, n1], FAIL_S + SLACK_S)
        check(ended, "stop: both nodes end (no hang)")
        for p in (n0, n1):
            check(p.rc not in (0, None), f"stop: {p.name} exits non-zero: {p.rc}")
            check(p.t_end - t_stop < FAIL_S + 10, f"stop: {p.name} ends within the fail timeout + 10 s: {p.t_end - t_stop:.1f} s")
            expect_lines(p, "stop", rf"^mmoc-run: node {p.name[-1]}: the job failed: rank 3 \(node 1, host [^)]+\): "
                                    r"no heartbeat for \d+\.\d s")
    else:
        wait_all([n0, n1], 1)
    print(f"stop: {time.time() - T0:.1f} s", flush=True)

    # 3 ---- rank 0 killed: the store is node 0's launcher's, so node 1 hears who died -----------------------------
    d = case_dir(tmp, "kill0")
    port = free_port()
    n1, n0 = node(d, plan, 1, port), node(d, plan, 0, port)
    if check(wait_steps(os.path.join(d, "m.jsonl"), 3, [n0, n1]), "kill0: the job trains before the kill"):
        w = workers_of(n0.p.pid)
        t_kill = time.time()
        os.kill(w[0], signal.SIGKILL)
        check(wait_all([n0, n1], 30), "kill0: both nodes end")
        for p in (n0, n1):
            check(p.rc not in (0, None), f"kill0: {p.name} exits non-zero: {p.rc}")
            check(p.t_end - t_kill < 15, f"kill0: {p.name} ends within 15 s: {p.t_end - t_kill:.1f} s")
            expect_lines(p, "kill0", rf"^mmoc-run: node {p.name[-1]}: the job failed: rank 0 \(node 0, host [^)]+\) \(pid \d+\) "
                                     r"was killed by signal 9")
    else:
        wait_all([n0, n1], 1)
    print(f"kill0: {time.time() - T0:.1f} s", flush=True)

    # 4 ---- node 1 never starts -----------------------------------------------------------------------------------
    d = case_dir(tmp, "only0")
    t = time.time()
    n0 = node(d, plan, 0, free_port())
    check(wait_all([n0], RDZV_S + SLACK_S), "only node 0: it ends (no hang)")
    check(n0.rc not in (0, None), f"only node 0: exits non-zero: {n0.rc}")
    check(time.time() - t < RDZV_S + SLACK_S, f"only node 0: ends within the rendezvous timeout + slack: {time.time() - t:.1f} s")
    # the rank whose timeout is published prints its error; the launcher prints the node's summary
    expect_lines(n0, "only node 0", rf"rendezvous timed out after {RDZV_S} s: 2 of 4 ranks joined the store at 127\.0\.0\.1:\d+; "
                                    r"ranks 2-3 \(node 1\) did not", r"^mmoc-run: node 0: the job failed: rank [01] \(node 0",
                 n=2)
    print(f"only node 0: {time.time() - T0:.1f} s", flush=True)

    # 5 ---- node 0 never starts -----------------------------------------------------------------------------------
    d = case_dir(tmp, "only1")
    t = time.time()
    port = free_port()
    n1 = node(d, plan, 1, port)
    check(wait_all([n1], RDZV_S + SLACK_S), "only node 1: it ends (no hang)")
    check(n1.rc not in (0, None), f"only node 1: exits non-zero: {n1.rc}")
    text = n1.stderr()
    check(f"cannot reach the job's store at 127.0.0.1:{port} within {RDZV_S} s, hosted by node 0's mmoc-run" in text,
          f"only node 1: names the store's address and host: {text!r}")
    check(re.search(rf"^mmoc-run: node 1: rank [23] \(node 1, host [^)]+\) \(pid \d+\) exited with code 3; the job's store at "
                    rf"127\.0\.0\.1:{port} is unreachable", text, re.M) is not None, f"only node 1: the node's summary: {text!r}")
    check(len(n1.lines()) <= 3, f"only node 1: a line per failing worker and the summary: {n1.lines()}")
    print(f"only node 1: {time.time() - T0:.1f} s", flush=True)

    # 6 ---- a wrong master address on node 1 ----------------------------------------------------------------------
    d = case_dir(tmp, "badaddr")
    t = time.time()
    port = free_port()
    bad = "mmoc-no-such-host.invalid"
    n1, n0 = node(d, plan, 1, port, addr=bad), node(d, plan, 0, port)
    check(wait_all([n0, n1], RDZV_S + SLACK_S), "wrong address: both nodes end")
    for p in (n0, n1):
        check(p.rc not in (0, None), f"wrong address: {p.name} exits non-zero: {p.rc}")
    check(time.time() - t < RDZV_S + SLACK_S, f"wrong address: ends within the rendezvous timeout + slack: {time.time() - t:.1f} s")
    check(f"cannot reach the job's store at {bad}:{port}" in n1.stderr(), f"wrong address: node 1 names it: {n1.stderr()!r}")
    check("ranks 2-3 (node 1) did not" in n0.stderr(), f"wrong address: node 0 names the missing ranks: {n0.stderr()!r}")
    print(f"wrong address: {time.time() - T0:.1f} s", flush=True)

    # 7 ---- srun with one task per rank: no mmoc launcher, rank 0 hosts the store; rank 3 killed -----------------
    d = case_dir(tmp, "srun")
    port = free_port(20000, 60000)
    ranks = []
    for r in (3, 2, 1, 0):
        env = {"SLURM_PROCID": str(r), "SLURM_NTASKS": "4", "SLURM_LOCALID": str(r % 2), "SLURM_NODEID": str(r // 2),
               "SLURM_NNODES": "2", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "127.0.0.[1-2]",
               "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": str(port - 20000),
               "MMOC_FAIL_TIMEOUT": str(FAIL_S), "MMOC_RDZV_TIMEOUT": str(RDZV_S)}
        args = [RUN, plan, "--data", TOKENS, "--steps", 100000, "--device", "cpu", "-q", "--optim-threads", "1"]
        if r == 0:
            args += ["--metrics", os.path.join(d, "m.jsonl")]
        ranks.append(Proc(f"rank{r}", args, d, env))
    ranks.reverse()  # ranks[r]
    if check(wait_steps(os.path.join(d, "m.jsonl"), 3, ranks), "srun: the job trains before the kill"):
        t_kill = time.time()
        ranks[3].p.kill()
        check(wait_all(ranks, 30), "srun: every rank ends")
        for r in (0, 1, 2):
            p = ranks[r]
            check(p.rc not in (0, None), f"srun: rank {r} exits non-zero: {p.rc}")
            check(p.t_end - t_kill < 15, f"srun: rank {r} ends within 15 s: {p.t_end - t_kill:.1f} s")
            expect_lines(p, "srun", rf"^mmoc-run: worker {r} \(node {r // 2}, host [^)]+\): stopped: the job failed: rank 3 "
                                    r"\(node 1, host [^)]+\) \(pid \d+\) ended without reporting an error \(killed, or crashed\)$")
    else:
        wait_all(ranks, 1)
    print(f"srun: {time.time() - T0:.1f} s", flush=True)

    # 8 ---- bad launcher options: exit 2, one line, nothing started -----------------------------------------------
    plan3 = os.path.join(tmp, "p3.json")
    subprocess.run([COMPILE, os.path.join(SRC, "configs/jobs/tiny-cpu.json"), "--gpus", "3", "--v", "1", "-o", plan3], check=True,
                   capture_output=True)
    for what, pl, extra, needle in [
            ("--node-rank outside --nnodes", plan, ["--nnodes", 2, "--node-rank", 2, "--master-addr", "127.0.0.1"],
             "--node-rank 2 is outside [0, 2)"),
            ("3 ranks over 2 nodes", plan3, ["--nnodes", 2, "--node-rank", 0, "--master-addr", "127.0.0.1"],
             "ranks do not split evenly over 2 nodes"),
            ("--nnodes without --master-addr", plan, ["--nnodes", 2, "--node-rank", 1], "needs --master-addr"),
            ("--nproc-per-node that does not fit", plan, ["--nnodes", 2, "--node-rank", 0, "--nproc-per-node", 3,
                                                          "--master-addr", "127.0.0.1"], "but the plan has 4"),
            ("--fail-timeout 0", plan, ["--fail-timeout", 0], "--fail-timeout")]:
        t = time.time()
        p = subprocess.run([str(a) for a in [RUN, pl, "--data", TOKENS, "--device", "cpu", *extra]], capture_output=True, text=True,
                           env=clean_env(), timeout=60)
        lines = p.stderr.strip().splitlines()
        check(p.returncode == 2, f"{what}: exit code 2, got {p.returncode} ({p.stderr.strip()!r})")
        check(len(lines) == 1 and lines[0].startswith("mmoc-run: "), f"{what}: one stderr line: {lines}")
        check(needle in p.stderr, f"{what}: names {needle!r}: {p.stderr.strip()!r}")
        check(not re.search(r"^step ", p.stdout, re.M), f"{what}: no step ran")


if __name__ == "__main__":
    sys.exit(main())
