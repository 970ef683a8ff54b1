"""End to end from the CLI on the embedded digits, at a small width and on subsets."""
import json

import pytest

from rlaux_fast.config import parse_config
from rlaux_fast.data import Hierarchy
from rlaux_fast.train import main

SMALL = ["--width", "0.125", "--batch-size", "50", "--no-progress", "--ppo-steps", "4", "--ppo-epochs", "2"]


def run_cli(tmp_path, *args):
    out = tmp_path / "run"
    assert main([*SMALL, "--out", str(out), *args]) == 0
    return out


@pytest.mark.parametrize("method", ["single", "human", "random", "rlaux", "rlaux-weights"])
def test_every_method_runs_an_epoch_and_writes_its_files(tmp_path, method, capsys):
    out = run_cli(tmp_path, "--method", method, "--epochs", "1", "--subset", "400")
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["policy_backbone"] == "vgg16"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and 0 <= records[0]["test_acc"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["final_test_acc"] == records[0]["test_acc"]
    assert (out / "checkpoint.pt").exists()
    assert "epoch 1/1" in capsys.readouterr().out
    if method in ("rlaux", "rlaux-weights"):
        assert "reward" in records[0] and "ppo_approx_kl" in records[0]

    # Every chosen auxiliary class lies inside the block of the example's primary class.
    usage = json.loads((out / "usage.json").read_text())["fine_by_aux"]
    hierarchy, _ = Hierarchy.from_fine_to_primary([d // 2 for d in range(10)])
    for fine, row in enumerate(usage):
        start, size = int(hierarchy.block_start[fine // 2]), int(hierarchy.block_size[fine // 2])
        assert all(count == 0 for aux, count in enumerate(row) if not start <= aux < start + size)
        assert sum(row) > 0 or method == "single"


def test_fast_preset_runs_single_pass(tmp_path):
    out = run_cli(tmp_path, "--method", "rlaux-weights", "--preset", "fast", "--epochs", "1", "--subset", "400")
    config = json.loads((out / "config.json").read_text())
    assert (config["policy_backbone"], config["reward_batch"], config["single_pass"]) == ("shared", "next", True)
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["rl_seconds"] < 1e-3 and "reward" in record


def test_rlaux_weights_learns_the_digits(tmp_path):
    """Chance is 20% (5 super-classes). The fast preset's agent starts its auxiliary weights around 1
    (--weight-init unit). This exact run (seeded, so deterministic on one platform) measured 55.5, 92.9,
    86.3, 91.1, 73.0% over its 5 epochs: at this size accuracy can drop 20 points in an epoch.
    The threshold of 50% is far above chance and leaves 23 points of margin for other platforms."""
    out = run_cli(tmp_path, "--method", "rlaux-weights", "--preset", "fast", "--epochs", "5", "--width", "0.25",
                  "--batch-size", "100")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_acc"] > 0.5


@pytest.mark.parametrize("preset, flags, expected", [
    ("paper", [], ("vgg16", "random", False, "uniform")),
    ("fast", [], ("shared", "next", True, "unit")),
    ("fast", ["--policy-backbone", "vgg16"], ("vgg16", "next", True, "unit")),
    ("fast", ["--no-single-pass", "--reward-batch", "random"], ("shared", "random", False, "unit")),
    ("fast", ["--weight-init", "uniform"], ("shared", "next", True, "uniform")),
    ("paper", ["--single-pass", "--weight-init", "unit"], ("vgg16", "random", True, "unit")),
])
def test_explicit_flags_override_the_preset(preset, flags, expected):
    cfg = parse_config(["--preset", preset, *flags])
    assert (cfg.policy_backbone, cfg.reward_batch, cfg.single_pass, cfg.weight_init) == expected
