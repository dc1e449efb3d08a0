"""Tuned vs hand-rule schedules of each decode (one-row) trit kernel of a model, measured in one run.

    python benchmarks/bench_tuning.py [--config 0.5B] [--target llvm] [--tuning-logs tuning_logs]

Prints one JSON line: per kernel (out, in) the hand rule's time, the tuned record's time and their ratio
(1.0 where trit-tune kept no record because none beat the hand rule). Records come from
`trit-tune --config <size>`.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks.common import machine
from trit_tvm.cli import resolve_model_config
from trit_tvm.compile import export_model
from trit_tvm.targets import parse_target
from trit_tvm.tuning import DEFAULT_LOGS, compare_with_hand_rule, decode_gemv_kernels, fused_module, logs_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="0.5B")
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--tuning-logs", default=str(DEFAULT_LOGS))
    args = ap.parse_args()
    args.model = None
    target = parse_target(args.target)
    kernels = decode_gemv_kernels(fused_module(export_model(*resolve_model_config(args), target).mod))
    work_dir = logs_dir(args.tuning_logs, target)
    rows = []
    for row in compare_with_hand_rule(kernels, work_dir, target):
        entry = {"kernel": row["kernel"], "hand_us": round(row["hand_s"] * 1e6, 1)}
        if row["tuned_s"] is None:
            entry.update({"tuned_us": None, "x_tuned": 1.0, "note": "no record kept: the hand rule schedules it"})
        else:
            entry.update({"tuned_us": round(row["tuned_s"] * 1e6, 1),
                          "x_tuned": round(row["hand_s"] / row["tuned_s"], 3), "decisions": row["decisions"]})
        rows.append(entry)
    geo = float(np.exp(np.mean([np.log(r["x_tuned"]) for r in rows]))) if rows else None
    print(json.dumps({"bench": "tuning", "config": args.config, "target": target.kind.name, **machine(),
                      "records": str(work_dir), "kernels": rows,
                      "geomean_x_tuned": None if geo is None else round(geo, 3)}))


if __name__ == "__main__":
    main()
