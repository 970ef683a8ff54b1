"""Where the time of an RL-AUX epoch goes, and the epoch ratios of the speed targets.

    python bench/epoch_breakdown.py                       # full width on mnist5k (about 15 min on 2 CPU cores)
    python bench/epoch_breakdown.py --width 0.25 --paper-subset 400 --no-compiled   # a quick look

Runs, each one epoch of a fresh Trainer on mnist5k at batch 100 with the paper's PPO settings
(20 batches per rollout, 10 PPO epochs, minibatch 100, reward batch 256):

    single                  eager fp32, all 4,000 training images: the unit of every ratio
    rlaux-weights fast      eager fp32, all images                 (target: <= 1.2x single)
    rlaux-weights paper     eager fp32, on --paper-subset images, extrapolated per image to 4,000
                            (its cost per image does not depend on the number of images: the PPO
                            update is ppo_epochs forward+backward passes per image whatever the
                            rollout length; the floor is ~13.5x single, +10% allowed)
    and with --amp --compile: single, fast and paper again (paper must beat the 13.5x floor)

Each part of an epoch is timed by wrapping the Trainer's methods on the instance (nothing in the
loop changes): data (the loader's iteration), policy forward (`agent.act`), primary training
(`train_step` less the policy forward inside it: forward, loss, backward, SGD step), reward
(`reward_batch_loss`, `aux_target_mean`, `set_reward`), PPO update (`agent.update`), and other
(the rest: bookkeeping, the RL copy). On CUDA each timer synchronises, which costs a little.
Under --compile the policy forward is inside the compiled step's graph, so it is counted in
primary training there, and the timed epoch is the second one: the first, untimed, compiles (its
compile time is reported apart). Times exclude compilation and evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "rlaux-bench-inductor"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from benchlib import CUDA, DEVICE, make_trainer, sync  # noqa: E402

PARTS = ("data", "primary training", "policy forward", "reward", "PPO update", "other")
FLOOR = 13.5           # the algorithmic floor of the paper preset, in single epochs
FLOOR_SLACK = 1.10     # "nothing in our implementation may add more than 10%"
FAST_TARGET = 1.2


class Timers:
    def __init__(self):
        self.seconds = defaultdict(float)

    def wrap(self, obj, name: str, part: str, subtract_from: str | None = None):
        """Replace obj.name (on the instance) by a timed call that adds to `part` (and, when the call
        happens inside another timed part, takes its time out of that one)."""
        original = getattr(obj, name)
        timers = self

        def timed(*args, **kwargs):
            sync()
            start = time.perf_counter()
            result = original(*args, **kwargs)
            sync()
            elapsed = time.perf_counter() - start
            timers.seconds[part] += elapsed
            if subtract_from is not None:
                timers.seconds[subtract_from] -= elapsed
            return result

        setattr(obj, name, timed)


class TimedLoader:
    """The train loader with the time spent producing each batch counted as `data`."""

    def __init__(self, loader, timers: Timers):
        self.loader, self.timers = loader, timers

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            sync()
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            sync()
            self.timers.seconds["data"] += time.perf_counter() - start
            yield batch


def measure(data, label: str, compiled: bool, subset_images: int | None, **overrides) -> dict:
    """One epoch of a fresh Trainer; returns its seconds (extrapolated to the full training set when
    only the first `subset_images` images are used), and the per-part breakdown."""
    total_images = len(data.train)
    trainer = make_trainer(data, **overrides)
    timers = Timers()
    trainer.train_loader = TimedLoader(trainer.train_loader, timers)
    if subset_images is not None:  # both phases stop after subset_images images
        trainer.train_loader = _Cut(trainer.train_loader, subset_images // trainer.cfg.batch_size)
    timers.wrap(trainer, "train_step", "primary training")
    for name in ("reward_batch_loss", "aux_target_mean", "set_reward"):
        timers.wrap(trainer, name, "reward")
    if trainer.agent is not None:
        if not compiled:  # compiled: the policy forward is part of the step's graph
            timers.wrap(trainer.agent, "act", "policy forward", subtract_from="primary training")
        timers.wrap(trainer.agent, "update", "PPO update")
    epoch, compile_seconds = 0, 0.0
    if compiled:  # an untimed epoch first: compilation (and recompilation) stays out of every timer
        compile_seconds = trainer.run_epoch(epoch).get("compile_seconds", 0.0)
        timers.seconds.clear()
        epoch += 1
    start = time.perf_counter()
    record = trainer.run_epoch(epoch)
    wall = time.perf_counter() - start
    seconds = record["epoch_seconds"]  # excludes compilation and evaluation
    parts = {part: timers.seconds.get(part, 0.0) for part in PARTS if part != "other"}
    parts["other"] = seconds - sum(parts.values())
    images = record["images_per_s"] * seconds
    phases = 1 if trainer.agent is None or trainer.cfg.single_pass else 2
    scale = total_images * phases / images  # to the full training set
    result = {"label": label, "measured_images": int(round(images)), "measured_seconds": seconds,
              "epoch_seconds": seconds * scale, "extrapolated": scale > 1.001,
              "compile_seconds": compile_seconds + record.get("compile_seconds", 0.0), "wall_seconds": wall,
              "parts": {k: v * scale for k, v in parts.items()}, "test_acc": record["test_acc"]}
    print(f"  {label}: {result['epoch_seconds']:.1f} s per epoch"
          + (f" (extrapolated from {images:.0f} images in {seconds:.1f} s)" if result["extrapolated"] else "")
          + (f"; compile {result['compile_seconds']:.1f} s, not counted" if compiled else ""), flush=True)
    return result


class _Cut:
    """A loader limited to its first n batches (its length says so, so fractions follow)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for k, batch in enumerate(self.loader):
            if k == self.n:
                return
            yield batch


def table(results: list[dict], unit: float) -> str:
    head = "| run | s/epoch | x single | " + " | ".join(PARTS) + " |"
    lines = [head, "|" + "---|" * (3 + len(PARTS))]
    for r in results:
        parts = " | ".join(f"{r['parts'][p]:.1f} ({100 * r['parts'][p] / r['epoch_seconds']:.0f}%)" for p in PARTS)
        star = "*" if r["extrapolated"] else ""
        lines.append(f"| {r['label']}{star} | {r['epoch_seconds']:.1f} | {r['epoch_seconds'] / unit:.2f} | {parts} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=float, default=1.0, help="VGG16 width (1.0: the targets' setting)")
    parser.add_argument("--paper-subset", type=int, default=800,
                        help="training images of the paper-preset epochs (the rest is extrapolated per image)")
    parser.add_argument("--no-compiled", action="store_true", help="skip the --amp --compile runs")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    from rlaux_fast.data import load_dataset

    data = load_dataset("mnist5k", psi=2, seed=0)
    print(f"epoch breakdown on {DEVICE} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"width {args.width}, mnist5k {len(data.train)} train images, batch 100", flush=True)
    common = dict(width=args.width)
    runs = [("single", False, None, dict(method="single")),
            ("rlaux-weights fast", False, None, dict(method="rlaux-weights", preset="fast")),
            ("rlaux-weights paper", False, args.paper_subset, dict(method="rlaux-weights", preset="paper"))]
    if not args.no_compiled:
        fast = dict(amp="bf16", compile=True)
        runs += [("single --amp --compile", True, None, dict(method="single", **fast)),
                 ("rlaux-weights fast --amp --compile", True, None, dict(method="rlaux-weights", preset="fast", **fast)),
                 ("rlaux-weights paper --amp --compile", True, args.paper_subset, dict(method="rlaux-weights", preset="paper", **fast))]
    results = []
    started = time.time()
    for label, compiled, subset, overrides in runs:
        results.append(measure(data, label, compiled, subset, **common, **overrides))
    by = {r["label"]: r for r in results}
    unit = by["single"]["epoch_seconds"]
    print()
    print(table(results, unit))
    print("* extrapolated per image from --paper-subset images to the full 4,000")
    print()
    fast_ratio = by["rlaux-weights fast"]["epoch_seconds"] / unit
    paper_ratio = by["rlaux-weights paper"]["epoch_seconds"] / unit
    verdicts = [
        ("fast / single (eager)", fast_ratio, f"<= {FAST_TARGET}", fast_ratio <= FAST_TARGET),
        ("paper / single (eager)", paper_ratio, f"<= {FLOOR * FLOOR_SLACK:.2f} (floor {FLOOR} + 10%)", paper_ratio <= FLOOR * FLOOR_SLACK),
    ]
    if not args.no_compiled:
        compiled_paper = by["rlaux-weights paper --amp --compile"]["epoch_seconds"]
        compiled_single = by["single --amp --compile"]["epoch_seconds"]
        compiled_fast = by["rlaux-weights fast --amp --compile"]["epoch_seconds"]
        verdicts += [
            ("paper --amp --compile / single (eager)", compiled_paper / unit, f"< {FLOOR} (beat the floor)", compiled_paper / unit < FLOOR),
            ("paper --amp --compile / single --amp --compile", compiled_paper / compiled_single, "(same settings on both sides)", None),
            ("fast --amp --compile / single --amp --compile", compiled_fast / compiled_single, f"<= {FAST_TARGET}", compiled_fast / compiled_single <= FAST_TARGET),
        ]
    for name, value, target, ok in verdicts:
        status = "" if ok is None else ("MET" if ok else "NOT MET")
        print(f"{name:<50} {value:6.2f}   target {target:<32} {status}")
    print(f"\ntotal wall time {time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(DEVICE), "cuda": CUDA, "torch": torch.__version__, "width": args.width,
                       "paper_subset": args.paper_subset, "results": results,
                       "verdicts": [dict(name=n, value=v, target=t, met=o) for n, v, t, o in verdicts]}, f, indent=2)


if __name__ == "__main__":
    main()
