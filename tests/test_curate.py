"""Tests for curate.py: the exact kNN engine (chunked, bf16-screened, sharded under torchrun), k-means, the balanced
draw, dedup, resumable embedding, and the whole pipeline on the synthetic test pool. CPU only, about a minute."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import curate

ROOT = Path(__file__).resolve().parents[1]
HAVE_VIT_AND_DATA = all(importlib.util.find_spec(m) is not None for m in ("vit", "data"))


def brute_force_knn(queries, database, k):
    """The reference: every score, then one full stable sort per row (equal scores keep the index order)."""
    scores = queries @ database.T  # (Q, N)
    ids = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, ids), ids


def integer_data(n, d, seed, low=-2, high=3):
    """Small integers: every inner product is exact in bf16 and fp32 whatever the summation order, and many are
    equal, so ties are everywhere."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, d), generator=g).float()


def adjusted_rand_index(a, b):
    """ARI of two labelings (Hubert & Arabie), from the contingency table."""
    a, b = np.unique(np.asarray(a), return_inverse=True)[1], np.unique(np.asarray(b), return_inverse=True)[1]
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    comb = lambda x: (x * (x - 1) / 2).sum()  # noqa: E731
    index, rows, cols = comb(table), comb(table.sum(1)), comb(table.sum(0))
    expected = rows * cols / comb(np.array([len(a)]))
    return (index - expected) / ((rows + cols) / 2 - expected)


# ---------------------------------------------------------------------------------------------------------------
# kNN engine


@pytest.mark.parametrize("screen", [False, True])
@pytest.mark.parametrize("Q,N,D,k,query_chunk,db_chunk", [
    (37, 1000, 16, 5, 10, 160),  # several chunks both ways, last ones partial
    (50, 777, 8, 3, 7, 64),  # db chunk not a multiple of the group size at the end
    (20, 300, 4, 10, 20, 48),  # narrow blocks: direct search
    (64, 5000, 3, 7, 64, 1024),  # 3 dims: massive ties
    (5, 3, 4, 10, 2, 2),  # k larger than the database
    (300, 20000, 32, 10, 128, 4096),  # the grouped fast path with straddling ties
    (100, 3000, 8, 1, 100, 1000),  # k = 1 (the k-means assignment)
])
def test_knn_equals_brute_force_with_ties(Q, N, D, k, query_chunk, db_chunk, screen):
    q, db = integer_data(Q, D, 1), integer_data(N, D, 2)
    db[N // 2:N // 2 + 5] = db[1]  # exact duplicate rows: equal scores
    s, i = curate.knn(q, db, k, query_chunk=query_chunk, db_chunk=db_chunk, screen=screen)
    ref_s, ref_i = brute_force_knn(q, db, min(k, N))
    assert torch.equal(i, ref_i)
    assert torch.equal(s, ref_s)


def test_knn_bias_and_float_data():
    q, db, bias = integer_data(40, 6, 3), integer_data(900, 6, 4), integer_data(900, 1, 5)[:, 0]
    s, i = curate.knn(q, db, 6, query_chunk=16, db_chunk=128, bias=bias, screen=True)
    ref = q @ db.T + bias
    ids = torch.tensor([sorted(range(900), key=lambda j: (-row[j], j))[:6] for row in ref.tolist()])  # by hand
    assert torch.equal(i, ids) and torch.equal(s, ref.gather(1, ids))
    # Unit-norm float features, the real use: same neighbours as a full sort, scores to fp32 rounding.
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(200, 64, generator=g), dim=1)
    db = torch.nn.functional.normalize(torch.randn(20000, 64, generator=g), dim=1)
    ref_s, ref_i = (q @ db.T).topk(10, dim=1)
    for screen in (False, True):
        s, i = curate.knn(q, db, 10, query_chunk=64, db_chunk=4096, screen=screen)
        assert torch.equal(i, ref_i)
        torch.testing.assert_close(s, ref_s, rtol=0, atol=1e-5)


def test_ties_broken_by_lower_index():
    db = torch.tensor([[1.0, 0], [0, 1], [1, 0], [1, 0], [0.5, 0], [1, 0]])
    s, i = curate.knn(torch.tensor([[1.0, 0]]), db, 4, db_chunk=2)
    assert i.tolist() == [[0, 2, 3, 5]] and s.tolist() == [[1, 1, 1, 1]]
    # The same ids whatever the chunking and query position.
    q = torch.tensor([[0.0, 1], [1.0, 0], [1.0, 0]])
    for chunk in (1, 2, 3, 6):
        _, i = curate.knn(q, db, 3, query_chunk=chunk, db_chunk=chunk)
        assert i.tolist() == [[1, 0, 2], [0, 2, 3], [0, 2, 3]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import torch, torch.distributed as dist
    import curate
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {{}}
    for name, (Q, N, D, k, seed) in {cases!r}.items():
        g = torch.Generator().manual_seed(seed)
        q = torch.randint(-2, 3, (Q, D), generator=g).float()
        db = torch.randint(-2, 3, (N, D), generator=g).float()
        out[name] = curate.search(q, db, k, query_chunk=17, db_chunk=64)
    emb = torch.nn.functional.normalize(torch.randint(-1, 2, (301, 4), generator=g).float(), dim=1)
    out["dedup"] = curate.dedup(emb, 0.999, k=8)
    torch.save(out, os.path.join(sys.argv[1], f"rank{{rank}}.pt"))
    dist.barrier()
    dist.destroy_process_group()
""")
SHARD_CASES = {"odd_sizes": (50, 1001, 6, 7, 0), "k_above_shard": (9, 5, 3, 4, 1), "ties": (40, 600, 2, 10, 2)}


def test_sharded_knn_under_torchrun_equals_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), cases=SHARD_CASES))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)  # a hang fails here
    results = [tmp_path / f"rank{r}.pt" for r in range(2)]
    assert all(p.exists() for p in results), proc.stdout[-3000:] + proc.stderr[-3000:]
    g = None
    for name, (Q, N, D, k, seed) in SHARD_CASES.items():
        g = torch.Generator().manual_seed(seed)
        q = torch.randint(-2, 3, (Q, D), generator=g).float()
        db = torch.randint(-2, 3, (N, D), generator=g).float()
        ref_s, ref_i = curate.knn(q, db, k)  # one process, the whole database
        assert torch.equal(ref_i, brute_force_knn(q, db, min(k, N))[1])
        for path in results:
            s, i = torch.load(path)[name]
            assert torch.equal(i, ref_i), name
            assert torch.equal(s, ref_s), name
    emb = torch.nn.functional.normalize(torch.randint(-1, 2, (301, 4), generator=g).float(), dim=1)
    keep, labels = curate.dedup(emb, 0.999, k=8)
    for path in results:
        k2, l2 = torch.load(path)["dedup"]
        assert torch.equal(k2, keep) and torch.equal(l2, labels)


# ---------------------------------------------------------------------------------------------------------------
# k-means, hierarchical k-means, balanced sampling


def blobs(n_per, centers, spread, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + spread * torch.randn(n_per, len(c), generator=g) for c in centers])
    return x, torch.arange(len(centers)).repeat_interleave(n_per)


@pytest.mark.parametrize("spherical", [False, True])
def test_kmeans_recovers_blobs_and_inertia_never_increases(spherical):
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1) * 4
    x, truth = blobs(100, centers, 0.3, 1)
    if spherical:
        x = torch.nn.functional.normalize(x, dim=1)
    log = []
    c, a = curate.kmeans(x, 6, n_iter=15, seed=3, spherical=spherical, log=log)
    assert adjusted_rand_index(a.numpy(), truth.numpy()) > 0.99
    assert all(later <= earlier * (1 + 1e-6) + 1e-9 for earlier, later in zip(log, log[1:])), log
    # The returned assignment is the nearest centroid of every point.
    d = torch.cdist(x, c) if not spherical else -(x @ c.T)
    assert torch.equal(a, d.argmin(1))
    # A poor start (random init, more clusters than blobs) still never increases the inertia; none ends empty.
    log = []
    c, a = curate.kmeans(x, 20, n_iter=10, init="random", seed=0, spherical=spherical, log=log)
    assert all(later <= earlier * (1 + 1e-6) + 1e-9 for earlier, later in zip(log, log[1:])), log
    assert torch.bincount(a, minlength=20).min() > 0


def test_empty_clusters_are_reseeded():
    x = torch.cat([torch.zeros(50, 2), torch.tensor([[10.0, 0], [0, 10], [-10, 0]])])  # many identical points
    c, a = curate.kmeans(x, 4, n_iter=5, init="random", seed=0)
    assert torch.bincount(a, minlength=4).min() > 0  # the three far points got their own centroids


def test_hierarchical_kmeans_levels():
    g = torch.Generator().manual_seed(0)
    x, _ = blobs(40, torch.randn(8, 8, generator=g) * 5, 0.5, 2)
    levels = curate.hierarchical_kmeans(x, (16, 4), n_iter=10, resample_steps=3, seed=0)
    assert [lv["centroids"].shape for lv in levels] == [(16, 8), (4, 8)]
    assert levels[0]["assignments"].shape == (320,) and levels[1]["assignments"].shape == (16,)
    assert levels[0]["assignments"].max() < 16 and levels[1]["assignments"].max() < 4
    # Resampling keeps the r points nearest each centroid: check the helper against a loop.
    c, a = curate.kmeans(x, 16, n_iter=5, seed=0)
    picked = set(curate._closest_members(x, c, a, 3).tolist())
    expected = set()
    for j in range(16):
        members = (a == j).nonzero().squeeze(1)
        d = ((x[members] - c[j]) ** 2).sum(1)
        expected |= set(members[d.argsort()[:3]].tolist())
    assert picked == expected


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
# The whole pipeline on the synthetic test pool


@pytest.mark.skipif(not HAVE_VIT_AND_DATA, reason="vit.py / data.py not present")
def test_end_to_end_on_the_synthetic_pool(tmp_path):
    cfg = curate.CurateConfig(out=str(tmp_path / "out"), demo=True)
    run = curate.run_demo(cfg, root=str(tmp_path / "data"), progress=False)
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


def test_cli_rejects_unknown_flags_and_needs_a_pool():
    with pytest.raises(SystemExit):
        curate.parse_args(["--pool", "x", "--no-such-flag", "1"])
    with pytest.raises(SystemExit):
        curate.parse_args([])
    cfg = curate.parse_args(["--pool", "p", "--retrieve-k", "8", "--target", "1000"])
    assert cfg.retrieve_k == 8 and cfg.target == 1000.0
