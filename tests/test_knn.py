"""Tests for knn.py, the project's kNN engine: exact search (chunked, bf16-screened, ties to the lower index), k-means
and hierarchical k-means with resampling, and, under torchrun with 2 gloo ranks, sharded search, sharded k-means,
sharded hierarchical k-means, evaluate.py's sharded k-NN and curate.py's sharded pipeline, each equal to one process."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench  # its clustered_rows: the data set bench.py --mode knn times
import knn

ROOT = Path(__file__).resolve().parents[1]


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
# Exact search


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
    s, i = knn.knn(q, db, k, query_chunk=query_chunk, db_chunk=db_chunk, screen=screen)
    ref_s, ref_i = brute_force_knn(q, db, min(k, N))
    assert torch.equal(i, ref_i)
    assert torch.equal(s, ref_s)


def test_knn_bias_and_float_data():
    q, db, bias = integer_data(40, 6, 3), integer_data(900, 6, 4), integer_data(900, 1, 5)[:, 0]
    s, i = knn.knn(q, db, 6, query_chunk=16, db_chunk=128, bias=bias, screen=True)
    ref = q @ db.T + bias
    ids = torch.tensor([sorted(range(900), key=lambda j: (-row[j], j))[:6] for row in ref.tolist()])  # by hand
    assert torch.equal(i, ids) and torch.equal(s, ref.gather(1, ids))
    # Unit-norm float features, the real use: same neighbours as a full sort, scores to fp32 rounding.
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(200, 64, generator=g), dim=1)
    db = torch.nn.functional.normalize(torch.randn(20000, 64, generator=g), dim=1)
    ref_s, ref_i = (q @ db.T).topk(10, dim=1)
    for screen in (False, True):
        s, i = knn.knn(q, db, 10, query_chunk=64, db_chunk=4096, screen=screen)
        assert torch.equal(i, ref_i)
        torch.testing.assert_close(s, ref_s, rtol=0, atol=1e-5)


def test_ties_broken_by_lower_index():
    db = torch.tensor([[1.0, 0], [0, 1], [1, 0], [1, 0], [0.5, 0], [1, 0]])
    s, i = knn.knn(torch.tensor([[1.0, 0]]), db, 4, db_chunk=2)
    assert i.tolist() == [[0, 2, 3, 5]] and s.tolist() == [[1, 1, 1, 1]]
    # The same ids whatever the chunking and query position.
    q = torch.tensor([[0.0, 1], [1.0, 0], [1.0, 0]])
    for chunk in (1, 2, 3, 6):
        _, i = knn.knn(q, db, 3, query_chunk=chunk, db_chunk=chunk)
        assert i.tolist() == [[1, 0, 2], [0, 2, 3], [0, 2, 3]]


# ---------------------------------------------------------------------------------------------------------------
# k-means, hierarchical k-means


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
    c, a = knn.kmeans(x, 6, n_iter=15, seed=3, spherical=spherical, log=log)
    assert adjusted_rand_index(a.numpy(), truth.numpy()) > 0.99
    assert all(later <= earlier * (1 + 1e-6) + 1e-9 for earlier, later in zip(log, log[1:])), log
    # The returned assignment is the nearest centroid of every point.
    d = torch.cdist(x, c) if not spherical else -(x @ c.T)
    assert torch.equal(a, d.argmin(1))
    # A poor start (random init, more clusters than blobs) still never increases the inertia; none ends empty.
    log = []
    c, a = knn.kmeans(x, 20, n_iter=10, init="random", seed=0, spherical=spherical, log=log)
    assert all(later <= earlier * (1 + 1e-6) + 1e-9 for earlier, later in zip(log, log[1:])), log
    assert torch.bincount(a, minlength=20).min() > 0


@pytest.mark.parametrize("spherical", [False, True])
def test_assign_with_and_without_the_bf16_screen_equals_brute_force(spherical):
    # Small integers: exact distances, many ties (the lower centroid index must win), rows the screen cannot decide.
    x, c = integer_data(3000, 8, 0), integer_data(60, 8, 1)
    c[30:35] = c[2]  # duplicate centroids: exact ties
    if spherical:
        x, c = F.normalize(x + 0.5, dim=1), F.normalize(c + 0.5, dim=1)
    d = ((x[:, None] - c[None]) ** 2).sum(-1) if not spherical else -(x @ c.T)  # (N, K)
    ref = torch.tensor([min(range(60), key=lambda j: (float(row[j]), j)) for row in d])  # by hand, lower index
    for screen in (False, True):
        a = knn._assign(x, c, spherical, screen=screen, chunk=700)
        if spherical:  # inner products of unit vectors are rounded: any best to fp32 rounding is right
            assert (d.gather(1, a[:, None]) <= d.min(1, keepdim=True).values + 1e-6).all()
        else:
            assert torch.equal(a, ref)
    # Clustered float data: the screen decides most rows and gives the fp32 answer.
    x, c = bench.clustered_rows(0, 5000, 32, n_centres=20), bench.clustered_rows(0, 40, 32, n_centres=20, seed=3)
    ref = torch.cdist(x, c).argmin(1)
    assert torch.equal(knn._assign(x, c, screen=True), ref) and torch.equal(knn._assign(x, c, screen=False), ref)


def test_empty_clusters_are_reseeded():
    x = torch.cat([torch.zeros(50, 2), torch.tensor([[10.0, 0], [0, 10], [-10, 0]])])  # many identical points
    c, a = knn.kmeans(x, 4, n_iter=5, init="random", seed=0)
    assert torch.bincount(a, minlength=4).min() > 0  # the three far points got their own centroids


def test_hierarchical_kmeans_levels():
    g = torch.Generator().manual_seed(0)
    x, _ = blobs(40, torch.randn(8, 8, generator=g) * 5, 0.5, 2)
    levels = knn.hierarchical_kmeans(x, (16, 4), n_iter=10, resample_steps=3, seed=0)
    assert [lv["centroids"].shape for lv in levels] == [(16, 8), (4, 8)]
    assert levels[0]["assignments"].shape == (320,) and levels[1]["assignments"].shape == (16,)
    assert levels[0]["assignments"].max() < 16 and levels[1]["assignments"].max() < 4
    # Resampling keeps the r points nearest each centroid: check the helper against a loop.
    c, a = knn.kmeans(x, 16, n_iter=5, seed=0)
    picked = set(knn._closest_members(x, c, a, 3).tolist())
    expected = set()
    for j in range(16):
        members = (a == j).nonzero().squeeze(1)
        d = ((x[members] - c[j]) ** 2).sum(1)
        expected |= set(members[d.argsort()[:3]].tolist())
    assert picked == expected


def test_closest_members_breaks_distance_ties_by_lower_row():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (300, 3), generator=g).float()  # small integers: many points at equal distances
    c, a = knn.kmeans(x, 7, n_iter=3, seed=0)
    for r in (1, 4, 30, 1000):
        d2 = ((x - c[a]) ** 2).sum(1)
        expected = []
        for j in range(7):
            members = sorted((a == j).nonzero().squeeze(1).tolist(), key=lambda i: (float(d2[i]), i))
            expected += members[:r]
        assert knn._closest_members(x, c, a, r).tolist() == sorted(expected)


def test_top_rows_and_gather_rows_one_process():
    v = torch.tensor([0.5, 2.0, 2.0, -1.0, 2.0, 0.5])
    assert knn.top_rows(v, 4, offset=10).tolist() == [11, 12, 14, 10]  # value desc, then the lower row
    x = torch.arange(12.0).view(6, 2)
    assert knn.gather_rows(x, [13, 10], offset=10).tolist() == [[6.0, 7.0], [0.0, 1.0]]


def test_hierarchical_kmeans_resumes_finished_levels(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, _ = blobs(30, torch.randn(6, 8, generator=g) * 5, 0.5, 3)
    first = knn.hierarchical_kmeans(x, (12, 3), n_iter=5, resample_steps=2, seed=0, resume_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["level1.pt", "level2.pt"]

    def no_kmeans(*args, **kwargs):
        raise AssertionError("a finished level was recomputed")
    monkeypatch.setattr(knn, "kmeans", no_kmeans)
    again = knn.hierarchical_kmeans(x, (12, 3), n_iter=5, resample_steps=2, seed=0, resume_dir=str(tmp_path))
    for a, b in zip(first, again):
        assert torch.equal(a["centroids"], b["centroids"]) and torch.equal(a["assignments"], b["assignments"])
    with pytest.raises(AssertionError, match="recomputed"):  # other data: the saved levels do not apply
        knn.hierarchical_kmeans(x + 1, (12, 3), n_iter=5, resample_steps=2, seed=0, resume_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Two gloo ranks under torchrun against one process: one launch checks everything that shards


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def search_case(Q, N, D, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (Q, D), generator=g).float(), torch.randint(-2, 3, (N, D), generator=g).float()


def clustered(n, d, k, seed):
    """n points around k centres (float data: distances have no exact ties), plus exact duplicate points."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, d, generator=g)[torch.randint(k, (n,), generator=g)] * 3 + torch.randn(n, d, generator=g)
    x[n // 2:n // 2 + 20] = x[3]  # a pile of identical points: empty clusters and resampling ties
    return x


def pool_case():
    """Unit embeddings of a pool (with duplicates, unreadable zero rows), seeds and an evaluation set."""
    g = torch.Generator().manual_seed(7)
    pool = F.normalize(clustered(701, 16, 12, 5), dim=1)
    pool[100:130] = pool[200:230]  # near-duplicates
    pool[50:55] = 0  # unreadable images
    seeds = F.normalize(pool[300:320] + 0.05 * torch.randn(20, 16, generator=g), dim=1)
    return pool, seeds, pool[400:405].clone()


SEARCH_CASES = {"odd_sizes": (50, 1001, 6, 7, 0), "k_above_shard": (9, 5, 3, 4, 1), "ties": (40, 600, 2, 10, 2)}
KMEANS_CASES = {"plusplus": dict(k=24, init="kmeans++"), "random_empty": dict(k=40, init="random"),
                "spherical": dict(k=16, init="kmeans++", spherical=True)}

WORKER = textwrap.dedent("""
    import os, resource, sys, dataclasses
    sys.path.insert(0, {root!r})
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch, torch.distributed as dist
    import knn, curate, evaluate
    from test_knn import SEARCH_CASES, KMEANS_CASES, search_case, clustered, pool_case
    from util.distributed import init
    init("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {{}}
    for name, (Q, N, D, k, seed) in SEARCH_CASES.items():
        q, db = search_case(Q, N, D, seed)
        out[name] = knn.ShardedKNN.from_full(db).search(q, k, query_chunk=17, db_chunk=64)
    x = clustered(1001, 8, 10, 0)
    cut = [0, 130, 1001]  # an uneven split: shards need not be equal
    for name, kw in KMEANS_CASES.items():
        c, a = knn.kmeans(x[cut[rank]:cut[rank + 1]], n_iter=8, seed=1, **kw)
        out["kmeans_" + name] = (c, knn.gather_shards(a))
    lo, hi = knn.shard_range(len(x), rank, world)
    levels = knn.hierarchical_kmeans(x[lo:hi], (30, 6), n_iter=6, resample_steps=2, seed=0)
    out["hkmeans"] = [(lv["centroids"], knn.gather_shards(lv["assignments"]) if i == 0 else lv["assignments"])
                      for i, lv in enumerate(levels)]
    train, test = clustered(333, 8, 5, 2), clustered(41, 8, 5, 3)
    labels = torch.arange(333) % 7
    out["eval_knn"] = evaluate.knn_classify(train, labels, test, 7, ks=(1, 5, 20, 200), chunk=16)
    pool, seeds, exclude = pool_case()
    cfg = curate.CurateConfig(out=os.path.join(sys.argv[1], "curate2"), clusters="40,6", kmeans_iters=5,
                              resample_steps=2, dedup_threshold=0.99, exclude_threshold=0.99, target=0.5)
    r = curate.curate(pool.numpy(), seeds.numpy(), exclude.numpy(), cfg, progress=False)
    out["curate"] = {{key: r[key] for key in ("selected", "after_dedup", "kept", "candidates", "dup_group")}}
    out["curate"]["centroids"] = [lv["centroids"] for lv in r["levels"]]
    torch.save(out, os.path.join(sys.argv[1], f"rank{{rank}}.pt"))
    dist.barrier()
    dist.destroy_process_group()
""")


def test_two_ranks_equal_one_process(tmp_path):
    """Sharded search, k-means (three inits, empty clusters re-seeded), hierarchical k-means with resampling,
    evaluate's k-NN and the curate pipeline on 2 gloo ranks give what one process gives on all the data."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    (tmp_path / "test_knn.py").write_text(Path(__file__).read_text())  # the worker imports the cases from here
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)  # a hang fails here
    paths = [tmp_path / f"rank{r}.pt" for r in range(2)]
    assert all(p.exists() for p in paths), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [torch.load(p) for p in paths]
    close = dict(rtol=1e-5, atol=1e-5)
    for name, (Q, N, D, k, seed) in SEARCH_CASES.items():
        q, db = search_case(Q, N, D, seed)
        ref_s, ref_i = brute_force_knn(q, db, min(k, N))
        for res in results:
            assert torch.equal(res[name][1], ref_i) and torch.equal(res[name][0], ref_s), name
    x = clustered(1001, 8, 10, 0)
    for name, kw in KMEANS_CASES.items():
        c, a = knn.kmeans(x, n_iter=8, seed=1, **kw)
        for res in results:
            torch.testing.assert_close(res["kmeans_" + name][0], c, **close)
            assert torch.equal(res["kmeans_" + name][1], a), name  # identical assignments
    levels = knn.hierarchical_kmeans(x, (30, 6), n_iter=6, resample_steps=2, seed=0)
    for res in results:
        for (c, a), lv in zip(res["hkmeans"], levels):
            torch.testing.assert_close(c, lv["centroids"], **close)
            assert torch.equal(a, lv["assignments"])
    import evaluate  # noqa: E402  (imports vit and data)
    train, test = clustered(333, 8, 5, 2), clustered(41, 8, 5, 3)
    ref = evaluate.knn_classify(train, torch.arange(333) % 7, test, 7, ks=(1, 5, 20, 200), chunk=16)
    for res in results:
        assert all(torch.equal(res["eval_knn"][k], ref[k]) for k in ref)
    import curate
    pool, seeds, exclude = pool_case()
    cfg = curate.CurateConfig(out=str(tmp_path / "curate1"), clusters="40,6", kmeans_iters=5, resample_steps=2,
                              dedup_threshold=0.99, exclude_threshold=0.99, target=0.5)
    r = curate.curate(pool.numpy(), seeds.numpy(), exclude.numpy(), cfg, progress=False)
    assert r["report"]["removed_duplicates"] >= 30 and r["report"]["unreadable"] == 5
    for res in results:
        for key in ("selected", "after_dedup", "kept", "candidates", "dup_group"):
            assert torch.equal(res["curate"][key], r[key]), key
        for c, lv in zip(res["curate"]["centroids"], r["levels"]):
            torch.testing.assert_close(c, lv["centroids"], **close)
