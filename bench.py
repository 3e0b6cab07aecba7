"""
bench.py: how fast is a DINOv2 training step here, how much memory does it take, and what bounds it?

Times, after warm-up and with the device synchronised around the timed region:
    step      train.py's own train_step: teacher forward, student forward + backward over every crop, the four
              loss terms, per-part clipping, AdamW, EMA (one batch, reused, so the data loader is not timed)
    forward   the backbone alone at --forward-size: inference (batch --forward-batch), and forward + backward (half
              that batch)
    data      the multi-crop pipeline (2 global + n_local crops) on a 500x375 image, images/s for one worker
and prints images/s, step time, peak memory and MFU against a peak-FLOPS table (plan.PEAK_BF16_TFLOPS); FLOPs come
from the model's own formula (vit.VisionTransformer.flops_per_image). If data images/s x workers is below step
images/s, the data bounds the run; otherwise the compute does.

Every flag of train.py works here (--arch, --batch-size, --global-size, --compile, --strategy, ...).

    python bench.py                                    # vit_tiny at the laptop preset
    python bench.py --arch vit_s --batch-size 8 --mode forward
    python bench.py --arch vit_l --batch-size 32 --compile
    torchrun --nproc_per_node=1 bench.py --arch vit_g --strategy fsdp --activation-checkpointing --batch-size 12

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
import os
import resource
import tempfile
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from util import distributed
from util import plan
import train
from data import MultiCropAugmentation


@dataclass
class BenchConfig(train.Config):
    mode: str = "all"  # all | step | forward | data
    steps: int = 10  # timed iterations
    warmup: int = 3  # untimed iterations first (compile, allocator, caches)
    forward_batch: int = 16
    forward_size: int = 224
    data_images: int = 20  # images through the multi-crop pipeline
    json: str = ""  # also write the figures here
    suite: str = ""  # "" = the one configuration the flags give | gpu = the fixed GPU suite of the docstring
    quick: bool = False  # --suite at toy sizes (one block, 28-px crops): the same code paths on a CPU, for CI
    budget_s: float = 330  # --suite: no sub-benchmark starts after this many seconds (the suite's target: 6 min)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: the process's peak RSS (Linux: KiB)


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


def bench_step(cfg, rank, world, device, strategy):
    student_p, student, teacher = train.build_models(cfg, strategy, device)
    run = train.make_run(cfg, rank, world, device, strategy, student_p, student, teacher=teacher, ema=teacher)
    loader, _ = train.build_data(cfg, rank, world, 0, device)
    batch = train.to_device(next(iter(loader)), device)
    student_p.train()
    step = lambda: train.train_step(run, batch, 0)
    seconds = timed(step, cfg.warmup, cfg.steps, device)
    flops = plan.flops_per_image(student.backbone, cfg) * cfg.batch_size
    peak = plan.peak_flops(device)
    return {"step_s": seconds, "step_images_per_s": cfg.batch_size * world / seconds,
            "step_tflops_per_gpu": flops / seconds / 1e12, "step_mfu": flops / seconds / peak if peak else None,
            "step_peak_mem_gb": peak_memory_gb(device), "train_gflops_per_image": flops / cfg.batch_size / 1e9}


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
    """One worker's multi-crop throughput on a photo-sized image (decoding excluded: it depends on the file)."""
    augment = MultiCropAugmentation(global_size=cfg.global_size, local_size=cfg.local_size, n_local=cfg.n_local,
                                    global_scale=tuple(cfg.global_scale), local_scale=tuple(cfg.local_scale),
                                    blur=cfg.blur)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a data-loader worker runs one thread
    augment(image)
    t0 = time.perf_counter()
    for _ in range(cfg.data_images):
        augment(image)
    seconds = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return {"data_images_per_s_per_worker": cfg.data_images / seconds}


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
# --quick: the same code paths at toy sizes (one block, 28-px crops, no local crops: one inductor compile per
# model and mode), fp32 on a CPU. tests/test_gpu_paths.py compiles this very vit_s, so the two share inductor's cache.
QUICK_MODEL = ["--depth", "1", "--global-size", "28", "--local-size", "14", "--n-local", "0", "--batch-size", "4",
               "--n-prototypes", "64", "--ibot-n-prototypes", "64", "--head-hidden-dim", "64",
               "--head-bottleneck-dim", "32", "--ibot-bottleneck-dim", "32", "--drop-path", "0",
               "--synthetic-images", "16", "--synthetic-size", "64"]
QUICK = QUICK_MODEL + ["--steps", "2", "--warmup", "1", "--data-images", "2"]
QUICK_SKIPS = {"vit_l_compile": "--quick: the compile path is vit_s_compile's (inductor's CPU compile of another "
                                "model would add ~30 s to CI)"}


def single_process_group(device):
    """FSDP2 needs a process group; one process gets a group of one (what torchrun --nproc_per_node=1 would make)."""
    if not distributed.is_dist():
        store = tempfile.NamedTemporaryFile(prefix="bench_pg_", delete=False).name
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             init_method=f"file://{store}", rank=0, world_size=1)


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
                if strategy == "fsdp":
                    single_process_group(device)
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
            if distributed.is_dist():
                torch.distributed.destroy_process_group()
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
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)


def main(cfg):
    if cfg.suite:
        if cfg.suite not in SUITES:
            raise SystemExit(f"error: unknown --suite {cfg.suite!r}; known: {', '.join(SUITES)}")
        return run_suite(cfg)
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
    if rank == 0:
        width = max(map(len, results))
        for k, v in results.items():
            print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
        if "data_images_per_s_per_worker" in results and "step_images_per_s" in results:
            workers = results["step_images_per_s"] / world / results["data_images_per_s_per_worker"]
            print(f"data workers needed per rank to keep up: {workers:.1f}")
        if cfg.json:
            with open(cfg.json, "w") as f:
                json.dump(results, f, indent=1)
    if distributed.is_dist():
        torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    main(train.parse_config(BenchConfig, train.PRESETS, description=__doc__))
