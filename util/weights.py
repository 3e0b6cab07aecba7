"""DINOv2 weights as files: any checkpoint read, the same tensors in the released, Hugging Face and timm layouts.

The paper's models (ViT-g and the ViT-S/B/L distilled from it, §5) are released as torch.hub backbones, and
transformers and timm carry the same weights under other names: their layouts here are tables of names and a few
reshapes (neither library is imported), read into the hub layout of vit.py and written back.

    read_checkpoint                     a torch / .safetensors file or a Hugging Face folder -> tensors, or why not
    LAYOUTS, checkpoint_layout          which layout a state dict is in
    hub_to_hf, hf_to_hub                the released hub names <-> transformers' Dinov2Model / ...WithRegisters
    hub_to_timm, timm_to_hub            the released hub names <-> timm's vit_*_patch14_dinov2
    hf_config, timm_create_call         the config.json / timm.create_model call that fits a state dict
    export                              a backbone written in one layout (hubconf.py: the torch.hub entry points)
    backbone_state_dict_from            any checkpoint, wrapped or prefixed, -> the backbone in the hub layout
    from_pretrained                     the model a checkpoint describes, loaded
    Config, main                        the command line: a checkpoint converted to another layout

Run: python -m util.weights teacher_backbone.pth --to hf --out dinov2-hf   (or --convert IN; --help lists the flags)
"""
import json
import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from util import cli
from util.checkpoint import atomic_save, atomic_write, atomic_write_text
from util.cli import MissingFile, UserError, arg
from vit import ARCH_BY_WIDTH, build_model, canonical_arch, load_pretrained


def _list_keys(keys, limit=12):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoint files: torch files, .safetensors files and Hugging Face folders


def _safetensors(why=""):
    """safetensors.torch, an optional package (.safetensors files need it). Without it: None, or with `why` given an
    ImportError that names the package."""
    try:
        import safetensors.torch
        return safetensors.torch
    except ImportError:
        if why:
            raise ImportError(f"{why} needs the safetensors package, which is not installed: pip install "
                              f"safetensors") from None


def _read_hf_folder(folder):
    """A Hugging Face model folder (what save_pretrained writes: config.json + model.safetensors or pytorch_model.bin,
    sharded or not) -> its state dict. config.json must describe a DINOv2 with 64-dim heads (every arch here)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} is a folder without config.json, so not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} is not valid JSON ({e})") from None
    config = config if isinstance(config, dict) else {}
    if config.get("model_type") not in ("dinov2", "dinov2_with_registers"):
        raise UserError(f"{config_path}: model_type {config.get('model_type')!r} is not a DINOv2 model "
                        "('dinov2' or 'dinov2_with_registers')")
    D, H = config.get("hidden_size"), config.get("num_attention_heads")
    if not D or not H or H * 64 != D:
        raise UserError(f"{config_path}: {H} attention heads for width {D}; the archs here have heads of 64 dims")
    present = [name for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                 "pytorch_model.bin.index.json") if (folder / name).is_file()]
    if not present:
        raise UserError(f"{folder}: config.json but no weights (model.safetensors, pytorch_model.bin or a sharded "
                        f".index.json); the folder holds: {_list_keys(p.name for p in folder.iterdir())}")
    if _safetensors() is None:  # without the package, the torch files of a folder that has both (hub repos often do)
        present = [name for name in present if "safetensors" not in name] or present
    path = folder / present[0]
    if not path.name.endswith(".index.json"):
        return read_checkpoint(path)
    shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))  # {tensor name: shard file name}
    return {k: v for shard in shards for k, v in read_checkpoint(folder / shard).items()}


def _what_is_wrong(path, err) -> str:
    """Why torch.load could not read `path`, in words a user can act on (never torch's advice to unpickle code)."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (an interrupted download or copy?)"
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip container
        if isinstance(err, pickle.UnpicklingError):  # the weights_only unpickler refused an object
            return ("it holds pickled Python objects besides tensors (a whole model or optimizer object?), which are "
                    "never unpickled here because unpickling runs code; save its state_dict() instead")
        return f"the file is corrupt or truncated ({size:,} bytes; an interrupted download, copy or save?)"
    if head[:1] == b"\x80":  # a pickle protocol byte: torch.save's legacy format or a plain pickle
        return f"the file is a corrupt, truncated or non-tensor pickle ({type(err).__name__})"
    try:
        head.decode("utf-8")
        return "it is a text file, not a checkpoint"
    except UnicodeDecodeError:
        return "it is not a PyTorch checkpoint (.pth/.pt/.bin), a .safetensors file or a Hugging Face folder"


def read_checkpoint(path, mmap=False):
    """What a path holds, on the CPU (torch.load with weights_only=True for .pth/.pt/.bin; mmap: map the tensors, for
    big files), or a UserError that names the file and what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise MissingFile(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / ".metadata").is_file():  # torch.distributed.checkpoint: what train.py writes as ckpt_<step>
            raise UserError(f"{path} is a training checkpoint folder (optimizer and all), not a weights file: pass "
                            f"the run's teacher_backbone.pth (backbone) or teacher.pth (backbone + heads), which "
                            f"train.py exports beside it (rerun the same train.py command to rebuild them)")
        return _read_hf_folder(path)
    if path.suffix == ".safetensors":
        st = _safetensors(f"reading {path}")
        try:
            return st.load_file(str(path), device="cpu")
        except Exception as e:  # safetensors' own header and size checks (SafetensorError is an Exception)
            raise UserError(f"could not read {path}: the .safetensors file is corrupt or truncated ({e})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # not a torch file, truncated, or pickled objects beyond tensors: one clear line
        raise UserError(f"could not read {path} as a checkpoint: {_what_is_wrong(path, e)}") from e


# ----------------------------------------------------------------------------------------------------------------
# The same weights in the layouts of Hugging Face transformers and timm. Every name below is a fact of those
# libraries' modules (transformers' modeling_dinov2.py / modeling_dinov2_with_registers.py and the released-to-HF
# script convert_dinov2_to_hf.py; timm's vision_transformer.py and its _convert_dinov2), none of which is imported.

# hub name -> transformers' Dinov2Model / Dinov2WithRegistersModel name; a key is the name or a prefix of it.
_HF_TOP = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
           "pos_embed": "embeddings.position_embeddings", "register_tokens": "embeddings.register_tokens",
           "patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"}
# inside a block, blocks.<i>.<hub name> <-> encoder.layer.<i>.<HF name>. attn.qkv is handled apart (_HF_PARTS).
_HF_BLOCK = {"norm1": "norm1", "attn.proj": "attention.output.dense", "ls1.gamma": "layer_scale1.lambda1",
             "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.w12": "mlp.weights_in",
             "mlp.w3": "mlp.weights_out", "ls2.gamma": "layer_scale2.lambda1"}
# Reading also takes transformers 5's names: its SwiGLU is Llama-style (gate_proj = the gated half x1 of w12, up_proj
# = x2, down_proj = w3); q/k/v/o_proj, the attention names of its other refactored vision models (DINOv3), in case
# its DINOv2 adopts them. Export writes the 4.x names, which 5.x reads too (the DINOv2 files on the hub carry them).
_HF_BLOCK_READ = {**{hf: hub for hub, hf in _HF_BLOCK.items()}, "attention.o_proj": "attn.proj",
                  "mlp.down_proj": "mlp.w3"}
# HF name -> (hub name, index, count): row blocks of one hub tensor, on dim 0; attn.qkv's rows are [q; k; v].
_HF_PARTS = {"attention.attention.query": ("attn.qkv", 0, 3), "attention.attention.key": ("attn.qkv", 1, 3),
             "attention.attention.value": ("attn.qkv", 2, 3), "attention.q_proj": ("attn.qkv", 0, 3),
             "attention.k_proj": ("attn.qkv", 1, 3), "attention.v_proj": ("attn.qkv", 2, 3),
             "mlp.gate_proj": ("mlp.w12", 0, 2), "mlp.up_proj": ("mlp.w12", 1, 2)}

LAYOUTS = ("the released hub layout (cls_token, pos_embed, mask_token, patch_embed.proj.*, blocks.<i>.*, norm.*); "
           "transformers' Dinov2Model / Dinov2WithRegistersModel (embeddings.*, encoder.layer.<i>.*, layernorm.*, "
           "maybe under dinov2.); timm's vit_*_patch14_dinov2 (cls_token, reg_token, pos_embed, blocks.<i>.*, "
           "no mask_token)")
_VIT_KEYS = {"cls_token", "pos_embed", "patch_embed.proj.weight"}  # what every layout has, in hub names


def _rename(name, table):
    """name with its longest table key (the whole name, or a prefix followed by '.') replaced; None if none fits."""
    for old in sorted(table, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return table[old] + name[len(old):]
    return None


def _block_ids(sd):
    return sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})


def _packed_swiglu(sd, i):
    """Whether timm block i's FFN is its packed SwiGLU: fc2 reads half of fc1's outputs (an MLP's fc2 reads all)."""
    fc1, fc2 = sd.get(f"blocks.{i}.mlp.fc1.weight"), sd.get(f"blocks.{i}.mlp.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def _with_layerscale(sd):
    """sd plus an identity LayerScale (gamma of ones) where none is: transformers' and timm's blocks always have one."""
    out, D = dict(sd), sd["cls_token"].shape[-1]
    for i in _block_ids(sd):
        for name in ("ls1.gamma", "ls2.gamma"):
            out.setdefault(f"blocks.{i}.{name}", torch.ones(D, dtype=sd["cls_token"].dtype))
    return out


def checkpoint_layout(sd):
    """The layout of a state dict, told by its keys: 'hf', 'timm' or 'hub'; None if it is none of them. timm's layout
    differs from the hub's in details only, so any of them decides: reg_token, no mask_token, a packed SwiGLU."""
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in sd):
        return "hf"
    if not _VIT_KEYS <= sd.keys():
        return None
    if "reg_token" in sd or "mask_token" not in sd or _packed_swiglu(sd, 0):
        return "timm"
    return "hub"


def hub_to_hf(sd):
    """Hub layout -> transformers' Dinov2Model (...WithRegistersModel) layout; attn.qkv cut into query, key, value."""
    out = {}
    for k, v in _with_layerscale(sd).items():
        block = re.match(r"blocks\.(\d+)\.(.+)", k)
        if block and block[2].startswith("attn.qkv."):
            param = block[2].rsplit(".", 1)[1]  # weight (3D, D) or bias (3D,)
            for name, rows in zip(("query", "key", "value"), v.chunk(3, dim=0)):  # each (D, D) or (D,)
                # a copy: views of one tensor would share storage, which safetensors refuses to write
                out[f"encoder.layer.{block[1]}.attention.attention.{name}.{param}"] = rows.clone()
            continue
        new = _rename(block[2], _HF_BLOCK) if block else _rename(k, _HF_TOP)
        if new is None:
            raise ValueError(f"{k} is not a name of the hub layout, so it has no Hugging Face name")
        out[f"encoder.layer.{block[1]}.{new}" if block else new] = v
    return out


def hf_to_hub(sd):
    """The inverse of hub_to_hf (4.x or 5.x names, dinov2. prefix removed). A checkpoint without mask token
    (use_mask_token=False) gets a zero one: it only replaces masked patches in iBOT training, never at inference."""
    out, parts, unknown = {}, {}, []
    for k, v in sd.items():
        block = re.match(r"encoder\.layer\.(\d+)\.(.+)", k)
        stem, _, param = (block[2] if block else k).rpartition(".")
        if block and stem in _HF_PARTS:
            hub_name, index, count = _HF_PARTS[stem]
            parts.setdefault((f"blocks.{block[1]}.{hub_name}.{param}", count), {})[index] = v
            continue
        new = _rename(block[2], _HF_BLOCK_READ) if block else _rename(k, {hf: hub for hub, hf in _HF_TOP.items()})
        if new is None:
            unknown.append(k)
        else:
            out[f"blocks.{block[1]}.{new}" if block else new] = v
    if unknown:
        raise ValueError(f"a Hugging Face layout (embeddings.*, encoder.layer.<i>.*) but not a DINOv2: "
                         f"{len(unknown)} keys that no DINOv2 module has: {_list_keys(unknown)}")
    for (key, count), got in parts.items():
        if sorted(got) != list(range(count)):
            raise ValueError(f"{key}: the checkpoint holds {len(got)} of its {count} parts")
        out[key] = torch.cat([got[j] for j in range(count)], dim=0)  # (count * rows, ...)
    if "mask_token" not in out and "cls_token" in out:
        out["mask_token"] = out["cls_token"].new_zeros(1, out["cls_token"].shape[-1])  # (1, D)
    return out


def hub_to_timm(sd):
    """Hub layout -> timm's vit_*_patch14_(reg4_)dinov2, as timm converts the released files: w12/w3 -> fc1/fc2
    (its SwiGLUPacked gates the first half of fc1 too); no mask_token; with registers, reg_token, and the cls position
    folded into cls_token, since those models (no_embed_class) give position embeddings to the patches only."""
    registers = "register_tokens" in sd
    out = {}
    for k, v in _with_layerscale(sd).items():
        if k == "mask_token":
            continue
        if registers and k == "cls_token":
            v = v + sd["pos_embed"][:, :1]  # (1, 1, D)
        elif registers and k == "pos_embed":
            v = v[:, 1:].clone()  # (1, N, D); a copy so that a save does not carry the dropped row along
        k = "reg_token" if k == "register_tokens" else k
        out[re.sub(r"^(blocks\.\d+\.mlp\.)w(12|3)\.", lambda m: m[1] + ("fc1." if m[2] == "12" else "fc2."), k)] = v
    return out


def timm_to_hub(sd):
    """The inverse of hub_to_timm. A pos_embed without cls position (no_embed_class) gets a zero one and cls_token,
    which holds it, stays: block 0 then sees exactly timm's tokens, at every input size. The missing mask token is
    zeros (it only replaces masked patches in iBOT training, never at inference)."""
    D = sd["cls_token"].shape[-1]
    out = {}
    for k, v in sd.items():
        if k == "pos_embed" and math.isqrt(v.shape[1]) ** 2 == v.shape[1]:
            v = torch.cat((v.new_zeros(1, 1, D), v), dim=1)  # (1, 1+N, D)
        k = "register_tokens" if k == "reg_token" else k
        ffn = re.match(r"blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)$", k)
        if ffn and _packed_swiglu(sd, ffn[1]):
            k = f"blocks.{ffn[1]}.mlp.{'w12' if ffn[2] == '1' else 'w3'}.{ffn[3]}"
        out[k] = v
    out.setdefault("mask_token", sd["cls_token"].new_zeros(1, D))  # (1, D)
    return out


def _describe(sd):
    """(arch, width, depth, registers, native img_size, patch size) of a hub-layout state dict."""
    D, p = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
    return (ARCH_BY_WIDTH.get(D, "?"), D, len(_block_ids(sd)),
            sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
            math.isqrt(sd["pos_embed"].shape[1] - 1) * p, p)


def hf_config(sd):
    """config.json (the fields of Dinov2Config / Dinov2WithRegistersConfig) for a hub-layout state dict."""
    _, D, depth, R, img_size, p = _describe(sd)
    swiglu = "blocks.0.mlp.w12.weight" in sd
    # transformers sizes its SwiGLU from mlp_ratio by the released rule (as SwiGLUFFN here); ratio 4 is ViT-g's
    if swiglu and (int(D * 4 * 2 / 3) + 7) // 8 * 8 != sd["blocks.0.mlp.w3.weight"].shape[1]:
        raise ValueError(f"SwiGLU hidden width {sd['blocks.0.mlp.w3.weight'].shape[1]} is not the one "
                         f"transformers derives from mlp_ratio 4 at width {D}")
    mlp_ratio = 4.0 if swiglu else sd["blocks.0.mlp.fc1.weight"].shape[0] / D
    mlp_ratio = int(mlp_ratio) if mlp_ratio.is_integer() else mlp_ratio
    config = {
        "architectures": ["Dinov2WithRegistersModel" if R else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if R else "dinov2",
        "hidden_size": D, "num_hidden_layers": depth, "num_attention_heads": D // 64,  # heads of 64 dims throughout
        "mlp_ratio": mlp_ratio, "use_swiglu_ffn": swiglu, "hidden_act": "gelu",  # exact (erf) GELU, as nn.GELU
        "layer_norm_eps": 1e-6, "image_size": img_size, "patch_size": p, "num_channels": 3, "qkv_bias": True,
        "layerscale_value": 1.0, "drop_path_rate": 0.0, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02, "torch_dtype": str(sd["cls_token"].dtype).removeprefix("torch."),
    }
    config.update({"num_register_tokens": R} if R else {"use_mask_token": True})
    return config


def timm_create_call(sd):
    """The timm.create_model(...) call whose model loads hub_to_timm(sd) with strict=True (for the FFN each arch
    has by default: MLP ratio 4, SwiGLU for ViT-g). timm has no tiny DINOv2: its small one, at width 192 and 3 heads."""
    arch, D, depth, R, img_size, p = _describe(sd)
    size, timm_width, timm_depth = {"vit_base": ("base", 768, 12), "vit_large": ("large", 1024, 24),
                                    "vit_giant2": ("giant", 1536, 40)}.get(arch, ("small", 384, 12))
    args = [repr(f"vit_{size}_patch14_{'reg4_' if R else ''}dinov2"), "num_classes=0", f"img_size={img_size}"]
    args += [f"embed_dim={D}", f"num_heads={D // 64}"] if D != timm_width else []
    args += [f"depth={depth}"] if depth != timm_depth else []
    args += [f"reg_tokens={R}"] if R not in (0, 4) else []
    args += [f"patch_size={p}"] if p != 14 else []
    return f"timm.create_model({', '.join(args)})"


# ----------------------------------------------------------------------------------------------------------------
# Writing a backbone in a layout

def export(src, out, to="hub"):
    """Write a backbone (a VisionTransformer, or what from_pretrained reads) in layout `to` and return what was
    written and how to load it. hub: a .pth the released code loads; hf: a folder, config.json + model.safetensors
    (needs safetensors); timm: a .pth for vit_*_patch14_dinov2 (reg4), see timm_create_call."""
    if to not in ("hub", "hf", "timm"):
        raise ValueError(f"unknown layout {to!r}; known: 'hub', 'hf', 'timm'")
    model = src if isinstance(src, torch.nn.Module) else from_pretrained(src)  # strict: only whole backbones written
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = Path(out)
    if to == "hf":
        st = _safetensors(f"writing {out / 'model.safetensors'}")  # before anything is written
        atomic_write(out / "model.safetensors",
                     lambda tmp: st.save_file(hub_to_hf(sd), str(tmp), metadata={"format": "pt"}))
        config = hf_config(sd)
        atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
        load = f"model = transformers.{config['architectures'][0]}.from_pretrained({str(out)!r})"
    else:
        atomic_save(hub_to_timm(sd) if to == "timm" else sd, out)
        load = (f"model = {timm_create_call(sd)}; model.load_state_dict(torch.load({str(out)!r}))" if to == "timm"
                else f"model = util.weights.from_pretrained({str(out)!r})")
    arch, _, depth, R, img_size, _ = _describe(sd)
    return (f"wrote {out} ({to} layout): {arch}, {depth} blocks, {R} registers, native grid {img_size} px\n"
            f"load with: {load}")


# ----------------------------------------------------------------------------------------------------------------
# Loading checkpoints into this model: any of the layouts above, the released training layout, our own files


def backbone_state_dict_from(obj):
    """A path (anything read_checkpoint reads) or a loaded object in any layout, wrapper or prefix below -> the backbone
    state dict in the hub layout; head keys (dino_head., ibot_head., an HF classifier) and loss centers left out."""
    if isinstance(obj, (str, os.PathLike)):
        try:
            return backbone_state_dict_from(read_checkpoint(obj))
        except UserError as e:  # name the file, once
            if str(obj) in str(e):
                raise
            raise type(e)(f"{obj}: {e}") from None
    wrappers = ("teacher", "model", "student", "backbone", "state_dict")  # {"teacher": sd} and the like
    while isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) for k in wrappers):  # possibly nested
        obj = next(obj[k] for k in wrappers if isinstance(obj.get(k), Mapping))
    if not isinstance(obj, Mapping):
        raise UserError(f"expected a state dict, got {type(obj).__name__}")
    # torch.compile and activation-checkpoint wrappers add a name segment wherever they wrap (root or block)
    sd = {k.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): v
          for k, v in obj.items() if torch.is_tensor(v)}
    # DDP's module., flat teacher. / student. owners, backbone., the HF task models' dinov2. / dinov2_with_registers.
    for prefix in ("module.", "teacher.", "student.", "model.", "module.", "backbone.", "dinov2.",
                   "dinov2_with_registers."):
        if any(k.startswith(prefix) for k in sd):  # keep only those keys, the prefix removed
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if not k.startswith(("dino_head.", "ibot_head."))}
    # Released training layout: blocks.<chunk>.<global index>.<rest> -> blocks.<global index>.<rest>
    sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}
    layout = checkpoint_layout(sd)
    converted = {"hub": dict, "hf": hf_to_hub, "timm": timm_to_hub}[layout](sd) if layout else {}
    if not _VIT_KEYS <= converted.keys():
        raise UserError(f"not a ViT backbone state dict. Layouts tried: {LAYOUTS}. "
                        f"Found {len(sd)} tensors: {_list_keys(sd.keys())}")
    return converted


def describe(path, given=None):
    """The backbone a checkpoint holds, as train.py's Config fields (what --init-from fills in): arch, depth,
    patch_size, num_registers, ffn, img_size (the native grid in pixels). A flag in `given` (the command line's)
    that contradicts the file is a UserError naming both."""
    sd = backbone_state_dict_from(path)
    arch, D, depth, registers, img_size, patch_size = _describe(sd)
    if D not in ARCH_BY_WIDTH:
        raise UserError(f"no known arch has width {D}; known widths: {ARCH_BY_WIDTH}")
    shape = dict(arch=arch, depth=depth, patch_size=patch_size, num_registers=registers,
                 ffn="swiglu" if "blocks.0.mlp.w12.weight" in sd else "mlp", img_size=img_size)
    for name, value in shape.items():
        mine = (given or {}).get(name)
        if mine not in (None, value) and (canonical_arch(mine) if name == "arch" else mine or value) != value:
            raise UserError(f"{cli.flag(name)} {mine} contradicts --init-from {path}, which holds a {arch} with "
                            f"{name} {value}: drop the flag, or pass other weights")
    return shape


def from_pretrained(path_or_state_dict, **overrides):
    """The model a checkpoint (anything backbone_state_dict_from reads) describes, loaded: eval mode, CPU, fp32. Its
    tensors give every VisionTransformer argument; `overrides` (e.g. img_size=224) win."""
    sd = backbone_state_dict_from(path_or_state_dict)
    arch, D, depth, registers, img_size, patch_size = _describe(sd)
    if D not in ARCH_BY_WIDTH:
        raise UserError(f"no known arch has width {D}; known widths: {ARCH_BY_WIDTH}")
    kwargs = dict(patch_size=patch_size, img_size=img_size, depth=depth,
                  init_values=1.0 if "blocks.0.ls1.gamma" in sd else None)  # a placeholder the loaded gamma overwrites
    if "blocks.0.mlp.w12.weight" in sd:
        kwargs["ffn_layer"] = "swiglu"
    elif "blocks.0.mlp.fc1.weight" in sd:
        kwargs.update(ffn_layer="mlp", mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D)
    # NOTE(deviation): weights from transformers or timm are resampled to other input sizes by the released rule
    # (0.1 offset without registers; size-based with antialias for register models), not by theirs (by size, no 0.1
    # offset, their own antialias choice). So away from the native grid features follow the released code, not those
    # libraries; at the native grid nothing is resampled and all agree.
    if registers:
        kwargs.update(num_register_tokens=registers, interpolate_antialias=True, interpolate_offset=0.0)
    kwargs.update(overrides)
    with torch.device("meta"):  # no time spent initialising weights that are about to be overwritten
        model = build_model(arch, **kwargs)
    model.to_empty(device="cpu")
    return load_pretrained(model, sd).eval()


# ----------------------------------------------------------------------------------------------------------------
# Command line: a checkpoint converted to another layout


@dataclass
class Config:
    src: list[str] = arg([], "the checkpoint to convert (any file or folder from_pretrained reads)")
    convert: str = arg("", "the same, as a flag: --convert IN")
    to: str = arg("hub", "the layout written: hub (.pth), hf (folder: config.json + model.safetensors), timm (.pth)",
                  check=("hub", "hf", "timm"))
    out: str = arg("", "where it is written: a .pth file (hub, timm) or a folder (hf)")

    def __post_init__(self):
        cli.check_fields(self)
        if len(self.src) + bool(self.convert) != 1:
            raise ValueError("one checkpoint to convert: IN or --convert IN")
        if not self.out:
            raise ValueError("converting needs --out: a .pth file for --to hub or timm, a folder for --to hf")


def main(argv=None):
    cfg = cli.parse(Config, argv, "Convert a DINOv2 checkpoint to another layout: IN --to hub|hf|timm --out OUT.",
                    positional=("src",))
    try:
        print(export(cfg.convert or cfg.src[0], cfg.out, cfg.to))  # a missing IN: read_checkpoint's MissingFile
    except ImportError as e:  # a missing optional package (safetensors) is the user's to install
        raise UserError(str(e)) from None


if __name__ == "__main__":
    cli.run(main)
