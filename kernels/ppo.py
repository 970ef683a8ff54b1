"""Fused PPO clipped loss for a multi-head categorical policy (forward and per-row gradients in one
launch).

One program handles BLOCK_N rows of logits [N, K] (heads laid side by side). Per row it computes
the masked per-head log-softmax, log pi(a|s), the entropy, the clipped surrogate and the (clipped)
value loss, and writes their gradients w.r.t. the logits and the value next to them. The op is
`torch.ops.rlaux.ppo_rows`; the advantage normalisation (a global mean/std) and the means over
rows are plain torch around it.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, row_tile
from .reference import LOG_RATIO_CLAMP, MASK_FILL, PPOLoss, normalize_advantages


@triton.jit
def _ppo_kernel(z_ptr, mask_ptr, act_ptr, head_ptr, old_lp_ptr, adv_ptr, ret_ptr, v_ptr, old_v_ptr,
                pg_ptr, vl_ptr, ent_ptr, lr_ptr, gz_pg_ptr, gz_ent_ptr, gv_ptr,
                N, K, stride_z, stride_mask, stride_act, clip, log_ratio_clamp, mask_fill,
                H: tl.constexpr, HAS_MASK: tl.constexpr, CLIP_VALUE: tl.constexpr,
                COMPUTE_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = row_ok[:, None] & (cols < K)[None, :]
    z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0)
    z = z.to(tl.float32)
    if HAS_MASK:
        allowed = tl.load(mask_ptr + rows[:, None] * stride_mask + cols[None, :], mask=mask,
                          other=1) != 0
        # masked actions get a finite logit (as in the reference): p = 0 and p log p = 0 there
        z = tl.where(allowed, z, mask_fill)
    else:
        allowed = mask

    logprob = tl.zeros([BLOCK_N], dtype=tl.float32)
    entropy = tl.zeros([BLOCK_N], dtype=tl.float32)
    g_logprob = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    g_entropy = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for h in tl.static_range(H):
        start = tl.load(head_ptr + h)
        in_head = ((cols >= start) & (cols < tl.load(head_ptr + h + 1)))[None, :]
        # log p_k = z_k - m - log sum_j exp(z_j - m) over the head's columns
        zh = tl.where(in_head, z, float("-inf"))
        m = tl.max(zh, axis=1)
        e = tl.exp(zh - m[:, None])
        s = tl.sum(e, axis=1)
        logp = tl.where(in_head, z - (m + tl.log(s))[:, None], 0.0)
        p = e / s[:, None]                                    # 0 outside the head
        # H_h = -sum_k p_k log p_k;  dH_h/dz_k = -p_k (log p_k + H_h)
        ent_h = -tl.sum(p * logp, axis=1)
        entropy += ent_h
        g_entropy += tl.where(in_head & allowed, -p * (logp + ent_h[:, None]), 0.0)
        # log pi(a_h) = log p_{start + a_h};  d log p_a/dz_k = [k == a] - p_k (0 where masked:
        # a masked logit is the constant mask_fill)
        action = tl.load(act_ptr + rows * stride_act + h, mask=row_ok, other=0).to(tl.int64)
        chosen = cols[None, :] == (start + action)[:, None]
        logprob += tl.sum(tl.where(chosen, logp, 0.0), axis=1)
        g_logprob += tl.where(in_head & allowed, tl.where(chosen, 1.0, 0.0) - p, 0.0)

    # ratio = exp(clamp(log pi - log pi_old, -c, c)); d ratio/d log pi = ratio inside the clamp
    raw = logprob - tl.load(old_lp_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    log_ratio = tl.minimum(tl.maximum(raw, -log_ratio_clamp), log_ratio_clamp)
    ratio = tl.exp(log_ratio)
    d_ratio = tl.where((raw >= -log_ratio_clamp) & (raw <= log_ratio_clamp), ratio, 0.0)
    # pg = max(-adv ratio, -adv clamp(ratio, 1-clip, 1+clip)); d pg/d ratio follows the larger
    # term, ties split in half (as torch.maximum's gradient)
    adv = tl.load(adv_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    surrogate = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip), 1.0 + clip)
    pg = tl.maximum(surrogate, clipped)
    d_surrogate = -adv
    d_clipped = tl.where((ratio >= 1.0 - clip) & (ratio <= 1.0 + clip), -adv, 0.0)
    d_pg = tl.where(surrogate > clipped, d_surrogate,
                    tl.where(surrogate < clipped, d_clipped, 0.5 * (d_surrogate + d_clipped)))
    # dpg/dz = dpg/dratio * dratio/dlogpi * dlogpi/dz
    g_pg = (d_pg * d_ratio)[:, None] * g_logprob

    v = tl.load(v_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    ret = tl.load(ret_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if CLIP_VALUE:
        # vl = 0.5 max((v - R)^2, (v_c - R)^2), v_c = old_v + clamp(v - old_v, -clip, clip);
        # d/dv: (v - R) or (v_c - R) [inside the clamp], ties split in half
        old_v = tl.load(old_v_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        dv = v - old_v
        v_clipped = old_v + tl.minimum(tl.maximum(dv, -clip), clip)
        err, err_clipped = (v - ret) * (v - ret), (v_clipped - ret) * (v_clipped - ret)
        vl = 0.5 * tl.maximum(err, err_clipped)
        d_err = v - ret
        d_err_clipped = tl.where((dv >= -clip) & (dv <= clip), v_clipped - ret, 0.0)
        g_v = tl.where(err > err_clipped, d_err,
                       tl.where(err < err_clipped, d_err_clipped, 0.5 * (d_err + d_err_clipped)))
    else:
        # vl = 0.5 (v - R)^2;  d/dv = v - R
        vl = 0.5 * (v - ret) * (v - ret)
        g_v = v - ret

    tl.store(pg_ptr + rows, pg, mask=row_ok)
    tl.store(vl_ptr + rows, vl, mask=row_ok)
    tl.store(ent_ptr + rows, entropy, mask=row_ok)
    tl.store(lr_ptr + rows, log_ratio, mask=row_ok)
    if COMPUTE_GRAD:
        offs = rows[:, None] * K + cols[None, :]
        tl.store(gz_pg_ptr + offs, g_pg, mask=mask)
        tl.store(gz_ent_ptr + offs, g_entropy, mask=mask)
        tl.store(gv_ptr + rows, g_v, mask=row_ok)


@functools.lru_cache(maxsize=64)
def _head_starts(head_sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[H + 1] int32 column offsets of the heads, made once per (head_sizes, device)."""
    starts = torch.tensor([0, *head_sizes], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return starts.to(device)


@torch.library.custom_op("rlaux::ppo_rows", mutates_args=())
def ppo_rows(logits: torch.Tensor, head_sizes: list[int], actions: torch.Tensor,
             old_logprobs: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
             values: torch.Tensor, old_values: torch.Tensor, action_mask: torch.Tensor | None,
             clip: float, clip_value: bool, compute_grad: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row (fp32): (policy loss, value loss, entropy, clamped log-ratio [N],
    d pg/d logits [N, K], d entropy/d logits [N, K], d vl/d value [N]); the gradients are empty
    (0 rows) unless compute_grad. `advantages` are used as given (normalise them first)."""
    N, K = logits.shape
    H = len(head_sizes)
    if sum(head_sizes) != K or actions.shape != (N, H):
        raise ValueError(f"logits [N, {K}] and actions [N, {H}] do not match head_sizes {head_sizes}")
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages),
                    ("returns", returns), ("values", values), ("old_values", old_values)):
        if t.shape != (N,):
            raise ValueError(f"{name} must have shape [{N}], got {list(t.shape)}")
    if action_mask is not None and action_mask.shape != (N, K):
        raise ValueError(f"action_mask must have shape [{N}, {K}]")
    check_float("logits", logits)
    check_device(logits, values)
    logits, actions = logits.contiguous(), actions.contiguous()
    if action_mask is not None:
        action_mask = action_mask.contiguous()
        if action_mask.dtype == torch.bool:
            action_mask = action_mask.view(torch.uint8)

    f32 = dict(device=logits.device, dtype=torch.float32)
    pg, vl, ent, log_ratio = (torch.empty(N, **f32) for _ in range(4))
    rows = N if compute_grad else 0
    gz_pg, gz_ent, gv = torch.empty(rows, K, **f32), torch.empty(rows, K, **f32), torch.empty(rows, **f32)
    if N == 0:
        return pg, vl, ent, log_ratio, gz_pg, gz_ent, gv
    block_n, block_k, num_warps = row_tile(N, K)
    _ppo_kernel[(triton.cdiv(N, block_n),)](
        logits, logits if action_mask is None else action_mask, actions,
        _head_starts(tuple(head_sizes), logits.device),
        old_logprobs.contiguous(), advantages.contiguous(), returns.contiguous(),
        values.contiguous(), old_values.contiguous(),
        pg, vl, ent, log_ratio, gz_pg if compute_grad else pg, gz_ent if compute_grad else pg,
        gv if compute_grad else pg,
        N, K, logits.stride(0), 0 if action_mask is None else action_mask.stride(0),
        actions.stride(0), float(clip), LOG_RATIO_CLAMP, MASK_FILL,
        H=H, HAS_MASK=action_mask is not None, CLIP_VALUE=clip_value, COMPUTE_GRAD=compute_grad,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return pg, vl, ent, log_ratio, gz_pg, gz_ent, gv


@ppo_rows.register_fake
def _(logits, head_sizes, actions, old_logprobs, advantages, returns, values, old_values,
      action_mask, clip, clip_value, compute_grad):
    N, K = logits.shape
    rows = N if compute_grad else 0
    row = lambda: logits.new_empty(N, dtype=torch.float32)  # noqa: E731
    return (row(), row(), row(), row(), logits.new_empty(rows, K, dtype=torch.float32),
            logits.new_empty(rows, K, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[4:])
    ctx.dtypes = (inputs[0].dtype, inputs[6].dtype)


def _backward(ctx, g_pg, g_vl, g_ent, _g_log_ratio, *_):
    # d/dz_i of sum_r (g_pg_r pg_r + g_ent_r ent_r) = g_pg_i dpg_i/dz_i + g_ent_i dent_i/dz_i;
    # d/dv_i of sum_r g_vl_r vl_r = g_vl_i dvl_i/dv_i. The log-ratio output is a diagnostic and
    # carries no gradient.
    gz_pg, gz_ent, gv = ctx.saved_tensors
    d_logits = (gz_pg * g_pg[:, None] + gz_ent * g_ent[:, None]).to(ctx.dtypes[0])
    d_values = (gv * g_vl).to(ctx.dtypes[1])
    return d_logits, None, None, None, None, None, d_values, None, None, None, None, None


ppo_rows.register_autograd(_backward, setup_context=_setup_context)


def ppo_clip_loss(logits, head_sizes, actions, old_logprobs, advantages, returns, values,
                  old_values, clip=0.2, vf_coef=0.5, ent_coef=0.01, clip_value=True,
                  normalize_advantages=True, action_mask=None) -> PPOLoss:
    """The fused `reference.ppo_clip_loss`."""
    adv = advantages.detach().float()
    if normalize_advantages:
        adv = _normalize(adv)  # a global mean/std: plain torch before the kernel
    compute_grad = torch.is_grad_enabled() and (logits.requires_grad or values.requires_grad)
    pg, vl, ent, log_ratio, *_ = ppo_rows(
        logits, list(head_sizes), actions, old_logprobs.detach(), adv, returns.detach(), values,
        old_values.detach(), action_mask, float(clip), bool(clip_value), compute_grad)
    policy_loss, value_loss, entropy = pg.mean(), vl.mean(), ent.mean()
    loss = policy_loss - ent_coef * entropy + vf_coef * value_loss
    with torch.no_grad():
        log_ratio = log_ratio.detach()
        ratio = log_ratio.exp()
        approx_kl = ((ratio - 1) - log_ratio).mean()
        clip_fraction = ((ratio - 1).abs() > clip).float().mean()
    return PPOLoss(loss, policy_loss, value_loss, entropy, approx_kl, clip_fraction)


_normalize = normalize_advantages  # ppo_clip_loss's argument shadows the function's name
