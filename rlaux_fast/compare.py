"""`python -m rlaux_fast.compare`: run every method x seed, then tabulate and plot them.

    python -m rlaux_fast.compare --dataset mnist5k --methods single,human,random,rlaux,rlaux-weights \\
        --seeds 3 --epochs 10 [any other train flag, passed through]

Each combination trains in OUT/<method>-seed<k> (OUT defaults to runs/compare-<dataset>). A run that
has already finished its epochs is not redone, and an interrupted one resumes from its checkpoint, so
running the same command again after an interruption finishes the job. Writes OUT/results.md (mean ±
std of the final test accuracy and of each run's mean over its last 5 epochs, wall time and images/s
per method), OUT/results.json and OUT/accuracy.png (the mean test-accuracy curve of each method, with
a ±1 std band).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path

from .config import METHODS, PRESETS, Config, parse_config
from .errors import UserError
from .report import OneLineParser, read_json, read_metrics
from .train import SIGNAL_NAMES, Interrupted, StopOnSignal, check_resumable, explicit_flags, read_run_config, run

OWNED = ("method", "seed", "out", "resume")  # compare sets these per run
LAST_EPOCHS = 5  # results also give the mean test accuracy of each run's last epochs: short runs swing


def parse_args(argv: list[str]):
    parser = OneLineParser(prog="python -m rlaux_fast.compare", allow_abbrev=False,
                           description="Train every method x seed and write a results table; other flags go to train.")
    parser.add_argument("--dataset", default="mnist5k", help="dataset of every run [default: mnist5k]")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated methods [default: {','.join(METHODS)}]")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method [default: 3]")
    parser.add_argument("--epochs", type=int, required=True, help="epochs of every run")
    parser.add_argument("--out", help="folder of the runs and the results [default: runs/compare-<dataset>]")
    args, passthrough = parser.parse_known_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods: unknown method {', '.join(unknown) or '(none)'}: pick from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise UserError("--methods lists a method twice")
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    given = explicit_flags(passthrough)  # unknown train flags fail here, with train's message
    owned = [k for k in OWNED if k in given]
    if owned:
        raise UserError(f"--{owned[0]} is set by compare for each run: use --methods, --seeds and --out instead")
    return args, methods, passthrough


def plan_runs(args, methods: list[str], passthrough: list[str]) -> dict[tuple[str, int], Config]:
    """Every run's Config, checked before the first one starts (no error an hour in)."""
    out = Path(args.out) if args.out else Path("runs") / f"compare-{args.dataset}"
    configs = {}
    for method in methods:
        for seed in range(args.seeds):
            run_dir = out / f"{method}-seed{seed}"
            configs[method, seed] = parse_config([*passthrough, "--dataset", args.dataset, "--epochs", str(args.epochs),
                                                  "--method", method, "--seed", str(seed), "--out", str(run_dir)])
    return configs


def finished(cfg: Config) -> dict | None:
    """The summary of a run folder that already did cfg.epochs epochs with cfg's settings, else None.
    A folder made with other settings is refused (it would mix two experiments in one table)."""
    run_dir = Path(cfg.out)
    if not (run_dir / "checkpoint.pt").exists():
        return None
    check_resumable(read_run_config(run_dir), cfg, run_dir,
                    fix="give compare the flags of the runs already there, or another --out")
    summary = read_json(run_dir / "summary.json", required=False)
    return summary if summary and summary.get("epochs") == cfg.epochs else None


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no std from a single value."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def pct(mean: float, std: float | None) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def tabulate(runs: dict[tuple[str, int], Config], methods: list[str]) -> dict:
    results = {}
    for method in methods:
        dirs = [Path(cfg.out) for (m, _), cfg in runs.items() if m == method]
        summaries = [read_json(d / "summary.json") for d in dirs]
        curves = [[r["test_acc"] for r in read_metrics(d)] for d in dirs]
        results[method] = {
            "final_test_acc": [s["final_test_acc"] for s in summaries],
            "last_epochs_test_acc": [sum(c[-LAST_EPOCHS:]) / len(c[-LAST_EPOCHS:]) for c in curves],
            "best_test_acc": [s["best_test_acc"] for s in summaries],
            "wall_seconds": [s["wall_seconds"] for s in summaries],
            "images_per_s": [s["images_per_s"] for s in summaries],
            "machines": [s.get("machine", "not recorded") for s in summaries],  # older summaries lack it
            "curves": curves,
        }
    return results


def write_results(out: Path, results: dict, command: str, cfg: Config, seeds: int) -> Path:
    last = min(LAST_EPOCHS, cfg.epochs)
    settings = (f"width {cfg.width}, batch {cfg.batch_size}, lr {cfg.lr}, subset {cfg.subset or 'none (all data)'}, "
                f"amp {cfg.amp}, compile {cfg.compile}; preset {cfg.preset}, resolved: "
                + ", ".join(f"{name.replace('_', ' ')} {getattr(cfg, name)}" for name in PRESETS[cfg.preset]))
    machines = sorted({m for r in results.values() for m in r["machines"]})
    dataset = f"{cfg.dataset} ({cfg.data_dir})" if cfg.dataset == "folder" else cfg.dataset
    lines = [f"# Method comparison on {dataset}", "",
             f"- Command: `{command}`",
             f"- Tabulated {time.strftime('%Y-%m-%d')}; the runs were trained on: {'; '.join(machines)}",
             f"- {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, seeds 0..{seeds - 1} ({seeds} per method); {settings}",
             "- Test accuracy of the final model (mean ± sample std over seeds), and each run's mean over its "
             f"last {last} epochs (steadier where accuracy swings between epochs); the best epoch is shown for "
             "reference only, the test set picks nothing. Wall time is per run; runs trained at other times or side by "
             "side compare only roughly.", "",
             f"| method | final test acc (%) | last {last} epochs (%) | best test acc (%) | per seed, final (%) | wall time (s) | images/s |",
             "|---|---|---|---|---|---|---|"]
    for method, r in results.items():
        wall, _ = mean_std(r["wall_seconds"])
        speed, _ = mean_std(r["images_per_s"])
        per_seed = ", ".join(f"{100 * a:.2f}" for a in r["final_test_acc"])
        lines.append(f"| {method} | {pct(*mean_std(r['final_test_acc']))} | {pct(*mean_std(r['last_epochs_test_acc']))} | "
                     f"{pct(*mean_std(r['best_test_acc']))} | "
                     f"{per_seed} | {wall:.0f} | {speed:.0f} |")
    lines += ["", "![test accuracy per epoch](accuracy.png)", ""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"command": command, "results": results}, indent=2))
    return path


def plot_accuracy(out: Path, results: dict, dataset: str) -> Path:
    from .report import _pyplot

    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, r in results.items():
        length = min(len(c) for c in r["curves"])
        stats = [mean_std([c[e] for c in r["curves"]]) for e in range(length)]
        epochs = list(range(1, length + 1))
        mean = [100 * m for m, _ in stats]
        ax.plot(epochs, mean, marker="o", markersize=3, label=method)
        if all(s is not None for _, s in stats):
            ax.fill_between(epochs, [100 * (m - s) for m, s in stats], [100 * (m + s) for m, s in stats], alpha=0.15)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{dataset}: mean over seeds, band ±1 std")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    path = out / "accuracy.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(argv: list[str], log=print) -> Path:
    args, methods, passthrough = parse_args(argv)
    runs = plan_runs(args, methods, passthrough)
    out = Path(next(iter(runs.values())).out).parent
    command = "python -m rlaux_fast.compare " + shlex.join(argv)
    where = "before the first run"
    try:
        with StopOnSignal():  # also between runs, where no run's own handler is active
            for (method, seed), cfg in runs.items():
                tag, where = f"[{method} seed {seed}]", f"in the {method} seed {seed} run"
                summary = finished(cfg)
                if summary is not None:
                    log(f"{tag} already done: final test acc {100 * summary['final_test_acc']:.2f}%, not rerun")
                    continue
                if (Path(cfg.out) / "checkpoint.pt").exists():
                    cfg = dataclasses.replace(cfg, resume=cfg.out)
                run(cfg, log=lambda line, tag=tag: log(f"{tag} {line}"))
            where = "after the last run"
    except Interrupted as e:
        name = SIGNAL_NAMES.get(e.signum, f"signal {e.signum}")
        raise Interrupted(e.signum, f"interrupted by {name} {where}: finished runs and every run's last checkpoint "
                                    f"are kept; resume with: {command}") from None
    results = tabulate(runs, methods)
    path = write_results(out, results, command, next(iter(runs.values())), args.seeds)
    plot_accuracy(out, results, args.dataset)
    for method, r in results.items():
        log(f"{method:>14}: final test acc {pct(*mean_std(r['final_test_acc']))}% over {len(r['final_test_acc'])} seed{'s' if len(r['final_test_acc']) != 1 else ''}")
    log(f"results: {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        compare(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e.message, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted by SIGINT", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
