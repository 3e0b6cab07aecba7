"""The DINOv2 backbone: a Vision Transformer with LayerScale, register tokens and stochastic depth.

Paper: "DINOv2: Learning Robust Visual Features without Supervision" (Oquab et al., 2023): the ViT backbone
trained in §4 (with the mask token of the iBOT patch objective and position-embedding resizing for other
resolutions) and §5's efficient implementation (ViT-g with 1536 dims / 24 heads of 64 and a SwiGLU FFN, the
batch-subset "efficient stochastic depth"); register tokens from "Vision Transformers Need Registers" (Darcet et
al., 2023). Parameter names equal those of the released torch.hub backbones, so the
official weights load with strict=True (every number here is the released `dinov2/models/vision_transformer.py`'s
and `dinov2/layers/*`'s).

The same weights also load from and export to the layouts of Hugging Face transformers and timm: the support
package's util/weights.py reads the files and holds the layouts; this file builds the model and loads a state dict of
the released layout into it, strictly.

Public names, in reading order:
    PatchEmbed, Attention, Mlp, SwiGLUFFN, LayerScale, drop_path, drop_add_residual_stochastic_depth, Block,
    resample_pos_embed, VisionTransformer,
    vit_tiny, vit_small, vit_base, vit_large, vit_giant2, ARCHS, canonical_arch, build_model, ARCH_BY_WIDTH,
    load_pretrained

Shapes: B batch, N tokens, D width, H heads, Dh head dim, R registers.
"""
import math
import os

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

from util.cli import UserError


# ----------------------------------------------------------------------------------------------------------------
# The pieces of a block, smallest first


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping p x p patches and project each one to D dims (one strided conv)."""

    def __init__(self, patch_size=14, in_chans=3, embed_dim=768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            # The released code asserts here; a clear error beats silently dropping the image border.
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {p}")
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention. The fused SDPA kernel by default; the explicit softmax(q k^T * scale) form only
    when the attention map itself is wanted (visualisation), which the fused kernel cannot return."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)  # qkv_bias=True as released
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attention=False):
        B, N, D = x.shape
        # The (3, H, Dh) split order of the fused qkv weight is the released one: it decides which rows are q/k/v.
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
        if return_attention:
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (B, H, N, N)
            out = attn @ v  # (B, H, N, Dh)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh), default scale = Dh**-0.5
        out = self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)
        return (out, attn) if return_attention else out


class Mlp(nn.Module):
    """The feed-forward of ViT-S/B/L: Linear -> exact (erf) GELU -> Linear."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))  # (B, N, D)


class SwiGLUFFN(nn.Module):
    """The feed-forward of ViT-g: w3(silu(x1) * x2) with x1, x2 the two halves of one fused w12 projection.
    The hidden width is 2/3 of the MLP's (same parameter count), rounded up to a multiple of 8: 4096 for ViT-g."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        hidden_dim = (int(hidden_dim * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # each (B, N, hidden); x1 is the gate
        return self.w3(F.silu(x1) * x2)  # (B, N, D)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch, started small (1e-5) so each block begins close to identity."""

    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


def drop_path(x, p, training):
    """Per-sample stochastic depth: zero a whole residual branch for a random p of the samples, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)  # (B, 1, 1)
    return x * keep / (1.0 - p)


def drop_add_residual_stochastic_depth(x, residual_fn, p):
    """x + residual_fn(x) where the branch runs on a random subset of the batch only (the released "efficient"
    stochastic depth, used for rates above 0.1): the dropped samples cost no compute. The kept residuals are
    scaled by b/subset (not 1/(1-p)), which keeps the batch-mean of the update unbiased for this exact subset."""
    b = x.shape[0]
    subset = max(int(b * (1 - p)), 1)
    keep = torch.randperm(b, device=x.device)[:subset]  # (subset,)
    residual = residual_fn(x[keep])  # (subset, N, D)
    return torch.index_add(x, 0, keep, residual.to(x.dtype), alpha=b / subset)  # (B, N, D)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x))), each with drop path."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, ffn_layer="mlp", init_values=1e-5, drop_path_rate=0.0):
        super().__init__()
        ffn_class = {"mlp": Mlp, "swiglu": SwiGLUFFN, "swiglufused": SwiGLUFFN}.get(ffn_layer)
        if ffn_class is None:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; known: 'mlp', 'swiglu'")
        # Registration order = the released state-dict order: norm1, attn, ls1, norm2, mlp, ls2.
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ffn_class(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def attn_residual(self, x):
        return self.ls1(self.attn(self.norm1(x)))

    def ffn_residual(self, x):
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        p = self.drop_path_rate
        if self.training and p > 0.1:
            # Large rates: skip the compute of the dropped samples (released
            # `drop_add_residual_stochastic_depth`); attention and FFN draw their subsets independently.
            x = drop_add_residual_stochastic_depth(x, self.attn_residual, p)
            x = drop_add_residual_stochastic_depth(x, self.ffn_residual, p)
        else:
            x = x + drop_path(self.attn_residual(x), p, self.training)
            x = x + drop_path(self.ffn_residual(x), p, self.training)
        return x


# ----------------------------------------------------------------------------------------------------------------
# The model


def resample_pos_embed(pos_embed, grid_hw, interpolate_offset=0.1, interpolate_antialias=False):
    """Resize the square patch grid of a (1, 1+M*M, D) pos-embed to grid_hw = (h, w) with bicubic interpolation;
    the cls position is kept. Two modes, exactly as released (`interpolate_pos_encoding`):
      - offset > 0 (models without registers): scale_factor=((h+offset)/M, (w+offset)/M). The scale factor, not
        the size, sets the sampling positions, so this is NOT the same as size=(h, w) (a kludge from DINO v1).
      - offset == 0 (register models): size=(h, w), usually with antialias=True.
    Computed in float32, returned in the input dtype."""
    h, w = grid_hw
    dtype, D = pos_embed.dtype, pos_embed.shape[-1]
    pos_embed = pos_embed.float()
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]  # (1, 1, D), (1, M*M, D)
    M = int(math.sqrt(patch_pos.shape[1]))
    if M * M != patch_pos.shape[1]:
        raise ValueError(f"pos_embed holds {patch_pos.shape[1]} patch positions, not a square grid")
    grid = patch_pos.reshape(1, M, M, D).permute(0, 3, 1, 2)  # (1, D, M, M)
    if interpolate_offset:
        size_kw = dict(scale_factor=((h + interpolate_offset) / M, (w + interpolate_offset) / M))
    else:
        size_kw = dict(size=(h, w))
    grid = F.interpolate(grid, mode="bicubic", antialias=interpolate_antialias, **size_kw)  # (1, D, h, w)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, D)  # (1, h*w, D)
    return torch.cat((cls_pos, patch_pos), dim=1).to(dtype)  # (1, 1+h*w, D)


class VisionTransformer(nn.Module):
    """ViT backbone. Tokens are [cls, registers, patches]; cls and patches carry a learned position embedding,
    registers do not. `blocks` is a flat ModuleList so a trainer can wrap (fully_shard, checkpoint) each block."""

    def __init__(self, img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 ffn_layer="mlp", init_values=1e-5, drop_path_rate=0.0, num_register_tokens=0,
                 interpolate_antialias=False, interpolate_offset=0.1):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch_size}")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.n_blocks = depth
        self.num_register_tokens = num_register_tokens
        self.init_values = init_values
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        n_patches = (img_size // patch_size) ** 2  # the native grid; other sizes interpolate pos_embed

        # Parameters first (state-dict order cls_token, pos_embed, register_tokens, mask_token as released).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_patches, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # iBOT: replaces masked patch embeddings
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        # Uniform stochastic depth: every block gets the same rate (drop_path_uniform in the released configs).
        # NOTE(deviation): no BlockChunk grouping; chunked checkpoints are renamed at load time instead.
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, ffn_layer, init_values, drop_path_rate) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.grad_checkpointing = False  # see set_grad_checkpointing
        self.init_weights()

    def set_grad_checkpointing(self, enable=True):
        """Activation checkpointing: keep only each block's input in training and recompute the block in backward
        (about a third more compute for a fraction of the activation memory; what lets vit_g train at batch 12)."""
        self.grad_checkpointing = enable

    @torch.no_grad()
    def init_weights(self):
        """Initialise every parameter (so a model built on the meta device and moved with to_empty() is ready):
        pos_embed trunc-normal std 0.02; cls and register tokens normal std 1e-6; mask token zero; every Linear
        trunc-normal std 0.02 with zero bias (the +-2 truncation bounds are absolute, i.e. effectively none);
        LayerNorm (1, 0); LayerScale gamma = init_values; the patch-embed conv keeps PyTorch's default init."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.num_register_tokens:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        self.patch_embed.proj.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, LayerScale):
                m.gamma.fill_(m.init_values)

    def interpolate_pos_encoding(self, height, width):
        """The (1, 1+h*w, D) position embedding for an input of height x width pixels."""
        h, w = height // self.patch_size, width // self.patch_size
        if h * w == self.pos_embed.shape[1] - 1 and height == width:
            return self.pos_embed  # the native grid: no resampling (the released skip rule)
        # NOTE(deviation): the result is cast back to pos_embed's dtype, not to the tokens' dtype as released, so
        # under autocast the residual stream keeps one precision whatever the crop size. No effect in fp32.
        return resample_pos_embed(self.pos_embed, (h, w), self.interpolate_offset, self.interpolate_antialias)

    def prepare_tokens_with_masks(self, x, masks=None):
        """Images (B, 3, H, W) -> the tokens entering block 0, (B, 1+R+N, D)."""
        B, _, H, W = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            # Before the pos-embed, so a mask token still knows where it sits.
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)  # (B, N, D)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1+N, D)
        x = x + self.interpolate_pos_encoding(H, W)
        if self.num_register_tokens:
            # Registers go after cls and get no position embedding.
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)  # (B, 1+R+N, D)
        return x

    def forward_features(self, x, masks=None):
        """Images (B, 3, H, W) and an optional (B, N) bool patch mask (True = replace by mask_token) -> dict."""
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # non-reentrant: works under FSDP2 and torch.compile; the RNG is replayed, so drop path recomputes
                # the same subset
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x_norm = self.norm(x)  # (B, 1+R+N, D)
        R = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],  # (B, D)
            "x_norm_regtokens": x_norm[:, 1:R + 1],  # (B, R, D)
            "x_norm_patchtokens": x_norm[:, R + 1:],  # (B, N, D)
            "x_prenorm": x,  # (B, 1+R+N, D)
            "masks": masks,
        }

    def forward(self, x):
        """Images (B, 3, H, W) -> the normalised cls token (B, D): the image feature of the kNN / linear evals."""
        return self.forward_features(x)["x_norm_clstoken"]

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        """Outputs of the last n blocks (n an int) or of the blocks indexed by n (a list), final norm applied to
        each when norm=True, registers dropped. Returns a tuple of patch tokens (B, N, D), or (B, D, h, w) with
        reshape, or of (patch tokens, cls token (B, D)) pairs with return_class_token."""
        H, W = x.shape[-2:]
        take = range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else n
        take = set(i % len(self.blocks) for i in take)
        x = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            if i > max(take):
                break  # nothing asked for beyond here
            x = blk(x)
            if i in take:
                outputs.append(self.norm(x) if norm else x)
        R = self.num_register_tokens
        class_tokens = [out[:, 0] for out in outputs]  # each (B, D)
        outputs = [out[:, 1 + R:] for out in outputs]  # each (B, N, D)
        if reshape:
            h, w = H // self.patch_size, W // self.patch_size
            outputs = [out.reshape(out.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
                       for out in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    @torch.no_grad()
    def get_last_self_attention(self, x):
        """Softmax attention of the last block, (B, H, 1+R+N, 1+R+N), through the explicit attention path."""
        x = self.prepare_tokens_with_masks(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        return last.attn(last.norm1(x), return_attention=True)[1]

    def flops_per_image(self, height, width):
        """Forward FLOPs for one height x width image: 2 x multiply-adds of the patch-embed conv, every Linear and
        the two attention matmuls (q k^T and attn v). Norms, softmax, GELU and adds are left out (<1%)."""
        p, D = self.patch_size, self.embed_dim
        if height % p or width % p:
            raise ValueError(f"input size {height}x{width} is not a multiple of the patch size {p}")
        n_patches = (height // p) * (width // p)
        N = 1 + self.num_register_tokens + n_patches
        ffn_params = sum(m.weight.numel() for m in self.blocks[0].mlp.modules() if isinstance(m, nn.Linear))
        per_block = 2 * N * (4 * D * D + ffn_params) + 2 * 2 * N * N * D  # qkv + proj + ffn, then q k^T and attn v
        return 2 * n_patches * 3 * p * p * D + self.n_blocks * per_block


# ----------------------------------------------------------------------------------------------------------------
# Architectures (released `vits.vit_*`). Head dim 64 throughout; patch 14 for every released model.


def vit_tiny(**kwargs):
    # Not in the paper: a laptop-sized model for the default CPU run.
    return VisionTransformer(**{"embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs})


def vit_small(**kwargs):
    return VisionTransformer(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})


def vit_base(**kwargs):
    return VisionTransformer(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs})


def vit_large(**kwargs):
    return VisionTransformer(**{"embed_dim": 1024, "depth": 24, "num_heads": 16, **kwargs})


def vit_giant2(**kwargs):
    return VisionTransformer(**{"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn_layer": "swiglu", **kwargs})


ARCHS = {
    "vit_tiny": vit_tiny, "vit_t": vit_tiny,
    "vit_small": vit_small, "vit_s": vit_small,
    "vit_base": vit_base, "vit_b": vit_base,
    "vit_large": vit_large, "vit_l": vit_large,
    "vit_giant2": vit_giant2, "vit_g": vit_giant2,
}


def canonical_arch(name):
    """vit_s -> vit_small etc.; an unknown name is a ValueError that lists the known ones."""
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; known: {', '.join(sorted(ARCHS))}")
    return ARCHS[name].__name__


def build_model(arch, **kwargs):
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    return ARCHS[arch](**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Strict loading: every tensor of the model from the checkpoint, or an error that names what does not fit

ARCH_BY_WIDTH = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large", 1536: "vit_giant2"}


def load_pretrained(model, path_or_state_dict):
    """Load a checkpoint (any layout backbone_state_dict_from reads) into an existing model, strictly. pos_embed is
    resampled to the model's grid when the checkpoint was trained at another size (same formula as at run time). Any
    missing, unexpected or misshapen key stops the load with an error that names them."""
    from util.weights import _list_keys, backbone_state_dict_from  # file formats and layouts: the support package
    sd = backbone_state_dict_from(path_or_state_dict)
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape[-1] == model.pos_embed.shape[-1] and pos.shape[1] != model.pos_embed.shape[1]:
        M = int(math.sqrt(model.pos_embed.shape[1] - 1))
        sd["pos_embed"] = resample_pos_embed(pos, (M, M), model.interpolate_offset, model.interpolate_antialias)
    own = model.state_dict()
    missing = own.keys() - sd.keys()
    unexpected = sd.keys() - own.keys()
    misshapen = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in own.keys() & sd.keys() if sd[k].shape != own[k].shape)
    if missing or unexpected or misshapen:
        src = path_or_state_dict if isinstance(path_or_state_dict, (str, os.PathLike)) else "checkpoint"
        parts = [f"{src} does not fit the model"]
        D, D_own = sd["cls_token"].shape[-1], own["cls_token"].shape[-1]
        depth, depth_own = (len({k.split(".")[1] for k in d if k.startswith("blocks.")}) for d in (sd, own))
        if D != D_own:  # the usual cause: another arch (train.py --arch, or the wrong file)
            parts.append(f"It is a {ARCH_BY_WIDTH.get(D, f'width-{D}')} (width {D}), the model a "
                         f"{ARCH_BY_WIDTH.get(D_own, f'width-{D_own}')} (width {D_own}): use the checkpoint's arch")
        elif depth != depth_own:
            parts.append(f"It has {depth} blocks, the model {depth_own}: use the checkpoint's depth")
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_list_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_list_keys(unexpected)}")
        if misshapen:
            parts.append(f"shape mismatches ({len(misshapen)}): " + "; ".join(misshapen[:12])
                         + (f"; ... ({len(misshapen) - 12} more)" if len(misshapen) > 12 else ""))
        raise UserError(". ".join(parts))  # one line: the `error:` line of the scripts
    model.load_state_dict(sd, strict=True)
    return model
