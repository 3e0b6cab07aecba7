"""
bench.py: how fast is a DINOv2 training step here, how much memory does it take, and what bounds it?

Times, after warm-up and with the device synchronised around the timed region:
    step      train.py's own train_step: teacher forward, student forward + backward over every crop, the four
              loss terms, per-part clipping, AdamW, EMA (one batch, reused, so the data loader is not timed)
    forward   the backbone alone at --forward-size: inference (batch --forward-batch), and forward + backward (half
              that batch)
    data      the multi-crop pipeline (2 global + n_local crops) on a 500x375 image, images/s for one worker
and prints images/s, step time, peak memory and MFU against a peak-FLOPS table (train.PEAK_BF16_TFLOPS); FLOPs come
from the model's own formula (vit.VisionTransformer.flops_per_image). If data images/s x workers is below step
images/s, the data bounds the run; otherwise the compute does.

Every flag of train.py works here (--arch, --batch-size, --global-size, --compile, --strategy, ...).

    python bench.py                                    # vit_tiny at the laptop preset
    python bench.py --arch vit_s --batch-size 8 --mode forward
    python bench.py --arch vit_l --batch-size 32 --compile
    torchrun --nproc_per_node=1 bench.py --arch vit_g --strategy fsdp --activation-checkpointing --batch-size 12
"""
import json
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

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
    flops = train.flops_per_image(student.backbone, cfg) * cfg.batch_size
    peak = train.peak_flops(device)
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
    autocast = train.autocast_for(device, strategy)

    def forward():
        with torch.inference_mode(), autocast:
            backbone.forward_features(x)
    seconds = timed(forward, cfg.warmup, cfg.steps, device)
    flops = backbone.flops_per_image(cfg.forward_size, cfg.forward_size) * cfg.forward_batch
    peak = train.peak_flops(device)
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


def main(cfg):
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
    if train.is_dist():
        torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    main(train.parse_config(BenchConfig, train.PRESETS, description=__doc__))
