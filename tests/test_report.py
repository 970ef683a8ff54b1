"""report: plots, report.md and the mutual information between the agent's labels and the fine labels."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from rlaux_fast.report import main, normalized_mutual_information, usage_summary, within_class_nmi
from rlaux_fast.train import log_scalars

FINE_TO_PRIMARY = [0, 0, 1, 1]
PSI = [2, 2]


def test_nmi_matches_scikit_learn_on_a_random_table():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    table = rng.integers(0, 20, size=(6, 4))
    table[2] = 0  # an empty row must not matter
    rows, cols = np.nonzero(table)
    fine = np.repeat(rows, table[rows, cols])
    aux = np.repeat(cols, table[rows, cols])
    expected = metrics.normalized_mutual_info_score(fine, aux)  # arithmetic normalisation, the default
    assert normalized_mutual_information(table.tolist()) == pytest.approx(expected, abs=1e-12)


def test_nmi_is_one_for_a_renaming_and_zero_for_independent_labels():
    assert normalized_mutual_information([[5, 0, 0], [0, 0, 7], [0, 3, 0]]) == pytest.approx(1.0)
    assert normalized_mutual_information([[2, 4], [3, 6]]) == pytest.approx(0.0, abs=1e-12)


def test_within_class_nmi_credits_only_what_the_agent_adds_inside_a_block():
    human = [[9, 0, 0, 0], [0, 9, 0, 0], [0, 0, 4, 0], [0, 0, 0, 6]]
    one_per_block = [[9, 0, 0, 0], [9, 0, 0, 0], [0, 0, 4, 0], [0, 0, 6, 0]]  # knows only the primary class
    assert within_class_nmi(human, FINE_TO_PRIMARY, PSI) == pytest.approx(1.0)
    assert within_class_nmi(one_per_block, FINE_TO_PRIMARY, PSI) == pytest.approx(0.0)
    s = usage_summary({"fine_by_aux": one_per_block, "psi": PSI, "fine_to_primary": FINE_TO_PRIMARY})
    assert s["nmi"] == pytest.approx(s["nmi_primary_only"]) and 0 < s["nmi"] < 1
    assert usage_summary({"fine_by_aux": [[3, 4, 5, 6]], "psi": PSI, "fine_to_primary": None})["nmi"] is None


def fake_run(tmp_path, method="rlaux-weights", epochs=3):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"dataset": "mnist5k", "method": method, "preset": "paper",
                                                 "width": 0.125, "batch_size": 50, "seed": 0, "epochs": epochs}))
    records = [{"epoch": e, "lr": 0.01, "train_primary_loss": 1 / e, "train_aux_loss": 2 / e, "test_acc": 0.5 + e / 10,
                "aux_label_entropy": 1.2, "reward": -1 / e, "ppo_approx_kl": 0.01, "ppo_clip_fraction": 0.1,
                "ppo_entropy": 1.0, "ppo_explained_variance": 0.2, "aux_weight_mean": 2.0, "images_per_s": 100.0}
               for e in range(1, epochs + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    usage = {"fine_by_aux": [[9, 1, 0, 0], [2, 8, 0, 0], [0, 0, 4, 1], [0, 0, 0, 6]], "psi": PSI,
             "fine_to_primary": FINE_TO_PRIMARY, "weight_bins": [0] * 10 + [30] + [6] * 10}
    (run / "usage.json").write_text(json.dumps(usage))
    (run / "summary.json").write_text(json.dumps({"final_test_acc": 0.8, "best_test_acc": 0.8, "epochs": epochs,
                                                  "wall_seconds": 12.0, "images_per_s": 100.0}))
    return run, usage


def test_report_writes_every_plot_and_the_nmi(tmp_path, capsys):
    run, usage = fake_run(tmp_path)
    assert main([str(run)]) == 0
    for name in ("curves.png", "agent.png", "usage.png", "weights.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md = (run / "report.md").read_text()
    nmi = normalized_mutual_information(usage["fine_by_aux"])
    within = within_class_nmi(usage["fine_by_aux"], usage["fine_to_primary"], usage["psi"])
    assert f"| the run's auxiliary labels vs fine labels | {nmi:.4g} |" in md
    assert f"| inside each primary class (what the auxiliary task adds) | {within:.4g} |" in md
    assert "**80.00%**" in md and "![usage.png](usage.png)" in md
    assert md.count("\n| ") >= 3 + 3  # the NMI table and one row per epoch
    assert f"within-class NMI vs fine labels {within:.3f}" in capsys.readouterr().out


def test_report_of_a_run_without_agent_or_fine_labels(tmp_path):
    run, _ = fake_run(tmp_path, method="single")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k in
                                                           ("epoch", "test_acc", "train_primary_loss", "train_aux_loss")}) + "\n"
                                               for r in lines))
    (run / "usage.json").write_text(json.dumps({"fine_by_aux": [[10, 0, 12, 0]], "weight_bins": None, "psi": PSI}))
    out = tmp_path / "elsewhere"
    assert main([str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "report.md"]  # no usage heatmap without an auxiliary task
    assert "trains no auxiliary task" in (out / "report.md").read_text()


@pytest.mark.parametrize("setup, words", [
    (lambda run: None, "not found"),
    (lambda run: (run.mkdir(), (run / "config.json").write_text("{}")), "metrics.jsonl not found"),
    (lambda run: (run.mkdir(), (run / "config.json").write_text("{}"), (run / "metrics.jsonl").write_text("")), "is empty"),
    (lambda run: (run.mkdir(), (run / "config.json").write_text("{"), (run / "metrics.jsonl").write_text("{}\n")), "unreadable"),
])
def test_report_of_a_bad_folder_is_one_line(tmp_path, capsys, setup, words):
    run = tmp_path / "run"
    setup(run)
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_report_tensorboard_without_the_package_is_a_clear_error(tmp_path):
    run, _ = fake_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "rlaux_fast.report", str(run), "--tensorboard"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --tensorboard needs the tensorboard package") and proc.stderr.count("\n") == 1


def test_tensorboard_gets_every_numeric_field_at_its_epoch():
    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, name, value, step):
            self.scalars.append((name, value, step))

        def flush(self):
            pass

    w = Writer()
    log_scalars(w, {"epoch": 3, "test_acc": 0.9, "reward": -0.5, "note": "text"})
    assert w.scalars == [("test_acc", 0.9, 3), ("reward", -0.5, 3)]
