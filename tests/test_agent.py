import torch

from rlaux_fast.agent import PPO, WEIGHT_BINS, Policy, PPOSettings, weight_factor


def test_weight_bins_span_one_eighth_to_32():
    factors = weight_factor(torch.arange(WEIGHT_BINS))
    assert factors[0].item() == 1 / 8
    assert factors[-1].item() == 32
    assert factors[10].item() == 2.0  # w = 0.5 -> 2^(4-3)
    assert torch.all(factors[1:] > factors[:-1])


def starting_weight_distribution(weight_init):
    torch.manual_seed(0)
    policy = Policy("shared", 4, WEIGHT_BINS, in_features=16, weight_init=weight_init)
    logits, _ = policy(torch.randn(256, 16))
    return torch.softmax(logits[:, 4:], dim=1).mean(0).detach()


def test_the_weight_head_starts_uniform_or_around_factor_one():
    uniform = starting_weight_distribution("uniform")
    assert torch.allclose(uniform, torch.full((WEIGHT_BINS,), 1 / WEIGHT_BINS), atol=2e-3)
    mean_factor = (uniform * weight_factor(torch.arange(WEIGHT_BINS))).sum()
    assert torch.allclose(mean_factor, weight_factor(torch.arange(WEIGHT_BINS)).mean(), atol=0.05)  # 6.27
    unit = starting_weight_distribution("unit")
    assert set(unit.topk(2).indices.tolist()) == {7, 8}  # factors 0.87 and 1.15, either side of 2^0
    assert unit[3:13].sum() > 0.95  # factors 0.44 to 2.3
    assert 1.0 < (unit * weight_factor(torch.arange(WEIGHT_BINS))).sum() < 1.3


def block_mask(primary, block_start, block_size, num_aux):
    cols = torch.arange(num_aux)[None]
    start = block_start[primary][:, None]
    return (cols >= start) & (cols < start + block_size[primary][:, None])


def make_agent(backbone="shared", bins=WEIGHT_BINS, num_aux=9):
    torch.manual_seed(0)
    policy = Policy(backbone, num_aux, bins, in_features=16, width=0.0625)
    return PPO(policy, PPOSettings(epochs=2, minibatch=7))


def test_actions_stay_inside_the_block_and_weights_are_valid_bins():
    block_start, block_size = torch.tensor([0, 2, 5]), torch.tensor([2, 3, 4])  # non-uniform psi
    agent = make_agent()
    primary = torch.randint(3, (500,))
    mask = block_mask(primary, block_start, block_size, 9)
    for deterministic in (False, True):
        step = agent.act(torch.randn(500, 16), mask, deterministic)
        aux = step.actions[:, 0]
        assert torch.all(aux >= block_start[primary]) and torch.all(aux < block_start[primary] + block_size[primary])
        assert torch.all((step.actions[:, 1] >= 0) & (step.actions[:, 1] < WEIGHT_BINS))
        assert torch.isfinite(step.logprobs).all()
    # Sampling explores every class of a block.
    step = agent.act(torch.randn(2000, 16), block_mask(torch.full((2000,), 2), block_start, block_size, 9), False)
    assert set(step.actions[:, 0].tolist()) == {5, 6, 7, 8}


def test_vgg16_policy_reads_images():
    agent = make_agent("vgg16", bins=0)
    mask = torch.ones(4, 9, dtype=torch.bool)
    step = agent.act(torch.randn(4, 3, 32, 32), mask, False)
    assert step.actions.shape == (4, 1)


def test_ppo_update_moves_the_policy_towards_rewarded_actions():
    """A bandit: reward 1 for auxiliary class 0, 0 otherwise; PPO must raise its probability."""
    agent = make_agent(bins=0, num_aux=3)
    agent.settings.lr = 1e-2
    obs = torch.randn(64, 16)
    mask = torch.ones(64, 3, dtype=torch.bool)

    def prob_of_zero():
        logits, _ = agent.policy(obs)
        return torch.softmax(logits, 1)[:, 0].mean().item()

    before = prob_of_zero()
    for _ in range(10):
        steps = []
        for _ in range(4):
            step = agent.act(obs, mask, False)
            # One reward per batch: the fraction of examples that chose class 0.
            step.reward = (step.actions[:, 0] == 0).float().mean()
            steps.append(step)
        diag = agent.update(steps, torch.zeros(64), True)
    assert prob_of_zero() > before + 0.1
    assert set(diag) >= {"policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "explained_variance"}
    assert all(torch.isfinite(v) for v in diag.values())


def test_a_batchnorm_policy_learns_from_whole_acting_batches_so_the_first_ratio_is_one():
    """BatchNorm normalises an example with its batch: PPO must evaluate the ratio on the batches the
    agent acted on, or it moves (and clips) before any update."""
    torch.manual_seed(0)
    policy = Policy("vgg16", 4, WEIGHT_BINS, width=0.0625)
    for head in policy.action_heads:  # an agent whose choices depend on the image, as after training
        torch.nn.init.normal_(head.weight, std=1.0)
    agent = PPO(policy, PPOSettings(epochs=1, minibatch=8, lr=1e-12))  # lr ~ 0: the ratio must stay 1
    assert agent.whole_batches and not make_agent().whole_batches
    mask = torch.ones(8, 4, dtype=torch.bool)
    steps = []
    for _ in range(4):
        step = agent.act(torch.randn(8, 3, 32, 32), mask, False)
        step.reward = torch.rand(())
        steps.append(step)
    minibatches = agent.minibatches(4, 8, "cpu")
    assert sorted(tuple(sorted(set((i // 8).tolist()))) for i in minibatches) == [(0,), (1,), (2,), (3,)]
    diag = agent.update(steps, torch.zeros(8), True)
    assert diag["approx_kl"].abs() < 1e-6 and diag["clip_fraction"] == 0

    # The same rollout in minibatches of examples drawn across batches: the ratio moves at once.
    agent.whole_batches = False
    diag = agent.update(steps, torch.zeros(8), True)
    assert diag["clip_fraction"] > 0.1
