"""The command line of every script: a dataclass of settings becomes its flags, and a user's mistake becomes one line.

Each script declares its settings once, as a dataclass whose fields carry their own help text:

    @dataclass
    class Config:
        batch_size: int = arg(64, "images per GPU", check=(1, None))
        data: str | None = arg(None, "image folder; none: the synthetic set")

        def __post_init__(self):
            check_fields(self)  # the declared checks: --batch-size must be >= 1

and parses them with `parse(Config)`: every field becomes `--batch-size`, `--data` (bool fields get `--x / --no-x`,
tuples take several values), `--help` lists them with their defaults, and a `presets` table (train.py's per-arch
recipes) fills what the flags leave unset. A config class validates itself in `__post_init__`: the ValueError it
raises becomes a usage error that names the flag (exit status 2), like argparse's own.

Errors: a mistake the user can fix (a missing file, a checkpoint of another architecture, a flag out of range) is
raised as `UserError` and `run(main)` prints it as one `error: ...` line and exits 1, without a traceback. Anything
else is a bug and keeps its traceback. `--debug` (or DINOV2_DEBUG=1) shows the traceback of user errors too.
"""
import argparse
import dataclasses
import os
import sys
import types
import typing


class UserError(ValueError):
    """A problem with the user's input, printed as one `error:` line by run(). A ValueError, so that library callers
    can catch bad input the usual way."""


def arg(default=None, help="", check=None, **kwargs):
    """A dataclass field with its --help text and the values it accepts: `lr: float = arg(1e-3, "peak lr", check=">0")`.

    check: (lo, hi) an inclusive range (None: open on that side; a tuple field has each element checked), ">0" a
    positive number, or a tuple of strings: the allowed values. check_fields() enforces it."""
    meta = {"help": help, "check": check}
    if isinstance(default, (list, dict, set)):  # mutable defaults need a factory
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


def flag(name):
    return "--" + name.replace("_", "-")


def check_paths(cfg, names):
    """The paths these fields name exist (an empty field is unset): a MissingFile naming the flag, raised once the
    flags and presets are final."""
    for name in names:
        path = getattr(cfg, name, "")
        if path and not os.path.exists(path):
            raise MissingFile(f"{flag(name)} {path}: no such file or folder")


def check_fields(cfg):
    """Every field's declared check (see arg); a ValueError that names the flag, which parse() makes a usage error.
    Config classes call it first in __post_init__, so presets, tests and dataclasses.replace are checked too."""
    for f in dataclasses.fields(cfg):
        check, value = f.metadata.get("check"), getattr(cfg, f.name)
        if check is None or value is None:
            continue
        if check == ">0":
            ok, what = value > 0, "must be > 0"
        elif all(isinstance(c, str) for c in check):
            ok, what = value in check, f"must be one of {', '.join(check)}"
        else:
            lo, hi = check
            ok = all((lo is None or v >= lo) and (hi is None or v <= hi)
                     for v in (value if isinstance(value, tuple) else (value,)))
            what = f"must be >= {lo}" if hi is None else f"must be <= {hi}" if lo is None else \
                f"must be between {lo} and {hi}"
        if not ok:
            raise ValueError(f"{flag(f.name)} {what}, got {value!r}")


def debug_mode() -> bool:
    return os.environ.get("DINOV2_DEBUG", "") not in ("", "0") or "--debug" in sys.argv


def run(main, *args, **kwargs):
    """Call main(); a UserError is one `error:` line on stderr (rank 0 only under torchrun) and exit status 1."""
    try:
        return main(*args, **kwargs)
    except UserError as e:
        if debug_mode():
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


class MissingFile(UserError, FileNotFoundError):
    """A path the user gave that is not there: a UserError, and a FileNotFoundError for callers that catch that."""


def _unwrap_optional(tp):
    """`X | None` -> (X, True); X -> (X, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(typing.get_args(tp)):
            return rest[0], True
    return tp, False


def _add_flag(parser, f, tp, default, positional=False):
    """One argparse flag for a dataclass field of (resolved) type tp; its value is absent unless given. A positional
    field (a list) takes the bare arguments instead of a flag."""
    kind, _ = _unwrap_optional(tp)
    shown = f" [default {default!r}]" if default is not dataclasses.MISSING else ""
    check = f.metadata.get("check")
    choices = f" {{{', '.join(check)}}}" if isinstance(check, tuple) and all(isinstance(c, str) for c in check) else ""
    help_ = (f.metadata.get("help", "") + choices + shown).replace("%", "%%")
    name = "--" + f.name.replace("_", "-")
    kw = dict(default=argparse.SUPPRESS, help=help_)
    if positional:
        args = typing.get_args(kind)
        parser.add_argument(f.name, type=args[0] if args else str, nargs="*", **kw)
    elif kind is bool:
        parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
    elif typing.get_origin(kind) in (tuple, list):
        args = typing.get_args(kind)
        elem = args[0] if args else str
        fixed = typing.get_origin(kind) is tuple and args and args[-1] is not Ellipsis
        nargs = len(args) if fixed else "*" if typing.get_origin(kind) is list else "+"
        parser.add_argument(name, type=elem, nargs=nargs, **kw)
    elif kind in (int, float, str):
        parser.add_argument(name, type=kind, **kw)
    else:
        raise TypeError(f"{f.name}: no flag for type {tp!r}")


def build_parser(cls, description="", presets=None, preset_key="arch", positional=()):
    """argparse parser for every field of the dataclass `cls` (see the module docstring); the list fields named in
    `positional` take the bare arguments (visualize.py's image paths)."""
    epilog = f"Unset flags take the --{preset_key.replace('_', '-')} preset's value, else the default." \
        if presets else None
    # a short usage line: a usage error is then one line to read, not the list of every flag (that is --help)
    parser = argparse.ArgumentParser(description=(description or "").strip().split("\n\n")[0], epilog=epilog,
                                     usage="%(prog)s [flags]" + "".join(f" [{p.upper()} ...]" for p in positional)
                                     + "  (--help lists them)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        _add_flag(parser, f, hints[f.name], default, f.name in positional)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of errors (same as DINOV2_DEBUG=1)")
    return parser


def parse(cls, argv=None, description="", presets=None, preset_key="arch", canonical=None, positional=(),
          derive=None):
    """Settings of dataclass `cls` from the command line: flags > derived > presets[value of preset_key] > defaults.

    `canonical` maps the preset key's value to its canonical name (train.py: vit_s -> vit_small); the ValueError it
    raises for an unknown name is a usage error. `derive(given)` -> {field: value} fills fields from what the flags
    name (train.py: the model's shape from the --init-from file); a UserError it raises is the user's one `error:`
    line, not a usage error. Returns the config instance.
    """
    parser = build_parser(cls, description, presets, preset_key, positional)
    given = vars(parser.parse_args(argv))  # only the flags on the command line; unknown flags are an error
    given.pop("debug", None)
    given = {k: tuple(v) if isinstance(v, list) and isinstance(getattr(cls, k, None), tuple) else v
             for k, v in given.items()}
    derived = derive(given) if derive else {}
    try:
        if presets is not None:
            key = given.get(preset_key, derived.get(preset_key, getattr(cls, preset_key)))
            key = canonical(key) if canonical else key
            return cls(**{**presets.get(key, {}), **derived, **given, preset_key: key})
        return cls(**{**derived, **given})
    except UserError:
        raise
    except ValueError as e:  # __post_init__ checks and unknown preset names
        parser.error(str(e))


def changes(cfg, base=None) -> dict:
    """{field: value} where cfg differs from the class defaults (or from `base`): what a preset and flags set."""
    base = base if base is not None else type(cfg)()
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(base, f.name)}
