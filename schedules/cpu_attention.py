"""CPU rule for TVM's paged-KV-cache prefill attention kernel.

TVM writes it (relax/frontend/nn/llm/_prefill_kernels.py) as scalar loops over query heads, sequences
and queries, all serial: one core. Its outer loop over query heads has independent iterations (each
writes only its own heads' output and keeps its running softmax state in block-local buffers), so it
can run over the cores as it is. trit-compile's CPU builds replace the kernel without a sliding window by
trit_tvm.attention_cpu's (vectorized, reading only the sequence's pages); the sliding-window one this rule
still schedules is built into the cache but never called by trit_tvm's runtime (support_sliding_window=0,
sequences capped at the window), and it reads keys in TVM's page layout, not kv_append's key tiles.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

PREFILL_ATTENTION_SYMBOLS = ("batch_prefill_paged_kv_cpu", "batch_prefill_paged_kv_cpu_sliding_window")


class PagedPrefillAttentionCPU(ScheduleRule):
    """Query heads of the CPU prefill attention spread over the cores."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if target.kind.name != "llvm" or not isinstance(func, tirx.PrimFunc) or func.attrs is None:
            return None
        if func.attrs.get("global_symbol") not in PREFILL_ATTENTION_SYMBOLS:
            return None
        sch = s_tir.Schedule(func)
        try:
            heads = sch.get_loops(sch.get_sblock("attn"))[0]
            sch.parallel(heads)
        except (s_tir.ScheduleError, RuntimeError, ValueError):
            return None  # another TVM version's kernel: leave it as TVM wrote it
        return sch
