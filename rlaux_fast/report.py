"""`python -m rlaux_fast.report RUN_DIR`: plots and a report.md of what a run did and what the agent learned.

Reads only the run folder's JSON files (config.json, metrics.jsonl, usage.json, summary.json) and writes:
    curves.png   test accuracy and training losses per epoch
    agent.png    mean reward and the PPO diagnostics per epoch (runs with an agent)
    usage.png    the last epoch's auxiliary-label usage: fine class x chosen auxiliary class
    weights.png  histogram of the chosen loss-weight bins (rlaux-weights)
    report.md    the numbers, the figures, and the normalised mutual information (NMI) between the
                 agent's auxiliary labels and the human fine labels
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

from .errors import UserError

WEIGHT_BINS = 21  # as in rlaux_fast.agent; repeated here so that the report needs no torch
AGENT_FIELDS = ("reward", "ppo_policy_loss", "ppo_value_loss", "ppo_entropy", "ppo_approx_kl", "ppo_clip_fraction",
                "ppo_explained_variance", "aux_label_entropy", "aux_weight_mean")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input
        raise UserError(f"{message} (see --help)")


# ---- reading a run -------------------------------------------------------------------------------------

def read_json(path: Path, required: bool = True):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise UserError(f"{path} not found: is {path.parent} a run folder written by rlaux_fast.train?") from None
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}): the run folder is damaged") from None


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{path} not found: is {run_dir} a run folder written by rlaux_fast.train?")
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError:
        raise UserError(f"{path} holds a line that is not JSON: the run folder is damaged") from None
    if not records:
        raise UserError(f"{path} is empty: the run has not finished an epoch yet")
    return records


# ---- mutual information --------------------------------------------------------------------------------

def _entropy(counts: list[float]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c > 0) if total > 0 else 0.0


def normalized_mutual_information(joint: list[list[float]]) -> float:
    """NMI of two labelings from their contingency table: I(X;Y) / ((H(X) + H(Y)) / 2).

    The arithmetic-mean normalisation (scikit-learn's default): 1 when either labeling determines the
    other, 0 when they are independent. Two constant labelings count as identical (1)."""
    rows = [sum(r) for r in joint]
    cols = [sum(c) for c in zip(*joint)]
    total = sum(rows)
    if total <= 0:
        raise ValueError("an empty contingency table has no mutual information")
    h_x, h_y = _entropy(rows), _entropy(cols)
    mi = sum(n / total * math.log(n * total / (rows[i] * cols[j]))
             for i, r in enumerate(joint) for j, n in enumerate(r) if n > 0)
    if h_x + h_y == 0:
        return 1.0
    return max(0.0, min(1.0, mi / ((h_x + h_y) / 2)))


def block_bounds(psi: list[int]) -> list[tuple[int, int]]:
    starts = [sum(psi[:c]) for c in range(len(psi))]
    return [(s, s + p) for s, p in zip(starts, psi)]


def within_class_nmi(fine_by_aux: list[list[int]], fine_to_primary: list[int], psi: list[int]) -> float | None:
    """NMI inside each primary class (its fine classes x its block of auxiliary classes), averaged with
    weights = the class's share of examples. Any labeling that respects the blocks already shares the
    primary class with the fine labels; this number only credits what the agent adds inside a class."""
    total, acc = 0, 0.0
    for c, (lo, hi) in enumerate(block_bounds(psi)):
        sub = [row[lo:hi] for f, row in enumerate(fine_by_aux) if f < len(fine_to_primary) and fine_to_primary[f] == c]
        n = sum(map(sum, sub))
        if n == 0:
            continue
        # A class with one fine class (or one aux class) has nothing to split: NMI is 1 only if both are constant.
        acc += n * normalized_mutual_information(sub)
        total += n
    return acc / total if total else None


def usage_summary(usage: dict | None) -> dict:
    """The NMI numbers of report.md (None where the run has no fine labels or no usage)."""
    out = {"nmi": None, "nmi_within_class": None, "nmi_primary_only": None}
    if not usage or len(usage.get("fine_by_aux", [])) < 2:
        return out
    matrix = usage["fine_by_aux"]
    if sum(map(sum, matrix)) == 0:
        return out
    out["nmi"] = normalized_mutual_information(matrix)
    f2p, psi = usage.get("fine_to_primary"), usage.get("psi")
    if f2p and psi:
        out["nmi_within_class"] = within_class_nmi(matrix, f2p, psi)
        # The same table with every auxiliary class merged into its block: a labeling that knows only the primary class.
        merged = [[sum(row[lo:hi]) for lo, hi in block_bounds(psi)] for row in matrix]
        out["nmi_primary_only"] = normalized_mutual_information(merged)
    return out


# ---- plots ---------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: list[dict], path: Path) -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 4))
    acc.plot(epochs, [100 * r["test_acc"] for r in records], marker="o")
    acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Primary task")
    loss.plot(epochs, [r["train_primary_loss"] for r in records], marker="o", label="primary (focal)")
    loss.plot(epochs, [r["train_aux_loss"] for r in records], marker="o", label="auxiliary (weighted focal)")
    loss.set(xlabel="epoch", ylabel="training loss per example", title="Losses of the main phase")
    loss.legend()
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_agent(records: list[dict], path: Path) -> bool:
    present = [f for f in AGENT_FIELDS if any(f in r for r in records)]
    if "reward" not in present:
        return False
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    cols = 3
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, present):
        points = [(r["epoch"], r[name]) for r in records if name in r]
        ax.plot(*zip(*points), marker="o")
        ax.set(xlabel="epoch", title=name.replace("ppo_", "PPO ").replace("_", " "))
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_usage(usage: dict, path: Path) -> None:
    plt = _pyplot()
    matrix = usage["fine_by_aux"]
    share = [[n / max(1, sum(row)) for n in row] for row in matrix]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(matrix[0]) + 2), max(4, 0.3 * len(matrix) + 1.5)))
    image = ax.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of the fine class's examples")
    for lo, _ in block_bounds(usage.get("psi") or [])[1:]:
        ax.axvline(lo - 0.5, color="white", linewidth=0.8)
    if len(matrix) <= 20 and len(matrix[0]) <= 20:
        ax.set_xticks(range(len(matrix[0])))
        ax.set_yticks(range(len(matrix)))
        for i, row in enumerate(matrix):
            for j, n in enumerate(row):
                if n:
                    ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color="white" if share[i][j] < 0.6 else "black")
    ylabel = "fine class (human label)" if len(matrix) > 1 else "all examples (no fine labels)"
    ax.set(xlabel="chosen auxiliary class (white lines: primary-class blocks)", ylabel=ylabel,
           title="Auxiliary-label usage, last epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def weight_factor(b: int) -> float:
    return 2 ** (8 * b / (WEIGHT_BINS - 1) - 3)


def plot_weights(bins: list[int], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(bins)), bins)
    ax.set_xticks(range(len(bins)))
    ax.set_xticklabels([f"{weight_factor(b):.3g}" for b in range(len(bins))], rotation=60, fontsize=8)
    ax.set(xlabel="auxiliary loss weight (bin's factor 2^(8b/20-3))", ylabel="examples", title="Chosen weights, last epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the report ----------------------------------------------------------------------------------------

def _fmt(x, pct=False):
    if x is None:
        return "–"
    return f"{100 * x:.2f}%" if pct else f"{x:.4g}"


def write_markdown(run_dir: Path, out: Path, config: dict, records: list[dict], summary: dict | None,
                   nmi: dict, figures: list[str]) -> Path:
    last = records[-1]
    lines = [f"# Run report: {run_dir.name}", "",
             f"`{config.get('dataset')}`, method `{config.get('method')}`, preset `{config.get('preset')}`, "
             f"width {config.get('width')}, batch {config.get('batch_size')}, seed {config.get('seed')}; "
             f"{len(records)} of {config.get('epochs')} epochs done.", ""]
    if summary:
        lines += [f"- Final test accuracy: **{_fmt(summary['final_test_acc'], True)}** "
                  f"(best {_fmt(summary['best_test_acc'], True)}, reported only: the test set picks nothing)",
                  f"- Wall time {summary['wall_seconds']:.1f} s, {summary['images_per_s']:.0f} images/s", ""]
    else:
        lines += [f"- Test accuracy after epoch {last['epoch']}: **{_fmt(last['test_acc'], True)}** (the run is not finished)", ""]
    lines += ["## Auxiliary labels vs the human fine labels", ""]
    if config.get("method") == "single":
        lines += ["`single` trains no auxiliary task, so there is nothing to compare with.", ""]
    elif nmi["nmi"] is None:
        lines += ["This run has no fine labels (or no auxiliary usage), so there is nothing to compare with.", ""]
    else:
        lines += [
            "Normalised mutual information, I(fine; aux) / mean(H(fine), H(aux)), over the training examples of the "
            "last epoch's main phase. An auxiliary class always lies in its example's primary-class block, so the "
            "plain NMI already credits knowing the primary class (the baseline row). The within-class NMI is the "
            "measure of what the auxiliary task adds: 1 inside every block means the human task up to renaming, "
            "0 means unrelated to the fine classes.", "",
            "| measure | NMI |", "|---|---|",
            f"| inside each primary class (what the auxiliary task adds) | {_fmt(nmi['nmi_within_class'])} |",
            f"| the run's auxiliary labels vs fine labels | {_fmt(nmi['nmi'])} |",
            f"| baseline: a labeling that knows only the primary class | {_fmt(nmi['nmi_primary_only'])} |", ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{name}]({name})" for name in figures] + [""]
    fields = [f for f in ("test_acc", "train_primary_loss", "train_aux_loss", "reward", "aux_label_entropy",
                          "aux_weight_mean", "images_per_s") if any(f in r for r in records)]
    lines += ["## Per epoch", "", "| epoch | " + " | ".join(fields) + " |", "|---" * (len(fields) + 1) + "|"]
    for r in records:
        lines.append(f"| {r['epoch']} | " + " | ".join(_fmt(r.get(f), f == "test_acc") for f in fields) + " |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_report(run_dir: Path, out: Path | None = None, tensorboard: bool = False) -> dict:
    """Write the plots and report.md of `run_dir` (into `out`, default the run folder); returns the NMI numbers."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} not found")
    out = Path(out) if out else run_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {out} ({e.strerror}): pass a writable --out") from None
    config = read_json(run_dir / "config.json")
    records = read_metrics(run_dir)
    # single trains no auxiliary task: its usage (every label the block's first class) means nothing.
    usage = read_json(run_dir / "usage.json", required=False) if config.get("method") != "single" else None
    summary = read_json(run_dir / "summary.json", required=False)
    if summary and summary.get("epochs") != len(records):
        summary = None  # a summary from before a resume that has not finished yet
    if tensorboard:
        from .train import TENSORBOARD_MISSING, log_scalars, open_tensorboard

        if importlib.util.find_spec("tensorboard") is None:  # before torch's 2-3 s import
            raise UserError(TENSORBOARD_MISSING)
        writer = open_tensorboard(run_dir)
        for r in records:
            log_scalars(writer, r)
        writer.close()
    figures = ["curves.png"]
    plot_curves(records, out / "curves.png")
    if plot_agent(records, out / "agent.png"):
        figures.append("agent.png")
    if usage and usage.get("fine_by_aux"):
        plot_usage(usage, out / "usage.png")
        figures.append("usage.png")
    if usage and usage.get("weight_bins"):
        plot_weights(usage["weight_bins"], out / "weights.png")
        figures.append("weights.png")
    nmi = usage_summary(usage)
    write_markdown(run_dir, out, config, records, summary, nmi, figures)
    return {**nmi, "figures": figures}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m rlaux_fast.report",
                                     description="Plots and report.md for a run folder written by rlaux_fast.train.")
    parser.add_argument("run_dir", help="the run folder (its config.json, metrics.jsonl, usage.json)")
    parser.add_argument("--out", help="where to write the report [default: the run folder]")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write the per-epoch metrics as TensorBoard scalars into RUN_DIR/tensorboard")
    try:
        args = parser.parse_args(argv)
        result = make_report(Path(args.run_dir), args.out, args.tensorboard)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted by SIGINT", file=sys.stderr)
        return 130
    out = Path(args.out) if args.out else Path(args.run_dir)
    nmi = (f" | within-class NMI vs fine labels {result['nmi_within_class']:.3f}"
           if result["nmi_within_class"] is not None else "")
    print(f"report: {out / 'report.md'} with {', '.join(result['figures'])}{nmi}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
