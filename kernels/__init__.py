"""Fused RL-AUX ops (imported as `rlaux_fast.kernels`): the focal loss of both heads, GAE and the
PPO clipped loss.

Each op takes `backend=None | "triton" | "torch"`. None reads the env var RLAUX_KERNELS
(triton | torch | auto, default auto); auto runs the fused Triton op on CUDA tensors when triton is
importable and the plain-PyTorch reference (`reference.py`) otherwise. A forced "triton" backend
also runs on CPU tensors under TRITON_INTERPRET=1 (set before this package is imported).

This folder imports only torch and triton, so it also works copied elsewhere.
"""
from __future__ import annotations

import os

import torch

from . import reference
from .reference import (FocalLoss, PPOLoss, multihead_log_softmax, multihead_logprob_entropy,
                        soft_block_targets)

try:  # the fused ops need triton; without it everything runs on the reference
    from . import focal as _focal, gae as _gae, ppo as _ppo
    from ._common import INTERPRET as _INTERPRET
    HAS_TRITON = True
    _TRITON_IMPORT_ERROR = None
except ImportError as error:  # pragma: no cover - depends on the install
    HAS_TRITON = False
    _TRITON_IMPORT_ERROR = error
    _INTERPRET = False

BACKENDS = ("auto", "triton", "torch")

__all__ = ["multihead_focal_loss", "gae", "ppo_clip_loss", "FocalLoss", "PPOLoss",
           "soft_block_targets", "multihead_log_softmax", "multihead_logprob_entropy",
           "reference", "HAS_TRITON", "BACKENDS", "triton_runs_on"]


def triton_runs_on(device) -> bool:
    """Whether the fused Triton ops can launch on `device`: CUDA, or the CPU under TRITON_INTERPRET=1."""
    return HAS_TRITON and (torch.device(device).type == "cuda" or _INTERPRET)


def _use_triton(backend, tensor: torch.Tensor) -> bool:
    """Whether to run the fused Triton op for `backend` (see the module docstring)."""
    choice = backend if backend is not None else os.environ.get("RLAUX_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernels backend {choice!r}; expected one of {BACKENDS}")
    if choice == "torch":
        return False
    if choice == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"the 'triton' kernels backend needs triton: {_TRITON_IMPORT_ERROR}")
        return True
    return HAS_TRITON and tensor.is_cuda


def multihead_focal_loss(primary_logits, aux_logits, primary_labels, aux_labels, block_start,
                         block_size, weights=None, gamma=2.0, soft_target=True, *, backend=None):
    """FocalLoss(loss, primary [B], aux [B]); see `reference.multihead_focal_loss`."""
    fn = _focal.multihead_focal_loss if _use_triton(backend, primary_logits) \
        else reference.multihead_focal_loss
    return fn(primary_logits, aux_logits, primary_labels, aux_labels, block_start, block_size,
              weights, gamma, soft_target)


def gae(rewards, values, dones, last_values, gamma, lam, *, backend=None):
    """(advantages [T, N], returns [T, N]); see `reference.gae`."""
    fn = _gae.gae if _use_triton(backend, values) else reference.gae
    return fn(rewards, values, dones, last_values, gamma, lam)


def ppo_clip_loss(logits, head_sizes, actions, old_logprobs, advantages, returns, values,
                  old_values, clip=0.2, vf_coef=0.5, ent_coef=0.01, clip_value=True,
                  normalize_advantages=True, action_mask=None, *, backend=None):
    """PPOLoss(loss, policy_loss, value_loss, entropy, approx_kl, clip_fraction); see
    `reference.ppo_clip_loss`."""
    fn = _ppo.ppo_clip_loss if _use_triton(backend, logits) else reference.ppo_clip_loss
    return fn(logits, tuple(head_sizes), actions, old_logprobs, advantages, returns, values,
              old_values, clip, vf_coef, ent_coef, clip_value, normalize_advantages, action_mask)
