"""train.py: schedules and parameter groups against the released config's numbers, the EMA, a real run (finite
terms, teacher untouched by the optimizer), exact resume, DDP and FSDP2 under torchrun (gloo) against one process,
fault handling, the k-NN monitor and the collapse alarm."""
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from conftest import ROOT, TINY, load_checkpoint, run_script
from train import Config, make_schedules, param_groups

# ------------------------------------------------------------------------------------------------------------------
# Schedules and parameter groups: the numbers of the released ssl_default_config (global batch 1024 -> peak lr 0.004)

def test_schedules_match_released_values():
    cfg = Config(arch="vit_small", batch_size=64)
    s = make_schedules(cfg, world_size=16)
    assert len(s["lr"]) == 125_000
    assert s["lr"][0] == 0
    assert s["lr"][1249] == pytest.approx(3.997e-4, rel=1e-3)
    assert s["lr"][12499] == pytest.approx(0.004, rel=1e-9)  # the warm-up includes the peak
    assert s["lr"][37500] == pytest.approx(3.532e-3, rel=1e-3)
    assert s["lr"][-1] == pytest.approx(1e-6, rel=1e-3)
    assert np.all(s["last_layer_lr"][:1250] == 0) and s["last_layer_lr"][1250] == s["lr"][1250]
    assert s["wd"][12500] == pytest.approx(0.04881, rel=1e-3)
    assert s["wd"][-1] == pytest.approx(0.4, rel=1e-6)
    assert s["momentum"][37500] == pytest.approx(0.99365, rel=1e-5)
    assert s["teacher_temp"][12500] == pytest.approx(0.0500003, rel=1e-6)
    assert s["teacher_temp"][37500] == 0.07 and s["teacher_temp"][-1] == 0.07
    # sqrt scaling with respect to 1024: 32 GPUs x 64 = 2048 -> 0.004 * sqrt(2)
    assert make_schedules(cfg, world_size=32)["lr"].max() == pytest.approx(0.004 * math.sqrt(2))


def test_param_groups_layer_decay_and_weight_decay():
    cfg = Config(arch="vit_small", n_prototypes=32, ibot_n_prototypes=32, head_hidden_dim=16, head_bottleneck_dim=8,
                 separate_ibot_head=True, global_size=56)
    model = train.build_ssl_model(cfg, 0.0)
    groups = param_groups(model, cfg)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = {f"{part}.{n}": p for part, m in model.parts().items() for n, p in m.named_parameters()}
    assert len(by_param) == len(named) == sum(1 for _ in model.parameters())  # every parameter exactly once
    lr = lambda n: by_param[id(named[n])]["lr_mult"]
    wd = lambda n: by_param[id(named[n])]["wd_mult"]
    assert lr("backbone.cls_token") == pytest.approx(0.9 ** 13) == pytest.approx(0.2542, abs=1e-4)
    assert lr("backbone.patch_embed.proj.weight") == pytest.approx(0.2542 * 0.2, abs=1e-4)
    assert lr("backbone.blocks.0.attn.qkv.weight") == pytest.approx(0.2824, abs=1e-4)
    assert lr("backbone.blocks.11.mlp.fc2.weight") == pytest.approx(0.9)
    assert lr("backbone.norm.weight") == 1.0 and lr("dino_head.mlp.0.weight") == 1.0
    for n in ("backbone.blocks.3.attn.qkv.bias", "backbone.blocks.3.norm1.weight", "backbone.norm.bias",
              "backbone.blocks.3.ls1.gamma", "dino_head.mlp.0.bias"):
        assert wd(n) == 0.0, n
    last = [n for n in named if "last_layer" in n]
    assert len(last) == 4  # g and v of both heads
    for n in ["backbone.pos_embed", "backbone.cls_token", "backbone.mask_token", "backbone.patch_embed.proj.weight",
              "backbone.blocks.0.attn.qkv.weight"] + last:
        assert wd(n) == 1.0, n
    assert all(by_param[id(named[n])]["is_last_layer"] for n in last)
    assert sum(by_param[id(p)]["is_last_layer"] for p in model.parameters()) == 4


def test_ema_update_formula():
    torch.manual_seed(0)
    t, s = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.clone() for p in t.parameters()]
    train.ema_update(t, s, 0.9)
    for p, p0, q in zip(t.parameters(), t0, s.parameters()):
        torch.testing.assert_close(p, 0.9 * p0 + 0.1 * q, rtol=0, atol=1e-7)


def test_one_step_leaves_teacher_to_the_ema():
    cfg = train.parse_config(argv=TINY)
    cpu = torch.device("cpu")
    student_p, student, teacher = train.build_models(cfg, "none", cpu)
    run = train.make_run(cfg, rank=0, world=1, device=cpu, strategy="none",
                         student_p=student_p, student=student, teacher=teacher, ema=teacher)
    in_opt = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in teacher.parameters())  # the optimizer never sees the teacher
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    loader, _ = train.build_data(cfg, 0, 1, 0, cpu)
    batch = next(iter(loader))
    assert batch["masks"].any() and batch["local_crops"].shape[0] == 2 * 4
    t_before = [p.clone() for p in teacher.parameters()]
    s_before = [p.clone() for p in student.parameters()]
    step = run.total // 2  # past the warm-up: lr > 0
    assert run.sched["lr"][step] > 0
    losses, t_cls, norms = train.train_step(run, batch, step)
    assert set(losses) == {"dino_global", "dino_local", "ibot", "koleo"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["ibot"] > 0
    assert set(norms) == {"grad_norm_" + k for k in student.parts()}
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for n, p in student.named_parameters() if "register" not in n)
    momentum = float(run.sched["momentum"][step])
    for p, p0, q in zip(teacher.parameters(), t_before, student.parameters()):
        torch.testing.assert_close(p, momentum * p0 + (1 - momentum) * q, rtol=0, atol=1e-6)
    assert any(not torch.equal(p, p0) for p, p0 in zip(student.parameters(), s_before))  # AdamW moved the student


# ------------------------------------------------------------------------------------------------------------------
# The real script: finite metrics, exports, exact resume, fault handling

@pytest.fixture(scope="module")
def straight_run(tiny_run):
    return tiny_run  # conftest's TINY run, read only


def test_run_writes_finite_metrics_and_exports(straight_run):
    import json
    rows = [json.loads(r) for r in (straight_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for k in ("loss", "dino_global", "dino_local", "ibot", "koleo", "lr", "wd", "momentum", "teacher_temp",
                  "grad_norm_backbone", "grad_norm_dino_head", "grad_norm_ibot_head", "teacher_entropy",
                  "images_per_s"):
            assert math.isfinite(r[k]), (k, r)
    assert rows[0]["teacher_temp"] == pytest.approx(0.04) and rows[-1]["teacher_temp"] == pytest.approx(0.07)
    from util import weights
    model = weights.from_pretrained(straight_run / "teacher_backbone.pth")  # the hub layout loads strictly
    assert model.embed_dim == 192
    full = torch.load(straight_run / "teacher.pth", weights_only=False)
    assert {"model", "config"} <= set(full) and any(k.startswith("ibot_head.") for k in full["model"])
    assert sorted(p.name for p in straight_run.glob("ckpt_*") if p.is_dir()) == ["ckpt_00000002", "ckpt_00000004"]


def test_resume_is_bit_identical(straight_run, tmp_path):
    # 4 straight steps vs. the same run stopped after its step-2 checkpoint and resumed in a new process
    out = tmp_path / "resumed"
    shutil.copytree(straight_run / "ckpt_00000002", out / "ckpt_00000002")
    proc = run_script(TINY + ["--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    a, b = load_checkpoint(straight_run / "ckpt_00000004"), load_checkpoint(out / "ckpt_00000004")
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_of_another_model_is_a_clear_error(straight_run, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(straight_run / "ckpt_00000004", out / "ckpt_00000004")
    args = TINY.copy()
    args[args.index("--n-prototypes") + 1] = "128"
    with pytest.raises(ValueError, match="n_prototypes"):
        train.train(train.parse_config(argv=args + ["--out", str(out)]))


def test_non_finite_loss_names_step_and_term(tmp_path):
    import vit
    bad = vit.build_model("vit_tiny", img_size=56, depth=int(TINY[TINY.index("--depth") + 1])).state_dict()
    bad["cls_token"] = torch.full_like(bad["cls_token"], float("nan"))
    torch.save(bad, tmp_path / "nan.pth")
    cfg = train.parse_config(argv=TINY + ["--out", str(tmp_path / "run"), "--init-from", str(tmp_path / "nan.pth")])
    with pytest.raises(FloatingPointError, match=r"term '\w+' at step 0"):
        train.train(cfg)
    assert not list((tmp_path / "run").glob("ckpt_*"))  # nothing written after a bad step


def test_unknown_flag_and_arch_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_config(argv=["--no-such-flag", "1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        train.parse_config(argv=["--arch", "vit_huge"])
    assert e.value.code == 2 and "unknown arch 'vit_huge'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# torchrun: DDP and FSDP2 on 2 CPU processes (gloo) against one process with the same global batch

DIST = TINY + ["--koleo-weight", "0", "--drop-path", "0"]  # KoLeo is per rank by design; drop path draws per rank


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    proc = run_script(DIST + ["--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_checkpoint(out / "ckpt_00000004")


def _compare(a, b, prefixes=("student.", "ema.")):
    keys = [k for k in a if k.startswith(prefixes)]
    assert keys and set(keys) <= set(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in keys)
    assert worst <= 1e-4, worst


def _two_process_run(out, strategy):
    args = DIST.copy()
    args[args.index("--batch-size") + 1] = "2"  # 2 ranks x 2 = the single run's global batch of 4
    if strategy == "fsdp":
        args.append("--activation-checkpointing")  # the vit_g set-up: recomputation must not change the numbers
    proc = run_script(args + ["--out", str(out), "--strategy", strategy], nproc=2, torchrun=strategy == "ddp")
    # check the outputs, not only the exit code (a gloo run can abort at exit after writing everything)
    assert (out / "ckpt_00000004" / "extra.pt").exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    assert "strategy ddp" in _two_process_run(out, "ddp").stdout
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    assert "strategy fsdp" in _two_process_run(out, "fsdp").stdout
    return out


def test_ddp_matches_one_process(single_run, ddp_run):
    _compare(single_run, load_checkpoint(ddp_run / "ckpt_00000004"))


def test_fsdp_matches_one_process_and_ddp(single_run, ddp_run, fsdp_run):
    fsdp = load_checkpoint(fsdp_run / "ckpt_00000004")
    _compare(single_run, fsdp)
    _compare(load_checkpoint(ddp_run / "ckpt_00000004"), fsdp)


def test_fsdp_resume(fsdp_run, tmp_path):
    out = tmp_path / "fsdp_resumed"
    shutil.copytree(fsdp_run / "ckpt_00000002", out / "ckpt_00000002")
    proc = _two_process_run(out, "fsdp")
    assert "resumed from" in proc.stdout
    a, b = load_checkpoint(fsdp_run / "ckpt_00000004"), load_checkpoint(out / "ckpt_00000004")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_ctrl_c_saves_then_resumes(tmp_path):
    import signal
    import time
    out = tmp_path / "interrupted"
    args = TINY.copy()
    args[args.index("--epoch-length") + 1] = "200"  # long enough to be interrupted
    args[args.index("--save-every") + 1] = "1000"  # so any checkpoint found was written by the stop
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "train.py"] + args + ["--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    ckpts = [p for p in out.glob("ckpt_*") if p.is_dir()]
    assert len(ckpts) == 1 and not ckpts[0].name.endswith(".tmp")
    step = int(ckpts[0].name.split("_")[1])
    assert 1 <= step < 200 and f"stopped at step {step}" in stdout
    assert (out / "teacher_backbone.pth").exists()
    # the same command resumes from it: the checkpoint loads strictly into fresh models at that step
    cfg = train.parse_config(argv=args + ["--out", str(out)])
    _, student, teacher = train.build_models(cfg, "none", torch.device("cpu"))
    optimizer = torch.optim.AdamW(param_groups(student, cfg))
    ckpt = train.Checkpointer(out, 3, 0)
    assert ckpt.latest() == ckpts[0]
    assert ckpt.load(ckpts[0], student, teacher, optimizer, train.make_centers(cfg, torch.device("cpu")), cfg) == step


def test_fsdp_meta_device_init(tmp_path):
    # the vit_l / vit_g path (forced here on the tiny model): built on the meta device, initialised after sharding
    import json
    args = DIST.copy()
    args[args.index("--batch-size") + 1] = "2"
    out = tmp_path / "meta"
    proc = run_script(args + ["--out", str(out), "--strategy", "fsdp", "--meta-init"], nproc=2)
    assert (out / "ckpt_00000004" / "extra.pt").exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    sd = torch.load(out / "teacher_backbone.pth")
    w = sd["blocks.0.attn.qkv.weight"]  # (3D, D): rank 0 initialised the first half of the rows, rank 1 the second
    half = w.shape[0] // 2
    assert not torch.allclose(w[:half], w[half:])  # each shard got its own random numbers
    assert 0.015 < w.std().item() < 0.025 and 0.015 < sd["pos_embed"].std().item() < 0.025  # trunc_normal(0.02)


# ------------------------------------------------------------------------------------------------------------------
# The k-NN monitor and the collapse alarm, in a real run

def test_monitor_rows_and_alarm_on_a_forced_uniform_teacher(tmp_path, capsys):
    import json
    # A teacher temperature of 100 flattens every target (logits are cosines in [-1, 1]): the uniform collapse.
    args = TINY + ["--out", str(tmp_path), "--epoch-length", "24", "--log-every", "4", "--save-every", "100",
                   "--monitor-every", "12", "--monitor-images", "24", "--teacher-temp", "100",
                   "--warmup-teacher-temp", "100"]
    train.train(train.parse_config(argv=args))
    said = capsys.readouterr().out
    assert said.count("collapse alarm") == 1 and "uniform" in said  # once, and named
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    knn_rows = [r for r in rows if "knn_top1" in r]
    assert [r["step"] for r in knn_rows] == [12, 24]
    assert all(0 <= r["knn_top1"] <= 100 and r["knn_raw_pixels"] == knn_rows[0]["knn_raw_pixels"] for r in knn_rows)
    assert sum("alarm" in r for r in rows) == 1
    assert (tmp_path / "loss.png").is_file()


def test_alarm_stays_silent_on_the_laptop_default(tmp_path, capsys):
    import json
    # The laptop preset itself (no flag but the run's length and the monitor's size): its teacher never stays uniform.
    args = ["--out", str(tmp_path), "--epochs", "1", "--epoch-length", "40", "--monitor-images", "50",
            "--save-every", "1000", "--num-workers", "0"]  # 40 steps: twice the alarm's 20-step window
    train.train(train.parse_config(argv=args))  # in this process: the suite's time goes to the steps, not start-up
    said = capsys.readouterr()
    assert "collapse alarm" not in said.out + said.err and "done:" in said.out
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 40 and not any("alarm" in r for r in rows)
    assert max(r["teacher_entropy"] for r in rows if r["step"] >= 20) < 0.97 * math.log(256)


# ------------------------------------------------------------------------------------------------------------------
# Continuing from released weights (--init-from): the shape from the file, fresh heads, a backbone that waits

def pretrained_file(tmp_path, registers=0):
    """A small trained-looking backbone (random weights, LayerScale 1.0) saved in the released hub layout."""
    import vit
    torch.manual_seed(3)
    model = vit.build_model("vit_tiny", img_size=56, patch_size=14, depth=2, init_values=1.0,
                            num_register_tokens=registers)
    with torch.no_grad():
        model.mask_token.zero_()  # timm's layout has no mask token: zero here, so all three layouts hold one network
    torch.save(model.state_dict(), tmp_path / "hub.pth")
    return tmp_path / "hub.pth", model.state_dict()


def test_heads_warmup_leaves_the_backbone_bit_identical(tmp_path):
    path, sd = pretrained_file(tmp_path)
    out = tmp_path / "run"
    cfg = train.parse_config(argv=TINY + ["--out", str(out), "--init-from", str(path), "--heads-warmup-epochs", "1"])
    assert (cfg.depth, cfg.patch_size, cfg.img_size, cfg.num_registers) == (2, 14, 56, 0)  # from the file
    assert cfg.warmup_teacher_temp == cfg.teacher_temp  # the schedule of a continued run: no temperature warm-up
    train.train(cfg)  # 4 steps, all inside the heads warm-up
    teacher = torch.load(out / "teacher_backbone.pth", weights_only=True)
    assert teacher.keys() == sd.keys() and all(torch.equal(teacher[k], sd[k]) for k in sd)
    student = load_checkpoint(out / "ckpt_00000004")
    assert all(torch.equal(student[f"student.backbone.{k}"], sd[k]) for k in sd)
    heads = [k for k in student if k.startswith("student.dino_head.")]  # the fresh heads did train meanwhile
    assert heads and any(not torch.equal(student[k], student[k.replace("student.", "ema.", 1)]) for k in heads)


def test_hub_hf_and_timm_layouts_start_the_same_run(tmp_path):
    import json
    from util import weights
    path, sd = pretrained_file(tmp_path)
    hf = tmp_path / "hf"
    hf.mkdir()
    torch.save(weights.hub_to_hf(sd), hf / "pytorch_model.bin")
    (hf / "config.json").write_text(json.dumps(weights.hf_config(sd)))
    torch.save(weights.hub_to_timm(sd), tmp_path / "timm.pth")
    first = []
    for source in (path, hf, tmp_path / "timm.pth"):
        cfg = train.parse_config(argv=TINY + ["--out", str(tmp_path / "unused"), "--init-from", str(source),
                                              "--mask-probability", "1.0"])
        cpu = torch.device("cpu")
        student_p, student, teacher = train.build_models(cfg, "none", cpu)
        run = train.make_run(cfg, rank=0, world=1, device=cpu, strategy="none", student_p=student_p,
                             student=student, teacher=teacher, ema=teacher)
        batch = next(iter(train.build_data(cfg, 0, 1, 0, cpu)[0]))
        torch.manual_seed(0)
        losses, _, _ = train.train_step(run, batch, 0)
        first.append(torch.stack([v.detach() for v in losses.values()]))
    assert torch.equal(first[0], first[1]) and torch.equal(first[0], first[2]), first


@pytest.mark.parametrize("flags,says", [
    (["--patch-size", "8", "--global-size", "56", "--local-size", "32"], "--patch-size 8 contradicts --init-from"),
    (["--arch", "vit_s"], "--arch vit_s contradicts --init-from"),
    (["--num-registers", "4"], "--num-registers 4 contradicts --init-from"),
])
def test_a_flag_that_contradicts_the_weights_is_one_error_line(tmp_path, capsys, flags, says):
    from util import cli
    path, _ = pretrained_file(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.run(train.parse_config, argv=["--init-from", str(path), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and says in err and "hub.pth" in err, err
    assert "vit_tiny" in err and "Traceback" not in err


def test_init_from_a_file_that_is_not_a_vit_is_one_error_line(tmp_path, capsys):
    from util import cli
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, tmp_path / "resnet.pth")
    with pytest.raises(SystemExit) as e:
        cli.run(train.parse_config, argv=["--init-from", str(tmp_path / "resnet.pth")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "not a ViT backbone" in err and "resnet.pth" in err, err
