"""The primary training step (forward, loss, backward, SGD step) of the VGG16 at batch 100: eager,
compiled, and compiled with bf16 autocast. Compilation runs in the warm-up, outside the timed rounds.

    pytest bench/bench_train_step.py --benchmark-only
"""
import pytest

from benchlib import SIZES, batches, make_trainer, record, sync

VARIANTS = {"eager": dict(), "compiled": dict(compile=True), "compiled+bf16": dict(compile=True, amp="bf16")}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step(benchmark, digits, variant):
    benchmark.group = f"train step: VGG16 width {SIZES.step_width}, batch {SIZES.batch}"
    trainer = make_trainer(digits, method="single", width=SIZES.step_width, **VARIANTS[variant])
    data = batches(trainer, 4)
    position = iter(range(10**9))

    def step():
        trainer.train_step(trainer.train_model, trainer.optimizer, data[next(position) % len(data)], True)
        sync()

    step()  # compiles under --compile (the first optimizer step also creates the momentum buffers)
    benchmark.extra_info["compile_s"] = trainer.compiler.take_seconds()
    benchmark.pedantic(step, rounds=SIZES.step_rounds, iterations=1, warmup_rounds=1)
    record(benchmark, f"step:{variant}", SIZES.batch)
