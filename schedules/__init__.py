"""Schedule rules for trit_decode_matmul, one class per target family and shape of work (dlight style).

`rules_for_target` lists the rules the compiler applies before dlight's defaults.
"""
from __future__ import annotations

import tvm

from .base import is_trit_decode_matmul
from .cpu import TritMatmulCPU
from .cuda import TritGEMVCuda

__all__ = ["TritGEMVCuda", "TritMatmulCPU", "is_trit_decode_matmul", "rules_for_target"]


def rules_for_target(target: tvm.target.Target) -> list:
    if target.kind.name == "cuda":
        return [TritGEMVCuda()]
    return [TritMatmulCPU()]
