"""Tuned vs hand-rule schedules of each decode (one-row) trit kernel of a model, measured in one run.

    python benchmarks/bench_tuning.py [--config 0.5B] [--target llvm] [--tuning-logs tuning_logs]

Prints one JSON line: per kernel (out, in) the hand rule's time, the tuned record's time and their ratio.
Records come from `trit-tune --config <size>`.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import tvm
from tvm.s_tir import meta_schedule as ms

from benchmarks.common import machine
from schedules import TritGEMVCPU
from trit_tvm.cli import resolve_model_config
from trit_tvm.compile import LINEAR_NAMES, export_model
from trit_tvm.targets import parse_target
from trit_tvm.tuning import DEFAULT_LOGS, decode_gemv_kernels, fused_module, logs_dir


def _time(func: tvm.tirx.PrimFunc, target, number: int = 20, repeat: int = 7) -> float:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    dev = tvm.cpu(0)
    rng = np.random.default_rng(0)
    args = []
    for info in ms.arg_info.ArgInfo.from_prim_func(func):
        shape, dtype = [int(s) for s in info.shape], info.dtype
        data = rng.integers(0, 256, size=shape).astype(dtype) if "int" in dtype else rng.standard_normal(shape).astype(dtype)
        args.append(tvm.runtime.tensor(data, dev))
    lib.mod["main"](*args)  # warm-up: thread pool start, first touch of the buffers
    return lib.mod.time_evaluator("main", dev, number=number, repeat=repeat)(*args).min


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="0.5B")
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--tuning-logs", default=str(DEFAULT_LOGS))
    args = ap.parse_args()
    args.model = None
    target = parse_target(args.target)
    cfg, depth = resolve_model_config(args)
    mod, _, _, _ = export_model(cfg, [dict.fromkeys(LINEAR_NAMES, depth)] * cfg.num_hidden_layers, target)
    kernels = decode_gemv_kernels(fused_module(mod))
    work_dir = logs_dir(args.tuning_logs, target)
    db = ms.database.JSONDatabase(work_dir=str(work_dir), allow_missing=False)
    rows = []
    for name, func in kernels.items():
        workload = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})  # as MetaSchedule keys it
        tuned = db.query_schedule(workload, target, workload_name="main")
        if tuned is None:
            continue
        hand = TritGEMVCPU().schedule(tvm.s_tir.Schedule(func), tunable=False)
        with target:
            t_hand = _time(hand.mod["main"], target)
            t_tuned = _time(tuned.mod["main"], target)
        rows.append({"kernel": f"{int(func.attrs['trit.n_in'])}->{int(func.attrs['trit.n_out'])}",
                     "hand_us": round(t_hand * 1e6, 1), "tuned_us": round(t_tuned * 1e6, 1),
                     "x_tuned": round(t_hand / t_tuned, 3), "decisions": str(tuned.trace.decisions)})
    geo = float(np.exp(np.mean([np.log(r["x_tuned"]) for r in rows]))) if rows else None
    print(json.dumps({"bench": "tuning", "config": args.config, "target": target.kind.name, **machine(),
                      "records": str(work_dir), "kernels": rows,
                      "geomean_x_tuned": None if geo is None else round(geo, 3)}))


if __name__ == "__main__":
    main()
