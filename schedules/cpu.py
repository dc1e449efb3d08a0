"""CPU (llvm: x86 and ARM) rules for trit_decode_matmul."""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .base import is_trit_decode_matmul


class TritMatmulCPU(ScheduleRule):
    """Output elements spread over cores, each a serial float32 dot product over the decoded row.

    The baseline every faster CPU rule is measured against; keeps dlight's rules off this operator.
    """

    chunk = 16

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if target.kind.name != "llvm" or not is_trit_decode_matmul(func):
            return None
        sch = s_tir.Schedule(func)
        acc, out = sch.get_sblock("trit_matmul"), sch.get_sblock("trit_out")
        *spatial, _k = sch.get_loops(acc)
        outer, inner = sch.split(sch.fuse(*spatial), factors=[None, self.chunk])
        sch.parallel(outer)
        sch.set_scope(acc, 0, "local")
        sch.reverse_compute_at(out, inner)
        return sch
