"""MetaSchedule tuning of the decode GEMV kernels, records under tuning_logs/<target key>/.

The search space is the hand rule (schedules.TritGEMVCPU) with its two tunable knobs: row panels per
parallel task and the unroll depth of the block loop. Measurements run locally or, with an RPC tracker,
on every server registered under a key (TVM's own distributed runners). trit-compile applies matching
records (relax MetaScheduleApplyDatabase) before the hand rules, which schedule everything else.
"""
from __future__ import annotations

from pathlib import Path

import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from schedules import TritGEMVCPU, is_trit_decode_matmul
from schedules.base import row_count

from .errors import CompileError
from .pipeline import fusion_passes
from .targets import target_key

DEFAULT_LOGS = Path(__file__).resolve().parent.parent / "tuning_logs"
BUILD_TIMEOUT_S = 300


def logs_dir(root: Path, target: tvm.target.Target) -> Path:
    return Path(root) / target_key(target)


def fused_module(mod: tvm.IRModule) -> tvm.IRModule:
    """The Relax module after the same lowering/fusion trit-compile does, before scheduling."""
    return tvm.transform.Sequential(fusion_passes())(mod)


def decode_gemv_kernels(mod: tvm.IRModule) -> dict[str, tvm.tirx.PrimFunc]:
    """The static-shape (one row of x) trit kernels of a fused module, by name."""
    return {gv.name_hint: f for gv, f in mod.functions.items()
            if is_trit_decode_matmul(f) and row_count(f) == 1}


def _space(sch: tvm.s_tir.Schedule) -> tvm.s_tir.Schedule:
    return TritGEMVCPU().schedule(sch, tunable=True)


def make_runner(rpc_tracker: str | None, rpc_key: str | None, timeout_s: int = 60):
    """Local measurement, or TVM's RPC runner spreading trials over a tracker's servers."""
    if not rpc_tracker:
        return ms.runner.LocalRunner(timeout_sec=timeout_s)
    host, _, port = rpc_tracker.rpartition(":")
    if not host or not port.isdigit() or not rpc_key:
        raise CompileError(f"--rpc-tracker must be HOST:PORT and --rpc-key given (got {rpc_tracker!r}, {rpc_key!r})")
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=rpc_key,
                                 session_timeout_sec=timeout_s)
    return ms.runner.RPCRunner(rpc_config=config)


def tune_kernels(kernels: dict[str, tvm.tirx.PrimFunc], target: tvm.target.Target, work_dir: Path,
                 trials_per_kernel: int, runner=None) -> ms.Database:
    """Tune each kernel's knobs; the JSON database in work_dir accumulates across runs."""
    if target.kind.name != "llvm":
        raise CompileError(f"tuning is implemented for CPU (llvm) targets; {target.kind.name} kernels use the "
                           "hand rules")
    if not kernels:
        raise CompileError("the model has no static-shape trit kernels to tune")
    work_dir.mkdir(parents=True, exist_ok=True)
    mod = tvm.IRModule(dict(kernels))
    return ms.tir_integration.tune_tir(
        mod, target, str(work_dir), max_trials_global=trials_per_kernel * len(kernels),
        max_trials_per_task=trials_per_kernel, num_trials_per_iter=min(trials_per_kernel, 16),
        space=ms.space_generator.ScheduleFn(_space, sch_rules=[], postprocs=[], mutator_probs={}),
        # builds run in fresh worker processes that import TVM first: give them time on a busy 2-core box
        builder=ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S), runner=runner or make_runner(None, None),
        cost_model="random", strategy="replay-trace", seed=0)


def apply_records_pass(work_dir: Path | None, applied: list[str]) -> tvm.transform.Pass:
    """Schedule the kernels that have records in work_dir; their names are appended to `applied`."""
    @tvm.transform.module_pass(opt_level=0)
    def _apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if work_dir is None or not (Path(work_dir) / "database_tuning_record.json").exists():
            return mod
        before = {gv.name_hint for gv, f in mod.functions.items() if _scheduled(f)}
        mod = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
        applied.extend(sorted(gv.name_hint for gv, f in mod.functions.items()
                              if _scheduled(f) and gv.name_hint not in before and is_trit_decode_matmul(f)))
        return mod
    return _apply


def _scheduled(f) -> bool:
    return isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "tirx.is_scheduled" in f.attrs
