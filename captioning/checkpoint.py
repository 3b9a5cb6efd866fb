"""Checkpoints: written atomically (temp file, fsync, rename), read back with weights_only=True.

The temp file of a save to `dir/last.pt` is `dir/.last.pt.<pid>.<random>.tmp`: unique to its writer, and named after
the process that writes it, so that a later save can tell a temp file whose writer was killed mid-save (SIGKILL,
power loss) from one still being written, and delete it.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from captioning.files import is_full_disk


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` so that `path` always holds either the previous complete file or the new complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a checkpoint is an ordinary readable file
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if is_full_disk(e):
            raise CheckpointError(f"no space left on the device while writing {path}; the previous checkpoint "
                                  "there is intact. Free some disk space or set train.out_dir elsewhere.") from e
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    remove_stale_temps(path)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete the temp files that killed writers of checkpoint `path` left behind -> the files deleted.
    A temp file whose writer is still running is left alone."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not (pid.isdigit() and _running(int(pid))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def check_finite(weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse weights holding NaN or infinity (a run that diverged before it was saved), by name."""
    diverged = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if diverged:
        raise CheckpointError(f"{path}: {len(diverged)} of its weights hold NaN or infinity (first {diverged[0]}), so "
                              "the model computes noise; use an earlier checkpoint of the run, or retrain")


def load_failure(e: Exception) -> str:
    """Why torch.load could not read a file, in one line. Only the reason: torch's messages go on with advice such as
    passing weights_only=False, which would run any code the file holds."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError):
        match = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.DOTALL)
        text = match.group(1) if match else text
    return " ".join(text.split(". ")[0].split()) or type(e).__name__


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling code; a truncated, corrupt or code-carrying file is refused clearly."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; name a checkpoint in it, e.g. {path / 'best.pt'}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    with open(path, "rb") as f:
        head = f.read(2)
        if head and head not in (b"PK", b"\x80\x02"):  # torch.save's zip archive; its older pickle format
            raise CheckpointError(f"{path} is not a PyTorch checkpoint, or is corrupt from its first bytes; name one "
                                  "that scripts/train.py wrote, such as RUN/last.pt or RUN/best.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types on damaged files: RuntimeError, EOFError, UnpicklingError, ...
        reason = load_failure(e)
        if "Unsupported global" in reason:
            raise CheckpointError(f"{path} needs pickle to load arbitrary Python objects, which could run code; it "
                                  f"was not written by this toolkit. Re-save it as a plain state_dict. ({reason})"
                                  ) from None
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read ({reason}). "
                              "Use the other checkpoint of the run (last.pt / best.pt) or retrain.") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a captioning checkpoint (no 'model' entry)")
    return state
