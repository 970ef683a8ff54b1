"""One RL step (act, train the primary network, reward) and one PPO update, in both presets.

paper: the policy is its own VGG16 over the images, the reward is the primary loss on 256 random
training images after the step. fast: the policy reads the primary network's detached features,
the reward is the next batch's loss (free: that forward happens anyway), so a step is act + train.

    pytest bench/bench_rl.py --benchmark-only
"""
import pytest
import torch

from benchlib import SIZES, batches, make_trainer, record, sync


def rl_trainer(digits, preset, **overrides):
    return make_trainer(digits, method="rlaux-weights", preset=preset, width=SIZES.rl_width,
                        ppo_steps=SIZES.ppo_steps, ppo_epochs=SIZES.ppo_epochs, **overrides)


@pytest.mark.parametrize("preset", ["paper", "fast"])
def test_rl_step(benchmark, digits, preset):
    benchmark.group = f"one RL step (act, train, reward): width {SIZES.rl_width}, batch {SIZES.batch}"
    trainer = rl_trainer(digits, preset)
    data = batches(trainer, 4)
    position = iter(range(10**9))
    model = trainer.train_model

    def step():
        batch = data[next(position) % len(data)]
        out, aux_labels, weights, s = trainer.train_step(model, trainer.optimizer, batch, False)
        aux_mean = trainer.aux_target_mean(aux_labels, batch.primary)
        loss = trainer.reward_batch_loss(model) if preset == "paper" else out.primary.detach().mean()
        trainer.set_reward(s, aux_mean, loss, trainer_stats)
        sync()

    from rlaux_fast.loop import PhaseStats
    trainer_stats = PhaseStats()
    step()
    benchmark.pedantic(step, rounds=SIZES.rl_rounds, iterations=1, warmup_rounds=1)
    record(benchmark, f"rl_step:{preset}", SIZES.batch)


@pytest.mark.parametrize("preset", ["paper", "fast"])
def test_ppo_update(benchmark, digits, preset):
    """A rollout of ppo_steps batches; the update runs ppo_epochs passes of forward+backward over it
    (the paper: 20 batches x 10 epochs). images/s counts policy forward+backward passes."""
    benchmark.group = f"PPO update: {SIZES.ppo_steps} batches x {SIZES.ppo_epochs} epochs, width {SIZES.rl_width}"
    trainer = rl_trainer(digits, preset)
    agent = trainer.agent
    rollout = []
    for batch in batches(trainer, SIZES.ppo_steps):
        obs = batch.images
        if preset == "fast":
            with torch.no_grad():
                obs = trainer.model(batch.images, return_features=True)[2]
        step = agent.act(obs, trainer.block_masks[batch.primary], False)
        step.reward = -torch.rand((), device=obs.device)
        rollout.append(step)
    last_values = torch.zeros_like(rollout[-1].values)

    def update():
        agent.update(rollout, last_values, False)
        sync()

    update()
    benchmark.pedantic(update, rounds=SIZES.rl_rounds, iterations=1, warmup_rounds=0)
    record(benchmark, f"ppo_update:{preset}", SIZES.ppo_steps * SIZES.batch * SIZES.ppo_epochs)
