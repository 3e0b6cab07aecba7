"""Tests of vit.py: released parameter names, counts and layouts; pos-embed interpolation modes; equality with an
independent loop-free ViT written here from the released architecture; masks, drop path, gradients, loading,
init, FLOPs.

Run: python -m pytest -q tests/test_vit.py
"""
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vit
from util import weights

OFFICIAL_KEYS = Path(__file__).resolve().parent / "fixtures" / "official_state_dict_keys.txt"  # released names, shapes


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def official_sections():
    """{section header: [(name, shape), ...]} from the listing of the released hub backbones."""
    sections, current = {}, None
    for line in OFFICIAL_KEYS.read_text().splitlines():
        if line.startswith("### "):
            current = sections.setdefault(line[4:], [])
        elif "\t" in line and current is not None:
            name, shape = line.split("\t")
            current.append((name, tuple(int(s) for s in re.findall(r"\d+", shape))))
    return sections


def section(title_start):
    return next(v for k, v in official_sections().items() if k.startswith(title_start))


def randomize_(model, seed=0):
    """Weights far from the init (gamma ~ 1, norms ~ 1, large pos-embed), so every part of the forward matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif name in ("pos_embed", "cls_token", "register_tokens", "mask_token"):
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return model


def layer_norm(x, w, b, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def reference_forward(sd, x, num_heads, offset, antialias, masks=None):
    """A slow, loop-free ViT written from the released architecture with plain tensor ops (no nn modules, no vit.py
    code)."""
    W_pe = sd["patch_embed.proj.weight"]
    D, C, p, _ = W_pe.shape
    B, _, H, W = x.shape
    h, w = H // p, W // p
    # patchify as a matmul: (B, C, h, p, w, p) -> (B, h*w, C*p*p), the conv's (c, ky, kx) weight order
    patches = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
    t = patches @ W_pe.reshape(D, -1).T + sd["patch_embed.proj.bias"]
    if masks is not None:
        t = torch.where(masks[..., None], sd["mask_token"][None], t)
    pos = sd["pos_embed"]
    M = int(math.sqrt(pos.shape[1] - 1))
    if h * w == M * M and H == W:
        patch_pos = pos[:, 1:]
    else:
        grid = pos[0, 1:].reshape(M, M, D).permute(2, 0, 1)[None]
        if offset:
            grid = F.interpolate(grid, scale_factor=((h + offset) / M, (w + offset) / M), mode="bicubic",
                                 antialias=antialias)
        else:
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias)
        patch_pos = grid[0].permute(1, 2, 0).reshape(1, h * w, D)
    tokens = [sd["cls_token"].expand(B, 1, D) + pos[:, :1]]
    if "register_tokens" in sd:
        tokens.append(sd["register_tokens"].expand(B, -1, -1))
    tokens.append(t + patch_pos)
    z = torch.cat(tokens, 1)
    N, Dh = z.shape[1], D // num_heads
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        y = layer_norm(z, b["norm1.weight"], b["norm1.bias"])
        qkv = y @ b["attn.qkv.weight"].T + b["attn.qkv.bias"]
        q, k, v = (qkv[..., j * D:(j + 1) * D].reshape(B, N, num_heads, Dh).transpose(1, 2) for j in range(3))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(Dh), dim=-1)
        o = (a @ v).transpose(1, 2).reshape(B, N, D) @ b["attn.proj.weight"].T + b["attn.proj.bias"]
        z = z + b.get("ls1.gamma", 1.0) * o
        y = layer_norm(z, b["norm2.weight"], b["norm2.bias"])
        if "mlp.fc1.weight" in b:
            u = y @ b["mlp.fc1.weight"].T + b["mlp.fc1.bias"]
            o = (0.5 * u * (1 + torch.erf(u / math.sqrt(2)))) @ b["mlp.fc2.weight"].T + b["mlp.fc2.bias"]
        else:
            u = y @ b["mlp.w12.weight"].T + b["mlp.w12.bias"]
            hid = u.shape[-1] // 2
            gate, val = u[..., :hid], u[..., hid:]
            o = (gate * torch.sigmoid(gate) * val) @ b["mlp.w3.weight"].T + b["mlp.w3.bias"]
        z = z + b.get("ls2.gamma", 1.0) * o
    zn = layer_norm(z, sd["norm.weight"], sd["norm.bias"])
    R = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    return {"x_norm_clstoken": zn[:, 0], "x_norm_regtokens": zn[:, 1:1 + R], "x_norm_patchtokens": zn[:, 1 + R:],
            "x_prenorm": z}


def tiny(**kw):
    """vit_tiny width (192, 3 heads of 64) at depth 2: every code path of the big models, fast."""
    return vit.vit_tiny(**{"depth": 2, **kw})


# ----------------------------------------------------------------------------------------------------------------
# Released names, shapes, counts


@pytest.mark.parametrize("title, arch, kwargs", [
    ("vit_small patch14 hub (dinov2_vits14)", "vit_small", {}),
    ("vit_small patch14 hub (dinov2_vits14_reg)", "vit_small", {"num_register_tokens": 4}),
    ("vit_base", "vit_base", {}),
    ("vit_large", "vit_large", {}),
    ("vit_giant2", "vit_giant2", {}),
])
def test_state_dict_names_and_shapes_are_the_released_ones(title, arch, kwargs):
    expected = section(title)
    with torch.device("meta"):
        model = vit.build_model(arch, img_size=518, patch_size=14, **kwargs)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    listed_blocks = {k.split(".")[1] for k, _ in expected if k.startswith("blocks.")}
    ours = [(k, s) for k, s in ours if not k.startswith("blocks.") or k.split(".")[1] in listed_blocks]
    assert ours == expected  # same names, shapes and order


@pytest.mark.parametrize("title, width, registers, ffn", [
    ("vit_small patch14 hub (dinov2_vits14)", 384, 0, "fc1"),  # the complete 12-block listing
    ("vit_small patch14 hub (dinov2_vits14_reg)", 384, 4, "fc1"),  # block 0 only: loads as a depth-1 model
    ("vit_giant2", 1536, 0, "w12"),  # the ViT-g SwiGLU block layout, depth 1
])
def test_official_state_dict_loads_strictly(title, width, registers, ffn):
    g = torch.Generator().manual_seed(0)
    sd = {name: torch.randn(shape, generator=g) for name, shape in section(title)}
    model = weights.from_pretrained(sd)
    assert model.embed_dim == width and model.num_register_tokens == registers and model.patch_size == 14
    assert model.pos_embed.shape[1] == 1370  # native 37x37 grid = img_size 518
    assert hasattr(model.blocks[0].mlp, ffn)
    # register models interpolate by size with antialias, the others with the 0.1 offset and no antialias
    assert (model.interpolate_offset, model.interpolate_antialias) == ((0.0, True) if registers else (0.1, False))
    loaded = model.state_dict()
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_parameter_counts_match_recipe():
    def count(m):
        return sum(p.numel() for p in m.parameters())
    assert count(vit.vit_small(img_size=518, init_values=1e-5)) == 22_056_576
    assert count(vit.vit_base(img_size=518)) == 86_580_480
    with torch.device("meta"):
        small_reg = vit.vit_small(img_size=518, num_register_tokens=4)
        large, giant = vit.vit_large(img_size=518), vit.vit_giant2(img_size=518)
    assert count(small_reg) == 22_058_112
    assert count(large) == 304_368_640
    assert count(giant) == 1_136_480_768
    assert giant.blocks[0].mlp.w3.in_features == 4096  # (int(2/3 * 4 * 1536) + 7) // 8 * 8
    with torch.device("meta"):
        assert vit.vit_large(ffn_layer="swiglu").blocks[0].mlp.w3.in_features == 2736  # the vitl14.yaml config


# ----------------------------------------------------------------------------------------------------------------
# Position-embedding interpolation


def test_interpolation_is_identity_at_native_grid():
    model = tiny(img_size=224)
    assert model.interpolate_pos_encoding(224, 224) is model.pos_embed
    reg = tiny(img_size=224, num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)
    assert reg.interpolate_pos_encoding(224, 224) is reg.pos_embed
    # and the size mode at the same size is the identity too (bicubic weights at integer offsets are 1, 0, ...)
    torch.testing.assert_close(vit.resample_pos_embed(reg.pos_embed, (16, 16), 0.0, True), reg.pos_embed,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("height, width", [(224, 224), (224, 308), (98, 98)])
def test_offset_and_size_modes_follow_their_formulas(height, width):
    offset_model = randomize_(tiny(img_size=518))
    size_model = tiny(img_size=518, interpolate_offset=0.0, interpolate_antialias=True)
    size_model.load_state_dict(offset_model.state_dict())
    h, w = height // 14, width // 14
    pos = offset_model.pos_embed.detach()
    grid = pos[0, 1:].reshape(37, 37, -1).permute(2, 0, 1)[None]  # (1, D, 37, 37)
    expected_offset = F.interpolate(grid, scale_factor=((h + 0.1) / 37, (w + 0.1) / 37), mode="bicubic",
                                    antialias=False)
    expected_size = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
    got_offset = offset_model.interpolate_pos_encoding(height, width).detach()
    got_size = size_model.interpolate_pos_encoding(height, width).detach()
    assert got_offset.shape == got_size.shape == (1, 1 + h * w, 192)
    torch.testing.assert_close(got_offset[:, 0], pos[:, 0], rtol=0, atol=0)  # the cls position is kept
    torch.testing.assert_close(got_offset[0, 1:].reshape(h, w, -1).permute(2, 0, 1)[None], expected_offset)
    torch.testing.assert_close(got_size[0, 1:].reshape(h, w, -1).permute(2, 0, 1)[None], expected_size)
    # the two modes give really different grids (rel. L2 0.29 for 37 -> 16, more for smaller)
    rel = (got_offset - got_size).norm() / got_size.norm()
    assert rel > 0.1
    # and the offset mode is not the plain size-based resize that reimplementations commonly use
    plain = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=False)
    assert (expected_offset - plain).abs().max() > 1e-2


def test_non_square_input_gives_16x22_grid():
    model = tiny(img_size=224).eval()
    x = torch.randn(2, 3, 224, 308)
    out = model.forward_features(x)
    assert out["x_norm_patchtokens"].shape == (2, 16 * 22, 192)
    (fmap,) = model.get_intermediate_layers(x, n=1, reshape=True)
    assert fmap.shape == (2, 192, 16, 22)
    torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), out["x_norm_patchtokens"])


# ----------------------------------------------------------------------------------------------------------------
# Equality with the independent reference forward


@pytest.mark.parametrize("size, kwargs", [
    ((224, 224), {}),  # 37 -> 16 grid, offset mode
    ((518, 518), {}),  # native grid: no interpolation
    ((224, 308), {}),  # non-square
    ((224, 224), {"num_register_tokens": 4, "interpolate_offset": 0.0, "interpolate_antialias": True}),
    ((224, 308), {"num_register_tokens": 4, "interpolate_offset": 0.0, "interpolate_antialias": True}),
    ((224, 224), {"ffn_layer": "swiglu"}),
    ((224, 224), {"init_values": None}),  # no LayerScale
])
def test_forward_features_matches_reference(size, kwargs):
    torch.manual_seed(0)
    model = randomize_(tiny(img_size=518, **kwargs)).eval()
    B = 1 if size[0] > 224 else 2  # 1370 tokens: one image keeps the slow reference quick
    x = torch.randn(B, 3, *size)
    masks = torch.rand(B, (size[0] // 14) * (size[1] // 14)) < 0.3
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for m in (masks, None):
            ours = model.forward_features(x, masks=m)
            ref = reference_forward(sd, x, model.num_heads, model.interpolate_offset, model.interpolate_antialias, m)
            for key, value in ref.items():
                assert ours[key].shape == value.shape, key
                assert value.numel() == 0 or (ours[key] - value).abs().max() <= 1e-5, key
        torch.testing.assert_close(model(x), ref["x_norm_clstoken"], rtol=0, atol=1e-5)  # unmasked, the last ref


def test_sdpa_and_explicit_attention_agree():
    torch.manual_seed(0)
    attn = randomize_(vit.Attention(192, 3))
    x = torch.randn(2, 50, 192)
    fused = attn(x)
    explicit, maps = attn(x, return_attention=True)
    torch.testing.assert_close(fused, explicit, rtol=0, atol=1e-5)
    assert maps.shape == (2, 3, 50, 50)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 3, 50))
    model = randomize_(tiny(img_size=224, num_register_tokens=2)).eval()
    maps = model.get_last_self_attention(torch.randn(2, 3, 112, 126))
    assert maps.shape == (2, 3, 1 + 2 + 8 * 9, 1 + 2 + 8 * 9)
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))


def test_get_intermediate_layers():
    model = randomize_(tiny(depth=3, img_size=224, num_register_tokens=2)).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = model.forward_features(x)
        layers = model.get_intermediate_layers(x, n=2, return_class_token=True)
        assert len(layers) == 2
        torch.testing.assert_close(layers[-1][0], out["x_norm_patchtokens"])  # patches, registers dropped
        torch.testing.assert_close(layers[-1][1], out["x_norm_clstoken"])
        by_index = model.get_intermediate_layers(x, n=[0, 2])
        torch.testing.assert_close(by_index[1], out["x_norm_patchtokens"])
        raw = model.get_intermediate_layers(x, n=1, norm=False)[0]
        torch.testing.assert_close(raw, out["x_prenorm"][:, 3:])
        # block 0 alone, by hand
        first = model.norm(model.blocks[0](model.prepare_tokens_with_masks(x)))[:, 3:]
        torch.testing.assert_close(by_index[0], first)


# ----------------------------------------------------------------------------------------------------------------
# Training behaviour: gradients, masks, drop path


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = tiny(img_size=112, num_register_tokens=2, drop_path_rate=0.2).train()
    x = torch.randn(4, 3, 112, 112)
    masks = torch.zeros(4, 64, dtype=torch.bool)
    masks[:, ::3] = True
    out = model.forward_features(x, masks=masks)
    loss = (out["x_norm_clstoken"].pow(2).sum() + out["x_norm_patchtokens"].pow(2).sum()
            + out["x_norm_regtokens"].pow(2).sum())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_masks_replace_exactly_the_masked_patch_embeddings():
    torch.manual_seed(0)
    model = randomize_(tiny(img_size=112, num_register_tokens=2)).eval()
    x = torch.randn(3, 3, 112, 112)
    masks = torch.rand(3, 64) < 0.4
    masks[0] = False  # one image without mask
    with torch.no_grad():
        tokens = model.prepare_tokens_with_masks(x, masks)  # what enters block 0
        plain = model.prepare_tokens_with_masks(x)
        pos = model.pos_embed[:, 1:]
        patches = tokens[:, 3:]  # after cls and 2 registers
        torch.testing.assert_close(patches[masks], (model.mask_token + pos.expand(3, -1, -1)[masks]), rtol=0, atol=0)
        torch.testing.assert_close(patches[~masks], plain[:, 3:][~masks], rtol=0, atol=0)
        torch.testing.assert_close(tokens[:, :3], plain[:, :3], rtol=0, atol=0)
        # the pixels under a masked patch no longer matter at all
        x2 = x.clone()
        m_img = masks.reshape(3, 8, 8).repeat_interleave(14, 1).repeat_interleave(14, 2)  # (B, 112, 112)
        x2[m_img[:, None].expand_as(x2)] = 100.0
        a, b = model.forward_features(x, masks), model.forward_features(x2, masks)
    assert torch.equal(a["x_prenorm"], b["x_prenorm"])
    assert a["masks"] is masks


@pytest.mark.parametrize("rate", [0.05, 0.3])  # per-sample DropPath, and the batch-subset form above 0.1
def test_drop_path_only_in_train_mode(rate):
    torch.manual_seed(0)
    model = randomize_(tiny(img_size=112, drop_path_rate=rate))
    x = torch.randn(8, 3, 112, 112)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        reference = model(x)
        model.train()
        a, b = model(x), model(x)
    assert not torch.equal(a, b)
    assert not torch.equal(a, reference)


def test_batch_subset_drop_path_scales_by_b_over_subset():
    # A block whose attention branch outputs exactly 1 everywhere and whose FFN branch outputs 0.
    blk = vit.Block(8, 2, init_values=1.0, drop_path_rate=0.4).train()
    with torch.no_grad():
        blk.attn.proj.weight.zero_()
        blk.attn.proj.bias.fill_(1.0)
        blk.mlp.fc2.weight.zero_()
        blk.mlp.fc2.bias.zero_()
    b = 64
    out = blk(torch.zeros(b, 3, 8))
    subset = max(int(b * (1 - 0.4)), 1)
    assert subset == 38
    per_sample = out[:, 0, 0]
    kept = per_sample != 0
    assert kept.sum() == 38
    torch.testing.assert_close(per_sample[kept], torch.full((38,), 64 / 38))  # 1.684, not 1/(1-p) = 1.667
    assert (out == out[:, :1, :1]).all()  # whole samples are kept or dropped
    # at small rates: the ordinary per-sample form, kept samples scaled by 1/(1-p)
    blk.drop_path_rate = 0.05
    per_sample = blk(torch.zeros(b, 3, 8))[:, 0, 0]
    kept = per_sample != 0
    torch.testing.assert_close(per_sample[kept], torch.full((int(kept.sum()),), 1 / 0.95))
    blk.eval()
    assert (blk(torch.zeros(b, 3, 8)) == 1).all()


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_raise_clear_errors():
    model = tiny(img_size=112)
    with pytest.raises(ValueError, match=r"113x112.*patch size 14"):
        model(torch.randn(1, 3, 113, 112))
    with pytest.raises(ValueError, match=r"vit_huge.*vit_small"):
        vit.build_model("vit_huge")
    with torch.device("meta"):
        small_sd = vit.vit_small(img_size=112).state_dict()
    mismatch = r"blocks\.0\.attn\.qkv\.weight: checkpoint \(1152, 384\) vs model \(576, 192\)"
    with pytest.raises(ValueError, match=mismatch):
        vit.load_pretrained(model, small_sd)
    sd = dict(model.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    del sd["norm.bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): norm\.bias[\s\S]*unexpected keys \(1\): extra\.weight"):
        vit.load_pretrained(model, sd)
    with pytest.raises(ValueError, match="ffn_layer"):
        tiny(ffn_layer="moe")


# ----------------------------------------------------------------------------------------------------------------
# Loading layouts, round trips, init


def test_chunked_and_wrapped_layouts_load(tmp_path):
    src = randomize_(tiny(depth=4, img_size=56))
    sd = src.state_dict()
    # the released training layout: 2 chunks of 2 blocks, keys blocks.<chunk>.<global index>.*
    chunked = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m[1]) // 2}.{m[1]}.", k): v for k, v in sd.items()}
    assert "blocks.1.3.norm1.weight" in chunked
    heads = {"dino_head.mlp.0.weight": torch.zeros(2, 2), "ibot_head.last_layer.weight_g": torch.zeros(2, 1)}
    variants = {
        "hub": sd,
        "chunked": chunked,
        "teacher checkpoint": {"teacher": {**{"backbone." + k: v for k, v in chunked.items()}, **heads}},
        "module.backbone.": {"model": {"module.backbone." + k: v for k, v in sd.items()}},
        "student wrapper": {"student": {"backbone." + k: v for k, v in sd.items()}, "iteration": 3},
        "SSLMetaArch flat": {**{f"{o}.backbone.{k}": v for o in ("student", "teacher") for k, v in chunked.items()},
                             "dino_loss.center": torch.zeros(1, 4)},
        "nested modules": {"teacher": {"backbone": sd, "dino_head": heads}, "optimizer": {"step": 1}},
        "torch.compile + DDP": {"module._orig_mod." + k: v for k, v in sd.items()},
        "per-block compile + checkpoint wrappers": {k.replace("blocks.1.", "blocks.1._orig_mod.")
                                                    .replace("blocks.2.", "blocks.2._checkpoint_wrapped_module."): v
                                                    for k, v in sd.items()},
    }
    for i, (name, obj) in enumerate(variants.items()):
        path = tmp_path / f"ckpt{i}.pth"
        torch.save(obj, path)
        for source in (obj, path, str(path)):
            with torch.device("meta"):
                model = tiny(depth=4, img_size=56)
            model = vit.load_pretrained(model.to_empty(device="cpu"), source)  # strict: every tensor is loaded
            for k, v in model.state_dict().items():
                assert torch.equal(v, sd[k]), (name, k)
        assert weights.from_pretrained(obj).n_blocks == 4


@pytest.mark.parametrize("kwargs", [{}, {"num_register_tokens": 2, "interpolate_offset": 0.0,
                                         "interpolate_antialias": True}])
def test_from_pretrained_round_trip_and_resampled_load(kwargs, tmp_path):
    torch.manual_seed(0)
    src = randomize_(tiny(img_size=518, **kwargs)).eval()
    x = torch.randn(2, 3, 224, 224)
    torch.save(src.state_dict(), tmp_path / "backbone.pth")
    copy = weights.from_pretrained(tmp_path / "backbone.pth")
    assert not copy.training and copy.n_blocks == 2 and copy.pos_embed.shape == src.pos_embed.shape
    with torch.no_grad():
        expected = src.forward_features(x)
        got = copy.forward_features(x)
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert torch.equal(got[key], expected[key]), key
        # Loading into a model built for 224 px resamples pos_embed with the run-time formula, so at 224 px it
        # gives exactly what the 518 px model gives.
        small = weights.from_pretrained(src.state_dict(), img_size=224)
        assert small.pos_embed.shape[1] == 1 + 16 * 16
        torch.testing.assert_close(small.forward_features(x)["x_prenorm"], expected["x_prenorm"], rtol=0, atol=1e-5)


def test_meta_build_then_init_weights():
    with torch.device("meta"):
        model = vit.vit_small(depth=2, img_size=224, num_register_tokens=4, init_values=1e-5)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # anything init_weights forgets stays NaN
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name

    def near(value, target, rel=0.1):
        return abs(value - target) <= rel * target
    assert near(model.pos_embed.std().item(), 0.02)
    assert near(model.blocks[0].mlp.fc1.weight.std().item(), 0.02)
    assert near(model.blocks[1].attn.qkv.weight.std().item(), 0.02)
    assert (model.blocks[0].attn.qkv.bias == 0).all()
    assert near(model.cls_token.std().item(), 1e-6, rel=0.3)
    assert near(model.register_tokens.std().item(), 1e-6, rel=0.3)
    assert (model.mask_token == 0).all()
    assert (model.blocks[0].ls1.gamma == 1e-5).all() and (model.blocks[1].ls2.gamma == 1e-5).all()
    assert (model.norm.weight == 1).all() and (model.blocks[0].norm1.bias == 0).all()
    # patch embed: PyTorch's default conv init, uniform(+-1/sqrt(fan_in)), std = 1/sqrt(3 * fan_in)
    fan_in = 3 * 14 * 14
    assert near(model.patch_embed.proj.weight.std().item(), 1 / math.sqrt(3 * fan_in))
    assert model.patch_embed.proj.weight.abs().max() <= 1 / math.sqrt(fan_in)
    model(torch.randn(1, 3, 56, 56))


# ----------------------------------------------------------------------------------------------------------------
# FLOPs (the command line is util.weights', tested in test_convert.py)


@pytest.mark.parametrize("kwargs", [{}, {"ffn_layer": "swiglu", "num_register_tokens": 4}])
def test_flops_per_image_matches_a_flop_counter(kwargs):
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny(img_size=224, **kwargs).eval()
    x = torch.randn(1, 3, 224, 308)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        # the explicit attention path, whose matmuls the counter sees (it does not count the CPU SDPA kernel)
        z = model.prepare_tokens_with_masks(x)
        for blk in model.blocks:
            z = z + blk.ls1(blk.attn(blk.norm1(z), return_attention=True)[0])
            z = z + blk.ls2(blk.mlp(blk.norm2(z)))
    assert model.flops_per_image(224, 308) == counter.get_total_flops()


def test_activation_checkpointing_gives_the_same_gradients():
    import vit
    torch.manual_seed(0)
    model = vit.build_model("vit_tiny", img_size=56, drop_path_rate=0.3)  # batch-subset drop path: RNG replayed
    model.train()
    x = torch.randn(4, 3, 56, 56)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)
        model.forward_features(x)["x_norm_patchtokens"].square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) == sum(1 for _ in model.parameters()) - 1  # all but the mask token
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
