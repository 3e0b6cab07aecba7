"""The synthetic dataset: one drawn shape per image, the class being the shape and nothing else.

Needs no download, so `python train.py` and the tests run anywhere. Class c is SYNTHETIC_SHAPES[c]; colour, size,
position, rotation and background are drawn independently of the class, so a feature that classifies these images
has learned shapes (tests/test_data.py fits a classifier on the nuisances and finds chance). Each sample also
carries its foreground mask, which evaluate.py's emergent-segmentation score compares the PCA of the patch
features with.
"""
import colorsys
import math

import numpy as np
import torch
from PIL import Image, ImageDraw


BACKGROUNDS = ("texture", "plain")
OBJECT_SIZE = (0.25, 0.45)  # the radius of a shape's unit disc, as a fraction of the image side (a range)
SYNTHETIC_SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "ellipse", "crescent", "arrow",
                    "semicircle")


def _shape_parts(name: str) -> list:
    """A shape as [(vertices (P, 2) in a unit disc, fill)]: fill 255 draws the object, 0 cuts a hole."""
    def disc(r=1.0, cx=0.0, cy=0.0, sx=1.0, sy=1.0, start=0.0, span=2 * math.pi):
        t = start + np.linspace(0, span, 48, endpoint=False)
        return np.stack([cx + r * sx * np.cos(t), cy + r * sy * np.sin(t)], 1)

    if name == "circle":
        return [(disc(), 255)]
    if name == "square":
        return [(disc(start=math.pi / 4)[::12], 255)]  # 4 of the 48 points: a square in the disc
    if name == "triangle":
        return [(disc(start=math.pi / 2)[::16], 255)]
    if name == "cross":
        a, b = 0.3, 0.95
        return [(np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                           (-b, a), (-b, -a), (-a, -a)]), 255)]
    if name == "ring":
        return [(disc(), 255), (disc(0.55), 0)]
    if name == "star":
        t = np.linspace(0, 2 * math.pi, 10, endpoint=False) - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
        return [(np.stack([r * np.cos(t), r * np.sin(t)], 1), 255)]
    if name == "ellipse":
        return [(disc(sy=0.5), 255)]
    if name == "crescent":
        return [(disc(), 255), (disc(0.85, cx=0.45), 0)]
    if name == "arrow":
        return [(np.array([(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25),
                           (-1, 0.25)], dtype=float), 255)]
    if name == "semicircle":
        return [(np.concatenate([disc(span=math.pi), [(-1.0, 0.0)]]), 255)]
    raise ValueError(f"unknown shape {name!r}")


def _draw_shape(name, size, center, radius, angle) -> Image.Image:
    """An 'L' mask (255 = object) of one shape, rotated by `angle` and scaled so its unit disc has `radius`."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    for vertices, fill in _shape_parts(name):
        xy = vertices @ rot.T * radius + np.asarray(center)  # (P, 2) in pixels
        draw.polygon([tuple(p) for p in xy.tolist()], fill=fill)
    return mask


def variant(config: dict) -> dict:
    """The set's variant in a run's config (train.py's synthetic_* flags) as SyntheticDataset keywords; the defaults
    (any angle, textured, radius 0.25-0.45) for a config that predates a flag, so a run is read on the images it saw."""
    return dict(rotation=float(config.get("synthetic_rotation", 360.0)),
                background=str(config.get("synthetic_background", "texture")),
                object_size=tuple(float(r) for r in config.get("synthetic_object_size", OBJECT_SIZE)))


class SyntheticDataset(torch.utils.data.Dataset):
    """One object per image on a textured or plain background, drawn on the fly; needs no download.

    Class c is a shape, SYNTHETIC_SHAPES[c], and nothing else: its colour, size, position, rotation and the
    background are drawn independently of the class, so no shortcut reaches the label and a feature that classifies
    these images has learned shapes. Objects are saturated and span 50-90 % of the image side (never cut by the
    border); backgrounds are muted (low saturation) noise, stripes or gradients, so the foreground is visually
    distinct. Labels are i % n_classes (balanced). Everything is a function of (seed, index): sample(i) is the same
    in every process and every epoch.

    Three knobs change the set without giving any class a shortcut (ABLATIONS.md §6-8 measure them):
    rotation: the angle is drawn from [0, rotation) degrees (360: any angle; 0: every shape upright).
    background: "texture" (noise, stripes or gradients) or "plain" (one muted colour per image, the mean of the
    texture that image would have had, so the two variants share every other draw).
    object_size: (min, max) of the radius of the shape's unit disc as a fraction of the side, at most 0.5 (the
    object must fit); small objects wander further, which a template match of the pixels cannot follow.
    """

    def __init__(self, n=1024, size=224, n_classes=8, seed=0, transform=None, rotation=360.0, background="texture",
                 object_size=OBJECT_SIZE):
        if not 1 <= n_classes <= len(SYNTHETIC_SHAPES):
            raise ValueError(f"n_classes must be between 1 and {len(SYNTHETIC_SHAPES)} (one shape per class), "
                             f"got {n_classes}")
        if not 0 <= rotation <= 360:
            raise ValueError(f"rotation must be between 0 and 360 degrees, got {rotation}")
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, got {background!r}")
        lo, hi = (float(r) for r in object_size)
        if not 0 < lo <= hi <= 0.5:
            raise ValueError(f"object_size must be a radius range 0 < min <= max <= 0.5 (fractions of the side), "
                             f"got {tuple(object_size)}")
        self.n, self.size, self.n_classes, self.seed, self.transform = n, size, n_classes, seed, transform
        self.rotation, self.background, self.object_size = float(rotation), background, (lo, hi)
        self.classes = list(SYNTHETIC_SHAPES[:n_classes])
        self.targets = [i % n_classes for i in range(n)]

    def __len__(self):
        return self.n

    def _background(self, rng) -> np.ndarray:
        """(size, size, 3) float background in 0..255: a mix of two muted colours along a texture field."""
        s = self.size
        y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s
        kind = rng.integers(3)
        if kind == 0:    # smooth noise: a coarse random grid upsampled bicubically
            k = int(rng.integers(3, 9))
            coarse = Image.fromarray(rng.random((k, k), dtype=np.float32))  # mode F
            t = np.asarray(coarse.resize((s, s), Image.Resampling.BICUBIC)).clip(0, 1)
        elif kind == 1:  # stripes at a random angle and period
            a, period = rng.uniform(0, math.pi), rng.uniform(1 / 12, 1 / 4)
            t = 0.5 + 0.5 * np.sin(2 * math.pi * (x * math.cos(a) + y * math.sin(a)) / period + rng.uniform(0, 6.3))
        else:            # linear gradient at a random angle
            a = rng.uniform(0, 2 * math.pi)
            t = x * math.cos(a) + y * math.sin(a)
            t = (t - t.min()) / (t.max() - t.min() + 1e-6)
        c0, c1 = (np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.25, 0.85))) * 255
                  for _ in range(2))
        return c0 * (1 - t[..., None]) + c1 * t[..., None]

    def sample(self, i):
        """(PIL RGB image, label, foreground mask (size, size) bool) of sample i."""
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        rng = np.random.default_rng((self.seed, i))
        label = self.targets[i]
        shape = SYNTHETIC_SHAPES[label]
        # The radius of the shape's unit disc, its centre and angle: the same distributions for every class (drawing
        # an *area* instead would make thin shapes smaller on average, a size shortcut to the label).
        radius = rng.uniform(*self.object_size) * self.size
        center = rng.uniform(radius, self.size - radius, size=2)
        mask_img = _draw_shape(shape, self.size, center, radius, rng.uniform(0, math.radians(self.rotation)))
        fg = np.asarray(mask_img) > 0
        hue = rng.random()
        color = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.65, 1.0))) * 255
        background = self._background(rng)  # (size, size, 3)
        if self.background == "plain":
            background = np.broadcast_to(background.mean(axis=(0, 1)), background.shape)
        pixels = np.where(fg[..., None], color, background)
        pixels += rng.integers(-8, 9, size=pixels.shape)  # a little sensor-like noise on everything
        img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))  # mode RGB
        return img, label, fg

    def __getitem__(self, i):
        img, label, _ = self.sample(i)
        return (self.transform(img) if self.transform is not None else img), label
