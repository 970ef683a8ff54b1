"""AMP and channels_last for the agent too, no host reads in the hot loop, and the CUDA-only checks
(host syncs under torch.cuda.set_sync_debug_mode, CUDA graphs recorded once), which are skipped
without a GPU."""
import collections
import os
import traceback

import pytest
import torch

from rlaux_fast.config import Config, resolve
from rlaux_fast.data import load_dataset
from rlaux_fast.loop import Trainer
from rlaux_fast.speed import Compiler, clone_outputs
from rlaux_fast.agent import Step

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none on this machine)")
SUBSET, BATCH = 64, 16


@pytest.fixture(scope="module")
def digits():
    return load_dataset("mnist5k", data_dir=None, psi=2, download=False, flat=False, image_size=32, seed=0, limit=SUBSET)


def make_trainer(data, device="cpu", **overrides):
    settings = dict(method="rlaux-weights", width=0.0625, batch_size=BATCH, subset=SUBSET, progress=False,
                    device=device, ppo_steps=2, ppo_epochs=1, ppo_minibatch=BATCH, reward_batch_size=32)
    cfg = resolve(Config(**{**settings, **overrides}))
    return Trainer(cfg, data, torch.device(device))


def test_amp_and_channels_last_reach_the_agent(digits):
    trainer = make_trainer(digits, preset="paper", amp="bf16", channels_last=True)
    policy_conv = next(m for m in trainer.agent.policy.modules() if isinstance(m, torch.nn.Conv2d))
    assert policy_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert trainer.agent.settings.amp_dtype == torch.bfloat16
    trainer.train_loader.set_epoch(0)
    batch = next(iter(trainer.train_loader))
    with trainer.agent.autocast():
        logits, values = trainer.agent.policy(batch.images)
    assert logits.dtype == torch.bfloat16  # the policy forward runs in bf16 ...
    stats = trainer.run_phase(trainer.train_model, trainer.optimizer, 0, phase="rl", learn=True, deterministic=False)
    assert stats.rewards and all(r.dtype == torch.float32 for r in stats.rewards)  # ... losses and rewards in fp32
    diagnostics = stats.diagnostics[0]
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in diagnostics.values())


@pytest.mark.parametrize("method", ["human", "rlaux-weights"])
def test_fp16_survives_a_first_step_that_the_grad_scaler_skips(digits, method):
    """At its initial scale the GradScaler finds inf gradients and skips the first step; the next
    steps must still train (fused SGD left its momentum uninitialised there and the loss went NaN)."""
    trainer = make_trainer(digits, method=method, amp="fp16", preset="fast")
    stats = trainer.run_phase(trainer.train_model, trainer.optimizer, 0, phase="main", learn=method != "human",
                              deterministic=method == "human")
    assert trainer.scaler.get_scale() < 2.0**16  # a step was skipped ...
    assert int(stats.first_bad_step) == -1       # ... and no loss after it went non-finite
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


class HostReads:
    """Counts Python-level reads of tensor values on the host (.item(), bool(), float(), int(),
    .tolist(), .numpy()): each one is a device sync on CUDA."""
    NAMES = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")

    def __init__(self):
        self.calls = collections.Counter()

    def __enter__(self):
        self.original = {name: getattr(torch.Tensor, name) for name in self.NAMES}
        for name in self.NAMES:
            def read(tensor, *args, _name=name, **kwargs):
                frame = traceback.extract_stack(limit=2)[0]
                self.calls[f"{_name} at {os.path.basename(frame.filename)}:{frame.lineno}: {frame.line}"] += 1
                return self.original[_name](tensor, *args, **kwargs)
            setattr(torch.Tensor, name, read)
        return self

    def __exit__(self, *exc):
        for name, method in self.original.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("preset", ["paper", "fast"])
def test_no_host_reads_inside_a_phase(digits, preset):
    """On CPU a host read costs nothing, so it is counted instead: a whole RL phase (acting, training,
    rewards, PPO updates) reads no tensor value; run_epoch reads the sums once at the end."""
    trainer = make_trainer(digits, preset=preset)
    trainer.fine_count  # computed once per Trainer (from the CPU labels), then cached
    with HostReads() as reads:
        stats = trainer.run_phase(trainer.train_model, trainer.optimizer, 0, phase="rl", learn=True, deterministic=False)
    assert stats.diagnostics and not reads.calls, dict(reads.calls)


def test_clone_outputs_copies_tensors_in_nested_results():
    step = Step(torch.ones(2), torch.ones(2, dtype=torch.bool), torch.zeros(2, 1), torch.zeros(2), torch.zeros(2))
    out = clone_outputs(((torch.ones(1), None), {"step": step}, 3))
    assert out[1]["step"].obs is not step.obs and torch.equal(out[1]["step"].obs, step.obs)
    assert out[0][1] is None and out[2] == 3


def test_cuda_graphs_refuse_cpu():
    with pytest.raises(Exception, match="--cuda-graphs needs a CUDA GPU"):
        Compiler(True, cuda_graphs=True, device="cpu")


# ---- CUDA only ---------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("preset", ["paper", "fast"])
@pytest.mark.parametrize("compile", [False, True])
def test_no_host_syncs_in_the_inner_loop_on_cuda(digits, preset, compile):
    trainer = make_trainer(digits, device="cuda", preset=preset, compile=compile, loader="gpu")
    trainer.fine_count
    # Warm-up outside the checked region: compilation, lazy initialisation and the first optimizer state.
    trainer.run_phase(trainer.train_model, trainer.optimizer, 0, phase="rl", learn=True, deterministic=False)
    trainer.run_phase(trainer.train_model, trainer.optimizer, 0, phase="main", learn=False, deterministic=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.run_phase(trainer.train_model, trainer.optimizer, 1, phase="rl", learn=True, deterministic=False)
        trainer.run_phase(trainer.train_model, trainer.optimizer, 1, phase="main", learn=False, deterministic=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("preset", ["paper", "fast"])
def test_cuda_graphs_are_recorded_once(digits, preset):
    """Every graph is compiled and recorded in the first epoch; later epochs only replay them."""
    from torch._dynamo.callback import callback_handler

    trainer = make_trainer(digits, device="cuda", preset=preset, compile=True, cuda_graphs=True, loader="gpu")
    recordings = []
    record = lambda *args: recordings.append(args)  # noqa: E731
    callback_handler.register_start_callback(record)
    try:
        first = trainer.run_epoch(0)
        before = len(recordings)
        second, third = trainer.run_epoch(1), trainer.run_epoch(2)
    finally:
        callback_handler.remove_start_callback(record)
    assert first["compile_seconds"] > 0
    assert len(recordings) == before, recordings[before:]
    assert second["compile_seconds"] == third["compile_seconds"] == 0
