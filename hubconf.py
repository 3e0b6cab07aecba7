"""torch.hub entry points with the released names and architectures (the paper's released models, §5; the released
hubconf.py / backbones.py): dinov2_vits14, dinov2_vitb14, dinov2_vitl14, dinov2_vitg14 and their 4-register variants,
dinov2_vit*14_reg.

    model = torch.hub.load("path/to/this/repo", "dinov2_vits14", source="local", weights="dinov2_vits14.pth")

weights: a path to any checkpoint util.weights.from_pretrained reads (a hub .pth such as train.py's
teacher_backbone.pth, a Hugging Face folder or .safetensors file, a timm file), or a state dict. Nothing is downloaded
(this repository never fetches weights), so pretrained=True without weights is an error that says so;
pretrained=False gives a random init. Other keyword arguments go to vit.VisionTransformer (e.g. img_size=224).
"""
# torch.hub looks for a file of this name at the repository root and lists every public callable in it as an entry
# point: every other name here is private.
import os as _os

from util.cli import UserError as _UserError
from util.weights import backbone_state_dict_from as _backbone_state_dict_from
from vit import build_model as _build_model, load_pretrained as _load_pretrained

dependencies = ["torch"]

_ENTRY_POINTS = {f"dinov2_vit{s}14{'_reg' if reg else ''}": (arch, reg)  # name -> (arch, 4 registers?)
                 for s, arch in (("s", "vit_small"), ("b", "vit_base"), ("l", "vit_large"), ("g", "vit_giant2"))
                 for reg in (False, True)}


def _hub_model(name, *, pretrained=True, weights=None, **kwargs):
    """The released configuration of entry point `name` (img_size 518, patch 14, LayerScale; 4 registers with the
    size-based, antialiased pos-embed interpolation for the _reg models), then `weights` loaded strictly."""
    arch, registers = _ENTRY_POINTS[name]
    if pretrained and weights is None:
        raise _UserError(f"{name}: pretrained weights are never downloaded by this repository; pass "
                         f"weights=PATH (a hub .pth, a Hugging Face folder, a timm file), or pretrained=False for a "
                         f"random init")
    if not pretrained and weights is not None:
        raise _UserError(f"{name}: weights={weights!r} with pretrained=False; drop one of the two")
    released = dict(img_size=518, patch_size=14, init_values=1.0, num_register_tokens=4 if registers else 0,
                    interpolate_antialias=registers, interpolate_offset=0.0 if registers else 0.1)
    if weights is None:
        return _build_model(arch, **{**released, **kwargs})
    if isinstance(weights, (str, _os.PathLike)) and not _os.path.exists(weights):
        # the released entry points take a dataset name here (weights="LVD142M") and download; this one reads files
        raise _UserError(f"{name}: weights={weights!r} is not a file or folder; weights= takes a checkpoint path")
    sd = _backbone_state_dict_from(weights)
    # The checkpoint's own grid unless img_size is given: a 224-px checkpoint then runs as trained, instead of
    # having its pos_embed resampled to the released 37x37 grid (the released entry points need img_size=224).
    grid = int((sd["pos_embed"].shape[1] - 1) ** 0.5)
    released["img_size"] = grid * sd["patch_embed.proj.weight"].shape[-1]
    return _load_pretrained(_build_model(arch, **{**released, **kwargs}), sd)


# One line each, so that torch.hub.list() finds them by name.
def dinov2_vits14(**kwargs): return _hub_model("dinov2_vits14", **kwargs)  # noqa: E704
def dinov2_vitb14(**kwargs): return _hub_model("dinov2_vitb14", **kwargs)  # noqa: E704
def dinov2_vitl14(**kwargs): return _hub_model("dinov2_vitl14", **kwargs)  # noqa: E704
def dinov2_vitg14(**kwargs): return _hub_model("dinov2_vitg14", **kwargs)  # noqa: E704
def dinov2_vits14_reg(**kwargs): return _hub_model("dinov2_vits14_reg", **kwargs)  # noqa: E704
def dinov2_vitb14_reg(**kwargs): return _hub_model("dinov2_vitb14_reg", **kwargs)  # noqa: E704
def dinov2_vitl14_reg(**kwargs): return _hub_model("dinov2_vitl14_reg", **kwargs)  # noqa: E704
def dinov2_vitg14_reg(**kwargs): return _hub_model("dinov2_vitg14_reg", **kwargs)  # noqa: E704
