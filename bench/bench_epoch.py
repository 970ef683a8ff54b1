"""Full epochs on mnist5k (4,000 training images, batch 100, the paper's PPO settings) of `single`
and of `rlaux-weights` in both presets, at a reduced width on CPU (full width on CUDA). The ratios
to the single epoch are printed at the end of the run; the full-width figures and the per-part
breakdown come from bench/epoch_breakdown.py.

    pytest bench/bench_epoch.py --benchmark-only
"""
import pytest

from benchlib import SIZES, make_trainer, record, sync

METHODS = {"single": dict(method="single"), "rlaux-weights-fast": dict(method="rlaux-weights", preset="fast"),
           "rlaux-weights-paper": dict(method="rlaux-weights", preset="paper")}


@pytest.mark.parametrize("name", list(METHODS))
def test_epoch(benchmark, digits, name):
    benchmark.group = f"epoch on mnist5k: width {SIZES.epoch_width}, batch {SIZES.batch}"
    trainer = make_trainer(digits, width=SIZES.epoch_width, **METHODS[name])
    epochs = iter(range(10**6))

    def epoch():
        trainer.run_epoch(next(epochs))
        sync()

    # One warm-up epoch: lazy initialisation, optimizer state, allocator.
    benchmark.pedantic(epoch, rounds=SIZES.epoch_rounds, iterations=1, warmup_rounds=1)
    record(benchmark, f"epoch:{name}", len(trainer.train_loader) * SIZES.batch)
