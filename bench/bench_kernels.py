"""Speed (and, on CUDA, memory) of the fused ops against the eager and compiled PyTorch reference.

    pytest bench/bench_kernels.py --benchmark-only

Each case times one forward + backward (GAE: forward only) and records items per second (from the median time) in
`extra_info` (images/s for the focal loss, rows/s for PPO and GAE), plus the peak memory of one
step above what was allocated before it on CUDA. The fused ops run only on CUDA (the Triton
interpreter is a correctness tool, not a benchmark); torch.compile warms up outside the timed
region.
"""
from __future__ import annotations

import functools

import pytest
import torch

from rlaux_fast import kernels
from rlaux_fast.kernels import reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SIZES = [100, 256, 4096]
IMPLS = ["fused", "eager", "compiled"]
P, PSI = 20, 5                # focal: 20 primary classes, 100 auxiliary classes
HEAD_SIZES = (100, 21)        # PPO: auxiliary-class head + weight-bin head
T, N_ENVS = 20, 100           # GAE rollout
CPU_ROUNDS = 10


def implementation(impl, fused, eager):
    if impl == "fused":
        if not CUDA:
            pytest.skip("the fused Triton ops are benchmarked on CUDA only (no GPU here)")
        return functools.partial(fused, backend="triton")
    if impl == "eager":
        return eager
    return torch.compile(eager, dynamic=False)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def measure(benchmark, step, items, unit):
    """Time `step` (warmed up first, so compilation is not timed); record items/s and memory."""
    step()
    step()
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync()
        benchmark.extra_info["peak_memory_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20

    def timed():
        step()
        sync()

    if CUDA:
        benchmark(timed)
    else:  # keep the CPU run short
        benchmark.pedantic(timed, rounds=CPU_ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info[unit] = items / benchmark.stats.stats.median


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B", SIZES)
def test_focal_loss(benchmark, B, impl):
    benchmark.group = f"focal B={B} P={P} A={P * PSI}"
    fn = implementation(impl, kernels.multihead_focal_loss, reference.multihead_focal_loss)
    g = torch.Generator().manual_seed(0)
    block_size = torch.full((P,), PSI)
    block_start = torch.arange(P) * PSI
    primary = torch.randint(0, P, (B,), generator=g)
    aux = block_start[primary] + torch.randint(0, PSI, (B,), generator=g)
    zp, za = torch.randn(B, P, generator=g), torch.randn(B, P * PSI, generator=g)
    tensors = [t.to(DEVICE) for t in (zp, za, primary, aux, block_start, block_size, torch.rand(B))]
    zp, za = tensors[0].requires_grad_(), tensors[1].requires_grad_()

    def step():
        out = fn(*tensors)
        torch.autograd.grad(out.loss, (zp, za))

    measure(benchmark, step, B, "images_per_s")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N", SIZES)
def test_ppo_loss(benchmark, N, impl):
    benchmark.group = f"ppo N={N} K={sum(HEAD_SIZES)}"
    fn = implementation(impl, kernels.ppo_clip_loss, reference.ppo_clip_loss)
    g = torch.Generator().manual_seed(0)
    K = sum(HEAD_SIZES)
    actions = torch.stack([torch.randint(0, h, (N,), generator=g) for h in HEAD_SIZES], dim=1)
    mask = torch.rand(N, K, generator=g) < 0.5
    mask.scatter_(1, actions + torch.tensor([0, HEAD_SIZES[0]]), True)
    logits = torch.randn(N, K, generator=g)
    old_lp, adv, ret, values, old_values = (torch.randn(N, generator=g) for _ in range(5))
    tensors = [t.to(DEVICE) for t in (logits, actions, old_lp, adv, ret, values, old_values, mask)]
    logits, actions, old_lp, adv, ret, values, old_values, mask = tensors
    logits.requires_grad_()
    values.requires_grad_()

    def step():
        out = fn(logits, HEAD_SIZES, actions, old_lp, adv, ret, values, old_values,
                 action_mask=mask)
        torch.autograd.grad(out.loss, (logits, values))

    measure(benchmark, step, N, "rows_per_s")


@pytest.mark.parametrize("impl", IMPLS)
def test_gae(benchmark, impl):
    benchmark.group = f"gae T={T} N={N_ENVS}"
    fn = implementation(impl, kernels.gae, reference.gae)
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(T, N_ENVS, generator=g), torch.randn(T, N_ENVS, generator=g)
    dones = (torch.rand(T, N_ENVS, generator=g) < 0.05).float()
    args = [t.to(DEVICE) for t in (rewards, values, dones, torch.randn(N_ENVS, generator=g))]
    measure(benchmark, lambda: fn(*args, 0.99, 0.95), T * N_ENVS, "rows_per_s")
