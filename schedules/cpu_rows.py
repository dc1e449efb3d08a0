"""CPU rules for the model's kernels around the trit operator that TVM's defaults leave slow.

On a single row (decode), dlight.cpu.Reduction parallelizes RMSNorm over the hidden axis (its analysis
drops the unit row axes; the norm weight's cast block then leads with the hidden axis), so every output
element recomputes the row's sum of squares: n² work, 0.4 ms per norm at hidden 896, a third of a decode
step of Qwen2.5-0.5B. Kernels with no reduction and no rule are left as scalar loops on one core.
"""
from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .base import is_trit_decode_matmul, static_extent, vectorize_lanes

PARALLEL_MIN_ELEMENTS = 1 << 14  # below this an elementwise kernel is cheaper on one core than a fork-join


def _regular(func, target: Target) -> bool:
    """A CPU kernel of plain compute blocks (not the trit operator, not the KV cache's hand-written
    attention, whose loops carry state and which dlight's analysis rejects)."""
    return (target.kind.name == "llvm" and isinstance(func, tirx.PrimFunc) and not is_trit_decode_matmul(func)
            and normalize_prim_func(s_tir.Schedule(func)) is not None)


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


class RowReductionCPU(ScheduleRule):
    """Kernels that reduce each row to scalars and then map the row with them (RMSNorm): one task per
    row, its reductions computed once inside it, the row's output vectorized."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not _regular(func, target):
            return None
        sch = s_tir.Schedule(func)
        *inner, out = sch.get_child_blocks(sch.get_sblock("root"))
        reductions = [b for b in inner if _is_reduction(sch, b)]
        if not reductions or _is_reduction(sch, out):
            return None
        out_iters = sch.get(out).iter_vars
        for block in reductions:
            spatial = [iv for iv in sch.get(block).iter_vars if iv.iter_type == tirx.IterVar.DataPar]
            if len(spatial) != len(out_iters) - 1 or len(spatial) == 0:
                return None
        try:
            for block in inner:
                if not _is_reduction(sch, block):
                    sch.compute_inline(block)
        except (s_tir.ScheduleError, RuntimeError, ValueError):
            return None
        loops = sch.get_loops(out)
        if len(loops) != len(out_iters):
            return None
        row = sch.fuse(*loops[:-1])
        vectorize_lanes(sch, loops[-1])
        for block in reversed(reductions):
            sch.compute_at(block, row, preserve_unit_loops=True)
        if static_extent(sch, row) != 1:
            sch.parallel(row)
        return sch


class ElementwiseCPU(ScheduleRule):
    """Kernels of injective blocks only (SiLU·mul, residual adds, RoPE, concatenations): inlined into one
    loop nest, the innermost axis vectorized, the rest over the cores when the kernel is big enough."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not _regular(func, target):
            return None
        sch = s_tir.Schedule(func)
        *inner, out = sch.get_child_blocks(sch.get_sblock("root"))
        if any(_is_reduction(sch, b) for b in inner + [out]):
            return None
        try:
            for block in inner:
                sch.compute_inline(block)
        except (s_tir.ScheduleError, RuntimeError, ValueError):
            return None
        loops = sch.get_loops(out)
        if not loops:
            return None
        extents = [static_extent(sch, lp) for lp in loops]
        vectorize_lanes(sch, loops[-1])
        if len(loops) > 1 and (None in extents or math.prod(extents) >= PARALLEL_MIN_ELEMENTS):
            sch.parallel(sch.fuse(*loops[:-1]))
        return sch
