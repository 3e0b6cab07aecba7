"""Pictures of a DINOv2 backbone: PCA maps of patch features, cls attention, training schedules and curves.

Paper §7 qualitative results and Figure 1 ("PCA of patch features"; not in the released code): each image's first
PCA component of its patch features, thresholded, is the foreground; a 3-component PCA of the foreground patches of
ALL images jointly (one basis: a part has one colour in every image) is shown as RGB. Optionally each head's cls
attention; or the schedules (paper §5, released `ssl_default_config.yaml`), curves and k-NN monitors of runs.

Public names, in reading order:
    resize_to_patches, collect_images        -- any image, any aspect ratio, to a whole number of patches
    pca_maps, cls_attention, plot_features   -- the PCA / attention figure
    plot_schedules, read_metrics, plot_curves, monitor_series, plot_compare
    VizConfig, main

Commands:
    python visualize.py                                    # 4 synthetic images through runs/train/teacher_backbone.pth
    python visualize.py photos/ --weights dinov2_vits14_reg4_pretrain.pth --size 448 --attention --out viz.png
    python visualize.py --curves runs/train --out curves.png
    python visualize.py --compare runs/train runs/long --out compare.png   # k-NN monitors of several runs

Shape alphabet: N patches, D width, H heads, h x w patch grid.
"""
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from util import cli  # noqa: E402
import data  # noqa: E402
from util.cli import UserError, arg  # noqa: E402
from util.runlog import TERMS  # noqa: E402  (the metric names of train.py's loss terms)
from data import to_grey, to_tensor, variant  # noqa: E402
from util.distributed import pick_device  # noqa: E402
from evaluate import (DEFAULT_WEIGHTS, border_mask, first_principal_component, load_backbone,  # noqa: E402
                      round_to_patch, saw_only_grey, training_config)


# ---------------------------------------------------------------------------------------------------------------
# Images in


def resize_to_patches(img: Image.Image, size: int, patch: int) -> Image.Image:
    """Shorter side to `size`, aspect ratio kept, both sides rounded to whole patches (at least one: tiny ones grow)."""
    w, h = img.size
    scale = size / min(w, h)
    return img.resize((round_to_patch(w * scale, patch), round_to_patch(h * scale, patch)), Image.BICUBIC)


def collect_images(inputs) -> list:
    """Paths and folders (searched recursively for image files) -> [(name, PIL RGB)]; unreadable ones skipped."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += [Path(p) for p in data.images_under(str(item))]  # the image finder of the training data
        elif item.exists():
            paths.append(item)  # an explicit file is tried whatever its extension
        else:
            warnings.warn(f"skipping {item}: no such file or folder")
    images = []
    for p in paths:
        try:
            images.append((p.name, data.load_image(p)))
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on corrupt files
            warnings.warn(f"skipping unreadable image {p}: {e}")
    return images


# ---------------------------------------------------------------------------------------------------------------
# The figure


def pca_maps(feats: list, grids: list) -> tuple:
    """Joint PCA maps of several images. feats: [(N_i, D)], grids: [(h_i, w_i)] with h_i * w_i = N_i.
    Returns ([rgb (h_i, w_i, 3) in [0, 1], background black], [foreground (h_i, w_i) bool])."""
    x = torch.cat([f.float() for f in feats])  # (sum N_i, D)
    # Foreground: each image's own first principal component > 0, as evaluate.segmentation_iou scores it.
    # NOTE(deviation): Figure 1 thresholds one PCA over images of one category; over unrelated images that component
    # separates the images (by colour, say), not object from background. The colours still share one basis.
    fgs = []
    for f, (h, w) in zip(feats, grids):
        score = first_principal_component(f)  # (N_i,)
        # the sign is arbitrary: the outer ring of patches (mostly background, photos and synthetic) goes below 0
        if score[border_mask(h, w)].mean() > 0:
            score = -score
        fg_i = score > 0
        fgs.append(fg_i if fg_i.sum() >= 1 else torch.ones_like(fg_i))  # nothing separable: colour every patch
    fg = torch.cat(fgs)  # (sum N_i,)
    centred = x[fg] - x[fg].mean(dim=0, keepdim=True)  # (M, D) foreground patches of all images
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    comps = centred @ vh[:3].T  # (M, <=3): one shared basis for the batch
    comps = torch.cat([comps, comps.new_zeros(len(comps), 3 - comps.shape[1])], dim=1)  # (M, 3)
    lo, hi = comps.min(dim=0).values, comps.max(dim=0).values
    rgb = torch.zeros(len(x), 3)
    rgb[fg] = (comps - lo) / (hi - lo).clamp_min(1e-8)  # min-max over all images, per channel
    sizes = [h * w for h, w in grids]
    return ([m.reshape(h, w, 3).numpy() for m, (h, w) in zip(rgb.split(sizes), grids)],
            [m.reshape(h, w).numpy() for m, (h, w) in zip(fg.split(sizes), grids)])


@torch.inference_mode()
def cls_attention(model, x: torch.Tensor) -> torch.Tensor:
    """Last block's attention of the cls token to each patch, per head: x (1, 3, H, W) -> (H, h, w). Register
    tokens (released *_reg models), which sit between cls and the patches, are excluded."""
    attn = model.get_last_self_attention(x).float()  # (1, H, 1+R+N, 1+R+N)
    h, w = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    return attn[0, :, 0, 1 + model.num_register_tokens:].reshape(-1, h, w).cpu()  # (H, h, w)


def plot_features(model, images: list, size: int, out: str, attention: bool = False, device=None) -> Path:
    """One row per image: the image, its PCA map, [cls attention of each head]. Writes a PNG and returns its path."""
    device = torch.device(device or next(model.parameters()).device)
    resized, feats, grids, attns = [], [], [], []
    for _, img in images:
        img = resize_to_patches(img, size, model.patch_size)
        x = to_tensor(img)[None].to(device)  # (1, 3, H, W); each image alone: the sizes may all differ
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(model.forward_features(x)["x_norm_patchtokens"][0].float().cpu())  # (N, D)
            if attention:
                attns.append(cls_attention(model, x))
        resized.append(img)
        grids.append((x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size))
    maps, _ = pca_maps(feats, grids)

    n_cols = 2 + (model.num_heads if attention else 0)
    fig, axes = plt.subplots(len(images), n_cols, figsize=(2.6 * n_cols, 2.6 * len(images)), squeeze=False)
    for row, ((name, _), img, rgb) in enumerate(zip(images, resized, maps)):
        axes[row, 0].imshow(img)
        axes[row, 0].set_title(f"{name[:24]} {img.size[0]}x{img.size[1]}", fontsize=8)
        axes[row, 1].imshow(rgb, interpolation="nearest")
        axes[row, 1].set_title("PCA (fg, 3 comps)", fontsize=8)
        for head in range(n_cols - 2):
            axes[row, 2 + head].imshow(attns[row][head].numpy(), cmap="inferno", interpolation="nearest")
            axes[row, 2 + head].set_title(f"cls attn head {head}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Schedules and training curves


def plot_schedules(schedules: dict, out) -> Path:
    """One panel per schedule of train.make_schedules (lr, wd, momentum, ...); `train.py --dry-run` draws the run's."""
    schedules = {k: np.asarray(v, dtype=float) for k, v in schedules.items()}
    schedules = {k: v for k, v in schedules.items() if v.ndim == 1 and len(v)}
    fig, axes = plt.subplots(1, len(schedules), figsize=(3.2 * len(schedules), 2.8), squeeze=False)
    for ax, (name, values) in zip(axes[0], schedules.items()):
        ax.plot(values)
        ax.set_title(f"{name}  [{values[0]:.3g} .. {values.max():.3g} .. {values[-1]:.3g}]", fontsize=8)
        ax.set_xlabel("iteration")
    fig.tight_layout()
    return _save(fig, out)


def read_metrics(path) -> list:
    """metrics.jsonl -> [dict]; lines that are not a JSON object are skipped with one warning."""
    rows, bad = [], 0
    for line in filter(str.strip, Path(path).read_text().splitlines()):  # blank lines are no rows
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        warnings.warn(f"{path}: skipped {bad} line(s) that are not JSON objects")
    return rows


def _is_curve(key: str) -> bool:
    return (key in ("lr", "teacher_entropy") or key.startswith("loss") or key.endswith("loss")
            or key.startswith(TERMS))


def _metrics_path(run: str, flag: str) -> Path:
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise cli.MissingFile(f"{flag}: no metrics file at {path} (run `python train.py` first)")
    return path


def plot_curves(run_dir: str, out: str) -> Path:
    """Every loss term and the lr of RUN_DIR/metrics.jsonl against the step, one panel each."""
    path = _metrics_path(run_dir, "--curves")
    rows = read_metrics(path)
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items()  # first-seen order, loss terms first, lr last
                              if _is_curve(k) and isinstance(v, (int, float)) and not isinstance(v, bool)))
    keys = sorted(keys, key=lambda k: k == "lr")
    if any("knn_top1" in r for r in rows):
        keys.insert(0, "knn_top1")  # the online k-NN monitor first: it is what says the run learns
    if not keys:
        raise UserError(f"--curves: no loss terms or lr in {path}")
    n_cols = min(3, len(keys))
    n_rows = math.ceil(len(keys) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.6 * n_cols, 2.6 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        # A key may be missing from some rows (e.g. a loss term switched off): plot only where it is present.
        pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows)
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        ax.plot(*zip(*pts), marker="o" if key == "knn_top1" else None, markersize=3)
        ax.set_title("k-NN top-1 % (teacher)" if key == "knn_top1" else key, fontsize=9)
        raw = monitor_series(rows)[2] if key == "knn_top1" else None  # the raw-pixel floor under the monitor
        if raw is not None:
            ax.axhline(raw, color="gray", linestyle="--", label=f"raw pixels {raw:.1f}")
            ax.legend(fontsize=7)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, out)


def monitor_series(rows: list) -> tuple:
    """The k-NN monitor of one run's metrics rows: (steps, k-NN top-1 %, raw-pixel k-NN % or None)."""
    pts = [(r.get("step", i), r["knn_top1"]) for i, r in enumerate(rows)
           if isinstance(r.get("knn_top1"), (int, float)) and math.isfinite(r["knn_top1"])]
    raw = [r["knn_raw_pixels"] for r in rows if isinstance(r.get("knn_raw_pixels"), (int, float))]
    steps, knn = (list(t) for t in zip(*pts)) if pts else ([], [])
    return steps, knn, (raw[-1] if raw else None)


def plot_compare(runs: list, out: str) -> Path:
    """The k-NN monitors of several runs on one axis (does more compute, or a flag, help?), each with its raw-pixel
    line, and their learning rates beside it (where each run's schedule ends)."""
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw=dict(width_ratios=(2, 1)))
    raw_drawn = set()  # runs on the same monitor split share one raw-pixel line
    for i, run in enumerate(runs):
        rows = read_metrics(_metrics_path(run, "--compare"))
        steps, knn, raw = monitor_series(rows)
        if not steps:
            raise UserError(f"--compare: {run} logged no k-NN monitor (train with --monitor-every N > 0)")
        colour = f"C{i}"
        ax.plot(steps, knn, marker="o", markersize=3, color=colour, label=f"{run}  (last {knn[-1]:.1f})")
        if raw is not None and round(raw, 3) not in raw_drawn:
            raw_drawn.add(round(raw, 3))
            ax.axhline(raw, color=colour, linestyle="--", linewidth=0.8, label=f"raw pixels ({raw:.1f})")
        lr = [(r.get("step", j), r["lr"]) for j, r in enumerate(rows) if isinstance(r.get("lr"), (int, float))]
        if lr:
            ax_lr.plot(*zip(*lr), color=colour)
    ax.set_title("k-NN top-1 % of the teacher (online monitor)", fontsize=9)
    ax.legend(fontsize=7)
    ax_lr.set_title("learning rate", fontsize=9)
    for a in (ax, ax_lr):
        a.set_xlabel("step")
    fig.tight_layout()
    return _save(fig, out)


# ---------------------------------------------------------------------------------------------------------------
# Command line


@dataclass
class VizConfig:
    images: list[str] = arg([], "image files or folders; none: a few synthetic images")
    weights: str | None = arg(None, "backbone file; none: runs/train/teacher_backbone.pth")
    arch: str = arg("vit_tiny", "architecture of --random")
    random: bool = arg(False, "a randomly initialised --arch instead of weights (what structure is there for free)")
    size: int | None = arg(None, "shorter side, rounded to the patch; none: 112 synthetic, 224 images", check=(1, None))
    attention: bool = arg(False, "add the last block's cls attention of each head")
    n_synthetic: int = arg(4, "synthetic images when none are given", check=(1, None))
    out: str = arg("viz.png", "the PNG to write")
    curves: str | None = arg(None, "plot the curves of this run folder (or metrics.jsonl) instead")
    compare: list[str] = arg([], "run folders (or metrics.jsonl files): their k-NN monitors on one plot instead")

    def __post_init__(self):
        cli.check_fields(self)  # the declared ranges; below, the flags that exclude each other
        if self.weights is not None and self.random:
            raise ValueError("pass either --weights or --random, not both")
        if self.curves and self.compare:
            raise ValueError("pass either --curves or --compare, not both")


def parse_config(argv=None) -> VizConfig:
    """Image paths, then --field value for every other VizConfig field (cli.parse); unknown flags are an error."""
    return cli.parse(VizConfig, argv, __doc__, positional=("images",))


def main(argv=None) -> Path:
    cfg = parse_config(argv)
    print(f"config: {asdict(cfg)}")
    if cfg.curves:
        out = plot_curves(cfg.curves, cfg.out)
    elif cfg.compare:
        out = plot_compare(cfg.compare, cfg.out)
    else:
        synthetic = not cfg.images
        run = {} if cfg.random else training_config(Path(cfg.weights or DEFAULT_WEIGHTS).parent)  # the weights' run
        if synthetic:  # the variant of the synthetic set that run trained on
            ds = data.SyntheticDataset(n=cfg.n_synthetic, size=128, seed=1, **variant(run))
            images = [(f"synthetic {i}", ds.sample(i)[0]) for i in range(cfg.n_synthetic)]
        else:
            images = collect_images(cfg.images)
            if not images:
                raise UserError(f"no readable image among the inputs ({' '.join(cfg.images)})")
        if saw_only_grey(run):  # a network trained on grey crops is shown grey images (evaluate.py does the same)
            images = [(name, to_grey(img)) for name, img in images]
        size = cfg.size or (112 if synthetic else 224)
        device = pick_device()
        model = load_backbone(cfg.weights, cfg.arch, device, random_init=cfg.random, img_size=size)
        print(f"derived: device={device} size={round_to_patch(size, model.patch_size)} images={len(images)} "
              f"registers={model.num_register_tokens}")
        out = plot_features(model, images, size, cfg.out, cfg.attention, device)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    cli.run(main)
