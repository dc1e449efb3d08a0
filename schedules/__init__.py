"""Schedule rules for trit_decode_matmul, one class per target family and shape of work (dlight style).

`rules_for_target` lists the rules the compiler applies before dlight's defaults; `layout_for_target`
says which run-time weight layout those rules expect (the compiler repacks the checkpoint to it).
"""
from __future__ import annotations

import tvm

from .base import DECODE_SIMD16, DECODE_INT32, is_trit_decode_matmul
from .cpu import DenseLogitsCPU, TritGEMMCPU, TritGEMVCPU
from .cuda import TritGEMMCuda, TritGEMVCuda

__all__ = ["DECODE_SIMD16", "DECODE_INT32", "DenseLogitsCPU", "TritGEMMCPU", "TritGEMMCuda", "TritGEMVCPU", "TritGEMVCuda", "decode_for_target", "is_trit_decode_matmul", "layout_rows_for_target",
           "rules_for_target"]

LAYOUT_ROWS = 32  # CPU: 32 rows x 16-bit lanes = one 512-bit register; CUDA: one warp reads 32 rows' bytes


def rules_for_target(target: tvm.target.Target) -> list:
    if target.kind.name == "cuda":
        return [TritGEMVCuda(), TritGEMMCuda()]
    return [TritGEMVCPU(), TritGEMMCPU(), DenseLogitsCPU()]


def layout_rows_for_target(target: tvm.target.Target) -> int:
    """Rows interleaved in the run-time weight layout the rules expect (0 = the checkpoint's planes)."""
    del target  # every rule here reads the row-interleaved layout
    return LAYOUT_ROWS


def decode_for_target(target: tvm.target.Target) -> str:
    """GPUs decode in 32-bit integers (no 16-bit integer SIMD to gain there; TVM's CUDA code also computes
    16-bit products in C's int, without the wrap-around the CPU decode relies on)."""
    return DECODE_INT32 if target.kind.name == "cuda" else DECODE_SIMD16
