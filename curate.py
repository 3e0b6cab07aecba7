"""Data curation for DINOv2: the LVD-142M pipeline (paper section 3), on the project's exact kNN engine (knn.py).

DINOv2 picked 142M of 1.2B unlabelled web images: embed every image with a frozen self-supervised backbone, remove
near-duplicates (copy detection) and near-duplicates of the evaluation sets, then retrieve for each image of curated
seed sets its N = 4 nearest pool images (small seed sets: M images of the seed's pool cluster). The balancing step
is Vo et al. 2024's ("Automatic data curation for self-supervised learning: a clustering-based approach"):
hierarchical k-means with resampling, then an even draw across clusters, so a few dominant concepts cannot swamp it.
NOTE(deviation): the paper searched with Faiss (GPU IVF+PQ, approximate); here every search is exact (knn.py).

Under torchrun each rank embeds its share of the chunks, then holds its contiguous share of the pool's rows
(memory-mapped); every stage is sharded (knn.py): a rank holds whole only O(N) scalars, the seeds and eval set.

Public names, in reading order:
    balanced_sample                             the even draw from the cluster tree (Vo et al.)
    connected_components, dedup, remove_near    near-duplicate groups (one image kept each), eval-set leaks
    retrieve, retrieve_from_clusters            the seed-based retrieval of section 3
    embed, EmbeddingChunks                      frozen ViT features (evaluate.load_backbone), resumable on-disk chunks
    CurateConfig, curate, write_outputs         the whole pipeline on embeddings; curated.txt, report.json, plot
    parse_args, main                            the command line

Run:  python curate.py --pool DIR_or_list --seeds DIR_or_list [--exclude DIR] [--weights W] --out OUT
      python tests/curate_demo.py        (the synthetic test pool, whose truth is known, curated and scored)
      torchrun --nproc_per_node=N curate.py ...   (every stage shards across ranks)
Shapes: Q queries, N database rows, D width, K clusters.
"""
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from util import cli, distributed
from util.checkpoint import atomic_write, atomic_write_text
from util.cli import arg
from data import ImageFolderDataset, load_image, to_tensor
from PIL import Image
from util.distributed import gather_shards, pick_device, print0, rank_world
from knn import ShardedKNN, hierarchical_kmeans, knn, shard_range


def _rows(emb, lo, hi):
    """Rows [lo, hi) of an embedding array (numpy, memmap, tensor or EmbeddingChunks): float32 tensor."""
    part = emb[lo:hi]
    return (part if torch.is_tensor(part) else torch.from_numpy(np.ascontiguousarray(part))).float()


def _my_rows(emb):
    """This rank's contiguous share of all rows of emb: ((n, D) tensor, first row)."""
    lo, hi = shard_range(len(emb), *rank_world())
    return _rows(emb, lo, hi), lo


# ---------------------------------------------------------------------------------------------------------------
# 1. Balanced sampling from the cluster tree (Vo et al. 2024)
# ---------------------------------------------------------------------------------------------------------------

def _water_fill(sizes, n, rng):
    """Split n draws over groups of the given sizes as evenly as possible: each group gets min(size, t) for the
    largest cap t that fits, and the remainder goes one each to randomly chosen groups that still have room."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if n >= sizes.sum():
        return sizes.copy()
    lo, hi = 0, int(sizes.max())
    while lo < hi:  # largest t with sum(min(sizes, t)) <= n
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if np.minimum(sizes, mid).sum() <= n else (lo, mid - 1)
    shares = np.minimum(sizes, lo)
    rest = int(n - shares.sum())  # < number of groups larger than lo, else lo + 1 would have fitted
    shares[rng.choice(np.flatnonzero(sizes > lo), rest, replace=False)] += 1
    return shares


NONE = np.zeros(0, np.int64)  # appended to lists of index arrays, so that concatenating an empty list works


def balanced_sample(assignments, n_target, seed=0):
    """Draw n_target items evenly from a clustering tree; returns sorted item indices (LongTensor).

    assignments[0] maps items to level-1 clusters, assignments[l] level-l clusters to level-(l+1) ones (the order of
    hierarchical_kmeans's). The draw is split evenly across the top-level clusters, then recursively across each one's
    children; a cluster smaller than its share gives all it has, the rest goes to the others (_water_fill).
    """
    rng = np.random.default_rng(seed)
    a = [np.asarray(torch.as_tensor(t).cpu()) for t in assignments]
    members, sizes, item_cluster = [], [], a[0]
    for level, parent in enumerate(a):  # children of every cluster, and its size in items
        order = np.argsort(parent, kind="stable")
        n_clusters = int(a[level + 1].shape[0]) if level + 1 < len(a) else int(parent.max()) + 1
        counts = np.bincount(parent, minlength=n_clusters)
        members.append(np.split(order, np.cumsum(counts)[:-1]))
        if level > 0:
            item_cluster = parent[item_cluster]
        sizes.append(np.bincount(item_cluster, minlength=n_clusters))

    def draw(level, cluster, n):
        if level == 0:  # NOTE(deviation): at random inside a leaf (Vo et al. also offer "closest to the centroid")
            return rng.choice(members[0][cluster], n, replace=False)
        children = members[level][cluster]
        shares = _water_fill(sizes[level - 1][children], n, rng)
        return np.concatenate([draw(level - 1, c, s) for c, s in zip(children, shares) if s > 0] + [NONE])

    top = len(a) - 1
    shares = _water_fill(sizes[top], min(n_target, len(a[0])), rng)
    picked = [draw(top, c, s) for c, s in enumerate(shares) if s > 0]
    return torch.from_numpy(np.sort(np.concatenate(picked + [NONE])))


# ---------------------------------------------------------------------------------------------------------------
# 2. Deduplication and retrieval
# ---------------------------------------------------------------------------------------------------------------

def connected_components(n, src, dst):
    """Union-find over n items joined by the edges (src, dst), done data-parallel: every edge hooks the larger of
    its two roots onto the smaller, then pointer jumping flattens the trees; repeat until no edge joins two roots.
    Returns labels (n,): the lowest index of each item's component (that item is the group's root)."""
    parent = torch.arange(n)
    src, dst = torch.as_tensor(src, dtype=torch.long).cpu(), torch.as_tensor(dst, dtype=torch.long).cpu()
    while True:
        rs, rd = parent[src], parent[dst]
        low = torch.minimum(rs, rd)
        new = parent.clone()
        new.scatter_reduce_(0, rs, low, "amin")
        new.scatter_reduce_(0, rd, low, "amin")
        while not torch.equal(new[new], new):  # pointer jumping: parents only ever point to lower indices
            new = new[new]
        if torch.equal(new, parent):
            return parent
        parent = new


def dedup(emb, threshold, k=16, block=16384, **knn_kwargs):
    """Near-duplicate removal inside one set: pairs with cosine >= threshold among each image's k nearest
    neighbours are joined into groups (connected components), and each group keeps its lowest index.
    emb (N, D) L2-normalised -> kept indices (sorted LongTensor), group labels (N,) (= the kept index).

    emb may be a memory-mapped array: under torchrun each rank keeps only its share of the rows as the database,
    and every rank reads all rows as queries, `block` at a time; only the edges found (few) are kept.
    """
    index = ShardedKNN(*_my_rows(emb), total=len(emb))
    src, dst = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    for q0 in range(0, len(emb), block):
        q = _rows(emb, q0, min(len(emb), q0 + block))  # (B, D)
        s, i = index.search(q, k + 1, **knn_kwargs)  # +1: every image finds itself
        rows = torch.arange(q0, q0 + len(q))[:, None].expand_as(i)  # (B, k+1)
        hit = (s.cpu() >= threshold) & (i.cpu() != rows)
        src.append(rows[hit])
        dst.append(i.cpu()[hit])
    labels = connected_components(len(emb), torch.cat(src), torch.cat(dst))
    return (labels == torch.arange(len(emb))).nonzero().squeeze(1), labels


def remove_near(pool_emb, exclude_emb, threshold, **knn_kwargs):
    """The pool indices (sorted LongTensor) left when images at cosine >= threshold to an evaluation image are dropped
    (no leak into training); each rank checks its share of the pool against the whole (small) evaluation set."""
    if exclude_emb is None or len(exclude_emb) == 0:
        return torch.arange(len(pool_emb))
    x, _ = _my_rows(pool_emb)
    s, _ = knn(x, _rows(exclude_emb, 0, len(exclude_emb)), 1, **knn_kwargs)
    return gather_shards(s[:, 0].cpu() < threshold).nonzero().squeeze(1)


def retrieve(seed_emb, pool, k=4, **knn_kwargs):
    """The k nearest pool images of every seed image (paper: N = 4): (sorted set of pool indices, the neighbour
    lists (S, k)). pool: all pool rows (N, D), or a ShardedKNN over the ranks' shards of them."""
    index = pool if isinstance(pool, ShardedKNN) else ShardedKNN(*_my_rows(pool), total=len(pool))
    _, i = index.search(torch.as_tensor(seed_emb).float(), k, **knn_kwargs)
    return torch.unique(i.cpu()), i.cpu()


def retrieve_from_clusters(seed_emb, centroids, assignments, m, seed=0, **knn_kwargs):
    """For small seed sets (paper: M = 10,000): m pool images drawn at random from each seed's nearest pool
    cluster (all of it if smaller). Returns a sorted set of pool indices."""
    _, c = knn(torch.as_tensor(seed_emb).float(), centroids, 1, **knn_kwargs)
    rng = np.random.default_rng(seed)
    assignments = np.asarray(assignments.cpu())
    picked = []
    for cluster in np.unique(c.cpu().numpy()):
        members = np.flatnonzero(assignments == cluster)
        picked.append(rng.choice(members, min(m, len(members)), replace=False))
    return torch.from_numpy(np.unique(np.concatenate(picked + [NONE])))


# ---------------------------------------------------------------------------------------------------------------
# 3. Embedding: a frozen backbone over many images, written to resumable on-disk chunks
# ---------------------------------------------------------------------------------------------------------------

class _Images(torch.utils.data.Dataset):
    """Image paths (or a dataset of (PIL image, label)) -> (normalised (3, size, size) tensor, readable flag).
    Indices stay aligned with the items: an unreadable file is a black image with flag 0 (a zero embedding, which
    the pipeline drops), not skipped as a training set would."""

    def __init__(self, items, size):
        self.items, self.size = items, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item, ok = self.items[i], 1.0
        try:
            img = load_image(item) if isinstance(item, (str, os.PathLike)) else item[0].convert("RGB")
        except Exception as err:  # any decoder error: keep the slot, flag it
            warnings.warn(f"unreadable image {item}: {type(err).__name__}: {err}")
            img, ok = Image.new("RGB", (self.size, self.size)), 0.0
        # NOTE(deviation): a square resize of the whole image (aspect not kept), not a centre crop: borders count
        img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return to_tensor(img), ok  # (3, size, size), normalised as every other input of the project


def _fingerprint(items, model_tag, size) -> str:
    """What the embeddings on disk were computed from: the items, the model and the resolution."""
    if hasattr(items, "samples"):
        names = [p for p, _ in items.samples]
    elif isinstance(items, (list, tuple)):
        names = [os.fspath(p) for p in items]
    else:  # a procedural dataset: its class and parameters identify it
        names = [repr((type(items).__name__, len(items), getattr(items, "seed", None), getattr(items, "size", None)))]
    return hashlib.sha1("\n".join(names + [model_tag, str(size)]).encode()).hexdigest()


def _chunk_paths(out_dir, c):
    return os.path.join(out_dir, f"chunk_{c:06d}.npy"), os.path.join(out_dir, f"chunk_{c:06d}.done")


def embed(items, model, out_dir, batch_size=64, size=224, device=None, chunk_size=4096, num_workers=0,
          model_tag="", progress=True):
    """L2-normalised model outputs (a ViT's cls token; bf16 autocast on CUDA) of `items` (paths, or a dataset of
    (PIL image, label)) -> EmbeddingChunks (N, D), read lazily. Chunk c of chunk_size items is written whole to
    OUT/chunk_c.npy, then a chunk_c.done marker: a rerun skips finished chunks, so an interrupted run resumes. Under
    torchrun rank r embeds the chunks c = r, r + world, ... (one writer a file), then all ranks wait for each other.
    """
    rank, world = rank_world()
    device = torch.device(device) if device is not None else pick_device()
    n = len(items)
    meta = {"n": n, "chunk_size": chunk_size, "fingerprint": _fingerprint(items, model_tag, size)}
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old != meta:
            raise cli.UserError(f"{out_dir} holds embeddings of other images, model or settings ({old} vs {meta}); "
                                "delete it or pick another output folder (--out)")
    elif rank == 0:
        atomic_write_text(meta_path, json.dumps(meta))
    distributed.barrier()  # meta.json is in place before any rank writes a chunk it describes
    n_chunks = math.ceil(n / chunk_size)
    todo = [c for c in range(rank, n_chunks, world) if not os.path.exists(_chunk_paths(out_dir, c)[1])]
    model = model.to(device).eval()
    images = _Images(items, size)
    bar = tqdm(total=sum(min(n, (c + 1) * chunk_size) - c * chunk_size for c in todo), desc=f"embed {out_dir}",
               unit="img", disable=not progress or rank != 0)
    for c in todo:
        lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, range(lo, hi)), batch_size=batch_size,
                                             num_workers=num_workers)
        path, done = _chunk_paths(out_dir, c)

        def write(tmp):  # the chunk as a numpy memmap; atomic_write renames it into place only once complete
            out, pos = None, 0
            for x, ok in loader:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    f = model(x.to(device))  # (B, D)
                f = F.normalize(f.float(), dim=1) * ok.to(device)[:, None]  # unreadable images -> zero vectors
                if out is None:
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(hi - lo, f.shape[1]))
                out[pos:pos + len(f)] = f.cpu().numpy()
                pos += len(f)
                bar.update(len(f))
            out.flush()
        atomic_write(path, write)
        open(done, "w").close()
    bar.close()
    distributed.barrier()
    return EmbeddingChunks(out_dir)


class EmbeddingChunks:
    """The chunk files of an embed() folder as one (N, D) float32 array that is read lazily: a[lo:hi] reads only
    the rows asked for, from the memory-mapped chunks that hold them; np.asarray(a) reads them all."""

    def __init__(self, out_dir):
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
        self.chunk_size, n_chunks = meta["chunk_size"], math.ceil(meta["n"] / meta["chunk_size"])
        missing = [c for c in range(n_chunks) if not os.path.exists(_chunk_paths(out_dir, c)[1])]
        if missing:
            raise FileNotFoundError(f"{out_dir}: chunks {missing[:10]} are not finished; rerun the embedding")
        self.chunks = [np.load(_chunk_paths(out_dir, c)[0], mmap_mode="r") for c in range(n_chunks)]
        self.shape = (meta["n"], self.chunks[0].shape[1] if n_chunks else 0)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("EmbeddingChunks reads contiguous row ranges only: a[lo:hi]")
        lo, hi, _ = rows.indices(len(self))
        c0, c1 = lo // self.chunk_size, max(lo, hi - 1) // self.chunk_size + 1
        parts = [self.chunks[c][max(lo - c * self.chunk_size, 0):max(hi - c * self.chunk_size, 0)]
                 for c in range(c0, min(c1, len(self.chunks)))]
        return np.concatenate(parts + [np.zeros((0, self.shape[1]), np.float32)])

    def __array__(self, dtype=None, copy=None):
        return self[:].astype(dtype or np.float32, copy=False)


# ---------------------------------------------------------------------------------------------------------------
# 4. The pipeline: dedup -> exclude -> cluster -> retrieve -> balance
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class CurateConfig:
    pool: str = arg("", "folder or .txt list of the uncurated images")
    seeds: str = arg("", "folder or .txt list of curated seed images; empty: balance the whole pool (Vo et al.)")
    exclude: str = arg("", "evaluation images: their near-duplicates leave the pool")
    out: str = arg("runs/curate", "curated.txt, report.json, clusters.png, embeddings/")
    weights: str = arg("", "backbone checkpoint (util.weights.from_pretrained); empty: a random --arch, with a warning")
    arch: str = arg("vit_small", "used only without --weights")
    size: int = arg(224, "images resized to size x size (rounded to a multiple of the patch)", check=(1, None))
    batch_size: int = arg(64, "images per embedding batch", check=(1, None))
    workers: int = arg(4, "DataLoader workers for decoding", check=(0, None))
    chunk_size: int = arg(4096, "images per on-disk embedding chunk: the unit of resume", check=(1, None))
    dedup_threshold: float = arg(0.95, "cosine at or above which two pool images are duplicates", check=(-1.0, 1.0))
    dedup_k: int = arg(16, "neighbours examined per image for duplicates", check=(1, None))
    exclude_threshold: float = arg(0.95, "cosine to an evaluation image that drops a pool image", check=(-1.0, 1.0))
    retrieve_k: int = arg(4, "nearest pool images per seed (paper: N = 4)", check=(1, None))
    cluster_sample: int = arg(0, "also this many of each seed's pool cluster (paper: M = 10,000)", check=(0, None))
    clusters: str = arg("auto", "clusters per level, e.g. \"1000,100\"; auto: N/10, then its square root")
    kmeans_iters: int = arg(20, "Lloyd iterations per k-means", check=(1, None))
    resample_steps: int = arg(10, "Vo et al.'s resampling steps per level", check=(0, None))
    target: float = arg(0.5, "the balanced draw: a fraction of the candidates if <= 1, else a count", check=">0")
    seed: int = arg(0, "seed of the k-means initialisation and the balanced draw")
    device: str = arg("", "empty: cuda, else mps, else cpu")

    def __post_init__(self):
        cli.check_fields(self)  # the declared ranges; below, the format of --clusters
        if self.clusters != "auto":
            try:
                ks = [int(k) for k in self.clusters.split(",")]
            except ValueError:
                ks = []
            if not ks or min(ks) < 1:
                raise ValueError(f"--clusters must be auto or positive integers like 1000,100, got {self.clusters!r}")


def _cluster_sizes(n, cfg) -> list:
    """Clusters per level: --clusters, each level at most the level below it (the images, then the clusters)."""
    if cfg.clusters == "auto":
        k1 = max(2, math.ceil(n / 10))
        return [k1, max(2, round(math.sqrt(k1)))]
    ks, below = [], n
    for k in (int(k) for k in cfg.clusters.split(",")):
        if k > below:
            print0(f"note: --clusters asks for {k} clusters of {below} {'images' if not ks else 'clusters'}: "
                   f"using {below}")
        ks.append(min(k, below))
        below = ks[-1]
    return ks


def curate(pool_emb, seed_emb=None, exclude_emb=None, cfg=None, pool_copy_emb=None, progress=True):
    """Run the curation stages on precomputed, L2-normalised embeddings (rows of zeros = unreadable images).

    Duplicates and evaluation-set leaks are found in the copy-detection space (pool_copy_emb, default pool_emb, and
    exclude_emb). The pool may be EmbeddingChunks: under torchrun each rank reads only its share of the rows, and
    every rank returns one process's result: `selected` (pool indices), the indices kept after each stage, the
    clustering levels, and a `report` of counts.
    """
    cfg = cfg or CurateConfig()
    t0 = time.time()
    N = len(pool_emb)
    copy_emb = pool_emb if pool_copy_emb is None else pool_copy_emb
    x, lo = _my_rows(pool_emb)  # (n, D) this rank's rows of the pool, lo the first one's index
    readable = gather_shards(x.norm(dim=1).cpu() > 0)  # (N,) bool
    report = {"pool": N, "unreadable": N - int(readable.sum())}

    # NOTE(deviation): the paper deduplicated with a dedicated copy-detection model; without one (the command
    # line), duplicates are found by a cosine threshold on the backbone's own features.
    print0("1/5 dedup: near-duplicate groups inside the pool, one image kept each")
    _, labels = dedup(copy_emb, cfg.dedup_threshold, cfg.dedup_k, progress=progress)  # zero rows join nothing
    root = labels == torch.arange(N)  # (N,) bool: the image each duplicate group keeps
    after_dedup = (root & readable).nonzero().squeeze(1)
    dup_group = torch.where(readable, labels, -1)  # pool index of the image each one's group kept
    report["removed_duplicates"] = int(readable.sum()) - len(after_dedup)

    print0("2/5 exclude: pool images that are near-duplicates of the evaluation set")
    clean = torch.zeros(N, dtype=torch.bool)
    clean[remove_near(copy_emb, exclude_emb, cfg.exclude_threshold, progress=progress)] = True
    clean &= root & readable
    kept = clean.nonzero().squeeze(1)
    report["removed_near_exclude"] = len(after_dedup) - len(kept)
    report["kept_after_dedup_exclude"] = len(kept)
    if len(kept) == 0:
        raise cli.UserError(f"no pool image is left after dedup and exclusion ({report}); with random or collapsed "
                            "features every image looks alike: pass trained --weights or raise the thresholds")

    x = x[clean[lo:lo + len(x)].to(x.device)]  # this rank's rows of the clean pool, in pool order
    ks = _cluster_sizes(len(kept), cfg)
    print0(f"3/5 cluster: hierarchical k-means with resampling, clusters per level {ks}")
    levels = hierarchical_kmeans(x, ks, cfg.kmeans_iters, cfg.resample_steps, seed=cfg.seed, progress=progress,
                                 resume_dir=os.path.join(cfg.out, "clusters"))
    levels[0]["assignments"] = gather_shards(levels[0]["assignments"].cpu())  # (len(kept),) O(N) ints, not rows
    report["clusters_per_level"] = [len(level["centroids"]) for level in levels]

    neighbours = None
    if seed_emb is not None and len(seed_emb):
        print0(f"4/5 retrieve: the {cfg.retrieve_k} nearest pool images of each of {len(seed_emb)} seeds")
        seeds = _rows(seed_emb, 0, len(seed_emb))
        candidates, neighbours = retrieve(seeds, ShardedKNN.from_shard(x), cfg.retrieve_k, progress=progress)
        if cfg.cluster_sample > 0:
            from_clusters = retrieve_from_clusters(seeds, levels[0]["centroids"], levels[0]["assignments"],
                                                   cfg.cluster_sample, cfg.seed)
            candidates = torch.unique(torch.cat([candidates, from_clusters]))
        report["retrieved"] = len(candidates)
    else:
        print0("4/5 retrieve: no seeds, every clean pool image is a candidate")
        candidates = torch.arange(len(kept))
        report["retrieved"] = 0
    report["candidates"] = len(candidates)

    n_target = round(cfg.target * len(candidates)) if cfg.target <= 1 else int(cfg.target)
    print0(f"5/5 balance: {n_target} of {len(candidates)} candidates, drawn evenly across the cluster tree")
    tree = [levels[0]["assignments"].cpu()[candidates]] + [level["assignments"].cpu() for level in levels[1:]]
    picked = balanced_sample(tree, n_target, cfg.seed)
    report["selected"] = len(picked)
    report["seconds"] = round(time.time() - t0, 2)
    k1 = len(levels[0]["centroids"])
    return {
        "selected": kept[candidates[picked]],  # pool indices of the curated set
        "after_dedup": after_dedup, "kept": kept, "candidates": kept[candidates], "dup_group": dup_group,
        "neighbours": None if neighbours is None else kept[neighbours],  # (S, k) pool indices per seed
        "levels": levels, "report": report,
        "cluster_sizes_before": torch.bincount(tree[0], minlength=k1),
        "cluster_sizes_after": torch.bincount(tree[0][picked], minlength=k1),
    }


def plot_cluster_sizes(before, after, path):
    """Level-1 cluster sizes of the candidates before and after balancing, largest first (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for sizes, label in ((before, "before balancing"), (after, "after balancing")):
        sizes = np.sort(np.asarray(sizes))[::-1]
        sizes = sizes[sizes > 0]
        ax.plot(np.arange(1, len(sizes) + 1), sizes, marker=".", label=f"{label} ({sizes.sum()} images)")
    ax.set(xlabel="cluster rank", ylabel="images in cluster", yscale="log", title="Level-1 cluster sizes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out, paths, result):
    """OUT/curated.txt (one path per line: data.ImageFolderDataset reads it), report.json, clusters.png."""
    atomic_write_text(os.path.join(out, "curated.txt"),
                      "".join(f"{os.path.abspath(paths[i])}\n" for i in result["selected"].tolist()))
    atomic_write_text(os.path.join(out, "report.json"), json.dumps(result["report"], indent=2))
    plot_cluster_sizes(result["cluster_sizes_before"], result["cluster_sizes_after"], os.path.join(out, "clusters.png"))


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> CurateConfig:
    cfg = cli.parse(CurateConfig, argv, __doc__)  # every field a flag; range checks in __post_init__
    if not cfg.pool:
        cli.build_parser(CurateConfig, __doc__).error("--pool is required (tests/curate_demo.py: a synthetic pool)")
    for name in ("pool", "seeds", "exclude", "weights"):
        path = getattr(cfg, name)
        if path and not os.path.exists(path):
            raise cli.MissingFile(f"--{name} {path}: no such file or folder")
    return cfg


def _image_paths(root) -> list:
    return [path for path, _ in ImageFolderDataset(root).samples]


def main(argv=None):
    cfg = parse_args(argv)
    rank, _, device = distributed.init(cfg.device or "auto")  # under torchrun: the process group, a GPU per rank
    print0("config:", json.dumps(dataclasses.asdict(cfg)))
    try:
        from evaluate import load_backbone, round_to_patch  # imported here: the kNN / clustering half needs no ViT
        if not cfg.weights:
            warnings.warn(f"no --weights: embedding with a RANDOMLY initialised {cfg.arch}. The pipeline runs, but its "
                          "neighbours, duplicates and clusters mean little; pass a trained backbone.")
        # no LayerScale in a random network: at 1e-5 every block is near the identity, every image the same cls token
        model = load_backbone(cfg.weights or None, cfg.arch, device, random_init=not cfg.weights, img_size=224,
                              layerscale=None)
        size = round_to_patch(cfg.size, model.patch_size)
        if size != cfg.size:
            print0(f"--size {cfg.size} is not a multiple of the patch size {model.patch_size}: using {size}")
        kw = dict(batch_size=cfg.batch_size, size=size, device=device, chunk_size=cfg.chunk_size,
                  num_workers=cfg.workers, model_tag=f"{cfg.weights or 'random ' + cfg.arch}")
        paths = {name: _image_paths(getattr(cfg, name)) for name in ("pool", "seeds", "exclude") if getattr(cfg, name)}
        emb = {name: embed(p, model, os.path.join(cfg.out, "embeddings", name), **kw) for name, p in paths.items()}
        result = curate(emb["pool"], emb.get("seeds"), emb.get("exclude"), cfg, progress=rank == 0)
        if rank == 0:
            write_outputs(cfg.out, paths["pool"], result)
            print0(json.dumps(result["report"], indent=2))
            print0(f"wrote {cfg.out}/curated.txt ({len(result['selected'])} images), report.json, clusters.png")
        return result
    finally:
        distributed.close()


if __name__ == "__main__":
    cli.run(main)
