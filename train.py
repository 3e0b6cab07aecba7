"""
DINOv2 training: a student and an EMA teacher, the DINO + iBOT + KoLeo objective, one loop for every scale.

Paper: Oquab et al., "DINOv2" (TMLR 2024), §4 (method) and §5 (implementation); the numbers follow the released
code (`dinov2/train/train.py`, `ssl_meta_arch.py`, `configs/ssl_default_config.yaml`). Read vit.py, losses.py
and data.py first; this file puts them together.

Reading order:
    Config, PRESETS        every knob, with the paper's recipe per --arch (and its checks)
    make_schedules         lr, weight decay, teacher momentum, teacher temperature: one value per iteration
    param_groups           layer-wise lr decay, patch-embed lr x0.2, no decay on biases / norms / LayerScale
    SSLModel               backbone + DINO head + iBOT head: the student, and (as an EMA copy) the teacher
    parallelize            activation checkpointing, torch.compile, DDP or FSDP2: applied from outside the model
    build_models           student and teacher, on the meta device for big models
    build_data             multi-crop + masking, a world-size-invariant stream of global batches
    Run, train_step        ONE ITERATION: schedules, teacher targets, student, the four terms, update, EMA
    train, fit             the run: plan, resume, then the loop (step, log, checkpoint); distill.py reuses fit
The plumbing lives in util/: runlog.py (metrics.jsonl, progress bar, k-NN monitor rows, collapse alarm, Ctrl-C),
checkpoint.py (atomic DCP checkpoints, resume, exports), plan.py (parameters, FLOPs, memory per device).

Run:
    python train.py                                   # laptop default: vit_tiny on synthetic images, CPU ok
    python train.py --data /path/to/images --arch vit_s
    torchrun --nproc_per_node=8 train.py --arch vit_g --data /path/to/images --activation-checkpointing
"""
import contextlib
import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from util import cli
from util import distributed
from util import plan
import vit
from util.cli import arg, flag
from data import (DROP_PATH, GlobalBatchSampler, ImageFolderDataset, MaskingGenerator, MultiCropAugmentation,
                  MultiCropCollate, MultiCropDataset, SyntheticDataset, stream_seed)
from util.distributed import local_tensor, print0
from data import BACKGROUNDS, OBJECT_SIZE, variant
from util.checkpoint import Checkpointer
from util.runlog import TERMS, Logger, build_monitor, plot_run
from losses import DINOHead, SoftmaxCentering, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp


# -----------------------------------------------------------------------------------------------------------------
# Config: defaults = the paper's default recipe (released `ssl_default_config.yaml`); PRESETS override per --arch.

@dataclass
class Config:
    # model
    arch: str = arg("vit_tiny", "the architecture (vit_t/s/b/l/g are aliases)", check=tuple(vit.ARCHS))
    patch_size: int = arg(14, "every released model uses 14", check=(1, None))
    depth: int = arg(0, "transformer blocks; 0 = the arch's own (12 for vit_tiny / s / b)", check=(0, None))
    num_registers: int = arg(0, "register tokens (4 = the \"_reg\" models)", check=(0, None))
    ffn: str = arg("auto", "auto: SwiGLU for vit_giant2 only, as released", check=("auto", "mlp", "swiglu"))
    drop_path: float = arg(0.3, "uniform stochastic depth of the student (0.4 for vit_l / vit_g)", check=(0, 1))
    layerscale: float = arg(1e-5, "LayerScale init", check=(0, None))
    # heads (`dino` / `ibot` keys of the config)
    n_prototypes: int = arg(65536, "K of the DINO head", check=(1, None))
    head_hidden_dim: int = arg(2048, "width of the heads' 3-layer MLP", check=(1, None))
    head_bottleneck_dim: int = arg(256, "DINO head bottleneck, L2-normalised before the prototypes", check=(1, None))
    separate_ibot_head: bool = arg(False, "untied iBOT head (True for vit_l / vit_g)")
    ibot_n_prototypes: int = arg(65536, "K of the iBOT head (with --separate-ibot-head)", check=(1, None))
    ibot_bottleneck_dim: int = arg(256, "iBOT head bottleneck", check=(1, None))
    # objective (paper §4)
    centering: str = arg("softmax", "teacher targets (sinkhorn_knopp: released vit_l / g)",
                         check=("softmax", "sinkhorn_knopp"))
    dino_weight: float = arg(1.0, "weight of the DINO (cls token) loss", check=(0, None))
    ibot_weight: float = arg(1.0, "weight of the iBOT (masked patch) loss", check=(0, None))
    koleo_weight: float = arg(0.1, "weight of the KoLeo spreading term", check=(0, None))
    student_temp: float = arg(0.1, "softmax temperature of the student", check=">0")
    teacher_temp: float = arg(0.07, "after the warm-up", check=">0")
    warmup_teacher_temp: float = arg(0.04, "teacher temperature at step 0, raised linearly to --teacher-temp",
                                     check=">0")
    warmup_teacher_temp_epochs: float = arg(30, "epochs of that warm-up", check=(0, None))
    # data (`crops` keys)
    data: str = arg("", "an image folder (class sub-folders or flat) or a .txt file list; \"\" = synthetic images")
    synthetic_images: int = arg(2000, "size of the synthetic dataset when --data is empty", check=(1, None))
    synthetic_size: int = arg(128, "its image side in pixels", check=(1, None))
    synthetic_rotation: float = arg(360.0, "synthetic objects' angle range in degrees (0 = all upright)",
                                    check=(0, 360))
    synthetic_background: str = arg("texture", "plain: one muted colour per image; clutter: texture + strokes",
                                    check=BACKGROUNDS)
    synthetic_object_size: tuple[float, float] = arg(OBJECT_SIZE, "objects' radius range, fractions of the side",
                                                     check=(0, 0.5))
    global_size: int = arg(224, "global crop side in pixels", check=(1, None))
    local_size: int = arg(98, "local crop side in pixels", check=(1, None))
    n_local: int = arg(8, "local crops per image", check=(0, None))
    global_scale: tuple[float, float] = arg((0.32, 1.0), "area range of a global crop, as a fraction of the image",
                                            check=(0, 1))
    local_scale: tuple[float, float] = arg((0.05, 0.32), "area range of a local crop", check=(0, 1))
    hue_jitter: float = arg(0.1, "colour-jitter hue range (+-); 0.5 draws any hue, so colour cannot match two views",
                            check=(0, 0.5))
    p_grayscale: float = arg(0.2, "probability that a crop is turned grey", check=(0, 1))
    blur: str = arg("paper", "probabilities: paper 1.0 / 0.1 / 0.5, released 0.0 / 0.9 / 0.5",
                    check=("paper", "released"))
    mask_probability: float = arg(0.5, "fraction of global crops that get an iBOT mask", check=(0, 1))
    mask_ratio: tuple[float, float] = arg((0.1, 0.5), "range of masked-patch ratios, stratified over the batch",
                                          check=(0, 1))
    num_workers: int = arg(-1, "data loader workers per rank (-1 = auto)", check=(-1, None))
    # optimisation (`optim`, `teacher`, `train` keys); an "epoch" is epoch_length iterations, whatever the dataset size
    batch_size: int = arg(64, "per rank", check=(1, None))
    epochs: float = arg(100, "length of the run in epochs of --epoch-length iterations", check=">0")
    epoch_length: int = arg(1250, "iterations per epoch", check=(1, None))
    base_lr: float = arg(0.004, "peak lr = base_lr * sqrt(global_batch / 1024)", check=">0")
    min_lr: float = arg(1e-6, "lr at the end of the cosine", check=(0, None))
    warmup_epochs: float = arg(10, "linear lr warm-up", check=(0, None))
    weight_decay: float = arg(0.04, "cosine from this ...", check=(0, None))
    weight_decay_end: float = arg(0.4, "... to this", check=(0, None))
    momentum_teacher: float = arg(0.992, "cosine from this to 1", check=(0, 1))
    freeze_last_layer_epochs: float = arg(1, "last layer of the heads at lr 0", check=(0, None))
    layer_decay: float = arg(0.9, "layer-wise lr decay (1.0 = none)", check=(1e-6, 1))
    patch_embed_lr_mult: float = arg(0.2, "lr multiplier of the patch embedding", check=(0, None))
    clip_grad: float = arg(3.0, "per student part (backbone, dino head, ibot head)", check=">0")
    # starting from pretrained weights
    init_from: str = arg("", "backbone weights in any layout (hub, Hugging Face, timm, ours); heads start fresh")
    heads_warmup_epochs: float = arg(1, "with --init-from: backbone lr 0 while the fresh heads settle", check=(0, None))
    img_size: int = arg(0, "the backbone's native pos-embed grid in pixels; 0: --global-size (--init-from: the file's)",
                        check=(0, None))
    # system
    strategy: str = arg("auto", "auto: none in one process, fsdp above 200M params, else ddp",
                        check=("auto", "none", "ddp", "fsdp"))
    compile: bool = arg(False, "torch.compile each transformer block")
    dtype: str = arg("auto", "compute precision (master weights fp32); auto: bf16 on CUDA",
                     check=("auto", "bf16", "fp32"))
    activation_checkpointing: bool = arg(False, "recompute blocks in backward (for vit_l / vit_g)")
    meta_init: bool | None = arg(None, "FSDP: build on the meta device, init after sharding (default: vit_l / vit_g)")
    device: str = arg("auto", "auto | cpu | cuda | mps")
    seed: int = arg(0, "seed of the initialisation, the data order and the augmentations")
    out: str = arg("runs/train", "run folder: checkpoints, metrics.jsonl, exports, plots")
    save_every: int = arg(1250, "iterations between checkpoints", check=(1, None))
    keep_last: int = arg(3, "checkpoints kept", check=(1, None))
    log_every: int = arg(10, "iterations between log lines (metrics.jsonl)", check=(1, None))
    monitor_every: int = arg(0, "steps between online k-NN checks of the teacher backbone (0 = off)", check=(0, None))
    monitor_data: str = arg("", "labelled folder (class sub-folders) for the k-NN monitor; none: held-out synthetic")
    monitor_images: int = arg(500, "images in the monitor's bank, and as many held-out queries", check=(0, None))
    resume: bool = arg(True, "resume from the latest checkpoint in --out")
    dry_run: bool = arg(False, "print parameters, FLOPs and memory per device for this run (plan.py), build nothing")
    nproc: int = arg(0, "the world size --dry-run plans for (0 = this run's own)", check=(0, None))

    def __post_init__(self):
        """Every value checked before anything is built: the declared ranges and choices of the fields (cli.arg's
        check=), then what spans several fields; a ValueError naming the flag (a usage error in cli.parse). Presets,
        tests and dataclasses.replace go through here too."""
        cli.check_fields(self)
        for name, what in (("global_scale", "area"), ("local_scale", "area"), ("synthetic_object_size", "radius"),
                           ("mask_ratio", "masked")):  # each element's range is declared; here their order
            lo, hi = getattr(self, name)
            if not (lo <= hi and (lo > 0 or name == "mask_ratio")):
                raise ValueError(f"{flag(name)} must be two {what} fractions, low <= high, got {(lo, hi)}")
        for name in ("global_size", "local_size"):  # the patch embedding takes whole patches only
            if (name == "global_size" or self.n_local > 0) and getattr(self, name) % self.patch_size:
                raise ValueError(f"{flag(name)} must be a multiple of the patch size (--patch-size "
                                 f"{self.patch_size}), got {getattr(self, name)}")
        if self.device.split(":")[0] not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"--device must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
        if int(self.epochs * self.epoch_length) < 1:
            raise ValueError(f"--epochs x --epoch-length {self.epoch_length} must give at least one iteration")


# Each preset is what the paper trained at that size; flags override single fields.
LARGE_RECIPE = dict(  # vitl14.yaml / vitg14.yaml: the recipe of the released models
    drop_path=0.4, n_prototypes=131072, head_bottleneck_dim=384, separate_ibot_head=True,
    ibot_n_prototypes=131072, ibot_bottleneck_dim=256, centering="sinkhorn_knopp", base_lr=2e-4, epochs=500,
    warmup_epochs=80, weight_decay_end=0.2, momentum_teacher=0.994, layer_decay=1.0, batch_size=32)
PRESETS = {
    # The laptop default (`python train.py`): a 6-block vit_tiny, 8-px patches on 32-px crops of 64-px synthetic images,
    # under 10 minutes on two CPU cores. Each departure below was measured; the runs are in ABLATIONS.md.
    # NOTE(deviation): peak lr 3e-4 (base_lr 0.0017 at batch 32), LayerScale 0.1: this small ViT does not train at 7e-4.
    # NOTE(deviation): every crop grey: the objects' hue is drawn per image, so colour alone would match two views.
    # NOTE(deviation): 256 prototypes, a 1024-wide head, no drop path, momentum from 0.98, teacher temp 0.04: short run.
    # NOTE(deviation): upright objects on plain backgrounds: the full synthetic set is out of reach in this budget.
    "vit_tiny": dict(
        synthetic_rotation=0.0, synthetic_background="plain", depth=6, patch_size=8, synthetic_images=10000,
        synthetic_size=64, global_size=32, local_size=16, n_local=6, hue_jitter=0.0, p_grayscale=1.0, n_prototypes=256,
        ibot_n_prototypes=256, head_hidden_dim=1024, separate_ibot_head=True, layerscale=0.1, drop_path=0.0,
        batch_size=32, epochs=13, epoch_length=100, base_lr=0.0017, warmup_epochs=1, teacher_temp=0.04,
        freeze_last_layer_epochs=0, momentum_teacher=0.98, save_every=500, log_every=20, monitor_every=100),
    "vit_small": dict(),
    "vit_base": dict(),
    "vit_large": dict(LARGE_RECIPE),
    "vit_giant2": dict(LARGE_RECIPE, batch_size=12),
}


def parse_config(cls=Config, presets=PRESETS, argv=None, description=__doc__):
    """--field value for every field of `cls` (cli.parse); the --arch preset fills what the flags leave unset, and
    with --init-from the file fills the backbone's shape and the schedule becomes one for continuing."""
    cfg = cli.parse(cls, argv, description, presets, "arch", vit.canonical_arch,
                    derive=lambda given: from_weights(given, presets))
    cli.check_paths(cfg, ("data", "init_from", "monitor_data", "teacher"))
    return cfg


def from_weights(given, presets):
    """--init-from: the backbone's shape from the file (a flag that contradicts it is an error naming both), and a
    schedule for continuing a trained network rather than starting one; flags still override.
    NOTE(deviation): the released code has no such recipe; its from-scratch schedule is measured beside this one in
    ABLATIONS.md."""
    if not given.get("init_from"):
        return {}
    from util.weights import describe  # the file formats live in the support package
    shape = describe(given["init_from"], given)  # arch, depth, patch_size, num_registers, ffn, img_size
    recipe = {**{f.name: f.default for f in dataclasses.fields(Config)}, **presets.get(shape["arch"], {}), **given}
    continuing = dict(base_lr=recipe["base_lr"] / 4, warmup_epochs=recipe["heads_warmup_epochs"] + 1,
                      momentum_teacher=max(recipe["momentum_teacher"], 0.994),
                      warmup_teacher_temp=recipe["teacher_temp"], warmup_teacher_temp_epochs=0)
    print0(f"--init-from {given['init_from']}: {shape}; fresh heads train alone for --heads-warmup-epochs; the "
           f"schedule for continuing (flags override): {continuing}")
    return {**shape, **continuing}


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
# Parameter groups (released `utils/param_groups.py`): per parameter: lr and weight-decay multipliers, last-layer flag.

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
        # copies, not views of one tensor: FSDP2 hooks each output of the root for its backward, and warns on views
        out = dict(cls=cls.clone(), global_logits=logits[:n_global].clone(), local_logits=logits[n_global:].clone())
        if mask_indices is not None:  # None: cls only (the k-NN monitor)
            patches = g["x_norm_patchtokens"].flatten(0, 1)[mask_indices]  # (M, D): masked positions only
            patch_head = self.dino_head if self.ibot_head is None else self.ibot_head
            out["patch_logits"] = patch_head(patches)  # (M, K)
        return out


def build_ssl_model(cfg, drop_path):
    # NOTE(deviation): vit_large trains with the MLP FFN, as the released ViT-L backbone (distilled from ViT-g) has it,
    # so --init-from and the hub / Hugging Face / timm layouts fit it; the released vitl14.yaml, which trains ViT-L
    # from scratch, uses swiglufused (hidden 2736, 0.1% more parameters): --ffn swiglu gives that.
    ffn = ("swiglu" if vit.canonical_arch(cfg.arch) == "vit_giant2" else "mlp") if cfg.ffn == "auto" else cfg.ffn
    # NOTE(deviation): register models interpolate pos-embeds by size (with antialias), as the released *_reg models.
    interp = dict(interpolate_antialias=True, interpolate_offset=0.0) if cfg.num_registers else {}
    backbone = vit.build_model(cfg.arch, img_size=cfg.img_size or cfg.global_size, patch_size=cfg.patch_size,
                               ffn_layer=ffn, init_values=cfg.layerscale, drop_path_rate=drop_path,
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


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- m * teacher + (1 - m) * student, on every parameter (shards under FSDP: same layout on both)."""
    t = [local_tensor(p) for p in teacher.parameters()]
    s = [local_tensor(p) for p in student.parameters()]
    torch._foreach_lerp_(t, s, 1.0 - momentum)


# -----------------------------------------------------------------------------------------------------------------
# Precision and parallelism: the two switches, then what they do, applied from outside the model (vit.py and
# losses.py know nothing of autocast, DDP or FSDP2).

def resolve_strategy(cfg, world, n_params):
    """--strategy: none in one process; auto: DDP, or FSDP2 above 200M backbone parameters (vit_g: 1.1B)."""
    if cfg.strategy != "auto":
        if world == 1 and cfg.strategy != "none":
            return "none"  # one process: nothing to wrap
        return cfg.strategy
    return "none" if world == 1 else ("fsdp" if n_params > 200e6 else "ddp")


def compute_dtype(dtype, device):
    """--dtype: bf16 or fp32 compute (the master weights stay fp32). auto: bf16 on CUDA; fp32 on CPU and MPS, where
    bf16 matmuls are slow or partial (--dtype bf16 runs the GPU's precision path on a CPU, as the tests do)."""
    bf16 = dtype == "bf16" or (dtype == "auto" and torch.device(device).type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def autocast_for(device, strategy, dtype="auto"):
    """bf16 autocast when --dtype gives bf16 (fp32 master weights); under FSDP2 the MixedPrecisionPolicy casts the
    parameters instead. Losses upcast to fp32 in losses.py whatever this gives."""
    if compute_dtype(dtype, device) == torch.bfloat16 and strategy != "fsdp":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Parallelism: activation checkpointing, compile, then DDP or FSDP2 wrapped around the finished model.

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
    big = vit.canonical_arch(cfg.arch) in ("vit_large", "vit_giant2")
    meta = strategy == "fsdp" and not cfg.init_from and (big if cfg.meta_init is None else cfg.meta_init)
    with torch.device("meta") if meta else contextlib.nullcontext():
        student = build_ssl_model(cfg, cfg.drop_path)  # initialised by its constructors unless on meta
    if not meta and cfg.init_from:
        vit.load_pretrained(student.backbone, cfg.init_from)  # strict; at the file's own grid, not resampled
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
    kind = variant(vars(cfg))  # the synthetic set's angles, background, object size (evaluate.py reads the same)
    images = (ImageFolderDataset(cfg.data) if cfg.data
              else SyntheticDataset(cfg.synthetic_images, cfg.synthetic_size, seed=cfg.seed, **kind))
    augment = MultiCropAugmentation(cfg.global_size, cfg.local_size, cfg.n_local, tuple(cfg.global_scale),
                                    tuple(cfg.local_scale), blur=cfg.blur)
    augment.hue, augment.p_grayscale = cfg.hue_jitter, cfg.p_grayscale
    grid = cfg.global_size // cfg.patch_size
    masking = MaskingGenerator(input_size=(grid, grid), max_num_patches=int(0.5 * grid * grid))
    collate = MultiCropCollate(masking, tuple(cfg.mask_ratio), cfg.mask_probability, world, cfg.seed)
    workers = cfg.num_workers if cfg.num_workers >= 0 else min(8, max(1, (os.cpu_count() or 2) // 2))
    loader = torch.utils.data.DataLoader(
        MultiCropDataset(images, augment, cfg.seed), collate_fn=collate, num_workers=workers,
        batch_sampler=GlobalBatchSampler(len(images), cfg.batch_size, rank, world, cfg.seed, start_step),
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    return loader, len(images)


# -----------------------------------------------------------------------------------------------------------------
# One iteration of DINOv2 (paper §4; released `SSLMetaArch.forward_backward` and `train/train.py`), read top to
# bottom: schedules, the teacher's targets, the student's predictions, the four loss terms, the update, the EMA.

@dataclass
class Run:
    """Everything an iteration touches, by name (built by `make_run`)."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    strategy: str
    student: SSLModel  # the student's modules: parameter groups, clipping per part, the source of the EMA
    student_p: nn.Module  # the same model wrapped for training (DDP / FSDP2): the one whose forward is called
    teacher: nn.Module  # gives the targets: the EMA of the student (a frozen, larger network in distillation)
    ema: nn.Module  # follows the student: the teacher itself (the student's own EMA copy in distillation)
    optimizer: torch.optim.Optimizer
    centers: dict  # the softmax centering's running centres ({} for Sinkhorn-Knopp, which needs no state)
    sched: dict  # lr, wd, momentum, teacher_temp, ...: one value per iteration
    autocast: object  # bf16 autocast on CUDA, a no-op elsewhere
    export: str = "teacher"  # name of the exported files: <export>.pth, <export>_backbone.pth
    ibot_on_all_patches: bool = False  # distillation: no mask, every patch token of the global crops is a target

    @property
    def total(self):
        return len(self.sched["lr"])


def make_run(cfg, *, rank, world, device, strategy, student_p, student, teacher, ema, **kwargs):
    """A Run with its optimizer, centres, schedules and autocast (kwargs: Run's export, ibot_on_all_patches)."""
    fused = device.type == "cuda"  # one fused kernel on CUDA; the multi-tensor (foreach) path elsewhere
    optimizer = torch.optim.AdamW(param_groups(student, cfg), betas=(0.9, 0.999), eps=1e-8, fused=fused,
                                  foreach=not fused)
    return Run(cfg=cfg, rank=rank, world=world, device=device, strategy=strategy, student=student,
               student_p=student_p, teacher=teacher, ema=ema, optimizer=optimizer, centers=make_centers(cfg, device),
               sched=make_schedules(cfg, world), autocast=autocast_for(device, strategy, cfg.dtype), **kwargs)


def train_step(run, batch, step):
    """One iteration on one (per-rank) batch. Returns the loss terms, the teacher's cls targets and the gradient
    norms, all on the device: nothing here waits for the GPU."""
    cfg, sched = run.cfg, run.sched
    # 1. schedules: lr and weight decay of each parameter group, the teacher's momentum and temperature
    apply_schedules(run.optimizer, sched, step)
    momentum, teacher_temp = float(sched["momentum"][step]), float(sched["teacher_temp"][step])
    if run.ibot_on_all_patches:
        batch = whole_crops(batch, cfg.patch_size)
    g, l = batch["global_crops"], batch["local_crops"]  # (2B, 3, Hg, Wg), (L*B, 3, Hl, Wl)
    masks, idx, w = batch["masks"], batch["mask_indices"], batch["mask_weights"]  # (2B, N), (M,), (M,)
    with run.autocast:
        # 2. the teacher sees the unmasked global crops (no gradient, eval mode: no drop path) and its scores are
        #    centred into targets: Sinkhorn-Knopp (balanced over the batch, all ranks) or softmax minus an EMA centre
        with torch.no_grad():
            t = run.teacher(g, mask_indices=idx)
            if cfg.centering == "sinkhorn_knopp":
                t_cls = sinkhorn_knopp(t["global_logits"], teacher_temp)  # (2B, K)
                t_patch = sinkhorn_knopp(t["patch_logits"], teacher_temp)  # (M, K)
            else:
                t_cls = run.centers["dino"](t["global_logits"], teacher_temp)  # (2B, K)
                t_patch = run.centers["ibot"](t["patch_logits"], teacher_temp)  # (M, K)
        # 3. the student sees the masked global crops (one pass serves DINO, iBOT and KoLeo) and the local crops
        s = run.student_p(g, l, masks=masks, mask_indices=idx)
        # 4. DINO: each student crop's cls against the teacher's other global view; iBOT: each masked patch against
        #    the teacher's token at that position; KoLeo: spread the cls features of each view over this rank's batch
        dino_global, dino_local = dino_loss(s["global_logits"], s["local_logits"], t_cls, cfg.student_temp)
        ibot = ibot_loss(s["patch_logits"], t_patch, w, g.shape[0], cfg.student_temp)
        koleo = sum(koleo_loss(c) for c in s["cls"].chunk(2))
        losses = dict(dino_global=cfg.dino_weight * dino_global, dino_local=cfg.dino_weight * dino_local,
                      ibot=cfg.ibot_weight * ibot, koleo=cfg.koleo_weight * koleo)
    # 5. backward, clip each part (backbone, heads) on its own, AdamW
    run.optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    norms = clip_gradients(run.student.parts(), cfg.clip_grad)
    run.optimizer.step()
    # 6. the teacher follows: teacher <- m * teacher + (1 - m) * student
    ema_update(run.ema, run.student, momentum)
    return losses, t_cls, norms


def whole_crops(batch, patch_size):
    """Distillation's targets: no mask on the student's input, every patch token of the global crops an iBOT target,
    each crop's tokens weighted 1/N (so the iBOT loss is the mean over crops of the per-crop mean)."""
    g = batch["global_crops"]  # (2B, 3, H, W)
    n = (g.shape[-2] // patch_size) * (g.shape[-1] // patch_size)
    m = g.shape[0] * n
    return dict(batch, masks=None, mask_indices=torch.arange(m, device=g.device),
                mask_weights=torch.full((m,), 1.0 / n, device=g.device))


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


def make_centers(cfg, device):
    if cfg.centering == "sinkhorn_knopp":
        return {}  # Sinkhorn-Knopp needs no state
    k_ibot = cfg.ibot_n_prototypes if cfg.separate_ibot_head else cfg.n_prototypes
    return {"dino": SoftmaxCentering(cfg.n_prototypes).to(device), "ibot": SoftmaxCentering(k_ibot).to(device)}


# -----------------------------------------------------------------------------------------------------------------
# The run: set-up, then the loop; the logging and checkpoint plumbing it calls come after it.

def setup(cfg):
    """Process group, device, and the parallelism strategy for this model size."""
    rank, world, device = distributed.init(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    n_params = sum(p.numel() for p in meta_model(cfg).backbone.parameters())
    return rank, world, device, resolve_strategy(cfg, world, n_params), n_params


def meta_model(cfg):
    """The student's structure on the meta device: counted and planned (plan.py) without allocating anything."""
    with torch.device("meta"):
        return build_ssl_model(cfg, 0.0)


def train(cfg):
    """DINOv2: the teacher is the EMA of the student and gives the targets."""
    if cfg.dry_run:  # what the run needs (parameters, FLOPs, memory per device), nothing allocated
        raise SystemExit(plan.dry_run(cfg, meta_model(cfg), make_schedules))
    rank, world, device, strategy, _ = setup(cfg)
    plan.check_fits(cfg, meta_model(cfg), world, device)  # stops with advice before allocating what cannot fit
    student_p, student, teacher = build_models(cfg, strategy, device)
    fit(make_run(cfg, rank=rank, world=world, device=device, strategy=strategy, student_p=student_p, student=student,
                 teacher=teacher, ema=teacher))


def fit(run):
    """Resume, then iterate: the step, its log line, a checkpoint every --save-every steps; the exports at the end."""
    cfg = run.cfg
    out = Path(cfg.out)
    ckpt = Checkpointer(out, cfg.keep_last, run.rank)
    ckpt.claim(cfg.resume)  # makes --out; --no-resume never writes into another run's folder
    start = ckpt.resume(run.student, run.ema, run.optimizer, run.centers, cfg) if cfg.resume else 0
    loader, n_images = build_data(cfg, run.rank, run.world, start, run.device)
    log = Logger(run, start, n_images, ckpt, build_monitor(cfg, n_images))  # the monitor runs on every rank
    data = iter(loader)
    run.student_p.train()
    stopping = False
    try:
        for step in range(start, run.total):
            batch = to_device(next(data), run.device)
            log.skips.update(batch.pop("skipped"), step)  # unreadable files: named, counted per epoch
            torch.manual_seed(stream_seed(cfg.seed, DROP_PATH, step, run.rank))  # drop path: (step, rank)
            losses, t_cls, norms = train_step(run, batch, step)
            stopping = log.step(step, losses, t_cls, norms)  # on log steps only: one host sync, a stop agreed
            if (step + 1) % cfg.save_every == 0 or step + 1 == run.total or stopping:
                # nothing non-finite is saved: the parameters and the loss flags are checked first, on every rank
                path = ckpt.save(step + 1, run.student, run.ema, run.optimizer, run.centers, cfg, log.first_bad, TERMS)
                ckpt.export(run.ema, cfg, run.export, step + 1)
                if stopping:
                    print0(f"\nstopped at step {step + 1}: saved {path}; run the same command to resume")
                    break
    finally:
        log.close()
    if start == run.total:  # a finished run run again: its exports rebuilt from the last checkpoint (a kill may
        ckpt.export(run.ema, cfg, run.export, run.total)  # have come between that save and its export)
    if run.rank == 0:
        plot_run(out)
        print(f"done: {out / (run.export + '_backbone.pth')} (hub layout), metrics in {out / 'metrics.jsonl'}")
    distributed.close()
    if stopping:
        raise SystemExit(130)  # interrupted: a script that chains commands must not take this for a finished run


# -----------------------------------------------------------------------------------------------------------------

def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}



if __name__ == "__main__":
    cli.run(lambda: train(parse_config()))
