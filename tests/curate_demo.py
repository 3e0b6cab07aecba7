"""The synthetic test pool for curate.py: the whole pipeline of paper section 3 on images whose truth is known.

The pool holds SyntheticDataset images with a 30:1 class imbalance, injected near-duplicates (JPEG re-encoded,
downscaled, cropped copies) and junk; seed images of 6 of its 8 classes; and an "evaluation set" of copies of pool
images that must not leak. Two training-free embedders stand in for the backbone: a copy-detection descriptor for
dedup and exclusion (the paper used a copy-detection model there) and a shape descriptor for retrieval and
clustering. run_demo curates the pool with curate.curate and scores every stage against the truth.

Public names, in reading order:
    CopyDescriptor, ShapeDescriptor             training-free embedders for the synthetic pool and the tests
    build_demo_pool, demo_metrics, run_demo     the pool (duplicates, imbalance, junk) and the scores of a run
    main                                        the command line

Run:  python tests/curate_demo.py [--out runs/curate_demo] [--root DIR]    (the pool goes to a temp folder by default)
"""
import dataclasses
import io
import math
import os
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root, when run as a script
from curate import CurateConfig, curate, embed, write_outputs  # noqa: E402
from util import cli  # noqa: E402
from util.cli import arg  # noqa: E402
from util.distributed import print0, rank_world  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# 1. Training-free embedders for the synthetic pool and the tests (curate.py takes any backbone)
# ---------------------------------------------------------------------------------------------------------------

def _unnormalise(x):
    from data import IMAGENET_MEAN, IMAGENET_STD
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std.to(x.device) + mean.to(x.device)).clamp(0, 1)  # (B, 3, H, W) RGB in [0, 1]


class CopyDescriptor(nn.Module):
    """Copy detection (the paper's dedup used a copy-detection model): the image at 6x6 and 3x3, mean-removed.
    Robust to re-encoding, resizing and a few % of crop; two different images rarely agree on 108 + 27 values."""

    def forward(self, x):  # (B, 3, H, W) normalised -> (B, 135)
        rgb = _unnormalise(x)
        parts = []
        for side in (6, 3):
            t = F.adaptive_avg_pool2d(rgb, side).flatten(1)  # (B, 3*side*side)
            parts.append(F.normalize(t - t.mean(1, keepdim=True), dim=1))
        return torch.cat(parts, 1)


class ShapeDescriptor(nn.Module):
    """The class of a SyntheticDataset image is the shape of its one saturated object, so: segment the object by
    saturation, then describe its shape independently of position, size and rotation: the fraction of its area
    in rings around its centroid (minus that of a disc) and the magnitudes of the Fourier harmonics of its radius
    around the centroid (rotation only shifts the phase)."""

    def __init__(self, n_rings=12, n_angles=32, n_harmonics=8):
        super().__init__()
        self.n_rings, self.n_angles, self.n_harmonics = n_rings, n_angles, n_harmonics

    def forward(self, x):  # (B, 3, H, W) normalised -> (B, 1 + n_rings + n_harmonics)
        rgb = F.avg_pool2d(_unnormalise(x), 3, 1, 1)  # smoothing keeps pixel noise out of the saturation
        B, _, H, W = rgb.shape
        hi, lo = rgb.amax(1), rgb.amin(1)
        fg = (((hi - lo) / hi.clamp_min(1e-3) > 0.5) & (hi > 0.5)).float()  # (B, H, W) saturated and bright
        area = fg.sum((1, 2)).clamp_min(1)
        yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32, device=x.device),
                                torch.arange(W, dtype=torch.float32, device=x.device), indexing="ij")
        dy = yy - ((fg * yy).sum((1, 2)) / area)[:, None, None]
        dx = xx - ((fg * xx).sum((1, 2)) / area)[:, None, None]
        r = (dx ** 2 + dy ** 2).sqrt() / area.sqrt()[:, None, None]  # radius in units of sqrt(area)
        ring = (r / 1.2 * self.n_rings).long().clamp(max=self.n_rings - 1).flatten(1)
        rings = torch.zeros(B, self.n_rings, device=x.device).scatter_add_(1, ring, fg.flatten(1)) / area[:, None]
        edges = torch.linspace(0, 1.2, self.n_rings + 1, device=x.device).clamp(max=1 / math.sqrt(math.pi))
        disc = (edges[1:] ** 2 - edges[:-1] ** 2) * math.pi  # the same fractions for a disc of area 1
        angle = ((torch.atan2(dy, dx) + math.pi) / (2 * math.pi) * self.n_angles).long()
        angle = angle.clamp(max=self.n_angles - 1).flatten(1)
        mass = torch.zeros(B, self.n_angles, device=x.device).scatter_add_(1, angle, fg.flatten(1))
        radius = torch.zeros(B, self.n_angles, device=x.device).scatter_add_(1, angle, (r * fg).flatten(1))
        spectrum = torch.fft.rfft(radius / mass.clamp_min(1), dim=1).abs()
        harmonics = spectrum[:, 1:self.n_harmonics + 1] / spectrum[:, :1].clamp_min(1e-6)
        # The constant keeps a disc (rings == disc, no harmonics) from being a zero vector that noise would steer.
        return torch.cat([torch.full((B, 1), 0.3, device=x.device), 3 * (rings - disc), harmonics], 1)


# ---------------------------------------------------------------------------------------------------------------
# 2. The synthetic test pool: duplicates, a strong class imbalance, junk; seeds; an evaluation set
# ---------------------------------------------------------------------------------------------------------------

DEMO_POOL_COUNTS = (120, 60, 30, 20, 12, 8, 6, 4)  # images per class in the pool: a 30x imbalance
DEMO_SEED_COUNTS = (16, 8, 4, 3, 2, 2)  # seed images of classes 0-5 (classes 6, 7 have none)


def _jpeg(img, quality):
    from PIL import Image
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def build_demo_pool(root, size=96, seed=0, n_duplicates=50, n_junk=20, n_exclude=8) -> dict:
    """Write the test pool under root/ and return its ground truth.

    pool: SyntheticDataset images with DEMO_POOL_COUNTS per class, plus near-duplicates of n_duplicates of them
    (cycling: JPEG re-encoded at quality 30-70, downscaled to 50-80 % then JPEG, cropped by 1-4 % per side), plus
    unrelated junk (uniform noise, smooth noise, plain colours), shuffled. seeds: other images of classes 0-5.
    exclude: JPEG copies of n_exclude pool originals (an evaluation set that must not leak).
    Returns paths and, per pool image, its class (-1 for junk) and duplicate group (the original's pool index).
    """
    from PIL import Image
    from data import SyntheticDataset
    rng = np.random.default_rng(seed)
    n_classes = len(DEMO_POOL_COUNTS)
    ds = SyntheticDataset(n=n_classes * max(DEMO_POOL_COUNTS), size=size, n_classes=n_classes, seed=seed)
    images, labels, origin = [], [], []  # origin: index (in this list) of the original an image copies
    for c, count in enumerate(DEMO_POOL_COUNTS):
        for j in range(count):
            images.append(ds[c + n_classes * j][0])  # labels are i % n_classes
            labels.append(c)
            origin.append(len(origin))
    n_orig = len(images)
    for n, i in enumerate(rng.choice(n_orig, n_duplicates, replace=False)):
        img, kind = images[i], n % 3
        if kind == 0:
            copy = _jpeg(img, int(rng.integers(30, 71)))
        elif kind == 1:
            side = int(size * rng.uniform(0.5, 0.8))
            copy = _jpeg(img.resize((side, side), Image.Resampling.BILINEAR), 90)
        else:
            l, t, r, b = (int(round(size * f)) for f in rng.uniform(0.01, 0.04, 4))
            copy = img.crop((l, t, size - r, size - b))
        images.append(copy)
        labels.append(labels[i])
        origin.append(int(i))
    for n in range(n_junk):
        kind = n % 3
        if kind == 0:  # uniform noise
            pixels = rng.integers(0, 256, (size, size, 3))
        elif kind == 1:  # smooth noise, no object
            coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8))
            pixels = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC)).astype(np.int64)
        else:  # a plain colour, hues spread out so that two of them are not copies of each other
            import colorsys
            rgb = colorsys.hsv_to_rgb((n / n_junk + 0.05) % 1.0, 0.8, 0.9)
            pixels = np.array(rgb)[None, None] * 255 + rng.integers(-6, 7, (size, size, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
        labels.append(-1)
        origin.append(len(origin))
    order = rng.permutation(len(images))  # shuffled, so originals are not always the lowest index
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    os.makedirs(os.path.join(root, "pool"), exist_ok=True)
    pool_paths = []
    for p, i in enumerate(order):
        path = os.path.join(root, "pool", f"{p:05d}.png")
        images[i].save(path)
        pool_paths.append(path)
    pool_labels = np.array(labels)[order]
    pool_group = position[np.array(origin)[order]]  # pool index of each image's original
    seed_ds = SyntheticDataset(n=n_classes * max(DEMO_SEED_COUNTS), size=size, n_classes=n_classes, seed=seed + 1)
    os.makedirs(os.path.join(root, "seeds"), exist_ok=True)
    seed_paths, seed_labels = [], []
    for c, count in enumerate(DEMO_SEED_COUNTS):
        for j in range(count):
            path = os.path.join(root, "seeds", f"{c}_{j:03d}.png")
            seed_ds[c + n_classes * j][0].save(path)
            seed_paths.append(path)
            seed_labels.append(c)
    os.makedirs(os.path.join(root, "eval"), exist_ok=True)
    exclude_paths, exclude_sources = [], []
    for n, i in enumerate(rng.choice(n_orig, n_exclude, replace=False)):
        path = os.path.join(root, "eval", f"{n:03d}.jpg")
        images[i].save(path, quality=int(rng.integers(40, 80)))
        exclude_paths.append(path)
        exclude_sources.append(int(position[i]))
    return {"pool": pool_paths, "pool_labels": pool_labels, "pool_group": pool_group, "seeds": seed_paths,
            "seed_labels": np.array(seed_labels), "exclude": exclude_paths, "exclude_sources": exclude_sources}


def _entropy_bits(labels) -> float:
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def demo_metrics(truth, result) -> dict:
    """Score a curate() run on the synthetic pool against its ground truth."""
    n = len(truth["pool"])
    group, labels = truth["pool_group"], truth["pool_labels"]
    # Dedup: every image of an injected group but the group's lowest index should go, and nothing else.
    should_go = np.zeros(n, bool)
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        should_go[members[1:]] = True  # np.flatnonzero is sorted: members[0] is the lowest index
    gone = np.ones(n, bool)
    gone[result["after_dedup"].numpy()] = False
    hit = (gone & should_go).sum()
    # Exclusion: the evaluation images' sources and all their copies must be gone from the clean pool.
    leaked = np.isin(group, group[truth["exclude_sources"]])
    kept = np.zeros(n, bool)
    kept[result["kept"].numpy()] = True
    excluded = ~kept & ~gone
    seed_classes = np.unique(truth["seed_labels"])
    cand, sel = result["candidates"].numpy(), result["selected"].numpy()
    pairs = labels[result["neighbours"].numpy()] == truth["seed_labels"][:, None]
    return {
        "dedup_precision": float(hit / max(gone.sum(), 1)), "dedup_recall": float(hit / max(should_go.sum(), 1)),
        "exclude_recall": float(1 - (kept & leaked).sum() / max(leaked.sum(), 1)),
        "exclude_precision": float((excluded & leaked).sum() / max(excluded.sum(), 1)),
        "retrieval_precision": float(pairs.mean()),  # neighbours of the seed's own class
        "retrieved_in_seed_classes": float(np.isin(labels[cand], seed_classes).mean()),
        "entropy_pool_bits": _entropy_bits(labels[result["kept"].numpy()]),
        "entropy_candidates_bits": _entropy_bits(labels[cand]),
        "entropy_balanced_bits": _entropy_bits(labels[sel]),
        "entropy_uniform_seed_classes_bits": float(np.log2(len(seed_classes))),  # all seed classes equal
    }


DEMO_OVERRIDES = dict(size=98, dedup_threshold=0.98, exclude_threshold=0.98, clusters="24,8", kmeans_iters=20,
                      resample_steps=5, target=0.5, workers=0, batch_size=64)


def run_demo(cfg, root=None, progress=True) -> dict:
    """Build the synthetic pool (in a temp folder unless root is given), curate it with the training-free
    descriptors (CopyDescriptor for dedup/exclusion, ShapeDescriptor for everything else), print the metrics."""
    cfg = dataclasses.replace(cfg, **DEMO_OVERRIDES)
    root = root or tempfile.mkdtemp(prefix="curate_demo_")
    print0(f"building the synthetic test pool in {root}")
    truth = build_demo_pool(root, size=96, seed=cfg.seed)
    emb_dir = os.path.join(cfg.out, "embeddings")
    kw = dict(batch_size=cfg.batch_size, size=cfg.size, device="cpu", chunk_size=cfg.chunk_size, progress=progress)
    copy_model, shape_model = CopyDescriptor(), ShapeDescriptor()
    pool_copy = embed(truth["pool"], copy_model, os.path.join(emb_dir, "pool_copy"), model_tag="copy", **kw)
    pool_shape = embed(truth["pool"], shape_model, os.path.join(emb_dir, "pool_shape"), model_tag="shape", **kw)
    seeds = embed(truth["seeds"], shape_model, os.path.join(emb_dir, "seeds_shape"), model_tag="shape", **kw)
    exclude = embed(truth["exclude"], copy_model, os.path.join(emb_dir, "exclude_copy"), model_tag="copy", **kw)
    result = curate(pool_shape, seeds, exclude, cfg, pool_copy_emb=pool_copy, progress=progress)
    metrics = demo_metrics(truth, result)
    result["report"]["demo_metrics"] = metrics
    if rank_world()[0] == 0:
        write_outputs(cfg.out, truth["pool"], result)
        print0("\n| stage / metric | value |\n| --- | --- |")
        for key, value in {**result["report"], **metrics}.items():
            if key != "demo_metrics":
                print0(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return {"truth": truth, "result": result, "metrics": metrics}


@dataclass
class DemoConfig:
    out: str = arg("runs/curate_demo", "curated.txt, report.json, clusters.png, embeddings")
    root: str = arg("", "where the synthetic pool is written (empty: a temp folder)")
    seed: int = arg(0, "seed of the pool and of the curation")


def main(argv=None):
    args = cli.parse(DemoConfig, argv, __doc__)
    return run_demo(CurateConfig(out=args.out, seed=args.seed), root=args.root or None)


if __name__ == "__main__":
    cli.run(main)
