"""Fused focal loss of the primary and auxiliary heads (forward and per-row gradient in one launch).

One program handles BLOCK_B rows of both heads. For each row it computes the focal loss
    L = -sum_j t_j (1 - p_j)^gamma log p_j,   p = softmax(z)
with t the one-hot primary label (primary head) or the soft/hard block target (auxiliary head),
and writes dL/dz next to it. Backward only scales those rows by the incoming gradient, so the
loss is one pass over the logits. The op is `torch.ops.rlaux.focal_loss` (a custom_op, so
torch.compile treats it as one opaque node); the mean over rows and the weights are plain torch.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, row_tile
from .reference import FocalLoss

# Compiled kernels may only read globals that are constexpr.
E = tl.constexpr(math.e)


@triton.jit
def _pow(x, g):
    # x^g for x >= 0 without libdevice: exp(g * log x); 0^g = 0 for g > 0 and x^0 = 1.
    positive = x > 0
    power = tl.exp(g * tl.log(tl.where(positive, x, 1.0)))
    return tl.where(positive, power, tl.where(g == 0, 1.0, 0.0))


@triton.jit
def _focal_rows(z, t, col_ok, gamma):
    """Focal loss [R] and its gradient [R, C] for a tile of rows z [R, C] (fp32), targets t [R, C]
    (0 on masked columns); col_ok [1, C] marks the real columns."""
    # log p_j = z_j - m - log sum_k exp(z_k - m), m = max_k z_k (masked columns: exp(-inf) = 0)
    z = tl.where(col_ok, z, float("-inf"))
    m = tl.max(z, axis=1)
    e = tl.exp(z - m[:, None])
    s = tl.sum(e, axis=1)
    logp = tl.where(col_ok, z - (m + tl.log(s))[:, None], 0.0)
    p = e / s[:, None]
    q = 1.0 - p
    # L = -sum_j t_j q_j^gamma log p_j,  q = 1 - p
    loss = -tl.sum(t * _pow(q, gamma) * logp, axis=1)
    # With dp_j/dz_k = p_j (d_jk - p_k) and d log p_j/dz_k = d_jk - p_k:
    #   dL/dz_k = -sum_j t_j g_j (d_jk - p_k) = p_k S - t_k g_k,   S = sum_j t_j g_j,
    #   g_j = q_j^gamma - gamma p_j q_j^(gamma-1) log p_j.
    # log p comes from the log-sum-exp (finite for saturated logits), and q^(gamma-1) -> 0 as
    # p -> 1 (gamma > 1), so the gradient stays finite.
    g = _pow(q, gamma) - gamma * p * _pow(q, gamma - 1.0) * logp
    tg = t * g
    grad = p * tl.sum(tg, axis=1)[:, None] - tg
    return loss, grad


@triton.jit
def _focal_kernel(zp_ptr, za_ptr, yp_ptr, ya_ptr, start_ptr, size_ptr,
                  loss_p_ptr, loss_a_ptr, grad_p_ptr, grad_a_ptr,
                  B, P, A, stride_zp, stride_za, gamma,
                  SOFT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_A: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows = rows.to(tl.int64)
    yp = tl.load(yp_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    ya = tl.load(ya_ptr + rows, mask=row_ok, other=0).to(tl.int64)

    # primary head: one-hot target on the primary label
    cp = tl.arange(0, BLOCK_P)
    cp_ok = (cp < P)[None, :]
    mask = row_ok[:, None] & cp_ok
    zp = tl.load(zp_ptr + rows[:, None] * stride_zp + cp[None, :], mask=mask, other=0.0)
    tp = tl.where(cp[None, :] == yp[:, None], 1.0, 0.0)
    loss_p, grad_p = _focal_rows(zp.to(tl.float32), tp, cp_ok, gamma)
    tl.store(loss_p_ptr + rows, loss_p, mask=row_ok)
    if COMPUTE_GRAD:
        tl.store(grad_p_ptr + rows[:, None] * P + cp[None, :], grad_p, mask=mask)

    # auxiliary head: hard target one-hot(ya); soft target on the block of the primary class,
    # t_j = (e if j == ya else 1) / (e + psi - 1) for j in [start, start + psi), else 0
    ca = tl.arange(0, BLOCK_A)
    ca_ok = (ca < A)[None, :]
    mask = row_ok[:, None] & ca_ok
    za = tl.load(za_ptr + rows[:, None] * stride_za + ca[None, :], mask=mask, other=0.0)
    chosen = ca[None, :] == ya[:, None]
    if SOFT:
        start = tl.load(start_ptr + yp, mask=row_ok, other=0).to(tl.int64)[:, None]
        psi = tl.load(size_ptr + yp, mask=row_ok, other=1).to(tl.int64)[:, None]
        in_block = (ca[None, :] >= start) & (ca[None, :] < start + psi)
        ta = tl.where(in_block, tl.where(chosen, E, 1.0) / (E + psi.to(tl.float32) - 1.0), 0.0)
    else:
        ta = tl.where(chosen, 1.0, 0.0)
    ta = tl.where(ca_ok, ta, 0.0)
    loss_a, grad_a = _focal_rows(za.to(tl.float32), ta, ca_ok, gamma)
    tl.store(loss_a_ptr + rows, loss_a, mask=row_ok)
    if COMPUTE_GRAD:
        tl.store(grad_a_ptr + rows[:, None] * A + ca[None, :], grad_a, mask=mask)


@torch.library.custom_op("rlaux::focal_loss", mutates_args=())
def focal_loss_rows(primary_logits: torch.Tensor, aux_logits: torch.Tensor,
                    primary_labels: torch.Tensor, aux_labels: torch.Tensor,
                    block_start: torch.Tensor, block_size: torch.Tensor, gamma: float,
                    soft_target: bool, compute_grad: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(primary [B], aux [B], d primary_i/d primary_logits_i [B, P], d aux_i/d aux_logits_i [B, A]),
    all fp32; the gradients are empty [0, P], [0, A] unless compute_grad."""
    B, P = primary_logits.shape
    A = aux_logits.shape[1]
    if aux_logits.shape[0] != B or primary_labels.shape != (B,) or aux_labels.shape != (B,):
        raise ValueError("primary_logits [B,P], aux_logits [B,A] and labels [B] must agree on B")
    check_float("primary_logits", primary_logits)
    check_float("aux_logits", aux_logits)
    check_device(primary_logits, aux_logits)
    primary_logits, aux_logits = primary_logits.contiguous(), aux_logits.contiguous()
    primary_labels, aux_labels = primary_labels.contiguous(), aux_labels.contiguous()
    block_start, block_size = block_start.contiguous(), block_size.contiguous()

    f32 = dict(device=primary_logits.device, dtype=torch.float32)
    loss_p, loss_a = torch.empty(B, **f32), torch.empty(B, **f32)
    rows = B if compute_grad else 0
    grad_p, grad_a = torch.empty(rows, P, **f32), torch.empty(rows, A, **f32)
    if B == 0:
        return loss_p, loss_a, grad_p, grad_a
    block_b, _, num_warps = row_tile(B, max(P, A))
    _focal_kernel[(triton.cdiv(B, block_b),)](
        primary_logits, aux_logits, primary_labels, aux_labels, block_start, block_size,
        loss_p, loss_a, grad_p if compute_grad else loss_p, grad_a if compute_grad else loss_a,
        B, P, A, primary_logits.stride(0), aux_logits.stride(0), float(gamma),
        SOFT=soft_target, COMPUTE_GRAD=compute_grad, BLOCK_B=block_b,
        BLOCK_P=triton.next_power_of_2(P), BLOCK_A=triton.next_power_of_2(A), num_warps=num_warps)
    return loss_p, loss_a, grad_p, grad_a


@focal_loss_rows.register_fake
def _(primary_logits, aux_logits, primary_labels, aux_labels, block_start, block_size, gamma,
      soft_target, compute_grad):
    B, P = primary_logits.shape
    A = aux_logits.shape[1]
    rows = B if compute_grad else 0
    f32 = dict(dtype=torch.float32)
    return (primary_logits.new_empty(B, **f32), primary_logits.new_empty(B, **f32),
            primary_logits.new_empty(rows, P, **f32), aux_logits.new_empty(rows, A, **f32))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2], output[3])
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)


def _backward(ctx, g_primary, g_aux, _g_grad_p, _g_grad_a):
    # d/dz_i of sum_r g_r * loss_r = g_i * dloss_i/dz_i: scale the kernel's rows
    grad_p, grad_a = ctx.saved_tensors
    dz_p = (grad_p * g_primary[:, None]).to(ctx.dtypes[0])
    dz_a = (grad_a * g_aux[:, None]).to(ctx.dtypes[1])
    return dz_p, dz_a, None, None, None, None, None, None, None


focal_loss_rows.register_autograd(_backward, setup_context=_setup_context)


def multihead_focal_loss(primary_logits, aux_logits, primary_labels, aux_labels, block_start,
                         block_size, weights=None, gamma=2.0, soft_target=True) -> FocalLoss:
    """The fused `reference.multihead_focal_loss`: loss = mean(primary) + mean(weights * aux)."""
    compute_grad = torch.is_grad_enabled() and (primary_logits.requires_grad
                                                or aux_logits.requires_grad)
    primary, aux, _, _ = focal_loss_rows(primary_logits, aux_logits, primary_labels, aux_labels,
                                         block_start, block_size, float(gamma), bool(soft_target),
                                         compute_grad)
    weighted_aux = aux if weights is None else weights.to(aux.dtype) * aux
    return FocalLoss(primary.mean() + weighted_aux.mean(), primary, aux)
