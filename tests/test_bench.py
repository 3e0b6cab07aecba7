"""bench.py: a tiny run of every mode, and the GPU suite at --quick sizes, complete and report finite figures (no
timing asserts: timings are noise)."""
import json
import math
import warnings

import pytest
import torch

import bench
import train
from conftest import TINY_MODEL


def test_tiny_bench_reports_finite_figures():
    argv = TINY_MODEL + ["--global-size", "28", "--local-size", "14", "--batch-size", "2", "--synthetic-images", "8",
                         "--steps", "2", "--warmup", "1", "--forward-batch", "2", "--forward-size", "28",
                         "--data-images", "2", "--mask-probability", "0"]
    results = bench.main(train.parse_config(bench.BenchConfig, train.PRESETS, argv=argv))
    for key in ("step_s", "step_images_per_s", "step_tflops_per_gpu", "step_peak_mem_gb", "train_gflops_per_image",
                "forward_images_per_s", "forward_backward_images_per_s", "data_images_per_s_per_worker"):
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0, key
    assert results["step_mfu"] is None  # no peak-FLOPS figure for a CPU
    assert results["data_image"] == "64x64"  # the first image of the synthetic set the run trains on


def test_data_mode_times_the_augmentation_train_builds_and_counts_the_masks(monkeypatch):
    built = []
    build_data = train.build_data
    monkeypatch.setattr(train, "build_data", lambda *a: built.append(build_data(*a)[0]) or (built[-1], 0))
    argv = TINY_MODEL + ["--data-images", "2", "--mask-batches", "20", "--mode", "data", "--p-grayscale", "0.7",
                         "--hue-jitter", "0.3"]
    results = bench.main(train.parse_config(bench.BenchConfig, train.PRESETS, argv=argv))
    augment = built[0].dataset.augment  # what was timed: the preset's colour settings, as train.build_data sets them
    assert (augment.hue, augment.p_grayscale) == (0.3, 0.7)
    # 4 images, 8 global crops: int(8 x 0.5) = 4 get a mask target (a target of 1-2 of the 16 patches may place no
    # block: min_num_patches 4), ratios in the preset's (0.1, 0.5)
    assert results["masked_crops_per_batch"].endswith("-4 of 8")
    assert 0.1 <= results["mask_ratio_mean"] <= 0.5


def test_memory_mode_reports_estimate_and_measured_peak():
    argv = TINY_MODEL + ["--global-size", "28", "--local-size", "14", "--batch-size", "2", "--mode", "memory"]
    results = bench.main(train.parse_config(bench.BenchConfig, train.PRESETS, argv=argv))
    for key in ("memory_estimated_gb", "memory_measured_gb", "memory_measured_over_estimated"):
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0, key


def test_knn_mode_times_every_part():
    argv = ["--mode", "knn", "--points", "600", "--dim", "8", "--clusters", "9", "--iters", "2", "--db", "300",
            "--queries", "20", "--topk", "3", "--repeats", "2", "--json", ""]
    results = bench.main(train.parse_config(bench.BenchConfig, train.PRESETS, argv=argv))
    for key in ("knn_s", "kmeans_random_init_s", "kmeans_s", "hkmeans_s"):
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0, key
    assert len(results["rss_per_rank_gb"]) == 1


@pytest.mark.parametrize("argv", [["--suite", "cpu"], ["--mode", "knn", "--points", "5", "--clusters", "6"],
                                  ["--mode", "speed"]])
def test_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_config(bench.BenchConfig, train.PRESETS, argv=argv)
    assert exit_.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_gpu_suite_quick_runs_every_sub_benchmark(tmp_path):
    # the command a GPU session runs, at toy sizes on the CPU: every sub-benchmark completes and lands in one JSON
    out = tmp_path / "suite.json"
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        bench.main(train.parse_config(bench.BenchConfig, train.PRESETS,
                                      argv=["--suite", "gpu", "--quick", "--json", str(out)]))
    assert not [str(w.message) for w in said if "view tensor" in str(w.message)]  # FSDP2: the model's outputs
    got = json.loads(out.read_text())
    assert list(got["benchmarks"]) == [name for name, _ in bench.SUITES["gpu"]]
    assert got["benchmarks"]["vit_l_compile"]["skipped"].startswith("--quick")  # the one skip --quick makes
    ran = {k: v for k, v in got["benchmarks"].items() if "skipped" not in v}
    assert not [v["traceback"] for v in ran.values() if "error" in v]
    for name, entry in ran.items():
        keys = ("data_images_per_s_per_worker", "loader_images_per_s") if name == "data" else (
            "step_images_per_s", "step_peak_mem_gb", "estimated_peak_gb", "train_gflops_per_image")
        for key in keys:
            assert isinstance(entry[key], float) and math.isfinite(entry[key]) and entry[key] > 0, (name, key)
    g = ran["vit_g_fsdp_ckpt"]
    assert g["arch"] == "vit_giant2" and g["strategy"] == "fsdp" and g["activation_checkpointing"]
    assert ran["vit_s_compile"]["compile"] and not ran["vit_s"]["compile"]
    assert ran["vit_s"]["step_mfu"] is None and got["peak_bf16_tflops"] is None  # no peak-FLOPS figure for a CPU
    assert not torch.distributed.is_initialized()  # the one-process FSDP group was torn down


def test_gpu_suite_records_a_failure_and_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.SUITES, "gpu", [("broken", ["--arch", "vit_huge"]), ("data", ["--arch", "vit_s"])])
    out = tmp_path / "suite.json"
    bench.main(train.parse_config(bench.BenchConfig, train.PRESETS,
                                  argv=["--suite", "gpu", "--quick", "--json", str(out)]))
    got = json.loads(out.read_text())["benchmarks"]
    assert "vit_huge" in got["broken"]["error"] and got["data"]["loader_images_per_s"] > 0
