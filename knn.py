"""Exact k nearest neighbours, sharded over ranks, and k-means on top: the search behind curate.py (paper §3: dedup,
evaluation-set removal, retrieval, hierarchical k-means of Vo et al. 2024) and evaluate.py's k-NN classifier.
Ties go to the lower row number, so results depend neither on the chunking nor on the number of ranks. Under
torchrun every function takes this rank's shard of the rows (the shards in rank order are the data) and returns
what one process returns on all of them (k-means: the same centroids to float rounding, the same assignments).
NOTE(deviation): the paper searched and clustered with Faiss (GPU IVF+PQ, approximate); everything here is exact.

    lexsort_rows, select_topk, knn                      exact inner-product top-k, chunked
    shard_range, shard_offset, gather_rows, top_rows    rows sharded over ranks
    ShardedKNN                                          a database split across ranks, per-rank lists merged
    kmeans_plusplus, kmeans, hierarchical_kmeans        Lloyd's k-means; Vo et al.'s tree with resampling
    (section 5: the bf16 fast path, the same results about twice as fast on CPUs with bf16 units)

No command line: tests/test_knn.py checks it, `python bench.py --mode knn` times it. Q queries, N rows, D, K clusters.
"""
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from util.checkpoint import atomic_save
from util.distributed import all_gather_cat, all_reduce_sum, gather_shards, is_dist, rank_world


# ---------------------------------------------------------------------------------------------------------------
# 1. Exact k nearest neighbours by inner product (features are L2-normalised beforehand, so this is cosine)

NO_ID = torch.iinfo(torch.int64).max  # id of a padding entry (score -inf): loses every tie, is never a real row


def lexsort_rows(scores, ids):
    """Sort each row by score, highest first, equal scores by lower id. (Q, C), (Q, C) -> same shapes."""
    order = ids.argsort(dim=1)
    scores, ids = scores.gather(1, order), ids.gather(1, order)
    order = scores.argsort(dim=1, descending=True, stable=True)  # stable: equal scores keep the id order
    return scores.gather(1, order), ids.gather(1, order)


def select_topk(scores, ids, k):
    """The k best entries of each row under the order (score desc, id asc). (Q, C) -> (Q, k), sorted by score.
    torch.topk breaks ties arbitrarily: a row with a tie across the cut is redone with a full lexicographic sort."""
    if scores.shape[1] <= k:
        return scores, ids
    top, pos = scores.topk(k + 1, dim=1)  # (Q, k+1), sorted
    straddle = top[:, k - 1] == top[:, k]
    top, sel = top[:, :k].contiguous(), ids.gather(1, pos[:, :k])
    if straddle.any():
        rows = straddle.nonzero().squeeze(1)
        s, i = lexsort_rows(scores[rows], ids[rows])
        top[rows], sel[rows] = s[:, :k], i[:, :k]
    return top, sel


def knn(queries, database, k, query_chunk=4096, db_chunk=16384, bias=None, screen="auto", progress=False):
    """Exact k nearest neighbours by inner product: (Q, D), (N, D) -> scores (Q, k), indices (Q, k), rows sorted
    by score, then lower index. Memory: one (query_chunk, db_chunk) score block plus the running lists. `bias` (N,)
    is added to every score column (as one more matmul coordinate). screen: section 5's bf16 fast path ("auto": fp32
    data on CPUs with fast bf16; True / False force it on / off), the same results."""
    queries = torch.as_tensor(queries).to(device=database.device, dtype=database.dtype)
    Q, N = queries.shape[0], database.shape[0]
    k = min(k, N)
    screen = _use_screen(database, screen)
    out_s = torch.empty(Q, k, dtype=database.dtype, device=database.device)
    out_i = torch.empty(Q, k, dtype=torch.long, device=database.device)
    if Q == 0 or k == 0:
        return out_s, out_i
    qc, dc = min(query_chunk, Q), min(db_chunk, N)
    # Score buffers reused by every block: no allocation (page faults) per block.
    buf = torch.empty(qc * dc, dtype=torch.bfloat16 if screen else database.dtype, device=database.device)
    bar = tqdm(total=Q, desc="knn", unit="query", disable=not progress, leave=False)
    for q0 in range(0, Q, qc):
        q = queries[q0:q0 + qc]  # (qc, D)
        if bias is not None:  # (qc, D+1): a constant 1 that multiplies the bias coordinate of the database
            q = torch.cat([q, q.new_ones(len(q), 1)], 1)
        q16, qnorm = (q.to(torch.bfloat16), q.norm(dim=1)) if screen else (None, None)
        best_s = torch.empty(len(q), 0, dtype=database.dtype, device=database.device)
        best_i = torch.empty(len(q), 0, dtype=torch.long, device=database.device)
        for d0 in range(0, N, dc):
            db = database[d0:d0 + dc]  # (dc, D)
            if bias is not None:  # (dc, D+1): the bias rides in the matmul as one more coordinate
                db = torch.cat([db, bias[d0:d0 + dc, None].to(db.dtype)], 1)
            if screen:  # the fast path (section 5): the same candidates, from a bf16 product
                kth = best_s[:, k - 1] if best_s.shape[1] == k else q.new_full((len(q),), float("-inf"))
                cand_s, cand_i = _screened_block(q, q16, qnorm, db, kth, k, d0, buf)
            else:
                s = buf[:len(q) * len(db)].view(len(q), len(db))  # (qc, dc), contiguous even for the last block
                torch.mm(q, db.T, out=s)
                cand_s, cand_i = _exact_block(s, k, d0)
            # Merge with the running lists: the k best of (old k, new candidates) under (score desc, id asc).
            best_s, best_i = select_topk(torch.cat([best_s, cand_s], 1), torch.cat([best_i, cand_i], 1), k)
        out_s[q0:q0 + qc], out_i[q0:q0 + qc] = lexsort_rows(best_s, best_i) if k > 1 else (best_s, best_i)
        bar.update(len(q))
    bar.close()
    return out_s, out_i


def _group_size(C, group=16):
    """Largest of group, group/2, ..., 1 that divides C: the columns per group of the pruning."""
    while C % group:
        group //= 2
    return group


def _exact_block(s, k, d0):
    """Candidates (scores (Q, W), global ids (Q, W)) holding the exact top-k of each row of a score block s (Q, C)
    whose first column is database row d0.

    A top-k over all C columns costs a good fraction of the matmul. Instead take the max of each of G = C / g
    strided column groups; with m_k > m_k+1 the k-th and (k+1)-th largest group maxima, the k best groups hold k
    entries >= m_k and every other entry is <= m_k+1: the row's top-k, ties included, lies in those k*g columns.
    Rows with m_k == m_k+1 fall back to a search of the full row."""
    Q, C = s.shape
    g = _group_size(C)
    G = C // g
    if k == 1:  # the nearest centroid in k-means: argmax returns the first (lowest-index) maximum of a row
        col = s.argmax(dim=1, keepdim=True)  # (not torch.max(dim=1): on CPU it forks threads even for tiny rows)
        return s.gather(1, col), col + d0
    if G < 4 * (k + 1) or g == 1:  # too narrow to gain anything: search the block directly
        return select_topk(s, torch.arange(d0, d0 + C, device=s.device).expand(Q, C), k)
    gmax = s.view(Q, g, G).amax(dim=1)  # (Q, G)
    gtop, gidx = gmax.topk(k + 1, dim=1)  # (Q, k+1)
    cols = (gidx[:, :k, None] + G * torch.arange(g, device=s.device)).view(Q, k * g)  # (Q, W=k*g)
    cand, ids = s.gather(1, cols), cols + d0
    straddle = gtop[:, k - 1] == gtop[:, k]
    if straddle.any():
        rows = straddle.nonzero().squeeze(1)
        top, idx = select_topk(s[rows], torch.arange(d0, d0 + C, device=s.device).expand(len(rows), C), k)
        cand[rows], ids[rows] = float("-inf"), NO_ID
        cand[rows, :k], ids[rows, :k] = top, idx
    return cand, ids


# ---------------------------------------------------------------------------------------------------------------
# 2. Rows sharded over ranks: rank r holds rows [offset_r, offset_r + n_r) of the data, the ranks in order

def shard_range(n, rank, world) -> tuple:
    """Contiguous row range [start, end) of rank's shard of n rows (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


def shard_offset(n_local) -> tuple:
    """(global row number of this rank's first row, total rows) of data sharded over ranks in rank order."""
    sizes = all_gather_cat(torch.tensor([n_local]))
    return int(sizes[:rank_world()[0]].sum()), int(sizes.sum())


def gather_rows(x, ids, offset):
    """Rows `ids` (global row numbers (M,)) of sharded data x (this rank's rows start at `offset`), on every
    rank, in the order of ids: (M, D). The one rank holding a row sends it, the others zeros (x + 0 is exact)."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=x.device)
    mine = (ids >= offset) & (ids < offset + len(x))
    out = x.new_zeros(len(ids), x.shape[1])
    out[mine] = x[ids[mine] - offset]
    return all_reduce_sum(out)


def top_rows(values, m, offset):
    """Global row numbers of the m largest of sharded values (N_local,), ordered by (value desc, row asc)."""
    ids = torch.arange(offset, offset + len(values), device=values.device)
    s, i = select_topk(values[None].float(), ids[None], m)  # (1, <= m) this rank's best
    return _merge_ranks(s, i, m)[1][0]


def _merge_ranks(s, i, k):
    """The k best (score desc, id asc) of every rank's lists (Q, <= k), on every rank: (Q, k), (Q, k)."""
    pad = k - s.shape[1]  # a rank with fewer than k entries pads with entries that lose every comparison
    s = torch.cat([s, s.new_full((len(s), pad), float("-inf"))], 1)
    i = torch.cat([i, i.new_full((len(i), pad), NO_ID)], 1)
    s, i = all_gather_cat(s, 1), all_gather_cat(i, 1)  # (Q, world * k)
    return lexsort_rows(*select_topk(s, i, k))


class ShardedKNN:
    """Exact kNN over a database split into contiguous row ranges, one per rank (global ids = offset + local row).
    Each rank searches its shard, then the per-rank top-k lists are merged in knn()'s order: one process's result
    (released `dinov2/eval/knn.py` shards its train features so). Without a process group, or local=True (a search
    one rank makes alone), it is knn() on the shard."""

    def __init__(self, shard, offset=0, total=None, local=False):
        self.shard, self.offset, self.local = shard, offset, local
        self.total = total if total is not None else shard.shape[0]

    @classmethod
    def from_full(cls, database):
        """Each rank keeps its contiguous share of a database that every rank holds (every rank passes the same)."""
        rank, world = rank_world()
        start, end = shard_range(database.shape[0], rank, world)
        return cls(database[start:end], start, database.shape[0])

    @classmethod
    def from_shard(cls, shard):
        """The ranks' shards, in rank order, are the database."""
        offset, total = shard_offset(len(shard))
        return cls(shard, offset, total)

    def search(self, queries, k, **knn_kwargs):
        """Every rank passes the same queries (Q, D) and gets the same (scores (Q, k), global ids (Q, k))."""
        k = min(k, self.total)
        s, i = knn(queries, self.shard, k, **knn_kwargs)
        s, i = s.float(), i + self.offset
        return (s, i) if self.local or not is_dist() else _merge_ranks(s, i, k)


# ---------------------------------------------------------------------------------------------------------------
# 3. k-means on row shards

def kmeans_plusplus(x, k, generator, progress=False):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, as scikit-learn): each new centroid is the best, by
    the resulting potential, of 2 + log k points drawn with probability proportional to their squared distance to
    the nearest centroid so far. x (N, D) is the whole (small) seeding sample, the same on every rank."""
    threads = torch.get_num_threads()
    if x.device.type == "cpu":
        # k small sequential steps: an OpenMP fork/join per op costs more than the op (measured 12x slower on
        # 2 threads than on 1 when another process shares the cores), so the seeding runs on one thread.
        torch.set_num_threads(1)
    try:
        N = x.shape[0]
        trials = 2 + int(math.log(k))
        x2 = (x * x).sum(1)  # (N,)
        # Up to 4096 points, one (N, N) Gram matrix (<= 64 MB) replaces k skinny matmuls, which run ~10x below peak.
        gram = x @ x.T if N <= 4096 else None
        chosen = [int(torch.randint(N, (1,), generator=generator))]
        d2 = (x2 - 2 * (x @ x[chosen[0]]) + x2[chosen[0]]).clamp_min_(0)  # (N,) squared distance to the nearest
        for _ in tqdm(range(1, k), desc="k-means++", disable=not progress, leave=False):
            if d2.sum() > 0:
                cand = torch.multinomial(d2.cpu(), trials, replacement=True, generator=generator).to(x.device)
            else:  # fewer distinct points than k: any point will do
                cand = torch.randint(N, (trials,), generator=generator).to(x.device)
            dots = gram[cand] if gram is not None else x[cand] @ x.T  # (T, N)
            d2_cand = torch.minimum(d2, (x2 - 2 * dots + x2[cand, None]).clamp_min_(0))  # (T, N)
            best = int(d2_cand.sum(1).argmin())
            chosen.append(int(cand[best]))
            d2 = d2_cand[best]
        return x[chosen].clone()
    finally:
        torch.set_num_threads(threads)


def kmeans(x, k, n_iter=20, init="kmeans++", seed=0, spherical=False, init_points_per_centroid=4, log=None,
           progress=False, screen="auto"):
    """Lloyd's k-means: x (N, D) -> centroids (K, D), assignments (N,) to those final centroids.

    Sharded, the centroids are one process's: the seeding sample is drawn by global row number from (N, seed), the
    cluster sums are all-reduced in float64, and an empty cluster is re-seeded at the point farthest from its
    centroid (ties: the lower row). init: "kmeans++" (on init_points_per_centroid * k sampled points) or "random".
    spherical: unit-length centroids (cosine). `log`, if a list, receives each step's inertia (never increasing).
    """
    x = torch.as_tensor(x).float()
    offset, N = shard_offset(len(x))
    if not 1 <= k <= N:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k}, N={N}")
    g = torch.Generator().manual_seed(seed)
    if init == "kmeans++":
        # NOTE(deviation): k-means++ seeds from a random subsample (as Faiss trains on one); Lloyd runs on all N.
        sample = gather_rows(x, _draw(N, min(N, max(k, init_points_per_centroid * k)), seed), offset)
        centroids = kmeans_plusplus(sample, k, g, progress)
    elif init == "random":
        centroids = gather_rows(x, _draw(N, k, seed), offset)
    else:
        raise ValueError(f"unknown init {init!r}; known: kmeans++, random")
    if spherical:
        centroids = F.normalize(centroids, dim=1)
    screen = _use_screen(x, screen)
    x16 = x.to(torch.bfloat16) if screen else None  # (N, D) half the size of x, kept for every _assign
    xnorm = x.norm(dim=1) if screen else None
    for _ in tqdm(range(n_iter), desc=f"k-means k={k}", disable=not progress, leave=False):
        assign = _assign(x, centroids, spherical, screen, x16, xnorm)
        if log is not None:
            log.append(float(all_reduce_sum(_sqdist(x, centroids, assign).double().sum())))
        sums, counts = _cluster_sums(x, assign, k)  # (K, D) float64, (K,): over all ranks
        full = counts > 0
        empty = (~full).nonzero().squeeze(1)
        if len(empty):  # the points worst served by their centroid, over all ranks
            far = top_rows(_sqdist(x, centroids, assign), len(empty), offset)
        centroids[full] = (sums[full] / counts[full, None]).to(x.dtype)
        if len(empty):
            centroids[empty] = gather_rows(x, far, offset)
        if spherical:
            centroids = F.normalize(centroids, dim=1)
    assign = _assign(x, centroids, spherical, screen, x16, xnorm)
    if log is not None:
        log.append(float(all_reduce_sum(_sqdist(x, centroids, assign).double().sum())))
    return centroids, assign


def _assign(x, centroids, spherical=False, screen="auto", x16=None, xnorm=None, chunk=2048):
    """Nearest centroid of every point (N,), equal distances to the lower index: argmin_j |x - c_j|^2 =
    argmax_j (x.c_j - |c_j|^2 / 2). screen: section 5's bf16 fast path (the same result); x16, xnorm its inputs."""
    if _use_screen(x, screen) and len(centroids) > 1:
        return _assign_screened(x, centroids, spherical, x16, xnorm, chunk)
    bias = centroids.new_zeros(len(centroids)) if spherical else -0.5 * (centroids * centroids).sum(1)  # (K,)
    cT = centroids.T.contiguous()  # (D, K)
    idx = torch.empty(len(x), dtype=torch.long, device=x.device)
    for q0 in range(0, len(x), chunk):
        xb = x[q0:q0 + chunk]  # (B, D)
        idx[q0:q0 + len(xb)] = torch.addmm(bias, xb, cT).max(dim=1).indices  # the first (lowest) maximum
    return idx


def _sqdist(x, centroids, idx, chunk=16384):
    """|x - c_idx|^2 of every point (N,), computed directly (no cancellation)."""
    return torch.cat([((x[q0:q0 + chunk] - centroids[idx[q0:q0 + chunk]]) ** 2).sum(1)
                      for q0 in range(0, len(x), chunk)] + [x.new_zeros(0)])


def _cluster_sums(x, assign, k, block=65536):
    """Sum (float64) and count of the points of each cluster over all ranks: (K, D), (K,). A block of rows is summed
    in float32 as a sparse one-hot (K, block) matrix times the block (index_add_ is single-threaded, 3x slower on
    CPU), the blocks and ranks in float64: the split of rows over ranks only changes float32 rounding in a block."""
    counts = torch.bincount(assign, minlength=k)
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    for b in range(0, len(x), block):
        xb, ab = x[b:b + block], assign[b:b + block]
        if x.device.type != "cpu":
            sums += torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, ab, xb).double()
            continue
        crow = torch.zeros(k + 1, dtype=torch.long)
        crow[1:] = torch.cumsum(torch.bincount(ab, minlength=k), 0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the matmul used here is long supported
            warnings.simplefilter("ignore")
            onehot = torch.sparse_csr_tensor(crow, ab.argsort(stable=True), torch.ones(len(xb), dtype=x.dtype),
                                             (k, len(xb)))
            sums += (onehot @ xb).double()
    return all_reduce_sum(sums), all_reduce_sum(counts)


def _draw(n, m, seed):
    """m distinct row numbers out of n: a function of (n, m, seed) only, so of no rank count. (m,) LongTensor."""
    return torch.from_numpy(np.random.default_rng(seed).choice(n, m, replace=False))


# ---------------------------------------------------------------------------------------------------------------
# 4. Hierarchical k-means with resampling (Vo et al. 2024), on row shards

def hierarchical_kmeans(x, ks, n_iter=20, resample_steps=10, seed=0, spherical=False, progress=False, resume_dir=None,
                        screen="auto"):
    """Vo et al. (2024) hierarchical k-means with resampling. x (N, D), ks = clusters per level (decreasing).

    Level 1 clusters the points, level l+1 the centroids of level l. After each level's k-means, `resample_steps`
    times: rerun k-means on the r points closest to each centroid (r: about half the mean cluster size, as the
    released config), then reassign all the level's points. Every cluster gives r points, so dense modes stop
    attracting extra centroids. Returns per level: centroids (K_l, D), assignments (N_{l-1},) -> cluster of level l.
    Sharded: level 1's assignments are this rank's rows'; deeper levels split the centroids, assignments gathered.
    resume_dir: finished levels are saved there (level1.pt, ...) and reloaded by a rerun on the same data/settings.
    """
    # NOTE(deviation): fp32 and n_iter=20 (the released code of Vo et al. computes in float64 with 50 iterations
    # and skips resampling at its 10M-cluster first level, for cost); resampling here runs at every level.
    x = torch.as_tensor(x).float()
    levels, points = [], x
    offset, n = shard_offset(len(x))
    rank, world = rank_world()
    for level, k in enumerate(ks):
        k = max(1, min(k, n))
        steps, r = resample_steps, max(1, round(0.5 * n / k))
        lseed = seed + 1000 * level
        meta = dict(n=n, d=points.shape[1], k=k, n_iter=n_iter, steps=steps, r=r, seed=lseed, spherical=spherical,
                    checksum=float(all_reduce_sum(points.double().sum())))
        path = os.path.join(resume_dir, f"level{level + 1}.pt") if resume_dir else None
        centroids = _load_level(path, meta)
        if centroids is not None:  # finished by an earlier run: only the assignment is recomputed
            assign = _assign(points, centroids, spherical, screen)
        else:
            centroids, assign = kmeans(points, k, n_iter, seed=lseed, spherical=spherical, progress=progress,
                                       screen=screen)
            for step in tqdm(range(steps if r > 1 else 0), desc=f"level {level + 1} resampling",
                             disable=not progress, leave=False):
                sample = _closest_members(points, centroids, assign, r, offset) - offset  # this rank's share
                if all_reduce_sum(torch.tensor(len(sample))) < k:  # clusters emptied by exact duplicates
                    break
                centroids, _ = kmeans(points[sample], k, n_iter, seed=lseed + step + 1, spherical=spherical,
                                      screen=screen)
                assign = _assign(points, centroids, spherical, screen)
            if resume_dir and rank == 0:  # a level file is always whole (written, then renamed)
                atomic_save({"meta": meta, "centroids": centroids.cpu()}, path)
        levels.append({"centroids": centroids, "assignments": assign if level == 0 else gather_shards(assign)})
        start, end = shard_range(k, rank, world)  # the next level's points: this rank's share of the centroids
        points, offset, n = centroids[start:end], start, k
    return levels


def _closest_members(x, centroids, assign, r, offset=0):
    """Global row numbers (sorted) of the (at most) r members of each cluster closest to its centroid (ties: the
    lower row), among this rank's rows. Each cluster's r-th smallest distance is bisected on the bit patterns of
    the float32 distances (31 all-reduces of K counts, no rows exchanged); ties counted across ranks in rank order."""
    K = len(centroids)
    bits = ((x - centroids[assign]) ** 2).sum(1).view(torch.int32).long()  # (n,) order of the distances
    need = all_reduce_sum(torch.bincount(assign, minlength=K)).clamp(max=r)  # (K,) how many each cluster gives
    lo = torch.zeros(K, dtype=torch.long, device=x.device)
    hi = torch.full((K,), 2 ** 31 - 1, dtype=torch.long, device=x.device)
    while bool((lo < hi).any()):  # smallest t with #(bits <= t) >= need, per cluster
        mid = (lo + hi) // 2
        enough = all_reduce_sum(torch.bincount(assign[bits <= mid[assign]], minlength=K)) >= need
        lo, hi = torch.where(enough, lo, mid + 1), torch.where(enough, mid, hi)
    below = bits < lo[assign]  # all taken; then the ties at the threshold, lowest rows first
    quota = need - all_reduce_sum(torch.bincount(assign[below], minlength=K))  # (K,)
    tie = (bits == lo[assign]).nonzero().squeeze(1)  # (T,) local rows, ascending
    counts = torch.bincount(assign[tie], minlength=K)
    before = all_gather_cat(counts[None])[:rank_world()[0]].sum(0)  # (K,) ties on lower ranks
    order = assign[tie].argsort(stable=True)  # ties grouped by cluster, rows ascending in each
    starts = torch.cumsum(counts, 0) - counts
    c = assign[tie[order]]
    place = before[c] + torch.arange(len(order), device=x.device) - starts[c]  # global place among the cluster's ties
    picked = torch.cat([below.nonzero().squeeze(1), tie[order][place < quota[c]]])
    return picked.sort().values + offset


def _load_level(path, meta):
    """A saved level's centroids if every rank finds it with these settings and data, else None."""
    found = None
    if path and os.path.exists(path):
        saved = torch.load(path)
        old = saved["meta"]
        same = {**old, "checksum": 0} == {**meta, "checksum": 0}
        if same and math.isclose(old["checksum"], meta["checksum"], rel_tol=1e-9, abs_tol=1e-9):
            found = saved["centroids"]
    everyone = all_reduce_sum(torch.tensor(int(found is not None))) == rank_world()[1]
    return found if everyone else None


# ---------------------------------------------------------------------------------------------------------------
# 5. Fast path (screen=): the score matmul in bf16, then fp32 rescoring; the same results as sections 1 and 3
#
# Speeds up the matmul of knn and of the k-means assignment: ~2x (knn) to ~5x (assignment) on CPUs with AVX512-BF16
# or AMX, where "auto" turns it on (elsewhere bf16 is emulated, slower). Exact: a bf16 score a and the fp32 score e
# differ by at most delta = (3u + 2 D eps) |q| |x| (u = 2^-8 rounds q, x and the output; 8-bit products are exact
# in the fp32 accumulator; eps = 2^-24 for the D accumulations, counted twice to cover the fp32 rescoring), and
# every pair whose bf16 score is within that bound of the cut is rescored in fp32. The two paths agree:
# tests/test_knn.py runs each search and assignment case with screen=False and screen=True against a brute force.
# NOTE(deviation): on GPUs the screen would run on tensor cores; it is validated on CPU only, so "auto" is off there.

BF16_U, FP32_U = 2.0 ** -8, 2.0 ** -24  # unit roundoff of bfloat16 (8 significant bits) and of float32 (24)


_CPU_FLAGS = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
FAST_BF16_CPU = "avx512_bf16" in _CPU_FLAGS or "amx_bf16" in _CPU_FLAGS  # bf16 matmuls at ~2x the fp32 rate


def _use_screen(x, screen) -> bool:
    if screen == "auto":
        return x.device.type == "cpu" and x.dtype == torch.float32 and FAST_BF16_CPU
    return bool(screen)


def _screened_block(q, q16, qnorm, db, kth, k, d0, buf16):
    """_exact_block's candidates from a bf16 product, rescored in fp32. A column is in the top-k only if e >= T, the
    final k-th best; T >= kth (the running k-th best) and T >= m_k - delta (m_k: the k-th largest group max of a),
    so the columns with a >= max(kth, m_k - delta) - delta, rescored in fp32, hold the answer."""
    Q, C, D = q.shape[0], db.shape[0], q.shape[1]
    a = buf16[:Q * C].view(Q, C)
    torch.mm(q16, db.to(torch.bfloat16).T, out=a)  # (Q, C) approximate scores
    xmax = db.norm(dim=1).max()
    delta = (3 * BF16_U + 2 * D * FP32_U) * 1.01 * qnorm * xmax + 1e-30  # (Q,)
    g = _group_size(C)
    G = C // g
    gmax = a.view(Q, g, G).amax(dim=1).float()  # (Q, G)
    bound = kth
    if G >= k and bool(torch.isinf(kth).any()):  # running lists still short: bound T from below by m_k
        bound = torch.maximum(kth, gmax.topk(k, dim=1).values[:, k - 1] - delta)
    theta = bound - delta  # (Q,)
    rows, grp = (gmax >= theta[:, None]).nonzero(as_tuple=True)  # candidate groups (P,)
    cols = grp[:, None] + G * torch.arange(g, device=q.device)  # (P, g)
    keep = a[rows[:, None], cols].float() >= theta[rows, None]
    rows, cols = rows[:, None].expand_as(cols)[keep], cols[keep]  # candidate entries (P',), row-major order
    exact = torch.cat([(q[r] * db[c]).sum(1) for r, c in zip(rows.split(65536), cols.split(65536))] +
                      [q.new_empty(0)])  # fp32 rescoring, in pieces to bound memory
    # Scatter the candidates into dense (Q, m) lists padded with (-inf, NO_ID).
    counts = torch.bincount(rows, minlength=Q)
    pos = torch.arange(len(rows), device=q.device) - (torch.cumsum(counts, 0) - counts)[rows]
    m = int(counts.max()) if len(rows) else 0
    cand = torch.full((Q, m), float("-inf"), device=q.device)
    ids = torch.full((Q, m), NO_ID, device=q.device)
    cand[rows, pos], ids[rows, pos] = exact, cols + d0
    return cand, ids


def _assign_screened(x, centroids, spherical, x16=None, xnorm=None, chunk=2048):
    """_assign from a bf16 product. With Delta the bound of a bf16 score (delta, plus the roundings of adding the
    bias), a best bf16 score ahead of the second by over 2 Delta is the fp32 argmax; for the other rows (near a
    boundary, or tied) the candidates within 2 Delta of the best are rescored in fp32. x16, xnorm: x in bf16 and
    its row norms, if the caller keeps them across calls."""
    K, D = centroids.shape
    bias = centroids.new_zeros(K) if spherical else -0.5 * (centroids * centroids).sum(1)  # (K,)
    cT = centroids.T.contiguous()  # (D, K)
    idx = torch.empty(len(x), dtype=torch.long, device=x.device)
    c16 = cT.to(torch.bfloat16)
    cmax, bmax = centroids.norm(dim=1).max(), bias.abs().max()
    a16 = torch.empty(min(chunk, len(x)), K, dtype=torch.bfloat16, device=x.device)  # reused by every chunk
    a32 = torch.empty(min(chunk, len(x)), K, device=x.device)
    for q0 in range(0, len(x), chunk):
        xb = x[q0:q0 + chunk]  # (B, D)
        a, f = a16[:len(xb)], a32[:len(xb)]
        torch.mm(xb.to(torch.bfloat16) if x16 is None else x16[q0:q0 + chunk], c16, out=a)  # (B, K) approximate
        best, arg = f.copy_(a).add_(bias).max(dim=1)
        second = f.scatter_(1, arg[:, None], float("-inf")).amax(dim=1)  # (B,) runner-up
        xn = xb.norm(dim=1) if xnorm is None else xnorm[q0:q0 + chunk]
        Delta = (3 * BF16_U + 2 * D * FP32_U) * 1.01 * xn * cmax + 4 * FP32_U * (xn * cmax + bmax) + 1e-30
        floor = best - 2 * Delta  # (B,) an exact best scores at least this in bf16
        unsure = (second >= floor).nonzero().squeeze(1)  # (M,) rows with more than one candidate
        if len(unsure):
            # Rescore just the candidates (bf16 score >= floor) of those rows in fp32, row by row.
            rows, cols = (f[unsure] >= floor[unsure, None]).nonzero(as_tuple=True)  # (P,) the best one excluded
            rows, cols = torch.cat([rows, torch.arange(len(unsure), device=x.device)]), torch.cat([cols, arg[unsure]])
            exact = torch.cat([(xb[unsure[r]] * centroids[c]).sum(1) for r, c in zip(rows.split(65536),
                                                                                    cols.split(65536))]) + bias[cols]
            top = torch.full((len(unsure),), float("-inf"), device=x.device).scatter_reduce_(0, rows, exact, "amax")
            win = exact == top[rows]  # the maxima of each row; the lowest centroid index among them wins
            arg[unsure] = torch.full_like(unsure, K).scatter_reduce_(0, rows[win], cols[win], "amin")
        idx[q0:q0 + len(xb)] = arg
        if len(unsure) > 0.75 * len(xb):  # the screen costs more than it saves on this data: plain fp32 from here
            idx[q0 + len(xb):] = _assign(x[q0 + len(xb):], centroids, spherical, screen=False, chunk=chunk)
            break
    return idx
