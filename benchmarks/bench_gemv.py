"""trit_decode_matmul as a decode GEMV (rows = 1) at Qwen2.5-3B shapes (or SmolLM2-135M's), d=3 by default,
against baselines measured in the same run: torch FP32 `x @ W.T`, and the same TVM pipeline (dlight) on dense
FP32 weights.

    python benchmarks/bench_gemv.py [--target llvm] [--shapes 3B|smollm2] [--depth D] [--plot PNG] [--cold 64] [--int8]

Prints one JSON line. Effective bandwidth = the checkpoint's packed bytes (codes + scales + codebook) / time;
run_time_layout_bytes is what the kernel reads (on CPUs the 16-bit word layout: at d=3 11% more).
The kernel's timings reuse one copy of the weights, which then stays in cache; `--cold N` also times it cycling
through N copies (so the weights come from memory, as in a model), with and without the weight prefetches
(schedules/prefetch.py): `cold_us`, `cold_no_prefetch_us`. `--int8` adds the int8-activation kernels
(schedules/x86_vnni.py where the CPU has VNNI) beside the float ones: `gemv_*` and `gemm128_*` times, ratios
`*_x_int8` (float time / int8 time) and their error against the int8 reference.
On CUDA the same shapes, with FP16 baselines (TVM dense through dlight, torch/cuBLAS) and the card's
copy bandwidth, are the `gemv` step of scripts/gpu_check.py (built here, run with TVM's runtime there).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import tvm
from tvm import te

from benchmarks.common import machine, random_packed, tvm_seconds
from trit_tvm.operator import WeightLayout, layout_for_target, reference_decode_matmul, trit_decode_matmul_func
from trit_tvm.pipeline import schedule_pass
from trit_tvm.targets import parse_target
from trit_tvm.variant_tuning import copies_timer, streaming_read_gbps

# (in, out, name, stacked matrices): q/k/v and gate/up are one operator each in the compiled model
SHAPES_3B = [(2048, 2560, "qkv", (2048, 256, 256)), (2048, 2048, "o_proj", ()),
             (2048, 22016, "gate_up", (11008, 11008)), (11008, 2048, "down_proj", ())]
SHAPES_SMOLLM2 = [(576, 960, "qkv", (576, 192, 192)), (576, 576, "o_proj", ()), (576, 3072, "gate_up", (1536, 1536)),
                  (1536, 576, "down_proj", ())]
SHAPES = {"3B": SHAPES_3B, "smollm2": SHAPES_SMOLLM2}


def build(func: tvm.tirx.PrimFunc, target: tvm.target.Target, prefetch: bool = True):
    """Schedule one PrimFunc exactly as trit-compile does (schedules/ rules, then dlight), and build it."""
    mod = tvm.IRModule({"main": func})
    with target:
        mod = schedule_pass(target, prefetch)(mod)
    return tvm.compile(mod, target=target)


def trit_kernel(n_in: int, n_out: int, depth: int, layout: WeightLayout, target, parts: tuple[int, ...] = (),
                prefetch: bool = True):
    return build(trit_decode_matmul_func(n_out, n_in, depth, layout, rows=1, parts=parts), target, prefetch)


def cold_seconds(lib, x, run_time: tuple, out, copies: int, repeat: int = 5) -> float:
    """Best mean time per call over `copies` copies of the weights taken in turn (none stays cached)."""
    sets = [[tvm.runtime.tensor(a, tvm.cpu(0)) for a in run_time] for _ in range(copies)]
    return copies_timer(lib, [x, out], sets, passes=repeat)()


def dense_func(n_in: int, n_out: int, dtype: str = "float32") -> tvm.tirx.PrimFunc:
    """y = x @ Wᵀ on dense weights, accumulated in float32 like the trit kernel."""
    x = te.placeholder((1, n_in), dtype, "x")
    w = te.placeholder((n_out, n_in), dtype, "w")
    k = te.reduce_axis((0, n_in), "k")
    y = te.compute((1, n_out), lambda i, n: te.sum(x[i, k].astype("float32") * w[n, k].astype("float32"), axis=k),
                   name="dense")
    if dtype != "float32":
        y = te.compute((1, n_out), lambda i, n: y[i, n].astype(dtype), name="dense_out")
    return te.create_prim_func([x, w, y])


def dense_kernel(n_in: int, n_out: int, target):
    return build(dense_func(n_in, n_out), target)


def torch_seconds(n_in: int, n_out: int) -> float:
    import torch
    from benchmarks.common import best_seconds
    w, x = torch.randn(n_out, n_in), torch.randn(1, n_in)
    return best_seconds(lambda: x @ w.T)


PREFILL_ROWS = 128


def int8_comparison(n_in: int, n_out: int, depth: int, parts: tuple[int, ...], packed: dict, target,
                    cold: int, float_gemv: dict) -> dict:
    """The int8-activation kernels against the float ones on the same weights: the decode GEMV (cached, and
    over `cold` copies of the weights when cold > 0; float_gemv: the float GEMV's times main() measured,
    {"float": s[, "float_cold": s]}) and a prefill GEMM of PREFILL_ROWS rows."""
    dev = tvm.cpu(0)
    result = {}
    for rows in (1, PREFILL_ROWS):
        x = np.random.default_rng(3).standard_normal((rows, n_in)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((rows, n_out), np.float32), dev)
        times = dict(float_gemv) if rows == 1 else {}
        modes = ("int8",) if rows == 1 else ("float", "int8")
        for mode in modes:
            layout = layout_for_target(target, mode == "int8")
            lib = build(trit_decode_matmul_func(n_out, n_in, depth, layout, rows=rows, parts=parts), target)
            run_time = (layout.repack_codes(packed["trit_codes"], n_in),
                        layout.repack_scales(packed["trit_scales"], n_in, depth),
                        layout.repack_codebook(packed["trit_codebook"]))
            args = [tvm.runtime.tensor(a, dev) for a in (x, *run_time)] + [out]
            times[mode] = tvm_seconds(lib, dev, args, repeat=5, number=3 if rows > 1 else 10)
            if mode == "int8":
                ref = reference_decode_matmul(x, packed["trit_codes"], packed["trit_scales"], packed["trit_codebook"],
                                              parts=parts, int8_activations=True)
                result[f"int8_max_rel_err_{rows}"] = float(np.abs(out.numpy() - ref).max() / np.abs(ref).max())
            if rows == 1 and cold:
                times[f"{mode}_cold"] = cold_seconds(lib, args[0], run_time, out, cold)
        key = "gemv" if rows == 1 else f"gemm{rows}"
        for name, t in times.items():
            result[f"{key}_{name}_us"] = round(t * 1e6, 1)
        result[f"{key}_x_int8"] = round(times["float"] / times["int8"], 2)
        if "int8_cold" in times:
            result[f"{key}_cold_x_int8"] = round(times["float_cold"] / times["int8_cold"], 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="3B",
                    help="the linears (q/k/v and gate/up stacked, as compiled) of Qwen2.5-3B or of SmolLM2-135M")
    ap.add_argument("--plot", help="write a PNG of effective bandwidth per shape")
    ap.add_argument("--cold", type=int, default=0, metavar="N",
                    help="also time the kernel over N copies of the weights, with and without the prefetches")
    ap.add_argument("--int8", action="store_true",
                    help="also the int8-activation kernels (trit-compile --int8-activations), decode and a prefill "
                         f"of {PREFILL_ROWS} rows, beside the float ones")
    args = ap.parse_args()
    target = parse_target(args.target)
    on_gpu = target.kind.name == "cuda"
    if on_gpu:
        raise SystemExit("bench_gemv: for CUDA run scripts/gpu_check.py (its gemv step: FP16 baselines and "
                         "the card's copy bandwidth)")
    dev = tvm.cpu(0)
    layout = layout_for_target(target)
    stream = streaming_read_gbps()
    rows = []
    for n_in, n_out, name, parts in SHAPES[args.shapes]:
        packed = random_packed(n_out, n_in, args.depth, parts=parts)
        x = np.random.default_rng(1).standard_normal((1, n_in)).astype(np.float32)
        lib = trit_kernel(n_in, n_out, args.depth, layout, target, parts)
        out = tvm.runtime.tensor(np.zeros((1, n_out), np.float32), dev)
        run_time = (layout.repack_codes(packed["trit_codes"], n_in),
                    layout.repack_scales(packed["trit_scales"], n_in, args.depth),
                    layout.repack_codebook(packed["trit_codebook"]))
        targs = [tvm.runtime.tensor(a, dev) for a in (x, *run_time)] + [out]
        t_trit = tvm_seconds(lib, dev, targs)
        ref = reference_decode_matmul(x, packed["trit_codes"], packed["trit_scales"], packed["trit_codebook"],
                                      parts=parts)
        err = float(np.abs(out.numpy() - ref).max() / np.abs(ref).max())
        nbytes = sum(a.nbytes for a in packed.values())
        dlib = dense_kernel(n_in, n_out, target)
        w = np.random.default_rng(2).standard_normal((n_out, n_in)).astype(np.float32)
        dargs = [tvm.runtime.tensor(a, dev) for a in (x, w, np.zeros((1, n_out), np.float32))]
        t_dense = tvm_seconds(dlib, dev, dargs, repeat=5, number=3)
        row = {"shape": f"{n_in}->{n_out}", "name": name, "trit_us": round(t_trit * 1e6, 1),
               "packed_bytes": nbytes, "eff_gbps": round(nbytes / t_trit / 1e9, 2),
               "run_time_layout_bytes": sum(a.nbytes for a in run_time),
               "tvm_dense_fp32_us": round(t_dense * 1e6, 1), "x_tvm_dense_fp32": round(t_dense / t_trit, 2),
               "max_rel_err": err}
        t_torch = torch_seconds(n_in, n_out)
        row.update({"torch_fp32_us": round(t_torch * 1e6, 1), "x_torch_fp32": round(t_torch / t_trit, 2),
                    "frac_stream": round(nbytes / t_trit / 1e9 / stream, 3)})
        float_gemv = {"float": t_trit}
        if args.cold:
            plain = trit_kernel(n_in, n_out, args.depth, layout, target, parts, prefetch=False)
            float_gemv["float_cold"] = cold_seconds(lib, targs[0], run_time, out, args.cold)
            row["cold_us"] = round(float_gemv["float_cold"] * 1e6, 1)
            row["cold_no_prefetch_us"] = round(cold_seconds(plain, targs[0], run_time, out, args.cold) * 1e6, 1)
        if args.int8:
            row.update(int8_comparison(n_in, n_out, args.depth, parts, packed, target, args.cold, float_gemv))
        rows.append(row)
    geo = lambda key: round(float(np.exp(np.mean([np.log(r[key]) for r in rows]))), 2)  # noqa: E731
    result = {"bench": "gemv", "shapes_of": args.shapes, "target": target.kind.name, "depth": args.depth,
              "weight_layout": layout.name,
              **machine(), "stream_read_gbps": round(stream, 1), "shapes": rows,
              "geomean_x_tvm_dense_fp32": geo("x_tvm_dense_fp32"), "geomean_x_torch_fp32": geo("x_torch_fp32"),
              "geomean_frac_stream": geo("frac_stream")}
    print(json.dumps(result))
    if args.plot:
        plot(result, args.plot)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [f"{r['name']}\n{r['shape']}" for r in result["shapes"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, [r["eff_gbps"] for r in result["shapes"]], color="#4a7", label="trit GEMV (packed bytes / time)")
    if result.get("stream_read_gbps"):
        ax.axhline(result["stream_read_gbps"], color="k", ls="--",
                   label=f"streaming read {result['stream_read_gbps']} GB/s")
        ax.axhline(0.7 * result["stream_read_gbps"], color="gray", ls=":", label="70% of streaming read")
    ax.set_ylabel("GB/s")
    ax.set_title(f"trit_decode_matmul d={result['depth']}, rows=1, {result['target']}: {result['cpu']}, "
                 f"{result['cores']} cores", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
