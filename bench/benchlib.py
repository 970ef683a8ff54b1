"""Shared pieces of the benchmarks and of epoch_breakdown.py: sizes, a Trainer factory, timing helpers."""
from __future__ import annotations

import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
MEDIANS: dict[str, float] = {}  # median seconds of this run's benchmarks, for the ratios (conftest.py)


class Sizes:
    """Problem sizes: full size on CUDA, reduced on CPU (the suite must finish in < 10 min there)."""

    def __init__(self, cuda: bool):
        self.batch = 100
        # train step: the real VGG16 on both (one fp32 step is about 1 s on the 2 build cores)
        self.step_width = 1.0
        self.step_rounds = 20 if cuda else 3
        # one RL step and the PPO update, with the paper's VGG16 policy
        self.rl_width = 1.0 if cuda else 0.25
        self.rl_rounds = 20 if cuda else 3
        self.ppo_steps = 20 if cuda else 4     # batches per rollout (the paper's 20 on CUDA)
        self.ppo_epochs = 10 if cuda else 2
        # full epochs on mnist5k (4,000 training images), paper PPO settings
        self.epoch_width = 1.0 if cuda else 0.125
        self.epoch_rounds = 3 if cuda else 1
        # loaders
        self.loader_rounds = 10 if cuda else 3
        self.jpeg_images = 60_000 if cuda else 5_000  # JPEG files decoded per round

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in vars(self).items())


SIZES = Sizes(CUDA)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def make_trainer(data, **overrides):
    """A Trainer on DEVICE with the paper's hyperparameters unless overridden."""
    from rlaux_fast.config import Config, resolve
    from rlaux_fast.loop import Trainer

    settings = dict(dataset="mnist5k", batch_size=SIZES.batch, progress=False, device=DEVICE.type)
    cfg = resolve(Config(**{**settings, **overrides}))
    return Trainer(cfg, data, DEVICE)


def batches(trainer, n: int, epoch: int = 0) -> list:
    trainer.train_loader.set_epoch(epoch)
    out = []
    while len(out) < n:
        for batch in trainer.train_loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def record(benchmark, key: str, items: int, unit: str = "images_per_s") -> None:
    """Put items/s (from the median) and the median in extra_info, and keep the median for the ratios."""
    if benchmark.stats is None:  # --benchmark-disable
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info[unit] = items / median
    benchmark.extra_info["median_s"] = median
    MEDIANS[key] = median
