"""Data parallelism under torchrun on CPU (gloo, 2 processes, a small width): the same result as one
process, ranks that stay identical, output from rank 0 only, resume, and a failing rank that ends the job.

Each torchrun start costs several seconds (two fresh Pythons importing torch), so the multi-process
checks share a few launches: tests/ddp_worker.py runs scenarios and saves each rank's state.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlaux_fast import checkpoint, distributed
from rlaux_fast.errors import UserError

WORKER = Path(__file__).with_name("ddp_worker.py")
TIMEOUT = 240  # seconds for one launch on a slow, shared 2-core machine; a hang fails the test instead


def torchrun(*args, cwd: Path, nproc: int = 2) -> tuple[int, str]:
    """`torchrun --standalone --nproc_per_node=N ARGS` (a free port each time); (exit code, output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *[str(a) for a in args]]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the workers it started
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT} s:\n{out[-3000:]}")
    return proc.returncode, out


def load_worker():
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- one process: the helpers change nothing --------------------------------------------------------

def test_one_process_helpers_are_no_ops():
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    a, b = torch.arange(3.0), torch.ones(2, dtype=torch.long)
    assert all(x is y for x, y in zip(distributed.all_reduce_many(a, b, mean=True), (a, b)))
    assert distributed.all_reduce_mean(a) is a and torch.equal(a, torch.arange(3.0))
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model) is model and distributed.unwrap(model) is model
    assert distributed.rank_seed(7) == 7 and distributed.local_batch_size(100) == 100
    assert distributed.all_gather_object("x") == ["x"]


def test_the_global_batch_must_split_over_the_processes(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    assert distributed.local_batch_size(99) == 33
    with pytest.raises(UserError, match="--batch-size 100 does not split over 3 processes"):
        distributed.local_batch_size(100)


# ---- two processes ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One launch of the worker: `single` steps and an `rlaux-weights` epoch on each of 2 ranks."""
    out = tmp_path_factory.mktemp("ddp")
    code, log = torchrun(WORKER, out, "single", "rlaux-weights", cwd=out)
    assert code == 0, log[-3000:]
    return out


def test_single_on_two_ranks_matches_one_rank_with_the_global_batch(two_ranks, tmp_path):
    """2 ranks x 50 images and 1 rank x 100 images: the same parameters after 3 SGD steps (BatchNorm
    with fixed statistics; see `single` in ddp_worker.py), and the sharded test accuracy equals the
    accuracy of the same weights evaluated by one process."""
    ranks = [torch.load(two_ranks / f"single-rank{r}-of2.pt") for r in range(2)]
    one = load_worker().single()  # this process: world size 1, batch 100
    moved = max((one["model"][k].float() - one["start"][k].float()).abs().max().item() for k in one["start"])
    assert moved > 1e-3  # the steps really changed the network
    for name, value in one["model"].items():
        assert torch.equal(ranks[0]["model"][name], ranks[1]["model"][name]), f"{name} differs between ranks"
        torch.testing.assert_close(ranks[0]["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    for r in ranks:
        assert r["sharded_acc"] == r["whole_acc"]


def test_rlaux_weights_epoch_leaves_ranks_identical(two_ranks):
    """After an RL phase (throw-away copy, PPO) and a main phase, both ranks hold the same agent and the
    same primary network (parameters and BatchNorm statistics) and the same epoch record."""
    ranks = [torch.load(two_ranks / f"rlaux-weights-rank{r}-of2.pt", weights_only=False) for r in range(2)]
    for part in ("model", "policy"):
        for name, value in ranks[0][part].items():
            assert torch.equal(value, ranks[1][part][name]), f"{part}.{name} differs between ranks"
    adam = [r["agent_optimizer"]["state"] for r in ranks]
    assert adam[0].keys() == adam[1].keys() and adam[0]
    for i in adam[0]:
        assert torch.equal(adam[0][i]["exp_avg"], adam[1][i]["exp_avg"])
    timing = ("rl_seconds", "main_seconds", "epoch_seconds", "images_per_s", "compile_seconds")
    records = [{k: v for k, v in r["record"].items() if k not in timing} for r in ranks]
    assert records[0] == records[1] and "reward" in records[0] and "ppo_approx_kl" in records[0]


def test_cli_under_torchrun_writes_from_rank_0_and_resumes(tmp_path):
    run = tmp_path / "run"
    args = ["-m", "rlaux_fast.train", "--width", "0.125", "--subset", "200", "--batch-size", "50", "--no-progress",
            "--method", "rlaux-weights", "--policy-backbone", "shared", "--ppo-steps", "2", "--ppo-epochs", "1",
            "--ppo-minibatch", "50", "--reward-batch-size", "32"]
    code, log = torchrun(*args, "--epochs", "1", "--out", run, cwd=tmp_path)
    assert code == 0, log[-3000:]
    assert log.count("epoch 1/1") == 1 and log.count("run folder") == 1  # rank 0 prints, rank 1 is silent
    state = checkpoint.load(run / checkpoint.CHECKPOINT)
    streams = state["trainer"]["process_generators"]  # each rank's own sampling noise, for exact resume
    assert len(streams) == 2 and not torch.equal(streams[0][0], streams[1][0])

    code, log = torchrun("-m", "rlaux_fast.train", "--resume", run, "--epochs", "2", cwd=tmp_path)
    assert code == 0, log[-3000:]
    assert log.count("resuming after epoch 1") == 1 and log.count("epoch 2/2") == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert checkpoint.load(run / checkpoint.CHECKPOINT)["epoch"] == 2
    assert not list(run.glob("*.tmp"))


def test_a_rank_that_raises_ends_the_job_with_its_error(tmp_path):
    """Rank 1 raises in its second step while rank 0 waits for it in DDP's all-reduce: the job exits
    non-zero, shows the error (and torchrun's summary names rank 1), and nothing hangs."""
    code, log = torchrun(WORKER, tmp_path, "fail", cwd=tmp_path)
    assert code != 0
    assert "[rank 1] RuntimeError: injected failure on rank 1" in log
    assert "Root Cause" in log and "injected failure on rank 1" in log.split("Root Cause")[1]
    assert not (tmp_path / "failing-run" / "checkpoint.pt").exists()
