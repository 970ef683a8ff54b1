"""compare: every method x seed into its own folder, finished runs skipped, results.md and a plot."""
import json

import pytest

from rlaux_fast import checkpoint, report
from rlaux_fast.compare import main, mean_std, pct

SMALL = ["--width", "0.125", "--batch-size", "50", "--subset", "100", "--no-progress"]


def test_mean_and_sample_std():
    mean, std = mean_std([0.9, 0.8, 0.7])
    assert mean == pytest.approx(0.8) and std == pytest.approx(0.1)
    assert mean_std([0.5]) == (0.5, None)
    assert pct(0.8, 0.1) == "80.00 ± 10.00" and pct(0.5, None) == "50.00"


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    argv = ["--methods", "single,human", "--seeds", "2", "--epochs", "1", "--out", str(out), *SMALL]
    assert main(argv) == 0
    return out, argv


def test_every_combination_runs_into_its_folder_and_the_table_has_every_method(compared):
    out, argv = compared
    for name in ("single-seed0", "single-seed1", "human-seed0", "human-seed1"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["epochs"] == 1
        assert json.loads((out / name / "config.json").read_text())["seed"] == int(name[-1])
    md = (out / "results.md").read_text()
    assert "python -m rlaux_fast.compare " + " ".join(argv) in md
    machine = json.loads((out / "single-seed0" / "summary.json").read_text())["machine"]
    assert machine.startswith("CPU, ") and "torch thread" in machine  # what trained it, not what tabulated
    assert f"the runs were trained on: {machine}" in md and "single pass False, weight init uniform" in md
    rows = [line for line in md.splitlines() if line.startswith("| single") or line.startswith("| human")]
    assert len(rows) == 2 and all("±" in row for row in rows)
    results = json.loads((out / "results.json").read_text())["results"]
    acc = results["human"]["final_test_acc"]
    assert len(acc) == 2 and f"| human | {pct(*mean_std(acc))} |" in md
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    # The run folders are ordinary runs: the report reads them.
    assert report.main([str(out / "human-seed0")]) == 0
    md = (out / "human-seed0" / "report.md").read_text()
    assert "| the run's auxiliary labels vs fine labels | 1 |" in md  # human: the fine labels themselves
    assert "| inside each primary class (what the auxiliary task adds) | 1 |" in md


def test_finished_runs_are_not_redone_and_unfinished_ones_resume(compared, capsys):
    out, argv = compared
    before = {d.name: (d / checkpoint.CHECKPOINT).read_bytes() for d in out.iterdir() if d.is_dir()}
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("already done") == 4 and "epoch 1/1" not in printed
    assert {d: (out / d / checkpoint.CHECKPOINT).read_bytes() for d in before} == before
    # More epochs: the finished epoch is kept and the run continues from its checkpoint.
    assert main(["--methods", "single", "--seeds", "1", "--epochs", "2", "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "resuming after epoch 1" in printed and "epoch 2/2" in printed and "epoch 1/2" not in printed
    assert checkpoint.load(out / "single-seed0" / checkpoint.CHECKPOINT)["epoch"] == 2
    # The table's steadier column: the mean over the run's last epochs (both of its two, here).
    curve = [r["test_acc"] for r in report.read_metrics(out / "single-seed0")]
    assert len(curve) == 2
    md = (out / "results.md").read_text()
    assert f"| single | {pct(curve[-1], None)} | {pct(sum(curve) / 2, None)} |" in md and "last 2 epochs" in md


@pytest.mark.parametrize("argv, words", [
    (["--epochs", "1", "--method", "single"], "--method is set by compare"),
    (["--epochs", "1", "--seed", "1"], "--seed is set by compare"),
    (["--epochs", "1", "--bogus"], "unrecognized arguments: --bogus"),
    (["--epochs", "1", "--methods", "single,best"], "unknown method best"),
    (["--epochs", "1", "--seeds", "0"], "--seeds must be at least 1"),
    (["--methods", "single"], "required: --epochs"),
    (["--epochs", "1", "--dataset", "cifar10", "--methods", "human"], "needs fine labels"),
])
def test_bad_compare_flags_are_one_line(argv, words, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err


def test_a_folder_made_with_other_flags_is_refused(compared, capsys):
    out, _ = compared
    assert main(["--methods", "single", "--seeds", "1", "--epochs", "1", "--out", str(out),
                 *SMALL, "--lr", "0.5"]) == 2
    assert "--lr 0.01, not --lr 0.5" in capsys.readouterr().err


def test_an_interrupted_comparison_says_how_to_continue(tmp_path, monkeypatch, capsys):
    import signal

    from rlaux_fast import compare
    from rlaux_fast.train import Interrupted

    def interrupted_run(cfg, log):
        raise Interrupted(signal.SIGTERM, "interrupted by SIGTERM during epoch 1: ...")

    monkeypatch.setattr(compare, "run", interrupted_run)
    argv = ["--methods", "single", "--seeds", "1", "--epochs", "1", "--out", str(tmp_path), *SMALL]
    assert main(argv) == 143
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted by SIGTERM in the single seed 0 run" in err
    assert err.strip().endswith("resume with: python -m rlaux_fast.compare " + " ".join(argv))
