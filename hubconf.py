"""torch.hub entry points with the released names and architectures (the released hubconf.py / backbones.py):
dinov2_vits14, dinov2_vitb14, dinov2_vitl14, dinov2_vitg14 and their 4-register variants, dinov2_vit*14_reg.

    model = torch.hub.load("path/to/this/repo", "dinov2_vits14", source="local", weights="dinov2_vits14.pth")

weights: a path to any checkpoint util.weights.from_pretrained reads (a hub .pth such as train.py's
teacher_backbone.pth, a
Hugging Face folder or .safetensors file, a timm file). Nothing is downloaded (this repository never fetches
weights), so pretrained=True without weights is an error that says so; pretrained=False gives a random init.
Other keyword arguments go to vit.VisionTransformer (e.g. img_size=224, depth=2).
"""
# torch.hub looks for a file of this name at the repository root; the entry points themselves live in util/weights.py
# (hub_model), beside the rest of the weight loading. One line each, so that torch.hub.list() finds them by name.
from util import weights as _weights  # private: torch.hub lists every public callable here

dependencies = ["torch"]


def dinov2_vits14(**kwargs): return _weights.hub_model("dinov2_vits14", **kwargs)  # noqa: E704
def dinov2_vitb14(**kwargs): return _weights.hub_model("dinov2_vitb14", **kwargs)  # noqa: E704
def dinov2_vitl14(**kwargs): return _weights.hub_model("dinov2_vitl14", **kwargs)  # noqa: E704
def dinov2_vitg14(**kwargs): return _weights.hub_model("dinov2_vitg14", **kwargs)  # noqa: E704
def dinov2_vits14_reg(**kwargs): return _weights.hub_model("dinov2_vits14_reg", **kwargs)  # noqa: E704
def dinov2_vitb14_reg(**kwargs): return _weights.hub_model("dinov2_vitb14_reg", **kwargs)  # noqa: E704
def dinov2_vitl14_reg(**kwargs): return _weights.hub_model("dinov2_vitl14_reg", **kwargs)  # noqa: E704
def dinov2_vitg14_reg(**kwargs): return _weights.hub_model("dinov2_vitg14_reg", **kwargs)  # noqa: E704
