"""The Relax → VM lowering pipeline: TVM's zero pipeline, then schedules/ rules and dlight, then the VM.

The trit_decode_matmul PrimFuncs are marked opaque so FuseOps keeps each one a kernel of its own, with
the attribute the schedule rules match.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.s_tir import dlight

from schedules import rules_for_target
from schedules.cpu_scratch import scratch_buffers_on_stack
from schedules.prefetch import prefetch_trit_weights


def schedule_pass(target: tvm.target.Target, prefetch: bool = True,
                  choices: dict[str, dict] | None = None) -> tvm.transform.Pass:
    """schedules/ rules for this target first, dlight's defaults for everything else; on CPUs then the
    decode GEMVs' weight prefetches (schedules/prefetch.py), also into kernels scheduled from tuning records
    (prefetch=False: without them, for benchmarks that compare). choices: trit-tune's picks for the
    hand-written kernels (trit_tvm/variant_tuning.py)."""
    rules = list(rules_for_target(target, choices))
    if target.kind.name == "cuda":
        rules += [dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                  dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()]
        return dlight.ApplyDefaultSchedule(*rules)
    rules += [dlight.cpu.GEMV(), dlight.cpu.Reduction()]
    passes = [dlight.ApplyDefaultSchedule(*rules), scratch_buffers_on_stack]
    return tvm.transform.Sequential(passes + [prefetch_trit_weights] if prefetch else passes)


def fusion_passes() -> list[tvm.transform.Pass]:
    """Relax → fused TIR kernels (TVM's zero pipeline): what tuning and scheduling both see."""
    return [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR(), relax.transform.DeadCodeElimination()]


def trit_pipeline(target: tvm.target.Target, tuned: tvm.transform.Pass | None = None,
                  choices: dict[str, dict] | None = None) -> tvm.transform.Pass:
    """tuned: a pass that schedules kernels from tuning records first (trit_tvm.tuning); choices: the tuned
    variants of the hand-written kernels (trit_tvm.variant_tuning)."""
    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        passes = [
            *fusion_passes(),
            *([tuned] if tuned is not None else []),
            schedule_pass(target, choices=choices),
            relax.transform.RewriteDataflowReshape(),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
            relax.transform.StaticPlanBlockMemory(),
        ]
        if target.kind.name == "cuda":
            passes.append(relax.transform.RewriteCUDAGraph())
        passes += [
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            relax.transform.AttachGlobalSymbol(),
        ]
        return tvm.transform.Sequential(passes)(mod)

    return _pipeline
