"""Checkpoints of a training run that never lie: written whole or not at all, never non-finite, resumed exactly.

One format for every strategy (torch.distributed.checkpoint, DCP: each rank writes its own shards, so a vit_g under
FSDP2 is never gathered on one GPU). A checkpoint is written to `ckpt_<step>.tmp` and renamed when complete, so a
crash mid-save leaves the previous one intact; resume takes the newest complete checkpoint that loads, falling back
past a corrupt one with a warning; the exports (`teacher.pth`: backbone + heads + config, what distill.py reads;
`teacher_backbone.pth`: the released hub layout) are rebuilt from the last checkpoint when a kill took them.

    Checkpointer       save / resume / export for train.fit
    NonFiniteError     the run diverged: one `error:` line naming the step and the last good checkpoint
    atomic_write       write to a temporary name, then rename: the one writer of every file (atomic_save, _text)
"""
import dataclasses
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from util import cli
from util.distributed import barrier, is_dist, local_tensor, print0



class NonFiniteError(cli.UserError, FloatingPointError):
    """The run diverged (a loss or a weight is NaN / inf): one `error:` line that names the step and the last good
    checkpoint. A FloatingPointError for callers that catch that."""


class Checkpointer:
    """Saves that never lie: nothing non-finite is written, a checkpoint is complete or absent (written to .tmp, then
    renamed), resume takes the newest one that loads, and --no-resume never writes into another run's folder."""

    def __init__(self, out, keep_last, rank):
        self.out, self.keep_last, self.rank = Path(out), keep_last, rank

    def _folders(self):
        return sorted(p for p in self.out.glob("ckpt_*") if p.is_dir() and not p.name.endswith(".tmp"))

    def latest(self):
        """The newest complete checkpoint (DCP metadata and extra.pt both written), or None."""
        done = [p for p in self._folders() if (p / ".metadata").is_file() and (p / "extra.pt").is_file()]
        return done[-1] if done else None

    def claim(self, resume):
        """Make the run folder. A file of that name is an error (nothing of the user's is overwritten), and a fresh
        run (--no-resume) refuses a folder that already holds a run: its checkpoints, metrics and exports would be
        mixed with the new run's."""
        if self.out.exists() and not self.out.is_dir():
            raise cli.UserError(f"--out {self.out} is a file, not a folder: pick another --out (the run writes "
                                f"checkpoints, metrics.jsonl and its exports into that folder)")
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier()
        if resume:
            return
        found = [p.name for p in self._folders()] + [p.name for p in sorted(self.out.glob("*.pth"))] + [
            p.name for p in (self.out / "metrics.jsonl",) if p.is_file()]
        if found:
            raise cli.UserError(
                f"--out {self.out} already holds a run ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}); "
                f"--no-resume would mix two runs in one folder: pick another --out, or delete {self.out} first "
                f"(without --no-resume the run there continues)")

    def resume(self, student, ema, optimizer, centers, cfg):
        """Load the newest checkpoint that loads, falling back past unreadable ones with a warning; the step to
        start from (0 without any checkpoint). A checkpoint of another model is an error, not a fallback."""
        from torch.distributed.checkpoint import CheckpointException  # a BaseException: named apart
        failed = []
        for path in reversed(self._folders()):
            try:
                step = self.load(path, student, ema, optimizer, centers, cfg)
            except cli.UserError:
                raise
            except (Exception, CheckpointException) as e:  # truncated shard, no extra.pt, torn metadata: go back one
                why = (str(e).strip().splitlines() or [""])[0][:200]
                failed.append(path.name)
                print0(f"warning: checkpoint {path} is incomplete or unreadable ({type(e).__name__}: {why}); "
                       f"trying the one before it")
                continue
            past = f", past the unreadable {', '.join(failed)} (left in place; the next save replaces it)" \
                if failed else ""
            print0(f"resumed from {path} at step {step}{past}")
            return step
        if failed:
            raise cli.UserError(f"no checkpoint in {self.out} can be loaded ({', '.join(failed)}); delete them to "
                                f"start over there, or pick another --out")
        return 0

    def check_finite(self, step, modules=(), first_bad=None, terms=()):
        """The one finiteness check: raise NonFiniteError unless every parameter and buffer of `modules` is finite
        and no loss term was non-finite (first_bad: the first non-finite step per term, -1 if none). The verdict is
        reduced over ranks, so every rank raises together, before anything is written. One host sync."""
        tensors = [local_tensor(t) for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
        device = tensors[0].device if tensors else first_bad.device
        ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else torch.tensor(True)
        flags = first_bad if first_bad is not None else torch.full((0,), -1, dtype=torch.long, device=device)
        status = torch.cat([(~ok).long().view(1).to(device), flags.long()])
        if is_dist():
            dist.all_reduce(status, op=dist.ReduceOp.MAX)
        status = status.tolist()
        bad = [(b, t) for b, t in zip(status[1:], terms) if b >= 0]
        if not bad and not status[0]:
            return
        what = f"non-finite loss: term '{min(bad)[1]}' at step {min(bad)[0]}" if bad else \
            f"non-finite weights after step {step}"
        raise NonFiniteError(f"{what}; nothing was saved after it. {self.last_good()}")

    def last_good(self):
        """Where a run that stopped on a non-finite value can start again."""
        latest = self.latest()
        advice = "a lower --base-lr or --clip-grad, or another --seed, may avoid the divergence"
        if latest is None:
            return f"No checkpoint was saved before it (check --init-from and the data; {advice})"
        return f"The last good checkpoint is {latest}: the same command resumes from it ({advice})"

    def save(self, step, student, ema, optimizer, centers, cfg, first_bad=None, terms=()):
        import torch.distributed.checkpoint as dcp
        self.check_finite(step, [student, ema, *centers.values()], first_bad, terms)  # a bad state is never saved
        final = self.out / f"ckpt_{step:08d}"
        tmp = self.out / f"ckpt_{step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        with warnings.catch_warnings():  # one process: DCP warns that it is not distributed, which is intended
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(self._state(student, ema, optimizer), checkpoint_id=str(tmp), no_dist=not is_dist())
        if self.rank == 0:  # small replicated state: step, centres, config
            torch.save({"step": step, "centers": {k: c.state_dict() for k, c in centers.items()},
                        "config": dataclasses.asdict(cfg)}, tmp / "extra.pt")
            publish(tmp, final)
            # only complete checkpoints count, and only finite ones were ever saved: pruning keeps good ones
            done = [p for p in self._folders() if (p / "extra.pt").is_file()]
            for old in done[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def _state(self, student, ema, optimizer):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
        s_model, s_optim = get_state_dict(student, optimizer)
        return {"student": s_model, "optimizer": s_optim, "ema": get_model_state_dict(ema)}

    def load(self, path, student, ema, optimizer, centers, cfg):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
        extra_path = Path(path) / "extra.pt"
        if not extra_path.exists():
            raise RuntimeError(f"{path} is not a complete checkpoint (no extra.pt)")
        extra = torch.load(extra_path, map_location="cpu", weights_only=True)  # step, centres, config: plain data
        saved = extra["config"]
        shape_fields = ("arch", "patch_size", "num_registers", "ffn", "n_prototypes", "head_hidden_dim",
                        "head_bottleneck_dim", "separate_ibot_head", "ibot_n_prototypes", "ibot_bottleneck_dim")
        diff = {k: (saved.get(k), getattr(cfg, k)) for k in shape_fields if saved.get(k) != getattr(cfg, k)}
        if diff:
            raise cli.UserError(f"checkpoint {path} was trained with a different model: {diff} (saved, now); "
                                f"use the saved flags or another --out")
        state = self._state(student, ema, optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path), no_dist=not is_dist())
        set_state_dict(student, optimizer, model_state_dict=state["student"], optim_state_dict=state["optimizer"])
        set_model_state_dict(ema, state["ema"])
        for k, c in centers.items():
            c.load_state_dict(extra["centers"][k])
        return extra["step"]

    def export(self, model, cfg, name="teacher", step=None):
        """<name>.pth (backbone + heads + config, what distill.py reads) and <name>_backbone.pth (the released hub
        layout, what util.weights.from_pretrained, evaluate.py and the released code read). Never a non-finite model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        self.check_finite(step, [model])
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            backbone = {k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")}
            atomic_save(backbone, self.out / f"{name}_backbone.pth")
            atomic_save({"model": full, "config": dataclasses.asdict(cfg)}, self.out / f"{name}.pth")
        barrier()


def publish(tmp, path):
    """The one rename that makes a finished file or folder appear under its name: readers see it whole or not at
    all (os.replace is atomic on one filesystem). A folder already there is replaced."""
    if Path(path).is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def atomic_write(path, write):
    """write(tmp) to `path`.tmp, then publish it as `path`: a crash or Ctrl-C mid-write leaves the old file intact.
    Every file the project writes for a user goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    publish(tmp, path)
    return path


def atomic_save(obj, path):
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path, text):
    return atomic_write(path, lambda tmp: tmp.write_text(text))
