"""MetaSchedule tuning of the decode GEMV kernels, records under tuning_logs/<target key>/.

The search space is the hand rule (schedules.TritGEMVCPU) with its two tunable knobs: row panels per
parallel task and the unroll depth of the block loop. Measurements run locally or, with an RPC tracker,
on every server registered under a key (TVM's own distributed runners). trit-compile applies matching
records (relax MetaScheduleApplyDatabase) before the hand rules, which schedule everything else.
A local tuning run then times each kernel's best record against the hand rule in one process and drops
the records that do not win (`keep_records_that_win`): a random search of a few trials on a noisy machine
can pick a schedule slower than the hand rule, and trit-compile applies records by default.
"""
from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from schedules import TritGEMVCPU, is_trit_decode_matmul
from schedules.base import row_count
from schedules.cpu_scratch import scratch_buffers_global, set_scratch_global

from .errors import CompileError
from .pipeline import fusion_passes
from .targets import target_key
from .tuning_build import compile_scheduled

DEFAULT_LOGS = Path(__file__).resolve().parent.parent / "tuning_logs"
BUILD_TIMEOUT_S = 300
KEEP_MARGIN = 1.05  # a record stays only if the hand rule takes at least 5% longer
COMPARE_ROUNDS = 3  # hand rule and record timed alternately, best of each


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
    sch = TritGEMVCPU().schedule(sch, tunable=True)
    set_scratch_global(sch)  # what the compiler's pipeline does to every CPU kernel (schedules/cpu_scratch.py)
    return sch


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


def _import_tensor_intrinsics() -> None:
    """Import tvm.s_tir.tensor_intrin (MetaSchedule's TuneContext does, first thing) in seconds, not ~20 s.

    Each of its ~280 TVMScript functions calls inspect.stack(); for the import machinery's frames (file
    '<frozen importlib._bootstrap>') inspect.getmodule finds no module file and scans all of sys.modules,
    every time. Naming those two frozen modules in inspect's file-to-module cache first ends the scans
    (AMD EPYC Zen 5, 2 cores: 18.3 s → 4.3 s in a fresh interpreter)."""
    for name in ("importlib._bootstrap", "importlib._bootstrap_external"):
        inspect.modulesbyfile.setdefault(f"<frozen {name}>", name)
    import tvm.s_tir.tensor_intrin  # noqa: F401  (pylint: disable=unused-import)


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
    _import_tensor_intrinsics()
    return ms.tir_integration.tune_tir(
        mod, target, str(work_dir), max_trials_global=trials_per_kernel * len(kernels),
        max_trials_per_task=trials_per_kernel, num_trials_per_iter=min(trials_per_kernel, 16),
        space=ms.space_generator.ScheduleFn(_space, sch_rules=[], postprocs=[], mutator_probs={}),
        # builds run in fresh worker processes that import TVM first: give them time on a busy 2-core box
        builder=ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S, f_build=compile_scheduled),
        runner=runner or make_runner(None, None),
        cost_model="random", strategy="replay-trace", seed=0)


def kernel_timer(func: tvm.tirx.PrimFunc, target: tvm.target.Target, number: int = 20, repeat: int = 7):
    """A function returning the best-of seconds of one scheduled kernel on this machine's CPU, on random
    inputs of its shapes (built once, timed on each call), its scratch tiles on the stack as in a model."""
    func = scratch_buffers_global(func)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    dev = tvm.cpu(0)
    rng = np.random.default_rng(0)
    args = []
    for info in ms.arg_info.ArgInfo.from_prim_func(func):
        shape, dtype = [int(s) for s in info.shape], info.dtype
        data = rng.integers(0, 243, size=shape) if "int" in dtype else rng.standard_normal(shape)
        data = data.astype(dtype)
        args.append(tvm.runtime.tensor(data, dev))
    lib.mod["main"](*args)  # warm-up: thread pool start, first touch of the buffers
    evaluator = lib.mod.time_evaluator("main", dev, number=number, repeat=repeat)
    return lambda: evaluator(*args).min


def _workload(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})  # as MetaSchedule keys it


def compare_with_hand_rule(kernels: dict[str, tvm.tirx.PrimFunc], work_dir: Path,
                           target: tvm.target.Target) -> list[dict]:
    """Per kernel: the hand rule's and the best record's time measured here, alternately
    (tuned_s None where the database has no record for it)."""
    db = ms.database.JSONDatabase(work_dir=str(work_dir), allow_missing=False)
    rows = []
    for name, func in kernels.items():
        tuned = db.query_schedule(_workload(func), target, workload_name="main")
        hand = TritGEMVCPU().schedule(tvm.s_tir.Schedule(func), tunable=False)
        with target:
            timers = [kernel_timer(sch.mod["main"], target) for sch in (hand, tuned) if sch is not None]
        best = [float("inf")] * len(timers)
        for _ in range(COMPARE_ROUNDS):  # alternate, so a slow spell of this shared machine hits both
            best = [min(b, timer()) for b, timer in zip(best, timers)]
        t_hand, t_tuned = best[0], (best[1] if tuned is not None else None)
        rows.append({"name": name, "kernel": f"{int(func.attrs['trit.n_in'])}->{int(func.attrs['trit.n_out'])}",
                     "hand_s": t_hand, "tuned_s": t_tuned,
                     "decisions": None if tuned is None else str(tuned.trace.decisions)})
    return rows


def keep_records_that_win(kernels: dict[str, tvm.tirx.PrimFunc], work_dir: Path, target: tvm.target.Target,
                          margin: float = KEEP_MARGIN) -> list[dict]:
    """compare_with_hand_rule, then remove from the database every record of a kernel whose best record is
    not `margin` times faster than the hand rule (trit-compile then uses the hand rule for it). Rows gain
    `kept`."""
    rows = compare_with_hand_rule(kernels, work_dir, target)
    dropped = []
    for row in rows:
        row["kept"] = bool(row["tuned_s"] is not None and row["hand_s"] >= margin * row["tuned_s"])
        if row["tuned_s"] is not None and not row["kept"]:
            dropped.append(_workload(kernels[row["name"]]))
    if dropped:
        _rewrite_database(work_dir, dropped)
    return rows


def _rewrite_database(work_dir: Path, dropped: list[tvm.IRModule]) -> None:
    """The JSON database in work_dir without the records of the `dropped` workloads (both files written
    aside, then renamed into place; nothing reads the database while trit-tune runs)."""
    db = ms.database.JSONDatabase(work_dir=str(work_dir), allow_missing=False)
    kept = [r for r in db.get_all_tuning_records()
            if not any(tvm_ffi.structural_equal(r.workload.mod, mod) for mod in dropped)]
    with tempfile.TemporaryDirectory(dir=work_dir, prefix=".rewrite-") as tmp:
        fresh = ms.database.JSONDatabase(work_dir=tmp)
        for r in kept:
            fresh.commit_tuning_record(ms.database.TuningRecord(
                r.trace, fresh.commit_workload(r.workload.mod), r.run_secs, r.target, r.args_info))
        for name in ("database_workload.json", "database_tuning_record.json"):
            (Path(tmp) / name).replace(Path(work_dir) / name)


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
