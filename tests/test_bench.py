"""bench.py: a tiny run of every mode, and the GPU suite at --quick sizes, complete and report finite figures (no
timing asserts: timings are noise)."""
import json
import math

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


def test_gpu_suite_quick_runs_every_sub_benchmark(tmp_path):
    # the command a GPU session runs, at toy sizes on the CPU: every sub-benchmark completes and lands in one JSON
    out = tmp_path / "suite.json"
    bench.main(train.parse_config(bench.BenchConfig, train.PRESETS,
                                  argv=["--suite", "gpu", "--quick", "--json", str(out)]))
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
