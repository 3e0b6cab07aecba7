"""Every code path a GPU run takes, executed on the CPU: bf16 autocast (with the losses in fp32), FSDP2's bf16
MixedPrecisionPolicy on 2 gloo processes, torch.compile (inductor's CPU backend) with and without activation
checkpointing, the fused AdamW, the meta-device build of the big models, the MFU lookup; and plan.py's estimate
against autograd's saved tensors, a measured peak RSS and the official parameter counts.

What cannot run on a CPU:
- nccl (the CUDA collectives): gloo runs the same FSDP2 / DDP code here; only the transport differs.
- pin_memory=True (train.build_data on CUDA): it needs an accelerator ("Cannot access accelerator device").
- torch.cuda.max_memory_allocated and the CUDA graphs / Triton kernels inductor emits on a GPU (on CPU it emits C++).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import bench
import losses
from conftest import ROOT, TINY_MODEL
from util import plan
import train
import vit

CPU = torch.device("cpu")


def tiny_setup(argv):
    """The run (models, centres, optimizer, schedules) and one batch of a tiny Config, as train.train builds them."""
    cfg = train.parse_config(argv=argv)
    student_p, student, teacher = train.build_models(cfg, "none", CPU)
    run = train.make_run(cfg, rank=0, world=1, device=CPU, strategy="none",
                         student_p=student_p, student=student, teacher=teacher, ema=teacher)
    batch = next(iter(train.build_data(cfg, 0, 1, 0, CPU)[0]))
    student_p.train()
    return cfg, run, batch


def run_steps(argv, n=2):
    cfg, run, batch = tiny_setup(argv)
    out = []
    for step in range(n):
        terms, _, _ = train.train_step(run, batch, step)
        out.append(torch.stack([v.detach() for v in terms.values()]))
    return torch.stack(out)  # (steps, terms)


class DtypeLog(TorchFunctionMode):
    """Records (function name, output dtype) of every torch call that returns a floating tensor, after autocast."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else [result]:
            if torch.is_tensor(t) and t.is_floating_point():
                self.calls.append((getattr(func, "__name__", str(func)), t.dtype))
        return result


def saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while fn() runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------------------------
# bf16: autocast on a CPU is the same switch as on CUDA (--dtype bf16); the losses stay fp32 inside

def test_loss_functions_compute_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    K, B = 32, 6
    logits = (4 * torch.randn(2 * B, K)).bfloat16()  # (2B, K) bf16, as a bf16 head gives them
    local = torch.randn(2 * B, K).bfloat16()  # (L*B, K), L = 2
    patches = torch.randn(10, K).bfloat16()  # (M, K)
    features = torch.randn(B, 16).bfloat16()  # (B, D)
    targets, patch_targets = torch.rand(2 * B, K).bfloat16(), torch.rand(10, K).bfloat16()
    weights = torch.ones(10).bfloat16()  # (M,)
    centering = losses.SoftmaxCentering(K)
    calls = {  # every input in bf16: an op that does not upcast first shows up as a bf16 result
        "sinkhorn_knopp": lambda: losses.sinkhorn_knopp(logits, 0.07),
        "softmax centering": lambda: centering(logits, 0.07),
        "dino_loss": lambda: losses.dino_loss(logits, local, targets),
        "ibot_loss": lambda: losses.ibot_loss(patches, patch_targets, weights, 2 * B),
        "koleo_loss": lambda: losses.koleo_loss(features),
    }
    for name, call in calls.items():
        with torch.autocast("cpu", dtype=torch.bfloat16), DtypeLog() as log:
            call()
        low = [c for c in log.calls if c[1] != torch.float32]
        assert log.calls and not low, f"{name} computed in {low}"


def test_bf16_step_keeps_losses_fp32_and_matches_fp32():
    # TINY_MODEL has 2 blocks: bf16 matmuls are slow on a CPU without AMX
    cfg, run, batch = tiny_setup(TINY_MODEL + ["--dtype", "bf16"])
    with DtypeLog() as log:  # the whole step: bf16 autocast is the run's (train.autocast_for)
        terms, t_cls, _ = train.train_step(run, batch, 0)
    assert {c[1] for c in log.calls if c[0] == "linear"} == {torch.bfloat16}  # the matmuls did run in bf16
    softmaxes = [c for c in log.calls if c[0] in ("log_softmax", "softmax", "logsumexp", "exp")]
    assert softmaxes and {c[1] for c in softmaxes} == {torch.float32}
    assert t_cls.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values())
    # a few full steps (backward, clipping, AdamW, EMA): the same losses as fp32 within bf16 rounding
    bf16, fp32 = run_steps(TINY_MODEL + ["--dtype", "bf16"]), run_steps(TINY_MODEL + ["--dtype", "fp32"])
    assert torch.isfinite(bf16).all()
    torch.testing.assert_close(bf16, fp32, rtol=3e-2, atol=3e-2)


def test_fused_adamw_matches_foreach():
    # fit() uses fused=True on CUDA; PyTorch's CPU build has the fused kernel as well
    torch.manual_seed(0)
    model = vit.vit_tiny(img_size=28, patch_size=14, depth=2)
    copies = [[p.detach().clone().requires_grad_() for p in model.parameters()] for _ in range(2)]
    opts = [torch.optim.AdamW(copies[0], lr=1e-2, weight_decay=0.04, fused=True),
            torch.optim.AdamW(copies[1], lr=1e-2, weight_decay=0.04, foreach=True)]
    for step in range(3):
        grads = [torch.randn_like(p) for p in copies[0]]
        for params, opt in zip(copies, opts):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(*copies):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_peak_flops_lookup_for_cuda_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert plan.peak_flops(torch.device("cuda", 0)) == 989e12  # the H100 SXM dense bf16 peak of its data sheet
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert plan.peak_flops(torch.device("cuda", 0)) is None  # unknown: no MFU rather than a wrong one
    assert plan.peak_flops(CPU) is None


# ----------------------------------------------------------------------------------------------------------------
# torch.compile per block (inductor's CPU backend), with and without activation checkpointing

def test_compile_and_checkpointing_match_eager():
    # bench.py --suite gpu --quick's vit_s (one block, no local crops, so one inductor compile for the student and
    # one for the teacher, ~20 s each on 2 cores): whichever of the two tests runs second finds inductor's cache warm
    argv = ["--arch", "vit_s", "--num-workers", "0"] + bench.QUICK_MODEL
    eager = run_steps(argv)
    compiled = run_steps(argv + ["--compile"])
    compiled_ckpt = run_steps(argv + ["--compile", "--activation-checkpointing"])
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_ckpt, eager, rtol=1e-4, atol=1e-5)
    # checkpointing really is on around the compiled block: the student keeps far less for backward
    kept = {}
    for name, extra in (("compiled", ["--compile"]), ("checkpointed", ["--compile", "--activation-checkpointing"])):
        cfg, run, batch = tiny_setup(argv + extra)
        student = run.student
        assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None
                   for b in student.backbone.blocks)
        kept[name] = saved_bytes(lambda: student.backbone.forward_features(batch["global_crops"]))
    assert kept["checkpointed"] < 0.5 * kept["compiled"], kept


# ----------------------------------------------------------------------------------------------------------------
# FSDP2 with MixedPrecisionPolicy(bf16, fp32) on 2 gloo processes (gloo does all-gather bf16 tensors)

FSDP_WORKER = '''
import json, sys
import torch
import torch.distributed as dist
from util import distributed
import train

seen = []  # (collective, dtype) of every FSDP2 all-gather and reduce-scatter


def spy(name):
    original = getattr(dist, name)

    def call(*args, **kwargs):
        t = kwargs["input"] if "input" in kwargs else args[1]
        seen.append([name, str(t.dtype)])
        return original(*args, **kwargs)
    setattr(dist, name, call)


spy("all_gather_single")
spy("reduce_scatter_single")
cfg = train.parse_config(argv=json.loads(sys.argv[1]))
rank, world, device = distributed.init(cfg.device)
student_p, student, teacher = train.build_models(cfg, "fsdp", device)
run = train.make_run(cfg, rank=rank, world=world, device=device, strategy="fsdp",
                     student_p=student_p, student=student, teacher=teacher, ema=teacher)
batch = train.to_device(next(iter(train.build_data(cfg, rank, world, 0, device)[0])), device)
student_p.train()
terms, _, _ = train.train_step(run, batch, 0)  # lr 0 at step 0: the gradients stay, the weights do not move
values = torch.stack([v.detach().float() for v in terms.values()])
dist.all_reduce(values)
grads = {n: p.grad.full_tensor() for n, p in student.named_parameters() if p.grad is not None}
shard_dtypes = sorted({str(p.grad.to_local().dtype) for p in student.parameters() if p.grad is not None})
if rank == 0:
    torch.save({"terms": (values / world).tolist(), "grads": grads, "collectives": seen,
                "shard_grad_dtypes": shard_dtypes, "term_dtypes": sorted({str(v.dtype) for v in terms.values()})},
               sys.argv[2])
dist.destroy_process_group()
'''


def test_fsdp_bf16_policy_matches_fp32_with_fp32_reduction(tmp_path):
    dist_flags = TINY_MODEL + ["--koleo-weight", "0", "--drop-path", "0"]  # KoLeo is per rank; drop path draws per rank
    per_rank = dist_flags.copy()
    per_rank[per_rank.index("--batch-size") + 1] = "2"  # 2 ranks x 2 = the global batch of 4 below
    script = tmp_path / "fsdp_bf16.py"
    script.write_text(FSDP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), json.dumps(per_rank + ["--dtype", "bf16"]), str(tmp_path / "out.pt")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert (tmp_path / "out.pt").exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    gathers = {d for c, d in got["collectives"] if c == "all_gather_single"}
    reduces = {d for c, d in got["collectives"] if c == "reduce_scatter_single"}
    assert gathers == {"torch.bfloat16"} and reduces == {"torch.float32"}, got["collectives"]
    assert got["shard_grad_dtypes"] == ["torch.float32"] and got["term_dtypes"] == ["torch.float32"]

    # the fp32 reference: one process, the same global batch
    cfg, run, batch = tiny_setup(dist_flags + ["--dtype", "fp32"])
    terms, _, _ = train.train_step(run, batch, 0)
    student = run.student
    ref_terms = torch.stack([v.detach() for v in terms.values()])
    torch.testing.assert_close(torch.tensor(got["terms"]), ref_terms, rtol=2e-2, atol=2e-2)
    ref = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert ref.keys() == got["grads"].keys()
    a = torch.cat([got["grads"][n].flatten() for n in ref])
    b = torch.cat([ref[n].flatten() for n in ref])
    # bf16 forward and backward, fp32 reduction: a few % of the gradient; an fp32-vs-mean mix-up would be 100%
    assert (a - b).norm() < 0.05 * b.norm(), ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------------------------
# The meta device and plan.py

OFFICIAL = {"vit_large": 304_368_640, "vit_giant2": 1_136_480_768}  # released hub models (518 px pos-embed)


def rss_bytes():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("arch", ["vit_large", "vit_giant2"])
def test_meta_build_of_big_models_allocates_nothing(arch):
    before = rss_bytes()
    with torch.device("meta"):
        model = vit.build_model(arch, img_size=518, patch_size=14)
    grown = rss_bytes() - before
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL[arch]
    assert grown < 100 * 2**20, grown  # fp32 weights would be 1.2 GB (vit_l) and 4.5 GB (vit_g)


def test_estimate_counts_and_sharding():
    cfg = train.parse_config(argv=["--arch", "vit_g", "--device", "cuda"])  # the paper's vit_g recipe
    D, h, K, bn, bn_ibot = 1536, 2048, 131072, 384, 256
    # the released count minus the pos-embed positions a 224-px grid does not have (1 + 37^2 vs 1 + 16^2)
    counts = plan.count_parameters(train.meta_model(cfg))
    assert counts["parts"]["backbone"] == OFFICIAL["vit_giant2"] - (1370 - 257) * D
    head = lambda bn: D * h + h + h * h + h + h * bn + bn + K * bn + K  # 3 Linears, then v (K, bn) and g (K, 1)
    assert counts["parts"]["dino_head"] == head(bn) and counts["parts"]["ibot_head"] == head(bn_ibot)
    one, fsdp = plan.estimate(cfg, counts, 1), plan.estimate(cfg, counts, 32)
    P = one["params_total"]
    assert one["strategy"] == "none" and fsdp["strategy"] == "fsdp" and one["dtype"] == "bf16"
    for key, bytes_per_param in (("weights", 4), ("gradients", 4), ("adamw", 8), ("teacher", 4)):
        assert one["memory"][key] == bytes_per_param * P and fsdp["memory"][key] == bytes_per_param * P / 32
    assert one["memory"]["extra"] == 2 * P  # the bf16 weight copies autocast keeps for backward
    # FSDP's bf16 parameters make the residual stream bf16 too (autocast keeps it fp32): 2 bytes less per token x D
    assert fsdp["memory"]["activations"] < one["memory"]["activations"]
    # per image: 3 x (2 global + 8 local crops) student passes + 2 teacher passes through the backbone
    backbone = plan.count_parameters(train.meta_model(cfg))["model"].backbone
    fwd = lambda size: backbone.flops_per_image(size, size)
    assert one["flops"]["backbone_per_image"] == 3 * (2 * fwd(224) + 8 * fwd(98)) + 2 * fwd(224)
    assert one["flops"]["per_device_step"] == one["flops"]["per_image"] * 12


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("drop_path", [0.0, 0.4])
def test_block_activation_formula_matches_autograd(ffn, bf16, drop_path):
    # the slope of autograd's saved bytes over the batch (weights and their bf16 copies cancel in the difference)
    torch.manual_seed(0)
    D, H, N = 192, 3, 65
    block = vit.Block(D, H, ffn_layer=ffn, drop_path_rate=drop_path).train()

    def saved(batch):
        x = torch.randn(batch, N, D, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return saved_bytes(lambda: block(x))
    measured = (saved(80) - saved(40)) / (40 * N)  # bytes per token (subsets of 24 and 48 at p = 0.4: exact)
    F = block.mlp.fc1.out_features if ffn == "mlp" else block.mlp.w3.in_features
    expected = plan.block_activation_bytes(D, F, H, 2 if bf16 else 4, 4, ffn, drop_path)
    assert measured == pytest.approx(expected, rel=0.02)


RSS_PROBE = '''
import json, sys
import torch
import train
from util import plan
cfg = train.parse_config(argv=json.loads(sys.argv[1]))
cpu = torch.device("cpu")
student_p, student, teacher = train.build_models(cfg, "none", cpu)
run = train.make_run(cfg, rank=0, world=1, device=cpu, strategy="none",
                     student_p=student_p, student=student, teacher=teacher, ema=teacher)
data = iter(train.build_data(cfg, 0, 1, 0, cpu)[0])
student_p.train()
for step in range(2):  # from step 2 on the AdamW moments exist during forward and backward
    train.train_step(run, next(data), step)
# VmHWM, this process's own peak (ru_maxrss would count the pytest process it was forked from)
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss": hwm,
                  "estimate": plan.estimate(cfg, plan.count_parameters(train.meta_model(cfg)), 1,
                                            "cpu")["memory"]["peak"]}))
'''


def test_estimate_against_measured_peak_rss():
    # A vit_small whose state, activations and prototype logits (65536 of them) are each a third of the total at
    # batch 4. glibc keeps freed heap memory in the process (the RSS then runs ~15-20% over the live tensors); a fixed
    # mmap threshold returns every large block at free, so the peak RSS follows the live tensors, as a CUDA caching
    # allocator's max_memory_allocated does. What the RSS holds besides them (the interpreter, torch's libraries:
    # ~0.5 GB more on the CUDA build than on the CPU build) depends on the machine, so the test compares the growth
    # of the peak from batch 2 to batch 6 (activations and logits) with the estimate's; the absolute figure (estimate
    # within ~15% of the peak RSS on the CPU build) is `python bench.py --mode memory`'s (see its docstring).
    argv = ["--arch", "vit_small", "--depth", "3", "--global-size", "224", "--local-size", "98",
            "--n-local", "2", "--n-prototypes", "65536", "--ibot-n-prototypes", "65536", "--num-workers", "0",
            "--synthetic-images", "16", "--synthetic-size", "224"]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="65536")
    got = []
    for batch in (2, 6):
        proc = subprocess.run([sys.executable, "-c", RSS_PROBE, json.dumps(argv + ["--batch-size", str(batch)])],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    measured, estimated = (got[1][key] - got[0][key] for key in ("peak_rss", "estimate"))
    assert estimated > 0.5e9  # the batch dominates the difference: the check has something to measure
    assert measured == pytest.approx(estimated, rel=0.15), got


def test_dry_run_builds_nothing_and_a_run_that_cannot_fit_stops(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # train.py run as a script, its own peak RSS printed at exit
    probe = ("import atexit, runpy, sys; sys.argv[0] = 'train.py'; atexit.register(lambda: print('peak_rss', next("
             "int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmHWM:')))); "
             "runpy.run_path('train.py', run_name='__main__')")
    # The three processes below spend their time importing torch (one core each): started together, waited on after.
    dry = {arch: subprocess.Popen([sys.executable, "-c", probe, "--arch", arch, "--dry-run", "--nproc", "32",
                                   "--strategy", "fsdp", "--device", "cuda", "--epochs", "2", "--epoch-length", "1250",
                                   "--out", str(tmp_path / arch)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for arch in ("vit_g", "vit_tiny")}  # the same schedules (2,500 steps), only the model differs
    # a vit_g on one CPU at batch 512 needs ~1.6 TB: one error line with the advice, before anything is allocated
    too_big = subprocess.Popen([sys.executable, "train.py", "--arch", "vit_g", "--batch-size", "512", "--device", "cpu",
                                "--out", "/nonexistent/never-written"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    peak, stdout = {}, {}
    try:
        for arch, proc in dry.items():
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
            stdout[arch], peak[arch] = out, int(out.split("peak_rss")[-1])
        _, too_big_err = too_big.communicate(timeout=120)
    finally:
        for proc in (*dry.values(), too_big):
            proc.kill()
    # a dry run of vit_g takes what one of vit_tiny takes (the RSS of the interpreter and torch's libraries alone
    # depends on the build of torch): the fp32 weights of vit_g alone would be 4.6 GiB
    assert abs(peak["vit_g"] - peak["vit_tiny"]) < 100 * 2**20, peak
    g = stdout["vit_g"]
    assert "vit_giant2, 32 x cuda (fsdp, bf16)" in g and "peak total" in g and "1,234.9M" in g
    assert too_big.returncode == 1 and "Traceback" not in too_big_err
    assert too_big_err.strip().splitlines()[-1].startswith("error: the run needs")
    assert "--activation-checkpointing" in too_big_err
