"""Bad input gets one clear line on stderr and exit code 2, never a traceback (table-driven, real CLI).

Every case runs `python -m rlaux_fast.train` in its own process, a few at a time, so the table
checks what a user sees: the exit code, exactly one stderr line, and the words that name the problem.
"""
import importlib.util
import os
import pickle
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from rlaux_fast.config import Config

SMALL = ["--width", "0.125", "--batch-size", "50", "--subset", "100", "--epochs", "1", "--no-progress"]


def cifar100_files(root: Path, *, fine=None, coarse=None, data=None, n=100) -> Path:
    """CIFAR-100 python files in the real format: dicts of bytes keys, uint8 [N, 3072] data, label lists."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    fine = np.arange(n) % 100 if fine is None else fine
    coarse = fine // 5 if coarse is None else coarse
    data = np.zeros((n, 3072), np.uint8) if data is None else data
    for split in ("train", "test"):
        with open(base / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": list(map(int, fine)), b"coarse_labels": list(map(int, coarse))}, f, protocol=2)
    return root


class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def run_folder(root: Path, **config) -> Path:
    """A run folder as `train` leaves it (config.json), for the --resume cases."""
    root.mkdir(parents=True)
    small = dict(width=0.125, batch_size=50, subset=100, epochs=1, progress=False)  # SMALL's settings
    (root / "config.json").write_text(Config(**{**small, **config}).to_json())
    return root


# ---- the table: (case, set-up returning the flags, words the message must contain) ---------------------

def truncated(tmp: Path):
    root = cifar100_files(tmp)
    path = root / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:5000])
    return ["--dataset", "cifar100-20", "--data-dir", root]


def hierarchy_misfit(tmp: Path):
    fine = np.arange(100)
    coarse = fine // 5
    coarse[4] = 1  # super-class 0 keeps 4 fine classes, super-class 1 gets 6
    return ["--dataset", "cifar100-20", "--data-dir", cifar100_files(tmp, fine=fine, coarse=coarse)]


def dataset_pickle_runs_a_command(tmp: Path):
    base = tmp / "cifar-100-python"
    base.mkdir(parents=True)
    for split in ("train", "test"):
        with open(base / split, "wb") as f:
            pickle.dump({b"data": RunsACommand(tmp / "pwned")}, f, protocol=2)
    return ["--dataset", "cifar100-20", "--data-dir", tmp]


def checkpoint_runs_a_command(tmp: Path):
    root = run_folder(tmp / "run")
    torch.save({"format": 1, "epoch": 1, "trainer": RunsACommand(tmp / "pwned")}, root / "checkpoint.pt")
    return ["--resume", root]


def truncated_checkpoint(tmp: Path):
    root = run_folder(tmp / "run")
    torch.save({"format": 1, "w": torch.ones(1000)}, root / "checkpoint.pt")
    (root / "checkpoint.pt").write_bytes((root / "checkpoint.pt").read_bytes()[:1500])
    return ["--resume", root]


def unwritable_out(tmp: Path):
    (tmp / "a-file").write_text("")
    return ["--out", tmp / "a-file" / "run"]


CASES = [
    ("unknown flag", lambda t: ["--bogus"], "unrecognized arguments: --bogus"),
    ("unknown choice", lambda t: ["--method", "best"], "invalid choice: 'best'"),
    ("not a number", lambda t: ["--epochs", "two"], "invalid int value: 'two'"),
    ("out-of-range value", lambda t: ["--epochs", "0"], "--epochs must be at least 1"),
    ("conflicting flags", lambda t: ["--cuda-graphs"], "--cuda-graphs needs --compile"),
    ("value that overflows float32", lambda t: ["--aux-weight", "1e39"], "--aux-weight must be a finite number"),
    ("not-a-number value", lambda t: ["--focal-gamma", "nan"], "--focal-gamma must be a finite number"),
    ("wrong psi", lambda t: ["--dataset", "cifar10", "--psi", "0"], "--psi must be at least 1"),
    ("psi for a dataset with fine labels", lambda t: ["--psi", "3"], "mnist5k takes it from its fine labels: drop --psi"),
    ("human without fine labels", lambda t: ["--dataset", "cifar10", "--method", "human"], "needs fine labels"),
    ("cuda without a GPU", lambda t: ["--device", "cuda"], "no CUDA GPU is available"),
    ("unwritable --out", unwritable_out, "cannot write to run folder"),
    ("missing dataset files", lambda t: ["--dataset", "cifar100-20", "--data-dir", t], "not found"),
    ("truncated dataset pickle", truncated, "truncated or corrupt"),
    ("dataset of the wrong shape",
     lambda t: ["--dataset", "cifar100-20", "--data-dir", cifar100_files(t, data=np.zeros((100, 1024), np.uint8))],
     "expected uint8 [N, 3072]"),
    ("hierarchy that does not fit the labels", hierarchy_misfit, "super-class 0 holds 4 fine classes"),
    ("dataset pickle that runs a command", dataset_pickle_runs_a_command, "refusing to unpickle"),
    ("batch larger than the dataset", lambda t: ["--batch-size", "500"], "larger than the 100 training examples"),
    ("non-finite loss (huge lr)", lambda t: ["--method", "single", "--lr", "1e30", "--out", t / "run"],
     "non-finite loss at epoch 1, main phase, step"),
    ("--tensorboard without tensorboard", lambda t: ["--tensorboard", "--out", t / "run"], "needs the tensorboard package"),
    ("--resume of a missing folder", lambda t: ["--resume", t / "nope"], "no such run folder"),
    ("--resume of a folder that is no run", lambda t: ["--resume", t], "no config.json"),
    ("--resume with another method",
     lambda t: ["--resume", run_folder(t / "run", method="rlaux"), "--method", "single"],
     "made with --method rlaux, not --method single"),
    ("--resume with another psi", lambda t: ["--resume", run_folder(t / "run", dataset="cifar10", psi=5), "--psi", "3"],
     "made with --psi 5, not --psi 3"),
    ("--resume with another --out", lambda t: ["--resume", run_folder(t / "run"), "--out", t / "other"],
     "conflicts with --resume"),
    ("--resume before any checkpoint", lambda t: ["--resume", run_folder(t / "run")], "no checkpoint at"),
    ("--kernels triton without a GPU", lambda t: ["--kernels", "triton"], "--kernels triton needs triton and a CUDA device"),
    ("checkpoint that runs a command", checkpoint_runs_a_command, "refusing to load"),
    ("truncated checkpoint", truncated_checkpoint, "unreadable or truncated"),
]
# Environment changes of a case (the tests run the kernels in Triton's interpreter; this case must not).
ENV = {"--kernels triton without a GPU": {"TRITON_INTERPRET": "0"}}
SKIP = {
    "cuda without a GPU": torch.cuda.is_available(),
    "--kernels triton without a GPU": torch.cuda.is_available(),
    "--tensorboard without tensorboard": importlib.util.find_spec("tensorboard") is not None,
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Run the whole table once, four processes at a time (each pays the torch import)."""
    def one(case):
        name, setup, _ = case
        tmp = tmp_path_factory.mktemp("case")
        argv = [*SMALL, *map(str, setup(tmp))]
        proc = subprocess.run([sys.executable, "-m", "rlaux_fast.train", *argv], capture_output=True, text=True,
                              timeout=300, cwd=tmp, env={**os.environ, **ENV.get(name, {})})
        return name, (proc, tmp)

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, [c for c in CASES if not SKIP.get(c[0])]))


@pytest.mark.parametrize("name, expected", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_exit_code_2(outcomes, name, expected):
    if SKIP.get(name):
        pytest.skip("not a bad input on this machine")
    proc, tmp = outcomes[name]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert proc.returncode == 2
    assert not (tmp / "pwned").exists(), "a crafted pickle ran its command"


def test_non_finite_loss_before_any_checkpoint_says_there_is_none(outcomes):
    proc, tmp = outcomes["non-finite loss (huge lr)"]
    assert "none yet: no epoch had finished" in proc.stderr
    assert not (tmp / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("name", ["missing dataset files", "batch larger than the dataset", "hierarchy that does not fit the labels"])
def test_a_run_refused_for_its_data_or_settings_leaves_no_run_folder(outcomes, name):
    proc, tmp = outcomes[name]
    assert proc.returncode == 2
    assert not list((tmp / "runs").glob("*")), "an empty run folder was left behind"
