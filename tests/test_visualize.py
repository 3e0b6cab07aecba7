"""visualize.py: PCA maps, attention with registers, any image size, bad images, schedules and curves plots."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import visualize
import vit


def _png_size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_pca_maps_separate_foreground_with_one_shared_basis():
    """Patch features: background -v, foreground +v plus one of two 'part' directions. The first component must
    find the foreground (oriented so the border is background), background is black, and a part has the same
    colour in both images (one basis for the batch)."""
    D = 8
    v, part_a, part_b = torch.eye(D)[0] * 4, torch.eye(D)[1], torch.eye(D)[2]
    feats, truth = [], []
    for h, w, box in ((4, 4, (1, 3, 1, 3)), (4, 6, (1, 3, 2, 5))):  # different grids: joint PCA still works
        fg = torch.zeros(h, w, dtype=torch.bool)
        fg[box[0]:box[1], box[2]:box[3]] = True
        f = torch.where(fg[..., None], v, -v).clone()  # (h, w, D)
        cols = torch.arange(w)[None, :].expand(h, w)
        f[fg & (cols % 2 == 0)] += part_a  # two parts of the object
        f[fg & (cols % 2 == 1)] += part_b
        feats.append(f.reshape(h * w, D))
        truth.append((fg, cols))
    maps, fgs = visualize.pca_maps(feats, [(4, 4), (4, 6)])
    colours = {}
    for rgb, fg_pred, (fg, cols) in zip(maps, fgs, truth):
        assert np.array_equal(fg_pred, fg.numpy())
        assert rgb.min() >= 0 and rgb.max() <= 1 and np.all(rgb[~fg.numpy()] == 0)  # background black
        for parity in (0, 1):
            sel = (fg & (cols % 2 == parity)).numpy()
            colours.setdefault(parity, []).append(rgb[sel].mean(0))
    for parity in (0, 1):  # the same part has the same colour in both images
        assert np.allclose(colours[parity][0], colours[parity][1], atol=1e-5)
    assert not np.allclose(colours[0][0], colours[1][0])  # and different parts differ


def test_cls_attention_excludes_registers():
    torch.manual_seed(0)
    model = vit.VisionTransformer(img_size=28, embed_dim=64, depth=2, num_heads=2, num_register_tokens=3).eval()
    x = torch.randn(1, 3, 28, 42)  # 2x3 patches, non-square
    att = visualize.cls_attention(model, x)
    full = model.get_last_self_attention(x)  # (1, H, 1+R+N, 1+R+N)
    assert att.shape == (2, 2, 3)
    assert torch.allclose(att.flatten(1), full[0, :, 0, 4:])  # cls row, after the 3 registers


def test_resize_to_patches_any_aspect_and_tiny():
    assert visualize.resize_to_patches(Image.new("RGB", (60, 30)), 28, 14).size == (56, 28)
    assert visualize.resize_to_patches(Image.new("RGB", (30, 90)), 100, 14).size == (98, 294)
    assert visualize.resize_to_patches(Image.new("RGB", (10, 10)), 28, 14).size == (28, 28)  # resized up
    assert visualize.resize_to_patches(Image.new("RGB", (10, 10)), 5, 14).size == (14, 14)  # at least one patch


def test_synthetic_png_with_and_without_attention(tmp_path):
    plain, att = tmp_path / "plain.png", tmp_path / "att.png"
    visualize.main(["--random", "--n-synthetic", "2", "--size", "50", "--out", str(plain)])  # 50 -> 56
    visualize.main(["--random", "--n-synthetic", "2", "--attention", "--out", str(att)])
    (w0, h0), (w1, h1) = _png_size(plain), _png_size(att)
    assert h0 == h1 and w1 > w0  # same rows; attention adds one column per head (vit_tiny: 3)


def test_image_folder_non_square_tiny_and_unreadable(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 90, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(folder / "tiny.jpg")  # < one patch
    (folder / "broken.png").write_bytes(b"not an image at all")
    out = tmp_path / "viz.png"
    with pytest.warns(UserWarning, match="unreadable image .*broken.png"):
        visualize.main([str(folder), "--random", "--size", "42", "--attention", "--out", str(out)])
    w, h = _png_size(out)
    assert h > 0 and w > 0
    images = visualize.collect_images([folder / "wide.png", folder / "tiny.jpg"])
    assert [name for name, _ in images] == ["wide.png", "tiny.jpg"]
    with pytest.warns(UserWarning, match="no such file"):
        assert visualize.collect_images([tmp_path / "missing.png"]) == []
    with pytest.raises(ValueError, match="no readable image"), pytest.warns(UserWarning, match="unreadable"):
        visualize.main([str(folder / "broken.png"), "--random", "--out", str(out)])


def test_curves_from_metrics_jsonl(tmp_path):
    rows = [dict(step=s, loss=3.0 - 0.1 * s, dino_global=1.0 / (s + 1), dino_local=1.5, koleo=-0.1 * s,
                 lr=1e-4 * s, images_per_s=100.0) for s in range(10)]
    rows[3].pop("koleo")  # a missing key
    rows[5]["ibot"] = 0.5  # a key that appears late
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="skipped 1 line"):
        out = visualize.main(["--curves", str(tmp_path), "--out", str(tmp_path / "curves.png")])
    w, h = _png_size(out)
    assert w > 0 and h > 0
    with pytest.warns(UserWarning):
        assert len(visualize.read_metrics(tmp_path / "metrics.jsonl")) == 10
    keys = [k for k in rows[5] if visualize._is_curve(k)]
    assert keys == ["loss", "dino_global", "dino_local", "koleo", "lr", "ibot"]  # not step, not images_per_s
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        visualize.main(["--curves", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")])


def test_dry_run_draws_the_schedules(tmp_path):
    # train.py --dry-run draws the run's schedules (visualize never imports train: no import cycle)
    import train
    with pytest.raises(SystemExit) as e:
        train.train(train.parse_config(argv=["--arch", "vit_s", "--dry-run", "--out", str(tmp_path)]))
    assert e.value.code == 0
    assert _png_size(tmp_path / "schedules.png")[0] > 0


def test_unknown_flag_rejected(capsys):
    with pytest.raises(SystemExit):
        visualize.parse_config(["--bogus"])
    assert "unrecognized arguments" in capsys.readouterr().err
    cfg = visualize.parse_config(["a.png", "photos", "--size", "98", "--attention"])  # positional images kept
    assert cfg.images == ["a.png", "photos"] and cfg.size == 98 and cfg.attention


def test_weights_errors_are_one_line(tmp_path, capsys):
    # issue 12, defects 4 and 9: a truncated or text --weights is one `error:` line naming the file, exit 1, without
    # torch's "weights_only=False" advice; --debug would show the traceback
    from util import cli
    torch.save(vit.build_model("vit_tiny", img_size=56).state_dict(), tmp_path / "good.pth")
    raw = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "notes.pth").write_text("my notes")
    for name, why in (("cut.pth", "corrupt or truncated"), ("notes.pth", "text file")):
        with pytest.raises(SystemExit) as e:
            cli.run(visualize.main, ["--weights", str(tmp_path / name), "--n-synthetic", "1"])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("error: ") and name in err
        assert why in err and "weights_only" not in err and "Traceback" not in err


def test_hub_layout_weights_with_registers(tmp_path):
    """A file laid out like dinov2_vits14_reg (518 px pos-embed, 4 registers, LayerScale) at a non-square size."""
    torch.manual_seed(0)
    model = vit.build_model("vit_tiny", img_size=518, num_register_tokens=4, init_values=1.0)
    torch.save(model.state_dict(), tmp_path / "reg.pth")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 80, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = visualize.main([str(tmp_path / "a.png"), "--weights", str(tmp_path / "reg.pth"), "--size", "42",
                          "--attention", "--out", str(tmp_path / "reg.png")])
    assert _png_size(out)[0] > 0


def test_compare_reads_each_runs_monitor(tmp_path):
    # two runs of different lengths; the monitor logged on some rows only, the raw-pixel line on the same rows
    for name, n, slope in (("short", 5, 2.0), ("long", 15, 1.0)):
        rows = [dict(step=10 * s, loss=1.0, lr=1e-3) for s in range(1, n + 1)]
        for r in rows[1::2]:
            r.update(knn_top1=20.0 + slope * r["step"] / 10, knn_raw_pixels=42.0)
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    steps, knn, raw = visualize.monitor_series(visualize.read_metrics(tmp_path / "short" / "metrics.jsonl"))
    assert steps == [20, 40] and knn == [24.0, 28.0] and raw == 42.0
    out = visualize.main(["--compare", str(tmp_path / "short"), str(tmp_path / "long"),
                          "--out", str(tmp_path / "cmp.png")])
    assert min(_png_size(out)) > 0
    (tmp_path / "nomon").mkdir()
    (tmp_path / "nomon" / "metrics.jsonl").write_text(json.dumps(dict(step=1, loss=1.0)) + "\n")
    with pytest.raises(ValueError, match="logged no k-NN monitor"):
        visualize.main(["--compare", str(tmp_path / "short"), str(tmp_path / "nomon"), "--out", str(out)])
    with pytest.raises(FileNotFoundError, match="--compare: no metrics file"):
        visualize.main(["--compare", str(tmp_path / "nowhere"), "--out", str(out)])
    with pytest.raises(SystemExit):  # a usage error: one plot at a time
        visualize.main(["--curves", str(tmp_path / "short"), "--compare", str(tmp_path / "long")])
