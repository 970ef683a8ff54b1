"""--compile: one graph per hot function, the same training as eager, compile time reported apart.

Inductor compiles of a VGG16 step take 30-40 s on the 2-core build machine whatever the width (the
graph has as many nodes at width 0.0625 as at full width), so these tests compile few graphs and
share them: the Trainer tests and the CLI test use one configuration, and the session-wide inductor
cache (tests/conftest.py) serves the second compile of the same graph.
"""
import json

import pytest
import torch

from rlaux_fast.agent import PPO, WEIGHT_BINS, Policy, PPOSettings
from rlaux_fast.config import Config, resolve
from rlaux_fast.data import load_dataset
from rlaux_fast.loop import Trainer
from rlaux_fast.speed import Compiler
from rlaux_fast.train import main

WIDTH, BATCH, SUBSET = 0.0625, 16, 64
SMALL = ["--width", str(WIDTH), "--batch-size", str(BATCH), "--subset", str(SUBSET), "--no-progress",
         "--ppo-steps", "2", "--ppo-epochs", "1", "--ppo-minibatch", str(BATCH), "--reward-batch-size", "32",
         "--device", "cpu"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("mnist5k", data_dir=None, psi=2, download=False, flat=False, image_size=32, seed=0, limit=SUBSET)


def make_trainer(data, **overrides):
    cfg = resolve(Config(**{**dict(width=WIDTH, batch_size=BATCH, subset=SUBSET, progress=False, device="cpu",
                                   ppo_steps=2, ppo_epochs=1, ppo_minibatch=BATCH, reward_batch_size=32), **overrides}))
    return Trainer(cfg, data, torch.device("cpu"))


def first_batches(trainer, n):
    trainer.train_loader.set_epoch(0)
    return [batch for _, batch in zip(range(n), trainer.train_loader)]


@pytest.mark.parametrize("preset", ["paper", "fast"])
def test_hot_functions_are_single_graphs(digits, preset):
    """fullgraph=True fails on any graph break. aot_eager runs dynamo and AOTAutograd (the backward
    graph too) without inductor's code generation, so this takes seconds."""
    trainer = make_trainer(digits, method="rlaux-weights", preset=preset, amp="bf16")
    batch = first_batches(trainer, 1)[0]

    def graph(fn):
        torch._dynamo.reset()
        return torch.compile(fn, fullgraph=True, backend="aot_eager")

    # The RL phase samples, the main phase takes argmaxes (the same graph without the noise).
    for noise in (trainer.agent.sampling_noise(BATCH), None) if preset == "fast" else (trainer.agent.sampling_noise(BATCH),):
        out, aux_labels, weights, step = graph(trainer.primary_forward_loss)(trainer.train_model, batch, noise)
        out.loss.backward()  # the compiled backward graph
        assert step.actions.shape == (BATCH, 2) and out.loss.dtype == torch.float32
    trainer.model.eval()
    with torch.no_grad():
        assert graph(trainer.random_batch_loss)(trainer.model, torch.arange(32)).dtype == torch.float32
    trainer.model.train()
    s = trainer.agent.act(batch.images if preset == "paper" else torch.randn(BATCH, trainer.model.feature_dim),
                          trainer.block_masks[batch.primary], False)
    loss = graph(trainer.agent._minibatch_loss)(s.obs, s.actions, s.logprobs, torch.randn(BATCH), torch.randn(BATCH),
                                                s.values, s.action_mask, torch.arange(BATCH // 2))
    loss.loss.backward()
    assert loss.loss.dtype == torch.float32  # bf16 policy forward, fp32 loss


def test_cli_reports_compile_time_on_its_own_line(tmp_path, capsys):
    """Compiles the primary step of `single`; the next test reuses that graph (dynamo's guards hold for
    another Trainer of the same configuration), so it runs without compiling again."""
    torch._dynamo.reset()
    out = tmp_path / "run"
    assert main([*SMALL, "--method", "single", "--epochs", "2", "--compile", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    compile_lines = [line for line in lines if line.startswith("compile:")]
    assert compile_lines and "not counted in img/s" in compile_lines[0]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["compile_seconds"] > 0
    assert records[1]["compile_seconds"] < records[0]["compile_seconds"]  # nothing new to compile
    assert json.loads((out / "config.json").read_text())["compile"] is True


def test_compiled_steps_match_eager_batchnorm_statistics(digits):
    eager, compiled = make_trainer(digits, method="single"), make_trainer(digits, method="single", compile=True)
    for batch in first_batches(eager, 3):
        eager.train_step(eager.train_model, eager.optimizer, batch, True)
        compiled.train_step(compiled.train_model, compiled.optimizer, batch, True)
    bn = [(name, module) for name, module in compiled.model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]
    eager_modules = dict(eager.model.named_modules())
    assert len(bn) == 13
    for name, module in bn:
        reference = eager_modules[name]
        assert int(module.num_batches_tracked) == int(reference.num_batches_tracked) == 3, name
        torch.testing.assert_close(module.running_mean, reference.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(module.running_var, reference.running_var, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(compiled.model.named_parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)


def test_compiled_ppo_update_matches_eager():
    """The agent's compiled minibatch loss (shared backbone: a small graph) against eager PPO."""
    def run(compile):
        torch.manual_seed(0)
        agent = PPO(Policy("shared", 4, WEIGHT_BINS, in_features=16), PPOSettings(epochs=2, minibatch=8), seed=0,
                    compile=Compiler(compile))
        obs, mask = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)), torch.ones(16, 4, dtype=torch.bool)
        steps = []
        for _ in range(2):
            step = agent.act(obs, mask, False, agent.sampling_noise(16))
            step.reward = (step.actions[:, 0] == 0).float().mean()
            steps.append(step)
        return agent, agent.update(steps, torch.zeros(16), True)

    (eager, eager_diag), (compiled, compiled_diag) = run(False), run(True)
    for name in eager_diag:
        torch.testing.assert_close(compiled_diag[name], eager_diag[name], rtol=1e-4, atol=1e-5, msg=name)
    for p, q in zip(compiled.policy.parameters(), eager.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_cuda_graphs_need_a_gpu(tmp_path, capsys):
    assert main([*SMALL, "--compile", "--cuda-graphs", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    assert "--cuda-graphs needs a CUDA GPU" in capsys.readouterr().err


def test_the_presets_weight_start_reaches_the_agent(digits):
    paper = make_trainer(digits, method="rlaux-weights", preset="paper").agent.policy.action_heads[1].bias
    assert torch.all(paper == 0)  # uniform over the bins
    fast = make_trainer(digits, method="rlaux-weights", preset="fast").agent.policy.action_heads[1].bias
    assert set(fast.topk(2).indices.tolist()) == {7, 8}  # around factor 1
