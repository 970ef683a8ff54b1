"""Checkpoints that survive interruption, load as data only, and carry every random state.

A write goes to a temporary file in the same folder, is fsynced, then renamed over the old
checkpoint: at every instant `checkpoint.pt` is either the previous complete file or the new
complete file, even if the process is killed with SIGKILL halfway through the write.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

CHECKPOINT = "checkpoint.pt"
FORMAT = 1  # bump when the layout of the saved dict changes
_TEMP_SUFFIX = ".tmp"


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=_TEMP_SUFFIX)
    try:
        # mkstemp makes the file private (0600); a run folder is as readable as any file the user makes.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_save(obj, path: Path) -> None:
    """torch.save so that `path` always holds a complete file: the old one until the new one is whole."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file (config, summary, metrics) with the same all-or-nothing guarantee."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete half-written temporary files left by a process killed during a write; returns them."""
    stale = [p for p in Path(folder).glob(f"*{_TEMP_SUFFIX}") if re.fullmatch(r".+\.\w{8}" + re.escape(_TEMP_SUFFIX), p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load(path: Path) -> dict:
    """Load a checkpoint as data only (weights_only): a crafted file cannot run code."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: the run has not finished an epoch yet, start it again without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it references {found.group(1)}" if found else "it holds objects other than tensors and plain containers"
        raise UserError(f"refusing to load {path}: {what}, and a checkpoint must be plain data (it may have been "
                        "tampered with; do not load it with weights_only=False)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is unreadable or truncated ({type(e).__name__}): restore it or start a new run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UserError(f"checkpoint {path} has format {found!r}, this version reads format {FORMAT}: start a new run")
    return state


# ---- random states -----------------------------------------------------------------------------------

def capture_rng() -> dict:
    """Every global random state: python, numpy, torch CPU and (when present) every CUDA device."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_as_python_state(state["python"]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) != torch.cuda.device_count():
            raise UserError(f"the checkpoint holds random states for {len(saved)} CUDA devices, this machine has "
                            f"{torch.cuda.device_count()}: resume on a machine like the one that wrote it")
        torch.cuda.set_rng_state_all(saved)


def _as_python_state(s):
    """random.setstate wants tuples; a round trip through some loaders gives lists."""
    version, internal, gauss = s
    return version, tuple(internal), gauss
