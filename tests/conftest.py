"""Shared pytest set-up: the modules live at the repository root, tests run on the CPU with few threads, and the
tiny preset and helpers every training test uses (import them with `from conftest import ...`)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")

# The tiny preset: a 2-block vit_tiny on 56-px crops of 64-px synthetic images with every part of the objective
# (2 global + 2 local crops, masking, untied heads, 64 prototypes) in seconds on a CPU. TINY_MODEL is the model and its
# data; TINY adds a complete 4-step run with a checkpoint every 2 steps. Later flags override earlier ones.
TINY_MODEL = ["--depth", "2", "--patch-size", "14", "--global-size", "56", "--local-size", "28", "--n-local", "2",
              "--batch-size", "4", "--n-prototypes", "64", "--ibot-n-prototypes", "64", "--head-hidden-dim", "64",
              "--head-bottleneck-dim", "32", "--ibot-bottleneck-dim", "32", "--synthetic-images", "64",
              "--synthetic-size", "64", "--num-workers", "0"]
TINY = TINY_MODEL + ["--epochs", "1", "--epoch-length", "4", "--warmup-epochs", "0.5", "--freeze-last-layer-epochs",
                     "0.25", "--log-every", "1", "--save-every", "2", "--teacher-temp", "0.07",
                     "--warmup-teacher-temp-epochs", "0.5", "--monitor-images", "16"]  # the monitor at the end, small


def run_script(args, nproc=1, timeout=240, script="train.py", torchrun=False):
    """Run a script as a user would, in a subprocess with a timeout, so that a hung collective fails the test.

    nproc > 1: torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR / PORT) given to nproc processes
    started here, which is all the scripts read of it; torchrun=True goes through the real launcher instead (one more
    interpreter importing torch per test, so only a few tests do)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if nproc == 1 or torchrun:
        cmd = [sys.executable, script] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
        return subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, script] + args, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc),
                                       LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(nproc)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    code = next((p.returncode for p in procs if p.returncode), 0)
    return subprocess.CompletedProcess(args, code, "".join(o for o, _ in outs), "".join(e for _, e in outs))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One complete TINY run of `python train.py` as a user runs it, shared by every test that only reads it
    (train.py's exports and metrics, distill.py's teacher): read-only, copy what you change."""
    out = tmp_path_factory.mktemp("tiny_run")
    proc = run_script(TINY + ["--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def load_checkpoint(path):
    """A torch.distributed.checkpoint folder as one flat dict of tensors (independent of train.py's loading code)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = Path(str(path) + ".pt")
    if not out.exists():
        dcp_to_torch_save(str(path), str(out))
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif torch.is_tensor(obj):
            flat[prefix] = obj
    walk("", torch.load(out, weights_only=False))
    return flat
