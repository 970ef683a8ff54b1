"""Batched PPO: one environment step is one training batch; all its actions come from one forward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
    amp_dtype: torch.dtype | None = None  # autocast dtype of the policy forward (act and update); None: fp32


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
                   deterministic: bool, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None):
    """Sample every head at once with the Gumbel-max trick: argmax(log p + Gumbel noise).

    `noise` [N, K]: uniform draws for every head side by side (see `PPO.sampling_noise`); given,
    sampling uses it instead of drawing from `generator`, which keeps this function traceable by
    torch.compile. `deterministic` takes each head's argmax and ignores the noise.
    """
    logp = kernels.multihead_log_softmax(logits.float(), head_sizes, action_mask)
    uniforms = noise.split(head_sizes, dim=1) if noise is not None else [None] * len(head_sizes)
    actions, logprob = [], 0.0
    for head_logp, u in zip(logp.split(head_sizes, dim=1), uniforms):
        if deterministic:
            choice = head_logp.argmax(dim=1)
        else:
            if u is None:
                u = torch.rand(head_logp.shape, device=head_logp.device, generator=generator)
            u = u.clamp_min(1e-20)
            gumbel = -torch.log((-torch.log(u)).clamp_min(1e-20))
            choice = (head_logp + gumbel).argmax(dim=1)
        actions.append(choice)
        logprob = logprob + head_logp.gather(1, choice[:, None]).squeeze(1)
    return torch.stack(actions, dim=1), logprob


class PPO:
    """The agent: acts on whole batches and learns from rollouts of `steps` batches."""

    def __init__(self, policy: Policy, settings: PPOSettings, seed: int = 0,
                 sync_gradients: Callable[[nn.Module], None] | None = None,
                 compile: Callable[[Callable], Callable] | None = None):
        self.policy = policy
        self.settings = settings
        # Data parallelism: averages the policy's gradients over processes after each backward, so
        # that every process clips and steps alike and the agent stays identical everywhere.
        self.sync_gradients = sync_gradients
        self.optimizer = _adam(policy.parameters(), lr=settings.lr, eps=1e-5)
        device = next(policy.parameters()).device
        # fp16 autocast needs loss scaling; the fused Adam takes the scale on the device (no host sync).
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.amp_dtype == torch.float16)
        # --compile: the minibatch loss (policy forward + clipped loss) becomes one graph.
        self.minibatch_loss = compile(self._minibatch_loss) if compile is not None else self._minibatch_loss
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        # A policy with BatchNorm (the vgg16 backbone, always in train mode) gives an example a
        # log-prob that depends on the batch it is normalised with. Minibatches of examples drawn
        # across acting batches then change the ratio before any update (measured on a trained agent:
        # approx-KL 0.04 and 47% of the ratios clipped with the same parameters), so such a policy
        # learns from minibatches of whole acting batches, where the ratio starts at exactly 1.
        self.whole_batches = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in policy.modules())

    @property
    def head_sizes(self) -> tuple[int, ...]:
        return self.policy.head_sizes

    def full_mask(self, block_mask: torch.Tensor) -> torch.Tensor:
        """Auxiliary-class head restricted to the example's block; every other head unrestricted."""
        rest = sum(self.head_sizes[1:])
        if not rest:
            return block_mask
        return torch.cat([block_mask, block_mask.new_ones(block_mask.shape[0], rest)], dim=1)

    def autocast(self):
        dtype = self.settings.amp_dtype
        device = next(self.policy.parameters()).device.type
        return torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None)

    def sampling_noise(self, n: int) -> torch.Tensor:
        """Uniform draws [n, K] for sampling n examples' actions, from the agent's generator (drawn
        eagerly, so that a compiled `act` can take them as an input)."""
        device = self.generator.device
        return torch.cat([torch.rand((n, k), device=device, generator=self.generator) for k in self.head_sizes], dim=1)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, block_mask: torch.Tensor, deterministic: bool,
            noise: torch.Tensor | None = None) -> Step:
        """Actions for a batch: each head's argmax when `deterministic`, else sampled (from `noise`
        when given, else from the agent's generator)."""
        with self.autocast():
            logits, values = self.policy(obs)
        mask = self.full_mask(block_mask)
        actions, logprobs = sample_actions(logits, self.head_sizes, mask, deterministic, self.generator, noise)
        return Step(obs, mask, actions, logprobs, values.float())

    def _minibatch_loss(self, obs, actions, old_logprobs, advantages, returns, old_values, masks, idx):
        """The PPO loss of one minibatch (rows `idx` of the rollout); losses accumulate in fp32."""
        s = self.settings
        with self.autocast():
            logits, new_values = self.policy(obs[idx])
        return kernels.ppo_clip_loss(
            logits, self.head_sizes, actions[idx], old_logprobs[idx], advantages[idx], returns[idx],
            new_values, old_values[idx], clip=s.clip, vf_coef=s.vf_coef, ent_coef=s.ent_coef,
            clip_value=True, normalize_advantages=not self.whole_batches, action_mask=masks[idx], backend=_backend(s))

    def minibatches(self, steps: int, batch: int, device) -> tuple[torch.Tensor, ...]:
        """One epoch's minibatches of rollout rows, in a random order: shuffled examples, or for a
        BatchNorm policy shuffled whole acting batches (as many per minibatch as come closest to
        --ppo-minibatch; one by default)."""
        if not self.whole_batches:
            return torch.randperm(steps * batch, device=device, generator=self.generator).split(self.settings.minibatch)
        order = torch.randperm(steps, device=device, generator=self.generator)
        rows = (order[:, None] * batch + torch.arange(batch, device=device)).reshape(-1)
        return rows.split(max(1, round(self.settings.minibatch / batch)) * batch)

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
        if self.whole_batches:  # one batch shares one reward: normalising inside it would erase it
            advantages = kernels.reference.normalize_advantages(advantages)

        n = obs.shape[0]
        totals: dict[str, torch.Tensor] = {}
        updates = 0
        for _ in range(s.epochs):
            for idx in self.minibatches(len(steps), batch, obs.device):
                out = self.minibatch_loss(obs, actions, old_logprobs, advantages, returns, old_values, masks, idx)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(out.loss).backward()
                if self.sync_gradients is not None:
                    self.sync_gradients(self.policy)
                self.scaler.unscale_(self.optimizer)  # a no-op unless fp16; clipping needs true gradients
                nn.utils.clip_grad_norm_(self.policy.parameters(), s.max_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                for name in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"):
                    totals[name] = totals.get(name, 0.0) + out._asdict()[name].detach().float()
                updates += 1
        diagnostics = {k: v / updates for k, v in totals.items()}
        # Explained variance of the rollout's value predictions (1 is perfect, <= 0 is useless).
        var_returns = returns.var(unbiased=False)
        diagnostics["explained_variance"] = 1 - (returns - old_values).var(unbiased=False) / var_returns.clamp_min(1e-8)
        return diagnostics


def _adam(params, **kwargs) -> torch.optim.Optimizer:
    """Adam with the fused kernel where this build has it (one kernel for all parameters)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, foreach=True, **kwargs)


def _backend(s: PPOSettings) -> str | None:
    return None if s.kernels == "auto" else s.kernels
