"""Batched PPO: one environment step is one training batch; all its actions come from one forward."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from .policy import Policy


@dataclass
class PPOSettings:
    epochs: int = 10
    minibatch: int = 100
    lr: float = 3e-4
    clip: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    max_grad_norm: float = 0.5
    gamma: float = 0.99
    gae_lambda: float = 0.95
    kernels: str = "auto"


@dataclass
class Step:
    """One batch of decisions; the reward (a 0-dim tensor, shared by the batch) arrives later."""
    obs: torch.Tensor
    action_mask: torch.Tensor
    actions: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    reward: torch.Tensor | None = None


def sample_actions(logits: torch.Tensor, head_sizes: tuple[int, ...], action_mask: torch.Tensor,
                   deterministic: bool, generator: torch.Generator | None = None):
    """Sample every head at once with the Gumbel-max trick: argmax(log p + Gumbel noise)."""
    logp = kernels.multihead_log_softmax(logits.float(), head_sizes, action_mask)
    actions, logprob = [], 0.0
    for head_logp in logp.split(head_sizes, dim=1):
        if deterministic:
            choice = head_logp.argmax(dim=1)
        else:
            u = torch.rand(head_logp.shape, device=head_logp.device, generator=generator).clamp_min(1e-20)
            gumbel = -torch.log((-torch.log(u)).clamp_min(1e-20))
            choice = (head_logp + gumbel).argmax(dim=1)
        actions.append(choice)
        logprob = logprob + head_logp.gather(1, choice[:, None]).squeeze(1)
    return torch.stack(actions, dim=1), logprob


class PPO:
    """The agent: acts on whole batches and learns from rollouts of `steps` batches."""

    def __init__(self, policy: Policy, settings: PPOSettings, seed: int = 0):
        self.policy = policy
        self.settings = settings
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=settings.lr, eps=1e-5)
        device = next(policy.parameters()).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @property
    def head_sizes(self) -> tuple[int, ...]:
        return self.policy.head_sizes

    def full_mask(self, block_mask: torch.Tensor) -> torch.Tensor:
        """Auxiliary-class head restricted to the example's block; every other head unrestricted."""
        rest = sum(self.head_sizes[1:])
        if not rest:
            return block_mask
        return torch.cat([block_mask, block_mask.new_ones(block_mask.shape[0], rest)], dim=1)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, block_mask: torch.Tensor, deterministic: bool) -> Step:
        logits, values = self.policy(obs)
        mask = self.full_mask(block_mask)
        actions, logprobs = sample_actions(logits, self.head_sizes, mask, deterministic, self.generator)
        return Step(obs, mask, actions, logprobs, values.float())

    def update(self, steps: list[Step], last_values: torch.Tensor, episode_ends: bool) -> dict[str, torch.Tensor]:
        """PPO on a rollout; returns diagnostics as device tensors (no host sync)."""
        s = self.settings
        batch = steps[0].actions.shape[0]
        rewards = torch.stack([st.reward for st in steps]).float()[:, None].expand(-1, batch)
        values = torch.stack([st.values for st in steps])
        dones = torch.zeros_like(values)
        if episode_ends:
            dones[-1] = 1.0
        advantages, returns = kernels.gae(rewards, values, dones, last_values.float(), s.gamma, s.gae_lambda, backend=_backend(s))

        obs = torch.cat([st.obs for st in steps])
        masks = torch.cat([st.action_mask for st in steps])
        actions = torch.cat([st.actions for st in steps])
        old_logprobs = torch.cat([st.logprobs for st in steps])
        advantages, returns, old_values = advantages.reshape(-1), returns.reshape(-1), values.reshape(-1)

        n = obs.shape[0]
        totals: dict[str, torch.Tensor] = {}
        updates = 0
        for _ in range(s.epochs):
            order = torch.randperm(n, device=obs.device, generator=self.generator)
            for idx in order.split(s.minibatch):
                logits, new_values = self.policy(obs[idx])
                out = kernels.ppo_clip_loss(
                    logits, self.head_sizes, actions[idx], old_logprobs[idx], advantages[idx], returns[idx],
                    new_values, old_values[idx], clip=s.clip, vf_coef=s.vf_coef, ent_coef=s.ent_coef,
                    clip_value=True, normalize_advantages=True, action_mask=masks[idx], backend=_backend(s))
                self.optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                nn.utils.clip_grad_norm_(self.policy.parameters(), s.max_grad_norm)
                self.optimizer.step()
                for name in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"):
                    totals[name] = totals.get(name, 0.0) + out._asdict()[name].detach().float()
                updates += 1
        diagnostics = {k: v / updates for k, v in totals.items()}
        # Explained variance of the rollout's value predictions (1 is perfect, <= 0 is useless).
        var_returns = returns.var(unbiased=False)
        diagnostics["explained_variance"] = 1 - (returns - old_values).var(unbiased=False) / var_returns.clamp_min(1e-8)
        return diagnostics


def _backend(s: PPOSettings) -> str | None:
    return None if s.kernels == "auto" else s.kernels
