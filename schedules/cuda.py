"""CUDA rules for trit_decode_matmul."""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .base import is_trit_decode_matmul


class TritGEMVCuda(ScheduleRule):
    """One thread per output element, the float32 accumulator in a register, reduction serial.

    Correct for any row count; the baseline the tuned and split-K rules are measured against.
    """

    threads = 128

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if target.kind.name != "cuda" or not is_trit_decode_matmul(func):
            return None
        sch = s_tir.Schedule(func)
        acc, out = sch.get_sblock("trit_matmul"), sch.get_sblock("trit_out")
        *spatial, k = sch.get_loops(acc)
        bx, tx = sch.split(sch.fuse(*spatial), factors=[None, self.threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        sch.set_scope(acc, 0, "local")
        sch.reverse_compute_at(out, tx)
        return sch
