"""Generalised advantage estimation as one reverse scan over T for all N columns at once.

Each program owns BLOCK_N columns (environments) and walks t = T-1 .. 0 carrying V_{t+1} and
A_{t+1} in registers. The op is `torch.ops.rlaux.gae`; it has no gradient (rollout data).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device

BLOCK_N_MAX = 1024


@triton.jit
def _gae_kernel(r_ptr, v_ptr, d_ptr, last_ptr, adv_ptr, ret_ptr, T, N, gamma, lam,
                BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < N
    cols = cols.to(tl.int64)
    next_value = tl.load(last_ptr + cols, mask=ok, other=0.0).to(tl.float32)  # V_T
    next_adv = tl.zeros([BLOCK_N], dtype=tl.float32)                           # A_T = 0
    for i in range(0, T):
        offs = (T - 1 - i).to(tl.int64) * N + cols
        r = tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        not_done = 1.0 - tl.load(d_ptr + offs, mask=ok, other=0).to(tl.float32)
        # delta_t = r_t + gamma V_{t+1} (1 - done_t) - V_t
        delta = r + gamma * next_value * not_done - v
        # A_t = delta_t + gamma lam (1 - done_t) A_{t+1};  returns_t = A_t + V_t
        next_adv = delta + gamma * lam * not_done * next_adv
        tl.store(adv_ptr + offs, next_adv, mask=ok)
        tl.store(ret_ptr + offs, next_adv + v, mask=ok)
        next_value = v


@torch.library.custom_op("rlaux::gae", mutates_args=())
def gae_op(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor,
           last_values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [T, N], returns [T, N]) in fp32."""
    T, N = values.shape
    if rewards.shape != (T, N) or dones.shape != (T, N) or last_values.shape != (N,):
        raise ValueError("gae needs rewards, values, dones [T, N] and last_values [N]")
    check_device(rewards, values, dones, last_values)
    rewards, values, last_values = rewards.contiguous(), values.contiguous(), last_values.contiguous()
    dones = dones.contiguous()
    if dones.dtype == torch.bool:
        dones = dones.view(torch.uint8)
    advantages = torch.empty(T, N, device=values.device, dtype=torch.float32)
    returns = torch.empty_like(advantages)
    if T * N == 0:
        return advantages, returns
    block_n = min(triton.next_power_of_2(N), BLOCK_N_MAX)
    _gae_kernel[(triton.cdiv(N, block_n),)](rewards, values, dones, last_values, advantages,
                                             returns, T, N, float(gamma), float(lam),
                                             BLOCK_N=block_n)
    return advantages, returns


@gae_op.register_fake
def _(rewards, values, dones, last_values, gamma, lam):
    return values.new_empty(values.shape, dtype=torch.float32), \
        values.new_empty(values.shape, dtype=torch.float32)


def gae(rewards, values, dones, last_values, gamma, lam):
    """The fused `reference.gae` (fp32 accumulation; fp64 values give fp64 results)."""
    advantages, returns = gae_op(rewards.detach(), values.detach(), dones.detach(),
                                 last_values.detach(), float(gamma), float(lam))
    if values.dtype == torch.float64:
        advantages, returns = advantages.double(), returns.double()
    return advantages, returns
