"""Shared helpers: seeding, atomic writes, the CLIs' parser, help format,
shared flags and usage errors, device and folder checks, durations."""

from __future__ import annotations

import argparse
import difflib
import os
import random
import re
import secrets
import tempfile
import warnings
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

# ------------------------------------------------------------------ seeding/checkpoints


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global RNGs (for entry points, not library code)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_write_bytes(data: bytes, path: str | Path, durable: bool = True) -> None:
    """Write to a temp file in the same directory, fsync (when `durable`), then rename over
    `path`: a crash or a full disk never leaves part of a file under its name. `durable=False`
    skips the fsync, for files that can be made again (pictures).

    The temp file is created with mode 0o666, so the kernel applies the process umask and
    the result gets the same permissions as any other file the user creates (not
    `tempfile.mkstemp`'s 0o600, which colleagues on a shared server could not read).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class UsageError(ValueError):
    """An invalid command-line value; the message says which flag and why."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` for the CLIs: keeps the description's (module docstring's) line breaks and
    appends "(default: X)" only for a real value X; a None, False or empty default (a flag that is
    off, or a default that depends on the machine) is described in the help text itself."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if (
            action.default is None
            or action.default is False
            or action.default == ""
            or action.default == argparse.SUPPRESS
        ):
            return action.help
        if isinstance(action.default, list):
            shown = " ".join(map(str, action.default)).replace("%", "%%")  # argparse expands % in help
            return f"{action.help} (default: {shown})"
        return super()._get_help_string(action)


class CLIParser(argparse.ArgumentParser):
    """The CLIs' argument parser: a usage error is one line, `<prog>: error: <message>`, with
    "did you mean" for a mistyped flag (the closest flag of the parser, or of the sub-command
    given, by `difflib.get_close_matches`), instead of argparse's full usage text first. Exit 2."""

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # reported by the sub-command that was given, which knows its own flags
            self._chosen_subcommand(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            hints = [self._suggestion(word) for word in unknown[1].split() if word.startswith("-")]
            hints = [hint for hint in hints if hint]
            if hints:
                message += f" (did you mean {', '.join(hints)}?)"
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")

    def _chosen_subcommand(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None) in action.choices:
                return action.choices[getattr(parsed, action.dest)]
        return self

    def _suggestion(self, word: str) -> str | None:
        typed = word.split("=", 1)[0]
        known = sorted({o for action in self._actions for o in action.option_strings if o.startswith("--")})
        close = [c for c in difflib.get_close_matches(typed.replace("_", "-"), known, n=2, cutoff=0.6) if c != typed]
        return close[0] if close else None


def non_negative_int(text: str) -> int:
    """argparse `type` for a count that may be 0: ArgumentTypeError for anything else."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


# Flags that several CLIs share (train.py, predict.py, dataset.py, bench.py): each is defined
# once here, with one meaning, and handed out through a parent parser
# (`parents=[shared_flags(...)]`, as torchvision's references do) or added to a CLI's own
# parser or argument group (`add_shared_flag`). A CLI that needs another default calls
# `parser.set_defaults(dest=value)`; one that reads a flag for a narrower purpose passes
# its own help text or a note.
SHARED_FLAGS: dict[str, dict[str, Any]] = {
    "--data-dir": {
        "default": "./kaggle_3m",
        "help": "patient data: kaggle_3m-style sub-folders of TIFF slices and/or NIfTI files (see docs/inputs.md)",
    },
    "--cache-dir": {"default": "./cache", "help": "preprocessing cache"},
    "--no-cache": {"action": "store_true", "help": "preprocess in memory: neither read nor write --cache-dir"},
    "--num-workers": {
        "type": non_negative_int,
        "default": 4,
        "help": "preprocessing threads (and training's loader workers)",
    },
    "--device": {"default": None, "help": "default: cuda:0 when CUDA is available, else cpu"},
    "--image-size": {
        "type": int,
        "default": 256,
        "help": "preprocessed slice size in pixels (square), divisible by 16",
    },
    "--no-lcc": {
        "action": "store_true",
        "help": "keep every connected component of the thresholded masks: post-processing none",
    },
}


def add_shared_flag(
    container: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    help: str | None = None,
    note: str | None = None,
) -> argparse.Action:
    """Add the SHARED_FLAGS definition of `flag` to a parser or an argument group (where a
    CLI lists its own flags). `help` replaces the shared help text; `note` is appended to it
    after "; " (what the flag applies to in this CLI). Raises KeyError for a flag that is
    not shared."""
    options = dict(SHARED_FLAGS[flag])
    options["help"] = help or options["help"]
    if note:
        options["help"] += f"; {note}"
    return container.add_argument(flag, **options)


MISSING = object()  # RunFlags.add: no `absent` value given


class RunFlags:
    """train.py's flags in two help groups: those that define a run (a resumed run may not
    change them: the resume contract) and those that say how to run. Each part of the
    pipeline declares its own flags through `add` (e.g. `augmentations.add_augmentation_flags`);
    `defaults` collects the run-defining ones (flag name -> what a checkpoint that does not
    record the flag was trained with), and the parser keeps it as `parser.run_defining`."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.defining = parser.add_argument_group("flags that define the run (--resume refuses a change)")
        self.how = parser.add_argument_group("flags that say how to run (may change on --resume)")
        self.defaults: dict[str, Any] = {}
        parser.run_defining = self.defaults

    def add(self, flag: str, defines_run: bool = False, absent: Any = MISSING, **kwargs: Any) -> argparse.Action:
        """Add `flag` to its group. A flag of SHARED_FLAGS takes its shared definition
        (`kwargs` may then give only `help` or `note`, see `add_shared_flag`). `absent`: for a
        run-defining flag added to an existing pipeline, the value that checkpoints written
        before it existed were trained with, when that is not its default (a new augmentation
        with a non-zero default strength: absent=0), so that resuming them stays honest."""
        group = self.defining if defines_run else self.how
        action = add_shared_flag(group, flag, **kwargs) if flag in SHARED_FLAGS else group.add_argument(flag, **kwargs)
        if defines_run:
            self.defaults[action.dest] = action.default if absent is MISSING else absent
        return action


def shared_flags(*flags: str, **help_overrides: str) -> argparse.ArgumentParser:
    """A parent parser (`argparse.ArgumentParser(parents=[...])`, as torchvision's references
    do) holding the named SHARED_FLAGS in one help group, e.g. `shared_flags("--data-dir",
    "--device")`. `help_overrides` replace a flag's help text (keyword: the flag's dest, e.g.
    data_dir=...) where one CLI reads it differently. Raises KeyError for a flag that is not
    shared."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("data, cache and device")
    for flag in flags:
        add_shared_flag(group, flag, help_overrides.get(flag[2:].replace("-", "_")))
    return parent


def one_line_warnings() -> None:
    """For the CLIs' main(): print each warning as one `warning: <message>` line, without
    the source file and code line Python adds by default (library code never calls this)."""
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {message}\n"


DEVICE_NAMES = "cpu, cuda or cuda:N (N: the GPU's index), or mps on Apple silicon"


def resolve_device(name: str | None, flag: str = "--device") -> torch.device:
    """`None` -> cuda:0 when available, else cpu. Raises UsageError (naming `flag`, the CLI
    flag or API argument that gave `name`) for a name torch does not know or a device type
    this project does not run on (saying which names are accepted), and for a CUDA or MPS
    device this machine does not have."""
    if name is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"{flag} {name}: not a device name; expected {DEVICE_NAMES}") from error
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{flag} {name}: {device.type} devices are not supported; expected {DEVICE_NAMES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {name}: CUDA is not available on this machine (use {flag} cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {name}: MPS (Apple silicon) is not available on this machine (use {flag} cpu)")
    return device


def _check_files_can_be_written(folder: Path, flag: str, path: Path) -> None:
    """Create and delete a temp file in the existing `folder`; UsageError naming `flag` and
    `path` (the folder asked for, `folder` or below it) when that fails."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path}: folder is not writable ({error.strerror or error})") from error


def check_writable_dir(path: str | Path, flag: str) -> Path:
    """Check, without creating anything, that `ensure_writable_dir(path, flag)` would succeed:
    `path` is a writable folder, or the nearest existing folder above it is writable. Lets a
    command refuse bad input before it has made any folder (a refused command leaves none
    behind). Raises UsageError naming `flag` and the path otherwise."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(
            f"{flag} {path}: is a file, not a folder"
            if existing == path
            else f"{flag} {path}: cannot create the folder ({existing} is a file)"
        )
    _check_files_can_be_written(existing, flag, path)
    return path


def ensure_writable_dir(path: str | Path, flag: str) -> Path:
    """Create `path` (and its parents) if needed and check that files can be written in it.

    Called before any preprocessing or training, so an unusable folder is reported at once.
    Raises UsageError naming `flag` and the path when `path` (or a parent) is a file, when
    the folder cannot be created, or when it is not writable (read-only mount, permissions).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot create the folder ({error.strerror or error})") from error
    _check_files_can_be_written(path, flag, path)
    return path


def format_duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `1 h 02 min`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
