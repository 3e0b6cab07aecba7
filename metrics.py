"""The run's log: loss terms and diagnostics per log step in metrics.jsonl, the progress bar, the online k-NN monitor,
the collapse alarm, the count of unreadable files, Ctrl-C, and the loss plot at the end.

The loss terms accumulate on the device; every --log-every steps (and at monitor steps) one host sync reduces them
over ranks and checks that they are finite, and rank 0 appends a row to metrics.jsonl and updates the bar.

    Logger          the per-step bookkeeping of train.fit
    StopRequest     Ctrl-C / SIGTERM: finish the step, save, exit 130
    trim_metrics    metrics.jsonl cut back to a resumed step (a torn last line dropped)
    plot_run        loss.png (visualize.plot_curves) at the end of a run
"""
import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
from checkpoint import NonFiniteError, atomic_write_text
from data import SkipReport
from distributed import is_dist, print0
from losses import CollapseAlarm, teacher_diagnostics
from plan import flops_per_image, peak_flops


TERMS = ("dino_global", "dino_local", "ibot", "koleo")


class Logger:
    def __init__(self, run, start, n_images, ckpt, monitor=None):
        cfg, self.run, self.ckpt = run.cfg, run, ckpt
        self.out = Path(cfg.out)
        self.monitor = monitor  # train.build_monitor's k-NN monitor (or None); every rank calls it
        self.alarm = CollapseAlarm(cfg.n_prototypes, window=max(20, run.total // 10))  # a tenth of the run, >= 20
        self.knn = None  # the monitor's last k-NN top-1
        self.flops = flops_per_image(run.student.backbone, cfg) * cfg.batch_size  # per rank and step
        self.peak = peak_flops(run.device)
        self.running = torch.zeros(len(TERMS) + 1, device=run.device)  # summed terms + step count (no sync)
        self.first_bad = torch.full((len(TERMS),), -1, dtype=torch.long, device=run.device)  # per term
        self.stop = StopRequest()
        self.skips = SkipReport(cfg.epoch_length, prefix=f"rank {run.rank}: " if run.world > 1 else "",
                                write=tqdm.write)
        if run.rank == 0:
            self.describe(n_images)
            trim_metrics(self.out / "metrics.jsonl", start)  # keep the history up to the resumed step
        self.bar = tqdm(total=run.total, initial=start, disable=run.rank != 0, dynamic_ncols=True, desc=run.export)
        self.t_last = time.perf_counter()

    def describe(self, n_images):
        run, cfg = self.run, self.run.cfg
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        print(f"changed from the defaults (preset and flags): {cli.changes(cfg)}")
        print(f"derived: world {run.world}, strategy {run.strategy}, device {run.device}, global batch "
              f"{cfg.batch_size * run.world}, peak lr {run.sched['lr'].max():.3g}, iterations {run.total}, images "
              f"{n_images}, train GFLOPs/image {self.flops / cfg.batch_size / 1e9:.2f}", flush=True)
        if self.monitor is not None:
            print(f"k-NN monitor: every {cfg.monitor_every} steps, {len(self.monitor.labels[0])} bank images, "
                  f"{len(self.monitor.labels[1])} queries; raw-pixel k-NN on the same split "
                  f"{self.monitor.raw_pixels:.1f}%", flush=True)

    def step(self, step, losses, t_cls, norms):
        """Accumulate this step's terms; at a log step write the row. Returns True when every rank agreed to stop."""
        run, cfg = self.run, self.run.cfg
        vals = torch.stack([losses[k].detach().float() for k in TERMS])
        self.running += torch.cat([vals, vals.new_ones(1)])
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(vals), step, self.first_bad)
        self.bar.update(1)
        last = step + 1 == run.total
        monitor_now = self.monitor is not None and ((step + 1) % cfg.monitor_every == 0 or last)
        if not ((step + 1) % cfg.log_every == 0 or last or monitor_now or (self.stop.requested and not is_dist())):
            return False
        stats = torch.cat([self.running, torch.tensor([float(self.stop.requested)], device=run.device)])
        if is_dist():
            dist.all_reduce(stats)  # sums over ranks; a stop asked on any rank stops all of them
            dist.all_reduce(self.first_bad, op=dist.ReduceOp.MAX)
        stats, bad = stats.tolist(), self.first_bad.tolist()  # the one host sync per log step
        if max(bad) >= 0:
            bad_step, name = min((b, t) for b, t in zip(bad, TERMS) if b >= 0)
            raise NonFiniteError(f"non-finite loss: term '{name}' at step {bad_step}; nothing was saved after it. "
                                 f"{self.ckpt.last_good()}")
        now = time.perf_counter()
        n_steps = stats[len(TERMS)] / run.world
        means = {k: stats[i] / stats[len(TERMS)] for i, k in enumerate(TERMS)}
        # this rank's gradient norms and teacher diagnostics, fetched in one copy
        *norm_vals, entropy, used, rho = torch.stack([*norms.values(), *teacher_diagnostics(t_cls)]).tolist()
        teacher_temp = float(run.sched["teacher_temp"][step])
        row = dict(step=step + 1, loss=sum(means.values()), **means, lr=float(run.sched["lr"][step]),
                   wd=float(run.sched["wd"][step]), momentum=float(run.sched["momentum"][step]),
                   teacher_temp=teacher_temp, **dict(zip(norms, norm_vals)), teacher_entropy=entropy,
                   prototypes_used=int(used), teacher_view_corr=rho,
                   images_per_s=n_steps * cfg.batch_size * run.world / (now - self.t_last), **self.skips.row())
        if run.device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
            if self.peak:
                row["mfu"] = n_steps * self.flops / (now - self.t_last) / self.peak
        self.running.zero_()
        alert = self.alarm.update(step + 1, entropy, int(used), t_cls.shape[0], rho, cfg.student_temp / teacher_temp)
        if alert:
            row["alarm"] = alert
            if run.rank == 0:
                tqdm.write(alert)
        if monitor_now:  # after the throughput figure, which it must not count
            with run.autocast:
                self.knn = self.monitor(lambda x: run.ema(x)["cls"], run.device)
            row.update(knn_top1=self.knn, knn_raw_pixels=self.monitor.raw_pixels, monitor_s=time.perf_counter() - now)
        self.t_last = time.perf_counter()
        if run.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", dino=f"{means['dino_global'] + means['dino_local']:.3f}",
                                 ibot=f"{means['ibot']:.3f}", koleo=f"{means['koleo']:.3f}",
                                 **({} if self.knn is None else {"knn": f"{self.knn:.1f}%"}))
        return stats[-1] > 0

    def close(self):
        self.bar.close()


class StopRequest:
    """Ctrl-C / SIGTERM: finish the current step, save, exit. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.pid = os.getpid()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a DataLoader worker (forked with this handler): the main process decides
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print0("\nstop requested: saving a checkpoint after this step (Ctrl-C again to quit now)")


def trim_metrics(path, step):
    """Keep metrics.jsonl's rows up to `step` (the resumed one); a torn line (a kill mid-write) is dropped, with a
    warning, instead of stopping the run."""
    path = Path(path)
    if not path.exists():
        return
    rows, torn = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            if row["step"] <= step:
                rows.append(line)
        elif line.strip():
            torn += 1
    if torn:
        print(f"warning: {path}: dropped {torn} unreadable line(s) (a run killed while writing?)")
    atomic_write_text(path, "".join(r + "\n" for r in rows))


def plot_run(out):
    try:
        from visualize import plot_curves
        plot_curves(out, out / "loss.png")
    except Exception as e:  # a plot must never cost a finished run
        print(f"(no loss plot: {e})")
