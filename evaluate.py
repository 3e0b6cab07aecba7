"""Frozen-feature evaluation of a DINOv2 backbone: k-NN, linear probe and emergent segmentation.

Paper §7 (frozen-feature k-NN and linear evaluation on ImageNet-1k, the PCA of patch features) with the released
protocols of `dinov2/eval/knn.py` and `dinov2/eval/linear.py`. Features are extracted once; every protocol reads them.

Public names, in reading order:
    load_backbone, random_like                    -- the frozen network to evaluate (and its random twin)
    training_config, saw_only_grey                -- the run that wrote the weights: its sizes, grey crops or not
    round_to_patch, EvalTransform                 -- resize / centre-crop / normalise (data.to_grey for a grey run)
    extract_features                              -- batched, a contiguous shard per rank, gathered in dataset order
    knn_scores, knn_classify, knn_accuracy        -- weighted k-NN on L2-normalised cls tokens
    raw_pixel_features                            -- the raw-pixel floor (util/runlog.py's KnnMonitor: train.py's)
    LINEAR_LRS, create_linear_input, linear_probe -- 52 linear classifiers trained at once on cached features
    first_principal_component, segmentation_iou   -- foreground from the first PCA component of the patch tokens
    EvalConfig, main                              -- the command line

Commands:
    python evaluate.py                                   # model of `python train.py`, synthetic set, + random baseline
    python evaluate.py --weights dinov2_vits14_pretrain.pth --train imagenet/train --val imagenet/val
    python evaluate.py --weights other_run/teacher_backbone.pth --like runs/train   # on the images runs/train saw
    torchrun --nproc_per_node=8 evaluate.py --weights W --train DIR --val DIR --json eval.json

Shape alphabet: B batch, N tokens (patches), D width, Q queries, C classes, n blocks, max_k neighbours.
"""
import copy
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from util import cli
import data
import vit
from data import to_grey, to_tensor, variant
from util.distributed import barrier, close, gather_shards, init, pick_device, print0, rank_world
from util.checkpoint import atomic_write_text
from util.cli import MissingFile, UserError, arg
from util.weights import from_pretrained, read_checkpoint
from knn import ShardedKNN, shard_range

DEFAULT_WEIGHTS = Path("runs/train/teacher_backbone.pth")


# ---------------------------------------------------------------------------------------------------------------
# The frozen backbone


def load_backbone(weights=None, arch: str = "vit_tiny", device=None, random_init: bool = False,
                  img_size: int = 112, seed: int = 0, layerscale: float | None = 1e-5) -> nn.Module:
    """The one loader of frozen backbones (evaluate.py, visualize.py, curate.py): eval mode, no gradients.

    weights: any layout util.weights.from_pretrained reads; None: DEFAULT_WEIGHTS, the output of `python train.py`.
    random_init: a random `arch` instead (the baseline), LayerScale at `layerscale` (None: none), the same network on
    every rank and every call for one seed.
    """
    device = device or pick_device()
    if random_init:
        if weights is not None:
            raise UserError("pass either --weights or --random, not both")
        with torch.random.fork_rng(devices=[]):  # every rank builds the same network; the caller's RNG untouched
            torch.manual_seed(seed)
            model = vit.build_model(arch, img_size=round_to_patch(img_size, 14), init_values=layerscale)  # patch 14
        return model.to(device).eval().requires_grad_(False)  # frozen: nothing here needs a backbone gradient
    if weights is None:
        if not DEFAULT_WEIGHTS.is_file():
            raise MissingFile(f"no weights given and the default {DEFAULT_WEIGHTS} does not exist: run `python "
                              "train.py` first, pass --weights PATH (e.g. dinov2_vits14_pretrain.pth), or --random")
        weights = DEFAULT_WEIGHTS
    path = Path(weights)
    if not path.exists():
        raise MissingFile(f"weights file not found: {path}")
    try:  # a file or a Hugging Face folder; a training checkpoint folder is an error that says what to pass
        model = from_pretrained(str(path))
    except KeyError as e:  # a tensor the layout needs is missing
        raise UserError(f"could not load a ViT backbone from {path}: no tensor {e}") from e
    return model.to(device).eval().requires_grad_(False)


def training_config(run_dir) -> dict:
    """The config of the run in `run_dir`, from the teacher.pth / student.pth train.py / distill.py write beside
    their exports ({} if none): where the random baseline starts (layerscale) and the images it is read on."""
    if run_dir is not None:
        for name in ("teacher.pth", "student.pth"):
            run_file = Path(run_dir) / name
            if run_file.is_file():
                try:  # only a hint: a file beside the weights that does not read must not cost the evaluation
                    config = read_checkpoint(run_file, mmap=True).get("config", {})
                    return dict(config) if isinstance(config, dict) else {}
                except (UserError, AttributeError) as e:
                    warnings.warn(f"ignoring {run_file} beside the weights ({e}); using the default sizes")
    return {}


def random_like(model: nn.Module, seed: int = 0, layerscale: float = 1e-5) -> nn.Module:
    """A randomly initialised copy of `model` (same arch, patch size, registers, FFN): the baseline network. Its
    LayerScale starts at the training init `layerscale`, not at the hub builder's placeholder 1.0 a loaded model has."""
    torch.manual_seed(seed)  # every rank must build the same random network
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, vit.LayerScale):
            m.init_values = layerscale
    twin.init_weights()
    return twin.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------------------------
# Evaluation transform (no torchvision: a few lines of PIL)

def saw_only_grey(run: dict) -> bool:
    """Did the run that wrote the weights turn every training crop grey (its config's p_grayscale, 1 = always)?"""
    return float(run.get("p_grayscale", 0.0)) >= 1.0


def round_to_patch(size: int, patch: int) -> int:
    """The nearest multiple of the patch size, at least one patch (the patch embedding needs whole patches)."""
    return max(patch, int(round(size / patch)) * patch)


@dataclass
class EvalTransform:
    """Released eval transform: Resize(size*256/224, bicubic) on the shorter side, CenterCrop(size), normalise;
    `size` rounded to the patch. crop=False: a plain resize, for square, framed images (the synthetic set).
    grey=True: turned grey first (a run that saw only grey crops). A dataclass: picklable for DataLoader workers.
    """
    size: int = 224
    crop: bool = True
    patch: int = 14
    grey: bool = False

    def __call__(self, img: Image.Image) -> torch.Tensor:
        size = round_to_patch(self.size, self.patch)
        if self.grey:
            img = to_grey(img)
        if not self.crop:
            return to_tensor(img.resize((size, size), Image.BICUBIC))
        w, h = img.size
        scale = int(size * 256 / 224) / min(w, h)  # the shorter side to size * 256 / 224
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        return to_tensor(img.crop((left, top, left + size, top + size)))


# ---------------------------------------------------------------------------------------------------------------
# Feature extraction


def extract_features(model: nn.Module, dataset, batch_size: int = 64, device=None, n_last_blocks: int = 4,
                     num_workers: int = 0, desc: str = "features") -> dict:
    """Frozen features of every item of `dataset` (items are (image tensor, label)), in dataset order.

    Returns float32 CPU tensors:
        cls         (N, D)    final-norm cls token = model(x), the k-NN feature
        blocks_cls  (N, n, D) normed cls token of each of the last n blocks  } the linear-probe inputs
        patch_mean  (N, D)    mean of the last block's normed patch tokens   }
        labels      (N,)      long
    Under torchrun rank r extracts the contiguous items [lo, hi) of knn.shard_range; gather_shards joins them.
    """
    device = torch.device(device or next(model.parameters()).device)
    rank, world = rank_world()
    n_last_blocks = min(n_last_blocks, model.n_blocks)
    shard = torch.utils.data.Subset(dataset, range(*shard_range(len(dataset), rank, world)))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    blocks_cls, patch_mean, labels = [], [], []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for images, target in tqdm(loader, desc=desc, disable=rank != 0, leave=False):
            # With norm=True each block's output goes through the final norm, so the last block's cls token
            # is exactly model(x): one forward gives the k-NN and the linear-probe features.
            outs = model.get_intermediate_layers(images.to(device, non_blocking=True), n=n_last_blocks,
                                                 return_class_token=True)  # n x ((B, N, D), (B, D))
            blocks_cls.append(torch.stack([c for _, c in outs], dim=1).float().cpu())  # (B, n, D)
            patch_mean.append(outs[-1][0].float().mean(dim=1).cpu())  # (B, D)
            labels.append(torch.as_tensor(target, dtype=torch.long))
    # Concatenated outside inference_mode, so the results are ordinary tensors (the linear probe trains on them).
    blocks_cls = gather_shards(torch.cat(blocks_cls))  # (N, n, D), the ranks' shards in rank = dataset order
    return dict(cls=blocks_cls[:, -1].clone(), blocks_cls=blocks_cls, patch_mean=gather_shards(torch.cat(patch_mean)),
                labels=gather_shards(torch.cat(labels)))


# ---------------------------------------------------------------------------------------------------------------
# k-NN (dinov2/eval/knn.py)


def knn_scores(train, train_labels: torch.Tensor, queries: torch.Tensor, n_classes: int,
               ks=(10, 20, 100, 200), T: float = 0.07) -> dict:
    """Class scores {k: (Q, C)} of the released weighted k-NN, for L2-normalised train (Ntr, D) and queries (Q, D):
    the score of a class is the summed weight of the first k neighbours with that label, the weights a softmax over
    all max_k = max(ks) neighbours (DINOv1's exp(sims / T): same argmax). Ties go to the lower train index (knn.py).
    `train` may be a knn.ShardedKNN over the ranks' shards (every rank passes the same queries); all Ntr labels.
    """
    index = train if isinstance(train, ShardedKNN) else ShardedKNN(train, local=True)
    max_k = min(max(ks), index.total)
    top_sims, top_idx = index.search(queries, max_k)  # (Q, max_k), most similar first
    weights = (top_sims / T).softmax(dim=1)  # (Q, max_k): normalised over all max_k neighbours, as released
    neighbour_labels = train_labels[top_idx]  # (Q, max_k)
    scores = {}
    for k in ks:
        first_k = min(k, max_k)
        # scatter_add = sum_j onehot(label_j) * w_j, without building a (Q, max_k, C) one-hot tensor
        scores[k] = weights.new_zeros(len(weights), n_classes).scatter_add_(
            1, neighbour_labels[:, :first_k], weights[:, :first_k])  # (Q, C)
    return scores


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, n_classes: int,
                 ks=(10, 20, 100, 200), T: float = 0.07, chunk: int = 256, device=None, shard: bool = True) -> dict:
    """Weighted k-NN, the released protocol. Returns {k: top-5 predicted classes (Q, min(5, C)), best first}.

    Under torchrun (shard=True) every rank passes the same features and, as released, searches its contiguous shard
    of the train features; the ranks' top-k lists are merged (knn.ShardedKNN): the result is one process's.
    shard=False: a call made on one rank only, searching all train features locally."""
    device = torch.device(device) if device is not None else test_feats.device
    rank, world = rank_world() if shard else (0, 1)
    start, end = shard_range(len(train_feats), rank, world)
    local = F.normalize(train_feats[start:end].float().to(device), dim=1)  # (Ntr / world, D) this rank's shard
    train = ShardedKNN(local, start, len(train_feats), local=not shard)
    test = F.normalize(test_feats.float().to(device), dim=1)  # (Q, D)
    train_labels = train_labels.long().to(device)
    n_top = min(5, n_classes)
    preds = {k: [torch.zeros(0, n_top, dtype=torch.long)] for k in ks}
    for q0 in range(0, len(test), chunk):
        for k, scores in knn_scores(train, train_labels, test[q0:q0 + chunk], n_classes, ks, T).items():
            preds[k].append(scores.topk(n_top, dim=1).indices.cpu())  # (Qc, 5)
    return {k: torch.cat(v) for k, v in preds.items()}


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, n_classes: int, ks=(10, 20, 100, 200),
                 T: float = 0.07, chunk: int = 256, device=None, shard: bool = True) -> dict:
    """{k: {"top1": %, "top5": %}} of knn_classify (micro-averaged, as released); under 5 classes top5 is top-C."""
    preds = knn_classify(train_feats, train_labels, test_feats, n_classes, ks, T, chunk, device, shard)
    test_labels = test_labels.long().cpu().view(-1, 1)  # (Q, 1)
    return {k: {"top1": 100.0 * (p[:, :1] == test_labels).any(1).float().mean().item(),
                "top5": 100.0 * (p == test_labels).any(1).float().mean().item()} for k, p in preds.items()}


def raw_pixel_features(dataset, side: int = 28, crop: bool = False, grey: bool = False) -> torch.Tensor:
    """The floor every learned feature must clear: each image (dataset[i][0], PIL) resized to side x side, minus its
    own mean -> (N, 3 * side * side) float32. A cosine k-NN on these already tells silhouettes apart."""
    def prepare(img):  # what the network sees: grey if `grey`, the centre square if `crop` (as EvalTransform)
        img = to_grey(img) if grey else img.convert("RGB")
        w, h = img.size
        s = min(w, h)
        return img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)) if crop else img

    rows = [np.asarray(prepare(dataset[i][0]).resize((side, side), Image.BICUBIC), dtype=np.float32)
            for i in range(len(dataset))]
    x = torch.from_numpy(np.stack(rows)).flatten(1)  # (N, 3 * side * side)
    return x - x.mean(dim=1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------
# Linear probe (dinov2/eval/linear.py)

LINEAR_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)  # x batch/256


def create_linear_input(blocks_cls: torch.Tensor, patch_mean: torch.Tensor, n_blocks: int, avgpool: bool):
    """The cls tokens of the last `n_blocks` blocks (+ the last block's mean patch token if avgpool), concatenated:
    blocks_cls (B, n, D), patch_mean (B, D) -> (B, (n_blocks + avgpool) * D)."""
    x = blocks_cls[:, -n_blocks:].flatten(1)  # (B, n_blocks * D), oldest block first
    return torch.cat([x, patch_mean], dim=1) if avgpool else x


def linear_probe(train: dict, val: dict, n_classes: int, epochs: int = 10, batch_size: int = 128,
                 lrs=LINEAR_LRS, n_blocks_list=(1, 4), avgpool_list=(False, True), holdout: float = 0.1,
                 seed: int = 0, device=None, epoch_length: int = 1250) -> dict:
    """Train every (n_blocks, avgpool, lr) linear classifier at once on cached features (extract_features's dicts);
    pick one; report val. An epoch is `epoch_length` iterations whatever the data size, as released (10 x 1250):
    10 passes over 1,800 cached images left the classifiers ~8 points of val top-1 short of converged.
    Returns best, the 52 classifiers, and val_top1_selected_on_val (what the released selection, on val, reports).
    """
    device = torch.device(device or pick_device())
    g = torch.Generator().manual_seed(seed)
    # NOTE(deviation): the released code picks the best of the 52 classifiers on val and reports that val accuracy,
    # a max over 52 noisy estimates (biased up); we pick on held-out train, so val is seen once, for the number.
    perm = torch.randperm(len(train["labels"]), generator=g)
    n_hold = max(1, round(holdout * len(perm)))
    hold_idx, fit_idx = perm[:n_hold], perm[n_hold:]

    def split(feats, idx):
        return {k: feats[k][idx].to(device) for k in ("blocks_cls", "patch_mean", "labels")}

    fit, hold = split(train, fit_idx), split(train, hold_idx)
    val = split(val, torch.arange(len(val["labels"])))
    D, n_avail = fit["blocks_cls"].shape[2], fit["blocks_cls"].shape[1]
    layouts = [(n, ap) for n in n_blocks_list if n <= n_avail for ap in avgpool_list]  # 4 input layouts
    configs = [(n, ap, lr) for n, ap in layouts for lr in lrs]  # x 13 learning rates = 52 classifiers
    heads = nn.ModuleList(nn.Linear((n + ap) * D, n_classes) for n, ap, _ in configs)
    for head in heads:  # drawn from the probe's own generator: the same seed gives the same figures
        nn.init.normal_(head.weight, std=0.01, generator=g)
        nn.init.zeros_(head.bias)
    heads = heads.to(device)
    # The released linear-scaling rule: lr x (batch * world) / 256 (one process trains on the gathered cache here).
    base_lrs = [lr * batch_size / 256 for _, _, lr in configs]
    optimizer = torch.optim.SGD([{"params": h.parameters(), "lr": lr} for h, lr in zip(heads, base_lrs)],
                                momentum=0.9, weight_decay=0.0)

    def forward_all(blocks_cls, patch_mean):  # -> (52, B, C): one forward of every classifier
        logits = []
        for j, (n, ap) in enumerate(layouts):
            x = create_linear_input(blocks_cls, patch_mean, n, ap)  # (B, dim), built once per layout
            group = heads[j * len(lrs):(j + 1) * len(lrs)]
            weight = torch.stack([h.weight for h in group])  # (L, C, dim)
            bias = torch.stack([h.bias for h in group])  # (L, C)
            # = [h(x) for h in group] as one batched matmul: all learning rates of a layout share the input
            logits.append(torch.einsum("bd,lcd->lbc", x, weight) + bias[:, None])  # (L, B, C)
        return torch.cat(logits)  # (52, B, C)

    def losses(logits, y):  # (52, B, C), (B,) -> per-classifier mean cross-entropy (52,)
        return F.cross_entropy(logits.flatten(0, 1), y.repeat(len(logits)), reduction="none").view(len(logits), -1)\
            .mean(1)

    # NOTE(deviation): the released probe trains on RandomResizedCrop + flip views through the frozen backbone; we
    # train on cached centre-crop features: one extraction, not one per step (seconds on a CPU, a little accuracy).
    n_fit, total = len(fit_idx), epochs * epoch_length
    def batches():  # endless shuffled passes over the fit split (the released infinite sampler)
        while True:
            order = torch.randperm(n_fit, generator=g).to(device)
            yield from (order[i:i + batch_size] for i in range(0, n_fit, batch_size))
    for step, idx in zip(tqdm(range(total), desc="linear probe", leave=False, mininterval=1.0), batches()):
        # cosine annealing to 0 over the whole run (CosineAnnealingLR(T_max=total, eta_min=0)), a plain function
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
        loss = losses(forward_all(fit["blocks_cls"][idx], fit["patch_mean"][idx]), fit["labels"][idx]).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # summed over classifiers: each gets the gradient of its own loss
        optimizer.step()

    @torch.no_grad()
    def score(feats, chunk=4096):  # -> top-1 % (52,), mean loss (52,), in chunks of rows to bound memory
        correct, loss_sum, n = 0, 0, len(feats["labels"])
        for i in range(0, n, chunk):
            logits = forward_all(feats["blocks_cls"][i:i + chunk], feats["patch_mean"][i:i + chunk])
            y = feats["labels"][i:i + chunk]
            correct = correct + (logits.argmax(-1) == y).float().sum(1)
            loss_sum = loss_sum + losses(logits, y) * len(y)
        return (100.0 * correct / n).tolist(), (loss_sum / n).tolist()

    (hold_top1, hold_loss), (val_top1, _) = score(hold), score(val)
    results = [dict(n_blocks=n, avgpool=ap, lr=lr, holdout_top1=h, holdout_loss=hl, val_top1=v)
               for (n, ap, lr), h, hl, v in zip(configs, hold_top1, hold_loss, val_top1)]
    # Highest held-out top-1; ties (frequent on small or easy sets) go to the lower held-out cross-entropy.
    best = max(results, key=lambda r: (r["holdout_top1"], -r["holdout_loss"]))
    return dict(best=best, classifiers=results, val_top1_selected_on_val=max(val_top1))


# ---------------------------------------------------------------------------------------------------------------
# Emergent segmentation: the paper's PCA picture, measured


def first_principal_component(x: torch.Tensor) -> torch.Tensor:
    """Scores (N,) of the rows of x (N, D) on their first principal component (centred; sign arbitrary)."""
    centred = x.float() - x.float().mean(dim=0, keepdim=True)  # (N, D)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # vh (min(N, D), D), rows = principal axes
    return centred @ vh[0]  # (N,)


def _iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    union = (pred | target).sum().item()
    return (pred & target).sum().item() / union if union else 1.0


def _upsample(patch_mask: torch.Tensor, shape) -> torch.Tensor:
    """(h, w) bool -> `shape` bool by nearest neighbour: each patch covers the pixels it was computed from."""
    return F.interpolate(patch_mask[None, None].float(), size=tuple(shape), mode="nearest")[0, 0] > 0.5


def border_mask(h: int, w: int) -> torch.Tensor:
    """(h*w,) bool, True on the outermost ring of patches (where background usually is)."""
    m = torch.ones(h, w, dtype=torch.bool)
    if h > 2 and w > 2:
        m[1:-1, 1:-1] = False
    return m.flatten()


def segmentation_iou(model: nn.Module, dataset, n_images: int = 200, size: int = 112, device=None,
                     batch_size: int = 32, grey: bool = False) -> dict:
    """Mean pixel-level IoU of "first PCA component of the patch tokens > 0", upsampled, with the true foreground
    of dataset.sample(i) -> (PIL image, label, mask bool (S, S)) (data.SyntheticDataset). A component's sign is
    arbitrary: "miou" takes the better sign per image (an oracle), "miou_border" the sign that makes the border
    patches background (the usual heuristic); "ceiling" is the IoU of the true mask at patch resolution.
    """
    device = torch.device(device or next(model.parameters()).device)
    size = round_to_patch(size, model.patch_size)
    h = w = size // model.patch_size
    transform = EvalTransform(size, crop=False, patch=model.patch_size, grey=grey)
    border = border_mask(h, w)
    n_images = min(n_images, len(dataset))
    ious, ious_border, ceilings = [], [], []
    for start in tqdm(range(0, n_images, batch_size), desc="segmentation", leave=False):
        samples = [dataset.sample(i) for i in range(start, min(n_images, start + batch_size))]
        x = torch.stack([transform(img) for img, _, _ in samples]).to(device)  # (B, 3, size, size)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            patches = model.forward_features(x)["x_norm_patchtokens"].float().cpu()  # (B, N, D)
        for feats, (_, _, mask) in zip(patches, samples):
            mask = torch.as_tensor(np.asarray(mask, dtype=bool))  # (S, S)
            score = first_principal_component(feats)  # (N,)
            fg = _upsample((score > 0).view(h, w), mask.shape)  # (S, S)
            ious.append(max(_iou(fg, mask), _iou(~fg, mask)))
            ious_border.append(_iou(fg if score[border].mean() < 0 else ~fg, mask))
            best_patch_mask = F.adaptive_avg_pool2d(mask[None, None].float(), (h, w))[0, 0] > 0.5  # (h, w)
            ceilings.append(_iou(_upsample(best_patch_mask, mask.shape), mask))
    return dict(miou=100.0 * float(np.mean(ious)), miou_border=100.0 * float(np.mean(ious_border)),
                ceiling=100.0 * float(np.mean(ceilings)), n_images=n_images, size=size)


class MaskedFolder:
    """--val with --val-masks: sample(i) -> (PIL image, label, foreground mask bool (H, W)), as the synthetic set's,
    the mask read from the same relative path under `masks` (white = object)."""

    def __init__(self, images: data.ImageFolderDataset, masks: str):
        self.images, self.masks, self.targets = images, Path(masks), images.targets

    def __len__(self):
        return len(self.images)

    def sample(self, i):
        path, label = self.images.samples[i]
        mask_path = self.masks / Path(path).relative_to(self.images.root)
        if not mask_path.is_file():
            raise MissingFile(f"--val-masks: no mask {mask_path} for {path} (the same relative path as the image)")
        return data.load_image(path), label, np.asarray(Image.open(mask_path).convert("L")) > 127


# ---------------------------------------------------------------------------------------------------------------
# Command line


@dataclass
class EvalConfig:
    weights: str | None = arg(None, "backbone file (any layout); none: runs/train/teacher_backbone.pth")
    like: str | None = arg(None, "run folder: read the weights on its images, crop size and grey, not on their run's")
    arch: str = arg("vit_tiny", "architecture of --random (a weights file carries its own)", check=tuple(vit.ARCHS))
    random: bool = arg(False, "evaluate a randomly initialised --arch instead of weights")
    train: str | None = arg(None, "image folder (class sub-folders) or file list; none: the synthetic set")
    val: str | None = arg(None, "same, for the evaluation split")
    size: int | None = arg(None, "side, rounded to the patch; none: the run's crop size, else 224", check=(1, None))
    n_train: int = arg(2000, "synthetic train images (seed 0)", check=(1, None))
    n_val: int = arg(500, "synthetic val images (seed 1)", check=(1, None))
    n_classes: int = arg(8, "synthetic classes (the laptop preset of train.py)", check=(1, None))
    batch_size: int = arg(64, "extraction batch per rank", check=(1, None))
    num_workers: int = arg(0, "DataLoader workers for extraction (raise it for real image folders)", check=(0, None))
    ks: tuple[int, ...] = arg((10, 20, 100, 200), "k-NN neighbour counts", check=(1, None))
    temperature: float = arg(0.07, "k-NN softmax temperature", check=">0")
    linear_epochs: int = arg(10, "probe epochs of --linear-epoch-length iterations (released: 10)", check=(1, None))
    linear_epoch_length: int = arg(1250, "iterations per probe epoch, whatever the number of images", check=(1, None))
    linear_batch_size: int = arg(128, "probe batch (the learning rates scale as batch/256)", check=(1, None))
    holdout: float = arg(0.1, "fraction of train held out to choose the linear classifier (0 < f < 1)")
    seg_images: int = arg(200, "val images for the segmentation IoU (synthetic, or --val-masks)", check=(0, None))
    seg_size: int | None = arg(None, "side of the IoU's input; none: 8 patches a side at least", check=(1, None))
    val_masks: str | None = arg(None, "foreground masks of --val: the same relative paths, white = object")
    baseline: bool | None = arg(None, "also evaluate a random network of the same arch; none: on for synthetic")
    grey: bool | None = arg(None, "turn every image grey; none: if the run that wrote --weights saw only grey crops")
    json: str | None = arg(None, "write every figure here")
    seed: int = arg(0, "random init, probe split and shuffling")

    def __post_init__(self):
        self.ks = tuple(self.ks)
        cli.check_fields(self)  # the declared ranges and choices; below, what a range cannot say
        if not self.ks:
            raise ValueError("--ks needs at least one neighbour count")
        if not 0 < self.holdout < 1:  # an open interval: 0 or 1 would leave the fit or the held-out split empty
            raise ValueError(f"--holdout must be a fraction strictly between 0 and 1, got {self.holdout}")
        if (self.train is None) != (self.val is None):
            raise ValueError("--train and --val go together")
        if self.val_masks is not None and self.val is None:
            raise ValueError("--val-masks needs --val (the synthetic set draws its own masks)")
        if self.weights is not None and self.random:
            raise ValueError("pass either --weights or --random, not both")


def parse_config(argv=None) -> EvalConfig:
    """--field value for every EvalConfig field (cli.parse); unknown flags and bad values are usage errors."""
    cfg = cli.parse(EvalConfig, argv, __doc__)
    for name in ("weights", "like", "train", "val", "val_masks"):
        path = getattr(cfg, name)
        if path is not None and not os.path.exists(path):
            raise MissingFile(f"--{name} {path}: no such file or folder")
    return cfg


def _format_table(res: dict) -> str:
    rows = []
    for name, r in ((name, res[name]) for name in ("backbone", "random_baseline", "raw_pixels") if name in res):
        rows.append(f"== {name}: {r['model']}")
        for k, acc in r["knn"].items():
            rows.append(f"  k-NN k={k:<4}            top-1 {acc['top1']:6.2f}   top-5 {acc['top5']:6.2f}")
        if "linear" in r:
            b = r["linear"]["best"]
            rows.append(f"  linear (blocks={b['n_blocks']}, avgpool={b['avgpool']}, lr={b['lr']:g})"
                        f"  val top-1 {b['val_top1']:6.2f}   (held-out top-1 {b['holdout_top1']:.2f})")
        if "segmentation" in r:
            s = r["segmentation"]
            rows.append(f"  foreground IoU (pixel)   {s['miou']:6.2f} better sign, {s['miou_border']:6.2f} border sign"
                        f"   (patch-grid ceiling {s['ceiling']:.2f}, {s['n_images']} images at {s['size']}px)")
    return "\n".join(rows)


def evaluate_model(model, train_set, val_set, n_classes: int, cfg: EvalConfig, seg_size: int, device, seg_set=None,
                   linear: bool = True, name: str = "backbone", grey: bool = False) -> dict | None:
    """Every protocol on one backbone; features extracted and the k-NN run on all ranks, the rest on rank 0."""
    train, val = (extract_features(model, ds, cfg.batch_size, device, num_workers=cfg.num_workers,
                                   desc=f"{name}: {split} features")
                  for split, ds in (("train", train_set), ("val", val_set)))
    # every rank: the k-NN shards the train features over the ranks (released `dinov2/eval/knn.py`)
    knn = knn_accuracy(train["cls"], train["labels"], val["cls"], val["labels"], n_classes, cfg.ks, cfg.temperature,
                       device=device)
    if rank_world()[0] != 0:
        return None
    res = dict(knn={str(k): v for k, v in knn.items()})
    if linear:
        res["linear"] = linear_probe(train, val, n_classes, cfg.linear_epochs, cfg.linear_batch_size,
                                     holdout=cfg.holdout, seed=cfg.seed, device=device,
                                     epoch_length=cfg.linear_epoch_length)
    if seg_set is not None and cfg.seg_images > 0:
        res["segmentation"] = segmentation_iou(model, seg_set, cfg.seg_images, seg_size, device, grey=grey)
    return res


def main(argv=None) -> dict | None:
    cfg = parse_config(argv)
    rank, _, device = init("auto")  # under torchrun: the process group, each rank its own GPU
    synthetic = cfg.train is None
    # Derived values are printed, never written back into cfg.
    weights = None if cfg.random else str(cfg.weights or DEFAULT_WEIGHTS)
    run_dir = cfg.like or (Path(weights).parent if weights else None)  # by default, the run that wrote the weights
    run = training_config(run_dir)  # {} for --random
    if cfg.like and not run:
        raise MissingFile(f"--like {cfg.like}: no teacher.pth or student.pth of a run there")
    size = cfg.size or run.get("global_size", 224)  # features are read at the resolution they were trained at
    synthetic_kind = variant(run)  # the run's variant of the synthetic set
    baseline = cfg.baseline if cfg.baseline is not None else (synthetic and not cfg.random)
    grey = cfg.grey if cfg.grey is not None else saw_only_grey(run)  # read the network on what it was trained on
    print0(f"config: {asdict(cfg)}\nderived: device={device} size={size} baseline={baseline} grey={grey}"
           + (f" synthetic={synthetic_kind}" if synthetic else ""))

    model = load_backbone(cfg.weights, cfg.arch, device, random_init=cfg.random, img_size=size, seed=cfg.seed)
    size = round_to_patch(size, model.patch_size)
    transform = EvalTransform(size, crop=not synthetic, patch=model.patch_size, grey=grey)  # synthetic: square already
    if synthetic:
        train_set, val_set = (data.SyntheticDataset(n=n, size=run.get("synthetic_size", 128), n_classes=cfg.n_classes,
                                                    seed=seed, transform=transform, **synthetic_kind)
                              for n, seed in ((cfg.n_train, 0), (cfg.n_val, 1)))
        n_classes = cfg.n_classes
    else:
        train_set = data.ImageFolderDataset(cfg.train, transform=transform)
        val_set = data.ImageFolderDataset(cfg.val, transform=transform)
        if list(train_set.classes) != list(val_set.classes):
            raise UserError(f"--train and --val have different classes: {len(train_set.classes)} in {cfg.train}, "
                            f"{len(val_set.classes)} in {cfg.val}; labels would not match")
        n_classes = max(1, len(train_set.classes))
    seg_set = val_set if synthetic else MaskedFolder(val_set, cfg.val_masks) if cfg.val_masks else None
    # the IoU needs a grid, not the 4 x 4 patches of a 32-px laptop crop: 8 patches a side at least
    seg_size = cfg.seg_size or max(size, 8 * model.patch_size)

    results = {"config": asdict(cfg), "size": size, "n_classes": n_classes, "weights": weights, "grey": grey}
    # The floor: the same k-NN on raw pixels (28 x 28, mean removed), on the same images
    if rank == 0:
        raw = []  # train features, labels, val features, labels
        for ds in (train_set, val_set):
            transform, ds.transform = ds.transform, None  # the images as they are, not the network's input
            raw += [raw_pixel_features(ds, crop=not synthetic, grey=grey), torch.tensor(ds.targets)]
            ds.transform = transform
        knn = knn_accuracy(*raw, n_classes, cfg.ks, cfg.temperature, shard=False)  # rank 0 alone: a local search
        results["raw_pixels"] = dict(model="raw pixels 28x28" + (", grey" if grey else ""),
                                     knn={str(k): v for k, v in knn.items()})
    res = evaluate_model(model, train_set, val_set, n_classes, cfg, seg_size, device, seg_set, grey=grey)
    if res is not None:
        results["backbone"] = dict(model=f"random init {cfg.arch}" if cfg.random else weights, **res)
    if baseline:
        # Same arch, random weights: what the architecture and the pixels give without training (k-NN and IoU say it)
        random_net = random_like(model, cfg.seed, float(run.get("layerscale", 1e-5))).to(device)
        res = evaluate_model(random_net, train_set, val_set, n_classes, cfg, seg_size, device, seg_set, linear=False,
                             name="random", grey=grey)
        if res is not None:
            results["random_baseline"] = dict(model="random init, same arch", **res)
    if rank == 0:
        print(_format_table(results))
        if cfg.json:
            atomic_write_text(cfg.json, json.dumps(results, indent=2))
            print(f"wrote {cfg.json}")
    barrier()
    close()
    return results


if __name__ == "__main__":
    cli.run(main)
