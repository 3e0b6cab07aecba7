"""Everything that is not the method, in one package (as MAE keeps its `util/`): the concept files at the top
import from here, nothing here is DINOv2 itself.

    cli          a dataclass of settings becomes a script's flags; a user's mistake becomes one `error:` line
    distributed  one process or many under torchrun: the process group, rank 0 printing, collectives
    checkpoint   atomic writes, DCP checkpoints of a run, exact resume, the exports
    runlog       metrics.jsonl, the progress bar, the online k-NN monitor, the collapse alarm, Ctrl-C
    images       users' image files: any mode, EXIF orientation, as RGB
    plan         parameters, FLOPs and memory per device, before anything is built (train.py --dry-run)
    weights      weight files: any checkpoint read, the hub / Hugging Face / timm layouts, torch.hub, conversion
"""
