"""Runs under torchrun for tests/test_distributed.py (and once in-process, as the one-process reference).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT SCENARIO...

Each scenario saves this process's state to OUT/<scenario>-rank<r>-of<n>.pt for the test to compare.
"""
import sys
from pathlib import Path

import torch
from torch import nn

from rlaux_fast import distributed
from rlaux_fast.config import parse_config
from rlaux_fast.data import load_dataset
from rlaux_fast.loop import Trainer
from rlaux_fast.train import main

SMALL = ["--width", "0.125", "--no-progress", "--device", "cpu"]


def build(argv: list[str]) -> Trainer:
    cfg = parse_config([*SMALL, *argv])
    data = load_dataset(cfg.dataset, data_dir=None, psi=cfg.psi, download=False, flat=False,
                        image_size=cfg.image_size, seed=cfg.seed, limit=cfg.subset)
    return Trainer(cfg, data, distributed.init(torch.device("cpu")))


def single(steps: int = 3) -> dict:
    """A few SGD steps of `single` with a global batch of 100, then the (sharded) test accuracy.

    BatchNorm is put in eval mode (fixed statistics) for this comparison only: in training mode each
    process normalises with the statistics of its own 50 images, which are not those of the 100 images
    of one process, so the two runs would differ by more than rounding. With fixed statistics the
    mean of the per-process gradients is exactly the gradient of the global batch."""
    trainer = build(["--method", "single", "--subset", "400", "--batch-size", "100", "--lr", "0.05"])
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for m in trainer.model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    fraction = steps / len(trainer.train_loader)
    trainer.run_phase(trainer.train_model, trainer.optimizer, 0, phase="main", learn=False, deterministic=True,
                      fraction=fraction)
    sharded = float(trainer.evaluate(trainer.model))
    # The same weights, evaluated by this one process on the whole test set in one batch.
    test = trainer.data.test
    mean = torch.tensor(trainer.data.mean)[:, None, None]
    std = torch.tensor(trainer.data.std)[:, None, None]
    trainer.model.eval()
    with torch.no_grad():
        logits, _ = trainer.model((test.images.float() / 255 - mean) / std)
    whole = float((logits.argmax(1) == test.primary).float().mean())
    return {"start": start, "model": trainer.model.state_dict(), "sharded_acc": sharded, "whole_acc": whole}


def rlaux_weights() -> dict:
    """One epoch of the paper's two phases (RL copy, then the main phase) with the VGG16 policy."""
    trainer = build(["--method", "rlaux-weights", "--subset", "200", "--batch-size", "50", "--ppo-steps", "2",
                     "--ppo-epochs", "1", "--ppo-minibatch", "50", "--reward-batch-size", "32"])
    record = trainer.run_epoch(0)
    return {"model": trainer.model.state_dict(), "policy": trainer.agent.policy.state_dict(),
            "agent_optimizer": trainer.agent.optimizer.state_dict(), "record": record}


def fail_on_rank_1() -> None:
    """The CLI, with rank 1 raising in its second training step (while rank 0 waits in a collective)."""
    calls = []
    original = Trainer.train_step

    def train_step(self, *args, **kwargs):
        calls.append(1)
        if distributed.rank() == 1 and len(calls) == 2:
            raise RuntimeError("injected failure on rank 1")
        return original(self, *args, **kwargs)

    Trainer.train_step = train_step
    sys.exit(main([*SMALL, "--method", "single", "--subset", "400", "--batch-size", "50", "--epochs", "1",
                   "--out", str(Path(sys.argv[1]) / "failing-run")]))


SCENARIOS = {"single": single, "rlaux-weights": rlaux_weights}


def run(out: Path, names: list[str]) -> None:
    for name in names:
        if name == "fail":
            fail_on_rank_1()
        result = SCENARIOS[name]()
        torch.save(result, out / f"{name}-rank{distributed.rank()}-of{distributed.world_size()}.pt")


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2:])
    distributed.cleanup()
