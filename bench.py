"""
bench.py: how fast is a DINOv2 training step here, how much memory does it take, and what bounds it? Paper §5
("Efficient implementation"), measured on train.py's own code. Timed after warm-up, the device synchronised.

Reading order (--mode):
    BenchConfig, timed, memory   train.py's flags and these; the one timing and the one memory helper
    bench_step      step: train.py's own train_step on one reused batch: images/s, peak memory, MFU
    bench_forward   forward: the backbone alone at --forward-size: inference; forward + backward at half the batch
    bench_data      data: train.build_data's own pipeline: one worker's multi-crop rate on the first image the run
                    trains on, the iBOT masks its collate draws, the loader's rate over --steps batches
    bench_knn       knn: knn.py's kNN, k-means and hierarchical k-means on clustered_rows, beside faiss when it is
                    installed (never a dependency); under torchrun, sharded, each rank making its own rows
    measure, main   all = step, forward and data (data images/s x workers below step images/s: the data bounds the
                    run); memory: the step's peak beside util/plan.py's estimate (CUDA: the allocator's; CPU: the
                    RSS, under MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns freed blocks; machine-dependent)
    SUITES, run_suite   the GPU suite, sized for 6 minutes on one H100 / H200 (no sub-benchmark starts after
                    --budget-s; H200 figures in DETAILS.md): each guarded, the JSON rewritten after each; --quick:
                    toy sizes, the same code paths on a CPU (CI)
Every flag of train.py works here (--arch, --batch-size, --global-size, --compile, --strategy, ...).

    python bench.py                                    # vit_tiny at the laptop preset
    python bench.py --arch vit_s --batch-size 8 --mode forward
    torchrun --nproc_per_node=1 bench.py --arch vit_g --strategy fsdp --activation-checkpointing --batch-size 12
    MALLOC_MMAP_THRESHOLD_=65536 python bench.py --mode memory --arch vit_s --depth 3 --batch-size 4 --n-local 2 \
        --num-workers 0 --synthetic-size 224 --warmup 1 --steps 1   # the estimate within ~15% (CPU build)
    python bench.py --mode knn --what kmeans --threads 2 [--points 100000 --dim 384 --clusters 1000]
    torchrun --nproc_per_node=2 bench.py --mode knn --what hkmeans --points 400000
    python bench.py --suite gpu --json bench_gpu.json  # [--quick]
"""
import gc
import json
import math
import os
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

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
CPU = torch.device("cpu")

# The GPU suite: (name, flags), run in this order (the compiled runs last: their compile time is the longest).
# Batch sizes are the paper's per-GPU ones (64 for vit_s, 32 for vit_l, 12 for vit_g). A step reuses one batch,
# built in the main process (--num-workers 0), so no loader worker competes for the CPU that launches the kernels.
SUITES = {"gpu": [
    ("data", ["--arch", "vit_s", "--batch-size", "64", "--synthetic-size", "448", "--num-workers", "8",
              "--steps", "20"]),
    ("vit_s", ["--arch", "vit_s", "--batch-size", "64", "--num-workers", "0"]),
    ("vit_l", ["--arch", "vit_l", "--batch-size", "32", "--num-workers", "0"]),
    ("vit_g_fsdp_ckpt", ["--arch", "vit_g", "--batch-size", "12", "--strategy", "fsdp", "--activation-checkpointing",
                         "--num-workers", "0"]),
    ("vit_s_compile", ["--arch", "vit_s", "--batch-size", "64", "--compile", "--num-workers", "0"]),
    ("vit_l_compile", ["--arch", "vit_l", "--batch-size", "32", "--compile", "--num-workers", "0"]),
]}
QUICK_MODEL = ["--depth", "1", "--global-size", "28", "--local-size", "14", "--n-local", "0", "--batch-size", "4",
               "--n-prototypes", "64", "--ibot-n-prototypes", "64", "--head-hidden-dim", "64",
               "--head-bottleneck-dim", "32", "--ibot-bottleneck-dim", "32", "--drop-path", "0",
               "--synthetic-images", "16", "--synthetic-size", "64"]
QUICK = QUICK_MODEL + ["--steps", "2", "--warmup", "1", "--data-images", "2", "--mask-batches", "2"]
QUICK_SKIPS = {"vit_l_compile": "--quick: the compile path is vit_s_compile's (inductor's CPU compile of another "
                                "model would add ~30 s to CI)"}


@dataclass
class BenchConfig(train.Config):
    mode: str = arg("all", "all (= step, forward, data) | step | forward | data | memory | knn",
                    check=("all", "step", "forward", "data", "memory", "knn"))
    steps: int = arg(10, "timed iterations (--mode data: loader batches)", check=(1, None))
    warmup: int = arg(3, "untimed iterations first (compile, allocator, caches)", check=(0, None))
    forward_batch: int = arg(16, "--mode forward: inference batch (forward + backward: half of it)", check=(1, None))
    forward_size: int = arg(224, "--mode forward: image side", check=(1, None))
    data_images: int = arg(20, "--mode data: images through the multi-crop pipeline", check=(1, None))
    mask_batches: int = arg(200, "--mode data: batches of iBOT masks drawn for their statistics", check=(1, None))
    json: str = arg("", "also write the figures here")
    suite: str = arg("none", "gpu: the fixed GPU suite of the docstring (none: the configuration the flags give)",
                     check=("none", *SUITES))
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
        if self.mode == "knn" and self.what in ("kmeans", "hkmeans", "all") and self.clusters > self.points:
            raise ValueError(f"--clusters must be <= --points ({self.points}), got {self.clusters}")


def timed(fn, n_warmup, n_steps, device):
    """Seconds per call of fn, after n_warmup calls; CUDA's peak memory is reset after the warm-up."""
    synchronize = {"cuda": lambda: torch.cuda.synchronize(device), "mps": torch.mps.synchronize}.get(device.type)
    for _ in range(n_warmup):
        fn()
    if synchronize:
        synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        fn()
    if synchronize:
        synchronize()
    return (time.perf_counter() - t0) / n_steps


def memory(device, reset=False) -> float:
    """Bytes: with reset, in use now, after resetting the peak; without, the peak since the last reset. CUDA: the
    allocator's; elsewhere the resident set, interpreter and libraries included (Linux: 5 written to clear_refs
    resets the peak, VmHWM; nan elsewhere)."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return float((torch.cuda.memory_allocated if reset else torch.cuda.max_memory_allocated)(device))
    if not os.access("/proc/self/clear_refs", os.W_OK):
        return math.nan
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    status = Path("/proc/self/status").read_text()
    return float(re.search(rf"^{'VmRSS' if reset else 'VmHWM'}:\s+(\d+)", status, re.M)[1]) * 1024


def bench_step(cfg, rank, world, device, strategy):
    """train.py's run (models, optimizer, centres, schedules) stepping on one batch of its loader."""
    student_p, student, teacher = train.build_models(cfg, strategy, device)
    run = train.make_run(cfg, rank=rank, world=world, device=device, strategy=strategy, student_p=student_p,
                         student=student, teacher=teacher, ema=teacher)
    loader, _ = train.build_data(cfg, rank, world, 0, device)
    batch = train.to_device(next(iter(loader)), device)
    student_p.train()
    seconds = timed(lambda: train.train_step(run, batch, 0), cfg.warmup, cfg.steps, device)
    flops = plan.flops_per_image(run.student.backbone, cfg) * cfg.batch_size
    peak = plan.peak_flops(device)
    return {"step_s": seconds, "step_images_per_s": cfg.batch_size * world / seconds,
            "step_tflops_per_gpu": flops / seconds / 1e12, "step_mfu": flops / seconds / peak if peak else None,
            "step_peak_mem_gb": memory(device) / GiB, "train_gflops_per_image": flops / cfg.batch_size / 1e9}


def bench_forward(cfg, device, strategy):
    if strategy == "fsdp":
        return {}  # the forward alone is a single-process measurement
    backbone = train.build_ssl_model(cfg, 0.0).backbone.to(device).eval()
    if cfg.compile:
        backbone.compile()
    x = torch.randn(cfg.forward_batch, 3, cfg.forward_size, cfg.forward_size, device=device)
    autocast = train.autocast_for(device, strategy, cfg.dtype)

    with torch.inference_mode(), autocast:
        seconds = timed(lambda: backbone.forward_features(x), cfg.warmup, cfg.steps, device)
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


def bench_data(cfg, device):
    """The very augmentation, images, collate and loader train.build_data makes for these flags: one worker's
    multi-crop rate (decoding excluded: it depends on the file), the masking statistics, the loader's rate."""
    loader, _ = train.build_data(cfg, 0, 1, 0, device)  # builds no worker until iterated
    augment, image = loader.dataset.augment, loader.dataset.images.load(0)[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a data-loader worker runs one thread
    seconds = timed(lambda: augment(image), 1, cfg.data_images, CPU)
    torch.set_num_threads(threads)
    # iBOT masks of --mask-batches global batches, as the collate draws them (released `collate.py`'s statistics)
    per_batch, ratios = [], []
    for step in range(cfg.mask_batches):
        counts = loader.collate_fn.sample_masks(step, 0, cfg.batch_size).sum(1)  # (2B,) masked patches per crop
        per_batch.append(int((counts > 0).sum()))
        ratios += (counts[counts > 0] / loader.collate_fn.mask_generator.num_patches).tolist()
    r = np.array(ratios or [0.0])
    batches = iter(loader)  # the first batch (the workers' start-up) is the warm-up; the workers stop on return
    loader_s = timed(lambda: train.to_device(next(batches), device), 1, cfg.steps, device)
    return {"data_images_per_s_per_worker": 1 / seconds, "data_image": f"{image.width}x{image.height}",
            "masked_crops_per_batch": f"{min(per_batch)}-{max(per_batch)} of {2 * cfg.batch_size}",
            "mask_ratio_mean": float(r.mean()), "mask_ratio_p10_p50_p90": "/".join(
                f"{v:.3f}" for v in np.percentile(r, (10, 50, 90))),
            "loader_images_per_s": cfg.batch_size / loader_s, "loader_workers": loader.num_workers}


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
    distributed.print0(f"threads {torch.get_num_threads()}, world {world}, faiss {'yes' if faiss else 'no'}; "
                       "faiss.Kmeans starts from random points, as kmeans_random_init_s")
    lo, hi = knn.shard_range(cfg.points, rank, world)
    x = clustered_rows(lo, hi, cfg.dim)  # (n / world, D) this rank's rows only
    start = memory(CPU, reset=True)
    runs = {}  # name: a function of the repetition (the k-means seed)
    if cfg.what in ("knn", "all") and world == 1:
        db = F.normalize(clustered_rows(0, cfg.db, cfg.dim, seed=1), dim=1)
        q = F.normalize(clustered_rows(0, cfg.queries, cfg.dim, seed=2), dim=1)
        runs["knn_s"] = lambda rep: knn.knn(q, db, cfg.topk)
        if faiss:
            def faiss_knn(rep):
                index = faiss.IndexFlatIP(cfg.dim)  # exact, as ours
                index.add(db.numpy())
                index.search(q.numpy(), cfg.topk)
            runs["knn_faiss_s"] = faiss_knn
    if cfg.what in ("kmeans", "all"):
        runs["kmeans_random_init_s"] = lambda rep: knn.kmeans(x, cfg.clusters, cfg.iters, init="random", seed=rep)
        runs["kmeans_s"] = lambda rep: knn.kmeans(x, cfg.clusters, cfg.iters, seed=rep)  # k-means++ init
        if faiss and world == 1:  # random init, as ours above
            runs["kmeans_faiss_s"] = lambda rep: faiss.Kmeans(cfg.dim, cfg.clusters, niter=cfg.iters,
                                                              seed=rep).train(x.numpy())
    if cfg.what in ("hkmeans", "all"):
        ks = (cfg.clusters, max(2, round(math.sqrt(cfg.clusters))))
        runs["hkmeans_s"] = lambda rep: knn.hierarchical_kmeans(x, ks, cfg.iters, resample_steps=2)
    best = {name: min(timed(lambda: fn(rep), 0, 1, CPU) for rep in range(cfg.repeats)) for name, fn in runs.items()}
    peak = distributed.all_gather_cat(torch.tensor([[start, memory(CPU)]]) / GiB).tolist()
    return {**best, "rss_per_rank_gb": [[round(v, 2) for v in r] for r in peak],  # [after making the data, peak]
            "rows_per_rank_gb": x.numel() * 4 / GiB}


# ---------------------------------------------------------------------------------------------------------------
# One configuration's figures (main, and each sub-benchmark of the suite); printing and recording them

def measure(cfg):
    """(rank, figures) of cfg.mode for the configuration the flags give. --strategy fsdp in one process makes a
    process group of one: FSDP2 needs one even with nothing to shard (the suite's vit_g on one GPU)."""
    if cfg.mode == "knn":
        rank, world, _ = distributed.init(cfg.device)
        return rank, {"mode": "knn", "world": world, **bench_knn(cfg, rank, world)}
    distributed.init(cfg.device, group=cfg.strategy == "fsdp")
    rank, world, device, strategy, _ = train.setup(cfg)  # the process group made above is kept
    strategy = "fsdp" if cfg.strategy == "fsdp" else strategy
    est = plan.estimate(cfg, plan.count_parameters(train.meta_model(cfg)), world, device.type)
    results = {"arch": cfg.arch, "device": str(device), "device_name": device_name(device), "strategy": strategy,
               "world": world, "batch_size": cfg.batch_size, "dtype": est["dtype"], "compile": cfg.compile,
               "activation_checkpointing": cfg.activation_checkpointing, "params_m": est["params_total"] / 1e6,
               "estimated_peak_gb": est["memory"]["peak"] / GiB}  # allocator-counted (no CUDA context)
    if cfg.mode in ("all", "data") and rank == 0:
        results.update(bench_data(cfg, device))
    if cfg.mode in ("all", "forward"):
        results.update(bench_forward(cfg, device, strategy))
    if cfg.mode in ("all", "step", "memory"):
        start = memory(device, reset=True)
        results.update(bench_step(cfg, rank, world, device, strategy))
    if cfg.mode == "memory":  # CUDA: the allocator-counted estimate; else the total (with plan.RUNTIME_BYTES)
        estimated = est["memory"]["peak" if device.type == "cuda" else "total"]
        results.update(memory_estimated_gb=estimated / GiB, memory_measured_gb=results["step_peak_mem_gb"],
                       memory_measured_over_estimated=results["step_peak_mem_gb"] * GiB / estimated,
                       memory_at_start_gb=start / GiB)
    return rank, results


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def record(figures, path, everything):
    """Print figures, one per line, and rewrite the JSON of everything (a killed suite keeps what it measured)."""
    width = max(map(len, figures))
    for k, v in figures.items():
        if k != "traceback":
            print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}", flush=True)
    if path:
        atomic_write_text(path, json.dumps(everything, indent=1))


def run_suite(cfg):
    """Every sub-benchmark of SUITES[cfg.suite], each guarded; the JSON is rewritten after each one."""
    device = torch.device(plan.resolve_device_type(cfg))
    results = {"suite": cfg.suite, "quick": cfg.quick, "device": str(device), "torch": torch.__version__,
               "device_name": device_name(device), "peak_bf16_tflops": (plan.peak_flops(device) or 0) / 1e12 or None,
               "benchmarks": {}}
    start = time.perf_counter()
    for name, flags in SUITES[cfg.suite]:
        entry = results["benchmarks"][name] = {"flags": " ".join(flags)}
        t0 = time.perf_counter()
        over = t0 - start > cfg.budget_s
        skip = f"the suite's {cfg.budget_s:.0f} s budget was spent" if over else cfg.quick and QUICK_SKIPS.get(name)
        try:
            if skip:
                entry["skipped"] = skip
                continue  # the finally clause still records it
            argv = flags + (QUICK + (["--num-workers", "1"] if name == "data" else []) if cfg.quick else [])
            argv += ["--device", device.type, "--mode", "data" if name == "data" else "step"]
            try:  # a bad flag is a usage error (SystemExit) in the parser: recorded here like any failure
                sub = train.parse_config(BenchConfig, train.PRESETS, argv=argv)
            except SystemExit:
                raise ValueError(f"invalid flags for this benchmark: {' '.join(argv)}") from None
            entry.update(measure(sub)[1])
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
            print(f"--- {name}")
            record(entry, cfg.json, results)
    return results


def main(cfg):
    if cfg.suite != "none":
        return run_suite(cfg)
    rank, results = measure(cfg)
    if rank == 0:
        record(results, cfg.json, results)
        if "data_images_per_s_per_worker" in results and "step_images_per_s" in results:
            workers = results["step_images_per_s"] / results["world"] / results["data_images_per_s_per_worker"]
            print(f"data workers needed per rank to keep up: {workers:.1f}")
    distributed.close()
    return results


if __name__ == "__main__":
    cli.run(lambda: main(train.parse_config(BenchConfig, train.PRESETS, description=__doc__)))
