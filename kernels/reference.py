"""The plain-PyTorch oracle: the one place the RL-AUX loss and PPO math is written.

Everything here is differentiable with ordinary autograd and accumulates in fp32 (or fp64 when
given fp64) whatever the input dtype. The fused Triton ops in `focal.py`, `gae.py` and `ppo.py`
are tested against these functions.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

# Entries removed by an action mask get this logit before the log-softmax (then -inf in the
# public log-softmax). A finite fill keeps 0 * log p = 0 in the entropy instead of 0 * -inf = NaN.
MASK_FILL = -1e30
# The PPO log-ratio is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before exp, so that extreme
# log-ratios give a finite ratio (and a zero gradient beyond the clamp, as torch.clamp does).
LOG_RATIO_CLAMP = 20.0


class FocalLoss(NamedTuple):
    loss: torch.Tensor     # scalar: mean(primary) + mean(weights * aux)
    primary: torch.Tensor  # [B] fp32 focal loss of the primary head
    aux: torch.Tensor      # [B] fp32 focal loss of the auxiliary head (unweighted)


class PPOLoss(NamedTuple):
    loss: torch.Tensor           # policy_loss - ent_coef * entropy + vf_coef * value_loss
    policy_loss: torch.Tensor    # clipped surrogate, mean over N
    value_loss: torch.Tensor     # 0.5 * (clipped) squared error, mean over N
    entropy: torch.Tensor        # multi-head entropy, mean over N
    approx_kl: torch.Tensor      # mean((ratio - 1) - log ratio), detached
    clip_fraction: torch.Tensor  # mean(|ratio - 1| > clip), detached


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Auxiliary targets and the focal loss
# ----------------------------------------------------------------------------------------------

def soft_block_targets(aux_labels, primary_labels, block_start, block_size, num_aux, soft=True):
    """Auxiliary targets [B, A] float32.

    hard: the one-hot of `aux_labels` (a global auxiliary index).
    soft: the softmax of that one-hot restricted to the example's block (primary class c owns
    auxiliary classes block_start[c] .. block_start[c] + psi - 1, psi = block_size[c]):
        t_j = e / (e + psi - 1)  on the chosen class,
        t_j = 1 / (e + psi - 1)  on the other psi - 1 classes of the block,
        t_j = 0                  outside the block.
    `aux_labels` are assumed to lie inside their example's block.
    """
    cols = torch.arange(num_aux, device=aux_labels.device)
    chosen = cols[None, :] == aux_labels[:, None]
    if not soft:
        return chosen.float()
    start = block_start[primary_labels][:, None]
    psi = block_size[primary_labels][:, None]
    in_block = (cols[None, :] >= start) & (cols[None, :] < start + psi)
    numerator = torch.where(chosen, math.e, 1.0)
    return torch.where(in_block, numerator / (math.e + psi - 1), 0.0).float()


def focal_loss(logits, targets, gamma=2.0):
    """Per-row focal loss -sum_j t_j (1 - p_j)^gamma log p_j, p = softmax(logits) over the row.

    log p comes from log_softmax (never log(p + eps)); 1 - p = -expm1(log p) stays accurate as
    p -> 1, and (1 - p)^gamma -> 0 there with a finite gradient for gamma >= 1.
    """
    logp = F.log_softmax(logits.to(_acc_dtype(logits)), dim=-1)
    one_minus_p = -torch.expm1(logp)
    return -(targets.to(logp.dtype) * one_minus_p.pow(gamma) * logp).sum(dim=-1)


def multihead_focal_loss(primary_logits, aux_logits, primary_labels, aux_labels, block_start,
                         block_size, weights=None, gamma=2.0, soft_target=True):
    """Focal loss of the primary head (one-hot target) plus the weighted focal loss of the auxiliary
    head (soft or hard block target).

    loss = mean_i(primary_i) + mean_i(w_i * aux_i): divided by B, not by sum(w), so all-zero
    weights give exactly 0 for the auxiliary term.
    """
    num_primary, num_aux = primary_logits.shape[-1], aux_logits.shape[-1]
    primary_targets = F.one_hot(primary_labels, num_primary)
    aux_targets = soft_block_targets(aux_labels, primary_labels, block_start, block_size,
                                     num_aux, soft=soft_target)
    primary = focal_loss(primary_logits, primary_targets, gamma)
    aux = focal_loss(aux_logits, aux_targets, gamma)
    weighted_aux = aux if weights is None else weights.to(aux.dtype) * aux
    loss = primary.mean() + weighted_aux.mean()
    return FocalLoss(loss, primary, aux)


# ----------------------------------------------------------------------------------------------
# Generalised advantage estimation
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def gae(rewards, values, dones, last_values, gamma, lam):
    """GAE over a rollout of T steps and N environments. rewards, values, dones: [T, N];
    last_values: [N] (the value of the state after the last step).

    dones[t] == 1 means the transition at step t ended its episode, so nothing from t+1 flows in:
        delta_t = r_t + gamma * V_{t+1} * (1 - done_t) - V_t,   V_T = last_values
        A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1}
        returns = A + V
    Computed in fp32 (fp64 for fp64 values); not differentiable (rollout data).
    """
    dtype = _acc_dtype(values)
    rewards, values, dones = rewards.to(dtype), values.to(dtype), dones.to(dtype)
    advantages = torch.empty_like(values)
    next_value, next_advantage = last_values.to(dtype), torch.zeros_like(values[0])
    for t in reversed(range(values.shape[0])):
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * not_done - values[t]
        next_advantage = delta + gamma * lam * not_done * next_advantage
        advantages[t] = next_advantage
        next_value = values[t]
    return advantages, advantages + values


# ----------------------------------------------------------------------------------------------
# Multi-head categorical policies and the PPO loss
# ----------------------------------------------------------------------------------------------

def _masked_multihead_log_softmax(logits, head_sizes: Sequence[int], action_mask=None):
    """Per-head log-softmax with masked entries at about MASK_FILL (finite), in fp32."""
    logits = logits.to(_acc_dtype(logits))
    if action_mask is not None:
        logits = logits.masked_fill(~action_mask, MASK_FILL)
    heads = torch.split(logits, list(head_sizes), dim=-1)
    return torch.cat([F.log_softmax(h, dim=-1) for h in heads], dim=-1)


def multihead_log_softmax(logits, head_sizes: Sequence[int], action_mask=None):
    """Log-softmax of each head of `logits` [N, K] (heads laid side by side, sizes `head_sizes`);
    entries where `action_mask` [N, K] is False get -inf."""
    logp = _masked_multihead_log_softmax(logits, head_sizes, action_mask)
    if action_mask is not None:
        logp = logp.masked_fill(~action_mask, float("-inf"))
    return logp


def multihead_logprob_entropy(logits, head_sizes: Sequence[int], actions, action_mask=None):
    """log pi(a | s) and the entropy of a multi-head categorical policy, both summed over heads.

    actions [N, H]: the index of each head's action within its own head.
    Returns (logprob [N], entropy [N]) in fp32.
    """
    logp = _masked_multihead_log_softmax(logits, head_sizes, action_mask)
    starts = torch.tensor([0, *head_sizes[:-1]], device=logits.device).cumsum(0)
    logprob = logp.gather(1, actions.long() + starts[None, :]).sum(dim=1)
    # masked entries have p = 0 and a finite log p, so p * log p = 0 there
    entropy = -(logp.exp() * logp).sum(dim=1)
    return logprob, entropy


def normalize_advantages(advantages):
    """(a - mean) / (std + 1e-8) with the population std (N = 1 gives 0, not NaN); no gradient."""
    advantages = advantages.detach().to(_acc_dtype(advantages))
    return (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-8)


def ppo_clip_loss(logits, head_sizes, actions, old_logprobs, advantages, returns, values, old_values,
                  clip=0.2, vf_coef=0.5, ent_coef=0.01, clip_value=True, normalize_advantages=True,
                  action_mask=None):
    """The PPO clipped objective, as in CleanRL (all terms are means over the N rows):

        ratio = exp(clamp(logp - old_logp, -20, 20))       (the clamp keeps extreme ratios finite)
        pg    = mean(max(-adv * ratio, -adv * clamp(ratio, 1 - clip, 1 + clip)))
        vl    = 0.5 * mean(max((v - R)^2, (old_v + clamp(v - old_v, -clip, clip) - R)^2))
                (0.5 * mean((v - R)^2) when not clip_value)
        loss  = pg - ent_coef * entropy + vf_coef * vl
    Differentiable w.r.t. logits and values; approx_kl and clip_fraction are detached diagnostics.
    """
    dtype = _acc_dtype(logits)
    adv = advantages.detach().to(dtype)
    if normalize_advantages:
        adv = _normalize(adv)
    logprob, entropy = multihead_logprob_entropy(logits, head_sizes, actions, action_mask)
    log_ratio = (logprob - old_logprobs.to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    policy_loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()

    vdtype = _acc_dtype(values)
    values, old_values, returns = values.to(vdtype), old_values.to(vdtype), returns.to(vdtype)
    if clip_value:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        value_loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2).mean()
    else:
        value_loss = 0.5 * ((values - returns) ** 2).mean()

    entropy = entropy.mean()
    loss = policy_loss - ent_coef * entropy + vf_coef * value_loss
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clip_fraction = ((ratio - 1).abs() > clip).float().mean()
    return PPOLoss(loss, policy_loss, value_loss, entropy, approx_kl, clip_fraction)


_normalize = normalize_advantages  # ppo_clip_loss's argument shadows the function's name
