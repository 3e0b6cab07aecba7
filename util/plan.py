"""What a training run needs, worked out before anything is built: parameters, FLOPs, memory per device.

The paper trains ViT-g/14 with FSDP on A100s (§5, "Efficient implementation"); whether a run fits is a sum of a few
terms counted exactly (parameters, optimizer state) or from a closed form (activations, prototype logits). Nothing
here allocates: parameters are counted on the meta device, everything else is arithmetic.

    resolve_device_type, count_parameters   the device planned for; the student's parameters (the teacher: a copy)
    PEAK_BF16_TFLOPS, peak_flops, flops_per_image   what MFU divides by; training FLOPs per image
    block_activation_bytes   what autograd keeps per token per transformer block (the closed form, derived there)
    estimate, format_estimate, compact_estimate   every term per device; the `--dry-run` table; a real run's line
    device_memory, fits      what the device holds; (fits?, advice): the flags that would bring the total under it
    dry_run, check_fits      `python train.py --dry-run`; the check before a real run allocates

Run: python train.py --arch vit_g --dry-run --nproc 32 --strategy fsdp --device cuda
"""
import bisect
import dataclasses
import os
import re
from pathlib import Path

import torch

from util.cli import UserError
from util.distributed import pick_device, print0

GiB = 2 ** 30
# Memory that the framework's own allocator does not count: the CUDA context with cuBLAS / cuDNN workspaces, or on
# a CPU the interpreter and torch's libraries (the RSS of `import train` is ~0.23 GiB; the first kernels add more).
RUNTIME_BYTES = {"cuda": 1.0 * GiB, "cpu": 0.35 * GiB, "mps": 0.5 * GiB}
GPU_SIZES = {"A100 40GB": 40, "A100/H100 80GB": 80, "H200 141GB": 141}  # the fits line of the table, in GB


def resolve_device_type(cfg):
    """--device's type (a dry run may plan for CUDA on a laptop), or what pick_device chooses for "auto"."""
    return pick_device().type if cfg.device == "auto" else torch.device(cfg.device).type


def count_parameters(model):
    """Parameters of the student (train.meta_model(cfg): built on the meta device, no memory) by part, plus the
    largest FSDP unit (a block, a head or the root's own parameters: what one all-gather materialises)."""
    parts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.parts().items()}
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.backbone.blocks]
    units = blocks + [v for k, v in parts.items() if k != "backbone"] + [parts["backbone"] - sum(blocks)]
    return dict(parts=parts, total=sum(parts.values()), largest_unit=max(units), model=model)


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


def block_activation_bytes(D, F, H, act, res, ffn="mlp", drop_path=0.0):
    """Bytes autograd keeps for backward, per token, in one pre-norm block (vit.Block) in training. act: bytes of a
    matmul's input (2 in bf16, 4 in fp32); res: of the residual stream (fp32 under autocast: LayerNorm, LayerScale).
      attention: norm1's input (res), qkv's input, q, k, v, proj's input and output (LayerScale's input): (res + 6 act)
        D, plus the fused kernel's logsumexp (4 bytes per head)
      FFN: norm2's input (res), fc1's input, fc2's output: (res + 2 act) D; MLP: GELU's input and output (F each);
        SwiGLU: w12's output (2F), silu's output (F), the product (F)
    Efficient stochastic depth (rate > 0.1) runs each branch on (1 - p) of the batch; index_add keeps its output too.
    fp32 MLP: 40 D + 8 F bytes = 72 D; bf16: 24 D + 4 F = 40 D (checked against autograd's saved tensors in tests)."""
    hidden = (2 if ffn == "mlp" else 4) * F * act
    per_token = (2 * res + 8 * act) * D + hidden + 4 * H
    if drop_path > 0.1:
        per_token = (1 - drop_path) * (per_token + 2 * res * D)
    return per_token


def estimate(cfg, counts, world=None, device_type=None):
    """Parameters, FLOPs and memory per device (bytes) of `python train.py` with this Config and count_parameters'
    counts, on `world` processes (default: cfg.nproc or 1) of `device_type` (default: cfg.device's)."""
    world = world or cfg.nproc or 1
    device_type = device_type or resolve_device_type(cfg)
    backbone = counts["model"].backbone
    P = counts["total"]
    from train import compute_dtype, resolve_strategy  # the switches live where they act, in train.py
    strategy = resolve_strategy(cfg, world, counts["parts"]["backbone"])
    bf16 = compute_dtype(cfg.dtype, torch.device(device_type)) == torch.bfloat16
    shard = world if strategy == "fsdp" else 1
    act = 2 if bf16 else 4
    res = 2 if (bf16 and strategy == "fsdp") else 4  # FSDP's bf16 parameters make the whole stream bf16

    # --- tokens of one rank's batch
    B, L, p, R = cfg.batch_size, cfg.n_local, cfg.patch_size, cfg.num_registers
    n_g, n_l = (cfg.global_size // p) ** 2, (cfg.local_size // p) ** 2  # patches per crop
    tok_g, tok_l = 2 * B * (1 + R + n_g), L * B * (1 + R + n_l)  # tokens through the student
    masked = 2 * B * cfg.mask_probability * (sum(cfg.mask_ratio) / 2) * n_g  # M: expected masked patches

    # --- activations of the student (the teacher runs without grad: its transients are gone before the peak)
    D, H, depth = backbone.embed_dim, backbone.num_heads, backbone.n_blocks
    mlp = backbone.blocks[0].mlp
    ffn = "mlp" if hasattr(mlp, "fc1") else "swiglu"
    F = mlp.fc1.out_features if ffn == "mlp" else mlp.w3.in_features
    per_token = block_activation_bytes(D, F, H, act, res, ffn, cfg.drop_path)
    outside = (res + act) * D + 3 * p * p * act  # the patch-embed conv's input, the final norm's input and output
    tokens = tok_g + tok_l
    act_full = tokens * (depth * per_token + outside)
    # checkpointing keeps each block's input (res bytes) and recomputes one block at a time in backward
    act_ckpt = tokens * (depth * res * D + outside) + max(tok_g, tok_l) * per_token
    h, bn = cfg.head_hidden_dim, cfg.head_bottleneck_dim
    head_rows = (2 + L) * B + masked
    K, K_ibot = cfg.n_prototypes, (cfg.ibot_n_prototypes if cfg.separate_ibot_head else cfg.n_prototypes)
    bn_ibot = cfg.ibot_bottleneck_dim if cfg.separate_ibot_head else bn
    heads_act = head_rows * (D + 4 * h + 2 * bn) * act  # each head's MLP: input, 2 x (Linear out + GELU out), norm
    # each call of a head computes its weight-normed prototypes g v / |v| (K, bottleneck) anew and keeps them
    heads_act += (K * bn + K_ibot * bn_ibot) * act
    activations = (act_ckpt if cfg.activation_checkpointing else act_full) + heads_act

    # --- prototype logits (losses.py computes in fp32). At the end of the loss forward the heads' logits (act bytes)
    # and log_softmax's fp32 output are alive for the student, logits and fp32 targets for the teacher, plus one
    # fp32 product; once the loss terms are computed only what autograd saved is left (log_softmax outputs, targets),
    # and backward adds two fp32 gradients of the largest block at a time. The peak is the larger of the two moments.
    student_el = (2 + L) * B * K + masked * K_ibot  # logit elements: the cls of every crop, the masked patches
    teacher_el = 2 * B * K + masked * K_ibot
    largest = max(2 * B * K, L * B * K, masked * K_ibot)
    targets = 3 * B * K * 4  # dino_loss's swapped (2B, K) and summed (B, K) targets, fp32
    forward_end = (student_el + teacher_el) * (act + 4) + targets + 4 * largest
    backward_start = (student_el + teacher_el) * 4 + targets + 8 * largest
    logits = max(forward_end, backward_start)

    # --- state, per device
    weights = grads = teacher_w = 4 * P / shard  # fp32 each
    adamw = 8 * P / shard  # two fp32 moments
    if strategy == "fsdp":  # one unit gathered in compute precision, the next prefetched, its grad and reduce buffer
        extra_name = "FSDP2 gathered units"
        extra = counts["largest_unit"] * (2 * act + act + 4)
    elif strategy == "ddp":
        extra_name = "DDP gradient buckets (fp32)"
        extra = 4 * P
    else:
        extra_name = "autocast bf16 weight copies" if bf16 else "-"
        extra = 2 * P if bf16 else 0
    optimizer_transient = 0 if device_type == "cuda" else 4 * P / shard  # foreach (not fused) AdamW's sqrt(v)

    # peak: the start of backward (activations, logits, the heads' first gradients) or the end (every gradient and
    # the optimizer step's temporaries), on top of what persists
    persist = weights + adamw + teacher_w + extra
    g_heads = 4 * (P - counts["parts"]["backbone"]) / shard
    peak = persist + max(activations + logits + g_heads, grads + optimizer_transient)
    runtime = RUNTIME_BYTES.get(device_type, 0.5 * GiB)

    # --- FLOPs (model FLOPs, as MFU counts them: a recomputed forward is not useful work)
    flops_backbone = flops_per_image(backbone, cfg)  # 3 x student (fwd + bwd) on every crop + teacher fwd
    # checkpointing recomputes the student's forward on every crop: a third of the first term, exactly
    recompute = (flops_backbone - 2 * backbone.flops_per_image(cfg.global_size, cfg.global_size)) // 3
    model = counts["model"]
    # a row through a head: 2 FLOPs per weight of its Linears (the weight-norm scale g is not a matmul)
    per_row = lambda head: 2 * sum(w.numel() for n, w in head.named_parameters()
                                   if w.dim() == 2 and not n.endswith("original0"))
    dino_row, ibot_row = per_row(model.dino_head), per_row(model.ibot_head or model.dino_head)
    masked_per_image = masked / B
    flops_heads = 3 * ((2 + L) * dino_row + masked_per_image * ibot_row) + 2 * dino_row + masked_per_image * ibot_row
    flops_image = flops_backbone + flops_heads
    return dict(
        cfg=cfg, counts=counts, world=world, device_type=device_type, strategy=strategy,
        dtype="bf16" if bf16 else "fp32", params=counts["parts"], params_total=P,
        tokens=dict(global_crop=1 + R + n_g, local_crop=1 + R + n_l, masked=masked, per_step=tokens),
        flops=dict(backbone_per_image=flops_backbone, heads_per_image=flops_heads, per_image=flops_image,
                   per_device_step=flops_image * B, per_global_step=flops_image * B * world,
                   recompute_per_image=recompute if cfg.activation_checkpointing else 0),
        memory=dict(weights=weights, gradients=grads, adamw=adamw, teacher=teacher_w, extra=extra,
                    extra_name=extra_name, optimizer_transient=optimizer_transient,
                    activations_full=act_full + heads_act, activations_ckpt=act_ckpt + heads_act,
                    activations=activations, logits=logits, runtime=runtime, peak=peak, total=peak + runtime),
    )


def format_estimate(est):
    """The table `--dry-run` prints: parameters, FLOPs, and each term of the memory per device."""
    cfg, m, f, t = est["cfg"], est["memory"], est["flops"], est["tokens"]
    this_run = lambda ckpt: "   <- this run" if ckpt == cfg.activation_checkpointing else ""
    rows = [("student weights (fp32 master)", m["weights"], ""),
            ("gradients (fp32)", m["gradients"], ""),
            ("AdamW moments (fp32, 2 per weight)", m["adamw"], ""),
            ("teacher weights (fp32)", m["teacher"], ""),
            (m["extra_name"], m["extra"], ""),
            ("activations, no checkpointing", m["activations_full"], this_run(False)),
            ("activations, checkpointing", m["activations_ckpt"], this_run(True)),
            ("prototype logits (DINO + iBOT)", m["logits"], ""),
            (f"runtime ({est['device_type']} context, libraries)", m["runtime"], ""),
            ("peak total", m["total"], "")]
    lines = [
        f"plan: {cfg.arch}, {est['world']} x {est['device_type']} ({est['strategy']}, {est['dtype']}), batch "
        f"{cfg.batch_size} per device (global {cfg.batch_size * est['world']}), crops 2x{cfg.global_size} + "
        f"{cfg.n_local}x{cfg.local_size} px ({t['global_crop']} + {t['local_crop']} tokens), ~{t['masked']:.0f} "
        f"masked patches per step",
        "parameters (student; the teacher is the same): "
        + ", ".join(f"{k} {v / 1e6:,.1f}M" for k, v in est["params"].items())
        + f", total {est['params_total'] / 1e6:,.1f}M",
        f"FLOPs per image (train: student fwd+bwd on every crop, teacher fwd on the globals): "
        f"{f['per_image'] / 1e9:,.1f} GFLOP (backbone {f['backbone_per_image'] / 1e9:,.1f}, heads "
        f"{f['heads_per_image'] / 1e9:,.1f}); per device step {f['per_device_step'] / 1e12:,.2f} TFLOP, per global "
        f"step {f['per_global_step'] / 1e12:,.1f} TFLOP"
        + (f"; checkpointing recomputes {f['recompute_per_image'] / 1e9:,.1f} GFLOP per image more"
           if f["recompute_per_image"] else ""),
        f"memory per device ({'sharded over ' + str(est['world']) if est['strategy'] == 'fsdp' else 'replicated'}):"
        f"       GiB",
        *(f"  {name:<37}{value / GiB:8.2f}{mark}" for name, value, mark in rows),
        "  (peak = what persists + the larger of: activations + logits at the start of backward, every gradient"
        + (" + foreach AdamW temporaries" if m["optimizer_transient"] else "") + " at the end)",
    ]
    if est["device_type"] == "cuda":
        lines.append("fits: " + ", ".join(f"{name} {'yes' if m['total'] <= gb * 1e9 else 'no'}"
                                          for name, gb in GPU_SIZES.items()))
    else:
        lines.append(f"(estimated for {est['device_type']} in {est['dtype']}; add --device cuda for a GPU plan)")
    return "\n".join(lines)


def compact_estimate(est):
    """One line for the start of a real run."""
    m, f = est["memory"], est["flops"]
    return (f"plan: {est['params_total'] / 1e6:,.1f}M parameters, {f['per_image'] / 1e9:,.1f} GFLOP per image, "
            f"memory per device ~{m['total'] / GiB:.1f} GiB (weights {m['weights'] / GiB:.2f}, grads "
            f"{m['gradients'] / GiB:.2f}, AdamW {m['adamw'] / GiB:.2f}, teacher {m['teacher'] / GiB:.2f}, activations "
            f"{m['activations'] / GiB:.2f}, logits {m['logits'] / GiB:.2f}); python train.py ... --dry-run for the "
            f"table")


def device_memory(device):
    """Bytes the device can hold: CUDA its total memory, MPS the recommended working set, CPU the RAM available now
    (MemAvailable of /proc/meminfo, else physical pages x page size)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "mps":
        return torch.mps.recommended_max_memory()
    try:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)[1]) * 1024
    except (OSError, TypeError):  # no /proc (macOS), or no MemAvailable line (re.search gave None)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits(est, device):
    """(True, "") when the estimated peak fits the device's memory (a torch.device, or a size in bytes); otherwise
    (False, advice), the advice naming the flags that would make it fit, each with the total it would give."""
    capacity = device if isinstance(device, int) else device_memory(device)
    total = est["memory"]["total"]
    if total <= capacity:
        return True, ""
    cfg, world, dev = est["cfg"], est["world"], est["device_type"]
    total_of = lambda c, w=world: estimate(c, est["counts"], w, dev)["memory"]["total"]
    first_fit = lambda c, worlds: next((n for n in worlds if total_of(c, n) <= capacity), None)
    fsdp = dataclasses.replace(cfg, strategy="fsdp")
    ckpt = dataclasses.replace(cfg, activation_checkpointing=True)
    options = []  # (flags, the total with them)
    if est["strategy"] != "fsdp" and world > 1:
        options.append(("--strategy fsdp", total_of(fsdp)))
    if dev == "cuda" and total_of(fsdp) > capacity:  # more GPUs shard the state further (more CPU processes on one
        more = first_fit(fsdp, [n for n in (2, 4, 8, 16, 32, 64, 128, 256, 512) if n > world])  # machine would not)
        if more:
            options.append((f"{more} GPUs with --strategy fsdp", total_of(fsdp, more)))
    if not cfg.activation_checkpointing:
        options.append(("--activation-checkpointing", total_of(ckpt)))
    if total_of(ckpt) > capacity and cfg.batch_size > 1:  # the largest batch that fits (memory grows with it)
        batch = lambda b: dataclasses.replace(ckpt, batch_size=b)
        low = bisect.bisect(range(1, cfg.batch_size), False, key=lambda b: total_of(batch(b)) > capacity)
        if low:
            options.append((f"--batch-size {low}" + ("" if cfg.activation_checkpointing else " with it"),
                            total_of(batch(low))))
    advice = [f"{text} (~{t / GiB:.1f} GiB{', fits' if t <= capacity else ''})" for text, t in options]
    if all(t > capacity for _, t in options):  # no single change is enough: combine them
        both = dataclasses.replace(ckpt, strategy="fsdp")
        more = first_fit(both, [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
                                if n >= world and (dev == "cuda" or n == world)])
        advice.append(f"{more} {'GPUs' if dev == 'cuda' else 'processes'} with --strategy fsdp --activation-"
                      f"checkpointing (~{total_of(both, more) / GiB:.1f} GiB, fits)" if more else
                      "nothing listed here fits: a smaller --arch, --batch-size, --n-prototypes or crops")
    where = f"{capacity / GiB:.1f} GiB" + ("" if isinstance(device, int) else f" on {device}")
    return False, f"the run needs ~{total / GiB:.1f} GiB per device, more than the {where}; try: " + "; ".join(advice)


def dry_run(cfg, model, make_schedules):
    """`python train.py --dry-run`: rank 0 prints the estimate for cfg.nproc processes (0: torchrun's WORLD_SIZE) and
    draws the schedules in <out>/schedules.png. model: train.meta_model(cfg); make_schedules: train's."""
    world = cfg.nproc or int(os.environ.get("WORLD_SIZE", "1"))
    est = estimate(cfg, count_parameters(model), world)
    if int(os.environ.get("RANK", "0")) != 0:  # no process group yet: torchrun's RANK tells
        return 0
    print(format_estimate(est))
    here = pick_device().type
    if est["device_type"] == here:  # the device this machine has: say whether it fits, and what would
        ok, advice = fits(est, torch.device(here))
        print(f"fits this machine's {here}: " + ("yes" if ok else f"no; {advice}"))
    from visualize import plot_schedules  # plotting code, imported only when drawing
    print(f"wrote {plot_schedules(make_schedules(cfg, world), Path(cfg.out) / 'schedules.png')}")
    return 0


def check_fits(cfg, model, world, device):
    """Before a real run allocates: print the memory estimate's line, and stop with advice (a UserError) when it
    cannot fit. The estimate is within a few % of the live tensors (tests/test_gpu_paths.py)."""
    est = estimate(cfg, count_parameters(model), world, device.type)
    print0(compact_estimate(est))
    ok, advice = fits(est, device)
    if not ok:
        raise UserError(advice)
