"""torch.hub entry points with the released names and architectures (the released hubconf.py / backbones.py):
dinov2_vits14, dinov2_vitb14, dinov2_vitl14, dinov2_vitg14 and their 4-register variants, dinov2_vit*14_reg.

    model = torch.hub.load("path/to/this/repo", "dinov2_vits14", source="local", weights="dinov2_vits14.pth")

weights: a path to any checkpoint vit.from_pretrained reads (a hub .pth such as train.py's teacher_backbone.pth, a
Hugging Face folder or .safetensors file, a timm file). Nothing is downloaded (this repository never fetches
weights), so pretrained=True without weights is an error that says so; pretrained=False gives a random init.
Other keyword arguments go to vit.VisionTransformer (e.g. img_size=224, depth=2).
"""
import os

import vit

dependencies = ["torch"]


def _make(arch, registers, pretrained, weights, kwargs, name):
    """The released configuration of `arch` (img_size 518, patch 14, LayerScale; 4 registers with the size-based,
    antialiased pos-embed interpolation for the _reg models), then the weights loaded strictly."""
    if pretrained and weights is None:
        raise ValueError(f"{name}: pretrained weights are never downloaded by this repository; pass "
                         f"weights=PATH (a hub .pth, a Hugging Face folder, a timm file), or pretrained=False for a "
                         f"random init")
    if not pretrained and weights is not None:
        raise ValueError(f"{name}: weights={weights!r} with pretrained=False; drop one of the two")
    released = dict(img_size=518, patch_size=14, init_values=1.0, num_register_tokens=4 if registers else 0,
                    interpolate_antialias=registers, interpolate_offset=0.0 if registers else 0.1)
    if weights is None:
        return vit.build_model(arch, **{**released, **kwargs})
    if isinstance(weights, (str, os.PathLike)) and not os.path.exists(weights):
        # the released entry points take a dataset name here (weights="LVD142M") and download; this one reads files
        raise ValueError(f"{name}: weights={weights!r} is not a file or folder; weights= takes a checkpoint path")
    sd = vit.backbone_state_dict_from(weights)
    # The checkpoint's own grid unless img_size is given: a 224-px checkpoint then runs as trained, instead of
    # having its pos_embed resampled to the released 37x37 grid (the released entry points need img_size=224).
    grid = int((sd["pos_embed"].shape[1] - 1) ** 0.5)
    released["img_size"] = grid * sd["patch_embed.proj.weight"].shape[-1]
    return vit.load_pretrained(vit.build_model(arch, **{**released, **kwargs}), sd)


def dinov2_vits14(*, pretrained=True, weights=None, **kwargs):
    """ViT-S/14: 384 wide, 12 blocks, 6 heads (21M parameters)."""
    return _make("vit_small", False, pretrained, weights, kwargs, "dinov2_vits14")


def dinov2_vitb14(*, pretrained=True, weights=None, **kwargs):
    """ViT-B/14: 768 wide, 12 blocks, 12 heads (86M parameters)."""
    return _make("vit_base", False, pretrained, weights, kwargs, "dinov2_vitb14")


def dinov2_vitl14(*, pretrained=True, weights=None, **kwargs):
    """ViT-L/14: 1024 wide, 24 blocks, 16 heads (300M parameters)."""
    return _make("vit_large", False, pretrained, weights, kwargs, "dinov2_vitl14")


def dinov2_vitg14(*, pretrained=True, weights=None, **kwargs):
    """ViT-g/14: 1536 wide, 40 blocks, 24 heads, SwiGLU FFN (1.1B parameters)."""
    return _make("vit_giant2", False, pretrained, weights, kwargs, "dinov2_vitg14")


def dinov2_vits14_reg(*, pretrained=True, weights=None, **kwargs):
    """ViT-S/14 with 4 register tokens."""
    return _make("vit_small", True, pretrained, weights, kwargs, "dinov2_vits14_reg")


def dinov2_vitb14_reg(*, pretrained=True, weights=None, **kwargs):
    """ViT-B/14 with 4 register tokens."""
    return _make("vit_base", True, pretrained, weights, kwargs, "dinov2_vitb14_reg")


def dinov2_vitl14_reg(*, pretrained=True, weights=None, **kwargs):
    """ViT-L/14 with 4 register tokens."""
    return _make("vit_large", True, pretrained, weights, kwargs, "dinov2_vitl14_reg")


def dinov2_vitg14_reg(*, pretrained=True, weights=None, **kwargs):
    """ViT-g/14 with 4 register tokens."""
    return _make("vit_giant2", True, pretrained, weights, kwargs, "dinov2_vitg14_reg")
