"""The focal loss of both heads: hand-computed values, the reference against float64 autograd, and
the fused Triton op (the interpreter on CPU) against both."""
import math

import pytest
import torch

from rlaux_fast import kernels
from rlaux_fast.kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NON_UNIFORM = [2, 3, 4, 1, 5]


def hierarchy(P, psi):
    """block_start, block_size [P] for a uniform psi (int) or one size per primary class (list)."""
    sizes = torch.tensor(psi if isinstance(psi, list) else [psi] * P, device=DEVICE)
    return sizes.cumsum(0) - sizes, sizes


def make_case(B, P, psi, weights, seed=0, saturate=True):
    g = torch.Generator().manual_seed(seed)
    block_start, block_size = hierarchy(P, psi)
    P, A = len(block_size), int(block_size.sum())
    primary_labels = torch.randint(0, P, (B,), generator=g).to(DEVICE)
    offset = (torch.rand(B, generator=g).to(DEVICE) * block_size[primary_labels]).long()
    aux_labels = block_start[primary_labels] + offset
    primary_logits = (torch.randn(B, P, generator=g) * 4).to(DEVICE)
    aux_logits = (torch.randn(B, A, generator=g) * 4).to(DEVICE)
    if saturate:  # saturated logits: one row right at +-100, one row wrong at +-100
        primary_logits[0] = -100.0
        primary_logits[0, primary_labels[0]] = 100.0
        aux_logits[0] = -100.0
        aux_logits[0, aux_labels[0]] = 100.0
        aux_logits[-1] = 100.0
        aux_logits[-1, aux_labels[-1]] = -100.0
    w = {"none": None, "random": torch.rand(B, generator=g).to(DEVICE) * 2,
         "zero": torch.zeros(B, device=DEVICE)}[weights]
    return primary_logits, aux_logits, primary_labels, aux_labels, block_start, block_size, w


def run(backend, primary_logits, aux_logits, *rest, dtype=None, soft_target=True):
    """Forward + backward of loss + 0.5 * sum(primary) + 0.25 * sum(aux): checks every output's
    gradient path. Returns (outputs, grad of primary logits, grad of aux logits)."""
    dtype = dtype or primary_logits.dtype
    zp = primary_logits.to(dtype).requires_grad_()
    za = aux_logits.to(dtype).requires_grad_()
    if backend == "float64":
        out = reference.multihead_focal_loss(zp.double(), za.double(), *rest, soft_target=soft_target)
    else:
        out = kernels.multihead_focal_loss(zp, za, *rest, soft_target=soft_target, backend=backend)
    (out.loss + 0.5 * out.primary.sum() + 0.25 * out.aux.sum()).backward()
    return out, zp.grad, za.grad


def assert_close(a, b, rtol, atol):
    for x, y in zip(a, b):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol)


def compare(case, dtype=torch.float32, soft_target=True, rtol=1e-5, atol=1e-5):
    outs = {b: run(b, *case, dtype=dtype, soft_target=soft_target)
            for b in ("triton", "torch", "float64")}
    for backend in ("triton", "torch"):
        out, gp, ga = outs[backend]
        assert out.primary.dtype == out.aux.dtype == torch.float32
        assert gp.dtype == ga.dtype == dtype
        ref, rgp, rga = outs["float64"]
        assert_close([*out, gp, ga], [*ref, rgp, rga], rtol, atol)


# ----------------------------------------------------------------------------------------------
# hand-computed values
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("psi", [1, 2, 5])
def test_soft_targets_are_the_block_softmax_of_the_one_hot(psi):
    block_start, block_size = hierarchy(3, psi)
    primary = torch.tensor([0, 2], device=DEVICE)
    aux = block_start[primary] + torch.tensor([0, psi - 1], device=DEVICE)
    t = kernels.soft_block_targets(aux, primary, block_start, block_size, 3 * psi)
    assert t.dtype == torch.float32 and t.shape == (2, 3 * psi)
    expected = torch.zeros(2, 3 * psi)
    expected[0, :psi] = 1 / (math.e + psi - 1)
    expected[0, 0] = math.e / (math.e + psi - 1)
    expected[1, 2 * psi:] = 1 / (math.e + psi - 1)
    expected[1, 3 * psi - 1] = math.e / (math.e + psi - 1)
    torch.testing.assert_close(t.cpu(), expected)
    assert torch.allclose(t.sum(1), torch.ones(2, device=DEVICE))
    hard = kernels.soft_block_targets(aux, primary, block_start, block_size, 3 * psi, soft=False)
    torch.testing.assert_close(hard, torch.nn.functional.one_hot(aux, 3 * psi).float())


def test_soft_targets_non_uniform_blocks():
    block_start, block_size = hierarchy(3, [2, 3, 4])
    t = kernels.soft_block_targets(torch.tensor([3], device=DEVICE), torch.tensor([1], device=DEVICE),
                                   block_start, block_size, 9)
    d = math.e + 2
    torch.testing.assert_close(t.cpu(), torch.tensor([[0, 0, 1 / d, math.e / d, 1 / d, 0, 0, 0, 0]]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_focal_loss_hand_computed(backend):
    # primary logits [ln 3, 0]: p = [3/4, 1/4]
    #   label 0: -(1/4)^2 ln(3/4);  label 1: -(3/4)^2 ln(1/4)
    # aux head of 4 (two blocks of psi = 2), logits ln 3 on the chosen class and 0 elsewhere:
    #   p = [1/2, 1/6, 1/6, 1/6] (chosen first), soft target [e, 1] / (e + 1) on the block:
    #   -(e (1/2)^2 ln(1/2) + (5/6)^2 ln(1/6)) / (e + 1);  hard: -(1/2)^2 ln(1/2)
    z = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]], device=DEVICE)
    labels = torch.tensor([0, 1], device=DEVICE)
    block_start, block_size = torch.tensor([0, 2], device=DEVICE), torch.tensor([2, 2], device=DEVICE)
    aux_logits = torch.tensor([[math.log(3), 0, 0, 0], [0, 0, math.log(3), 0]], device=DEVICE)
    aux_labels = torch.tensor([0, 2], device=DEVICE)
    weights = torch.tensor([1.0, 0.5], device=DEVICE)
    out = kernels.multihead_focal_loss(z, aux_logits, labels, aux_labels, block_start, block_size,
                                       weights, backend=backend)
    right, wrong = -(1 / 16) * math.log(3 / 4), -(9 / 16) * math.log(1 / 4)
    chosen, other = -(1 / 4) * math.log(1 / 2), -(25 / 36) * math.log(1 / 6)
    aux = (math.e * chosen + other) / (math.e + 1)
    torch.testing.assert_close(out.primary.cpu(), torch.tensor([right, wrong]))
    torch.testing.assert_close(out.aux.cpu(), torch.tensor([aux, aux]))
    torch.testing.assert_close(out.loss.item(), (right + wrong) / 2 + (aux + 0.5 * aux) / 2)
    hard = kernels.multihead_focal_loss(z, aux_logits, labels, aux_labels, block_start, block_size,
                                        soft_target=False, backend=backend)
    torch.testing.assert_close(hard.aux.cpu(), torch.tensor([chosen, chosen]))


# ----------------------------------------------------------------------------------------------
# the fused op against the reference and float64
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["none", "random", "zero"])
@pytest.mark.parametrize("P,psi", [(5, 1), (5, 2), (20, 5), (5, NON_UNIFORM)])
@pytest.mark.parametrize("B", [1, 3, 100, 257])
def test_focal_matches_reference_and_float64(B, P, psi, weights):
    compare(make_case(B, P, psi, weights, seed=B + P))


@pytest.mark.parametrize("P,psi", [(20, 2), (5, NON_UNIFORM)])
@pytest.mark.parametrize("B", [3, 257])
def test_focal_hard_targets(B, P, psi):
    compare(make_case(B, P, psi, "random"), soft_target=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [3, 257])
def test_focal_low_precision(B, dtype):
    # logits are rounded to dtype first, so all backends see the same inputs; the gradient is
    # returned in dtype (and bf16 stores truncate under the interpreter): loose tolerance
    compare(make_case(B, 20, 5, "random"), dtype=dtype, rtol=2e-2, atol=2e-3)


def test_focal_zero_weights_give_exactly_zero_aux_term():
    case = make_case(100, 20, 5, "zero")
    for backend in ("triton", "torch"):
        out, _, ga = run(backend, *case)
        torch.testing.assert_close(out.loss, out.primary.mean(), rtol=0, atol=0)
        assert torch.isfinite(ga).all()


def test_focal_saturated_logits_are_finite():
    case = make_case(4, 5, 2, "none")
    for backend in ("triton", "torch"):
        out, gp, ga = run(backend, *case)
        assert out.primary[0].item() == 0.0  # confidently right: (1 - p)^2 = 0
        # aux row 0 is right at +100 but the soft target puts 1/(e + 1) on the block's other
        # class, at -100: log p = -200 there and (1 - p)^2 = 1
        torch.testing.assert_close(out.aux[0].item(), 200 / (math.e + 1))
        assert out.aux[-1].item() > 100  # confidently wrong
        assert torch.isfinite(gp).all() and torch.isfinite(ga).all()


def test_focal_no_grad_skips_gradient_buffers():
    case = make_case(100, 20, 5, "random")
    with torch.no_grad():
        out = kernels.multihead_focal_loss(*case, backend="triton")
    ref = kernels.multihead_focal_loss(*case, backend="torch")
    torch.testing.assert_close(out.loss, ref.loss.detach())


def test_focal_gradient_of_weights():
    primary_logits, aux_logits, *rest, weights = make_case(7, 5, 2, "random")
    weights.requires_grad_()
    for backend in ("triton", "torch"):
        weights.grad = None
        out = kernels.multihead_focal_loss(primary_logits, aux_logits, *rest, weights,
                                           backend=backend)
        out.loss.backward()
        torch.testing.assert_close(weights.grad, out.aux.detach() / 7)
