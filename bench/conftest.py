"""Benchmark suite setup: `pytest bench/ --benchmark-only`.

- Collects bench_*.py files (the test functions inside are named test_*).
- Sizes: full size on CUDA, reduced on CPU so that the whole suite stays under 10 minutes on the
  2-core build machine (see `SIZES`).
- Each benchmark records images/s (or rows/s) in `extra_info`. Benchmarks that call `record(...)`
  also give their median seconds to the session, and the ratios between them (compiled vs eager,
  an RL-AUX epoch vs a single-task epoch) are computed at the end of the same run: printed in the
  terminal summary and written to $RLAUX_BENCH_RATIOS (default /tmp/rlaux-bench-ratios.json).
- Compilation and other warm-up runs are kept out of the timed rounds.
"""
from __future__ import annotations

import json
import os
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

from benchlib import CUDA, DEVICE, MEDIANS, SIZES

# A persistent inductor cache of its own: reruns of the suite reuse compiled graphs, and the
# tests' private caches are left alone.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "rlaux-bench-inductor"))

JPEG_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
JPEG_CACHE = Path(tempfile.gettempdir()) / "rlaux-bench-data"


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself, whatever their name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config):
    return [f"rlaux bench: device {DEVICE}, torch {torch.__version__}, threads {torch.get_num_threads()}",
            f"rlaux bench sizes: {SIZES.describe()}"]


# ---- ratios between the medians of one run (benchlib.record keeps them) -----------------------------

# (name, numerator, denominator, what it means)
RATIOS = [
    ("compiled / eager train step", "step:compiled", "step:eager", "time per step; < 1 is faster"),
    ("compiled+bf16 / eager train step", "step:compiled+bf16", "step:eager", "time per step"),
    ("rlaux-weights fast / single epoch", "epoch:rlaux-weights-fast", "epoch:single", "reduced width; the target (<= 1.2) is at full width: epoch_breakdown.py"),
    ("rlaux-weights paper / single epoch", "epoch:rlaux-weights-paper", "epoch:single", "reduced width; floor ~13.5 at full width: epoch_breakdown.py"),
]


def pytest_terminal_summary(terminalreporter):
    if not MEDIANS:
        return
    rows = []
    for name, num, den, note in RATIOS:
        if num in MEDIANS and den in MEDIANS:
            rows.append({"ratio": name, "value": MEDIANS[num] / MEDIANS[den], "note": note})
    terminalreporter.section("rlaux ratios (medians of this run)")
    for row in rows:
        terminalreporter.write_line(f"{row['ratio']:<40} {row['value']:7.3f}   {row['note']}")
    path = Path(os.environ.get("RLAUX_BENCH_RATIOS", Path(tempfile.gettempdir()) / "rlaux-bench-ratios.json"))
    payload = {"device": str(DEVICE), "torch": torch.__version__, "sizes": vars(SIZES), "medians_s": MEDIANS, "ratios": rows}
    try:
        path.write_text(json.dumps(payload, indent=2))
        terminalreporter.write_line(f"written to {path}")
    except OSError as e:
        terminalreporter.write_line(f"could not write {path}: {e}")


# ---- data -------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def digits():
    from rlaux_fast.data import load_dataset

    return load_dataset("mnist5k", psi=2, seed=0)


@pytest.fixture(scope="session")
def cifar_jpeg() -> Path:
    """The CIFAR-10 JPEG folder (cifar10/{train,test}/<primary>/<fine>/*.jpg), extracted once into a
    cache under the temp folder; skips when the archive is absent."""
    root = JPEG_CACHE / "cifar10"
    done = JPEG_CACHE / ".extracted"
    if not done.exists():
        if not JPEG_ARCHIVE.is_file():
            pytest.skip(f"the CIFAR-10 JPEG archive is absent ({JPEG_ARCHIVE}): see shared/data/README.md")
        JPEG_CACHE.mkdir(parents=True, exist_ok=True)
        with tarfile.open(JPEG_ARCHIVE) as tar:
            tar.extractall(JPEG_CACHE, filter="data")
        done.write_text("ok")
    return root
