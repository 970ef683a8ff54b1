"""GAE: a hand-computed rollout crossing an episode boundary, and the fused reverse scan (the
interpreter on CPU) against the reference and float64."""
import pytest
import torch

from rlaux_fast import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gae_hand_computed_across_an_episode_boundary(backend):
    # gamma = lam = 0.5; the episode ends at t = 1, so V_2 and A_2 do not flow into t = 1.
    # t=2: delta = 3 + 0.5*2 - 1.5 = 2.5;            A = 2.5
    # t=1: delta = 2 - 1 = 1 (done);                 A = 1
    # t=0: delta = 1 + 0.5*1 - 0.5 = 1;              A = 1 + 0.25*1 = 1.25
    col = lambda *x: torch.tensor(x, device=DEVICE)[:, None]  # noqa: E731
    rewards, values, dones = col(1.0, 2.0, 3.0), col(0.5, 1.0, 1.5), col(0.0, 1.0, 0.0)
    adv, ret = kernels.gae(rewards, values, dones, torch.tensor([2.0], device=DEVICE), 0.5, 0.5,
                           backend=backend)
    torch.testing.assert_close(adv.cpu(), torch.tensor([[1.25], [1.0], [2.5]]))
    torch.testing.assert_close(ret.cpu(), torch.tensor([[1.75], [2.0], [4.0]]))


@pytest.mark.parametrize("dones_dtype", [torch.float32, torch.bool])
@pytest.mark.parametrize("T,N", [(1, 1), (20, 100), (7, 1500)])
def test_gae_matches_reference_and_float64(T, N, dones_dtype):
    g = torch.Generator().manual_seed(T * N)
    rewards, values = torch.randn(T, N, generator=g), torch.randn(T, N, generator=g)
    dones = (torch.rand(T, N, generator=g) < 0.2).to(dones_dtype)
    last_values = torch.randn(N, generator=g)
    args = [t.to(DEVICE) for t in (rewards, values, dones, last_values)]
    exact = kernels.gae(*[t.double() for t in args], 0.99, 0.95, backend="torch")
    for backend in ("triton", "torch"):
        adv, ret = kernels.gae(*args, 0.99, 0.95, backend=backend)
        assert adv.dtype == ret.dtype == torch.float32
        torch.testing.assert_close(adv.double(), exact[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ret.double(), exact[1], rtol=1e-5, atol=1e-5)


def test_gae_low_precision_inputs_and_strided_rewards():
    # bf16 values and a broadcast (stride-0) reward row, as the agent's rollout builds them
    T, N = 20, 100
    rewards = torch.randn(T, device=DEVICE)[:, None].expand(-1, N)
    values = torch.randn(T, N, device=DEVICE).bfloat16()
    dones = torch.zeros(T, N, device=DEVICE)
    dones[-1] = 1
    last = torch.randn(N, device=DEVICE)
    a = kernels.gae(rewards, values, dones, last, 0.99, 0.95, backend="triton")
    b = kernels.gae(rewards, values, dones, last, 0.99, 0.95, backend="torch")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
