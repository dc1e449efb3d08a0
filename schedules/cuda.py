"""CUDA rules for trit_decode_matmul on the row-interleaved weight layout."""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .base import is_trit_decode_matmul, layout_rows, trit_blocks


class TritGEMVCuda(ScheduleRule):
    """One thread per output element: a warp's 32 threads are 32 consecutive rows, so each of their
    byte loads is one coalesced 32-byte transaction; group dot products and steps stay in registers.

    Correct for any row count (decode and prefill); the baseline a split-K rule is measured against.
    """

    threads = 128

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if target.kind.name != "cuda" or not is_trit_decode_matmul(func) or layout_rows(func) == 0:
            return None
        sch = s_tir.Schedule(func)
        b = trit_blocks(sch)
        for name in ("trit_decode", "trit_step", "trit_decode_tail"):
            if name in b:
                sch.compute_inline(b[name])
        first = b.get("trit_matmul", b.get("trit_matmul_tail"))
        loops = sch.get_loops(first)
        iters = sch.get(first).iter_vars
        spatial = [lp for lp, iv in zip(loops, iters) if iv.iter_type == tirx.IterVar.DataPar]
        reduce = [lp for lp, iv in zip(loops, iters) if iv.iter_type == tirx.IterVar.CommReduce]
        bx, tx = sch.split(sch.fuse(*spatial), factors=[None, self.threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        if "trit_matmul" in b:
            for name in ("trit_xsum", "trit_group_dot"):
                sch.compute_at(b[name], reduce[-1], preserve_unit_loops=True)
                sch.set_scope(b[name], 0, "local")
        for name in ("trit_matmul_tail", "trit_out"):
            if name in b and b[name] != first:
                sch.reverse_compute_at(b[name], tx, preserve_unit_loops=True)
        for name in ("trit_matmul", "trit_matmul_tail"):
            if name in b:
                sch.set_scope(b[name], 0, "local")
        return sch
