"""Checkpoints: written atomically (temp file, fsync, rename), read back with weights_only=True."""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` so that `path` always holds either the previous complete file or the new complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a checkpoint is an ordinary readable file
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise CheckpointError(f"no space left on the device while writing {path}; the previous checkpoint "
                                  "there is intact. Free some disk space or set train.out_dir elsewhere.") from e
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling code; a truncated, corrupt or code-carrying file is refused clearly."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise CheckpointError(f"{path} is truncated or corrupt and cannot be read ({e}). "
                                  "Use the other checkpoint of the run (last.pt / best.pt) or retrain.") from None
        raise CheckpointError(f"{path} needs pickle to load arbitrary Python objects, which could run code; it was "
                              f"not written by this toolkit. Re-save it as a plain state_dict. ({e})") from None
    except Exception as e:  # torch raises many types on damaged files: RuntimeError, EOFError, KeyError, ...
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read ({type(e).__name__}: {e}). "
                              "Use the other checkpoint of the run (last.pt / best.pt) or retrain.") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a captioning checkpoint (no 'model' entry)")
    return state
