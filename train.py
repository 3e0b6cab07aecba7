"""
DINOv2 training: a student and an EMA teacher, the DINO + iBOT + KoLeo objective, one loop for every scale.

Paper: Oquab et al., "DINOv2" (TMLR 2024), §4 (method) and §5 (implementation); the numbers follow the released
code (`dinov2/train/train.py`, `ssl_meta_arch.py`, `configs/ssl_default_config.yaml`). Read vit.py, losses.py
and data.py first; this file puts them together.

Reading order:
    Config, PRESETS        every knob, with the paper's recipe per --arch
    make_schedules         lr, weight decay, teacher momentum, teacher temperature: one value per iteration
    param_groups           layer-wise lr decay, patch-embed lr x0.2, no decay on biases / norms / LayerScale
    SSLModel               backbone + DINO head + iBOT head: the student, and (as an EMA copy) the teacher
    build_models           student and teacher, on the meta device for big models
    parallelize            activation checkpointing, torch.compile, DDP or FSDP2: applied from outside the model
    build_data             multi-crop + masking, a world-size-invariant stream of global batches
    build_monitor          the online k-NN of the teacher on a labelled split (evaluate.KnnMonitor)
    ssl_losses             one step of the objective: teacher targets, student predictions, the four terms
    train_step             losses, backward, per-part clipping, AdamW, EMA
    Checkpointer           atomic save / exact resume (torch.distributed.checkpoint), teacher export
    train, fit             the run: set-up, then the loop (schedules, step, log, checkpoint); distill.py reuses fit

Run:
    python train.py                                   # laptop default: vit_tiny on synthetic images, CPU ok
    python train.py --data /path/to/images --arch vit_s
    torchrun --nproc_per_node=8 train.py --arch vit_g --data /path/to/images --activation-checkpointing
"""
import argparse
import contextlib
import copy
import dataclasses
import inspect
import json
import math
import os
import re
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import vit
from data import (GlobalBatchCollate, GlobalBatchSampler, ImageFolderDataset, MaskingGenerator, MultiCropAugmentation,
                  MultiCropDataset, SyntheticDataset)
from losses import (CollapseAlarm, DINOHead, SoftmaxCentering, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp,
                    teacher_diagnostics)


# -----------------------------------------------------------------------------------------------------------------
# Config: defaults = the paper's default recipe (released `ssl_default_config.yaml`); PRESETS override per --arch.

@dataclass
class Config:
    # model
    arch: str = "vit_tiny"  # vit_tiny | vit_small | vit_base | vit_large | vit_giant2 (aliases vit_t/s/b/l/g)
    patch_size: int = 14  # every released model uses 14
    depth: int = 0  # transformer blocks; 0 = the arch's own (12 for vit_tiny / s / b)
    num_registers: int = 0  # register tokens (4 = the "_reg" models)
    ffn: str = "auto"  # mlp | swiglu | auto (SwiGLU for vit_giant2 only, as released)
    drop_path: float = 0.3  # uniform stochastic depth of the student (0.4 for vit_l / vit_g)
    layerscale: float = 1e-5  # LayerScale init
    # heads (`dino` / `ibot` keys of the config)
    n_prototypes: int = 65536  # K of the DINO head
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    separate_ibot_head: bool = False  # untied iBOT head (True for vit_l / vit_g)
    ibot_n_prototypes: int = 65536
    ibot_bottleneck_dim: int = 256
    # objective (paper §4)
    centering: str = "softmax"  # softmax (EMA centre) | sinkhorn_knopp (the released vit_l / vit_g)
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # after the warm-up
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    # data (`crops` keys)
    data: str = ""  # an image folder (class sub-folders or flat) or a .txt file list; "" = synthetic images
    synthetic_images: int = 2000  # size of the synthetic dataset when --data is empty
    synthetic_size: int = 128  # its image side in pixels
    global_size: int = 224
    local_size: int = 98
    n_local: int = 8
    global_scale: tuple = (0.32, 1.0)
    local_scale: tuple = (0.05, 0.32)
    hue_jitter: float = 0.1  # colour-jitter hue range (+-); 0.5 draws any hue, so colour cannot match two views
    p_grayscale: float = 0.2  # probability that a crop is turned grey
    blur: str = "paper"  # paper (p 1.0 / 0.1 / 0.5) | released (the released code's 0.0 / 0.9 / 0.5)
    mask_probability: float = 0.5  # fraction of global crops that get an iBOT mask
    mask_ratio: tuple = (0.1, 0.5)  # range of masked-patch ratios, stratified over the batch
    num_workers: int = -1  # data loader workers per rank (-1 = auto)
    # optimisation (`optim`, `teacher`, `train` keys); an "epoch" is epoch_length iterations, whatever the dataset size
    batch_size: int = 64  # per rank
    epochs: float = 100
    epoch_length: int = 1250
    base_lr: float = 0.004  # peak lr = base_lr * sqrt(global_batch / 1024)
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04  # cosine from this ...
    weight_decay_end: float = 0.4  # ... to this
    momentum_teacher: float = 0.992  # cosine from this to 1
    freeze_last_layer_epochs: float = 1  # last layer of the heads at lr 0
    layer_decay: float = 0.9  # layer-wise lr decay (1.0 = none)
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0  # per student part (backbone, dino head, ibot head)
    # starting from pretrained weights
    init_from: str = ""  # backbone weights (released hub .pth or ours); heads start fresh
    heads_warmup_epochs: float = 1  # with --init-from: backbone lr 0 while the fresh heads settle
    # system
    strategy: str = "auto"  # auto | none | ddp | fsdp (auto: none on one process, fsdp above 200M params else ddp)
    compile: bool = False  # torch.compile each transformer block
    dtype: str = "auto"  # compute precision: auto (bf16 on CUDA, fp32 elsewhere) | bf16 | fp32; fp32 master weights
    activation_checkpointing: bool = False  # recompute blocks in backward (for vit_l / vit_g)
    meta_init: bool = None  # FSDP: build on the meta device, initialise after sharding (default: vit_l / vit_g)
    device: str = "auto"  # auto | cpu | cuda | mps
    seed: int = 0
    out: str = "runs/train"
    save_every: int = 1250  # iterations between checkpoints
    keep_last: int = 3  # checkpoints kept
    log_every: int = 10
    monitor_every: int = 0  # steps between online k-NN checks of the teacher backbone (0 = off)
    monitor_data: str = ""  # labelled folder (class sub-folders) for the k-NN monitor; "" = held-out synthetic images
    monitor_images: int = 500  # images in the monitor's bank, and as many held-out queries
    resume: bool = True  # resume from the latest checkpoint in --out
    dry_run: bool = False  # print parameters, FLOPs and memory per device for this run (plan.py), build nothing, exit
    nproc: int = 0  # the world size --dry-run plans for (0 = this run's own)


# Each preset is what the paper trained at that size; flags override single fields.
LARGE_RECIPE = dict(  # vitl14.yaml / vitg14.yaml: the recipe of the released models
    drop_path=0.4, n_prototypes=131072, head_bottleneck_dim=384, separate_ibot_head=True,
    ibot_n_prototypes=131072, ibot_bottleneck_dim=256, centering="sinkhorn_knopp", base_lr=2e-4, epochs=500,
    warmup_epochs=80, weight_decay_end=0.2, momentum_teacher=0.994, layer_decay=1.0, batch_size=32)
PRESETS = {
    # The laptop default: under 10 minutes on two CPU cores, 32-px crops of 64-px synthetic images, a 6-block
    # vit_tiny with 8-px patches (16 tokens a global crop: ~90 images/s on 2 cores). Each departure below was
    # measured on this run; ABLATIONS.md has the table.
    # NOTE(deviation): peak lr 3e-4 (base_lr 0.0017 at batch 32), not 7e-4: with labels, this ViT at lr >= 1e-3
    # stays at chance for 400 steps, at 3e-4 it learns. LayerScale starts at 0.1 (at 1e-5 the cls token of a fresh
    # ViT is the same for every image, a plateau a short run cannot wait out).
    # NOTE(deviation): every crop is grey (p_grayscale 1): the objects' hue is drawn per image, so colour would
    # identify an image across views (the cls token learns colour, kNN at chance); hue jitter removes it too, but
    # lowers the teacher's cross-view correlation at init to ~0.26, below teacher_temp / student_temp = 0.4, where
    # the uniform target is stable; grey crops keep ~0.43.
    # NOTE(deviation): 256 prototypes, a 1024-wide head, no drop path, teacher momentum from 0.98, teacher
    # temperature 0.04 throughout: sized for 1,300 steps, not 125k.
    "vit_tiny": dict(
        depth=6, patch_size=8, synthetic_images=10000, synthetic_size=64, global_size=32, local_size=16, n_local=6,
        hue_jitter=0.0, p_grayscale=1.0, n_prototypes=256, ibot_n_prototypes=256, head_hidden_dim=1024,
        separate_ibot_head=True, layerscale=0.1, drop_path=0.0, batch_size=32, epochs=13, epoch_length=100,
        base_lr=0.0017, warmup_epochs=1, teacher_temp=0.04, freeze_last_layer_epochs=0, momentum_teacher=0.98,
        save_every=500, log_every=20, monitor_every=100),
    "vit_small": dict(),
    "vit_base": dict(),
    "vit_large": dict(LARGE_RECIPE),
    "vit_giant2": dict(LARGE_RECIPE, batch_size=12),
}


def canonical_arch(name):
    """vit_s -> vit_small etc.; an unknown name is a ValueError that lists the known ones."""
    if name not in vit.ARCHS:
        raise ValueError(f"unknown arch {name!r}; known: {', '.join(sorted(vit.ARCHS))}")
    return vit.ARCHS[name].__name__


def parse_config(cls=Config, presets=PRESETS, argv=None, description=__doc__):
    """--field value for every field of `cls`; the --arch preset fills what the flags leave unset."""
    parser = argparse.ArgumentParser(description=(description or "").strip().split("\n")[0])
    comments = {}  # the comment after each field in the dataclass source is its --help text
    for c in reversed(cls.__mro__):
        if dataclasses.is_dataclass(c):
            for line in inspect.getsource(c).splitlines():
                m = re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.*)", line)
                if m:
                    comments[m.group(1)] = m.group(2)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{comments.get(f.name, '')} [default {f.default!r}, or the --arch preset]".replace("%", "%%")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif f.type in (tuple, "tuple"):
            parser.add_argument(flag, type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), help=help_)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, type=typ, default=None, help=help_)
    args = parser.parse_args(argv)  # unknown flags are an error
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items() if v is not None}
    arch = canonical_arch(given.get("arch", cls.arch))  # ValueError for an unknown name
    return cls(**{**presets.get(arch, {}), **given, "arch": arch})


# -----------------------------------------------------------------------------------------------------------------
# Schedules: plain arrays indexed by the iteration (released `train/train.py`), so they can be printed and plotted.

def cosine_schedule(base, final, total, warmup=0, start_warmup=0.0):
    """Linear warm-up that includes the peak (np.linspace), then a half cosine from base to final."""
    warm = np.linspace(start_warmup, base, warmup) if warmup > 0 else np.array([])
    it = np.arange(total - warmup)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * it / max(len(it), 1)))
    return np.concatenate([warm, cos])[:total]


def make_schedules(cfg, world_size=1):
    """Every per-iteration value of a run: lr, last_layer_lr, wd, momentum, teacher_temp (arrays of length total)."""
    total = int(cfg.epochs * cfg.epoch_length)
    ep = lambda e: int(round(e * cfg.epoch_length))
    peak_lr = cfg.base_lr * math.sqrt(cfg.batch_size * world_size / 1024)  # the sqrt scaling w.r.t. 1024
    lr = cosine_schedule(peak_lr, cfg.min_lr, total, warmup=min(ep(cfg.warmup_epochs), total))
    last_layer_lr = lr.copy()
    last_layer_lr[:ep(cfg.freeze_last_layer_epochs)] = 0  # the heads' last layer waits one epoch
    wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total)
    momentum = cosine_schedule(cfg.momentum_teacher, 1.0, total)
    warm_t = min(ep(cfg.warmup_teacher_temp_epochs), total)
    teacher_temp = np.concatenate([np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, warm_t),
                                   np.full(total - warm_t, cfg.teacher_temp)])
    backbone_lr_mult = np.ones(total)
    if cfg.init_from:
        backbone_lr_mult[:ep(cfg.heads_warmup_epochs)] = 0  # fresh heads first, the pretrained backbone waits
    return dict(lr=lr, last_layer_lr=last_layer_lr, wd=wd, momentum=momentum, teacher_temp=teacher_temp,
                backbone_lr_mult=backbone_lr_mult)


# -----------------------------------------------------------------------------------------------------------------
# Parameter groups (released `utils/param_groups.py`): each parameter gets an lr multiplier, a weight-decay
# multiplier and a last-layer flag.

def param_groups(student, cfg):
    """AdamW groups of the student, merged by (lr_mult, wd_mult, is_last_layer, is_backbone)."""
    depth = student.backbone.n_blocks
    groups = {}
    for part, module in student.parts().items():
        for name, p in module.named_parameters():
            lr_mult = 1.0
            if part == "backbone":
                if name.startswith(("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")):
                    layer_id = 0
                elif name.startswith("blocks."):
                    layer_id = int(name.split(".")[1]) + 1
                else:  # the final norm
                    layer_id = depth + 1
                lr_mult = cfg.layer_decay ** (depth + 1 - layer_id)
                if name.startswith("patch_embed"):
                    lr_mult *= cfg.patch_embed_lr_mult
            # no decay on biases, norms and LayerScale; decay on everything else, the last layer's g and v included
            wd_mult = 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0
            key = (lr_mult, wd_mult, "last_layer" in name, part == "backbone")
            groups.setdefault(key, []).append(p)
    return [dict(params=ps, lr_mult=k[0], wd_mult=k[1], is_last_layer=k[2], is_backbone=k[3])
            for k, ps in groups.items()]


def apply_schedules(optimizer, sched, step):
    lr, last_lr, wd = sched["lr"][step], sched["last_layer_lr"][step], sched["wd"][step]
    for g in optimizer.param_groups:
        base = last_lr if g["is_last_layer"] else lr
        g["lr"] = base * g["lr_mult"] * (sched["backbone_lr_mult"][step] if g["is_backbone"] else 1.0)
        g["weight_decay"] = wd * g["wd_mult"]


# -----------------------------------------------------------------------------------------------------------------
# The model pair. Student and teacher share one structure; the teacher is an EMA of the student (paper §4).

class SSLModel(nn.Module):
    """A backbone with a DINO head on the cls token and an iBOT head on masked patch tokens (tied or untied)."""

    def __init__(self, backbone, dino_head, ibot_head=None):
        super().__init__()
        self.backbone, self.dino_head = backbone, dino_head
        self.ibot_head = ibot_head  # None = tied: the DINO head also scores patches

    def parts(self):
        """The sub-modules that get their own gradient clipping and parameter groups."""
        parts = {"backbone": self.backbone, "dino_head": self.dino_head}
        if self.ibot_head is not None:
            parts["ibot_head"] = self.ibot_head
        return parts

    def forward(self, global_crops, local_crops=None, masks=None, mask_indices=None):
        n_global = global_crops.shape[0]
        g = self.backbone.forward_features(global_crops, masks=masks)
        cls = g["x_norm_clstoken"]  # (2B, D)
        all_cls = cls
        if local_crops is not None and local_crops.shape[0] > 0:  # one pass for all local crops
            all_cls = torch.cat([cls, self.backbone.forward_features(local_crops)["x_norm_clstoken"]])  # ((2+L)B, D)
        logits = self.dino_head(all_cls)  # ((2+L)B, K): one head call for global and local crops
        out = dict(cls=cls, global_logits=logits[:n_global], local_logits=logits[n_global:])
        if mask_indices is not None:  # None: cls only (the k-NN monitor)
            patches = g["x_norm_patchtokens"].flatten(0, 1)[mask_indices]  # (M, D): masked positions only
            patch_head = self.dino_head if self.ibot_head is None else self.ibot_head
            out["patch_logits"] = patch_head(patches)  # (M, K)
        return out


def build_ssl_model(cfg, drop_path):
    # NOTE(deviation): vit_large trains with the MLP FFN, as the released ViT-L backbone (distilled from ViT-g) has it,
    # so --init-from and the hub / Hugging Face / timm layouts fit it; the released vitl14.yaml, which trains ViT-L
    # from scratch, uses swiglufused (hidden 2736, 0.1% more parameters): --ffn swiglu gives that.
    ffn = ("swiglu" if canonical_arch(cfg.arch) == "vit_giant2" else "mlp") if cfg.ffn == "auto" else cfg.ffn
    # NOTE(deviation): register models interpolate pos-embeds by size (with antialias), as the released *_reg models.
    interp = dict(interpolate_antialias=True, interpolate_offset=0.0) if cfg.num_registers else {}
    backbone = vit.build_model(cfg.arch, img_size=cfg.global_size, patch_size=cfg.patch_size, ffn_layer=ffn,
                               init_values=cfg.layerscale, drop_path_rate=drop_path,
                               num_register_tokens=cfg.num_registers, **interp,
                               **({"depth": cfg.depth} if cfg.depth else {}))
    D = backbone.embed_dim
    dino_head = DINOHead(D, cfg.n_prototypes, cfg.head_hidden_dim, cfg.head_bottleneck_dim)
    ibot_head = (DINOHead(D, cfg.ibot_n_prototypes, cfg.head_hidden_dim, cfg.ibot_bottleneck_dim)
                 if cfg.separate_ibot_head else None)
    return SSLModel(backbone, dino_head, ibot_head)


def init_ssl_model(model):
    """Initialise every parameter (after to_empty() of a meta-device build), as the released `init_weights` of
    the ViT and the DINO head do."""
    model.backbone.init_weights()
    for head in (model.dino_head, model.ibot_head):
        if head is not None:
            head.init_weights()


def local_tensor(t):
    """The local shard of an FSDP2 (DTensor) parameter; a plain tensor is its own shard."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- m * teacher + (1 - m) * student, on every parameter (shards under FSDP: same layout on both)."""
    t = [local_tensor(p) for p in teacher.parameters()]
    s = [local_tensor(p) for p in student.parameters()]
    torch._foreach_lerp_(t, s, 1.0 - momentum)


# -----------------------------------------------------------------------------------------------------------------
# Distributed set-up and parallelism, applied from outside the model (STYLE.md §5).

def setup_distributed(cfg):
    """torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; plain python creates no process group."""
    if cfg.device == "auto":
        dev = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    else:
        dev = cfg.device
    rank, world, local_rank = 0, 1, 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if dev == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if dev == "cuda" else "gloo")
    device = torch.device(dev, local_rank) if dev == "cuda" else torch.device(dev)
    return rank, world, device


def resolve_strategy(cfg, world, n_params):
    if cfg.strategy != "auto":
        if world == 1 and cfg.strategy != "none":
            return "none"  # one process: nothing to wrap
        return cfg.strategy
    return "none" if world == 1 else ("fsdp" if n_params > 200e6 else "ddp")


def parallelize(model, cfg, strategy, device, trainable):
    """Activation checkpointing and compile per block, then DDP or FSDP2 (each block, each head, then the root)."""
    if trainable and cfg.activation_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    if cfg.compile:
        for block in model.backbone.blocks:
            block.compile()
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # bf16 compute with fp32 master weights and fp32 gradient reduction (--dtype: bf16 on CUDA by default)
        bf16 = compute_dtype(cfg.dtype, device) == torch.bfloat16
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for block in model.backbone.blocks:
            fully_shard(block, mp_policy=mp)
        for head in (model.dino_head, model.ibot_head):
            if head is not None:
                fully_shard(head, mp_policy=mp)
        # the root (patch embed, tokens, final norm). A root keeps its parameters gathered after forward, for the
        # backward; the teacher has no backward, so it reshards at once (and the EMA sees shards, as the student's)
        fully_shard(model, mp_policy=mp, reshard_after_forward=None if trainable else True)
        return model
    if strategy == "ddp" and trainable:
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model  # one process, or the DDP teacher (identical on every rank, never trained)


def build_models(cfg, strategy, device):
    """Student and teacher, initialised identically. Big FSDP models are built on the meta device and initialised
    after sharding, so a rank never holds a whole vit_g; small ones are built whole (same numbers on every rank)."""
    torch.manual_seed(cfg.seed)
    big = canonical_arch(cfg.arch) in ("vit_large", "vit_giant2")
    meta = strategy == "fsdp" and not cfg.init_from and (big if cfg.meta_init is None else cfg.meta_init)
    with torch.device("meta") if meta else contextlib.nullcontext():
        student = build_ssl_model(cfg, cfg.drop_path)  # initialised by its constructors unless on meta
    if not meta and cfg.init_from:
        vit.load_pretrained(student.backbone, cfg.init_from)  # strict, pos-embed resampled
    if cfg.mask_probability == 0:  # no crop is ever masked (distillation): the mask token would get no gradient,
        student.backbone.mask_token.requires_grad_(False)  # which DDP treats as an error
    teacher = copy.deepcopy(student)  # the same numbers; it stays in eval mode, so it never drops paths
    if not meta:
        student.to(device), teacher.to(device)
    teacher.requires_grad_(False)
    student_p = parallelize(student, cfg, strategy, device, trainable=True)
    teacher = parallelize(teacher, cfg, strategy, device, trainable=False)
    if meta:
        student.to_empty(device=device), teacher.to_empty(device=device)
        init_ssl_model(student)
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters()):
                local_tensor(t).copy_(local_tensor(s))
    teacher.eval()
    return student_p, student, teacher


# -----------------------------------------------------------------------------------------------------------------
# Data (data.py): multi-crop views, masks, and a stream of global batches whose slices go to the ranks.

def build_data(cfg, rank, world, start_step, device):
    if cfg.data:
        images = ImageFolderDataset(cfg.data)
    else:
        images = SyntheticDataset(n=cfg.synthetic_images, size=cfg.synthetic_size, seed=cfg.seed)
    augment = MultiCropAugmentation(global_size=cfg.global_size, local_size=cfg.local_size, n_local=cfg.n_local,
                                    global_scale=tuple(cfg.global_scale), local_scale=tuple(cfg.local_scale),
                                    blur=cfg.blur)
    augment.hue, augment.p_grayscale = cfg.hue_jitter, cfg.p_grayscale
    grid = cfg.global_size // cfg.patch_size
    masking = MaskingGenerator(input_size=(grid, grid), max_num_patches=int(0.5 * grid * grid))
    collate = GlobalBatchCollate(masking, tuple(cfg.mask_ratio), cfg.mask_probability, cfg.batch_size, world,
                                 cfg.seed)
    workers = cfg.num_workers if cfg.num_workers >= 0 else min(8, max(1, (os.cpu_count() or 2) // 2))
    loader = torch.utils.data.DataLoader(
        MultiCropDataset(images, augment, cfg.seed), collate_fn=collate, num_workers=workers,
        batch_sampler=GlobalBatchSampler(len(images), cfg.batch_size, rank, world, cfg.seed, start_step),
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    return loader, len(images)


def build_monitor(cfg, n_images):
    """The online k-NN monitor (evaluate.KnnMonitor) on a labelled split, or None when it is off.

    Synthetic data: a bank of training images and as many images of another seed, which training never sees.
    --monitor-data (or --data when it has class sub-folders): its images split in two halves by a fixed shuffle.
    """
    if cfg.monitor_every <= 0 or cfg.monitor_images <= 0:
        return None
    from evaluate import KnnMonitor  # evaluation code, only imported when the monitor is on
    n = cfg.monitor_images
    folder = cfg.monitor_data or cfg.data
    if folder:
        images = ImageFolderDataset(folder)
        if len(images.classes) < 2:
            print0(f"k-NN monitor off: {folder} has no class sub-folders (pass --monitor-data FOLDER with them)")
            return None
        order = np.random.default_rng(cfg.seed).permutation(len(images))
        bank, queries = (torch.utils.data.Subset(images, order[half::2][:n].tolist()) for half in (0, 1))
        n_classes = len(images.classes)
    else:
        bank = SyntheticDataset(n=min(n, n_images), size=cfg.synthetic_size, seed=cfg.seed)
        queries = SyntheticDataset(n=n, size=cfg.synthetic_size, seed=cfg.seed + 1)
        n_classes = bank.n_classes
    return KnnMonitor(bank, queries, n_classes, cfg.global_size, cfg.patch_size)


# -----------------------------------------------------------------------------------------------------------------
# One step of the objective (paper §4, released `SSLMetaArch.forward_backward`): the teacher's targets on unmasked
# global crops, the student's predictions
# on masked global crops and local crops, then DINO (cls, cross-view), iBOT (masked patches) and KoLeo.

def ssl_losses(student, teacher, centers, batch, teacher_temp, cfg):
    g, l = batch["global_crops"], batch["local_crops"]  # (2B, 3, Hg, Wg), (L*B, 3, Hl, Wl)
    masks, idx, w = batch["masks"], batch["mask_indices"], batch["mask_weights"]  # (2B, N), (M,), (M,)
    with torch.no_grad():
        t = teacher(g, mask_indices=idx)  # unmasked global crops only; eval mode, no drop path
        if cfg.centering == "sinkhorn_knopp":  # balanced jointly over both views and all ranks
            t_cls = sinkhorn_knopp(t["global_logits"], teacher_temp)  # (2B, K)
            t_patch = sinkhorn_knopp(t["patch_logits"], teacher_temp)  # (M, K)
        else:  # softmax with the EMA centre of the earlier steps
            t_cls = centers["dino"](t["global_logits"], teacher_temp)
            t_patch = centers["ibot"](t["patch_logits"], teacher_temp)
    s = student(g, l, masks=masks, mask_indices=idx)  # the masked crops serve DINO, iBOT and KoLeo at once
    dino_global, dino_local = dino_loss(s["global_logits"], s["local_logits"], t_cls, cfg.student_temp)
    ibot = ibot_loss(s["patch_logits"], t_patch, w, g.shape[0], cfg.student_temp)
    koleo = sum(koleo_loss(c) for c in s["cls"].chunk(2))  # per view, summed, on this rank's batch
    losses = dict(dino_global=cfg.dino_weight * dino_global, dino_local=cfg.dino_weight * dino_local,
                  ibot=cfg.ibot_weight * ibot, koleo=cfg.koleo_weight * koleo)
    return losses, t_cls


def clip_gradients(parts, max_norm):
    """Clip each student part on its own (released `clip_grad` per part), returning the norms before clipping
    (no host sync)."""
    norms = {}
    for name, module in parts.items():
        params = [p for p in module.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(total, "full_tensor"):  # FSDP2: the norm of the shards, reduced over ranks
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        norms[f"grad_norm_{name}"] = total
    return norms


def compute_dtype(dtype, device):
    """--dtype: bf16 or fp32 compute (the master weights stay fp32). auto: bf16 on CUDA; fp32 on CPU and MPS, where
    bf16 matmuls are slow or partial (--dtype bf16 runs the GPU's precision path on a CPU, as the tests do)."""
    if dtype not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown --dtype {dtype!r}; known: auto, bf16, fp32")
    bf16 = dtype == "bf16" or (dtype == "auto" and torch.device(device).type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def autocast_for(device, strategy, dtype="auto"):
    """bf16 autocast when --dtype gives bf16 (fp32 master weights); under FSDP2 the MixedPrecisionPolicy casts the
    parameters instead. Losses upcast to fp32 in losses.py whatever this gives."""
    if compute_dtype(dtype, device) == torch.bfloat16 and strategy != "fsdp":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(student_p, student, teacher, ema, optimizer, centers, batch, teacher_temp, momentum, cfg, autocast):
    """Teacher and student forward, the four terms, backward, per-part clipping, AdamW, EMA. No host sync."""
    with autocast:
        losses, t_cls = ssl_losses(student_p, teacher, centers, batch, teacher_temp, cfg)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    norms = clip_gradients(student.parts(), cfg.clip_grad)
    optimizer.step()
    ema_update(ema, student, momentum)
    return losses, t_cls, norms


# -----------------------------------------------------------------------------------------------------------------
# Checkpoints: one format for every strategy (torch.distributed.checkpoint: each rank writes its shards), written to
# a temporary folder then renamed, so a crash mid-save leaves the previous checkpoint intact.

class Checkpointer:
    def __init__(self, out, keep_last, rank):
        self.out, self.keep_last, self.rank = Path(out), keep_last, rank

    def latest(self):
        done = sorted(p for p in self.out.glob("ckpt_*") if p.is_dir() and not p.name.endswith(".tmp"))
        return done[-1] if done else None

    def _state(self, student, ema, optimizer):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
        s_model, s_optim = get_state_dict(student, optimizer)
        return {"student": s_model, "optimizer": s_optim, "ema": get_model_state_dict(ema)}

    def save(self, step, student, ema, optimizer, centers, cfg):
        import torch.distributed.checkpoint as dcp
        final = self.out / f"ckpt_{step:08d}"
        tmp = self.out / f"ckpt_{step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        with warnings.catch_warnings():  # one process: DCP warns that it is not distributed, which is intended
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(self._state(student, ema, optimizer), checkpoint_id=str(tmp), no_dist=not is_dist())
        if self.rank == 0:  # small replicated state: step, centres, config
            torch.save({"step": step, "centers": {k: c.state_dict() for k, c in centers.items()},
                        "config": dataclasses.asdict(cfg)}, tmp / "extra.pt")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(p for p in self.out.glob("ckpt_*") if p.is_dir() and not p.name.endswith(".tmp"))[
                        :-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, path, student, ema, optimizer, centers, cfg):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
        extra_path = Path(path) / "extra.pt"
        if not extra_path.exists():
            raise RuntimeError(f"{path} is not a complete checkpoint (no extra.pt); delete it or use another --out")
        extra = torch.load(extra_path, map_location="cpu", weights_only=False)
        saved = extra["config"]
        shape_fields = ("arch", "patch_size", "num_registers", "ffn", "n_prototypes", "head_hidden_dim",
                        "head_bottleneck_dim", "separate_ibot_head", "ibot_n_prototypes", "ibot_bottleneck_dim")
        diff = {k: (saved.get(k), getattr(cfg, k)) for k in shape_fields if saved.get(k) != getattr(cfg, k)}
        if diff:
            raise ValueError(f"checkpoint {path} was trained with a different model: {diff} (saved, now); "
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

    def export(self, model, cfg, name="teacher"):
        """<name>.pth (backbone + heads + config, what distill.py reads) and <name>_backbone.pth (the released hub
        layout, what vit.from_pretrained, evaluate.py and the released code read)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            backbone = {k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")}
            atomic_save(backbone, self.out / f"{name}_backbone.pth")
            atomic_save({"model": full, "config": dataclasses.asdict(cfg)}, self.out / f"{name}.pth")
        barrier()


def atomic_save(obj, path):
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def is_dist():
    return dist.is_available() and dist.is_initialized()


def barrier():
    if is_dist():
        dist.barrier()


# -----------------------------------------------------------------------------------------------------------------
# Logging: rank 0 prints and appends one JSON line per log step to metrics.jsonl.

PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10G": 70, "RTX 4090": 165,
                    "RTX 3090": 71}  # dense bf16 tensor-core peaks from the vendors' data sheets


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def flops_per_image(backbone, cfg):
    """Training FLOPs per image: student forward + backward (3x) on every crop, teacher forward on the globals.
    Backbones only: the heads run on a few tokens per image and add a few percent, so MFU is slightly understated."""
    g = backbone.flops_per_image(cfg.global_size, cfg.global_size)
    l = backbone.flops_per_image(cfg.local_size, cfg.local_size) if cfg.n_local else 0
    return 3 * (2 * g + cfg.n_local * l) + 2 * g


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


class StopRequest:
    """Ctrl-C / SIGTERM: finish the current step, save, exit. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: saving a checkpoint after this step (Ctrl-C again to quit now)", flush=True)


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


# -----------------------------------------------------------------------------------------------------------------

def setup(cfg):
    """Process group, device, output folder, and the parallelism strategy for this model size."""
    rank, world, device = setup_distributed(cfg)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    with torch.device("meta"):  # count without allocating
        n_params = sum(p.numel() for p in build_ssl_model(cfg, 0.0).backbone.parameters())
    return rank, world, device, resolve_strategy(cfg, world, n_params), n_params


def make_centers(cfg, device):
    if cfg.centering == "sinkhorn_knopp":
        return {}  # Sinkhorn-Knopp needs no state
    k_ibot = cfg.ibot_n_prototypes if cfg.separate_ibot_head else cfg.n_prototypes
    return {"dino": SoftmaxCentering(cfg.n_prototypes).to(device), "ibot": SoftmaxCentering(k_ibot).to(device)}


def train(cfg):
    """DINOv2: the teacher is the EMA of the student and gives the targets."""
    import plan  # what the run needs: parameters, FLOPs, memory per device (nothing allocated)
    if cfg.dry_run:
        raise SystemExit(plan.dry_run(cfg))
    rank, world, device, strategy, n_params = setup(cfg)
    est = plan.estimate(cfg, world, device.type)
    print0(plan.compact_estimate(est))
    ok, advice = plan.fits(est, device)
    if not ok:  # stop before allocating what cannot fit (the estimate is within a few % of the live tensors)
        raise SystemExit(f"error: {advice}")
    student_p, student, teacher = build_models(cfg, strategy, device)
    fit(cfg, rank, world, device, strategy, student_p, student, teacher=teacher, ema=teacher, export="teacher")


def fit(cfg, rank, world, device, strategy, student_p, student, teacher, ema, export, prepare_batch=None):
    """The training loop. `teacher` gives the targets, `ema` follows the student (the same model in DINOv2; a frozen
    teacher and a student EMA in distillation), `export` names the exported files, `prepare_batch` adapts a batch."""
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    centers = make_centers(cfg, device)
    fused = device.type == "cuda"  # one fused kernel on CUDA; the multi-tensor (foreach) path elsewhere
    optimizer = torch.optim.AdamW(param_groups(student, cfg), betas=(0.9, 0.999), eps=1e-8, fused=fused,
                                  foreach=not fused)
    sched = make_schedules(cfg, world)
    total = len(sched["lr"])

    ckpt = Checkpointer(out, cfg.keep_last, rank)
    start = 0
    latest = ckpt.latest() if cfg.resume else None
    if latest is not None:
        start = ckpt.load(latest, student, ema, optimizer, centers, cfg)
        print0(f"resumed from {latest} at step {start}")

    loader, n_images = build_data(cfg, rank, world, start, device)
    monitor = build_monitor(cfg, n_images)  # every rank runs it: an FSDP teacher needs all of them for a forward
    alarm = CollapseAlarm(cfg.n_prototypes, window=max(20, total // 10))  # a tenth of the run, 20 steps at least
    knn = None  # the monitor's last k-NN top-1
    autocast = autocast_for(device, strategy, cfg.dtype)
    flops = flops_per_image(student.backbone, cfg) * cfg.batch_size  # per rank and step
    peak = peak_flops(device)
    if rank == 0:
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        print(f"derived: world {world}, strategy {strategy}, device {device}, global batch {cfg.batch_size * world}, "
              f"peak lr {sched['lr'].max():.3g}, iterations {total}, images {n_images}, "
              f"train GFLOPs/image {flops / cfg.batch_size / 1e9:.2f}", flush=True)
        if monitor is not None:
            print(f"k-NN monitor: every {cfg.monitor_every} steps, {len(monitor.labels[0])} bank images, "
                  f"{len(monitor.labels[1])} queries; raw-pixel k-NN on the same split {monitor.raw_pixels:.1f}%")
        metrics_path = out / "metrics.jsonl"
        if metrics_path.exists():  # keep the history up to the resumed step
            rows = [r for r in metrics_path.read_text().splitlines() if r and json.loads(r)["step"] <= start]
            metrics_path.write_text("".join(r + "\n" for r in rows))

    stop = StopRequest()
    stopping = False  # a stop every rank agreed on (the flags are reduced at log steps, so no rank runs ahead)
    terms = ("dino_global", "dino_local", "ibot", "koleo")
    running = torch.zeros(len(terms) + 1, device=device)  # summed loss terms + step count, on device (no sync)
    first_bad = torch.full((len(terms),), -1, dtype=torch.long, device=device)  # first non-finite step per term
    bar = tqdm(total=total, initial=start, disable=rank != 0, dynamic_ncols=True, desc=export)
    t_last = time.perf_counter()
    data_iter = iter(loader)
    student_p.train()
    try:
        for step in range(start, total):
            # 1. schedules
            apply_schedules(optimizer, sched, step)
            momentum, teacher_temp = float(sched["momentum"][step]), float(sched["teacher_temp"][step])
            batch = to_device(next(data_iter), device)
            if prepare_batch is not None:
                batch = prepare_batch(batch)
            torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)  # drop path: a function of (step, rank)
            # 2-5. teacher forward, student forward, losses, backward, clip, step, EMA
            losses, t_cls, norms = train_step(student_p, student, teacher, ema, optimizer, centers, batch,
                                              teacher_temp, momentum, cfg, autocast)
            # 6. bookkeeping stays on the device: no host sync inside the step
            vals = torch.stack([losses[k].detach().float() for k in terms])
            running += torch.cat([vals, vals.new_ones(1)])
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(vals), step, first_bad)
            bar.update(1)

            last = step + 1 == total
            monitor_now = monitor is not None and ((step + 1) % cfg.monitor_every == 0 or last)
            if (step + 1) % cfg.log_every == 0 or last or monitor_now or (stop.requested and not is_dist()):
                stats = torch.cat([running, torch.tensor([float(stop.requested)], device=device)])
                if is_dist():
                    dist.all_reduce(stats)  # sums over ranks; a stop asked on any rank stops all of them
                    dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
                stats, bad = stats.tolist(), first_bad.tolist()  # the one host sync per log step
                if max(bad) >= 0:
                    bad_step, name = min((b, t) for b, t in zip(bad, terms) if b >= 0)
                    raise FloatingPointError(
                        f"non-finite loss: term '{name}' at step {bad_step}; nothing was saved after it, the last "
                        f"good checkpoint is {ckpt.latest()} (running the same command resumes from it)")
                stopping = stats[-1] > 0
                now = time.perf_counter()
                n_steps = stats[len(terms)] / world
                means = {k: stats[i] / stats[len(terms)] for i, k in enumerate(terms)}
                # this rank's gradient norms and teacher diagnostics, fetched in one copy
                *norm_vals, entropy, used, rho = torch.stack([*norms.values(), *teacher_diagnostics(t_cls)]).tolist()
                row = dict(step=step + 1, loss=sum(means.values()), **means, lr=float(sched["lr"][step]),
                           wd=float(sched["wd"][step]), momentum=momentum, teacher_temp=teacher_temp,
                           **dict(zip(norms, norm_vals)), teacher_entropy=entropy, prototypes_used=int(used),
                           teacher_view_corr=rho,
                           images_per_s=n_steps * cfg.batch_size * world / (now - t_last))
                if device.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    if peak:
                        row["mfu"] = n_steps * flops / (now - t_last) / peak
                running.zero_()
                alert = alarm.update(step + 1, entropy, int(used), t_cls.shape[0], rho, cfg.student_temp / teacher_temp)
                if alert:
                    row["alarm"] = alert
                    if rank == 0:
                        tqdm.write(alert)
                if monitor_now:  # after the throughput figure, which it must not count
                    with autocast:
                        knn = monitor(lambda x: ema(x)["cls"], device)
                    row.update(knn_top1=knn, knn_raw_pixels=monitor.raw_pixels,
                               monitor_s=time.perf_counter() - now)
                t_last = time.perf_counter()
                if rank == 0:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    bar.set_postfix(loss=f"{row['loss']:.3f}", dino=f"{means['dino_global'] + means['dino_local']:.3f}",
                                    ibot=f"{means['ibot']:.3f}", koleo=f"{means['koleo']:.3f}",
                                    **({} if knn is None else {"knn": f"{knn:.1f}%"}))
            if (step + 1) % cfg.save_every == 0 or last or stopping:
                path = ckpt.save(step + 1, student, ema, optimizer, centers, cfg)
                ckpt.export(ema, cfg, export)
                if stopping:
                    print0(f"\nstopped at step {step + 1}: saved {path}; run the same command to resume")
                    break
    finally:
        bar.close()
    if rank == 0:
        plot_run(out)
        print(f"done: {out / (export + '_backbone.pth')} (hub layout), metrics in {out / 'metrics.jsonl'}")
    if is_dist():
        dist.destroy_process_group()
    if stopping:
        raise SystemExit(130)  # interrupted: a script that chains commands must not take this for a finished run


def plot_run(out):
    try:
        from visualize import plot_curves
        plot_curves(out, out / "loss.png")
    except Exception as e:  # a plot must never cost a finished run
        print(f"(no loss plot: {e})")


if __name__ == "__main__":
    train(parse_config())
