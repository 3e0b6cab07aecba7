"""DINOv2 weights as files: reading any checkpoint file, and the same tensors in the released, Hugging Face and timm
layouts.

vit.py's loaders (from_pretrained, load_pretrained, export) read and write through this file; nothing here builds a
model or imports transformers or timm: the layouts are tables of names and a few reshapes.

    read_checkpoint                     a torch file, a .safetensors file or a Hugging Face folder -> its tensors,
                                        with an error that says what is wrong with a file that is not one
    LAYOUTS, checkpoint_layout          which layout a state dict is in
    hub_to_hf, hf_to_hub                the released hub names <-> transformers' Dinov2Model / ...WithRegisters
    hub_to_timm, timm_to_hub            the released hub names <-> timm's vit_*_patch14_dinov2
    hf_config, timm_create_call         the config.json / timm.create_model call that fits a state dict
"""
import json
import math
import pickle
import re
from pathlib import Path

import torch

from cli import MissingFile, UserError

def _list_keys(keys, limit=12):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


ARCH_BY_WIDTH = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large", 1536: "vit_giant2"}


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoint files: torch files, .safetensors files and Hugging Face folders


def _safetensors(why):
    """The safetensors.torch module. safetensors is optional (only .safetensors files and Hugging Face folders need
    it), so its absence is a clear error that names the package."""
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(f"{why} needs the safetensors package, which is not installed: pip install safetensors"
                          ) from None
    return safetensors.torch


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
    try:
        _safetensors("")
    except ImportError:  # without the package, a folder that also has the torch files (hub repos often do) uses them
        present = [name for name in present if "safetensors" not in name] or present
    path = folder / present[0]
    if path.name.endswith(".index.json"):  # sharded: {"weight_map": {tensor name: shard file name}}
        sd = {}
        for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
            sd.update(read_checkpoint(folder / shard))
        return sd
    return read_checkpoint(path)


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
    """What a path holds, on the CPU: a Hugging Face folder's state dict, a .safetensors file's (through the
    safetensors package), or whatever torch.load reads with weights_only=True (.pth, .pt, .bin). A path that is
    missing, a training checkpoint folder, or a file that is empty, text, truncated or corrupt is a UserError that
    names the file and what is wrong with it. mmap: map the tensors instead of reading them (big files)."""
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
        try:
            return _safetensors(f"reading {path}").load_file(str(path), device="cpu")
        except ImportError:
            raise
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
# Reading also takes the names of transformers 5's refactored modules: its SwiGLU is Llama-style (gate_proj = the
# gated half x1 of w12, up_proj = x2, down_proj = w3); q/k/v/o_proj, the attention names of its other refactored
# vision models (DINOv3), are taken in case its DINOv2 attention adopts them. Export writes the 4.x names, which
# 5.x reads too (the DINOv2 files on the hub carry them).
_HF_BLOCK_READ = {**{hf: hub for hub, hf in _HF_BLOCK.items()}, "attention.o_proj": "attn.proj",
                  "mlp.down_proj": "mlp.w3"}
# HF names that are row blocks of one hub tensor: HF name -> (hub name, index, count), concatenated along dim 0.
# attn.qkv's rows are [q; k; v] (the (3, H, Dh) split in Attention).
_HF_PARTS = {"attention.attention.query": ("attn.qkv", 0, 3), "attention.attention.key": ("attn.qkv", 1, 3),
             "attention.attention.value": ("attn.qkv", 2, 3), "attention.q_proj": ("attn.qkv", 0, 3),
             "attention.k_proj": ("attn.qkv", 1, 3), "attention.v_proj": ("attn.qkv", 2, 3),
             "mlp.gate_proj": ("mlp.w12", 0, 2), "mlp.up_proj": ("mlp.w12", 1, 2)}

LAYOUTS = ("the released hub layout (cls_token, pos_embed, mask_token, patch_embed.proj.*, blocks.<i>.*, norm.*); "
           "transformers' Dinov2Model / Dinov2WithRegistersModel (embeddings.*, encoder.layer.<i>.*, layernorm.*, "
           "maybe under dinov2.); timm's vit_*_patch14_dinov2 (cls_token, reg_token, pos_embed, blocks.<i>.*, "
           "no mask_token)")


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
    """sd plus a gamma of ones (the identity) for each missing LayerScale: transformers' and timm's DINOv2 blocks
    always have one, so a model built with init_values=None still exports to them."""
    out, D = dict(sd), sd["cls_token"].shape[-1]
    for i in _block_ids(sd):
        for name in ("ls1.gamma", "ls2.gamma"):
            out.setdefault(f"blocks.{i}.{name}", torch.ones(D, dtype=sd["cls_token"].dtype))
    return out


_VIT_KEYS = {"cls_token", "pos_embed", "patch_embed.proj.weight"}  # what every layout has, in hub names


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
    """Hub layout -> transformers' Dinov2Model layout (Dinov2WithRegistersModel's when there are register tokens):
    renames (_HF_TOP, _HF_BLOCK), and each attn.qkv cut into its query, key and value rows."""
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
    """transformers' Dinov2Model / Dinov2WithRegistersModel layout (4.x or 5.x names, dinov2. prefix removed) ->
    hub layout: the inverse of hub_to_hf. A checkpoint without mask token (use_mask_token=False) gets a zero one: it
    only replaces masked patches in iBOT training, never at inference."""
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
    """Hub layout -> timm's vit_*_patch14_dinov2 / vit_*_patch14_reg4_dinov2 layout, the same as timm's own conversion
    of the released files: w12/w3 -> fc1/fc2 unchanged (timm's SwiGLUPacked also gates the first half of fc1); no
    mask_token (timm's ViT has none); with registers, register_tokens -> reg_token and the cls position folded into
    cls_token, since those timm models (no_embed_class) give position embeddings to the patches only."""
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
    """timm's DINOv2 layout -> hub layout: the inverse of hub_to_timm. A pos_embed without cls position (a square
    count: no_embed_class) gets a zero one, and cls_token, which holds that position, stays as it is: the tokens that
    enter block 0 are then exactly timm's, at every input size. timm keeps no mask token; it is filled with zeros (it
    only replaces masked patches in iBOT training, never at inference)."""
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
    """(arch, depth, registers, native img_size, patch size) of a hub-layout state dict."""
    p = sd["patch_embed.proj.weight"].shape[-1]
    return (ARCH_BY_WIDTH.get(sd["cls_token"].shape[-1], "?"), len(_block_ids(sd)),
            sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
            math.isqrt(sd["pos_embed"].shape[1] - 1) * p, p)


def hf_config(sd):
    """config.json for transformers' Dinov2Model (Dinov2WithRegistersModel with registers) holding a hub-layout state
    dict; the fields are those of its Dinov2Config / Dinov2WithRegistersConfig."""
    D = sd["cls_token"].shape[-1]
    _, depth, R, img_size, p = _describe(sd)
    swiglu = "blocks.0.mlp.w12.weight" in sd
    if swiglu:
        # transformers sizes its SwiGLU from mlp_ratio by the released rule (as SwiGLUFFN here); ratio 4 is ViT-g's
        mlp_ratio = 4
        if (int(D * mlp_ratio * 2 / 3) + 7) // 8 * 8 != sd["blocks.0.mlp.w3.weight"].shape[1]:
            raise ValueError(f"SwiGLU hidden width {sd['blocks.0.mlp.w3.weight'].shape[1]} is not the one "
                             f"transformers derives from mlp_ratio 4 at width {D}")
    else:
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / D
        mlp_ratio = int(mlp_ratio) if mlp_ratio.is_integer() else mlp_ratio
    config = {
        "architectures": ["Dinov2WithRegistersModel" if R else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if R else "dinov2",
        "hidden_size": D, "num_hidden_layers": depth, "num_attention_heads": D // 64,  # heads of 64 dims throughout
        "mlp_ratio": mlp_ratio, "use_swiglu_ffn": swiglu, "hidden_act": "gelu",  # exact (erf) GELU, as nn.GELU
        "layer_norm_eps": 1e-6, "image_size": img_size, "patch_size": p, "num_channels": 3, "qkv_bias": True,
        "layerscale_value": 1.0, "drop_path_rate": 0.0, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "torch_dtype": str(sd["cls_token"].dtype).removeprefix("torch."),
    }
    config.update({"num_register_tokens": R} if R else {"use_mask_token": True})
    return config


def timm_create_call(sd):
    """The timm.create_model(...) call whose model loads hub_to_timm(sd) with strict=True (for the FFN each arch
    has by default: MLP ratio 4, SwiGLU for ViT-g). timm has no tiny DINOv2: its small one, at width 192 and 3 heads."""
    arch, depth, R, img_size, p = _describe(sd)
    D = sd["cls_token"].shape[-1]
    size, timm_width, timm_depth = {"vit_base": ("base", 768, 12), "vit_large": ("large", 1024, 24),
                                    "vit_giant2": ("giant", 1536, 40)}.get(arch, ("small", 384, 12))
    args = [repr(f"vit_{size}_patch14_{'reg4_' if R else ''}dinov2"), "num_classes=0", f"img_size={img_size}"]
    args += [f"embed_dim={D}", f"num_heads={D // 64}"] if D != timm_width else []
    args += [f"depth={depth}"] if depth != timm_depth else []
    args += [f"reg_tokens={R}"] if R not in (0, 4) else []
    args += [f"patch_size={p}"] if p != 14 else []
    return f"timm.create_model({', '.join(args)})"
