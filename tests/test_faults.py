"""Issue 12, one test per defect: bad flags, bad files and faults end in one `error:` line or a counted skip, and a
run never loses or mixes its checkpoints. The runs are the 4-step TINY run of test_train.py, in this process."""
import json
import os
import shutil
import signal

import pytest
import torch

from util import cli
import distill
from util import runlog
import train
from util import weights
from conftest import TINY, load_checkpoint

QUIET = TINY + ["--monitor-every", "0"]  # no k-NN monitor: these tests are about files, not features


def config(out, *extra):
    return train.parse_config(argv=QUIET + ["--out", str(out), *extra])


def one_error_line(capsys, fn, *args):
    """Run fn under cli.run as a script would: the exit status and the single stderr line."""
    with pytest.raises(SystemExit) as e:
        cli.run(fn, *args)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return e.value.code, err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run: checkpoints at steps 2 and 4, metrics of steps 1-4, the teacher exports."""
    out = tmp_path_factory.mktemp("finished")
    train.train(config(out))
    return out


def tiny_models(cfg):
    _, student, teacher = train.build_models(cfg, "none", torch.device("cpu"))
    optimizer = torch.optim.AdamW(train.param_groups(student, cfg))
    return student, teacher, optimizer, train.make_centers(cfg, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------------------------
# 1. nothing non-finite is saved or exported, and a bad state never prunes the good checkpoints

def test_non_finite_state_is_never_saved_and_keeps_the_good_checkpoints(tmp_path):
    cfg = config(tmp_path)
    student, teacher, optimizer, centers = tiny_models(cfg)
    ckpt = train.Checkpointer(tmp_path, keep_last=2, rank=0)
    for step in (2, 4):
        ckpt.save(step, student, teacher, optimizer, centers, cfg)
    with torch.no_grad():
        student.backbone.blocks[0].attn.qkv.weight[0, 0] = float("nan")  # a diverged step, between two log steps
    with pytest.raises(FloatingPointError, match=r"weights after step 6.*last good checkpoint is .*ckpt_00000004"):
        ckpt.save(6, student, teacher, optimizer, centers, cfg)
    with torch.no_grad():
        student.backbone.blocks[0].attn.qkv.weight[0, 0] = 0.0
    bad = torch.tensor([-1, 5, -1, -1])  # the loss went non-finite at step 5 while the weights still look fine
    with pytest.raises(FloatingPointError, match=r"term 'dino_local' at step 5"):
        ckpt.save(6, student, teacher, optimizer, centers, cfg, bad, ("dino_global", "dino_local", "ibot", "koleo"))
    with torch.no_grad():
        teacher.dino_head.mlp[0].weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite weights after step 6"):
        ckpt.export(teacher, cfg, "teacher", 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000002", "ckpt_00000004"]  # no export, no prune


# ------------------------------------------------------------------------------------------------------------------
# 2. a run killed between its last checkpoint and its export: the rerun writes the exports

def test_rerun_of_a_finished_run_rebuilds_missing_exports(finished, tmp_path, capsys):
    out = tmp_path / "killed_in_export"
    shutil.copytree(finished / "ckpt_00000004", out / "ckpt_00000004")
    shutil.copy(finished / "metrics.jsonl", out / "metrics.jsonl")
    train.train(config(out))
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done: ")]
    assert len(done) == 1 and str(out / "teacher_backbone.pth") in done[0]
    for name in ("teacher_backbone.pth", "teacher.pth"):  # the same teacher the uninterrupted run exported
        a, b = weights.read_checkpoint(finished / name), weights.read_checkpoint(out / name)
        a, b = a.get("model", a), b.get("model", b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------------------------
# 3. --no-resume never writes into a folder that holds a run

def test_no_resume_refuses_a_folder_that_holds_a_run(finished, tmp_path, capsys):
    out = tmp_path / "taken"
    shutil.copytree(finished, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, err = one_error_line(capsys, train.train, config(out, "--no-resume"))
    assert code == 1 and f"--out {out} already holds a run" in err and "pick another --out" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing touched


# ------------------------------------------------------------------------------------------------------------------
# 5. resume falls back past a corrupt latest checkpoint, and a torn last line of metrics.jsonl is dropped

def test_resume_falls_back_past_a_corrupt_checkpoint_and_a_torn_metrics_line(finished, tmp_path, capsys):
    out = tmp_path / "corrupt"
    for name in ("ckpt_00000002", "ckpt_00000004"):
        shutil.copytree(finished / name, out / name)
    shard = next((out / "ckpt_00000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])  # a disk that filled up, a copy cut short
    rows = (finished / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 5, "lo')  # a kill mid-write
    train.train(config(out))
    printed = capsys.readouterr().out
    assert "ckpt_00000004 is incomplete or unreadable" in printed and "resumed from" in printed
    assert "ckpt_00000002 at step 2" in printed and "dropped 1 unreadable line" in printed
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    a, b = load_checkpoint(finished / "ckpt_00000004"), load_checkpoint(out / "ckpt_00000004")  # redone exactly
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(finished, tmp_path, capsys):
    out = tmp_path / "all_corrupt"
    shutil.copytree(finished / "ckpt_00000004", out / "ckpt_00000004")
    (out / "ckpt_00000004" / "extra.pt").write_bytes(b"")
    code, err = one_error_line(capsys, train.train, config(out))
    assert code == 1 and "no checkpoint in" in err and "ckpt_00000004" in err


def test_out_naming_a_file_is_one_error_line_and_the_file_is_kept(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("the user's own file")
    code, err = one_error_line(capsys, train.train, config(out))
    assert code == 1 and "--out" in err and "is a file, not a folder" in err
    assert out.read_text() == "the user's own file"  # nothing of the user's is overwritten


# ------------------------------------------------------------------------------------------------------------------
# 6. flags out of range are usage errors that name the flag, at parse time

@pytest.mark.parametrize("flag,value,says", [
    ("--batch-size", "0", "--batch-size must be >= 1"), ("--epochs", "0", "--epochs must be > 0"),
    ("--save-every", "0", "--save-every must be >= 1"), ("--log-every", "0", "--log-every must be >= 1"),
    ("--base-lr", "-0.01", "--base-lr must be > 0"), ("--epoch-length", "0", "--epoch-length must be >= 1"),
    ("--global-size", "50", "--global-size must be a multiple of the patch size"),
    ("--mask-probability", "1.5", "--mask-probability must be between 0 and 1"),
    ("--centering", "none", "--centering must be one of softmax, sinkhorn_knopp"),
    ("--device", "tpu", "--device must be auto, cpu, cuda[:N] or mps"),
    ("--synthetic-rotation", "400", "--synthetic-rotation must be between 0 and 360"),
    ("--synthetic-background", "grass", "--synthetic-background must be one of texture, plain, clutter")])
def test_flag_out_of_range_is_a_usage_error(capsys, flag, value, says):
    with pytest.raises(SystemExit) as e:
        config("unused", flag, value)
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and "Traceback" not in err
    name = flag[2:].replace("-", "_")
    default = getattr(train.Config(), name)
    with pytest.raises(ValueError, match=flag):  # the same check when a config is built in code
        train.Config(**{name: value if isinstance(default, str) else type(default)(float(value))})


def test_object_size_out_of_range_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        config("unused", "--synthetic-object-size", "0.3", "0.6")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--synthetic-object-size must be between 0 and 0.5" in err
    with pytest.raises(ValueError, match="--synthetic-object-size"):
        train.Config(synthetic_object_size=(0.3, 0.2))


def test_scales_must_be_ordered_fractions(capsys):
    with pytest.raises(SystemExit):
        config("unused", "--local-scale", "0.5", "0.1")
    assert "--local-scale must be two area fractions" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# 4, 8. user errors of the training scripts are one line: missing paths, corrupt weights, no CUDA

def test_user_errors_of_train_and_distill_are_one_line(finished, tmp_path, capsys):
    code, err = one_error_line(capsys, lambda: config(tmp_path / "r0", "--data", str(tmp_path / "nope")))
    assert code == 1 and "--data" in err and "nope: no such file or folder" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = one_error_line(capsys, train.train, config(tmp_path / "r1", "--data", str(empty)))
    assert "no image files" in err and str(empty) in err
    raw = (finished / "teacher_backbone.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[:len(raw) // 3])  # a download cut short
    code, err = one_error_line(capsys, lambda: train.train(config(tmp_path / "r2", "--init-from",
                                                                  str(tmp_path / "cut.pth"))))
    assert "cut.pth" in err and "corrupt or truncated" in err and "weights_only" not in err
    with pytest.raises(cli.UserError, match="cut.pth.*corrupt or truncated"):  # distill.py --teacher: the same reader
        distill.read_teacher(str(tmp_path / "cut.pth"))
    if not torch.cuda.is_available():
        code, err = one_error_line(capsys, train.train, config(tmp_path / "r3", "--device", "cuda"))
        assert "--device cuda: CUDA is not available" in err


# ------------------------------------------------------------------------------------------------------------------
# 9. "stop requested" is printed by the main process only, not by each DataLoader worker

def test_stop_request_is_handled_by_the_main_process_only(capsys):
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = runlog.StopRequest()
        stop.pid = -1  # as seen from a forked DataLoader worker
        stop._handle(signal.SIGINT, None)
        assert not stop.requested and capsys.readouterr().out == ""
        stop.pid = os.getpid()
        stop._handle(signal.SIGINT, None)
        assert stop.requested and capsys.readouterr().out.count("stop requested") == 1
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
