"""What every benchmark here shares: machine description, streaming bandwidth, building one kernel."""
from __future__ import annotations

import os
import platform
import time

import numpy as np

import trit_tvm  # noqa: F401  (sizes TVM's thread pool to this machine's cores)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d")}


def best_seconds(fn, repeat: int = 7, number: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def tvm_seconds(lib, dev, args, repeat: int = 7, number: int = 10) -> float:
    """Best-of time of a compiled kernel with TVM's own evaluator (no Python overhead)."""
    return lib.mod.time_evaluator("main", dev, number=number, repeat=repeat)(*args).min


def random_packed(n_out: int, n_in: int, depth: int, seed: int = 0,
                  parts: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Packed arrays of a random matrix; with parts, of len(parts) matrices stacked along rows (each with its
    own codebook, as trit-compile stacks q/k/v and gate/up)."""
    from codec import pack_matrix, quantize_matrix
    rng = np.random.default_rng(seed)
    packs = [pack_matrix(quantize_matrix(rng.standard_normal((n, n_in)).astype(np.float32) * 0.02, depth))
             for n in (parts or (n_out,))]
    return {key: np.concatenate([p[key] for p in packs]) for key in packs[0]}
