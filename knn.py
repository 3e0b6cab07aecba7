"""The kNN engine of the project: exact k nearest neighbours, sharded over ranks, and k-means on top of it.

One engine for every search: curate.py's dedup, evaluation-set removal and retrieval (paper §3), its clustering
(hierarchical k-means with resampling, Vo et al. 2024), and evaluate.py's weighted k-NN classifier (released
`dinov2/eval/knn.py`). Search is exact: a chunked matmul + top-k (on CPUs with bf16 units, a bf16 screen with a
proven error bound, then fp32 rescoring), ties broken by the lower row number, so results do not depend on the
chunking nor on the number of ranks.
NOTE(deviation): the paper searched and clustered with Faiss (GPU IVF+PQ, approximate); everything here is exact.

Under torchrun every function takes this rank's shard of the rows (the data is the shards concatenated in rank
order): memory is O(N / world) per rank, and the results equal those of one process on all rows (k-means: the same
centroids to float rounding, the same assignments).

Public names, in reading order:
    lexsort_rows, select_topk, knn              exact inner-product top-k, chunked over queries and database
    shard_range, ShardedKNN, search             the database split across ranks, per-rank lists merged
    all_reduce_sum, all_gather_cat, shard_offset, gather_rows, top_rows    collectives over row shards
    kmeans_plusplus, kmeans                     Lloyd's k-means, sharded (assignment through knn with k=1)
    hierarchical_kmeans                         Vo et al.'s clustering tree with resampling, resumable per level

Run:  python knn.py [--n 100000 --dim 384 --k 1000]   times kNN and k-means (and faiss's, if it is installed)
Shapes: Q queries, N database rows, D width, K clusters.
"""
import argparse
import functools
import math
import os
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from util.distributed import all_gather_cat, all_reduce_sum, gather_shards, is_dist, rank_world


# ---------------------------------------------------------------------------------------------------------------
# 1. Exact k nearest neighbours by inner product (features are L2-normalised beforehand, so this is cosine)
# ---------------------------------------------------------------------------------------------------------------

NO_ID = torch.iinfo(torch.int64).max  # id of a padding entry (score -inf): loses every tie, is never a real row


def lexsort_rows(scores, ids):
    """Sort each row by score, highest first, equal scores by lower id. (Q, C), (Q, C) -> same shapes."""
    order = ids.argsort(dim=1)
    scores, ids = scores.gather(1, order), ids.gather(1, order)
    order = scores.argsort(dim=1, descending=True, stable=True)  # stable: equal scores keep the id order
    return scores.gather(1, order), ids.gather(1, order)


def select_topk(scores, ids, k):
    """The k best entries of each row under the order (score desc, id asc). (Q, C) -> (Q, k), sorted by score.

    torch.topk breaks ties arbitrarily, so a row whose k-th and (k+1)-th scores are equal (a tie across the cut)
    is redone with a full lexicographic sort; such rows are rare on real features, and cheap when they happen.
    """
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


def _group_size(C, group):
    """Largest of group, group/2, ..., 1 that divides C."""
    while C % group:
        group //= 2
    return group


def _exact_block(s, k, d0, group):
    """Candidates holding the exact top-k of each row of an fp32 score block s (Q, C) whose first column is database
    row d0: (scores (Q, W), global ids (Q, W)).

    A full top-k over C columns copies every score into a per-row heap, which costs a good fraction of the matmul.
    Instead, view the columns as G = C / g strided groups (group j = columns j, j+G, j+2G, ...) and take each
    group's max: one vectorised pass. Let m_k > m_k+1 be the k-th and (k+1)-th largest group maxima. The top-k
    groups hold k distinct entries >= m_k, so the row's k-th best is >= m_k, and every entry outside those groups
    is <= m_k+1 < m_k: the row's top-k, ties included, lies in the k*g gathered columns. Rows with m_k == m_k+1
    fall back to an exact search of the full row.
    """
    Q, C = s.shape
    g = _group_size(C, group)
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


# Unit roundoff of bfloat16 (8 significant bits) and of float32 (24).
BF16_U, FP32_U = 2.0 ** -8, 2.0 ** -24


def _screened_block(q, q16, qnorm, db, kth, k, d0, buf16, group):
    """The same candidates as _exact_block, found from a bf16 product and rescored exactly in fp32: about twice
    as fast on CPUs with bf16 dot-product instructions, and still exact.

    Error bound: a = bf16(q) @ bf16(x) (fp32 accumulation, bf16 output) differs from the fp32 product e by at most
    delta = (3u + 2 D eps) |q| |x|, u = 2^-8 (rounding q, x and the output; the products of 8-bit significands are
    exact in the fp32 accumulator), eps = 2^-24 (the D accumulations, counted twice to cover the fp32 rescoring).
    A column can end in the top-k only if e >= T, the final k-th best; T >= kth (the running k-th best), and
    T >= m_k - delta where m_k is the k-th largest group max of a (k distinct entries have a >= m_k). So keeping
    every column with a >= max(kth, m_k - delta) - delta, and rescoring just those in fp32, loses nothing.
    """
    Q, C, D = q.shape[0], db.shape[0], q.shape[1]
    a = buf16[:Q * C].view(Q, C)
    torch.mm(q16, db.to(torch.bfloat16).T, out=a)  # (Q, C) approximate scores
    xmax = db.norm(dim=1).max()
    delta = (3 * BF16_U + 2 * D * FP32_U) * 1.01 * qnorm * xmax + 1e-30  # (Q,)
    g = _group_size(C, group)
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


@functools.lru_cache(maxsize=None)
def _cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run at about twice the fp32 rate (elsewhere they are emulated, slower)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def knn(queries, database, k, query_chunk=4096, db_chunk=16384, bias=None, screen="auto", group=16,
        progress=False, desc="knn"):
    """Exact k nearest neighbours by inner product: (Q, D), (N, D) -> scores (Q, k), indices (Q, k).

    Rows are sorted by score, equal scores by lower index. Memory stays at one (query_chunk, db_chunk) score block
    plus the running lists, whatever N. `bias` (N,) is added to every score column, as one more coordinate of the
    matmul (k-means uses it to turn inner products into L2 distances). screen: "auto" finds candidates with the
    bf16 screen (_screened_block) for fp32 data on CPUs with fast bf16; True / False force it on / off.
    """
    queries = torch.as_tensor(queries).to(device=database.device, dtype=database.dtype)
    Q, N = queries.shape[0], database.shape[0]
    k = min(k, N)
    if screen == "auto":
        # NOTE(deviation): on GPUs the same screen would run on tensor cores, but it is only validated on CPU here.
        screen = database.device.type == "cpu" and database.dtype == torch.float32 and _cpu_has_fast_bf16()
    out_s = torch.empty(Q, k, dtype=database.dtype, device=database.device)
    out_i = torch.empty(Q, k, dtype=torch.long, device=database.device)
    if Q == 0 or k == 0:
        return out_s, out_i
    qc, dc = min(query_chunk, Q), min(db_chunk, N)
    # Score buffers reused by every block: no allocation (page faults) per block.
    buf = torch.empty(qc * dc, dtype=torch.bfloat16 if screen else database.dtype, device=database.device)
    bar = tqdm(total=Q, desc=desc, unit="query", disable=not progress, leave=False)
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
            if screen:
                kth = best_s[:, k - 1] if best_s.shape[1] == k else q.new_full((len(q),), float("-inf"))
                cand_s, cand_i = _screened_block(q, q16, qnorm, db, kth, k, d0, buf, group)
            else:
                s = buf[:len(q) * len(db)].view(len(q), len(db))  # (qc, dc), contiguous even for the last block
                torch.mm(q, db.T, out=s)
                cand_s, cand_i = _exact_block(s, k, d0, group)
            # Merge with the running lists: the k best of (old k, new candidates) under (score desc, id asc).
            best_s, best_i = select_topk(torch.cat([best_s, cand_s], 1), torch.cat([best_i, cand_i], 1), k)
        out_s[q0:q0 + qc], out_i[q0:q0 + qc] = lexsort_rows(best_s, best_i) if k > 1 else (best_s, best_i)
        bar.update(len(q))
    bar.close()
    return out_s, out_i


# ---------------------------------------------------------------------------------------------------------------
# 2. Rows sharded over ranks: rank r holds rows [offset_r, offset_r + n_r) of the data, the ranks in order
# ---------------------------------------------------------------------------------------------------------------

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
    pad = m - s.shape[1]
    s, i = torch.cat([s, s.new_full((1, pad), float("-inf"))], 1), torch.cat([i, i.new_full((1, pad), NO_ID)], 1)
    s, i = all_gather_cat(s, 1), all_gather_cat(i, 1)  # (1, world * m)
    return lexsort_rows(*select_topk(s, i, m))[1][0]


class ShardedKNN:
    """Exact kNN over a database split into contiguous row ranges, one per rank (global ids = offset + local row).

    Every rank searches the same queries in its own shard, then the per-rank top-k lists (scores, global ids) are
    all-gathered and merged with the same (score desc, id asc) order as knn(), so the result equals a single-process
    search over the whole database (the released `dinov2/eval/knn.py` shards its train features the same way).
    Without a process group, or with local=True (a search that one rank makes alone), it is plain knn() on shard.
    """

    def __init__(self, shard, offset=0, total=None, local=False):
        self.shard, self.offset, self.local = shard, offset, local
        self.total = total if total is not None else shard.shape[0]

    @classmethod
    def from_full(cls, database):
        """Each rank keeps its contiguous share of a database that every rank holds."""
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
        if self.local or not is_dist():
            return s, i
        Q, pad = s.shape[0], k - s.shape[1]  # a shard smaller than k pads with entries that lose every comparison
        s = torch.cat([s, s.new_full((Q, pad), float("-inf"))], 1)
        i = torch.cat([i, i.new_full((Q, pad), NO_ID)], 1)
        s, i = all_gather_cat(s, 1), all_gather_cat(i, 1)  # (Q, world * k)
        return lexsort_rows(*select_topk(s, i, k))


def search(queries, database, k, **knn_kwargs):
    """knn() that shards `database` across ranks when a process group is up (every rank passes the same queries
    and the same database, and keeps only its share of it for the search)."""
    return ShardedKNN.from_full(database).search(queries, k, **knn_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# 3. k-means and hierarchical k-means with resampling (Vo et al. 2024), on row shards
# ---------------------------------------------------------------------------------------------------------------

def kmeans_plusplus(x, k, generator, progress=False):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, the variant scikit-learn uses): each new centroid
    is the best, by the resulting potential, of 2 + log k points drawn with probability proportional to their
    squared distance to the nearest centroid chosen so far (one draw alone misses a cluster too often). x (N, D)
    is the whole (small) seeding sample, the same on every rank."""
    threads = torch.get_num_threads()
    if x.device.type == "cpu":
        # k small sequential steps: an OpenMP fork/join per op costs more than the op (measured 12x slower on
        # 2 threads than on 1 when another process shares the cores), so the seeding runs on one thread.
        torch.set_num_threads(1)
    try:
        return _kmeans_plusplus(x, k, generator, progress)
    finally:
        torch.set_num_threads(threads)


def _kmeans_plusplus(x, k, generator, progress):
    N = x.shape[0]
    trials = 2 + int(math.log(k))
    x2 = (x * x).sum(1)  # (N,)
    # Up to 4096 points, one (N, N) Gram matrix (<= 64 MB) replaces k skinny matmuls, which run ~10x below peak.
    gram = x @ x.T if N <= 4096 else None
    chosen = [int(torch.randint(N, (1,), generator=generator))]
    d2 = (x2 - 2 * (x @ x[chosen[0]]) + x2[chosen[0]]).clamp_min_(0)  # (N,) squared distance to the nearest centroid
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


def _assign(x, centroids, spherical=False, screen="auto", x16=None, xnorm=None, chunk=2048):
    """Nearest centroid of every point (N,); equal distances go to the lower index.

    argmin_j |x - c_j|^2 = argmax_j (x.c_j - |c_j|^2 / 2): one fp32 matmul per chunk of points (addmm adds the bias
    in the same pass). On CPUs with fast bf16 (screen="auto"), the product is first taken in bf16, about 5x faster
    (AMX): with Delta the error bound of a bf16 score (_screened_block's, plus the fp32 roundings of adding the
    bias), a point whose best bf16 score beats its second best by more than 2 Delta has that centroid as its exact
    fp32 argmax; for the others (near a boundary, or tied) the candidates within 2 Delta of the best are rescored in
    fp32. So the result is the fp32 one either way, bit for bit on data whose products are exact (small integers).
    x16, xnorm: x in bf16 and its row norms, if the caller keeps them across calls.
    """
    K, D = centroids.shape
    screen = _use_screen(x, screen) and K > 1
    bias = centroids.new_zeros(K) if spherical else -0.5 * (centroids * centroids).sum(1)  # (K,)
    cT = centroids.T.contiguous()  # (D, K)
    idx = torch.empty(len(x), dtype=torch.long, device=x.device)
    if screen:
        c16 = cT.to(torch.bfloat16)
        cmax, bmax = centroids.norm(dim=1).max(), bias.abs().max()
        a16 = torch.empty(min(chunk, len(x)), K, dtype=torch.bfloat16, device=x.device)  # reused by every chunk
        a32 = torch.empty(min(chunk, len(x)), K, device=x.device)
    for q0 in range(0, len(x), chunk):
        xb = x[q0:q0 + chunk]  # (B, D)
        if not screen:
            idx[q0:q0 + len(xb)] = torch.addmm(bias, xb, cT).max(dim=1).indices  # the first (lowest) maximum
            continue
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
            screen = False
    return idx


def _use_screen(x, screen) -> bool:
    if screen == "auto":  # NOTE(deviation): on GPUs the screen would run on tensor cores; validated on CPU only
        return x.device.type == "cpu" and x.dtype == torch.float32 and _cpu_has_fast_bf16()
    return bool(screen)


def _sqdist(x, centroids, idx, chunk=16384):
    """|x - c_idx|^2 of every point (N,), computed directly (no cancellation)."""
    return torch.cat([((x[q0:q0 + chunk] - centroids[idx[q0:q0 + chunk]]) ** 2).sum(1)
                      for q0 in range(0, len(x), chunk)] + [x.new_zeros(0)])


def _cluster_sums(x, assign, k, block=65536):
    """Sum (float64) and count of the points of each cluster over all ranks: (K, D), (K,).

    Each block of `block` rows is summed in float32 as a sparse (K, block) one-hot matrix times the block (a
    parallel matmul; index_add_ runs on one thread, measured 3x slower), the blocks and ranks are added in float64.
    So the sums depend on the split of rows over ranks only through float32 rounding inside a block.
    """
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


def kmeans(x, k, n_iter=20, init="kmeans++", seed=0, spherical=False, init_points_per_centroid=4, log=None,
           progress=False, screen="auto"):
    """Lloyd's k-means: x (N, D) -> centroids (K, D), assignments (N,) to those final centroids.

    Under torchrun x is this rank's shard of the rows and the assignments are those of its rows; the centroids
    are the same on every rank, and the same as one process on all rows: the seeding sample is drawn by global
    row number from (N, seed) alone and gathered in that order, the cluster sums and counts are all-reduced in
    float64, and empty clusters are re-seeded by a global rule.
    init: "kmeans++" (on a random subsample of init_points_per_centroid * k points: the seeding takes k sequential
    steps over its points, so on all N points it would cost more than the iterations) or "random".
    An empty cluster is re-seeded at the point farthest from its centroid (ties: the lower row number), which it
    then owns. spherical: centroids renormalised to unit length (cosine k-means). `log`, if a list, receives the
    inertia (sum of squared distances) of each assignment step, which never increases.
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


def _closest_members(x, centroids, assign, r, offset=0):
    """Global row numbers (sorted) of the (at most) r members of each cluster closest to its centroid (ties: the
    lower row number); under torchrun, those among this rank's rows.

    The r-th smallest distance of every cluster is found by bisection on the bit patterns of the float32 squared
    distances (for numbers >= 0 they sort like the numbers): 31 steps, each one all-reduce of K counts, so no rank
    needs another's rows. Ties at that distance go to the lower row numbers, counted across ranks in rank order.
    """
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


def _level_path(folder, level):
    return os.path.join(folder, f"level{level + 1}.pt")


def hierarchical_kmeans(x, ks, n_iter=20, resample_steps=10, sample_sizes=None, seed=0, spherical=False,
                        progress=False, resume_dir=None, screen="auto"):
    """Vo et al. (2024) hierarchical k-means with resampling. x (N, D), ks = clusters per level (decreasing).

    Level 1 clusters the points, level l+1 clusters the centroids of level l. At each level, after k-means, a
    resampling step takes the r points closest to each centroid (r = sample size: about half the mean cluster size,
    as in the follow-up paper's released config) and reruns k-means on that union, then reassigns all of the
    level's points to the new centroids; repeated `resample_steps` times. Each cluster contributes the same number
    of points to the union, so dense modes no longer attract extra centroids: the clusters spread evenly over the
    concepts. Returns one dict per level: centroids (K_l, D), assignments (N_{l-1},) -> cluster of level l.

    Under torchrun x is this rank's shard: level 1's assignments are its rows'; the deeper levels cluster the
    (replicated) centroids, each rank taking a contiguous share of them, and their assignments are gathered whole.
    resume_dir: each finished level's centroids are saved there (level1.pt, ...; with the settings and a checksum
    of the level's points) and a rerun with the same data and settings loads them and only reassigns the points.
    """
    # NOTE(deviation): fp32 and n_iter=20 (the released code of Vo et al. computes in float64 with 50 iterations
    # and skips resampling at its 10M-cluster first level, for cost); resampling here runs at every level.
    x = torch.as_tensor(x).float()
    levels, points = [], x
    offset, n = shard_offset(len(x))
    rank, world = rank_world()
    for level, k in enumerate(ks):
        k = max(1, min(k, n))
        steps = resample_steps[level] if isinstance(resample_steps, (list, tuple)) else resample_steps
        r = sample_sizes[level] if sample_sizes is not None else max(1, round(0.5 * n / k))
        lseed = seed + 1000 * level
        meta = dict(n=n, d=points.shape[1], k=k, n_iter=n_iter, steps=steps, r=r, seed=lseed, spherical=spherical,
                    checksum=float(all_reduce_sum(points.double().sum())))
        centroids = _load_level(resume_dir, level, meta)
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
            if resume_dir and rank == 0:
                os.makedirs(resume_dir, exist_ok=True)
                tmp = _level_path(resume_dir, level) + ".tmp"
                torch.save({"meta": meta, "centroids": centroids.cpu()}, tmp)
                os.replace(tmp, _level_path(resume_dir, level))  # atomic: a level file is always whole
        levels.append({"centroids": centroids, "assignments": assign if level == 0 else gather_shards(assign)})
        start, end = shard_range(k, rank, world)  # the next level's points: this rank's share of the centroids
        points, offset, n = centroids[start:end], start, k
    return levels


def _load_level(folder, level, meta):
    """A saved level's centroids if every rank finds it with these settings and data, else None."""
    found = None
    if folder and os.path.exists(_level_path(folder, level)):
        saved = torch.load(_level_path(folder, level))
        old = saved["meta"]
        same = {key: v for key, v in old.items() if key != "checksum"} == \
            {key: v for key, v in meta.items() if key != "checksum"}
        if same and math.isclose(old["checksum"], meta["checksum"], rel_tol=1e-9, abs_tol=1e-9):
            found = saved["centroids"]
    everyone = all_reduce_sum(torch.tensor(int(found is not None))) == rank_world()[1]
    return found if everyone else None


# ---------------------------------------------------------------------------------------------------------------
# Command line: timings on clustered random data, side by side with faiss when it is installed
# ---------------------------------------------------------------------------------------------------------------

def clustered_rows(lo, hi, dim, n_centres=1000, seed=0, block=10000):
    """Rows [lo, hi) of a fixed clustered data set (centres N(0, 1), points = centre + N(0, 0.25)): generated
    block by block from (seed, block index), so a rank can make its own shard without the others'."""
    centres = torch.randn(n_centres, dim, generator=torch.Generator().manual_seed(seed))
    parts = []
    for b in range(lo // block, (hi - 1) // block + 1 if hi > lo else 0):
        g = torch.Generator().manual_seed(seed * 1_000_003 + b + 1)
        rows = centres[torch.randint(n_centres, (block,), generator=g)] + 0.5 * torch.randn(block, dim, generator=g)
        parts.append(rows[max(lo - b * block, 0):hi - b * block])
    return torch.cat(parts + [torch.zeros(0, dim)])


def _rss_reset() -> float:
    """Resident memory now (GiB), after resetting the peak (Linux: clear_refs 5 resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_peak()
    except OSError:
        return float("nan")


def _rss_peak() -> float:
    """Peak resident memory since the last reset (GiB), from /proc/self/status (nan elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return round(int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 2 ** 20, 3)
    except (OSError, StopIteration):
        return float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time exact kNN search and k-means on clustered random data, "
                                     "side by side with faiss if it is installed (it is never a dependency). "
                                     "Under torchrun: sharded k-means, each rank making only its own rows.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--what", choices=("knn", "kmeans", "hkmeans", "all"), default="all")
    parser.add_argument("--points", type=int, default=100_000, help="k-means points")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=1000, help="clusters (k-means), first level (hkmeans)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--db", type=int, default=200_000, help="kNN database rows")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch and faiss threads (0: torch's default)")
    args = parser.parse_args(argv)
    if "RANK" in os.environ and not is_dist():
        dist.init_process_group("gloo")
    rank, world = rank_world()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import faiss  # only for the comparison
        faiss.omp_set_num_threads(torch.get_num_threads())
    except ImportError:
        faiss = None
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"threads {torch.get_num_threads()}, world {world}, faiss {'yes' if faiss else 'not installed'}")
    lo, hi = shard_range(args.points, rank, world)
    x = clustered_rows(lo, hi, args.dim)  # (n / world, D) this rank's rows only
    base = _rss_reset()
    for rep in range(args.repeats):
        if args.what in ("knn", "all") and world == 1:
            db = F.normalize(clustered_rows(0, args.db, args.dim, seed=1), dim=1)
            q = F.normalize(clustered_rows(0, args.queries, args.dim, seed=2), dim=1)
            t = time.perf_counter()
            knn(q, db, args.topk)
            ours = time.perf_counter() - t
            line = f"knn {args.db} x {args.dim}, {args.queries} queries, k={args.topk}: ours {ours:.2f} s"
            if faiss:
                t = time.perf_counter()
                index = faiss.IndexFlatIP(args.dim)
                index.add(db.numpy())
                index.search(q.numpy(), args.topk)
                theirs = time.perf_counter() - t
                line += f", faiss IndexFlatIP {theirs:.2f} s, ratio {ours / theirs:.2f}"
            say(line, flush=True)
        if args.what in ("kmeans", "all"):
            if faiss and world == 1:
                t = time.perf_counter()
                faiss.Kmeans(args.dim, args.k, niter=args.iters, seed=rep).train(x.numpy())
                theirs = time.perf_counter() - t
            t = time.perf_counter()
            kmeans(x, args.k, args.iters, init="random", seed=rep)
            ours_random = time.perf_counter() - t
            t = time.perf_counter()
            kmeans(x, args.k, args.iters, seed=rep)
            ours = time.perf_counter() - t
            line = (f"kmeans {args.points} x {args.dim}, k={args.k}, {args.iters} iterations: ours {ours_random:.2f} s "
                    f"(random init, as faiss), {ours:.2f} s (k-means++ init)")
            if faiss and world == 1:
                line += f", faiss.Kmeans {theirs:.2f} s, ratios {ours_random / theirs:.2f}, {ours / theirs:.2f}"
            say(line, flush=True)
        if args.what in ("hkmeans", "all"):
            t = time.perf_counter()
            hierarchical_kmeans(x, (args.k, max(2, round(math.sqrt(args.k)))), args.iters, resample_steps=2)
            say(f"hierarchical k-means {args.points} x {args.dim}, ({args.k}, sqrt), {args.iters} iterations, "
                f"2 resampling steps: {time.perf_counter() - t:.2f} s", flush=True)
    peak = [[round(v, 2) for v in r] for r in all_gather_cat(torch.tensor([[base, _rss_peak()]])).tolist()]
    say(f"resident memory per rank (GiB), [after making the data, peak after that]: {peak}; "
        f"this rank's rows {x.numel() * 4 / 2 ** 30:.3f} GiB")
    if is_dist():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
