"""
Distillation: a small student learns from a large frozen teacher, as the released ViT-S/B/L were made from ViT-g.

Paper §5 ("Distillation") and the model card: "the standard DINOv2 pretraining procedure, except the teacher is a
pretrained ViT-g, frozen" (paper §5). The released repository has no such code; this file is only what changes
when the teacher is frozen. Everything else (schedules, parameter groups, Sinkhorn-Knopp or centering, KoLeo, the
loop, checkpoints, DDP / FSDP2, logging) is train.py's, called as it is.

What changes:
  1. The teacher is a trained model (backbone + DINO head + iBOT head, train.py's teacher.pth), frozen: no EMA into
     it, no gradients, eval mode. Its arch is read from the file.
  2. The student keeps an EMA of itself (the paper's "spare EMA"); that EMA is the final model: student_backbone.pth.
  3. No masking and no stochastic depth: the student sees whole global crops, and the iBOT loss compares every patch
     token of the two global crops (train.whole_crops, switched on by the run's declared `ibot_on_all_patches`).
  4. The student must have the teacher's prototypes and patch size (checked), so the heads' outputs can be compared.

Public names: DistillConfig, load_frozen_teacher, distill.

    python distill.py --teacher runs/train/teacher.pth --arch vit_tiny          # after `python train.py --arch vit_s`
    torchrun --nproc_per_node=8 distill.py --teacher vitg_run/teacher.pth --arch vit_l --data /path/to/images
"""
import dataclasses
import os
from dataclasses import dataclass


from util import cli
from util import distributed
from util import plan
import train
from util.cli import arg
from util.weights import read_checkpoint
from train import Config


@dataclass
class DistillConfig(Config):
    teacher: str = arg("runs/train/teacher.pth", "train.py's teacher.pth: backbone + heads + the config it was "
                                                 "trained with")
    out: str = arg("runs/distill", "run folder: checkpoints, metrics.jsonl, exports, plots")


# The student copies these from the teacher unless a flag sets them: the heads must produce comparable outputs, and the
# views must be the ones the teacher learned on.
FROM_TEACHER = ("patch_size", "n_prototypes", "separate_ibot_head", "ibot_n_prototypes", "centering",
                "global_size", "local_size", "n_local", "synthetic_images", "synthetic_size", "synthetic_rotation",
                "synthetic_background", "synthetic_object_size", "data")
MUST_MATCH = ("patch_size", "n_prototypes", "ibot_n_prototypes", "separate_ibot_head")


def read_teacher(path):
    if not os.path.isfile(path):
        raise cli.MissingFile(f"teacher checkpoint {path!r} not found: train one with `python train.py` (it writes "
                              f"runs/train/teacher.pth), or see the README for a released backbone")
    # mmap: the config is read twice (flags, then the teacher), and a vit_g teacher.pth is gigabytes
    ckpt = read_checkpoint(path, mmap=True)  # corrupt, truncated or text: a UserError naming the file
    if not (isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt):
        raise cli.UserError(f"{path} is not a train.py teacher.pth (expected keys 'model' and 'config'). A "
                            f"backbone-only file such as the released weights needs heads first: `python train.py "
                            f"--init-from {path} --epochs 1 --heads-warmup-epochs 1 --out runs/heads` trains them "
                            f"with the backbone frozen, then pass --teacher runs/heads/teacher.pth")
    known = {f.name for f in dataclasses.fields(Config)}
    try:
        return ckpt["model"], Config(**{k: v for k, v in ckpt["config"].items() if k in known})
    except (TypeError, ValueError) as e:
        raise cli.UserError(f"{path}: the config saved with the teacher is not valid here ({e})") from None


def parse_distill_config(argv=None):
    """train.py's flags plus --teacher; the student's heads, patch and crops default to the teacher's."""
    given = vars(cli.build_parser(DistillConfig, __doc__).parse_args(argv))  # the flags alone, to find --teacher
    teacher = given.get("teacher", DistillConfig.teacher)
    _, tcfg = read_teacher(teacher) if os.path.isfile(teacher) else (None, None)
    inherited = {k: getattr(tcfg, k) for k in FROM_TEACHER} if tcfg else {}
    # 3. no masking, no stochastic depth
    presets = {arch: {**preset, **inherited, "drop_path": 0.0, "mask_probability": 0.0}
               for arch, preset in train.PRESETS.items()}
    return train.parse_config(DistillConfig, presets, argv, __doc__)


def load_frozen_teacher(cfg, strategy, device):
    """1. The teacher: built from its own config, loaded strictly, frozen."""
    state, tcfg = read_teacher(cfg.teacher)
    mismatch = {k: (getattr(tcfg, k), getattr(cfg, k)) for k in MUST_MATCH if getattr(tcfg, k) != getattr(cfg, k)}
    if mismatch:  # 4.
        raise cli.UserError(f"student and teacher must share prototypes and patch size; differing (teacher, "
                            f"student): {mismatch}")
    teacher = train.build_ssl_model(tcfg, drop_path=0.0)
    try:
        teacher.load_state_dict(state, strict=True)
    except RuntimeError as e:  # a teacher.pth edited or written by other code
        raise cli.UserError(f"{cfg.teacher}: the weights do not fit the model its config describes: "
                            f"{str(e).splitlines()[0]}") from None
    teacher.requires_grad_(False)
    teacher = train.parallelize(teacher.to(device), cfg, strategy, device, trainable=False)
    return teacher.eval(), tcfg


def distill(cfg):
    if cfg.dry_run:  # the student's run: parameters, FLOPs, memory per device (the frozen teacher not counted)
        raise SystemExit(plan.dry_run(cfg, train.meta_model(cfg), train.make_schedules))
    rank, world, device, strategy, _ = train.setup(cfg)
    teacher, tcfg = load_frozen_teacher(cfg, strategy, device)
    distributed.print0(f"frozen teacher: {tcfg.arch} ({cfg.teacher}) -> student {cfg.arch}")
    # 2. build_models returns the student and an identical copy: here that copy is the student's EMA
    student_p, student, student_ema = train.build_models(cfg, strategy, device)
    # 3. the declared differences from DINOv2: targets from the frozen teacher, the EMA is the student's own, no
    #    mask and every patch token a target (train.whole_crops), the exports named student*.pth
    train.fit(train.make_run(cfg, rank=rank, world=world, device=device, strategy=strategy,
                             student_p=student_p, student=student, teacher=teacher,
                             ema=student_ema, export="student", ibot_on_all_patches=True))


if __name__ == "__main__":
    cli.run(lambda: distill(parse_distill_config()))
