"""What MetaSchedule's build workers run for trit-tune, in a module of its own so a worker imports nothing else.

MetaSchedule starts fresh build workers for every batch of candidates, and its default build function first
imports all of TVM's tensor intrinsics (`tvm.s_tir.tensor_intrin`: hundreds of TVMScript functions parsed,
~30 s on a 2-core machine) before it compiles one kernel. The candidates trit-tune sends are scheduled
already and use none of them.
"""
from __future__ import annotations

import tvm


def compile_scheduled(mod: tvm.IRModule, target: tvm.target.Target, _params: dict | None) -> tvm.runtime.Module:
    """MetaSchedule's default build (s_tir.meta_schedule.builder.default_build) less that import."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)
