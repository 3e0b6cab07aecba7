"""distill.py: the frozen teacher stays bit-identical, mismatched heads or patches are clear errors, 2-process DDP and
FSDP2 runs match one process, resume is exact, and the student EMA is exported in the hub layout."""
import shutil

import pytest
import torch

import distill
import train
from conftest import load_checkpoint, run_script

# the teacher is a TINY train.py run; the student copies its heads and crops (FROM_TEACHER) and needs no flags for them
STUDENT = ["--batch-size", "4", "--epochs", "1", "--epoch-length", "4", "--warmup-epochs", "0.5",
           "--freeze-last-layer-epochs", "0.25", "--num-workers", "0", "--log-every", "1", "--save-every", "2",
           "--head-hidden-dim", "32", "--head-bottleneck-dim", "16", "--ibot-bottleneck-dim", "16",
           "--monitor-images", "16"]  # the preset's monitor, at the end only and small


@pytest.fixture(scope="module")
def teacher_file(tiny_run):
    return tiny_run / "teacher.pth"  # conftest's TINY run of train.py, read only


def test_student_inherits_teacher_heads_and_crops(teacher_file):
    cfg = distill.parse_distill_config(STUDENT + ["--teacher", str(teacher_file)])
    assert (cfg.n_prototypes, cfg.ibot_n_prototypes, cfg.global_size, cfg.local_size) == (64, 64, 56, 28)
    assert cfg.drop_path == 0.0 and cfg.mask_probability == 0.0  # no stochastic depth, no masking


def test_frozen_teacher_is_bit_identical_after_steps(teacher_file, tmp_path):
    cfg = distill.parse_distill_config(STUDENT + ["--teacher", str(teacher_file), "--out", str(tmp_path / "d"),
                                                  "--epoch-length", "2"])
    device = torch.device("cpu")
    teacher, _ = distill.load_frozen_teacher(cfg, "none", device)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_p, student, student_ema = train.build_models(cfg, "none", device)
    ema_before = [p.clone() for p in student_ema.parameters()]
    train.fit(train.make_run(cfg, rank=0, world=1, device=device, strategy="none",
                             student_p=student_p, student=student, teacher=teacher, ema=student_ema,
                             export="student", ibot_on_all_patches=True))
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, student_ema.parameters()))  # the EMA moved
    from util import weights
    assert weights.from_pretrained(tmp_path / "d" / "student_backbone.pth").embed_dim == 192


def test_whole_crops_targets_every_patch_token():
    g = torch.zeros(6, 3, 56, 56)  # 2B = 6 crops of 4x4 patches
    b = train.whole_crops({"global_crops": g, "masks": torch.ones(6, 16, dtype=torch.bool)}, 14)
    assert b["masks"] is None
    assert torch.equal(b["mask_indices"], torch.arange(96))
    assert torch.allclose(b["mask_weights"], torch.full((96,), 1 / 16))


@pytest.mark.parametrize("flag,value,field", [("--n-prototypes", "128", "n_prototypes"),
                                              ("--patch-size", "28", "patch_size")])
def test_mismatched_student_is_a_clear_error(teacher_file, tmp_path, flag, value, field):
    cfg = distill.parse_distill_config(STUDENT + ["--teacher", str(teacher_file), flag, value])
    with pytest.raises(ValueError, match=field):
        distill.load_frozen_teacher(cfg, "none", torch.device("cpu"))


def test_missing_or_backbone_only_teacher_is_a_clear_error(teacher_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        distill.read_teacher(str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="backbone-only"):
        distill.read_teacher(str(teacher_file.parent / "teacher_backbone.pth"))


def _run(teacher_file, out, nproc=1, strategy=None):
    args = STUDENT + ["--teacher", str(teacher_file), "--out", str(out), "--koleo-weight", "0"]
    if nproc > 1:
        args[args.index("--batch-size") + 1] = str(4 // nproc)
        args += ["--strategy", strategy]
    proc = run_script(args, nproc=nproc, script="distill.py")
    assert (out / "ckpt_00000004" / "extra.pt").exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def single_distill(teacher_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill_single")
    _run(teacher_file, out)
    return out


# FSDP2 only: under DDP the frozen teacher is the replicated, never-trained module train.py's DDP test already covers
# (test_train.py::test_ddp_matches_one_process); under FSDP2 it is sharded, which only distillation does.
@pytest.mark.parametrize("strategy", ["fsdp"])
def test_two_process_distill_matches_one_process(teacher_file, single_distill, tmp_path, strategy):
    _run(teacher_file, tmp_path / strategy, nproc=2, strategy=strategy)
    a, b = load_checkpoint(single_distill / "ckpt_00000004"), load_checkpoint(tmp_path / strategy / "ckpt_00000004")
    keys = [k for k in a if k.startswith(("student.", "ema."))]
    worst = max((a[k] - b[k]).abs().max().item() for k in keys)
    assert worst <= 1e-4, worst


def test_distill_resume_is_exact(teacher_file, single_distill, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(single_distill / "ckpt_00000002", out / "ckpt_00000002")
    assert "resumed from" in _run(teacher_file, out).stdout
    a, b = load_checkpoint(single_distill / "ckpt_00000004"), load_checkpoint(out / "ckpt_00000004")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
