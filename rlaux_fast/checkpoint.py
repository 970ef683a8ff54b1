"""Checkpoints that survive interruption: write to a temporary file, fsync, then rename over the old one."""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

from .errors import UserError

CHECKPOINT = "checkpoint.pt"


def atomic_save(obj, path: Path) -> None:
    """Save so that `path` always holds a complete file: the old one until the new one is whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: Path) -> dict:
    """Load a checkpoint as data only (weights_only): a crafted file cannot run code."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: the run has not finished an epoch yet, start it again without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"refusing to load {path}: it is not a plain-data checkpoint ({first[:160]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"checkpoint {path} is unreadable or truncated ({type(e).__name__}): restore it or start a new run") from None
