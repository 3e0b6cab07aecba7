"""The run's log (plumbing, no paper section): metrics.jsonl, the progress bar, the online k-NN monitor, the files
the stream skipped, Ctrl-C, the loss plot, and the collapse alarm on the teacher's targets. The loss terms add up on
the device; every --log-every steps (and at monitor steps) one host sync reduces them over ranks and rank 0 writes a
row. Used by train.py: `python train.py`.

    Logger, build_monitor, KnnMonitor     the per-step bookkeeping of train.fit; its k-NN monitor (or None)
    SkipReport, StopRequest               the files the stream skipped; Ctrl-C / SIGTERM: save, then exit 130
    trim_metrics, plot_run                metrics.jsonl cut back to a resumed step; loss.png at the end
    teacher_diagnostics, CollapseAlarm    entropy, prototypes used, cross-view correlation; the warning they feed
"""
import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from util import cli
from util.checkpoint import atomic_write_text
from util.distributed import all_reduce_, is_dist, print0
from util.plan import flops_per_image, peak_flops


TERMS = ("dino_global", "dino_local", "ibot", "koleo")


class Logger:
    def __init__(self, run, start, n_images, ckpt, monitor=None):
        cfg, self.run, self.ckpt = run.cfg, run, ckpt
        self.metrics = Path(cfg.out) / "metrics.jsonl"
        self.monitor = monitor  # build_monitor's k-NN monitor (or None); every rank calls it
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
            trim_metrics(self.metrics, start)  # keep the history up to the resumed step
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
        self.ckpt.check_finite(step, first_bad=self.first_bad, terms=TERMS)  # every rank stops on a bad term
        all_reduce_(stats)  # sums over ranks; a stop asked on any rank stops all of them
        stats = stats.tolist()  # the host sync of a log step
        now = time.perf_counter()
        n_steps = stats[len(TERMS)] / run.world
        means = {k: stats[i] / stats[len(TERMS)] for i, k in enumerate(TERMS)}
        # this rank's gradient norms and teacher diagnostics, fetched in one copy
        *norm_vals, entropy, used, rho = torch.stack([*norms.values(), *teacher_diagnostics(t_cls)]).tolist()
        sched = {k: float(run.sched[k][step]) for k in ("lr", "wd", "momentum", "teacher_temp")}
        row = dict(step=step + 1, loss=sum(means.values()), **means, **sched, **dict(zip(norms, norm_vals)),
                   teacher_entropy=entropy, prototypes_used=int(used), teacher_view_corr=rho,
                   images_per_s=n_steps * cfg.batch_size * run.world / (now - self.t_last), **self.skips.row())
        if run.device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
            if self.peak:
                row["mfu"] = n_steps * self.flops / (now - self.t_last) / self.peak
        self.running.zero_()
        alert = self.alarm.update(step + 1, entropy, int(used), t_cls.shape[0], rho,
                                  cfg.student_temp / sched["teacher_temp"])
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
            with open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", dino=f"{means['dino_global'] + means['dino_local']:.3f}",
                                 ibot=f"{means['ibot']:.3f}", koleo=f"{means['koleo']:.3f}",
                                 **({} if self.knn is None else {"knn": f"{self.knn:.1f}%"}))
        return stats[-1] > 0

    def close(self):
        self.bar.close()


def build_monitor(cfg, n_images):
    """The online k-NN monitor (KnnMonitor below), or None when it is off. Its bank and queries: synthetic training
    images and as many of another seed, or --monitor-data (--data with class sub-folders) halved by a fixed shuffle."""
    if cfg.monitor_every <= 0 or cfg.monitor_images <= 0:
        return None
    from data import ImageFolderDataset, SyntheticDataset, variant
    n = cfg.monitor_images
    folder = cfg.monitor_data or cfg.data
    if folder:
        images = ImageFolderDataset(folder)
        if len(images.classes) < 2:
            print0(f"k-NN monitor off: {folder} has no class sub-folders (pass --monitor-data FOLDER with them)")
            return None
        order = np.random.default_rng(cfg.seed).permutation(len(images))
        bank, queries = (torch.utils.data.Subset(images, order[half::2][:n].tolist()) for half in (0, 1))
    else:
        kind = variant(vars(cfg))
        images = bank = SyntheticDataset(n=min(n, n_images), size=cfg.synthetic_size, seed=cfg.seed, **kind)
        queries = SyntheticDataset(n=n, size=cfg.synthetic_size, seed=cfg.seed + 1, **kind)
    grey = cfg.p_grayscale >= 1  # a run that only sees grey crops is read on grey images, its raw-pixel floor too
    return KnnMonitor(bank, queries, len(images.classes), cfg.global_size, cfg.patch_size, grey=grey)


class KnnMonitor:
    """Online k-NN during training (as solo-learn and lightly do): the released k-NN's top-1 (k=20, T=0.07) of the
    cls token, a labelled bank against held-out queries, transformed once (a check is one forward of each).
    `raw_pixels` is the same k-NN on raw_pixel_features: the floor a learned feature must clear.
    """

    def __init__(self, bank, queries, n_classes: int, size: int, patch: int, batch_size: int = 250,
                 grey: bool = False):
        from evaluate import EvalTransform, knn_accuracy, raw_pixel_features  # imported only when the monitor is on
        crop = not hasattr(bank, "sample")  # synthetic images are square and framed already
        transform = EvalTransform(size, crop=crop, patch=patch, grey=grey)
        self.n_classes, self.batch_size, self.knn_accuracy = n_classes, batch_size, knn_accuracy
        self.images, self.labels = [], []
        for ds in (bank, queries):
            items = [ds[i] for i in range(len(ds))]
            self.images.append(torch.stack([transform(img) for img, _ in items]))  # (N, 3, size, size)
            self.labels.append(torch.tensor([label for _, label in items], dtype=torch.long))  # (N,)
        self.raw_pixels = knn_accuracy(raw_pixel_features(bank, crop=crop, grey=grey), self.labels[0],
                                       raw_pixel_features(queries, crop=crop, grey=grey), self.labels[1], n_classes,
                                       ks=(20,))[20]["top1"]

    @torch.no_grad()
    def __call__(self, embed, device) -> float:
        """k-NN top-1 % of `embed`, a function images (B, 3, H, W) -> cls tokens (B, D)."""
        bank, queries = [torch.cat([embed(x[i:i + self.batch_size].to(device)).float().cpu()  # (N, D), (Q, D)
                                    for i in range(0, len(x), self.batch_size)]) for x in self.images]
        return self.knn_accuracy(bank, self.labels[0], queries, self.labels[1], self.n_classes, ks=(20,))[20]["top1"]


class SkipReport:
    """The unreadable files the stream skipped (batch["skipped"]), reported by the main process, not by the DataLoader
    workers that meet them: the first `name_limit` named, then each epoch's count; `row()` is the metrics.jsonl key."""

    def __init__(self, epoch_length, name_limit=5, prefix="", write=print):
        self.epoch_length, self.name_limit, self.prefix, self.write = epoch_length, name_limit, prefix, write
        self.files, self.in_epoch = set(), 0  # distinct unreadable files so far; skips in this epoch

    def update(self, paths, step):
        """`paths`: the files skipped to build the batch of iteration `step`."""
        for path in paths:
            self.in_epoch += 1
            if path not in self.files:
                self.files.add(path)
                if len(self.files) <= self.name_limit:
                    more = "; the next ones are only counted" if len(self.files) == self.name_limit else ""
                    self.write(f"{self.prefix}skipping unreadable file {path}{more}")
        if (step + 1) % self.epoch_length == 0 and self.in_epoch:
            self.write(f"{self.prefix}epoch {(step + 1) // self.epoch_length}: {self.in_epoch} sample(s) skipped for "
                       f"unreadable files ({len(self.files)} distinct unreadable files so far)")
            self.in_epoch = 0

    def row(self) -> dict:
        return {"skipped_files": len(self.files)}


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
    """Keep metrics.jsonl's rows up to the resumed `step`; a torn line (a kill mid-write) is dropped with a warning."""
    path = Path(path)
    if not path.exists():
        return
    rows, torn = [], 0
    for line in filter(str.strip, path.read_text().splitlines()):  # blank lines are no rows
        try:
            row_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):  # a torn line, or JSON that is not an object
            row_step = None
        if not isinstance(row_step, int):
            torn += 1
        elif row_step <= step:
            rows.append(line)
    if torn:
        print(f"warning: {path}: dropped {torn} unreadable line(s) (a run killed while writing?)")
    atomic_write_text(path, "".join(r + "\n" for r in rows))


def plot_run(out):
    try:
        from visualize import plot_curves
        plot_curves(out, out / "loss.png")
    except Exception as e:  # a plot must never cost a finished run
        print(f"(no loss plot: {e})")


# -----------------------------------------------------------------------------
# Collapse watch. DINO has two trivial solutions that centering and sharpening are there to avoid: a uniform teacher
# (every image gets the same flat target, so the cls token learns nothing) and a one-hot one (every image lands on
# the same few prototypes). Both show in the teacher's targets long before they show in a downstream score.

def teacher_diagnostics(t_cls: torch.Tensor):
    """On the teacher's cls targets t_cls (2B, K), view-major (rows b and B + b: image b's two global views): the mean
    row entropy (0 = one-hot, ln K = uniform), the prototypes that win a row, and rho, the views' correlation of the
    log-targets after double centring (removing the row and column shifts of a centre or Sinkhorn-Knopp). The student's
    best linear estimate of the other view's deviation scales it by rho * student_temp / teacher_temp: below 1 the
    deviations shrink each step (the uniform target holds: collapse), above 1 they grow (the targets sharpen)."""
    p = t_cls.float()  # (2B, K)
    log_p = p.clamp_min(1e-12).log()
    entropy = -(p * log_p).sum(-1).mean()
    used = torch.zeros(p.shape[-1], device=p.device).index_fill_(0, p.argmax(-1), 1.0).sum()
    views = log_p.view(2, -1, p.shape[-1])  # (2, B, K)
    d = views - views.mean(1, keepdim=True)  # minus each prototype's mean over the images
    d = d - d.mean(2, keepdim=True)  # minus each row's mean over the prototypes
    rho = (d[0] * d[1]).sum() / (d[0].norm() * d[1].norm()).clamp_min(1e-12)
    return entropy, used, rho


class CollapseAlarm:
    """Warns once per symptom when the teacher stays uniform (entropy within `tolerance` of ln K) or puts its crops
    on at most `handful` prototypes, at every check over at least `window` steps. A warning: training goes on."""

    ADVICE = {
        "uniform": "every image gets the same flat target, so the cls token learns nothing. What usually helps: "
                   "views that agree more at the start (weaker colour jitter or grey crops, larger crops, fewer "
                   "local crops), a --base-lr the backbone can train at, LayerScale above 1e-5 for short runs; a "
                   "lower --teacher-temp lowers the bar but can collapse onto a few prototypes (see ABLATIONS.md).",
        "few": "the features have collapsed onto a few points. What usually helps: --centering sinkhorn_knopp, a "
               "higher --teacher-temp or a longer --warmup-teacher-temp-epochs, a lower --base-lr.",
    }

    def __init__(self, n_prototypes: int, window: int, tolerance: float = 0.03, handful: int = 3):
        self.n_prototypes, self.window, self.tolerance, self.handful = n_prototypes, window, tolerance, handful
        self.since = {"uniform": None, "few": None}  # first step of the current streak of each symptom
        self.fired = set()

    def update(self, step, entropy, used, n_rows, rho=None, temp_ratio=None) -> str | None:
        """Feed one check (teacher_diagnostics of the cls targets of `n_rows` crops; temp_ratio = student_temp /
        teacher_temp); returns a warning the first time a symptom has lasted `window` steps, else None."""
        log_k = math.log(self.n_prototypes)
        leave = (f"; cross-view correlation {rho:.2f} x student_temp / teacher_temp {temp_ratio:.3g} = "
                 f"{rho * temp_ratio:.2g}, leaving needs > 1") if rho is not None and temp_ratio else ""
        symptoms = {  # name: (present now, what it looks like)
            "uniform": (entropy >= (1 - self.tolerance) * log_k, f"the teacher's cls targets have been uniform "
                        f"(entropy {entropy:.3f}, ln K = {log_k:.3f}{leave})"),
            "few": (used <= self.handful < n_rows // 4,  # a tiny batch cannot show "few"
                    f"the teacher has put every crop on {used} prototype(s) of {self.n_prototypes}")}
        message = None
        for name, (present, what) in symptoms.items():
            if not present:
                self.since[name] = None
                continue
            if self.since[name] is None:
                self.since[name] = step
            if step - self.since[name] >= self.window and name not in self.fired:
                self.fired.add(name)
                message = f"warning: collapse alarm at step {step}: {what} for {step - self.since[name]} steps: " \
                          f"{self.ADVICE[name]}"
        return message
