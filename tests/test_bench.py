"""bench.py: a tiny run of every mode completes and reports finite figures (no timing asserts: timings are noise)."""
import math

import bench
import train


def test_tiny_bench_reports_finite_figures():
    argv = ["--patch-size", "14", "--global-size", "28", "--local-size", "14", "--n-local", "2", "--batch-size", "2",
            "--n-prototypes", "32", "--ibot-n-prototypes", "32", "--head-hidden-dim", "32",
            "--head-bottleneck-dim", "16", "--ibot-bottleneck-dim", "16", "--synthetic-images", "8",
            "--synthetic-size", "32", "--num-workers", "0",
            "--steps", "2", "--warmup", "1", "--forward-batch", "2", "--forward-size", "28", "--data-images", "2",
            "--mask-probability", "0"]
    results = bench.main(train.parse_config(bench.BenchConfig, train.PRESETS, argv=argv))
    for key in ("step_s", "step_images_per_s", "step_tflops_per_gpu", "step_peak_mem_gb", "train_gflops_per_image",
                "forward_images_per_s", "forward_backward_images_per_s", "data_images_per_s_per_worker"):
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0, key
    assert results["step_mfu"] is None  # no peak-FLOPS figure for a CPU
