"""Exact resume, safe checkpoint writes, refusal of foreign checkpoints, and interrupts."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlaux_fast import checkpoint
from rlaux_fast.errors import UserError
from rlaux_fast.train import TIMING_FIELDS, main

# The paper's two phases (a throw-away RL copy, then the main phase) with random reward batches, so every
# random state is used; the shared policy backbone only keeps the test fast.
TINY = ["--width", "0.125", "--batch-size", "50", "--subset", "100", "--no-progress", "--ppo-steps", "2",
        "--ppo-epochs", "1", "--ppo-minibatch", "50", "--reward-batch-size", "32", "--method", "rlaux-weights",
        "--policy-backbone", "shared"]


def cli(*args) -> int:
    return main([*TINY, *[str(a) for a in args]])


def without_timing(history):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in history]


def assert_same_state(a, b, path="state"):
    """Bitwise equality of nested checkpoint content (tensors, numbers, containers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def straight_and_resumed(tmp_path_factory):
    """The same run twice: 2 epochs at once, and 1 epoch, then --resume with --epochs 2."""
    root = tmp_path_factory.mktemp("resume")
    straight, resumed = root / "straight", root / "resumed"
    assert cli("--epochs", 2, "--out", straight) == 0
    assert cli("--epochs", 1, "--out", resumed) == 0
    one_epoch = checkpoint.load(resumed / checkpoint.CHECKPOINT)
    assert main(["--resume", str(resumed), "--epochs", "2"]) == 0
    return straight, resumed, one_epoch


def test_one_epoch_plus_resume_is_bitwise_two_epochs(straight_and_resumed):
    straight, resumed, _ = straight_and_resumed
    a = checkpoint.load(straight / checkpoint.CHECKPOINT)
    b = checkpoint.load(resumed / checkpoint.CHECKPOINT)
    assert a["epoch"] == b["epoch"] == 2
    # Model, optimizer, schedule, scaler, policy, agent Adam, generators and every global random state.
    assert_same_state(a["trainer"], b["trainer"], "trainer")
    assert_same_state(a["rng"], b["rng"], "rng")
    assert without_timing(a["history"]) == without_timing(b["history"])
    lines = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert without_timing(lines(straight)) == without_timing(lines(resumed)) == without_timing(a["history"])
    assert json.loads((straight / "usage.json").read_text()) == json.loads((resumed / "usage.json").read_text())
    assert json.loads((resumed / "config.json").read_text())["epochs"] == 2
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["final_test_acc"] == a["history"][-1]["test_acc"]
    # Sanity: the second epoch really trained (the check above is not comparing two untouched states).
    assert not torch.equal(a["trainer"]["model"]["primary_head.2.weight"],
                           straight_and_resumed[2]["trainer"]["model"]["primary_head.2.weight"])


def test_checkpoint_holds_every_random_state(straight_and_resumed):
    state = checkpoint.load(straight_and_resumed[0] / checkpoint.CHECKPOINT)
    assert {"python", "numpy", "torch"} <= state["rng"].keys()
    assert {"agent_generator", "reward_generator", "agent_optimizer", "policy", "scheduler", "scaler"} <= state["trainer"].keys()


@pytest.mark.parametrize("flags, named", [
    (["--method", "rlaux"], "--method rlaux-weights, not --method rlaux"),
    (["--aux-target", "hard"], "--aux-target soft, not --aux-target hard"),
    (["--dataset", "cifar10"], "--dataset mnist5k, not --dataset cifar10"),
    (["--preset", "fast"], "--preset paper"),
    (["--epochs", "1", "--lr", "0.1"], "--lr 0.01, not --lr 0.1"),
])
def test_resume_refuses_another_config_and_names_the_difference(straight_and_resumed, flags, named, capsys):
    run_dir = straight_and_resumed[0]
    before = (run_dir / checkpoint.CHECKPOINT).read_bytes()
    assert main(["--resume", str(run_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err
    assert (run_dir / checkpoint.CHECKPOINT).read_bytes() == before


def test_resume_refuses_fewer_epochs_and_a_second_run_in_the_same_folder(straight_and_resumed, capsys):
    run_dir = straight_and_resumed[0]
    assert main(["--resume", str(run_dir), "--epochs", "1"]) == 2
    assert "fewer than the 2 epochs" in capsys.readouterr().err
    assert cli("--epochs", 1, "--out", run_dir) == 2
    assert f"--resume {run_dir}" in capsys.readouterr().err


def test_resume_of_a_finished_run_trains_nothing(straight_and_resumed, capsys):
    run_dir = straight_and_resumed[0]
    before = (run_dir / checkpoint.CHECKPOINT).read_bytes()
    assert main(["--resume", str(run_dir)]) == 0
    assert "epoch 3" not in capsys.readouterr().out
    assert (run_dir / checkpoint.CHECKPOINT).read_bytes() == before


# ---- safe writes ---------------------------------------------------------------------------------------

def test_a_write_that_fails_halfway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / checkpoint.CHECKPOINT
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "epoch": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def save_half_then_die(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(OSError):
        checkpoint.atomic_save({"format": checkpoint.FORMAT, "epoch": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.CHECKPOINT]  # no temporary left


KILLED_WRITER = """
import sys, time, torch
from rlaux_fast import checkpoint
real_save = torch.save
def slow_save(obj, f):
    real_save(obj, f)
    f.truncate(f.tell() // 2)
    f.flush()
    print("half", flush=True)
    time.sleep(60)
torch.save = slow_save
checkpoint.atomic_save({"format": checkpoint.FORMAT, "epoch": 2, "w": torch.zeros(10000)}, sys.argv[1])
"""


def test_kill_9_in_the_middle_of_a_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / checkpoint.CHECKPOINT
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "epoch": 1, "w": torch.ones(10000)}, path)
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "half"  # the new file is half written, right now
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    temps = [p for p in tmp_path.iterdir() if p.name != checkpoint.CHECKPOINT]
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # the half-written file, beside the old one
    state = checkpoint.load(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(10000))
    assert checkpoint.remove_stale_temps(tmp_path) == temps and not temps[0].exists()


# ---- loading never runs code ---------------------------------------------------------------------------

class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_a_checkpoint_that_would_run_a_command_is_refused(tmp_path, capsys):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"method": "rlaux-weights"}))
    torch.save({"format": checkpoint.FORMAT, "epoch": 1, "trainer": RunsACommand(marker)}, run_dir / checkpoint.CHECKPOINT)
    with pytest.raises(UserError, match="refusing to load .*system.* plain data"):
        checkpoint.load(run_dir / checkpoint.CHECKPOINT)
    assert main(["--resume", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to load") and err.count("\n") == 1
    assert not marker.exists()


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / checkpoint.CHECKPOINT
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(UserError, match="unreadable or truncated"):
        checkpoint.load(path)


# ---- non-finite values keep the last good checkpoint ---------------------------------------------------

def test_a_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    assert main([*TINY, "--method", "single", "--epochs", "1", "--out", str(run_dir)]) == 0
    good = (run_dir / checkpoint.CHECKPOINT).read_bytes()
    from rlaux_fast.loop import Trainer

    real = Trainer.focal_loss

    def poisoned(self, *args):
        out = real(self, *args)
        return out._replace(loss=out.loss * float("nan"))

    monkeypatch.setattr(Trainer, "focal_loss", poisoned)
    capsys.readouterr()
    assert main(["--resume", str(run_dir), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "non-finite loss at epoch 2" in err and "step 1" in err
    assert f"{run_dir / checkpoint.CHECKPOINT}, epoch 1" in err
    assert (run_dir / checkpoint.CHECKPOINT).read_bytes() == good
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1


# ---- interrupts ----------------------------------------------------------------------------------------

def start_cli(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "rlaux_fast.train", *TINY, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(path: Path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigint_mid_epoch_keeps_the_checkpoint_and_prints_the_resume_command(tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = start_cli("--method", "single", "--epochs", 1000, "--out", run_dir)
    wait_for(run_dir / checkpoint.CHECKPOINT, proc)  # epoch 1 is saved; epoch 2 is about to run
    while not (run_dir / "metrics.jsonl").read_text():  # written right after the checkpoint
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.count("\n") == 1
    state = checkpoint.load(run_dir / checkpoint.CHECKPOINT)
    done = state["epoch"]
    # Mid-epoch, or (when the signal came during the checkpoint write, which defers it) right after it.
    assert f"interrupted by SIGINT during epoch {done + 1}:" in err or f"interrupted by SIGINT after epoch {done}:" in err
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == done
    command = err.split("resume with: ")[1].strip()
    assert command == f"python -m rlaux_fast.train --resume {run_dir}"
    # The printed command works (capped here at one more epoch).
    assert main([*shlex.split(command)[3:], "--epochs", str(done + 1)]) == 0
    assert checkpoint.load(run_dir / checkpoint.CHECKPOINT)["epoch"] == done + 1


def test_sigterm_before_the_first_checkpoint_exits_143(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_cli("--method", "single", "--epochs", 1000, "--out", run_dir)
    wait_for(run_dir / "config.json", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "interrupted by SIGTERM during epoch 1: no epoch had finished" in err
    assert not (run_dir / checkpoint.CHECKPOINT).exists()


def test_run_files_get_the_users_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        checkpoint.atomic_write_text(tmp_path / "summary.json", "{}")
        checkpoint.atomic_save({"w": torch.ones(2)}, tmp_path / "checkpoint.pt")
    finally:
        os.umask(umask)
    for name in ("summary.json", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_a_run_folder_from_before_weight_init_resumes_as_it_started(tmp_path):
    """Run folders made before --weight-init started the weight head uniform, whatever their preset."""
    from rlaux_fast.train import read_run_config
    run_dir = tmp_path / "run"
    assert cli("--preset", "fast", "--epochs", "1", "--out", run_dir) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config.pop("weight_init") == "unit"
    (run_dir / "config.json").write_text(json.dumps(config))
    assert read_run_config(run_dir).weight_init == "uniform"
    assert main(["--resume", str(run_dir), "--epochs", "2", "--no-progress"]) == 0
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    # Other methods have no weight head: their old folders take the preset's value and still match it.
    config.update(method="single")
    (run_dir / "config.json").write_text(json.dumps(config))
    assert read_run_config(run_dir).weight_init == "unit"
