"""Test-wide environment; it must run before anything imports rlaux_fast.kernels."""
import os
import tempfile

import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates: without a GPU the fused kernels run
# in the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A private inductor cache, so that test runs never share compiled code by accident.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlaux-inductor-")
