"""The few distributed helpers every script shares: one process or many under torchrun, the same code.

torchrun starts one process per GPU and tells each its place through the environment (RANK, WORLD_SIZE,
LOCAL_RANK); `python script.py` sets none of them and runs as rank 0 of 1 with no process group. Every script calls
`init(device)` once, then asks `rank_world()`, prints with `print0` and synchronises with `barrier()`, which all do
the right thing in both cases. The backend is nccl on CUDA, gloo on CPU (the tests run 2 gloo processes).
"""
import os
import tempfile

import torch
import torch.distributed as dist

from util.cli import UserError


def is_dist() -> bool:
    """True inside a process group (torchrun after init())."""
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple:
    """(rank, world size): (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_dist() else (0, 1)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def print0(*args, **kwargs):
    """print on rank 0 only (also before init(): torchrun's RANK tells)."""
    rank = dist.get_rank() if is_dist() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(*args, **kwargs, flush=True)


def pick_device(name: str = "auto") -> torch.device:
    """"auto": cuda if available, else mps, else cpu. Under torchrun a CUDA device is this process's GPU
    (LOCAL_RANK). A device that is not there is an error that says so."""
    if name in ("auto", "", None):
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind = torch.device(name).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple MPS is not available on this machine (use --device cpu or auto)")
    if kind == "cuda" and torch.device(name).index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def init(device_name: str = "auto", group: bool = False) -> tuple:
    """The device and, under torchrun, the process group: returns (rank, world, device). The one place a process
    group is made. group=True makes one in a single process too (a world of one over a file store): FSDP2 needs a
    group even when there is nothing to shard with (bench.py's one-GPU vit_g)."""
    device = pick_device(device_name)
    if (launched_by_torchrun() or group) and not is_dist():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if launched_by_torchrun():
            dist.init_process_group(backend)
        else:
            store = tempfile.NamedTemporaryFile(prefix="dinov2_pg_", delete=False).name
            dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    rank, world = rank_world()
    return rank, world, device


def _comm(t):
    """t where the process group communicates from: the current GPU under NCCL, else the CPU (t itself if it is
    there already)."""
    if dist.get_backend() == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t.cpu()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of `t` over all ranks ("sum" or "max"), wherever t lives (a CPU tensor under NCCL goes
    through the GPU); a no-op without a process group. Returns t."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}  # both exist on gloo and nccl
    if op not in ops:
        raise ValueError(f"all_reduce_: op must be one of {sorted(ops)}, got {op!r}")
    if is_dist():
        c = _comm(t)
        dist.all_reduce(c, op=ops[op])
        if c is not t:
            t.copy_(c)
    return t


def all_reduce_sum(t):
    """The sum of t over ranks as a new tensor (t itself without a process group)."""
    return all_reduce_(t.clone()) if is_dist() else t


def all_gather_cat(t, dim=0):
    """Every rank's t (one shape on all ranks) concatenated along dim in rank order."""
    if not is_dist():
        return t
    c = _comm(t).contiguous()
    parts = [torch.empty_like(c) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, c)
    return torch.cat(parts, dim).to(t.device)


def gather_shards(t):
    """Every rank's t (sizes along dim 0 may differ) concatenated in rank order: the whole sharded array."""
    if not is_dist():
        return t
    sizes = all_gather_cat(torch.tensor([len(t)]))
    padded = t.new_zeros((int(sizes.max()), *t.shape[1:]))
    padded[:len(t)] = t
    parts = all_gather_cat(padded[None])  # (world, max size, ...)
    return torch.cat([part[:n] for part, n in zip(parts, sizes.tolist())])


def local_tensor(t):
    """The local shard of an FSDP2 (DTensor) parameter; a plain tensor is its own shard."""
    return t.to_local() if hasattr(t, "to_local") else t


def barrier():
    if is_dist():
        dist.barrier()


def close():
    """Destroy the process group (torchrun warns at exit otherwise)."""
    if is_dist():
        dist.destroy_process_group()
