"""Small scratch buffers of CPU kernels on the stack (a pass over scheduled kernels).

TVM lowers a buffer of storage scope "local" on a CPU to a TVMBackendAllocWorkspace / FreeWorkspace pair
where it is allocated: only "global" buffers of constant size under 1 KB become stack arrays
(tirx.transform.LowerTVMBuiltin). A schedule's register tiles and step vectors ("local" by GPU habit) sit
inside the parallel row-panel loop, so every panel paid an allocate and a free per tile, and
the accumulators lived behind a pointer LLVM could not keep in registers. SmolLM2 at d=1 with int8
activations (AMD EPYC Zen 4, 2026-12-02): 64,590 workspace allocations per decode step, 69,192 at d=3 with
float activations. The pass sets every such buffer to "global" after the rules and any replayed tuning
record have run; it changes where a buffer lives, not what is computed.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx


def _blocks(sch: s_tir.Schedule, parent) -> list:
    """Every block under `parent`, outermost first."""
    return [b for child in sch.get_child_blocks(parent) for b in [child, *_blocks(sch, child)]]


def set_scratch_global(sch: s_tir.Schedule) -> bool:
    """Set the "local" buffers the blocks of sch write to "global", in place (recorded in its trace, so a
    tuning search's candidates are timed as the model runs them); whether any was."""
    try:
        root = sch.get_sblock("root")
    except (ValueError, RuntimeError, s_tir.ScheduleError):  # a function of loops only: no blocks, no buffers
        return False
    changed = False
    for block in _blocks(sch, root):
        for i, region in enumerate(sch.get(block).writes):
            if region.source.scope() == "local":
                sch.set_scope(block, i, "global")
                changed = True
    return changed


def scratch_buffers_global(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """func with the "local" buffers its blocks write set to "global" (unchanged when it has none)."""
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    return sch.mod["main"] if set_scratch_global(sch) else func


@tvm.transform.module_pass(opt_level=0, name="ScratchBuffersGlobal")
def scratch_buffers_on_stack(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
    """scratch_buffers_global on every PrimFunc of a module built for a CPU."""
    functions = {gv: scratch_buffers_global(f) if isinstance(f, tirx.PrimFunc) else f
                 for gv, f in mod.functions.items()}
    return tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)
