"""
bench.py: how fast is a DINOv2 training step here, how much memory does it take, and what bounds it?

Times, after warm-up and with the device synchronised around the timed region:
    step      train.py's own train_step: teacher forward, student forward + backward over every crop, the four
              loss terms, per-part clipping, AdamW, EMA (one batch, reused, so the data loader is not timed)
    forward   the backbone alone at --forward-size: inference (batch --forward-batch), and forward + backward (half
              that batch)
    data      the multi-crop augmentation train.build_data makes for these flags, on the first image of the set
              the run trains on (synthetic, or --data): images/s for one worker; and the iBOT masks its collate
              draws over --mask-batches batches (masked crops per batch, mask ratios)
and prints images/s, step time, peak memory and MFU against a peak-FLOPS table (plan.PEAK_BF16_TFLOPS); FLOPs come
from the model's own formula (vit.VisionTransformer.flops_per_image). If data images/s x workers is below step
images/s, the data bounds the run; otherwise the compute does. Two more modes, not in "all":
    memory    plan.py's estimate of a step's peak memory beside the measured one (CUDA: the allocator's peak; CPU:
              the peak RSS, interpreter and libraries included: run it under MALLOC_MMAP_THRESHOLD_=65536, so that
              glibc returns freed blocks and the RSS follows the live tensors). The RSS is machine-dependent (the
              CUDA build of torch maps ~0.5 GB more libraries than the CPU build), so this figure lives here;
              tests/test_gpu_paths.py checks what does not depend on the machine (the growth with the batch).
    knn       knn.py's exact kNN search, k-means and hierarchical k-means on clustered random data, beside faiss's
              when it is installed (never a dependency); under torchrun, sharded k-means, each rank making its rows

Every flag of train.py works here (--arch, --batch-size, --global-size, --compile, --strategy, ...).

    python bench.py                                    # vit_tiny at the laptop preset
    python bench.py --arch vit_s --batch-size 8 --mode forward
    python bench.py --arch vit_l --batch-size 32 --compile
    torchrun --nproc_per_node=1 bench.py --arch vit_g --strategy fsdp --activation-checkpointing --batch-size 12
    MALLOC_MMAP_THRESHOLD_=65536 python bench.py --mode memory --arch vit_s --depth 3 --batch-size 4 --n-local 2 \
        --num-workers 0 --synthetic-size 224       # plan.py's estimate within ~15% of the peak RSS (CPU build)
    python bench.py --mode knn --what kmeans --threads 2 [--points 100000 --dim 384 --clusters 1000]
    torchrun --nproc_per_node=2 bench.py --mode knn --what hkmeans --points 400000

The GPU suite: one command sized for 6 minutes on one H100 / H200 (no sub-benchmark starts after --budget-s; not
yet run on a GPU), one JSON, every sub-benchmark guarded (a failure is recorded and the rest run): the data
pipeline, then vit_s and vit_l training steps in bf16 without and with --compile, and vit_giant2 under FSDP2 (one
process) with activation checkpointing; each with images/s, peak memory, MFU and plan.py's estimate of its peak
memory beside the measured one. --quick: toy sizes, the same code paths on a CPU (CI).

    python bench.py --suite gpu --json bench_gpu.json
    python bench.py --suite gpu --quick --json /tmp/bench_quick.json
"""
import gc
import json
import math
import resource
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from util import cli, distributed
from util import plan
from util.checkpoint import atomic_write_text
from util.cli import arg
import knn
import train

GiB = 2 ** 30

# The GPU suite: (name, flags), run in this order (the compiled runs last: their compile time is the longest).
# Batch sizes are the paper's per-GPU ones (64 for vit_s, 32 for vit_l, 12 for vit_g). A step reuses one batch,
# built in the main process (--num-workers 0), so no loader worker competes for the CPU that launches the kernels.
SUITES = {"gpu": [
    ("data", ["--arch", "vit_s", "--batch-size", "64", "--synthetic-size", "448", "--num-workers", "8"]),
    ("vit_s", ["--arch", "vit_s", "--batch-size", "64", "--num-workers", "0"]),
    ("vit_l", ["--arch", "vit_l", "--batch-size", "32", "--num-workers", "0"]),
    ("vit_g_fsdp_ckpt", ["--arch", "vit_g", "--batch-size", "12", "--strategy", "fsdp", "--activation-checkpointing",
                         "--num-workers", "0"]),
    ("vit_s_compile", ["--arch", "vit_s", "--batch-size", "64", "--compile", "--num-workers", "0"]),
    ("vit_l_compile", ["--arch", "vit_l", "--batch-size", "32", "--compile", "--num-workers", "0"]),
]}


@dataclass
class BenchConfig(train.Config):
    mode: str = arg("all", "all (= step, forward, data) | step | forward | data | memory | knn",
                    check=("all", "step", "forward", "data", "memory", "knn"))
    steps: int = arg(10, "timed iterations", check=(1, None))
    warmup: int = arg(3, "untimed iterations first (compile, allocator, caches)", check=(0, None))
    forward_batch: int = arg(16, "--mode forward: inference batch (forward + backward: half of it)", check=(1, None))
    forward_size: int = arg(224, "--mode forward: image side", check=(1, None))
    data_images: int = arg(20, "--mode data: images through the multi-crop pipeline", check=(1, None))
    mask_batches: int = arg(200, "--mode data: batches of iBOT masks drawn for the masking statistics",
                            check=(1, None))
    json: str = arg("", "also write the figures here")
    suite: str = arg("", "gpu: the fixed GPU suite of the docstring (none: the one configuration the flags give)")
    quick: bool = arg(False, "--suite at toy sizes (one block, 28-px crops): the same code paths on a CPU, for CI")
    budget_s: float = arg(330, "--suite: no sub-benchmark starts after this many seconds (the target: 6 min)")
    # --mode knn (names apart from train.Config's own flags)
    what: str = arg("all", "--mode knn: knn | kmeans | hkmeans | all", check=("knn", "kmeans", "hkmeans", "all"))
    points: int = arg(100_000, "--mode knn: k-means points", check=(1, None))
    dim: int = arg(384, "--mode knn: width of the rows", check=(1, None))
    clusters: int = arg(1000, "--mode knn: clusters of k-means, first level of hierarchical k-means", check=(1, None))
    iters: int = arg(10, "--mode knn: k-means iterations", check=(1, None))
    db: int = arg(200_000, "--mode knn: kNN database rows", check=(1, None))
    queries: int = arg(10_000, "--mode knn: kNN queries", check=(1, None))
    topk: int = arg(10, "--mode knn: neighbours per query", check=(1, None))
    repeats: int = arg(3, "--mode knn: runs of each timing", check=(1, None))
    threads: int = arg(0, "--mode knn: torch and faiss threads (0: torch's default)", check=(0, None))

    def __post_init__(self):
        super().__post_init__()
        if self.suite and self.suite not in SUITES:
            raise ValueError(f"--suite must be one of {', '.join(SUITES)} (or none), got {self.suite!r}")
        if self.mode == "knn" and self.what in ("kmeans", "hkmeans", "all") and self.clusters > self.points:
            raise ValueError(f"--clusters must be <= --points ({self.points}), got {self.clusters}")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: the process's peak RSS (Linux: KiB)


def rss_reset() -> float:
    """Resident memory now (bytes), after resetting the peak (Linux: clear_refs 5 resets VmHWM); nan elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS")
    except OSError:
        return float("nan")


def rss_peak() -> float:
    """Peak resident memory (bytes) since the last rss_reset, from /proc/self/status; nan elsewhere."""
    return _proc_status("VmHWM")


def _proc_status(key):
    try:
        with open("/proc/self/status") as f:
            return float(next(line for line in f if line.startswith(key + ":")).split()[1]) * 1024
    except (OSError, StopIteration):
        return float("nan")


def timed(fn, n_warmup, n_steps, device):
    for _ in range(n_warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / n_steps


def one_step_setup(cfg, rank, world, device, strategy):
    """train.py's run (models, optimizer, centres, schedules) and one batch of its loader, on the device."""
    student_p, student, teacher = train.build_models(cfg, strategy, device)
    run = train.make_run(cfg, rank=rank, world=world, device=device, strategy=strategy, student_p=student_p,
                         student=student, teacher=teacher, ema=teacher)
    loader, _ = train.build_data(cfg, rank, world, 0, device)
    batch = train.to_device(next(iter(loader)), device)
    student_p.train()
    return run, batch


def bench_step(cfg, rank, world, device, strategy):
    run, batch = one_step_setup(cfg, rank, world, device, strategy)
    step = lambda: train.train_step(run, batch, 0)
    seconds = timed(step, cfg.warmup, cfg.steps, device)
    flops = plan.flops_per_image(run.student.backbone, cfg) * cfg.batch_size
    peak = plan.peak_flops(device)
    return {"step_s": seconds, "step_images_per_s": cfg.batch_size * world / seconds,
            "step_tflops_per_gpu": flops / seconds / 1e12, "step_mfu": flops / seconds / peak if peak else None,
            "step_peak_mem_gb": peak_memory_gb(device), "train_gflops_per_image": flops / cfg.batch_size / 1e9}


def bench_memory(cfg, rank, world, device, strategy):
    """plan.py's estimate of a step's peak memory beside the measured peak, over two steps (from the second on, the
    AdamW moments exist). CUDA: the allocator's peak against the allocator-counted estimate; elsewhere the peak
    RSS against the estimate's total (plan.RUNTIME_BYTES counts the interpreter and libraries)."""
    est = plan.estimate(cfg, plan.count_parameters(train.meta_model(cfg)), world, device.type)["memory"]
    start = rss_reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run, batch = one_step_setup(cfg, rank, world, device, strategy)
    for step in range(2):
        train.train_step(run, batch, step)
    synchronize(device)
    if device.type == "cuda":
        measured, estimated = torch.cuda.max_memory_allocated(device), est["peak"]
    else:
        measured, estimated = rss_peak(), est["total"]
    return {"memory_estimated_gb": estimated / GiB, "memory_measured_gb": measured / GiB,
            "memory_measured_over_estimated": measured / estimated, "memory_rss_at_start_gb": start / GiB}


def bench_forward(cfg, device, strategy):
    if strategy == "fsdp":
        return {}  # the forward alone is a single-process measurement
    backbone = train.build_ssl_model(cfg, 0.0).backbone.to(device).eval()
    if cfg.compile:
        backbone.compile()
    x = torch.randn(cfg.forward_batch, 3, cfg.forward_size, cfg.forward_size, device=device)
    autocast = train.autocast_for(device, strategy, cfg.dtype)

    def forward():
        with torch.inference_mode(), autocast:
            backbone.forward_features(x)
    seconds = timed(forward, cfg.warmup, cfg.steps, device)
    flops = backbone.flops_per_image(cfg.forward_size, cfg.forward_size) * cfg.forward_batch
    peak = plan.peak_flops(device)
    # forward + backward of the backbone alone, at half the batch (the usual "training throughput" of a ViT)
    backbone.train()
    x_train = x[:max(1, cfg.forward_batch // 2)]

    def forward_backward():
        with autocast:
            out = backbone.forward_features(x_train)["x_norm_clstoken"]
        out.float().square().mean().backward()
    seconds_train = timed(forward_backward, cfg.warmup, cfg.steps, device)
    return {"forward_images_per_s": cfg.forward_batch / seconds,
            "forward_mfu": flops / seconds / peak if peak else None,
            "forward_backward_images_per_s": x_train.shape[0] / seconds_train}


def bench_data(cfg):
    """One worker's multi-crop throughput, and the masking statistics, of the very augmentation, images and collate
    train.build_data makes for these flags (decoding excluded: it depends on the file)."""
    loader, _ = train.build_data(cfg, 0, 1, 0, torch.device("cpu"))  # builds no worker until iterated
    augment, image = loader.dataset.augment, loader.dataset.images.load(0)[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a data-loader worker runs one thread
    augment(image)
    t0 = time.perf_counter()
    for _ in range(cfg.data_images):
        augment(image)
    seconds = time.perf_counter() - t0
    torch.set_num_threads(threads)
    # iBOT masks of --mask-batches global batches, as the collate draws them (released `collate.py`'s statistics)
    per_batch, ratios = [], []
    for step in range(cfg.mask_batches):
        counts = loader.collate_fn.sample_masks(step, 0, cfg.batch_size).sum(1)  # (2B,) masked patches per crop
        per_batch.append(int((counts > 0).sum()))
        ratios += (counts[counts > 0] / loader.collate_fn.mask_generator.num_patches).tolist()
    r = np.array(ratios or [0.0])
    return {"data_images_per_s_per_worker": cfg.data_images / seconds, "data_image": f"{image.width}x{image.height}",
            "masked_crops_per_batch": f"{min(per_batch)}-{max(per_batch)} of {2 * cfg.batch_size}",
            "mask_ratio_mean": float(r.mean()), "mask_ratio_p10_p50_p90": "/".join(
                f"{v:.3f}" for v in np.percentile(r, (10, 50, 90)))}


def bench_loader(cfg, device, n_batches):
    """images/s of train.py's own DataLoader (workers, multi-crop, masks, collate, pinned memory on CUDA)."""
    loader, _ = train.build_data(cfg, 0, 1, 0, device)
    batches = iter(loader)
    next(batches)  # the workers' start-up is not throughput
    t0 = time.perf_counter()
    for _ in range(n_batches):
        train.to_device(next(batches), device)
    seconds = time.perf_counter() - t0
    workers = loader.num_workers
    del batches, loader  # stops the persistent workers
    return {"loader_images_per_s": n_batches * cfg.batch_size / seconds, "loader_workers": workers}


# ---------------------------------------------------------------------------------------------------------------
# --mode knn: knn.py's engine on clustered random data, beside faiss when it is installed

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


def seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_knn(cfg, rank, world):
    """Seconds of exact kNN (one process only), k-means (random and k-means++ init) and hierarchical k-means (two
    levels, 2 resampling steps): the best of --repeats runs, with faiss's beside them when it is installed."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        import faiss  # only for the comparison
        faiss.omp_set_num_threads(torch.get_num_threads())
    except ImportError:
        faiss = None
    distributed.print0(f"threads {torch.get_num_threads()}, world {world}, faiss {'yes' if faiss else 'no'}; knn: "
                       f"{cfg.db} x {cfg.dim}, {cfg.queries} queries, top {cfg.topk}; k-means: {cfg.points} x "
                       f"{cfg.dim}, {cfg.clusters} clusters, {cfg.iters} iterations (hierarchical: 2 levels, "
                       f"2 resampling steps); faiss.Kmeans starts from random points, as kmeans_random_init_s")
    lo, hi = knn.shard_range(cfg.points, rank, world)
    x = clustered_rows(lo, hi, cfg.dim)  # (n / world, D) this rank's rows only
    start = rss_reset()
    best = {}
    for rep in range(cfg.repeats):
        runs = {}
        if cfg.what in ("knn", "all") and world == 1:
            db = F.normalize(clustered_rows(0, cfg.db, cfg.dim, seed=1), dim=1)
            q = F.normalize(clustered_rows(0, cfg.queries, cfg.dim, seed=2), dim=1)
            runs["knn_s"] = lambda: knn.knn(q, db, cfg.topk)
            if faiss:
                def faiss_knn():
                    index = faiss.IndexFlatIP(cfg.dim)
                    index.add(db.numpy())
                    index.search(q.numpy(), cfg.topk)
                runs["knn_faiss_s"] = faiss_knn  # IndexFlatIP: exact, as ours
        if cfg.what in ("kmeans", "all"):
            runs["kmeans_random_init_s"] = lambda: knn.kmeans(x, cfg.clusters, cfg.iters, init="random", seed=rep)
            runs["kmeans_s"] = lambda: knn.kmeans(x, cfg.clusters, cfg.iters, seed=rep)  # k-means++ init
            if faiss and world == 1:  # random init, as ours above
                runs["kmeans_faiss_s"] = lambda: faiss.Kmeans(cfg.dim, cfg.clusters, niter=cfg.iters,
                                                              seed=rep).train(x.numpy())
        if cfg.what in ("hkmeans", "all"):
            ks = (cfg.clusters, max(2, round(math.sqrt(cfg.clusters))))
            runs["hkmeans_s"] = lambda: knn.hierarchical_kmeans(x, ks, cfg.iters, resample_steps=2)
        for name, fn in runs.items():
            best[name] = min(best.get(name, math.inf), seconds(fn))
    peak = distributed.all_gather_cat(torch.tensor([[start, rss_peak()]]) / GiB).tolist()
    return {**best, "rss_per_rank_gb": [[round(v, 2) for v in r] for r in peak],  # [after making the data, peak]
            "rows_per_rank_gb": x.numel() * 4 / GiB}


# ---------------------------------------------------------------------------------------------------------------
# The GPU suite (SUITES, at the top): every sub-benchmark guarded, the JSON rewritten after each

QUICK_MODEL = ["--depth", "1", "--global-size", "28", "--local-size", "14", "--n-local", "0", "--batch-size", "4",
               "--n-prototypes", "64", "--ibot-n-prototypes", "64", "--head-hidden-dim", "64",
               "--head-bottleneck-dim", "32", "--ibot-bottleneck-dim", "32", "--drop-path", "0",
               "--synthetic-images", "16", "--synthetic-size", "64"]
QUICK = QUICK_MODEL + ["--steps", "2", "--warmup", "1", "--data-images", "2", "--mask-batches", "2"]
QUICK_SKIPS = {"vit_l_compile": "--quick: the compile path is vit_s_compile's (inductor's CPU compile of another "
                                "model would add ~30 s to CI)"}


def run_suite(cfg):
    """Every sub-benchmark of SUITES[cfg.suite], each guarded; the JSON is rewritten after each one."""
    device = torch.device(plan.resolve_device_type(cfg))
    results = {"suite": cfg.suite, "quick": cfg.quick, "device": str(device), "torch": torch.__version__,
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
               "peak_bf16_tflops": (plan.peak_flops(device) or 0) / 1e12 or None, "benchmarks": {}}
    start = time.perf_counter()
    for name, flags in SUITES[cfg.suite]:
        entry = {"flags": " ".join(flags)}
        skip = QUICK_SKIPS.get(name) if cfg.quick else None
        if time.perf_counter() - start > cfg.budget_s:
            skip = f"the suite's {cfg.budget_s:.0f} s budget was spent"
        t0 = time.perf_counter()
        try:
            if skip:
                entry["skipped"] = skip
                continue  # the finally clause still records it
            argv = flags + (QUICK + (["--num-workers", "1"] if name == "data" else []) if cfg.quick else [])
            try:  # a bad flag is a usage error (SystemExit) in the parser: recorded here like any failure
                sub = train.parse_config(BenchConfig, train.PRESETS, argv=argv + ["--device", device.type])
            except SystemExit:
                raise ValueError(f"invalid flags for this benchmark: {' '.join(argv)}") from None
            if name == "data":
                entry.update(bench_data(sub))
                entry.update(bench_loader(sub, device, 2 if cfg.quick else 20))
            else:
                strategy = "fsdp" if sub.strategy == "fsdp" else "none"
                if strategy == "fsdp":  # FSDP2 needs a process group, even of one
                    distributed.init(str(device), group=True)
                est = plan.estimate(sub, plan.count_parameters(train.meta_model(sub)), 1, device.type)
                entry.update(arch=sub.arch, batch_size=sub.batch_size, strategy=strategy, dtype=est["dtype"],
                             compile=sub.compile, activation_checkpointing=sub.activation_checkpointing,
                             params_m=est["params_total"] / 1e6,
                             estimated_peak_gb=est["memory"]["peak"] / 2**30)  # allocator-counted (no context)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                entry.update(bench_step(sub, 0, 1, device, strategy))
        except Exception as e:  # recorded; the next sub-benchmark still runs
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc()[-3000:]
        finally:
            distributed.close()
            torch._dynamo.reset()  # compiled graphs of this model are not reused by the next
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            entry["seconds"] = time.perf_counter() - t0
            record(results, name, entry, cfg.json)
    return results


def record(results, name, entry, path):
    """Add one sub-benchmark's figures, print them, and rewrite the JSON (a killed suite keeps what it measured)."""
    results["benchmarks"][name] = entry
    print(f"{name:<16} " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in entry.items() if k not in ("traceback", "flags")), flush=True)
    if path:
        atomic_write_text(path, json.dumps(results, indent=1))


def main(cfg):
    if cfg.suite:  # a known one: BenchConfig checks --suite
        return run_suite(cfg)
    if cfg.mode == "knn":
        rank, world, device = distributed.init(cfg.device)
        results = {"mode": "knn", "world": world, **bench_knn(cfg, rank, world)}
    else:
        rank, world, device, strategy, n_params = train.setup(cfg)
        results = {"arch": cfg.arch, "device": str(device), "strategy": strategy, "world": world,
                   "batch_size": cfg.batch_size, "compile": cfg.compile, "backbone_params_m": n_params / 1e6,
                   "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}
    if cfg.mode in ("all", "data") and rank == 0:
        results.update(bench_data(cfg))
    if cfg.mode in ("all", "forward"):
        results.update(bench_forward(cfg, device, strategy))
    if cfg.mode in ("all", "step"):
        results.update(bench_step(cfg, rank, world, device, strategy))
    if cfg.mode == "memory":
        results.update(bench_memory(cfg, rank, world, device, strategy))
    if rank == 0:
        width = max(map(len, results))
        for k, v in results.items():
            print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
        if "data_images_per_s_per_worker" in results and "step_images_per_s" in results:
            workers = results["step_images_per_s"] / world / results["data_images_per_s_per_worker"]
            print(f"data workers needed per rank to keep up: {workers:.1f}")
        if cfg.json:
            atomic_write_text(cfg.json, json.dumps(results, indent=1))
    distributed.close()
    return results


if __name__ == "__main__":
    cli.run(lambda: main(train.parse_config(BenchConfig, train.PRESETS, description=__doc__)))
