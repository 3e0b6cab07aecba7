"""evaluate.py: k-NN against a hand computation, linear probe, segmentation IoU, extraction, the CLI, bad input."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
from util import runlog
import vit

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# k-NN


def _unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# 6 train points on the unit circle (angles in degrees) with labels in 3 classes, 2 queries.
TRAIN_DEG, TRAIN_LABELS = [0, 10, 25, 50, 90, 180], [0, 1, 1, 0, 2, 2]
QUERY_DEG = [4, 100]


def _hand_knn(query_deg, max_k, k, T=0.07):
    """Released protocol by hand: cosine sims, top max_k, softmax over all max_k, sum the first k by class."""
    sims = sorted(((math.cos(math.radians(query_deg - d)), lab) for d, lab in zip(TRAIN_DEG, TRAIN_LABELS)),
                  reverse=True)[:max_k]
    z = sum(math.exp(s / T) for s, _ in sims)
    scores = [0.0, 0.0, 0.0]
    for s, lab in sims[:k]:
        scores[lab] += math.exp(s / T) / z
    return scores


def test_knn_matches_hand_computation():
    train = torch.tensor([_unit(d) for d in TRAIN_DEG]) * 3.0  # scaled: features get L2-normalised first
    labels = torch.tensor(TRAIN_LABELS)
    queries = torch.tensor([_unit(d) for d in QUERY_DEG]) * 0.5
    preds = evaluate.knn_classify(train, labels, queries, n_classes=3, ks=(2, 3), T=0.07)
    # Query at 4 deg: neighbours 0 deg (class 0, sim cos 4), 10 deg (class 1, cos 6), 25 deg (class 1, cos 21).
    # Weights over the 3 = max_k neighbours: 0.424, 0.406, 0.170 -> k=2 votes class 0, k=3 votes class 1.
    w = [math.exp(math.cos(math.radians(a)) / 0.07) for a in (4, 6, 21)]
    w = [x / sum(w) for x in w]
    assert abs(w[0] - 0.424) < 1e-3 and abs(w[1] - 0.406) < 1e-3 and abs(w[2] - 0.170) < 1e-3
    assert preds[2][0, 0].item() == 0 and preds[3][0, 0].item() == 1
    for k in (2, 3):
        for q, deg in enumerate(QUERY_DEG):
            scores = _hand_knn(deg, max_k=3, k=k)
            # full top-C order, ranked by the hand scores (classes with zero score: any order among themselves)
            ranked = sorted(range(3), key=lambda c: -scores[c])
            n_pos = sum(s > 0 for s in scores)
            assert preds[k][q, :n_pos].tolist() == ranked[:n_pos], (k, deg, scores)
    assert preds[2][1, 0].item() == 2 and preds[3][1].tolist() == [2, 0, 1]  # query at 100 deg


def test_knn_weights_are_a_softmax_over_max_k():
    """The class scores (not just the argmax) equal softmax(top max_k sims / T) summed over the first k."""
    train = torch.tensor([_unit(d) for d in TRAIN_DEG])
    labels = torch.tensor(TRAIN_LABELS)
    queries = torch.tensor([_unit(d) for d in QUERY_DEG])
    for ks, max_k in (((2, 3), 3), ((1, 2, 100), 6)):  # max_k = max(ks) capped at the 6 train points
        scores = evaluate.knn_scores(train, labels, queries, n_classes=3, ks=ks, T=0.07)
        for k in ks:
            expected = torch.tensor([_hand_knn(d, max_k, min(k, max_k)) for d in QUERY_DEG])
            assert torch.allclose(scores[k], expected, atol=1e-5), (ks, k)
    # with k = max_k the scores of a query sum to 1: the normalisation is over all max_k neighbours
    assert torch.allclose(scores[100].sum(1), torch.ones(2), atol=1e-5)


def test_knn_brute_force_and_chunking():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(120, 8, generator=g), torch.randn(37, 8, generator=g)
    labels = torch.randint(0, 6, (120,), generator=g)
    ks = (1, 5, 20, 200)
    full = evaluate.knn_classify(train, labels, test, 6, ks, chunk=1000)
    chunked = evaluate.knn_classify(train, labels, test, 6, ks, chunk=5)
    for k in ks:
        assert torch.equal(full[k], chunked[k])
        assert full[k].shape == (37, 5)
    # brute force, one query at a time, plain python
    tr, te = F.normalize(train, dim=1), F.normalize(test, dim=1)
    for q in range(len(te)):
        sims = sorted(((float(te[q] @ tr[i]), int(labels[i])) for i in range(len(tr))), reverse=True)
        z = sum(math.exp(s / 0.07) for s, _ in sims)  # max_k = 120, every train point
        for k in ks:
            scores = [0.0] * 6
            for s, lab in sims[:k]:
                scores[lab] += math.exp(s / 0.07) / z
            assert full[k][q, 0].item() == max(range(6), key=lambda c: scores[c])
    acc = evaluate.knn_accuracy(train, labels, test, labels[:37], 6, ks)
    assert set(acc) == set(ks) and all(0 <= a["top1"] <= a["top5"] <= 100 for a in acc.values())


# ---------------------------------------------------------------------------------------------------------------
# Linear probe


def test_create_linear_input_layout():
    blocks_cls = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # (B, n, D)
    patch_mean = -torch.ones(2, 3)
    x = evaluate.create_linear_input(blocks_cls, patch_mean, n_blocks=1, avgpool=True)
    assert torch.equal(x[0], torch.tensor([9.0, 10, 11, -1, -1, -1]))  # [last block cls, mean patch]
    x = evaluate.create_linear_input(blocks_cls, patch_mean, n_blocks=4, avgpool=False)
    assert torch.equal(x[1], torch.arange(12, 24, dtype=torch.float32))  # blocks -4..-1, oldest first


def _separable(n, seed, n_classes=4, D=16):
    """Only the mean patch token carries the class (linearly separable); every cls token is noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_classes, D, generator=torch.Generator().manual_seed(123)) * 2
    labels = torch.randint(0, n_classes, (n,), generator=g)
    blocks_cls = torch.randn(n, 4, D, generator=g)
    patch_mean = torch.randn(n, D, generator=g) + means[labels]
    return dict(blocks_cls=blocks_cls, patch_mean=patch_mean, labels=labels, cls=blocks_cls[:, -1])


def test_linear_probe_separable():
    train, val = _separable(640, 0), _separable(300, 1)
    res = evaluate.linear_probe(train, val, n_classes=4, epochs=10, epoch_length=5, device="cpu")
    assert len(res["classifiers"]) == 52
    best = res["best"]
    assert best in res["classifiers"]
    top = max(r["holdout_top1"] for r in res["classifiers"])
    assert best["holdout_top1"] == top  # chosen on held-out train, ties to the lowest held-out loss
    assert best["holdout_loss"] == min(r["holdout_loss"] for r in res["classifiers"] if r["holdout_top1"] == top)
    assert best["avgpool"]  # the only informative input: the selection must find it
    assert best["val_top1"] > 90.0
    assert best["lr"] >= 1e-3  # tiny learning rates barely move in 50 steps
    assert all(r["val_top1"] < 50.0 for r in res["classifiers"] if not r["avgpool"])  # cls tokens: near chance
    assert res["val_top1_selected_on_val"] >= best["val_top1"]


def test_linear_probe_is_seeded():
    """The same seed gives the same 52 classifiers whatever the global RNG did before; another seed draws others."""
    train, val = _separable(200, 0), _separable(60, 1)
    run = lambda seed: evaluate.linear_probe(train, val, n_classes=4, epochs=1, epoch_length=3, seed=seed,
                                             device="cpu")["classifiers"]
    torch.manual_seed(1)
    first = run(0)
    torch.manual_seed(2)  # a different global state: the heads must not draw from it
    assert run(0) == first
    assert run(1) != first


def test_linear_probe_counts_iterations_not_passes(monkeypatch):
    """Released semantics: epochs x epoch_length optimiser steps whatever the data size (not passes over it)."""
    steps = []
    step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: (steps.append(1), step(self, *a, **k))[1])
    for n in (40, 700):  # 36 fit rows -> one batch a pass; 630 -> five batches a pass
        steps.clear()
        train, val = _separable(n, 0), _separable(20, 1)
        evaluate.linear_probe(train, val, n_classes=4, epochs=3, epoch_length=7, device="cpu")
        assert len(steps) == 21


# ---------------------------------------------------------------------------------------------------------------
# Segmentation IoU


class _BlockDataset:
    """128 px images with a white rectangle on black, aligned to the 16 px cells that become the 8x8 patches."""

    def __init__(self, boxes):
        self.boxes = boxes  # (top, left, bottom, right) in cells

    def __len__(self):
        return len(self.boxes)

    def sample(self, i):
        t, l, b, r = self.boxes[i]
        mask = np.zeros((128, 128), dtype=bool)
        mask[16 * t:16 * b, 16 * l:16 * r] = True
        return Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB"), 0, mask


class _FakeModel:
    """Patch features +v on bright (foreground) patches and -v on dark ones."""
    patch_size = 14

    def __init__(self, v):
        self.v = v

    def forward_features(self, x):
        bright = F.avg_pool2d(x.mean(1, keepdim=True), 14).flatten(1) > 0  # (B, N)
        return {"x_norm_patchtokens": (bright.float() * 2 - 1)[..., None] * self.v}  # (B, N, D)


def test_segmentation_iou_perfect_features_and_sign_invariance():
    ds = _BlockDataset([(2, 2, 6, 5), (1, 3, 4, 7), (3, 1, 7, 7)])
    v = torch.randn(16, generator=torch.Generator().manual_seed(0))
    for sign in (1, -1):
        res = evaluate.segmentation_iou(_FakeModel(sign * v), ds, n_images=3, size=112, device="cpu", batch_size=2)
        assert res["miou"] == pytest.approx(100.0)
        assert res["miou_border"] == pytest.approx(100.0)  # boxes off the border: the heuristic sign is right too
        assert res["ceiling"] == pytest.approx(100.0)  # cell-aligned masks: the patch grid loses nothing


def test_segmentation_iou_hand_value():
    """Features that see a 2x2-cell box where the truth is 2x4 cells: IoU 4/8, by hand."""
    class Shifted(_FakeModel):
        def forward_features(self, x):
            out = super().forward_features(x)["x_norm_patchtokens"].clone()
            out.view(-1, 8, 8, len(self.v))[:, :, 4:] = -self.v  # (B, h, w, D): right half says background
            return {"x_norm_patchtokens": out}
    ds = _BlockDataset([(2, 2, 4, 6)])
    res = evaluate.segmentation_iou(Shifted(torch.ones(4)), ds, n_images=1, size=112, device="cpu")
    assert res["miou"] == pytest.approx(50.0)


def test_segmentation_iou_on_a_folder_with_masks(tmp_path):
    """--val-masks: each image's mask at the same relative path; a cell-aligned box is found exactly."""
    ds = _BlockDataset([(2, 2, 6, 5), (1, 3, 4, 7)])
    for i in range(len(ds)):
        img, _, mask = ds.sample(i)
        for root, picture in (("val", img), ("masks", Image.fromarray(mask.astype(np.uint8) * 255))):
            (tmp_path / root / "cat").mkdir(parents=True, exist_ok=True)
            picture.save(tmp_path / root / "cat" / f"{i}.png")
    folder = evaluate.MaskedFolder(evaluate.data.ImageFolderDataset(tmp_path / "val"), tmp_path / "masks")
    assert np.array_equal(folder.sample(1)[2], ds.sample(1)[2])
    v = torch.randn(16, generator=torch.Generator().manual_seed(0))
    res = evaluate.segmentation_iou(_FakeModel(v), folder, n_images=2, size=112, device="cpu")
    assert res["miou"] == pytest.approx(100.0) and res["n_images"] == 2
    (tmp_path / "masks" / "cat" / "1.png").unlink()
    with pytest.raises(evaluate.MissingFile, match="no mask .*1.png"):
        folder.sample(1)
    with pytest.raises(ValueError, match="--val-masks needs --val"):
        evaluate.EvalConfig(val_masks=str(tmp_path / "masks"))


# ---------------------------------------------------------------------------------------------------------------
# Extraction, transforms, loading


def test_eval_transform_sizes():
    t = evaluate.EvalTransform(100, crop=True)  # rounded to 98
    assert t(Image.new("RGB", (300, 200))).shape == (3, 98, 98)
    assert t(Image.new("RGB", (10, 10))).shape == (3, 98, 98)  # smaller than a patch: resized up
    assert evaluate.EvalTransform(5, crop=False)(Image.new("RGB", (3, 7))).shape == (3, 14, 14)
    white = evaluate.to_tensor(Image.new("RGB", (2, 2), (255, 255, 255)))
    assert torch.allclose(white[:, 0, 0], (1 - torch.tensor(evaluate.data.IMAGENET_MEAN))
                          / torch.tensor(evaluate.data.IMAGENET_STD))


def test_grey_eval_transform_gives_the_luma_on_three_channels():
    mean, std = torch.tensor(evaluate.data.IMAGENET_MEAN), torch.tensor(evaluate.data.IMAGENET_STD)
    img = Image.new("RGB", (28, 28), (200, 40, 90))
    x = evaluate.EvalTransform(28, crop=False, patch=14, grey=True)(img)  # (3, 28, 28), normalised
    pixels = x * std.view(3, 1, 1) + mean.view(3, 1, 1)  # back to 0..1
    luma = round(0.299 * 200 + 0.587 * 40 + 0.114 * 90)  # ITU-R 601 luma, rounded as PIL's convert("L"): 94
    assert torch.allclose(pixels, torch.full_like(pixels, luma / 255), atol=1e-5)
    colour = evaluate.EvalTransform(28, crop=False, patch=14)(img) * std.view(3, 1, 1) + mean.view(3, 1, 1)
    assert torch.allclose(colour[:, 0, 0], torch.tensor([200, 40, 90]) / 255, atol=1e-5)  # grey=False: untouched


def test_saw_only_grey_reads_the_run_config():
    assert evaluate.saw_only_grey({"p_grayscale": 1.0})
    assert not evaluate.saw_only_grey({"p_grayscale": 0.2}) and not evaluate.saw_only_grey({})


def test_extract_features_shapes_and_order():
    import data
    torch.manual_seed(0)
    model = vit.build_model("vit_tiny", img_size=112).eval()
    ds = data.SyntheticDataset(n=5, size=128, seed=3, transform=evaluate.EvalTransform(112, crop=False))
    f = evaluate.extract_features(model, ds, batch_size=2, device="cpu")
    assert f["cls"].shape == (5, 192) and f["blocks_cls"].shape == (5, 4, 192)
    assert f["patch_mean"].shape == (5, 192) and f["labels"].shape == (5,)
    assert f["labels"].tolist() == [ds[i][1] for i in range(5)]
    x = torch.stack([ds[i][0] for i in range(5)])
    with torch.no_grad():
        ref = model.forward_features(x)
    assert torch.allclose(f["cls"], ref["x_norm_clstoken"], atol=1e-4)  # = model(x), in dataset order
    assert torch.allclose(f["patch_mean"], ref["x_norm_patchtokens"].mean(1), atol=1e-4)
    f["cls"].sum().backward  # ordinary tensors (not inference tensors): the linear probe can train on them
    assert not f["blocks_cls"].is_inference()


def test_extract_features_torchrun_matches_single_process(tmp_path):
    """2 gloo ranks each extract a contiguous shard (2 + 3 items) and gather: the same features in dataset order."""
    script = tmp_path / "extract.py"
    script.write_text(f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import torch, torch.distributed as dist, data, evaluate, vit
from util.distributed import init
init("cpu")
torch.manual_seed(0)
model = vit.build_model("vit_tiny", img_size=28).eval()
ds = data.SyntheticDataset(n=5, size=32, seed=3, transform=evaluate.EvalTransform(28, crop=False))
f = evaluate.extract_features(model, ds, batch_size=2, device="cpu")
if dist.get_rank() == 0:
    torch.save(f, {str(tmp_path / "dist.pt")!r})
dist.barrier(); dist.destroy_process_group()
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import data
    torch.manual_seed(0)
    model = vit.build_model("vit_tiny", img_size=28).eval()
    ds = data.SyntheticDataset(n=5, size=32, seed=3, transform=evaluate.EvalTransform(28, crop=False))
    single = evaluate.extract_features(model, ds, batch_size=2, device="cpu")
    gathered = torch.load(tmp_path / "dist.pt")
    for key in single:
        assert torch.allclose(single[key].float(), gathered[key].float(), atol=1e-5), key


def test_load_backbone_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="weights file not found: .*nope.pth"):
        evaluate.load_backbone(tmp_path / "nope.pth", device="cpu")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd.pth: not a ViT backbone"):
        evaluate.load_backbone(tmp_path / "odd.pth", device="cpu")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"could not read .*text.pth as a checkpoint: it is a text file"):
        evaluate.load_backbone(tmp_path / "text.pth", device="cpu")
    monkeypatch.chdir(tmp_path)  # no runs/train/teacher_backbone.pth here
    with pytest.raises(FileNotFoundError, match="python train.py"):
        evaluate.load_backbone(None, device="cpu")
    with pytest.raises(FileNotFoundError, match="--weights .*nope.pth: no such file"):
        evaluate.main(["--weights", str(tmp_path / "nope.pth")])
    # issue 12, defect 9: a training checkpoint folder passed as --weights says what it is and what to pass instead
    (tmp_path / "ckpt_00000004").mkdir()
    (tmp_path / "ckpt_00000004" / ".metadata").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="training checkpoint folder .*teacher_backbone.pth"):
        evaluate.load_backbone(tmp_path / "ckpt_00000004", device="cpu")


def test_random_like_is_a_fresh_network():
    torch.manual_seed(1)
    model = vit.VisionTransformer(img_size=28, embed_dim=64, depth=2, num_heads=1, num_register_tokens=2,
                                  init_values=1.0)
    twin = evaluate.random_like(model, seed=0)
    assert twin.num_register_tokens == 2 and twin.patch_size == model.patch_size
    assert not torch.equal(twin.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert torch.all(twin.blocks[0].ls1.gamma == 1e-5)  # training init, not the hub placeholder 1.0
    assert torch.equal(evaluate.random_like(model, seed=0).pos_embed, twin.pos_embed)  # seeded: same on every rank


def test_cli_json(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(vit.build_model("vit_tiny", img_size=112).state_dict(), weights)
    out = tmp_path / "out.json"
    (tmp_path / "teacher.pth").write_bytes(b"PK\x03\x04 torn")  # issue 12, defect 4: a corrupt file beside the weights
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--weights", str(weights), "--json", str(out),
         "--n-train", "24", "--n-val", "8", "--seg-images", "3", "--linear-epochs", "2",
         "--linear-epoch-length", "3", "--size", "56",
         "--ks", "5", "10"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "k-NN" in proc.stdout and "foreground IoU" in proc.stdout  # the results, despite the corrupt teacher.pth
    assert "ignoring " in proc.stderr and "teacher.pth" in proc.stderr and "corrupt or truncated" in proc.stderr
    res = json.loads(out.read_text())

    def numbers(obj):
        if isinstance(obj, dict):
            return [x for v in obj.values() for x in numbers(v)]
        if isinstance(obj, list):
            return [x for v in obj for x in numbers(v)]
        return [obj] if isinstance(obj, float) else []

    for name in ("backbone", "random_baseline"):
        assert set(res[name]["knn"]) == {"5", "10"}
        assert 0 <= res[name]["segmentation"]["miou"] <= 100
    assert set(res["raw_pixels"]["knn"]) == {"5", "10"} and "raw pixels" in proc.stdout  # the floor, always
    assert 0 <= res["backbone"]["linear"]["best"]["val_top1"] <= 100
    assert "linear" not in res["random_baseline"]
    assert len(numbers(res)) > 50 and all(math.isfinite(x) for x in numbers(res))
    assert res["grey"] is False  # no readable run config beside the weights: colour, as the images are


def test_evaluation_reads_the_run_s_images_grey_and_variant(tmp_path, capsys):
    """A run that trained on grey crops of upright, plain-background objects is read on those images, grey."""
    torch.manual_seed(0)
    weights = tmp_path / "teacher_backbone.pth"
    torch.save(vit.build_model("vit_tiny", img_size=32, patch_size=8, depth=1).state_dict(), weights)
    run = dict(p_grayscale=1.0, synthetic_rotation=0.0, synthetic_background="plain", global_size=32,
               synthetic_size=48, layerscale=0.1)
    torch.save({"config": run}, tmp_path / "teacher.pth")  # what train.py writes beside its exports
    res = evaluate.main(["--weights", str(weights), "--n-train", "40", "--n-val", "40", "--seg-images", "2",
                         "--linear-epochs", "1", "--linear-epoch-length", "3", "--ks", "5",
                         "--no-baseline"])
    out = capsys.readouterr().out
    assert res["grey"] is True and res["size"] == 32 and "raw pixels 28x28, grey" in out
    assert res["backbone"]["segmentation"]["size"] == 64  # the IoU on an 8 x 8 grid, not the 4 x 4 of a 32-px crop
    assert "synthetic={'rotation': 0.0, 'background': 'plain', 'object_size': (0.25, 0.45)}" in out
    # the raw-pixel floor was taken on those images: recompute it by hand on the same draws, grey
    variant = dict(n_classes=8, rotation=0.0, background="plain")
    grey = evaluate.data.to_grey
    train_set, val_set = ([(grey(img), y) for img, y in evaluate.data.SyntheticDataset(40, 48, seed=seed, **variant)]
                          for seed in (0, 1))
    feats = [evaluate.raw_pixel_features(ds) for ds in (train_set, val_set)]
    labels = [torch.tensor([y for _, y in ds]) for ds in (train_set, val_set)]
    expected = evaluate.knn_accuracy(feats[0], labels[0], feats[1], labels[1], 8, ks=(5,), shard=False)[5]["top1"]
    assert res["raw_pixels"]["knn"]["5"]["top1"] == expected
    colour = evaluate.main(["--weights", str(weights), "--n-train", "40", "--n-val", "40", "--seg-images", "0",
                            "--linear-epochs", "1", "--linear-epoch-length", "3", "--ks", "5", "--no-baseline",
                            "--no-grey"])
    assert colour["grey"] is False and "raw pixels 28x28, grey" not in capsys.readouterr().out


def test_like_reads_bare_weights_on_another_run_s_images(tmp_path, capsys):
    """Weights with no run beside them (a released file) are read --like a run folder: its size, grey and variant."""
    torch.manual_seed(0)
    (tmp_path / "bare").mkdir()
    weights = tmp_path / "bare" / "hub.pth"
    torch.save(vit.build_model("vit_tiny", img_size=32, patch_size=8, depth=1).state_dict(), weights)
    (tmp_path / "run").mkdir()
    torch.save({"config": dict(p_grayscale=1.0, synthetic_rotation=0.0, synthetic_background="clutter",
                               global_size=32, synthetic_size=48)}, tmp_path / "run" / "teacher.pth")
    args = ["--weights", str(weights), "--n-train", "16", "--n-val", "16", "--seg-images", "0", "--linear-epochs", "1",
            "--linear-epoch-length", "2", "--ks", "5", "--no-baseline"]
    res = evaluate.main(args + ["--like", str(tmp_path / "run")])
    assert res["grey"] is True and res["size"] == 32
    assert "synthetic={'rotation': 0.0, 'background': 'clutter'" in capsys.readouterr().out
    own = evaluate.main(args)  # alone, the file is read as a released model: 224 px, colour, the full synthetic set
    assert own["grey"] is False and own["size"] == 224 and "'background': 'texture'" in capsys.readouterr().out
    with pytest.raises(evaluate.MissingFile, match="--like .*bare: no teacher.pth or student.pth"):
        evaluate.main(args + ["--like", str(tmp_path / "bare")])


def test_cli_rejects_unknown_flags(capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_config(["--no-such-flag"])
    assert "unrecognized arguments" in capsys.readouterr().err
    cfg = evaluate.parse_config(["--ks", "5", "10", "--no-baseline", "--size", "98"])
    assert cfg.ks == (5, 10) and cfg.baseline is False and cfg.size == 98 and cfg.weights is None


# ---------------------------------------------------------------------------------------------------------------
# Raw pixels and the online monitor


class SolidColours(torch.utils.data.Dataset):
    """Class c = one of four colours, with a per-image brightness offset (a nuisance the mean removal cancels)."""
    COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]

    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.targets = [i % 4 for i in range(n)]
        self.offsets = rng.integers(-30, 31, size=n)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        rgb = np.array(self.COLOURS[self.targets[i]]) + self.offsets[i]
        return Image.fromarray(np.full((20, 20, 3), rgb, dtype=np.uint8)), self.targets[i]


def test_raw_pixel_features_remove_each_image_mean():
    ds = SolidColours(8, seed=0)
    x = evaluate.raw_pixel_features(ds, side=6)
    assert x.shape == (8, 3 * 6 * 6)
    for i in range(8):
        rgb = np.array(SolidColours.COLOURS[ds.targets[i]]) + ds.offsets[i]
        expected = np.tile(rgb - rgb.mean(), 6 * 6)  # channels-last, flattened: r g b r g b ...
        np.testing.assert_allclose(x[i].numpy(), expected, atol=1e-3)


def test_raw_pixel_features_grey():
    ds = SolidColours(8, seed=0)
    x = evaluate.raw_pixel_features(ds, side=6, grey=True)
    assert x.shape == (8, 3 * 6 * 6)
    assert x.abs().max() < 1e-3  # one grey level on all three channels, minus its mean: nothing left


def test_knn_monitor_scores_a_perfect_and_a_useless_embedding():
    bank, queries = SolidColours(40, seed=0), SolidColours(20, seed=1)
    monitor = runlog.KnnMonitor(bank, queries, n_classes=4, size=14, patch=7, batch_size=16)
    assert monitor.images[0].shape == (40, 3, 14, 14) and monitor.raw_pixels == 100.0  # colour = class here
    mean_colour = lambda x: x.mean(dim=(2, 3))  # (B, 3): separates the four colours
    assert monitor(mean_colour, "cpu") == 100.0
    constant = lambda x: torch.ones(len(x), 3)  # every image the same: the top-k is the first k of the bank
    assert monitor(constant, "cpu") < 50.0
    grey = runlog.KnnMonitor(bank, queries, n_classes=4, size=14, patch=7, batch_size=16, grey=True)
    x = grey.images[0]  # (40, 3, 14, 14), normalised per channel: undo it to compare the channels
    std, mean = torch.tensor(evaluate.data.IMAGENET_STD), torch.tensor(evaluate.data.IMAGENET_MEAN)
    pixels = x * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5)
    assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-5)
