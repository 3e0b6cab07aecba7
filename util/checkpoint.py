"""Checkpoints of a training run (train.py's plumbing, not the method) that never lie: written whole or not at all,
never non-finite, resumed exactly. One format for every strategy: torch.distributed.checkpoint (DCP), each rank
writing its own shards, so a vit_g under FSDP2 is never gathered on one GPU. Used by `python train.py`.

    NonFiniteError     the run diverged: one `error:` line naming the step and the last good checkpoint
    Checkpointer       claim --out, resume (past a corrupt checkpoint), check_finite, save, load, export
    atomic_write       write `<name>.tmp`, then rename: the one writer of every file (atomic_save, atomic_write_text)
"""
import dataclasses
import os
import shutil
import warnings
from pathlib import Path

import torch

from util import cli
from util.distributed import all_reduce_, barrier, is_dist, local_tensor, print0


class NonFiniteError(cli.UserError, FloatingPointError):
    """A loss or a weight went NaN / inf: one `error:` line (a UserError), a FloatingPointError for callers of that."""


class Checkpointer:
    def __init__(self, out, keep_last, rank):
        self.out, self.keep_last, self.rank = Path(out), keep_last, rank

    def _folders(self):
        return sorted(p for p in self.out.glob("ckpt_*") if p.is_dir() and not p.name.endswith(".tmp"))

    def latest(self):
        """The newest complete checkpoint (DCP metadata and extra.pt both written), or None."""
        done = [p for p in self._folders() if (p / ".metadata").is_file() and (p / "extra.pt").is_file()]
        return done[-1] if done else None

    def claim(self, resume):
        """Make the run folder; a file of that name is an error, and so (--no-resume) is a folder holding a run."""
        if self.out.exists() and not self.out.is_dir():
            raise cli.UserError(f"--out {self.out} is a file, not a folder: pick another --out (the run writes "
                                f"checkpoints, metrics.jsonl and its exports into that folder)")
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier()
        if resume:
            return
        held = [*self._folders(), *sorted(self.out.glob("*.pth")), self.out / "metrics.jsonl"]  # what a run writes
        found = [p.name for p in held if p.exists()]
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
        """The one finiteness check: NonFiniteError unless every float tensor of `modules` is finite and no term of
        `terms` went non-finite (first_bad: its first such step, -1 if none); on every rank together. One host sync."""
        tensors = [local_tensor(t) for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
        device = tensors[0].device if tensors else first_bad.device
        ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else torch.tensor(True)
        flags = first_bad if first_bad is not None else torch.full((0,), -1, dtype=torch.long, device=device)
        status = torch.cat([(~ok).long().view(1).to(device), flags.long()])
        status = all_reduce_(status, "max").tolist()
        bad = [(b, t) for b, t in zip(status[1:], terms) if b >= 0]
        if not bad and not status[0]:
            return
        what = f"non-finite loss: term '{min(bad)[1]}' at step {min(bad)[0]}" if bad else \
            f"non-finite weights after step {step}"
        advice = "a lower --base-lr or --clip-grad, or another --seed, may avoid the divergence"
        latest = self.latest()  # where the run can start again
        where = f"No checkpoint was saved before it (check --init-from and the data; {advice})" if latest is None \
            else f"The last good checkpoint is {latest}: the same command resumes from it ({advice})"
        raise NonFiniteError(f"{what}; nothing was saved after it. {where}")

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
        if self.rank == 0:  # small replicated state (step, centres, config), then the rename that completes it
            extra = {"step": step, "centers": {k: c.state_dict() for k, c in centers.items()},
                     "config": dataclasses.asdict(cfg)}
            atomic_write(final, lambda tmp_folder: torch.save(extra, tmp_folder / "extra.pt"))
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


def atomic_write(path, write):
    """write(tmp) fills `path`.tmp, then one rename makes it `path` (a folder already there is replaced): readers see
    it whole or not at all, and a crash or Ctrl-C mid-write leaves the old one intact. Every file goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)  # atomic on one filesystem
    return path


def atomic_save(obj, path):
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path, text):
    return atomic_write(path, lambda tmp: tmp.write_text(text))
