"""Tuning of the hand-written integer kernels: per kernel, which variant runs it and with which knobs.

MetaSchedule tunes schedules of the operator (trit_tvm/tuning.py). The int8-activation kernels of
schedules/x86_vnni.py are not schedules of it but kernels put in its place, so their choices are kept here,
in `tuning_logs/<target key>/variants.json`, keyed by schedules.base.kernel_key. For each int8-activation
kernel of a model the candidates are the integer kernel (AVX-512 VNNI; on AVX2 CPUs the depth-1, 3 and 4
kernels only) at every point of its knob grid (prefetch distance;
for prefill also the rows of x per pass over a panel's tile and the tile's groups per pass) and the float rules
on the same int8 form
("float", which decode variant). Decode kernels are timed with their weights coming from memory (cycling
through copies larger than the caches, as in a model, whose weights never stay cached), prefill kernels on
PREFILL_ROWS rows. All candidates of a kernel are timed alternately in one process (best of ROUNDS); the
fastest is then timed again against the hand-written default (the best of many noisy timings is biased low),
and recorded only when it beats the default by KEEP_MARGIN there. Beside each decode kernel's
time the run reports its bound: the kernel's weight bytes at this machine's streaming read, measured in
the same run, so a tuning that finds nothing says how much there was to find.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tvm
from tvm import tirx

from schedules import TritGEMVVNNI, is_trit_decode_matmul
from schedules.base import INT8_ACTIVATIONS_ATTR, dot_bits, kernel_key, row_count
from schedules.x86_vnni import ISA_AVX2, ISA_DOTPROD, ISA_VNNI, VNNIKnobs, default_knobs, isa_for_target

from .errors import CompileError
from .pipeline import schedule_pass

VARIANTS_FILE = "variants.json"
PREFETCH_GRID = (0, 4, 8, 16, 32, 64)  # weight blocks ahead (16 is the hand-written default)
# prefill: rows of x per pass over a tile
ROW_TILE_GRID = {ISA_VNNI: (4, 8, 12, 16), ISA_AVX2: (1, 2, 4), ISA_DOTPROD: (2, 4, 8)}
GROUP_BLOCK_GRID = (0, 32, 64)  # prefill: groups of the tile per pass over the rows (0: all of K)
PREFILL_ROWS = 128
COLD_BYTES = 256 << 20  # decode timings cycle through this many bytes of weight copies (well past any L3)
MAX_COPIES = 64
ROUNDS = 3
KEEP_MARGIN = 1.05  # a choice is recorded only if the default takes at least 5% longer


def int8_kernels(mod: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    """The int8-activation trit kernels of a fused module (decode and prefill), by name."""
    return {gv.name_hint: f for gv, f in mod.functions.items()
            if is_trit_decode_matmul(f) and int(f.attrs.get(INT8_ACTIVATIONS_ATTR, 0))}


def candidates(func: tirx.PrimFunc, isa: str = ISA_VNNI) -> list[dict]:
    """The choices tried for a kernel, the hand-written default first (variant "vnni": the integer kernel, of
    AVX-512 VNNI or of AVX2 as isa says)."""
    default = default_knobs(isa)
    if row_count(func) == 1:
        grid = [dataclasses.replace(default, prefetch_blocks=p) for p in PREFETCH_GRID]
    else:
        grid = [VNNIKnobs(prefetch_blocks=p, row_tile=t, group_block=b) for t in ROW_TILE_GRID[isa]
                for b in GROUP_BLOCK_GRID for p in (0, default.prefetch_blocks)]
    grid = [default] + [k for k in grid if k != default]
    # the float rules read the words layout only: a matrix in a dot-order layout has the integer kernel or none
    floats = [] if dot_bits(func) else [{"variant": "float"}]
    return [{"variant": "vnni", "knobs": k.as_dict()} for k in grid] + floats


def build_candidate(func: tirx.PrimFunc, target: tvm.target.Target, choice: dict):
    """The kernel scheduled as trit-compile would with this choice recorded for it, built."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with target:
        mod = schedule_pass(target, choices={kernel_key(func): choice})(mod)
    return tvm.compile(mod, target=target)


def _shape(shape, rows: int) -> tuple[int, ...]:
    """A parameter's shape with its symbolic dims (a prefill's rows) set to `rows`."""
    return tuple(int(d) if isinstance(d, tirx.IntImm) else rows for d in shape)


def _arguments(func: tirx.PrimFunc, copies: int) -> tuple[list, list[list]]:
    """Random inputs of the kernel's shapes: (x and out, copies of the weights [codes, scales, codebook,
    bias...]); any words decode to valid digits and codebook indices, which is all timing needs."""
    rng = np.random.default_rng(0)
    dev = tvm.cpu(0)
    params = list(func.params)  # buffers: x, codes, scales, codebook, [bias], out

    def make(info):
        shape, dtype = _shape(info.shape, PREFILL_ROWS), str(info.dtype)
        if "int" in dtype:
            return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)
        return (rng.standard_normal(shape) * 0.02).astype(dtype)

    def make_weight(info):  # positive floats, as steps are: factor tables' `exact` entries set (the fast path)
        array = make(info)
        return array if "int" in str(info.dtype) else np.abs(array)

    weights = [make_weight(info) for info in params[1:-1]]
    out = params[-1]
    io = [tvm.runtime.tensor(make(params[0]), dev),
          tvm.runtime.tensor(np.zeros(_shape(out.shape, PREFILL_ROWS), str(out.dtype)), dev)]
    return io, [[tvm.runtime.tensor(w, dev) for w in weights] for _ in range(copies)]



def weight_bytes(func: tirx.PrimFunc) -> int:
    """Bytes of the packed weights a call reads (codes, scales, codebook, bias)."""
    return sum(int(np.prod(_shape(info.shape, 1))) * np.dtype(str(info.dtype)).itemsize
               for info in list(func.params)[1:-1])


def copies_timer(lib, io: list, weight_sets: list[list], passes: int = 3) -> Callable[[], float]:
    """A function returning seconds per call of lib's "main"(x, *weights, out), best of `passes` passes over the
    weight copies taken in turn (from memory when the copies together exceed the caches)."""
    f = lib["main"]
    x, out = io
    f(x, *weight_sets[0], out)  # warm-up: thread pool start, first touch

    def run() -> float:
        best = float("inf")
        for _ in range(passes):
            t0 = time.perf_counter()
            for w in weight_sets:
                f(x, *w, out)
            best = min(best, (time.perf_counter() - t0) / len(weight_sets))
        return best
    return run


def streaming_read_gbps(nbytes: int = 1 << 30, repeat: int = 5) -> float:
    """This machine's streaming read bandwidth: best of a multithreaded torch sum over a 1 GiB array."""
    import torch
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    a = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def tune_variants(kernels: dict[str, tirx.PrimFunc], target: tvm.target.Target,
                  progress: Callable[[str], None] = print) -> list[dict]:
    """Time every candidate of every kernel on this machine; one row per kernel with the default's and the
    best candidate's seconds (from a second alternating timing of just those two), every candidate's seconds
    in the search, and the weight bytes."""
    if isa_for_target(target, dot_order=True) is None:
        raise CompileError("tuning the int8 kernels needs an llvm target with AVX-512 VNNI, AVX2 or aarch64's "
                           f"dotprod (schedules/x86_vnni.py); {target} has none, so the float rules run the int8 form")
    # on AVX2 and aarch64 only the dot-order layouts (depths 1, 3, 4) have an integer kernel; the float rules run
    # the rest
    kernels = {name: f for name, f in kernels.items() if isa_for_target(target, bool(dot_bits(f)))}
    if not kernels:
        raise CompileError("the model has no int8-activation trit kernels with an integer kernel on "
                           f"{target} to tune")
    rows = []
    for i, (name, func) in enumerate(sorted(kernels.items()), 1):
        decode = row_count(func) == 1
        nbytes = weight_bytes(func)
        copies = min(MAX_COPIES, max(2, -(-COLD_BYTES // nbytes))) if decode else 1
        io, weight_sets = _arguments(func, copies)
        choices = candidates(func, isa_for_target(target, bool(dot_bits(func))))
        t0 = time.perf_counter()
        timers = [copies_timer(build_candidate(func, target, c), io, weight_sets) for c in choices]
        best = [float("inf")] * len(timers)
        for _ in range(ROUNDS):  # alternate, so a slow spell of a shared machine hits every candidate
            best = [min(b, t()) for b, t in zip(best, timers)]
        pick = int(np.argmin(best))
        default_s, best_s = best[0], best[pick]
        if pick:  # the fastest of many noisy timings is biased low: the winner and the default timed again
            default_s, best_s = float("inf"), float("inf")
            for _ in range(ROUNDS):
                default_s, best_s = min(default_s, timers[0]()), min(best_s, timers[pick]())
        rows.append({"name": name, "key": kernel_key(func), "decode": decode, "weight_bytes": nbytes,
                     "default_s": default_s, "best_s": best_s, "best": choices[pick],
                     "candidates": [{**c, "s": s} for c, s in zip(choices, best)]})
        progress(f"[{i}/{len(kernels)}] {kernel_key(func)}: {len(choices)} candidates in "
                 f"{time.perf_counter() - t0:.0f} s; default {default_s * 1e6:.1f} µs, best {best_s * 1e6:.1f} µs "
                 f"({_label(choices[pick])}{', timed again beside the default' if pick else ''})")
    return rows


def _label(choice: dict) -> str:
    knobs = ", ".join(f"{k}={v}" for k, v in choice.get("knobs", {}).items())
    return choice["variant"] + (f" {knobs}" if knobs else "")


def save_choices(rows: list[dict], records_dir: Path, margin: float = KEEP_MARGIN) -> list[dict]:
    """Record in records_dir/variants.json the best choice of every kernel it beats the default for by
    `margin`, and remove earlier records of the kernels it does not (written aside, then renamed into
    place). Rows gain `kept`."""
    path = Path(records_dir) / VARIANTS_FILE
    records = load_choices(records_dir)
    for row in rows:
        row["kept"] = row["default_s"] >= margin * row["best_s"]
        if row["kept"]:
            records[row["key"]] = row["best"]
        else:
            records.pop(row["key"], None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{VARIANTS_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(dict(sorted(records.items())), indent=1) + "\n")
    tmp.replace(path)
    return rows


def load_choices(records_dir: Path | None) -> dict[str, dict]:
    """The recorded choices ({} without a variants.json); a malformed file is a one-line error naming it."""
    if records_dir is None or not (Path(records_dir) / VARIANTS_FILE).exists():
        return {}
    path = Path(records_dir) / VARIANTS_FILE
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompileError(f"{path}: not a readable JSON file ({e})") from None
    for key, choice in records.items() if isinstance(records, dict) else [(None, None)]:
        try:
            if not (isinstance(choice, dict) and choice.get("variant") in TritGEMVVNNI.VARIANTS):
                raise ValueError(f"variant not one of {TritGEMVVNNI.VARIANTS}")
            VNNIKnobs(**choice.get("knobs", {}))
        except (TypeError, ValueError) as e:
            raise CompileError(f"{path}: record {key!r} is not a kernel choice ({e})") from None
    return records
