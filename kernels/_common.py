"""Small helpers shared by the fused ops: launch checks and tile sizes."""
from __future__ import annotations

import os

import torch
import triton

# Read once, like triton itself: the interpreter is chosen when @triton.jit decorates.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements of one [rows, cols] tile. The interpreter's cost is per program instance, so it gets
# many rows per program; on a GPU about 8 fp32 per thread keeps the fused kernels free of register
# spills (checked with ptxas for sm_90: 1024 elements and 4 warps use about 90-110 registers).
TILE_ELEMENTS = 4096 if INTERPRET else 1024
ELEMENTS_PER_THREAD = 8
MAX_COLS = 16384


def check_device(*tensors: torch.Tensor) -> None:
    """Triton launches need CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    for t in tensors:
        if not (t.is_cuda or INTERPRET):
            raise RuntimeError("the triton kernels backend needs CUDA tensors, or CPU tensors with "
                               "TRITON_INTERPRET=1 set before rlaux_fast.kernels is imported; "
                               "use backend='torch' for the PyTorch reference")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def row_tile(rows: int, cols: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, num_warps): a whole row per tile, as many rows as fit TILE_ELEMENTS."""
    if cols > MAX_COLS:
        raise ValueError(f"rows of {cols} columns exceed the fused kernels' limit of {MAX_COLS}")
    block_cols = triton.next_power_of_2(max(cols, 1))
    block_rows = max(1, min(triton.next_power_of_2(max(rows, 1)), TILE_ELEMENTS // block_cols))
    num_warps = min(16, max(4, block_rows * block_cols // (32 * ELEMENTS_PER_THREAD)))
    return block_rows, block_cols, num_warps
