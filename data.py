"""Data for DINOv2: multi-crop augmentation, iBOT block masking, datasets and the infinite sampler.

Paper: DINOv2 (Oquab et al., 2023) section 4 and appendix, which inherit the multi-crop recipe of DINO (Caron et al.,
2021) and the block masking of iBOT / BEiT. The numbers are the released code's (`dinov2/data/augmentations.py`,
`collate.py`, `masking.py`, `samplers.py`); each departure is marked `NOTE(deviation)`; the blur default is the paper's.

Public names, in reading order:
    IMAGENET_MEAN, IMAGENET_STD, IMAGE_EXTENSIONS, to_tensor, torch_seed()
    to_grey(img)                                           the grayscale step (load_image: util/images.py)
    CropParams, MultiCropAugmentation                      2 global + n_local crops per image
    MaskingGenerator                                       random rectangular blocks on the patch grid
    MultiCropCollate                                       a rank's slice of a global batch, with its iBOT masks
    images_under, ImageFolderDataset                       folder / class sub-folders / .txt list of paths
    SYNTHETIC_SHAPES, SyntheticDataset, variant            the synthetic set: drawn shapes, labels and masks
    stream_seed, seeded                                    the one seed formula: (seed, purpose, position)
    GlobalBatchSampler, MultiCropDataset                   the training stream: global batches cut into rank
                                                           slices, every draw seeded by stream position

Run the tests: python -m pytest -q tests/test_data.py (bench.py measures the augmentation speed).
"""
import colorsys
import contextlib
import functools
import itertools
import math
import os
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from util.cli import MissingFile, UserError
from util.images import convert_to_rgb, load_image  # users' files, any mode, upright, as RGB

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Normalisation folded into one multiply-add per value: (x / 255 - mean) / std = x * scale + shift.
_NORM_SCALE = 1.0 / (255.0 * torch.tensor(IMAGENET_STD).view(3, 1, 1))
_NORM_SHIFT = -torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 (3, h, w), ImageNet-normalised: the one normaliser of training, evaluation and curation."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, h, w) uint8
    return t.float().mul_(_NORM_SCALE).add_(_NORM_SHIFT)


def torch_seed() -> int:
    """A seed drawn from torch's global RNG: ties python/numpy randomness to torch.manual_seed and worker seeds."""
    return int(torch.randint(0, 2**62, (1,)).item())


# ---------------------------------------------------------------------------------------------------------------
# The grayscale step (users' files are decoded by util/images.py: any file, any PIL mode -> upright RGB)

def to_grey(img: Image.Image) -> Image.Image:
    """The augmentation's grayscale step (ITU-R 601 luma, as PIL's convert("L")), kept as three equal channels."""
    return img.convert("L").convert("RGB")


# ---------------------------------------------------------------------------------------------------------------
# Multi-crop augmentation (released `dinov2/data/augmentations.py`), in uint8 PIL until the final tensor

@dataclass
class CropParams:
    """Every random decision for one crop, drawn up front so it can be inspected and tested."""
    box: tuple            # (left, top, right, bottom) in source pixels
    size: int             # output side in pixels
    flip: bool            # horizontal flip
    jitter: tuple         # ((name, factor), ...) in the order applied; () when colour jitter is skipped
    grayscale: bool
    blur_sigma: float | None  # Gaussian blur sigma in pixels, None = no blur
    solarize: bool


class MultiCropAugmentation:
    """DINOv2's `DataAugmentationDINO`: 2 global crops and `n_local` local crops of one image.

    Per crop: RandomResizedCrop (bicubic) -> horizontal flip 0.5 -> colour jitter (p 0.8) -> grayscale (p 0.2)
    -> Gaussian blur -> solarize (global crop 2 only) -> tensor -> ImageNet normalisation.
    The probabilities are plain attributes, so a test or an ablation can change them after construction.
    """

    def __init__(self, global_size=224, local_size=98, n_local=8, global_scale=(0.32, 1.0),
                 local_scale=(0.05, 0.32), blur="paper"):
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.ratio = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect range
        self.p_flip = 0.5
        self.p_color_jitter = 0.8
        self.brightness, self.contrast, self.saturation, self.hue = 0.4, 0.4, 0.2, 0.1
        self.p_grayscale = 0.2
        self.blur_sigma = (0.1, 2.0)
        self.p_solarize = 0.2  # global crop 2 only
        if blur == "paper":
            self.p_blur = (1.0, 0.1, 0.5)  # (global crop 1, global crop 2, each local crop)
        elif blur == "released":
            # NOTE(deviation): the released code wraps blur in its own GaussianBlur(p) handing `1 - p` to RandomApply,
            # so the nominal 1.0 / 0.1 / 0.5 become 0.0 / 0.9 / 0.5 in effect (released `dinov2/data/augmentations.py`,
            # dinov2 PR #411). The released checkpoints were trained this way; "paper" is the default here.
            self.p_blur = (0.0, 0.9, 0.5)
        else:
            raise ValueError(f"blur must be 'paper' or 'released', got {blur!r}")

    # -- drawing the parameters ----------------------------------------------------------------------------------
    def crop_box(self, width, height, scale, rng) -> tuple:
        """torchvision's RandomResizedCrop.get_params: 10 tries at a random area and aspect, then a centre crop."""
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = width * height * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                return (left, top, left + w, top + h)
        # Fallback for extreme shapes: the largest centred crop whose aspect is inside the ratio range.
        if width / height < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif width / height > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        return (left, top, left + w, top + h)

    def crop_params(self, width, height, size, scale, p_blur, p_solarize, rng, blur_scale=1.0) -> CropParams:
        box = self.crop_box(width, height, scale, rng)
        flip = rng.random() < self.p_flip
        jitter = ()
        if rng.random() < self.p_color_jitter:
            # ColorJitter: one factor per property, applied in a random order.
            factors = [("brightness", rng.uniform(1 - self.brightness, 1 + self.brightness)),
                       ("contrast", rng.uniform(1 - self.contrast, 1 + self.contrast)),
                       ("saturation", rng.uniform(1 - self.saturation, 1 + self.saturation)),
                       ("hue", rng.uniform(-self.hue, self.hue))]
            rng.shuffle(factors)
            jitter = tuple(factors)
        grayscale = rng.random() < self.p_grayscale
        blur_sigma = rng.uniform(*self.blur_sigma) * blur_scale if rng.random() < p_blur else None
        solarize = rng.random() < p_solarize
        return CropParams(box, size, flip, jitter, grayscale, blur_sigma, solarize)

    def sample_params(self, width, height, rng) -> list:
        """The parameters of all crops of one image: [global 1, global 2, local 1, ..., local n_local]."""
        p_g1, p_g2, p_local = self.p_blur
        # NOTE(deviation): the blur sigma (0.1-2 px) is the released one at its 224 / 98-px crops; smaller crops get it
        # scaled by size / 224 (size / 98), so that a 32-px crop is blurred as much, relative to its size, as a 224-px
        # one (unscaled, sigma 2 px on a 32-px crop blurs a shape as sigma 14 px would a 224-px one). Crops at or above
        # the released sizes are unchanged.
        g = (self.global_size, self.global_scale)
        g_blur, l_blur = min(1.0, self.global_size / 224), min(1.0, self.local_size / 98)
        local = (self.local_size, self.local_scale, p_local, 0.0, rng, l_blur)
        return [self.crop_params(width, height, *g, p_g1, 0.0, rng, g_blur),
                self.crop_params(width, height, *g, p_g2, self.p_solarize, rng, g_blur),
                *(self.crop_params(width, height, *local) for _ in range(self.n_local))]

    # -- applying them -------------------------------------------------------------------------------------------
    @staticmethod
    def render(img: Image.Image, p: CropParams) -> Image.Image:
        """Apply one crop's parameters to an RGB image; uint8 PIL throughout (fast, and solarize needs uint8)."""
        # Crop and resize in one call: PIL resamples only the box, with the antialiasing bicubic filter.
        # NOTE(deviation): reducing_gap=3 first shrinks by an integer factor when the box is over 3x the output
        # (large photos only; never for a 500x375 image at 224 / 98): ~4x faster there, <1 grey level of change.
        out = img.resize((p.size, p.size), Image.Resampling.BICUBIC, box=p.box, reducing_gap=3.0)
        if p.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for name, factor in p.jitter:
            if name == "brightness":    # blend with black
                out = ImageEnhance.Brightness(out).enhance(factor)
            elif name == "contrast":    # blend with the mean grey level
                out = ImageEnhance.Contrast(out).enhance(factor)
            elif name == "saturation":  # blend with the grayscale image
                out = ImageEnhance.Color(out).enhance(factor)
            else:                       # rotate the hue channel, as torchvision's PIL path does
                h, s, v = out.convert("HSV").split()
                shift = int(factor * 255) % 256
                h = h.point([(x + shift) % 256 for x in range(256)])  # PIL's 8-bit hue wraps around
                out = Image.merge("HSV", (h, s, v)).convert("RGB")
        if p.grayscale:
            out = to_grey(out)
        if p.blur_sigma is not None:
            # NOTE(deviation): torchvision blurs with a 9x9 Gaussian kernel (truncated at +-4 px). PIL's GaussianBlur
            # `radius` IS the standard deviation sigma; PIL approximates the Gaussian with three box blurs of the same
            # variance (support about +-3 sigma). Same sigma, slightly different tails near sigma 2, and the crop stays
            # a uint8 PIL image for solarize.
            out = out.filter(ImageFilter.GaussianBlur(radius=p.blur_sigma))
        if p.solarize:
            out = ImageOps.solarize(out, threshold=128)  # invert every value >= 128
        return out

    def __call__(self, img: Image.Image) -> dict:
        img = convert_to_rgb(img)
        rng = random.Random(torch_seed())
        crops = [to_tensor(self.render(img, p)) for p in self.sample_params(img.width, img.height, rng)]
        return {"global_crops": crops[:2], "local_crops": crops[2:]}


# ---------------------------------------------------------------------------------------------------------------
# iBOT block masking and the collate function (released `dinov2/data/masking.py`, `collate.py`)

class MaskingGenerator:
    """BEiT-style block masking on an (h, w) patch grid: `__call__(num_masking_patches)` adds rectangles of random
    area and log-uniform aspect until the target, or until a block adds nothing after 10 tries (then a little short).
    Rounding can turn a 4-patch target into a 3 x 1 block, as in the released code."""

    def __init__(self, input_size=(16, 16), max_num_patches=None, min_num_patches=4, min_aspect=0.3,
                 max_aspect=None):
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self.num_patches = self.height * self.width
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        self.min_num_patches = min_num_patches
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))

    def block_shape(self, max_patches, rng) -> tuple:
        """One random block: (h, w). May not fit the grid; the caller checks."""
        target_area = rng.uniform(self.min_num_patches, max_patches)
        aspect = math.exp(rng.uniform(*self.log_aspect))
        return round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))

    def add_block(self, mask: np.ndarray, max_patches, rng) -> int:
        """Try up to 10 times to mask one block that adds 1..max_patches new cells; return how many it added."""
        for _ in range(10):
            h, w = self.block_shape(max_patches, rng)
            if w < self.width and h < self.height:
                top, left = rng.randint(0, self.height - h), rng.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]  # a view: writing it writes the mask
                new = h * w - int(block.sum())           # only newly masked cells count (blocks may overlap)
                if 0 < new <= max_patches:
                    block[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches, rng=None) -> np.ndarray:
        rng = rng if rng is not None else random.Random(torch_seed())
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            added = self.add_block(mask, min(num_masking_patches - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        return mask


class MultiCropCollate:
    """Collate one rank's slice of a global batch, [(stream position, crops_dict, label, skipped files)] * B (from
    MultiCropDataset), into the batch the loop uses, and draw the iBOT masks of its global crops.

    Stacking is view-major (crop j of image b at row j * B + b), so the first B rows are view 0 of every image.
    Masks (released `collate.py`): exactly int(2B * mask_probability) global crops of the *global* batch are masked;
    masked crop i targets int(N * U(p_i, p_i+1)) patches with p = linspace(min_ratio, max_ratio, n + 1) (stratified
    ratios), and the targets are shuffled across all crops, so the two views of one image are masked independently.
    NOTE(deviation): the released collate stratifies over each GPU's own 2B crops; here over the global batch, so a
    rank's masks are its slice of a single process's: same statistics, and DDP / FSDP runs reproduce it exactly.
    """

    def __init__(self, mask_generator, mask_ratio=(0.1, 0.5), mask_probability=0.5, world=1, seed=0,
                 local_size=None):
        self.mask_generator = mask_generator
        self.mask_ratio = tuple(mask_ratio)
        self.mask_probability = mask_probability
        self.world, self.seed, self.local_size = world, seed, local_size

    def sample_masks(self, step, rank, B) -> np.ndarray:
        """(2B, N) bool masks of rank's slice of global batch `step` (B images per rank, 2 global crops each)."""
        n_all = 2 * B * self.world  # global crops of the whole global batch, view-major
        step_rng = random.Random(stream_seed(self.seed, MASK, step))
        n_masked = int(n_all * self.mask_probability)
        probs = np.linspace(*self.mask_ratio, n_masked + 1)
        grid = self.mask_generator
        targets = [int(grid.num_patches * step_rng.uniform(probs[i], probs[i + 1])) for i in range(n_masked)]
        targets += [0] * (n_all - n_masked)
        step_rng.shuffle(targets)
        rows = [v * B * self.world + rank * B + i for v in range(2) for i in range(B)]  # this rank's crops
        masks = [grid(targets[r], rng=random.Random(stream_seed(self.seed, MASK, step, r))) if targets[r]
                 else np.zeros((grid.height, grid.width), dtype=bool) for r in rows]
        return np.stack(masks).reshape(2 * B, grid.num_patches)  # (2B, N)

    def __call__(self, items) -> dict:
        positions, crops, labels, skipped = zip(*items)  # per image: stream position, views, label, skipped files
        B = len(crops)
        step, first = divmod(positions[0], B * self.world)  # which global batch, and where this rank's slice starts
        n_global, n_local = len(crops[0]["global_crops"]), len(crops[0]["local_crops"])
        global_crops = torch.stack([c["global_crops"][j] for j in range(n_global) for c in crops])  # (2B, 3, Hg, Wg)
        if n_local:
            local_crops = torch.stack([c["local_crops"][j] for j in range(n_local) for c in crops])  # (L*B, 3, Hl, Wl)
        else:
            s = self.local_size or 0  # local_size (optional) only sets the shape of this empty tensor
            local_crops = torch.zeros(0, 3, s, s)
        # NOTE(deviation): the released collate casts crops to fp16; here they stay float32 and autocast decides.
        global_crops, local_crops = global_crops.float(), local_crops.float()

        # The mask bookkeeping is done in numpy: tiny arrays, and no intra-op thread pool to wait on.
        masks = self.sample_masks(step, first // B, B)                         # (2B, N) bool
        counts = masks.sum(-1)                                                  # (2B,) masked tokens per crop
        mask_indices = np.flatnonzero(masks)                                    # (M,) into masks.flatten()
        # Each masked token weighs 1 / (masked tokens of its crop), so every masked crop counts once in iBOT.
        # Tokens are listed crop by crop, so repeating each crop's weight count times lines them up; a crop
        # with no masked token contributes nothing (and maximum(., 1) keeps 1 / 0 out of the computation).
        mask_weights = np.repeat(1.0 / np.maximum(counts, 1), counts)           # (M,)
        return {
            "global_crops": global_crops,
            "local_crops": local_crops,
            "masks": torch.from_numpy(masks),
            "mask_indices": torch.from_numpy(mask_indices).long(),
            "mask_weights": torch.from_numpy(mask_weights).float(),
            "n_masked": int(mask_indices.size),
            "labels": torch.tensor(labels, dtype=torch.long),
            "skipped": [path for paths in skipped for path in paths],  # unreadable files, named by runlog.SkipReport
        }


# ---------------------------------------------------------------------------------------------------------------
# Image folders: a folder of images, of class sub-folders, or a .txt list of paths

def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def images_under(folder: str) -> list:
    """Image files below `folder`, recursively, in a deterministic (sorted) order; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image_name(f)]
    return found


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images from a folder or a .txt list of paths, not decoded up front (hours on millions of images).

    - Folder with class sub-folders and no images at its top level (torchvision's ImageFolder layout): each sub-folder
      that holds images (searched recursively) is a class, classes sorted by name.
    - Any other folder: every image below it, recursively, label 0 ("flat").
    - A .txt file: one path per line, optionally followed by whitespace and an integer label; relative paths are
      resolved against the list's folder; blank lines and lines starting with '#' are ignored.
    A file that fails to load is skipped: `load(index)` gives the next readable sample and the paths skipped to reach
    it; `__getitem__` names the first `name_limit` in warnings (per process); `n_skipped` and `summary()` count them.
    """
    name_limit = 3  # unreadable files named one by one in this process; the rest are counted

    def __init__(self, root, transform=None):
        self.root = os.fspath(root)
        self.transform = transform
        if not os.path.exists(self.root):
            raise MissingFile(f"dataset root not found: {self.root} (pass an image folder or a .txt list of paths)")
        if os.path.isfile(self.root):
            if not self.root.lower().endswith(".txt"):
                raise UserError(f"dataset root must be a folder or a .txt list of paths, got the file {self.root}")
            self.samples, self.classes = self._read_list(self.root)
        else:
            self.samples, self.classes = self._scan_folder(self.root)
        if not self.samples:
            raise MissingFile(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {self.root}, searched "
                              f"recursively; point it at a folder of images or of class sub-folders")
        # Cheap sanity check: opening a header reads a few bytes, and the first good file ends the search.
        if not any(self._header_ok(path) for path, _ in self.samples):
            raise UserError(f"no readable image among the {len(self.samples)} files in {self.root} (e.g. "
                            f"{self.samples[0][0]}): are they images, and complete?")
        self.targets = [label for _, label in self.samples]
        self.n_skipped = 0
        self._bad = set()  # indices known to be unreadable in this process

    @staticmethod
    def _scan_folder(root):
        entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
        top_images = [e for e in entries if _is_image_name(e) and os.path.isfile(os.path.join(root, e))]
        subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
        if subdirs and not top_images:
            samples, classes = [], []
            for d in subdirs:
                files = images_under(os.path.join(root, d))
                if files:  # an empty sub-folder is not a class
                    samples += [(f, len(classes)) for f in files]
                    classes.append(d)
            return samples, classes
        return [(f, 0) for f in images_under(root)], [os.path.basename(os.path.abspath(root))]

    @staticmethod
    def _read_list(list_path):
        base = os.path.dirname(os.path.abspath(list_path))
        samples, labelled = [], False
        try:
            with open(list_path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError:
            raise UserError(f"{list_path} is not a text file list of image paths (one per line)") from None
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                path, label, labelled = parts[0], int(parts[1]), True
            else:
                path, label = line, 0  # a line without a label (paths may contain spaces)
            path = os.path.expanduser(path)
            samples.append((path if os.path.isabs(path) else os.path.join(base, path), label))
        if labelled:
            return samples, [str(k) for k in range(max(label for _, label in samples) + 1)]
        return samples, [os.path.splitext(os.path.basename(list_path))[0]]

    @staticmethod
    def _header_ok(path) -> bool:
        try:
            with Image.open(path):
                return True
        except Exception:
            return False

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample, label, _ = self.load(index, warn=True)
        return sample, label

    def load(self, index, warn=False) -> tuple:
        """(sample, label, [paths of the unreadable files skipped to reach it]); warn=True names new ones."""
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        skipped = []
        for k in range(n):
            i = (index + k) % n
            path, label = self.samples[i]
            if i not in self._bad:
                try:
                    img = load_image(path)
                except Exception as err:  # any decoder error (OSError, SyntaxError, ValueError, ...) = unusable file
                    self._skip(i, path, err, warn)
                else:
                    return (self.transform(img) if self.transform is not None else img), label, skipped
            skipped.append(path)
        raise UserError(f"no readable image in {self.root}: all {n} files failed to load")

    def _skip(self, i, path, err, warn):
        self._bad.add(i)
        self.n_skipped = len(self._bad)
        if warn and self.n_skipped <= self.name_limit:
            more = "; further failures are only counted in .n_skipped, see .summary()" \
                if self.n_skipped == self.name_limit else ""
            warnings.warn(f"{type(self).__name__}({self.root}): skipping unreadable file {path} "
                          f"({type(err).__name__}: {err}){more}", stacklevel=4)

    def summary(self) -> str:
        bad = sorted(self.samples[i][0] for i in self._bad)
        return (f"{type(self).__name__}({self.root}): {len(self)} files, {len(self.classes)} classes, "
                f"{self.n_skipped} unreadable so far in this process" + (f" (first: {bad[0]})" if bad else ""))


# ---------------------------------------------------------------------------------------------------------------
# The synthetic set: one drawn shape per image, the class being the shape and nothing else. It needs no download, so
# `python train.py` and the tests run anywhere. Colour, size, position, rotation and background are drawn independently
# of the class, so a feature that classifies these images has learned shapes (tests/test_data.py fits a classifier on
# the nuisances and finds chance). Each sample carries its foreground mask for evaluate.py's segmentation score.

BACKGROUNDS = ("texture", "plain", "clutter")
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


class SyntheticDataset(torch.utils.data.Dataset):
    """One object per image, drawn on the fly; class c is the shape SYNTHETIC_SHAPES[c], labels are i % n_classes.
    Saturated objects, never cut by the border, on muted (low saturation) backgrounds; sample(i) is a function of
    (seed, i) alone, the same in every process and every epoch.

    Three knobs change the set without giving any class a shortcut (ABLATIONS.md §6-8 measure them):
    rotation: the angle is drawn from [0, rotation) degrees (360: any angle; 0: every shape upright).
    background: "texture" (noise, stripes or gradients), "plain" (one muted colour per image, the mean of the
    texture that image would have had, so the two variants share every other draw) or "clutter" (the texture crossed
    by muted strokes of any width and direction: edges everywhere, as in a photograph; ABLATIONS.md §11).
    object_size: (min, max) of the radius of the shape's unit disc as a fraction of the side, at most 0.5 (the
    object must fit); small objects wander further, which a template match of the pixels cannot follow.
    """

    def __init__(self, n=1024, size=224, n_classes=8, seed=0, transform=None, rotation=360.0, background="texture",
                 object_size=OBJECT_SIZE):
        if not 1 <= n_classes <= len(SYNTHETIC_SHAPES):
            raise ValueError(f"n_classes must be 1 to {len(SYNTHETIC_SHAPES)} (one shape per class), got {n_classes}")
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

    def _strokes(self, background, rng) -> np.ndarray:
        """The background crossed by 8-16 straight strokes, muted like it (never the object's saturation)."""
        img = Image.fromarray(background.clip(0, 255).astype(np.uint8))  # mode RGB
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(8, 17))):
            colour = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.1, 0.95))) * 255
            ends = rng.uniform(-0.2, 1.2, size=4) * self.size  # x0, y0, x1, y1: strokes may run off the image
            width = max(1, round(rng.uniform(0.01, 0.06) * self.size))
            draw.line(ends.tolist(), fill=tuple(colour.astype(int).tolist()), width=width)
        return np.asarray(img, dtype=np.float32)

    def sample(self, i):
        """(PIL RGB image, label, foreground mask (size, size) bool) of sample i."""
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        rng = np.random.default_rng((self.seed, i))
        label = self.targets[i]
        # The radius of the shape's unit disc, its centre and angle: the same distributions for every class (drawing
        # an *area* instead would make thin shapes smaller on average, a size shortcut to the label).
        radius = rng.uniform(*self.object_size) * self.size
        center = rng.uniform(radius, self.size - radius, size=2)
        angle = rng.uniform(0, math.radians(self.rotation))
        fg = np.asarray(_draw_shape(SYNTHETIC_SHAPES[label], self.size, center, radius, angle)) > 0  # (size, size)
        color = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.65, 1.0), rng.uniform(0.65, 1.0))) * 255
        background = self._background(rng)  # (size, size, 3)
        if self.background == "plain":
            background = np.broadcast_to(background.mean(axis=(0, 1)), background.shape)
        elif self.background == "clutter":
            background = self._strokes(background, rng)
        pixels = np.where(fg[..., None], color, background)
        pixels += rng.integers(-8, 9, size=pixels.shape)  # a little sensor-like noise on everything
        img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))  # mode RGB
        return img, label, fg

    def __getitem__(self, i):
        img, label, _ = self.sample(i)
        return (self.transform(img) if self.transform is not None else img), label

    def load(self, i) -> tuple:
        """The training stream's read (see ImageFolderDataset.load): a drawn image is never unreadable."""
        return *self[i], []


def variant(config: dict) -> dict:
    """The set's variant in a run's config (train.py's synthetic_* flags) as SyntheticDataset keywords; the defaults
    (any angle, textured, radius 0.25-0.45) for a config that predates a flag, so a run is read on the images it saw."""
    return dict(rotation=float(config.get("synthetic_rotation", 360.0)),
                background=str(config.get("synthetic_background", "texture")),
                object_size=tuple(float(r) for r in config.get("synthetic_object_size", OBJECT_SIZE)))


# ---------------------------------------------------------------------------------------------------------------
# The training stream (train.py, distill.py): one endless shuffled stream of images cut into global batches, of
# which each rank takes its slice. Every random draw of the data (order, augmentations, masks) is seeded by its
# position in the stream, so the data of step s is the same whatever the number of ranks and DataLoader workers,
# and a resumed run continues it exactly.

SHUFFLE, AUGMENT, MASK, DROP_PATH = 1, 2, 3, 4  # what a seed is for: the first key of stream_seed


def stream_seed(seed, *keys) -> int:
    """The one seed formula of the data and the loop: (run seed, purpose, step / position, ...) -> a 63-bit seed.
    Distinct key tuples give distinct seeds (a polynomial in a prime base; the keys are far below it)."""
    h = seed
    for k in keys:
        h = (h * 1_000_003 + k) % 2**63
    return h


@contextlib.contextmanager
def seeded(seed):
    """Run a block with python, numpy and torch (CPU) random generators seeded, then restore them."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py), np.random.set_state(npy)


class GlobalBatchSampler:
    """Yields this rank's slice of each global batch: [(dataset index, stream position)] * batch_size.

    Pass p over the dataset is randperm(n) seeded by (seed, SHUFFLE, p); global batch s is positions [s * GB,
    (s + 1) * GB), GB = batch_size * world, rank r taking the r-th slice; `start_step` resumes without replaying.
    NOTE(deviation): the released sampler (`samplers.py`) gives each rank its own shuffled shard; here one global
    stream, so a resume on another number of GPUs, and DDP / FSDP runs, see a single-process run's batches (tested).
    """

    def __init__(self, n, batch_size, rank=0, world=1, seed=0, start_step=0):
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n, self.B, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world, seed, start_step

    def order(self, pass_index):
        g = torch.Generator().manual_seed(stream_seed(self.seed, SHUFFLE, pass_index))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        order = functools.lru_cache(maxsize=2)(self.order)  # passes come in order: each order drawn once
        for step in itertools.count(self.start):
            first = (step * self.world + self.rank) * self.B  # stream position of this rank's slice of global batch
            yield [(order(p // self.n)[p % self.n], p) for p in range(first, first + self.B)]


class MultiCropDataset(torch.utils.data.Dataset):
    """(dataset index, stream position) -> (position, multi-crop views, label, paths of the unreadable files skipped
    to reach the image); the augmentation of a position is a function of (seed, position) alone. `images` is an
    ImageFolderDataset or a SyntheticDataset: `images.load(index)` gives (image, label, skipped paths)."""

    def __init__(self, images, augment, seed):
        self.images, self.augment, self.seed = images, augment, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        index, pos = item
        image, label, skipped = self.images.load(index)  # silent: runlog.SkipReport names them in the main process
        with seeded(stream_seed(self.seed, AUGMENT, pos)):
            return pos, self.augment(image), label, skipped
