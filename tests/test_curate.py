"""Tests for curate.py: the balanced draw, dedup, exclusion and retrieval, resumable embedding read lazily from its
chunks, and the whole pipeline on the synthetic test pool. CPU only, about a minute. The kNN engine and k-means, and
the pipeline sharded over 2 ranks, are tested in test_knn.py."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import curate

ROOT = Path(__file__).resolve().parents[1]
HAVE_VIT_AND_DATA = all(importlib.util.find_spec(m) is not None for m in ("vit", "data"))


# ---------------------------------------------------------------------------------------------------------------
# Balanced sampling


def test_balanced_sample_draws_evenly():
    # 4 level-1 clusters of 50, 5, 20, 1 items; level 2 groups them as {0, 1} and {2, 3}.
    level1 = torch.tensor([0] * 50 + [1] * 5 + [2] * 20 + [3] * 1)
    level2 = torch.tensor([0, 0, 1, 1])
    picked = curate.balanced_sample([level1, level2], 20, seed=0)
    assert len(picked) == 20 and len(set(picked.tolist())) == 20
    # 10 per top cluster; inside {50, 5}: 5 + 5 (the small one gives all it has); inside {20, 1}: 9 + 1.
    assert torch.bincount(level1[picked], minlength=4).tolist() == [5, 5, 9, 1]
    # Asking for more than there is returns everything; an uneven remainder still sums exactly.
    assert curate.balanced_sample([level1, level2], 500).tolist() == list(range(76))
    for n in range(0, 77, 7):
        counts = torch.bincount(level1[curate.balanced_sample([level1, level2], n, seed=n)], minlength=4)
        assert counts.sum() == n and (counts <= torch.tensor([50, 5, 20, 1])).all()
    shares = curate._water_fill([3, 10, 10, 1], 13, np.random.default_rng(0))
    assert shares.sum() == 13 and sorted(shares.tolist())[:2] == [1, 3] and sorted(shares.tolist())[2:] == [4, 5]


# ---------------------------------------------------------------------------------------------------------------
# Dedup


def test_connected_components_and_dedup():
    labels = curate.connected_components(7, [5, 1, 3, 6], [3, 2, 1, 6])
    assert labels.tolist() == [0, 1, 1, 1, 4, 1, 6]  # 1-2, 3-1, 5-3 chain into one group rooted at 1
    emb = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0, 0], [0, 1, 0], [1, 0.01, 0], [0, 0, 1], [0.01, 1, 0], [1, 0, 0.02]]), dim=1)
    keep, labels = curate.dedup(emb, 0.99, k=4)
    assert keep.tolist() == [0, 1, 3] and labels.tolist() == [0, 1, 0, 3, 1, 0]
    assert curate.remove_near(emb, emb[[3]], 0.99).tolist() == [0, 1, 2, 4, 5]


def test_retrieval():
    pool = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.1], [0, 0, 1], [0.8, 0.2, 0]]), dim=1)
    seeds = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05, 0], [0, 1, 0.05]]), dim=1)
    ids, neighbours = curate.retrieve(seeds, pool, k=2)
    assert neighbours.tolist() == [[0, 1], [2, 3]] and ids.tolist() == [0, 1, 2, 3]
    # Small seed sets: m images from each seed's cluster (clusters: {0, 1, 5}, {2, 3}, {4}).
    centroids = torch.nn.functional.normalize(torch.eye(3), dim=1)
    assignments = torch.tensor([0, 0, 1, 1, 2, 0])
    picked = curate.retrieve_from_clusters(seeds, centroids, assignments, m=2, seed=0)
    assert len(picked) == 4 and set(picked.tolist()) <= {0, 1, 5, 2, 3} and {2, 3} <= set(picked.tolist())


# ---------------------------------------------------------------------------------------------------------------
# Embedding: ViT path and resume from on-disk chunks


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, 0

    def forward(self, x):
        self.seen += len(x)
        return self.model(x)


@pytest.mark.skipif(not HAVE_VIT_AND_DATA, reason="vit.py / data.py not present")
def test_embed_vit_and_resume(tmp_path):
    from data import SyntheticDataset
    from vit import build_model
    ds = SyntheticDataset(n=10, size=32, n_classes=3, seed=0)
    paths = []
    for i in range(10):
        paths.append(str(tmp_path / f"{i}.png"))
        ds[i][0].save(paths[-1])
    torch.manual_seed(0)
    vit = build_model("vit_tiny", img_size=28, patch_size=14, depth=2).eval()
    out = tmp_path / "emb"
    first = curate.embed(paths, vit, str(out), batch_size=3, size=28, device="cpu", chunk_size=4, progress=False)
    # Equal to a direct forward of the same preprocessing, L2-normalised.
    images = curate._Images(paths, 28)
    x = torch.stack([images[i][0] for i in range(10)])
    with torch.no_grad():
        ref = torch.nn.functional.normalize(vit(x), dim=1).numpy()
    np.testing.assert_allclose(first, ref, atol=1e-5)
    for lo, hi in ((0, 10), (3, 9), (4, 8), (7, 7), (9, 10)):  # row ranges read lazily across chunk boundaries
        np.testing.assert_array_equal(first[lo:hi], np.asarray(first)[lo:hi])
    assert sorted(os.listdir(out)) == sorted(["meta.json"] + [f"chunk_{c:06d}.{e}" for c in range(3)
                                                               for e in ("npy", "done")])
    # Simulate an interrupted run: chunk 1 lost. The rerun redoes only its 4 images and gives the same array.
    (out / "chunk_000001.npy").unlink()
    (out / "chunk_000001.done").unlink()
    counting = CountingModel(vit)
    second = curate.embed(paths, counting, str(out), batch_size=3, size=28, device="cpu", chunk_size=4,
                          progress=False)
    assert counting.seen == 4
    np.testing.assert_array_equal(first, second)
    counting.seen = 0
    curate.embed(paths, counting, str(out), batch_size=3, size=28, device="cpu", chunk_size=4, progress=False)
    assert counting.seen == 0  # everything done: nothing recomputed
    with pytest.raises(ValueError, match="other images"):
        curate.embed(paths[:5], vit, str(out), size=28, device="cpu", chunk_size=4, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# The whole pipeline on the synthetic test pool (curate_demo.py)


@pytest.mark.skipif(not HAVE_VIT_AND_DATA, reason="vit.py / data.py not present")
def test_end_to_end_on_the_synthetic_pool(tmp_path):
    import curate_demo
    cfg = curate.CurateConfig(out=str(tmp_path / "out"))
    run = curate_demo.run_demo(cfg, root=str(tmp_path / "data"), progress=False)
    m, truth = run["metrics"], run["truth"]
    print(json.dumps(m, indent=1))
    assert m["dedup_precision"] >= 0.95 and m["dedup_recall"] >= 0.95
    assert m["exclude_recall"] == 1.0  # no evaluation image (nor a copy of one) left in the pool
    assert m["retrieval_precision"] >= 0.9 and m["retrieved_in_seed_classes"] >= 0.9
    assert m["entropy_balanced_bits"] > m["entropy_candidates_bits"]
    # The outputs: a file list that data.ImageFolderDataset reads, the report, the plot.
    from data import ImageFolderDataset
    listed = ImageFolderDataset(str(tmp_path / "out" / "curated.txt"))
    selected = run["result"]["selected"].tolist()
    assert [p for p, _ in listed.samples] == [os.path.abspath(truth["pool"][i]) for i in selected]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pool"] == len(truth["pool"]) and report["selected"] == len(selected)
    assert report["removed_duplicates"] + report["removed_near_exclude"] + report["kept_after_dedup_exclude"] \
        == report["pool"]
    assert (tmp_path / "out" / "clusters.png").stat().st_size > 0


def test_cli_rejects_unknown_flags_and_needs_a_pool(tmp_path, capsys):
    with pytest.raises(SystemExit):
        curate.parse_args(["--pool", "x", "--no-such-flag", "1"])
    with pytest.raises(SystemExit):
        curate.parse_args([])
    cfg = curate.parse_args(["--pool", str(tmp_path), "--retrieve-k", "8", "--target", "1000"])
    assert cfg.retrieve_k == 8 and cfg.target == 1000.0
    # issue 12: out-of-range flags are usage errors naming the flag; a missing folder is a MissingFile naming it
    for flag, value in (("--chunk-size", "0"), ("--target", "-5"), ("--dedup-threshold", "1.5"), ("--clusters", "x")):
        with pytest.raises(SystemExit) as e:
            curate.parse_args(["--pool", str(tmp_path), flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--pool .*nowhere"):
        curate.parse_args(["--pool", str(tmp_path / "nowhere")])


def test_clusters_are_capped_by_the_level_below_with_a_note(capsys):
    cfg = curate.CurateConfig(pool="p", clusters="1000,50")
    assert curate._cluster_sizes(12, cfg) == [12, 12]
    assert "asks for 1000 clusters of 12 images" in capsys.readouterr().out


@pytest.mark.skipif(not HAVE_VIT_AND_DATA, reason="vit.py / data.py not present")
def test_out_folder_of_another_pool_is_one_error_line(tmp_path):
    """Issue item 7: `curate.py --out` on a folder that holds the embeddings of another pool, run as a user would:
    one `error:` line that names the folder and what to do, exit status 1, no traceback."""
    from PIL import Image
    from conftest import run_script
    from vit import build_model
    torch.manual_seed(0)
    model = build_model("vit_tiny", img_size=28, depth=1).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    pools = {}
    for name, blue in (("a", 60), ("b", 200)):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (32, 32), (70 * i, 90, blue)).save(tmp_path / name / f"{i}.png")
        pools[name] = sorted(str(p) for p in (tmp_path / name).glob("*.png"))
    emb_dir = tmp_path / "out" / "embeddings" / "pool"
    curate.embed(pools["a"], model, str(emb_dir), size=28, device="cpu", progress=False)  # pool a's embeddings
    proc = run_script(["--pool", str(tmp_path / "b"), "--weights", str(tmp_path / "w.pth"), "--size", "28",
                       "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "out")], script="curate.py")
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and err.count("\n") == 0 and err.startswith("error: "), proc.stderr
    assert str(emb_dir) in err and "holds embeddings of other images" in err and "--out" in err
    assert sorted(os.listdir(emb_dir)) == ["chunk_000000.done", "chunk_000000.npy", "meta.json"]  # left untouched
