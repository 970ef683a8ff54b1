"""The public API of rlaux_fast.kernels: backend dispatch, the custom ops' registration
(torch.library.opcheck) and torch.compile(fullgraph=True) of code calling the fused ops."""
import os
import subprocess
import sys

import pytest
import torch

from rlaux_fast import kernels
from rlaux_fast.kernels import focal, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def focal_case(B=6, P=4, psi=3):
    g = torch.Generator().manual_seed(0)
    block_size = torch.full((P,), psi)
    block_start = torch.arange(P) * psi
    primary = torch.randint(0, P, (B,), generator=g)
    aux = block_start[primary] + torch.randint(0, psi, (B,), generator=g)
    tensors = (torch.randn(B, P, generator=g), torch.randn(B, P * psi, generator=g), primary, aux,
               block_start, block_size, torch.rand(B, generator=g))
    return [t.to(DEVICE) for t in tensors]


def ppo_case(N=6, head_sizes=(4, 3)):
    g = torch.Generator().manual_seed(0)
    actions = torch.stack([torch.randint(0, h, (N,), generator=g) for h in head_sizes], dim=1)
    tensors = (torch.randn(N, sum(head_sizes), generator=g), actions,
               *(torch.randn(N, generator=g) for _ in range(5)),
               torch.rand(N, sum(head_sizes), generator=g) < 0.8)
    tensors = [t.to(DEVICE) for t in tensors]
    tensors[-1][:, [0, 4]] = True  # at least one action allowed per head
    return tensors


def test_public_api():
    for name in ("multihead_focal_loss", "gae", "ppo_clip_loss", "FocalLoss", "PPOLoss",
                 "soft_block_targets", "multihead_log_softmax", "multihead_logprob_entropy",
                 "reference"):
        assert hasattr(kernels, name)
    assert kernels.reference is reference
    assert kernels.HAS_TRITON


def test_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(focal, "multihead_focal_loss", lambda *a: calls.append("triton"))
    monkeypatch.setattr(reference, "multihead_focal_loss", lambda *a: calls.append("torch"))
    case = focal_case()
    cpu = [t.cpu() for t in case]
    kernels.multihead_focal_loss(*cpu, backend="triton")
    kernels.multihead_focal_loss(*cpu, backend="torch")
    monkeypatch.delenv("RLAUX_KERNELS", raising=False)
    kernels.multihead_focal_loss(*cpu)  # auto: CPU tensors go to the reference
    monkeypatch.setenv("RLAUX_KERNELS", "triton")
    kernels.multihead_focal_loss(*cpu)
    monkeypatch.setenv("RLAUX_KERNELS", "torch")
    kernels.multihead_focal_loss(*cpu)
    assert calls == ["triton", "torch", "torch", "triton", "torch"]
    with pytest.raises(ValueError, match="unknown kernels backend"):
        kernels.multihead_focal_loss(*cpu, backend="cuda")


def test_without_triton_auto_uses_the_reference_and_triton_raises(monkeypatch):
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    monkeypatch.delenv("RLAUX_KERNELS", raising=False)
    case = focal_case()
    out = kernels.multihead_focal_loss(*case)
    torch.testing.assert_close(out.loss, reference.multihead_focal_loss(*case).loss)
    with pytest.raises(RuntimeError, match="needs triton"):
        kernels.gae(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2), 0.9, 0.9,
                    backend="triton")


def test_custom_ops_pass_opcheck():
    zp, za, primary, aux, block_start, block_size, _ = focal_case()
    torch.library.opcheck(torch.ops.rlaux.focal_loss.default,
                          (zp.requires_grad_(), za.requires_grad_(), primary, aux, block_start,
                           block_size, 2.0, True, True))
    logits, actions, old_lp, adv, ret, values, old_values, mask = ppo_case()
    torch.library.opcheck(torch.ops.rlaux.ppo_rows.default,
                          (logits.requires_grad_(), [4, 3], actions, old_lp, adv, ret,
                           values.requires_grad_(), old_values, mask, 0.2, True, True))
    torch.library.opcheck(torch.ops.rlaux.gae.default,
                          (torch.randn(5, 3), torch.randn(5, 3), torch.zeros(5, 3), torch.randn(3),
                           0.9, 0.8))


def test_torch_compile_fullgraph_of_the_fused_ops():
    zp, za, primary, aux, block_start, block_size, weights = focal_case()
    logits, actions, old_lp, adv, ret, values, old_values, mask = ppo_case()
    rewards = torch.randn(5, 3, device=DEVICE)

    def step(zp, za, logits, values, backend):
        focal_out = kernels.multihead_focal_loss(zp, za, primary, aux, block_start, block_size,
                                                 weights, backend=backend)
        advantages, returns = kernels.gae(rewards, rewards, torch.zeros_like(rewards),
                                          rewards[0], 0.99, 0.95, backend=backend)
        ppo_out = kernels.ppo_clip_loss(logits, (4, 3), actions, old_lp, adv, ret, values,
                                        old_values, action_mask=mask, backend=backend)
        return focal_out.loss + ppo_out.loss + advantages.sum() + returns.sum(), ppo_out.approx_kl

    def grads(fn):
        inputs = [t.detach().clone().requires_grad_() for t in (zp, za, logits, values)]
        loss, kl = fn(*inputs, "triton")
        loss.backward()
        return [loss, kl] + [t.grad for t in inputs]

    compiled = torch.compile(step, fullgraph=True)  # fails on any graph break
    for x, y in zip(grads(compiled), grads(step)):
        torch.testing.assert_close(x, y)
    # the default backend (reads RLAUX_KERNELS) traces without a graph break too
    explained = torch._dynamo.explain(step)(zp, za, logits, values, None)
    assert explained.graph_break_count == 0


@pytest.mark.parametrize("tile", [1024, 128])
def test_gpu_tile_sizes_under_the_interpreter(monkeypatch, tile):
    # GPUs get 1024-element tiles (fewer rows per program than the interpreter's default);
    # 128 elements leaves one row per program
    from rlaux_fast.kernels import _common
    monkeypatch.setattr(_common, "TILE_ELEMENTS", tile)
    case = focal_case(B=37, P=5, psi=25)
    a = kernels.multihead_focal_loss(*case, backend="triton")
    b = kernels.multihead_focal_loss(*case, backend="torch")
    torch.testing.assert_close(a.primary, b.primary)
    torch.testing.assert_close(a.aux, b.aux)
    logits, actions, *rest, mask = ppo_case(N=37, head_sizes=(100, 21))
    a = kernels.ppo_clip_loss(logits, (100, 21), actions, *rest, action_mask=mask, backend="triton")
    b = kernels.ppo_clip_loss(logits, (100, 21), actions, *rest, action_mask=mask, backend="torch")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


COMPILE_FOR_SM90 = r"""
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlaux_fast.kernels._common import row_tile
focal, gae, ppo = (importlib.import_module("rlaux_fast.kernels." + m) for m in ("focal", "gae", "ppo"))

def build(fn, types, constexprs, num_warps=4):
    names = [n for n in fn.arg_names if n not in constexprs]
    signature = dict(zip(names, types.split()), **{k: "constexpr" for k in constexprs})
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

for dt in ("fp32", "bf16", "fp16"):
    rows, _, warps = row_tile(4096, 128)
    build(focal._focal_kernel, f"*{dt} *{dt} *i64 *i64 *i64 *i64 *fp32 *fp32 *fp32 *fp32 "
          "i32 i32 i32 i32 i32 fp32", dict(SOFT=True, COMPUTE_GRAD=True, BLOCK_B=rows, BLOCK_P=32,
                                           BLOCK_A=128), warps)
    build(ppo._ppo_kernel, f"*{dt} *u8 *i64 *i32 *fp32 *fp32 *fp32 *fp32 *fp32 *fp32 *fp32 *fp32 "
          "*fp32 *fp32 *fp32 *fp32 i32 i32 i32 i32 i32 fp32 fp32 fp32",
          dict(H=2, HAS_MASK=True, CLIP_VALUE=True, COMPUTE_GRAD=True, BLOCK_N=rows, BLOCK_K=128),
          warps)
build(gae._gae_kernel, "*fp32 *bf16 *u8 *fp32 *fp32 *fp32 i32 i32 fp32 fp32", dict(BLOCK_N=128))
"""


def test_kernels_compile_for_a_gpu_target(tmp_path):
    # The interpreter runs the kernels as Python; this compiles them for sm_90 (down to ptxas,
    # bundled with triton) without a GPU, catching what only the real compiler rejects.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
