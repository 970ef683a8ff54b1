"""The PPO clipped loss and the multi-head policy helpers: hand-computed values, the reference
against float64 autograd, and the fused Triton op (the interpreter on CPU) against both."""
import math

import pytest
import torch

from rlaux_fast import kernels
from rlaux_fast.kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(N, head_sizes, masked, seed=0, log_ratio_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    K = sum(head_sizes)
    logits = torch.randn(N, K, generator=g) * 2
    actions = torch.stack([torch.randint(0, h, (N,), generator=g) for h in head_sizes], dim=1)
    mask = None
    if masked:  # a random mask that always allows the taken action
        mask = torch.rand(N, K, generator=g) < 0.5
        starts = torch.tensor([0, *head_sizes[:-1]]).cumsum(0)
        mask.scatter_(1, actions + starts, True)
    with torch.no_grad():
        logprob, _ = reference.multihead_logprob_entropy(logits, head_sizes, actions, mask)
    old_logprobs = logprob + torch.randn(N, generator=g) * log_ratio_scale
    advantages = torch.randn(N, generator=g) + 0.3
    returns = torch.randn(N, generator=g)
    values = torch.randn(N, generator=g)
    old_values = values + torch.randn(N, generator=g) * 0.3
    tensors = (logits, actions, old_logprobs, advantages, returns, values, old_values, mask)
    return [None if t is None else t.to(DEVICE) for t in tensors]


def run(backend, case, head_sizes, dtype=torch.float32, **kw):
    """Forward, then backward of loss + policy_loss + 0.3 * entropy + value_loss (every output's
    gradient path). Returns (PPOLoss, grad of logits, grad of values)."""
    logits, actions, old_logprobs, advantages, returns, values, old_values, mask = case
    logits = logits.to(dtype).requires_grad_()
    values = values.clone().requires_grad_()
    if backend == "float64":
        f64 = lambda t: t.double()  # noqa: E731
        out = reference.ppo_clip_loss(logits.double(), head_sizes, actions, f64(old_logprobs),
                                      f64(advantages), f64(returns), values.double(),
                                      f64(old_values), action_mask=mask, **kw)
    else:
        out = kernels.ppo_clip_loss(logits, head_sizes, actions, old_logprobs, advantages, returns,
                                    values, old_values, action_mask=mask, backend=backend, **kw)
    (out.loss + out.policy_loss + 0.3 * out.entropy + out.value_loss).backward()
    return out, logits.grad, values.grad


def compare(case, head_sizes, dtype=torch.float32, rtol=1e-5, atol=1e-5, **kw):
    outs = {b: run(b, case, head_sizes, dtype, **kw) for b in ("triton", "torch", "float64")}
    ref, ref_gz, ref_gv = outs["float64"]
    for backend in ("triton", "torch"):
        out, gz, gv = outs[backend]
        assert gz.dtype == dtype
        for x, y in zip([*out, gz, gv], [*ref, ref_gz, ref_gv]):
            assert torch.isfinite(x).all()
            torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol)
    return outs


# ----------------------------------------------------------------------------------------------
# hand-computed values
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ppo_hand_computed(backend):
    # one head of 2 with zero logits: log pi = ln 1/2, entropy ln 2 per row.
    # row 0: ratio 1.5, adv +1: max(-1.5, -1.2) = -1.2 (clipped: no policy gradient)
    # row 1: ratio 0.5, adv -1: max(0.5, 0.8) = 0.8 (clipped: no policy gradient)
    # values v = [1, 0], old v = [0, 0], R = [0.5, 1]:
    #   row 0: v_c = 0.2: max(0.25, 0.09) = 0.25 (unclipped term: d/dv = v - R = 0.5)
    #   row 1: v_c = 0:   max(1, 1) = 1 (a tie inside the clamp: d/dv = v - R = -1)
    logits = torch.zeros(2, 2, device=DEVICE, requires_grad=True)
    values = torch.tensor([1.0, 0.0], device=DEVICE, requires_grad=True)
    half = math.log(0.5)
    out = kernels.ppo_clip_loss(
        logits, (2,), torch.tensor([[0], [1]], device=DEVICE),
        torch.tensor([half - math.log(1.5), half - math.log(0.5)], device=DEVICE),
        torch.tensor([1.0, -1.0], device=DEVICE), torch.tensor([0.5, 1.0], device=DEVICE), values,
        torch.zeros(2, device=DEVICE), normalize_advantages=False, backend=backend)
    expected = dict(policy_loss=(-1.2 + 0.8) / 2, value_loss=0.5 * (0.25 + 1) / 2,
                    entropy=math.log(2), approx_kl=((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2,
                    clip_fraction=1.0)
    expected["loss"] = expected["policy_loss"] - 0.01 * math.log(2) + 0.5 * expected["value_loss"]
    for name, value in expected.items():
        torch.testing.assert_close(getattr(out, name).item(), value, msg=name)
    out.loss.backward()
    torch.testing.assert_close(logits.grad.cpu(), torch.zeros(2, 2))
    # d loss/dv_i = vf_coef * 0.5 * (1/N) * 2 (v_i - R_i)
    torch.testing.assert_close(values.grad.cpu(), torch.tensor([0.5 * 0.5 * 0.5, 0.5 * 0.5 * -1.0]))


def test_multihead_log_softmax_and_entropy_by_hand():
    # heads (3, 2); row 0 masks the middle action of head 0: it is a 2-way uniform choice there
    logits = torch.zeros(1, 5, device=DEVICE)
    mask = torch.tensor([[True, False, True, True, True]], device=DEVICE)
    logp = kernels.multihead_log_softmax(logits, (3, 2), mask)
    half = math.log(0.5)
    torch.testing.assert_close(logp.cpu(), torch.tensor([[half, -math.inf, half, half, half]]))
    logprob, entropy = kernels.multihead_logprob_entropy(logits, (3, 2), torch.tensor([[2, 1]]).to(DEVICE), mask)
    torch.testing.assert_close(logprob.cpu(), torch.tensor([2 * half]))
    torch.testing.assert_close(entropy.cpu(), torch.tensor([2 * math.log(2)]))


# ----------------------------------------------------------------------------------------------
# the fused op against the reference and float64
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head_sizes", [(5,), (100, 21), (7, 3, 4)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("N", [1, 3, 100, 257])
def test_ppo_matches_reference_and_float64(N, masked, head_sizes):
    compare(make_case(N, head_sizes, masked, seed=N), head_sizes)


@pytest.mark.parametrize("clip_value,normalize", [(False, True), (True, False), (False, False)])
def test_ppo_options(clip_value, normalize):
    head_sizes = (20, 21)
    compare(make_case(64, head_sizes, True, log_ratio_scale=1.0), head_sizes, clip=0.1,
            vf_coef=0.7, ent_coef=0.05, clip_value=clip_value, normalize_advantages=normalize)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ppo_low_precision(dtype):
    head_sizes = (100, 21)
    case = make_case(100, head_sizes, True)
    case[0] = case[0].to(dtype).float()  # every backend sees the same rounded logits
    compare(case, head_sizes, dtype=dtype, rtol=2e-2, atol=2e-3)


def test_ppo_single_sample_minibatch():
    # the normalised advantage of one sample is 0 (population std 0, not NaN)
    head_sizes = (100, 21)
    outs = compare(make_case(1, head_sizes, True), head_sizes)
    assert outs["triton"][0].policy_loss.item() == 0.0


def test_ppo_masks_leaving_one_allowed_action():
    head_sizes = (6, 4)
    case = make_case(9, head_sizes, True)
    logits, actions, old_logprobs, *_ = case
    mask = torch.zeros_like(case[-1])
    mask.scatter_(1, actions + torch.tensor([0, 6], device=DEVICE), True)  # only the taken actions
    case[-1] = mask
    case[2] = torch.zeros_like(old_logprobs)  # log pi = 0 for a forced action: ratio 1
    outs = compare(case, head_sizes)
    out, gz, _ = outs["triton"]
    assert out.entropy.item() == 0.0 and out.approx_kl.item() == 0.0
    assert (gz == 0).all()  # nothing a forced choice's logits can change
    logp = kernels.multihead_log_softmax(logits, head_sizes, mask)
    assert (logp[mask] == 0).all() and (logp[~mask] == -math.inf).all()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ppo_extreme_log_ratios(sign):
    # log-ratios far beyond the clamp of +-20: a finite loss, and no gradient through the clamp
    head_sizes = (100, 21)
    case = make_case(50, head_sizes, True)
    case[2] = case[2] + sign * torch.linspace(-1000, 1000, 50, device=DEVICE).abs()
    outs = compare(case, head_sizes, rtol=1e-5, atol=1e-4)
    assert math.isfinite(outs["triton"][0].approx_kl.item())


def test_ppo_values_gradient_only():
    # logits without grad: only the value head's gradient
    head_sizes = (5, 3)
    logits, actions, old_lp, adv, ret, values, old_values, mask = make_case(10, head_sizes, False)
    grads = []
    for backend in ("triton", "torch"):
        v = values.clone().requires_grad_()
        out = kernels.ppo_clip_loss(logits, head_sizes, actions, old_lp, adv, ret, v, old_values,
                                    backend=backend)
        out.loss.backward()
        grads.append(v.grad)
    torch.testing.assert_close(grads[0], grads[1])
