"""Tests for data.py: masking statistics and rules, collate layout, augmentation, datasets, sampler.

Expected values are computed independently in the tests (hand formulas, scripted random draws, loops).
Run: python -m pytest -q tests/test_data.py
"""
import io
import math
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import data
from util import runlog

from data import (IMAGENET_MEAN, IMAGENET_STD, CropParams, GlobalBatchSampler, ImageFolderDataset, MaskingGenerator,
                  MultiCropAugmentation, MultiCropCollate, MultiCropDataset, SyntheticDataset, load_image)


# ------------------------------------------------------------------------------------------------ helpers

def normalised(value_rgb):
    """The expected tensor value of a pixel, straight from the formula (x / 255 - mean) / std."""
    return [(v / 255 - m) / s for v, m, s in zip(value_rgb, IMAGENET_MEAN, IMAGENET_STD)]


def assert_constant(t, value_rgb, atol=1e-5):
    expected = torch.tensor(normalised(value_rgb), dtype=torch.float32).view(3, 1, 1).expand_as(t)
    torch.testing.assert_close(t, expected, atol=atol, rtol=0)


def plain_augmentation(**kw):
    """An augmentation with every random photometric operation switched off."""
    aug = MultiCropAugmentation(**kw)
    aug.p_color_jitter, aug.p_grayscale, aug.p_blur, aug.p_solarize = 0.0, 0.0, (0.0, 0.0, 0.0), 0.0
    return aug


def dummy_crops(n_local=0):
    return {"global_crops": [torch.zeros(3, 1, 1)] * 2, "local_crops": [torch.zeros(3, 1, 1)] * n_local}


def rank_slice(B, step=0, rank=0, world=1, label=0):
    """What the collate receives: rank's B items of global batch `step`, as (stream position, crops, label,
    skipped files)."""
    first = step * B * world + rank * B
    return [(first + i, dummy_crops(), label, []) for i in range(B)]


class ScriptedRng:
    """Stands in for random.Random: returns pre-scripted values, so a mask can be worked out by hand."""

    def __init__(self, uniforms, randints):
        self.uniforms, self.randints = list(uniforms), list(randints)

    def uniform(self, a, b):
        return self.uniforms.pop(0)

    def randint(self, a, b):
        value = self.randints.pop(0)
        assert a <= value <= b
        return value


# ------------------------------------------------------------------------------------------------ masking

def test_masking_statistics_200_batches_of_64():
    """Released collate: exactly int(0.5 * 2B) masked crops per batch, mean ratio over masked crops ~0.30
    (released 0.298)."""
    B, N = 64, 256
    collate = MultiCropCollate(MaskingGenerator((16, 16)))
    ratios = []
    for step in range(200):
        out = collate(rank_slice(B, step))
        masks = out["masks"]
        assert masks.shape == (2 * B, N) and masks.dtype == torch.bool
        counts = np.count_nonzero(masks.numpy(), axis=1)  # (2B,)
        assert int((counts > 0).sum()) == int(0.5 * 2 * B)
        ratios += (counts[counts > 0] / N).tolist()
        # mask_indices are the flat positions of the True entries (row * N + column), in row-major order.
        rows, cols = masks.nonzero(as_tuple=True)
        assert out["mask_indices"].dtype == torch.long and torch.equal(out["mask_indices"], rows * N + cols)
        assert out["n_masked"] == len(rows)
        # Each weight is 1 / (masked tokens of the token's own crop): per masked crop they sum to 1.
        np.testing.assert_allclose(out["mask_weights"].numpy(), 1.0 / counts[rows.numpy()], rtol=1e-6)
        per_crop = np.bincount(rows.numpy(), weights=out["mask_weights"].numpy(), minlength=2 * B)
        np.testing.assert_allclose(per_crop[counts > 0], 1.0, rtol=1e-5)
    mean_ratio = float(np.mean(ratios))
    assert abs(mean_ratio - 0.30) <= 0.01, mean_ratio
    assert 0.09 <= min(ratios) and max(ratios) <= 0.5


def test_masking_generator_by_hand():
    """A scripted draw: blocks overlap, only new cells count, the last block is smaller than 4 to hit the target."""
    gen = MaskingGenerator((6, 6), max_num_patches=18)
    rng = ScriptedRng(
        uniforms=[9.0, 0.0,               # block 1: area 9, aspect 1 -> 3x3 at (1, 2): 9 new
                  3.0, math.log(3.0),     # block 2, try 1: area 3, aspect 3 -> 3x1 at (1, 2): inside block 1, 0 new
                  3.0, math.log(3.0),     # block 2, try 2: 3x1 at (3, 2): 2 new (row 3 already masked)
                  1.0, 0.0],              # block 3: 1x1 at (0, 0): 1 new -> 12 = target
        randints=[1, 2, 1, 2, 3, 2, 0, 0])
    mask = gen(12, rng=rng)
    expected = np.zeros((6, 6), dtype=bool)
    expected[1:4, 2:5] = True
    expected[4:6, 2] = True
    expected[0, 0] = True
    np.testing.assert_array_equal(mask, expected)


def test_masking_generator_stops_when_a_block_adds_nothing():
    gen = MaskingGenerator((6, 6), max_num_patches=18)
    # Block 1 masks 3x3; then 10 tries of a 1x1 block, all inside it: the generator gives up at 9 < 12.
    rng = ScriptedRng(uniforms=[9.0, 0.0] + [1.0, 0.0] * 10, randints=[1, 2] + [2, 3] * 10)
    assert gen(12, rng=rng).sum() == 9


def test_masking_blocks_respect_min_area_and_target():
    class Recording(MaskingGenerator):
        def block_shape(self, max_patches, rng):
            h, w = super().block_shape(max_patches, rng)
            shapes.append((h, w, max_patches))
            return h, w

    shapes = []
    gen = Recording((16, 16))
    rng = random.Random(0)
    for target in [int(256 * r) for r in np.linspace(0.1, 0.5, 400)]:
        mask = gen(target, rng=rng)
        assert mask.shape == (16, 16) and mask.dtype == bool
        assert target * 0.9 <= mask.sum() <= target  # never above the target, rarely a little below
    areas = np.array([h * w for h, w, m in shapes if m >= 4])
    # A 4-patch target can round to a 3x1 block (h = round(sqrt(4 a)), w = round(sqrt(4 / a))), as in the
    # released code (about 7 % of the drawn blocks); never smaller.
    assert areas.min() >= 3 and (areas >= 4).mean() > 0.9
    # Only when fewer than 4 patches remain may a block be smaller (target U(4, remaining) then lies below 4).
    assert any(h * w < 3 for h, w, m in shapes if m < 4)


def test_collate_view_major_order_and_shapes():
    B, n_local = 3, 4
    batch = []
    for b in range(B):  # pixel values encode (image b, crop j)
        crops = {"global_crops": [torch.full((3, 8, 8), 10.0 * b + j) for j in range(2)],
                 "local_crops": [torch.full((3, 4, 4), 100.0 + 10 * b + j) for j in range(n_local)]}
        batch.append((b, crops, 7 + b, []))
    out = MultiCropCollate(MaskingGenerator((2, 2)))(batch)
    assert out["global_crops"].shape == (2 * B, 3, 8, 8) and out["global_crops"].dtype == torch.float32
    assert out["local_crops"].shape == (n_local * B, 3, 4, 4) and out["local_crops"].dtype == torch.float32
    for j in range(2):
        for b in range(B):
            assert (out["global_crops"][j * B + b] == 10.0 * b + j).all()
    for j in range(n_local):
        for b in range(B):
            assert (out["local_crops"][j * B + b] == 100.0 + 10 * b + j).all()
    assert out["labels"].tolist() == [7, 8, 9] and out["labels"].dtype == torch.long
    assert out["masks"].shape == (2 * B, 4) and out["mask_weights"].dtype == torch.float32


def test_collate_without_local_crops():
    out = MultiCropCollate(MaskingGenerator((2, 2)))(rank_slice(2))
    assert out["local_crops"].shape[:2] == (0, 3)
    out = MultiCropCollate(MaskingGenerator((2, 2)), local_size=7)(rank_slice(2))
    assert out["local_crops"].shape == (0, 3, 7, 7)


def test_collate_masked_crops_with_no_patches_do_not_divide_by_zero():
    # Ratios in [0, 0.1) of 16 patches: most masked crops get a target of 0 or 1 patch.
    out = MultiCropCollate(MaskingGenerator((4, 4)), mask_ratio=(0.0, 0.1))(rank_slice(8))
    assert torch.isfinite(out["mask_weights"]).all()
    assert out["mask_weights"].numel() == out["mask_indices"].numel() == out["n_masked"]
    counts = out["masks"].numpy().sum(-1)
    per_crop = np.bincount(out["mask_indices"].numpy() // 16, weights=out["mask_weights"].numpy(), minlength=16)
    np.testing.assert_allclose(per_crop, (counts > 0).astype(float), rtol=1e-6)
    out = MultiCropCollate(MaskingGenerator((4, 4)), mask_ratio=(0.0, 0.0))(rank_slice(4))
    assert out["n_masked"] == 0 and out["mask_weights"].shape == (0,) and out["mask_indices"].shape == (0,)


def test_collate_masks_are_the_rank_slice_of_the_global_batch_and_picklable():
    B, world, N = 4, 3, 64
    single = MultiCropCollate(MaskingGenerator((8, 8)), seed=7)
    sharded = pickle.loads(pickle.dumps(MultiCropCollate(MaskingGenerator((8, 8)), world=world, seed=7)))
    for step in (0, 5):
        whole = single(rank_slice(B * world, step))["masks"]  # (2 * B * world, N): one process, the global batch
        assert int((whole.sum(1) > 0).sum()) == int(0.5 * 2 * B * world)  # stratified over the global batch
        for rank in range(world):
            part = sharded(rank_slice(B, step, rank, world))["masks"]  # (2B, N)
            rows = [v * B * world + rank * B + i for v in range(2) for i in range(B)]  # view-major rows of the slice
            assert part.shape == (2 * B, N) and torch.equal(part, whole[rows])
    assert torch.equal(single(rank_slice(8, 2))["masks"], single(rank_slice(8, 2))["masks"])  # a function of step
    assert not torch.equal(single(rank_slice(8, 2))["masks"], single(rank_slice(8, 3))["masks"])


# ------------------------------------------------------------------------------------------------ augmentation

def photo(width=500, height=375, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_augmentation_default_shapes_and_batch():
    aug = MultiCropAugmentation()
    out = aug(photo())
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 8
    assert all(t.shape == (3, 224, 224) and t.dtype == torch.float32 for t in out["global_crops"])
    assert all(t.shape == (3, 98, 98) and t.dtype == torch.float32 for t in out["local_crops"])
    batch = MultiCropCollate(MaskingGenerator((16, 16)))([(0, out, 0, []), (1, aug(photo(seed=1)), 1, [])])
    assert batch["global_crops"].shape == (4, 3, 224, 224) and batch["local_crops"].shape == (16, 3, 98, 98)
    assert batch["masks"].shape == (4, 256)


def test_normalisation_matches_formula():
    value = (10, 128, 250)
    assert_constant(data.to_tensor(Image.new("RGB", (7, 5), value)), value)
    aug = plain_augmentation(global_size=32, local_size=16, n_local=2)
    out = aug(Image.new("RGB", (90, 60), value))  # any crop of a constant image is the same constant
    for t in out["global_crops"] + out["local_crops"]:
        assert_constant(t, value)


def test_solarize_only_on_second_global_crop():
    aug = plain_augmentation(global_size=16, local_size=8, n_local=3)
    aug.p_solarize = 1.0
    g1, g2 = aug(Image.new("RGB", (40, 40), (200, 200, 200)))["global_crops"]
    locals_ = aug(Image.new("RGB", (40, 40), (200, 200, 200)))["local_crops"]
    assert_constant(g1, (200,) * 3)
    assert_constant(g2, (55,) * 3)  # 255 - 200: values >= 128 are inverted
    for t in locals_:
        assert_constant(t, (200,) * 3)
    assert_constant(aug(Image.new("RGB", (40, 40), (100,) * 3))["global_crops"][1], (100,) * 3)  # below 128


def frequencies(aug, n=3000):
    rng = random.Random(0)
    plans = [aug.sample_params(500, 375, rng) for _ in range(n)]
    blur = np.array([[p.blur_sigma is not None for p in plan] for plan in plans], dtype=float)  # (n, 2 + L)
    return plans, blur


def within(freq, p, n):
    return abs(freq - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12


@pytest.mark.parametrize("mode,expected", [("paper", (1.0, 0.1, 0.5)), ("released", (0.0, 0.9, 0.5))])
def test_blur_probabilities(mode, expected):
    aug = MultiCropAugmentation(blur=mode)
    assert aug.p_blur == expected
    n = 3000
    plans, blur = frequencies(aug, n)
    assert within(blur[:, 0].mean(), expected[0], n)  # exactly 1.0 or 0.0 where p is 1 or 0
    assert within(blur[:, 1].mean(), expected[1], n)
    assert within(blur[:, 2:].mean(), expected[2], n * 8)
    sigmas = [p.blur_sigma for plan in plans for p in plan if p.blur_sigma is not None]
    assert 0.1 <= min(sigmas) and max(sigmas) <= 2.0
    with pytest.raises(ValueError, match="blur"):
        MultiCropAugmentation(blur="sometimes")


def test_other_photometric_probabilities_and_ranges():
    n = 3000
    plans, _ = frequencies(MultiCropAugmentation(), n)
    solar = np.array([[p.solarize for p in plan] for plan in plans], dtype=float)
    assert solar[:, 0].sum() == 0 and solar[:, 2:].sum() == 0 and within(solar[:, 1].mean(), 0.2, n)
    flat = [p for plan in plans for p in plan]
    m = len(flat)
    assert within(np.mean([bool(p.jitter) for p in flat]), 0.8, m)
    assert within(np.mean([p.grayscale for p in flat]), 0.2, m)
    assert within(np.mean([p.flip for p in flat]), 0.5, m)
    ranges = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
    orders = set()
    for p in flat:
        if p.jitter:
            assert sorted(name for name, _ in p.jitter) == sorted(ranges)
            assert all(ranges[name][0] <= f <= ranges[name][1] for name, f in p.jitter)
            orders.add(tuple(name for name, _ in p.jitter))
    assert len(orders) == 24  # every order of the 4 operations occurs


def test_crop_boxes_scale_ratio_and_fallback():
    aug = MultiCropAugmentation()
    rng = random.Random(0)
    for _ in range(2000):
        left, top, right, bottom = aug.crop_box(500, 375, (0.32, 1.0), rng)
        w, h = right - left, bottom - top
        assert 0 <= left and 0 <= top and right <= 500 and bottom <= 375
        assert 0.32 * 0.97 <= w * h / (500 * 375) <= 1.0
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # No random try fits a 1000x10 strip, so the largest centred crop of aspect 4/3 is used: 13 x 10.
    assert aug.crop_box(1000, 10, (0.32, 1.0), rng) == ((1000 - 13) // 2, 0, (1000 - 13) // 2 + 13, 10)
    assert aug.crop_box(10, 1000, (0.32, 1.0), rng) == (0, (1000 - 13) // 2, 10, (1000 - 13) // 2 + 13)


def test_render_applies_blur_and_pil_radius_is_sigma():
    # A vertical bright line: the blurred horizontal profile is a 1-D Gaussian whose variance should be sigma^2.
    line = np.zeros((64, 65), dtype=np.uint8)
    line[:, 32] = 255
    for sigma in (1.0, 2.0):
        profile = np.asarray(Image.fromarray(line).filter(ImageFilter.GaussianBlur(radius=sigma)))[32].astype(float)
        x = np.arange(65) - 32
        var = (profile * x**2).sum() / profile.sum()
        assert abs(math.sqrt(var) - sigma) / sigma < 0.1, (sigma, math.sqrt(var))
    img = photo(64, 64)
    base = CropParams((0, 0, 64, 64), 64, False, (), False, None, False)
    sharp = MultiCropAugmentation.render(img, base)
    blurred = MultiCropAugmentation.render(img, CropParams((0, 0, 64, 64), 64, False, (), False, 2.0, False))
    assert np.array_equal(np.asarray(sharp), np.asarray(img))  # identity crop at the same size: unchanged
    assert np.asarray(blurred, dtype=float).std() < 0.5 * np.asarray(sharp, dtype=float).std()
    flipped = MultiCropAugmentation.render(img, CropParams((0, 0, 64, 64), 64, True, (), False, None, False))
    assert np.array_equal(np.asarray(flipped), np.asarray(img)[:, ::-1])
    gray = np.asarray(MultiCropAugmentation.render(img, CropParams((0, 0, 64, 64), 64, False, (), True, None,
                                                                   False)))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_augmentation_reproducible_under_manual_seed():
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=2)
    img = photo(80, 60)
    torch.manual_seed(1)
    a = aug(img)["local_crops"][1]
    torch.manual_seed(1)
    assert torch.equal(a, aug(img)["local_crops"][1])


# ------------------------------------------------------------------------------------------------ sampler

def reference_order(n, seed, pass_index):
    """The documented order of pass p, written out: randperm(n) seeded by stream_seed(seed, SHUFFLE, p) =
    ((seed * 1_000_003 + 1) * 1_000_003 + p) mod 2^63."""
    g = torch.Generator()
    g.manual_seed(((seed * 1_000_003 + 1) * 1_000_003 + pass_index) % 2**63)
    return torch.randperm(n, generator=g).tolist()


@pytest.mark.parametrize("n,B,world", [(10, 4, 1), (23, 3, 2), (7, 2, 4)])
def test_sampler_is_passes_of_permutations_cut_into_rank_slices(n, B, world):
    steps = 3 * n // (B * world) + 2  # several passes, batches straddling pass boundaries
    stream = [i for p in range(5) for i in reference_order(n, 5, p)]
    for rank in range(world):
        it = iter(GlobalBatchSampler(n, B, rank, world, seed=5))
        for step in range(steps):
            batch = next(it)
            first = step * B * world + rank * B
            assert batch == [(stream[p], p) for p in range(first, first + B)]
    assert sorted(reference_order(n, 5, 0)) == list(range(n)) and reference_order(n, 5, 0) != reference_order(n, 5, 1)


def test_sampler_resumes_at_a_step_without_replaying():
    full = iter(GlobalBatchSampler(37, 4, 1, 3, seed=2))
    batches = [next(full) for _ in range(40)]
    for k in (0, 3, 10, 31):
        resumed = iter(GlobalBatchSampler(37, 4, 1, 3, seed=2, start_step=k))
        assert [next(resumed) for _ in range(5)] == batches[k:k + 5]
    far = 10**9  # O(1): the pass is computed, not replayed
    pos = far * 12 + 4
    assert next(iter(GlobalBatchSampler(37, 4, 1, 3, seed=2, start_step=far)))[0] == (
        reference_order(37, 2, pos // 37)[pos % 37], pos)
    with pytest.raises(ValueError, match="empty"):
        GlobalBatchSampler(0, 4)


def test_dataloader_with_workers_is_reproducible():
    images = SyntheticDataset(n=16, size=48)
    ds = MultiCropDataset(images, MultiCropAugmentation(32, 16, 2), seed=0)
    collate = MultiCropCollate(MaskingGenerator((4, 4)))

    def two_batches(workers):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=GlobalBatchSampler(len(ds), 4), collate_fn=collate,
                                             num_workers=workers)
        it = iter(loader)
        return [next(it) for _ in range(2)]

    a, b = two_batches(2), two_batches(0)  # workers change nothing: every draw is seeded by the stream position
    for x, y in zip(a, b):
        assert torch.equal(x["global_crops"], y["global_crops"]) and torch.equal(x["masks"], y["masks"])
        assert x["local_crops"].shape == (8, 3, 16, 16)
        assert x["skipped"] == []  # a drawn image is never unreadable: the stream's items have one shape
    assert not torch.equal(a[0]["global_crops"], a[1]["global_crops"])


# ------------------------------------------------------------------------------------------------ image folder

def save(path, img, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def solid(color, size=(12, 10)):
    return Image.new("RGB", size, color)


def test_class_subfolders(tmp_path):
    save(tmp_path / "cat" / "a.png", solid((255, 0, 0)))
    save(tmp_path / "cat" / "deep" / "b.JPG", solid((250, 0, 0)))
    save(tmp_path / "dog" / "c.bmp", solid((0, 0, 255)))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    save(tmp_path / ".hidden" / "d.png", solid((0, 255, 0)))
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert [(p.split("/")[-1], y) for p, y in ds.samples] == [("a.png", 0), ("b.JPG", 0), ("c.bmp", 1)]
    assert ds.targets == [0, 0, 1]
    img, label = ds[2]
    assert img.mode == "RGB" and label == 1 and img.getpixel((0, 0)) == (0, 0, 255)
    tds = ImageFolderDataset(tmp_path, transform=lambda im: im.size)
    assert tds[0] == ((12, 10), 0)


def test_flat_folder_is_recursive_with_label_zero(tmp_path):
    save(tmp_path / "x.png", solid((1, 2, 3)))
    save(tmp_path / "sub" / "y.webp", solid((4, 5, 6)), lossless=True)
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 2 and ds.targets == [0, 0] and len(ds.classes) == 1
    assert ds[1][0].getpixel((0, 0)) == (4, 5, 6)


def test_txt_list_with_and_without_labels(tmp_path):
    a = save(tmp_path / "imgs" / "a.png", solid((10, 0, 0)))
    b = save(tmp_path / "imgs" / "b.png", solid((20, 0, 0)))
    c = save(tmp_path / "imgs" / "my dir" / "c d.png", solid((30, 0, 0)))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "labelled.txt").write_text(f"# curated\n../imgs/a.png 2\n\n{b} 0\n../imgs/my dir/c d.png 1\n")
    ds = ImageFolderDataset(lists / "labelled.txt")
    assert [p for p, _ in ds.samples] == [str(lists / "../imgs/a.png"), str(b), str(lists / "../imgs/my dir/c d.png")]
    assert ds.targets == [2, 0, 1] and ds.classes == ["0", "1", "2"]
    assert [ds[i][0].getpixel((0, 0))[0] for i in range(3)] == [10, 20, 30]
    (lists / "plain.txt").write_text(f"{a}\n{c}\n")
    ds = ImageFolderDataset(lists / "plain.txt")
    assert ds.targets == [0, 0] and ds[1][0].getpixel((0, 0)) == (30, 0, 0)


def test_any_mode_becomes_rgb(tmp_path):
    cases = []
    cases.append((save(tmp_path / "l.png", Image.new("L", (4, 4), 100)), {(0, 0): (100, 100, 100)}))
    la = Image.new("LA", (4, 4), (100, 255))
    la.putpixel((1, 1), (100, 0))  # fully transparent: composited on white
    cases.append((save(tmp_path / "la.png", la), {(0, 0): (100, 100, 100), (1, 1): (255, 255, 255)}))
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    p.putpixel((2, 2), 0)
    cases.append((save(tmp_path / "p.png", p, transparency=0), {(0, 0): (200, 10, 20), (2, 2): (255, 255, 255)}))
    cases.append((save(tmp_path / "p.gif", p), {(0, 0): (200, 10, 20), (2, 2): (0, 0, 0)}))  # no transparency
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((3, 3), (255, 0, 0, 128))  # half transparent red over white: (255, 127.5, 127.5)
    cases.append((save(tmp_path / "rgba.png", rgba), {(0, 0): (255, 0, 0), (3, 3): (255, 127, 127)}))
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 255, 255, 0))
    cases.append((save(tmp_path / "cmyk.tif", cmyk), {(0, 0): (255, 255, 255), (1, 0): (255, 0, 0)}))
    i16 = Image.fromarray(np.array([[0, 65535], [128 * 257, 1000]], dtype=np.uint16))
    cases.append((save(tmp_path / "i16.png", i16), {(0, 0): (0, 0, 0), (1, 0): (255,) * 3, (0, 1): (128,) * 3}))
    with Image.open(tmp_path / "i16.png") as reopened:
        assert reopened.mode.startswith("I")  # really a 16-bit file
    for path, pixels in cases:
        img = load_image(path)
        assert img.mode == "RGB", path
        for xy, rgb in pixels.items():
            assert all(abs(a - b) <= 1 for a, b in zip(img.getpixel(xy), rgb)), (path, xy, img.getpixel(xy), rgb)
    assert len(ImageFolderDataset(tmp_path)) == len(cases)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left edge ends up at the top
    save(tmp_path / "rot.jpg", img, exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[:15].mean((0, 1)), np.asarray(out)[25:].mean((0, 1))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


def write_bad_files(folder):
    good = io.BytesIO()
    photo(64, 64).save(good, format="JPEG")
    save(folder / "d_truncated.jpg", Image.new("RGB", (1, 1)))  # overwritten just below
    (folder / "d_truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "e_zero.jpg").write_bytes(b"")
    (folder / "f_text.jpg").write_text("this is not a JPEG")


def test_unreadable_files_are_skipped_each_named_once(tmp_path):
    colors = {"a.png": (255, 0, 0), "b.png": (0, 255, 0), "c.png": (0, 0, 255)}
    for name, color in colors.items():
        save(tmp_path / name, solid(color))
    write_bad_files(tmp_path)
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(2):
            for i in range(len(ds)):
                img, label = ds[i]
                assert img.getpixel((0, 0)) in colors.values() and label == 0
    ours = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    # issue 12, defect 9: every unreadable file is named (up to name_limit = 3), once, not only the first
    assert len(ours) == 3 and all(any(name in m for m in ours) for name in ("d_truncated", "e_zero", "f_text"))
    assert ds.n_skipped == 3
    assert "3 unreadable" in ds.summary()
    # load(), the training stream's read: the same sample plus the paths skipped to reach it, and no warning
    fresh = ImageFolderDataset(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img, label, skipped = fresh.load(3)
        assert [p.split("/")[-1] for p in skipped] == ["d_truncated.jpg", "e_zero.jpg", "f_text.jpg"]
        assert img.getpixel((0, 0)) == colors["a.png"] and label == 0
        assert fresh.load(0)[2] == [] and fresh.load(5)[2] == skipped[2:]  # a known bad file is skipped again
    assert not [w for w in caught if "unreadable" in str(w.message)] and fresh.n_skipped == 3


def test_training_stream_names_skipped_files_and_counts_them_per_epoch(tmp_path):
    # issue 12, defect 9: the stream's skips (met in DataLoader workers) reach the main process; the first files are
    # named there, and each epoch's end prints how many samples were skipped (one line per epoch, not per worker)
    for name, color in {"a.png": (255, 0, 0), "b.png": (0, 255, 0), "c.png": (0, 0, 255)}.items():
        save(tmp_path / name, solid(color))
    write_bad_files(tmp_path)
    images = ImageFolderDataset(tmp_path)
    augment = data.MultiCropAugmentation(global_size=16, local_size=8, n_local=0)
    collate = data.MultiCropCollate(MaskingGenerator((2, 2)), (0.1, 0.5), 0.0, world=1, seed=0)
    loader = torch.utils.data.DataLoader(data.MultiCropDataset(images, augment, 0), collate_fn=collate,
                                         batch_sampler=data.GlobalBatchSampler(6, 6, 0, 1, 0, 0), num_workers=2)
    lines = []
    report = runlog.SkipReport(epoch_length=1, name_limit=2, write=lines.append)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, batch in zip(range(2), loader):  # each batch is the 6 files once: 3 readable, 3 skipped
            report.update(batch.pop("skipped"), step)
    assert not [w for w in caught if "unreadable" in str(w.message)]  # the workers stay silent
    named = [line for line in lines if line.startswith("skipping unreadable file")]
    assert len(named) == 2 and "only counted" in named[1]
    epochs = [line for line in lines if line.startswith("epoch ")]
    # files in order a b c d e f, d e f bad: a sample drawn at d walks d, e, f (3 skips) to reach a, at e 2, at f 1,
    # so each pass over the 6 files skips 3 + 2 + 1 = 6 times
    assert epochs == [f"epoch {e}: 6 sample(s) skipped for unreadable files (3 distinct unreadable files so far)"
                      for e in (1, 2)]
    assert report.row() == {"skipped_files": 3}


def test_empty_or_unusable_folders_are_errors_naming_the_folder(tmp_path):
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="empty_folder"):
        ImageFolderDataset(empty)
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        ImageFolderDataset(tmp_path / "missing_folder")
    headerless = tmp_path / "headerless_folder"  # zero bytes and text: even the header cannot be read
    headerless.mkdir()
    (headerless / "a.jpg").write_bytes(b"")
    (headerless / "b.png").write_text("text")
    with pytest.raises(ValueError, match="headerless_folder"):
        ImageFolderDataset(headerless)
    truncated = tmp_path / "truncated_folder"  # headers read fine, pixels do not: found at first access
    truncated.mkdir()
    write_bad_files(truncated)
    (truncated / "e_zero.jpg").unlink()
    (truncated / "f_text.jpg").unlink()
    ds = ImageFolderDataset(truncated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="truncated_folder"):
            ds[0]
    (tmp_path / "empty_list.txt").write_text("# nothing\n")
    with pytest.raises(FileNotFoundError, match="empty_list"):
        ImageFolderDataset(tmp_path / "empty_list.txt")


# ------------------------------------------------------------------------------------------------ synthetic

def test_synthetic_deterministic_balanced_with_real_masks():
    ds = SyntheticDataset(n=40, size=64, n_classes=8, seed=3)
    img, label, fg = ds.sample(5)
    img2, label2, fg2 = SyntheticDataset(n=40, size=64, n_classes=8, seed=3).sample(5)
    assert np.array_equal(np.asarray(img), np.asarray(img2)) and label == label2 and np.array_equal(fg, fg2)
    assert not np.array_equal(np.asarray(img), np.asarray(SyntheticDataset(n=40, size=64, seed=4).sample(5)[0]))
    assert not np.array_equal(np.asarray(img), np.asarray(ds.sample(6)[0]))
    assert img.mode == "RGB" and img.size == (64, 64) and fg.shape == (64, 64) and fg.dtype == bool
    assert np.bincount(ds.targets).tolist() == [5] * 8 and len(ds.classes) == 8
    assert [ds[i][1] for i in range(40)] == ds.targets
    fractions, sat_gap = [], []
    for i in range(40):
        img, _, fg = ds.sample(i)
        fractions.append(fg.mean())
        sat = np.asarray(img.convert("HSV"))[..., 1].astype(float)
        sat_gap.append(sat[fg].mean() - sat[~fg].mean())  # objects are saturated, backgrounds muted
    assert 0.05 <= min(fractions) and max(fractions) <= 0.65 and 0.15 <= np.mean(fractions) <= 0.35
    assert min(sat_gap) > 40
    with pytest.raises(IndexError):
        ds.sample(40)


def test_synthetic_classes_are_shapes_and_nuisances_do_not_predict_them():
    with pytest.raises(ValueError, match="one shape per class"):
        SyntheticDataset(n=4, n_classes=len(data.SYNTHETIC_SHAPES) + 1)
    for background in ("texture", "clutter"):
        _nuisances_at_chance(SyntheticDataset(n=400, size=48, n_classes=8, seed=0, background=background))


def _nuisances_at_chance(ds):
    assert ds.classes == list(data.SYNTHETIC_SHAPES[:8])
    # Nuisances of each image: object colour (mean RGB), background colour, object centre.
    feats = []
    for i in range(len(ds)):
        img, _, fg = ds.sample(i)
        px = np.asarray(img).astype(float)
        ys, xs = np.nonzero(fg)
        feats.append([*px[fg].mean(0), *px[~fg].mean(0), ys.mean(), xs.mean()])
    feats = np.array(feats)
    feats = (feats - feats.mean(0)) / feats.std(0)
    labels = np.array(ds.targets)
    # Nearest class centroid, fitted on half and scored on the other half: at chance (12.5 %) when nothing leaks.
    train, test = np.arange(0, 200), np.arange(200, 400)  # 25 images of each class in each half
    centroids = np.stack([feats[train][labels[train] == c].mean(0) for c in range(8)])
    pred = ((feats[test, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == labels[test]).mean() < 0.25

def test_synthetic_variants_upright_and_plain():
    for bad in (dict(rotation=-1), dict(rotation=361), dict(background="grass")):
        with pytest.raises(ValueError):
            SyntheticDataset(n=4, **bad)
    squares = range(1, 40, 8)  # class 1 is the square
    assert SyntheticDataset(n=40, size=64).classes[1] == "square"
    fill = {}
    for rotation in (0, 360):
        ds = SyntheticDataset(n=40, size=64, seed=2, rotation=rotation)
        ratios = []
        for i in squares:
            ys, xs = np.nonzero(ds.sample(i)[2])
            ratios.append(len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))  # of its bounding box
        fill[rotation] = min(ratios)
    assert fill[0] > 0.9 and fill[360] < 0.9  # upright squares fill their box; most turned ones leave corners
    texture, plain = (SyntheticDataset(n=8, size=48, seed=5, background=b) for b in ("texture", "plain"))
    for i in range(8):
        (t_img, t_label, t_fg), (p_img, p_label, p_fg) = texture.sample(i), plain.sample(i)
        assert t_label == p_label and np.array_equal(t_fg, p_fg)  # the same draws, only the background differs
        t_px, p_px = np.asarray(t_img).astype(int), np.asarray(p_img).astype(int)
        assert np.array_equal(t_px[t_fg], p_px[p_fg])  # object pixels (colour + noise) identical
        bg = p_px[~p_fg]  # (M, 3): one colour plus the +-8 sensor noise
        assert (bg.max(0) - bg.min(0)).max() <= 17
        assert np.abs(bg.mean(0) - t_px[~t_fg].mean(0)).max() < 10  # the texture's mean colour (over all pixels)
    default = SyntheticDataset(n=8, size=48, seed=5)
    assert default.rotation == 360 and default.background == "texture"


def test_synthetic_clutter_adds_muted_edges_to_the_background_only():
    texture, clutter = (SyntheticDataset(n=24, size=64, seed=7, background=b) for b in ("texture", "clutter"))
    edges = {}
    for name, ds in (("texture", texture), ("clutter", clutter)):
        energy = []
        for i in range(24):
            img, label, fg = ds.sample(i)
            px = np.asarray(img).astype(float)
            luma = px.mean(-1)
            inside = ~fg[1:, 1:] & ~fg[:-1, 1:] & ~fg[1:, :-1]  # pixel pairs that are both background
            grad = np.abs(np.diff(luma, axis=0))[:, 1:] + np.abs(np.diff(luma, axis=1))[1:, :]  # (63, 63)
            energy.append(np.mean(grad[inside] > 60))  # sharp steps: noise and smooth textures stay under
            if name == "clutter":
                t_img, t_label, t_fg = texture.sample(i)
                assert label == t_label and np.array_equal(fg, t_fg)  # the object's draws are the texture set's
                sat = np.asarray(img.convert("HSV"))[..., 1].astype(float)
                assert sat[fg].mean() - sat[~fg].mean() > 40  # strokes are muted: saturation still marks the object
        edges[name] = np.mean(energy)
    assert edges["texture"] < 0.005 and edges["clutter"] > 0.03


def test_synthetic_object_size_sets_the_radius():
    for bad in ((0, 0.2), (0.3, 0.2), (0.2, 0.6)):
        with pytest.raises(ValueError, match="object_size"):
            SyntheticDataset(n=4, object_size=bad)
    circles = range(0, 80, 8)  # class 0 is the circle: its mask area is pi r^2, r = radius fraction x side
    for lo, hi in ((0.1, 0.15), (0.3, 0.45)):
        ds = SyntheticDataset(n=80, size=96, seed=3, object_size=(lo, hi))
        for i in circles:
            r = math.sqrt(ds.sample(i)[2].sum() / math.pi) / 96
            assert lo - 0.01 <= r <= hi + 0.01
    # a run's config (lists once saved) is read back as the dataset keywords; an older run's as the old set
    assert data.variant({"synthetic_object_size": [0.15, 0.3], "synthetic_rotation": 0,
                              "synthetic_background": "plain"}) == dict(rotation=0.0, background="plain",
                                                                        object_size=(0.15, 0.3))
    assert data.variant({}) == dict(rotation=360.0, background="texture", object_size=(0.25, 0.45))
    # the default range is the one the set always had: the same images as spelling it out
    a, b = SyntheticDataset(n=4, size=48, seed=1), SyntheticDataset(n=4, size=48, seed=1, object_size=(0.25, 0.45))
    assert all(np.array_equal(np.asarray(a.sample(i)[0]), np.asarray(b.sample(i)[0])) for i in range(4))
