"""Tests of the layout conversions in util/weights.py (Hugging Face transformers and timm, both ways) and of hubconf.py.

The names and shapes of the two foreign layouts are pinned by fixtures written from those libraries' modules
(tests/fixtures/hf_layout.txt, tests/fixtures/timm_layout.txt), so neither library is needed here. Round trips are
checked tensor by tensor, loads by the forward output; the .safetensors paths run when the safetensors package is
installed, and its absence is simulated.

Run: python -m pytest -q tests/test_convert.py
"""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from util import cli
import vit
from util import weights
from test_vit import randomize_  # weights far from the init, so that every tensor matters

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]
REG = dict(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True)  # as the released *_reg
# fixture section -> the 2-block model it lists (at 518 px; the tests with values use a 112-px grid, which is quicker)
CASES = {
    "vit_small, 2 blocks, 518 px": lambda img_size=518: vit.vit_small(depth=2, img_size=img_size),
    "vit_small, 2 blocks, 518 px, 4 registers":
        lambda img_size=518: vit.vit_small(depth=2, img_size=img_size, **REG),
    "vit_giant2, 2 blocks, 518 px, SwiGLU": lambda img_size=518: vit.vit_giant2(depth=2, img_size=img_size),
}
SMALL, SMALL_REG, GIANT = CASES


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def listing(file_name):
    """{section title (before the colon): {name: shape}} from a fixture listing."""
    sections, current = {}, None
    for line in (FIXTURES / file_name).read_text().splitlines():
        if line.startswith("### "):
            current = sections.setdefault(line[4:].split(":")[0], {})
        elif "\t" in line:
            name, shape = line.split("\t")
            current[name] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return sections


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}




@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are small: one thread runs them fastest (threads only add sync cost, worse when another job
    shares the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    """One randomised model per fixture section, native grid 8x8 (112 px); the 2-block ViT-g has 58M parameters."""
    out = {}
    for i, (title, build) in enumerate(CASES.items()):
        with torch.device("meta"):  # randomize_() sets every parameter: skip the init
            model = build(img_size=112)
        out[title] = randomize_(model.to_empty(device="cpu"), seed=i).eval()
    return out


def features(model, size):
    """forward_features at size x size, one fixed image, without the masks entry."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return {k: v for k, v in model.forward_features(x).items() if k != "masks"}


def assert_same_features(a, b, sizes):
    for size in sizes:
        fa, fb = features(a, size), features(b, size)
        for key in fa:
            assert torch.equal(fa[key], fb[key]), (size, key)


def to_hf5(hf_sd):
    """An HF 4.x-layout state dict in the names transformers 5 may use: Llama-style gate/up/down_proj for the SwiGLU
    (its refactored modular_dinov2.py), q/k/v/o_proj for the attention (as its other refactored vision models)."""
    out = {}
    for k, v in hf_sd.items():
        k = re.sub(r"attention\.attention\.(query|key|value)\.",
                   lambda m: f"attention.{m[1][0]}_proj.", k)
        k = k.replace("attention.output.dense.", "attention.o_proj.").replace("mlp.weights_out.", "mlp.down_proj.")
        if ".mlp.weights_in." in k:
            gate, up = v.chunk(2, dim=0)  # w12 = [x1 (gated); x2]
            out[k.replace("weights_in", "gate_proj")], out[k.replace("weights_in", "up_proj")] = gate, up
            continue
        out[k] = v
    return out


def hf_folder(path, model):
    """A Hugging Face model folder as save_pretrained lays it out; the weights as a torch file (no safetensors)."""
    path.mkdir(parents=True)
    sd = model.state_dict()
    (path / "config.json").write_text(json.dumps(weights.hf_config(sd)))
    torch.save(weights.hub_to_hf(sd), path / "pytorch_model.bin")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Names and shapes of each layout, pinned by the fixtures


@pytest.mark.parametrize("title", CASES)
def test_exported_layouts_match_the_fixtures(title):
    with torch.device("meta"):  # names and shapes only: no memory, no time
        sd = CASES[title]().state_dict()
    hf, timm = weights.hub_to_hf(sd), weights.hub_to_timm(sd)
    assert shapes(hf) == listing("hf_layout.txt")[title]
    assert shapes(timm) == listing("timm_layout.txt")[title]
    assert [weights.checkpoint_layout(d) for d in (sd, hf, timm)] == ["hub", "hf", "timm"]
    config = weights.hf_config(sd)
    registers, giant = "registers" in title, "giant" in title
    assert config["model_type"] == ("dinov2_with_registers" if registers else "dinov2")
    assert config["architectures"] == (["Dinov2WithRegistersModel"] if registers else ["Dinov2Model"])
    assert (config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]) == (
        (1536, 24, 2) if giant else (384, 6, 2))
    assert (config["image_size"], config["patch_size"], config["mlp_ratio"], config["use_swiglu_ffn"]) == (
        518, 14, 4, giant)
    assert config.get("num_register_tokens", 0) == (4 if registers else 0)
    name = f"vit_{'giant' if giant else 'small'}_patch14_{'reg4_' if registers else ''}dinov2"
    assert weights.timm_create_call(sd) == f"timm.create_model('{name}', num_classes=0, img_size=518, depth=2)"


def test_timm_create_call_for_the_laptop_model():
    with torch.device("meta"):
        sd = vit.vit_tiny(img_size=84).state_dict()  # train.py's default: no timm name at width 192
    assert weights.timm_create_call(sd) == ("timm.create_model('vit_small_patch14_dinov2', num_classes=0, img_size=84, "
                                        "embed_dim=192, num_heads=3)")


# ----------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("title", CASES)
def test_hf_round_trip_is_exact(title, models):
    sd = models[title].state_dict()
    back = weights.backbone_state_dict_from(weights.hub_to_hf(sd))
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # the names of transformers 5's modules read the same, and so does a task model's dinov2. prefix
    hf_task = {**{"dinov2." + k: v for k, v in to_hf5(weights.hub_to_hf(sd)).items()},
               "classifier.weight": torch.zeros(2, 768), "classifier.bias": torch.zeros(2)}
    back5 = weights.backbone_state_dict_from(hf_task)
    assert back5.keys() == sd.keys() and all(torch.equal(back5[k], sd[k]) for k in sd)


@pytest.mark.parametrize("title", CASES)
def test_timm_round_trip_is_exact(title, models):
    sd = models[title].state_dict()
    registers = "register_tokens" in sd
    back = weights.backbone_state_dict_from(weights.hub_to_timm(sd))
    assert back.keys() == sd.keys()
    # What timm's layout cannot hold: the mask token (zero after the trip; iBOT training only) and, with registers,
    # the cls position apart from the cls token (folded into it; the token entering block 0 is the same sum).
    folded = {"mask_token"} | ({"cls_token", "pos_embed"} if registers else set())
    for k in sd.keys() - folded:
        assert torch.equal(back[k], sd[k]), k
    assert (back["mask_token"] == 0).all()
    if registers:
        assert torch.equal(back["cls_token"], sd["cls_token"] + sd["pos_embed"][:, :1])
        assert (back["pos_embed"][:, 0] == 0).all() and torch.equal(back["pos_embed"][:, 1:], sd["pos_embed"][:, 1:])
    # so a checkpoint in that form (what a timm import gives) goes round exactly, tensor by tensor
    again = weights.backbone_state_dict_from(weights.hub_to_timm(back))
    assert again.keys() == back.keys() and all(torch.equal(again[k], back[k]) for k in back)


@pytest.mark.parametrize("title", CASES)
def test_imports_give_the_same_forward_output(title, models):
    src = models[title]
    sizes = (28,) if "giant" in title else (56, 112)  # a resampled grid, and the native one
    for converted in (weights.hub_to_hf(src.state_dict()), weights.hub_to_timm(src.state_dict())):
        copy = weights.from_pretrained(converted)
        assert (copy.interpolate_offset, copy.interpolate_antialias) == (
            (src.interpolate_offset, src.interpolate_antialias))  # the released rule, see the NOTE in vit.py
        assert_same_features(copy, src, sizes)


# ----------------------------------------------------------------------------------------------------------------
# Files of each layout


@pytest.mark.parametrize("title", [SMALL, SMALL_REG])
def test_from_pretrained_reads_hf_and_timm_files(title, models, tmp_path):
    src = models[title]
    sd = src.state_dict()
    torch.save(weights.hub_to_hf(sd), tmp_path / "hf.bin")
    task_prefix = "dinov2_with_registers." if "registers" in title else "dinov2."  # e.g. ...ForImageClassification
    torch.save({task_prefix + k: v for k, v in weights.hub_to_hf(sd).items()}, tmp_path / "hf_task.bin")
    torch.save(weights.hub_to_timm(sd), tmp_path / "timm.pth")
    torch.save({"state_dict": weights.hub_to_timm(sd), "epoch": 3}, tmp_path / "timm_train.pth")  # timm's train.py
    hf_folder(tmp_path / "folder", src)
    for name in ("hf.bin", "hf_task.bin", "timm.pth", "timm_train.pth", "folder"):
        copy = weights.from_pretrained(tmp_path / name)
        assert copy.n_blocks == 2 and copy.num_register_tokens == src.num_register_tokens, name
        assert_same_features(copy, src, (56,))
    # load_pretrained takes them too (here into a 56-px model: pos_embed resampled as at run time)
    small = vit.load_pretrained(vit.vit_small(depth=2, img_size=56, **(REG if "registers" in title else {})),
                                tmp_path / "timm.pth").eval()
    assert small.pos_embed.shape[1] == 1 + 4 * 4
    torch.testing.assert_close(features(small, 56)["x_prenorm"], features(src, 56)["x_prenorm"],
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("title", [SMALL, SMALL_REG])
def test_hf_folder_in_safetensors(title, models, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    src = models[title]
    message = weights.export(src, tmp_path / "hf", to="hf")
    model_name = "Dinov2WithRegistersModel" if "registers" in title else "Dinov2Model"
    assert f"transformers.{model_name}.from_pretrained(" in message
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == weights.hf_config(src.state_dict())
    with safetensors_torch.safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses safetensors files without it
        expected = {**listing("hf_layout.txt")[title], "embeddings.position_embeddings": (1, 1 + 8 * 8, 384)}
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == expected  # the fixture at 112 px
    for path in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        assert_same_features(weights.from_pretrained(path), src, (112,))


def test_sharded_hf_folder(models, tmp_path):
    src = models[SMALL]
    folder = hf_folder(tmp_path / "hf", src)
    hf = torch.load(folder / "pytorch_model.bin", weights_only=True)
    (folder / "pytorch_model.bin").unlink()
    half = sorted(hf)[: len(hf) // 2]  # two shards and the index that maps each tensor to its shard
    torch.save({k: hf[k] for k in half}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({k: hf[k] for k in hf.keys() - set(half)}, folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 if k in half else 2}-of-00002.bin" for k in hf}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_features(weights.from_pretrained(folder), src, (112,))


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_files_that_are_not_a_vit_get_one_clear_message(tmp_path):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 2048)}
    torch.save(resnet, tmp_path / "resnet.pth")  # hub-style file
    torch.save({"state_dict": resnet, "epoch": 1}, tmp_path / "timm_resnet.pth")  # timm training checkpoint
    tried = (r"not a ViT backbone state dict\. Layouts tried: the released hub layout .*transformers' Dinov2Model.*"
             r"timm's vit_\*_patch14_dinov2.* Found 2 tensors: conv1\.weight, fc\.weight")
    for name in ("resnet.pth", "timm_resnet.pth"):
        with pytest.raises(ValueError, match=tried):
            weights.from_pretrained(tmp_path / name)
    # a Hugging Face layout of another model (BERT's names)
    bert = {"embeddings.word_embeddings.weight": torch.zeros(10, 8), "encoder.layer.0.attention.self.query.weight":
            torch.zeros(8, 8), "pooler.dense.weight": torch.zeros(8, 8)}
    torch.save(bert, tmp_path / "bert.bin")
    with pytest.raises(ValueError, match=r"Hugging Face layout .* not a DINOv2: 3 keys .*word_embeddings"):
        weights.from_pretrained(tmp_path / "bert.bin")
    # Hugging Face folders: another model type, bad heads, no weights
    for name, config in (("bert", {"model_type": "bert", "hidden_size": 768, "num_attention_heads": 12}),
                         ("heads", {"model_type": "dinov2", "hidden_size": 384, "num_attention_heads": 12}),
                         ("empty", {"model_type": "dinov2", "hidden_size": 384, "num_attention_heads": 6})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type 'bert' is not a DINOv2 model"):
        weights.from_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"12 attention heads for width 384"):
        weights.from_pretrained(tmp_path / "heads")
    with pytest.raises(ValueError, match=r"config\.json but no weights .*holds: config\.json"):
        weights.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"without config\.json"):
        weights.from_pretrained(tmp_path)
    # a .safetensors file that holds no ViT
    if _has_safetensors():
        import safetensors.torch
        safetensors.torch.save_file(resnet, str(tmp_path / "resnet.safetensors"))
        with pytest.raises(ValueError, match=tried):
            weights.from_pretrained(tmp_path / "resnet.safetensors")


def _has_safetensors():
    try:
        import safetensors.torch  # noqa: F401
        return True
    except ImportError:
        return False


def test_missing_safetensors_names_the_package(models, tmp_path, monkeypatch):
    # as if the package were not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    folder = tmp_path / "dinov2-small"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(weights.hf_config(models[SMALL].state_dict())))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)  # never opened: the import fails first
    for path in (folder, folder / "model.safetensors"):
        with pytest.raises(ImportError, match=r"model\.safetensors needs the safetensors package.*"
                                              r"pip install safetensors"):
            weights.from_pretrained(path)
    with pytest.raises(ImportError, match="pip install safetensors"):
        weights.export(models[SMALL], tmp_path / "out", to="hf")
    assert not (tmp_path / "out").exists()  # nothing half-written
    # the torch files of a Hugging Face folder need no safetensors, and are used when the folder has both
    both = hf_folder(tmp_path / "both", models[SMALL])
    (both / "model.safetensors").write_bytes(b"\0" * 16)
    assert_same_features(weights.from_pretrained(both), models[SMALL], (112,))


def test_incomplete_hf_checkpoint(models):
    hf = weights.hub_to_hf(models[SMALL].state_dict())
    del hf["encoder.layer.1.attention.attention.key.weight"]
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.weight: the checkpoint holds 2 of its 3 parts"):
        weights.from_pretrained(hf)
    with pytest.raises(ValueError, match="unknown layout 'onnx'"):
        weights.export(models[SMALL], "x.onnx", to="onnx")


# ----------------------------------------------------------------------------------------------------------------
# Command line


def test_convert_command_line(models, tmp_path, monkeypatch, capsys):
    src = models[SMALL_REG]
    torch.save(src.state_dict(), tmp_path / "teacher_backbone.pth")

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["vit.py", *map(str, args)])
        weights.main()
        return capsys.readouterr().out

    out = run("--convert", tmp_path / "teacher_backbone.pth", "--to", "timm", "--out", tmp_path / "timm.pth")
    assert "(timm layout): vit_small, 2 blocks, 4 registers, native grid 112 px" in out
    assert "timm.create_model('vit_small_patch14_reg4_dinov2', num_classes=0, img_size=112, depth=2)" in out
    assert weights.checkpoint_layout(torch.load(tmp_path / "timm.pth", weights_only=True)) == "timm"
    out = run(tmp_path / "timm.pth", "--to", "hub", "--out", tmp_path / "hub.pth")  # IN, or --convert IN
    hub = torch.load(tmp_path / "hub.pth", weights_only=True)
    assert list(hub) == list(src.state_dict())  # the released order
    assert_same_features(weights.from_pretrained(tmp_path / "hub.pth"), src, (112,))
    if _has_safetensors():
        out = run("--convert", tmp_path / "hub.pth", "--to", "hf", "--out", tmp_path / "hf")
        assert "transformers.Dinov2WithRegistersModel.from_pretrained(" in out
        assert_same_features(weights.from_pretrained(tmp_path / "hf"), src, (112,))
    # user errors: one `error:` line and a non-zero exit, no traceback
    def fails(*args, code=1):
        monkeypatch.setattr(sys, "argv", ["vit.py", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            cli.run(weights.main)
        err = capsys.readouterr().err
        assert e.value.code == code and "Traceback" not in err
        return err
    assert "converting needs --out" in fails("--convert", tmp_path / "hub.pth", "--to", "timm", code=2)
    assert "--to must be one of hub, hf, timm, got 'onnx'" in fails(tmp_path / "hub.pth", "--to", "onnx", "--out", "x",
                                                                   code=2)
    assert "one checkpoint to convert" in fails(tmp_path / "hub.pth", "--convert", tmp_path / "hub.pth", "--out", "x",
                                                code=2)
    assert "unrecognized arguments: --no-such-flag" in fails("--no-such-flag", "1", code=2)  # unknown flags
    assert "nope.pth: no such file" in fails(tmp_path / "nope.pth", "--out", tmp_path / "z.pth")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    err = fails("--convert", tmp_path / "notes.txt", "--to", "hub", "--out", tmp_path / "y.pth")
    assert re.search(r"^error: could not read .*notes.txt as a checkpoint: it is a text file", err)
    assert "weights_only=False" not in err


# ----------------------------------------------------------------------------------------------------------------
# torch.hub


HUB_NAMES = [f"dinov2_vit{s}14{r}" for r in ("", "_reg") for s in "sblg"]


def test_torch_hub_entry_points(models, tmp_path):
    import hubconf  # the entry points torch.hub finds: its public callables
    entry_points = [f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith("_")]
    assert sorted(entry_points) == sorted(HUB_NAMES)
    assert hubconf.dependencies == ["torch"]
    src, src_reg = models[SMALL], models[SMALL_REG]
    torch.save(weights.hub_to_timm(src.state_dict()), tmp_path / "small_timm.pth")
    hf_folder(tmp_path / "reg_hf", src_reg)
    model = torch.hub.load(str(ROOT), "dinov2_vits14", source="local", weights=tmp_path / "small_timm.pth", depth=2)
    # a 112-px checkpoint runs on its own grid, not resampled to the released 37x37 one (518 px)
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 384)
    assert_same_features(model.eval(), src, (112,))
    model = torch.hub.load(str(ROOT), "dinov2_vits14_reg", source="local", weights=str(tmp_path / "reg_hf"), depth=2)
    assert (model.num_register_tokens, model.interpolate_offset, model.interpolate_antialias) == (4, 0.0, True)
    assert_same_features(model.eval(), src_reg, (112,))
    # a state dict works as weights too, and img_size given wins (the released way: resampled at load)
    model = torch.hub.load(str(ROOT), "dinov2_vits14", source="local", weights=src.state_dict(), depth=2, img_size=56)
    assert model.pos_embed.shape == (1, 1 + 4 * 4, 384)
    # random init, the released architecture
    model = torch.hub.load(str(ROOT), "dinov2_vitg14_reg", source="local", pretrained=False, depth=1)
    assert (model.embed_dim, model.num_heads, model.num_register_tokens, model.pos_embed.shape[1]) == (
        1536, 24, 4, 1370)
    assert hasattr(model.blocks[0].mlp, "w12") and (model.blocks[0].ls1.gamma == 1.0).all()


def test_torch_hub_errors(tmp_path, models):
    with pytest.raises(ValueError, match=r"dinov2_vits14: pretrained weights are never downloaded.*weights=PATH"):
        torch.hub.load(str(ROOT), "dinov2_vits14", source="local")
    with pytest.raises(ValueError, match=r"weights='LVD142M' is not a file or folder"):
        torch.hub.load(str(ROOT), "dinov2_vits14", source="local", weights="LVD142M")
    with pytest.raises(ValueError, match="with pretrained=False; drop one"):
        torch.hub.load(str(ROOT), "dinov2_vits14", source="local", pretrained=False, weights="x.pth")
    torch.save(models[SMALL].state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match=r"shape mismatches .*checkpoint \(1152, 384\) vs model \(2304, 768\)"):
        torch.hub.load(str(ROOT), "dinov2_vitb14", source="local", weights=tmp_path / "small.pth", depth=2)
