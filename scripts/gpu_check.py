"""GPU checks and benchmarks in two halves, for a GPU machine that has TVM's runtime but not its compiler.

    python scripts/gpu_check.py prepare BUNDLE   # here: full TVM, no GPU needed; builds every CUDA module
    python scripts/gpu_check.py run BUNDLE OUT   # on the GPU: loads them with the runtime only, checks, times

What `run` shows, one JSON line each (and OUT/results.jsonl):
  ops     every CUDA rule against the numpy reference (odd shapes, depths 2 and 3, 1 and 7 rows)
  tiny    the embedded demo model built for CUDA: greedy tokens and logits against the x86 build
  gemv    the bench_gemv shapes: trit GEMV (split-K and one-thread rules) vs TVM dense FP16 (dlight) and
          torch FP16, effective bandwidth against the card's device-to-device copy
  decode  Qwen2.5-3B shape, random weights: trit d=3 vs the same TVM pipeline with dense FP16 linears
scripts/gpu_check.sh carries the runtime to the GPU machine and calls `run`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SM90 = {"kind": "cuda", "arch": "sm_90", "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
        "thread_warp_size": 32}  # H100 / H200
OP_SHAPES = [(131, 336), (37, 80), (7, 16), (2048, 2048), (96, 11008)]
GEMV_SHAPES = [(2048, 2560, "qkv"), (2048, 2048, "o_proj"), (2048, 22016, "gate_up"), (11008, 2048, "down_proj")]
DECODE_MODEL, PROMPT_TOKENS, NEW_TOKENS = "3B", 128, 32
LM_HEAD_VOCAB = 151936


# ---------------------------------------------------------------- prepare (compiler side)

def _export(func, target, path: Path) -> None:
    import tvm
    tvm.compile(func, target=target).export_library(str(path))


def prepare(bundle: Path, skip_decode: bool = False) -> None:
    import tvm

    from benchmarks.bench_gemv import dense_func
    from schedules import DECODE_INT32, DECODE_TABLE32, TritGEMMCuda, TritGEMVCuda
    from trit_tvm.operator import WeightLayout, layout_for_target, trit_decode_matmul_func
    target = tvm.target.Target(SM90)
    layout = layout_for_target(target)
    other = WeightLayout(layout.rows, DECODE_INT32 if layout.decode == DECODE_TABLE32 else DECODE_TABLE32)
    bundle.mkdir(parents=True, exist_ok=True)

    cases = []
    (bundle / "ops").mkdir(exist_ok=True)
    for lay in (layout,):  # the other decode passed the same checks on an H100 (benchmarks/results)
        for depth in (2, 3):
            for n_out, n_in in OP_SHAPES:
                for rule, rows in (("gemv", 1), ("gemm", None)):
                    bias = n_out % 2 == 1
                    func = trit_decode_matmul_func(n_out, n_in, depth, lay, rows=rows, bias=bias)
                    sch = (TritGEMVCuda() if rule == "gemv" else TritGEMMCuda()).apply(func, target, False)
                    if sch is None:
                        continue
                    name = f"{rule}_{lay.decode}_{n_out}x{n_in}_d{depth}.so"
                    _export(sch.mod["main"], target, bundle / "ops" / name)
                    cases.append({"lib": name, "rule": rule, "decode": lay.decode, "n_out": n_out, "n_in": n_in,
                                  "depth": depth, "bias": bias, "rows": [1] if rows else [1, 7, 33]})
    (bundle / "ops" / "cases.json").write_text(json.dumps(cases))
    (bundle / "meta.json").write_text(json.dumps({"default_decode": layout.decode, "other_decode": other.decode}))
    print(f"ops: {len(cases)} kernels", flush=True)

    (bundle / "gemv").mkdir(exist_ok=True)
    for n_in, n_out, name in GEMV_SHAPES:
        for rule_name, rule, lay in gemv_variants(layout, other, TritGEMVCuda, TritGEMMCuda):
            func = trit_decode_matmul_func(n_out, n_in, 3, lay, rows=1, dtype="float16")
            _export(rule.apply(func, target, False).mod["main"], target, bundle / "gemv" / f"{name}_{rule_name}.so")
        _export(_dlight(dense_func(n_in, n_out, "float16"), target), target, bundle / "gemv" / f"{name}_dense.so")
    _export(_dlight(_logits_func(), target), target, bundle / "gemv" / "lm_head.so")
    print("gemv: built", flush=True)

    _prepare_tiny(bundle / "tiny", target)
    print("tiny: built", flush=True)
    if not skip_decode:
        from trit_tvm.compile import compile_shape_only
        from trit_tvm.shapes import hf_config
        cfg = hf_config(DECODE_MODEL, max_position_embeddings=4096)
        for depth, name in ((3, "trit"), (0, "dense_fp16")):
            t0 = time.perf_counter()
            compile_shape_only(cfg, depth, target, bundle / "decode" / name, force=True, stage=lambda _m: None)
            print(f"decode/{name}: built in {time.perf_counter() - t0:.0f} s", flush=True)


def gemv_variants(layout, other, gemv, gemm) -> list:
    """(name, rule, layout) the gemv step compares: the default split-K rule and decode, the other
    decode, the split before it took up to 32 warps on few row tiles, and no split (the GEMM rule on one row)."""
    return [("splitk", gemv(), layout), (f"splitk_{other.decode}", gemv(), other),
            ("splitk_max16", gemv(few_tiles=0), layout), ("onethread", gemm(), layout)]


def _logits_func():
    """The decode step's output projection as the model emits it (Qwen2.5-3B: tied 151936 x 2048)."""
    from tvm import te

    from schedules.base import KERNEL_ATTR, LOGITS_KERNEL
    from trit_tvm.models.base import logits_nt
    x = te.placeholder((1, 1, 2048), "float16", "x")
    w = te.placeholder((LM_HEAD_VOCAB, 2048), "float16", "w")
    return te.create_prim_func([x, w, logits_nt(x, w)]).with_attr({KERNEL_ATTR: LOGITS_KERNEL})


def _dlight(func, target):
    import tvm

    from trit_tvm.pipeline import schedule_pass
    with target:
        return schedule_pass(target)(tvm.IRModule({"main": func}))["main"]


def _prepare_tiny(out: Path, target) -> None:
    """The demo model for CUDA with its weights, and what the x86 build (token-exact with transformers
    in tests/test_compile_llvm.py) says for the same prompts."""
    import tempfile

    from codec.checkpoint import write_trit_checkpoint
    from trit_tvm.compile import compile_model
    from trit_tvm.demo import DEMO_SPEC, build_tiny_model
    from trit_tvm.runtime import TritModel
    from trit_tvm.targets import parse_target
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_tiny_model(tmp / "hf", DEMO_SPEC)
        write_trit_checkpoint(tmp / "hf", tmp / "trit", depth=3)
        compile_model(tmp / "trit", target, out / "art", force=True, stage=lambda _m: None)
        compile_model(tmp / "trit", parse_target("llvm"), tmp / "cpu", stage=lambda _m: None)
        cpu = TritModel(tmp / "cpu")
        prompts = [[5, 17, 42, 99, 7], list(range(3, 40, 3))]
        expected = [{"prompt": p, "tokens": cpu.generate(p, 16).tokens,
                     "logits": cpu.prefill_logits(p).tolist()} for p in prompts]
    (out / "expected.json").write_text(json.dumps(expected))


# ---------------------------------------------------------------- run (GPU side, runtime only)

def _reference(x: np.ndarray, packed: dict, bias: np.ndarray | None) -> np.ndarray:
    from codec import unpack_matrix
    w = unpack_matrix(packed, x.shape[-1]).dequantize(np.float64)
    y = x.astype(np.float64) @ w.T
    return y if bias is None else y + bias


def _packed(n_out: int, n_in: int, depth: int, seed: int) -> dict:
    from codec import pack_matrix, quantize_matrix
    w = np.random.default_rng(seed).standard_normal((n_out, n_in)).astype(np.float32) * 0.02
    return pack_matrix(quantize_matrix(w, depth))


def _rows32(a: np.ndarray) -> np.ndarray:
    """The CUDA kernels' layout (WeightLayout(32, DECODE_TABLE32).repack_codes) from codec, which needs no
    TVM compiler."""
    from codec.format import interleave_rows
    return interleave_rows(a, 32)


def run_ops(bundle: Path, dev) -> dict:
    import tvm
    results, worst = [], 0.0
    cases = json.loads((bundle / "ops" / "cases.json").read_text())
    for case in cases:
        lib = tvm.runtime.load_module(str(bundle / "ops" / case["lib"]))
        n_out, n_in = case["n_out"], case["n_in"]
        packed = _packed(n_out, n_in, case["depth"], seed=n_out + n_in)
        rng = np.random.default_rng(7)
        bias = rng.standard_normal(n_out).astype(np.float32) if case["bias"] else None
        for rows in case["rows"]:
            x = rng.standard_normal((rows, n_in)).astype(np.float32)
            ref = _reference(x, packed, bias)
            args = [x, _rows32(packed["trit_codes"]), _rows32(packed["trit_scales"]), packed["trit_codebook"]]
            args += [bias] if bias is not None else []
            out = tvm.runtime.tensor(np.zeros((rows, n_out), np.float32), dev)
            lib["main"](*[tvm.runtime.tensor(a, dev) for a in args], out)
            err = float(np.abs(out.numpy() - ref).max() / np.abs(ref).max())
            worst = max(worst, err)
            results.append({**{k: case[k] for k in ("rule", "decode", "n_out", "n_in", "depth")}, "rows": rows,
                            "rel_err": err})
    return {"check": "ops", "kernels": len(cases), "runs": len(results), "max_rel_err": worst, "pass": worst < 1e-4,
            "failed": [r for r in results if r["rel_err"] >= 1e-4]}


def run_tiny(bundle: Path) -> dict:
    from trit_tvm.runtime import TritModel
    model = TritModel(bundle / "tiny" / "art")
    rows = []
    for exp in json.loads((bundle / "tiny" / "expected.json").read_text()):
        got = model.generate(exp["prompt"], 16).tokens
        same = next((i for i, (a, b) in enumerate(zip(got, exp["tokens"])) if a != b), len(got))
        diff = float(np.abs(model.prefill_logits(exp["prompt"]) - np.array(exp["logits"])).max())
        rows.append({"tokens_equal_prefix": same, "of": len(got), "max_logit_diff": diff})
    ok = all(r["tokens_equal_prefix"] >= 4 and r["max_logit_diff"] < 5e-2 for r in rows)
    return {"check": "tiny", "model_dtype": model.manifest["model_dtype"], "prompts": rows, "pass": ok,
            "criterion": "first 4 greedy tokens equal the x86 FP32 build, prefill logits within 5e-2 "
                         "(FP16 activations)"}


def copy_gbps(torch) -> float:
    """The card's device-to-device copy: (bytes read + bytes written) / time, best of 10, 1 GiB."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() / best / 1e9


def run_gemv(bundle: Path, dev, torch) -> dict:
    import tvm
    copy = copy_gbps(torch)
    rows = []
    for n_in, n_out, name in GEMV_SHAPES:
        packed = _packed(n_out, n_in, 3, seed=0)
        nbytes = sum(a.nbytes for a in packed.values())
        x = np.random.default_rng(1).standard_normal((1, n_in)).astype(np.float16)
        ref = _reference(x, packed, None)
        targs = [tvm.runtime.tensor(a, dev) for a in (x, _rows32(packed["trit_codes"]),
                                                      _rows32(packed["trit_scales"]), packed["trit_codebook"])]
        row = {"shape": f"{n_in}->{n_out}", "name": name, "packed_bytes": nbytes}
        variants = sorted(p.stem[len(name) + 1:] for p in (bundle / "gemv").glob(f"{name}_*.so"))
        for rule in [v for v in variants if v != "dense"]:
            lib = tvm.runtime.load_module(str(bundle / "gemv" / f"{name}_{rule}.so"))
            out = tvm.runtime.tensor(np.zeros((1, n_out), np.float16), dev)
            t = lib.time_evaluator("main", dev, number=200, repeat=10)(*targs, out).min
            row[f"{rule}_us"] = round(t * 1e6, 2)
            row[f"{rule}_rel_err"] = float(np.abs(out.numpy().astype(np.float64) - ref).max() / np.abs(ref).max())
        t_trit = row["splitk_us"] / 1e6
        w = np.random.default_rng(2).standard_normal((n_out, n_in)).astype(np.float16) * np.float16(0.02)
        dlib = tvm.runtime.load_module(str(bundle / "gemv" / f"{name}_dense.so"))
        dargs = [tvm.runtime.tensor(a, dev) for a in (x, w)] \
            + [tvm.runtime.tensor(np.zeros((1, n_out), np.float16), dev)]
        t_dense = dlib.time_evaluator("main", dev, number=200, repeat=10)(*dargs).min
        tw, tx = torch.from_numpy(w).cuda(), torch.from_numpy(x).cuda()
        t_torch = _torch_seconds(torch, lambda: tx @ tw.T)
        row.update({"eff_gbps": round(nbytes / t_trit / 1e9, 1), "frac_copy": round(nbytes / t_trit / 1e9 / copy, 3),
                    "tvm_dense_fp16_us": round(t_dense * 1e6, 2), "x_tvm_dense_fp16": round(t_dense / t_trit, 2),
                    "torch_fp16_us": round(t_torch * 1e6, 2), "x_torch_fp16": round(t_torch / t_trit, 2),
                    "x_splitk_vs_onethread": round(row["onethread_us"] / row["splitk_us"], 2)})
        rows.append(row)
    lm = tvm.runtime.load_module(str(bundle / "gemv" / "lm_head.so"))
    largs = [tvm.runtime.tensor(np.zeros(s, d), dev) for s, d in
             (((1, 1, 2048), np.float16), ((LM_HEAD_VOCAB, 2048), np.float16), ((1, 1, LM_HEAD_VOCAB), np.float32))]
    t_lm = lm.time_evaluator("main", dev, number=20, repeat=5)(*largs).min
    geo = lambda k: round(float(np.exp(np.mean([np.log(r[k]) for r in rows]))), 3)  # noqa: E731
    return {"bench": "gemv", "target": "cuda", "depth": 3, "weight_layout": "trit-rows32-v1",
            "copy_gbps_read_plus_write": round(copy, 1), "shapes": rows,
            "geomean_frac_copy": geo("frac_copy"), "geomean_x_tvm_dense_fp16": geo("x_tvm_dense_fp16"),
            "geomean_x_torch_fp16": geo("x_torch_fp16"), "geomean_x_splitk_vs_onethread": geo("x_splitk_vs_onethread"),
            "lm_head_fp16_us": round(t_lm * 1e6, 1), "lm_head_gbps": round(LM_HEAD_VOCAB * 2048 * 2 / t_lm / 1e9, 1)}


def _torch_seconds(torch, fn, number: int = 200, repeat: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / number)
    return best


def random_device_params(manifest: dict, torch, device: str = "cuda") -> tuple[list, int]:
    """Random weights on the GPU for a shape-only artifact (made by torch, handed over by DLPack):
    valid packed bytes (< 243), a log-spaced codebook, small dense values, unit norms."""
    import tvm
    params, nbytes = [], 0
    gen = torch.Generator(device=device).manual_seed(0)
    for name, shape, dtype in zip(manifest["params"], manifest["param_shapes"], manifest["param_dtypes"]):
        if dtype == "uint8":
            t = torch.randint(0, 243, shape, generator=gen, dtype=torch.uint8, device=device)
        elif name.endswith("trit_codebook"):
            t = torch.logspace(-4, -2.5, shape[0], dtype=torch.float32, device=device)
        elif "norm" in name:
            t = torch.ones(shape, dtype=getattr(torch, dtype), device=device)
        else:
            t = (torch.randn(shape, generator=gen, dtype=torch.float32, device=device) * 0.02).to(getattr(torch, dtype))
        nbytes += t.numel() * t.element_size()
        params.append(tvm.runtime.from_dlpack(t))
    return params, nbytes


def run_decode(bundle: Path, torch, device: str = "cuda") -> dict:
    from trit_tvm.runtime import TritModel
    out = {"bench": "decode", "model": f"Qwen2.5-{DECODE_MODEL} shape, random weights", "target": "cuda",
           "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS}
    for name in ("trit", "dense_fp16"):
        art = bundle / "decode" / name
        manifest = json.loads((art / "manifest.json").read_text())
        vocab = manifest["config"]["vocab_size"]
        prompt = np.random.default_rng(0).integers(0, vocab, size=PROMPT_TOKENS).tolist()
        params, nbytes = random_device_params(manifest, torch, device)
        model = TritModel(art, params=params)
        model.generate(prompt[:8], 4)  # warm-up (and CUDA graph capture)
        best = None
        for _ in range(3):
            gen = model.generate(prompt, NEW_TOKENS)
            if best is None or gen.decode_tok_s > best.decode_tok_s:
                best = gen
        out.update({f"{name}_decode_tok_s": round(best.decode_tok_s, 1),
                    f"{name}_prefill_tok_s": round(best.prefill_tok_s, 1), f"{name}_weight_gb": round(nbytes / 1e9, 3)})
        del model, params
        if device == "cuda":
            torch.cuda.empty_cache()
    out["x_decode_vs_dense_fp16"] = round(out["trit_decode_tok_s"] / out["dense_fp16_decode_tok_s"], 2)
    out["x_prefill_vs_dense_fp16"] = round(out["trit_prefill_tok_s"] / out["dense_fp16_prefill_tok_s"], 2)
    return out


def register_nvcc_jit(arch: str) -> None:
    """Modules built where no CUDA runtime was linked carry CUDA source; TVM's runtime compiles it at
    load through `tvm_callback_cuda_compile`. TVM's own callback needs the compiler library (it reads
    the current Target), so a runtime-only install gets this one: nvcc to a fatbin for this card."""
    import subprocess
    import tempfile

    import tvm_ffi

    def compile_source(code: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
            src.write_text(code)
            subprocess.run(["nvcc", "--fatbin", "-O3", f"-arch={arch}", "--use_fast_math", "--expt-relaxed-constexpr",
                            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                            "-o", str(out), str(src)], check=True)
            return out.read_bytes()
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_source, override=True)


def run(bundle: Path, out_dir: Path, only: list[str]) -> int:
    import torch
    import tvm

    from trit_tvm.runtime import load_cuda_runtime
    load_cuda_runtime()
    dev = tvm.cuda(0)
    if not dev.exist:
        print("no CUDA GPU visible to TVM's runtime", file=sys.stderr)
        return 2
    if tvm.base._RUNTIME_ONLY:
        major, minor = torch.cuda.get_device_capability(0)
        register_nvcc_jit(f"sm_{major}{minor}")
    out_dir.mkdir(parents=True, exist_ok=True)
    head = {"gpu": torch.cuda.get_device_name(0), "sms": dev.multi_processor_count, "date": time.strftime("%Y-%m-%d"),
            **json.loads((bundle / "meta.json").read_text())}
    steps = {"ops": lambda: run_ops(bundle, dev), "tiny": lambda: run_tiny(bundle),
             "gemv": lambda: run_gemv(bundle, dev, torch), "decode": lambda: run_decode(bundle, torch)}
    failed = 0
    for name, step in steps.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            result = {**step(), **head}
        except Exception as e:  # one broken step must not hide the others' results
            import traceback
            traceback.print_exc()
            result = {"check": name, "error": f"{type(e).__name__}: {e}"[:2000], **head}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        failed += int(result.get("pass") is False or "error" in result)
        line = json.dumps(result)
        print(line, flush=True)
        with open(out_dir / "results.jsonl", "a") as f:
            f.write(line + "\n")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build every CUDA module into BUNDLE (needs TVM's compiler, no GPU)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--skip-decode", action="store_true", help="leave out the 3B-shape model builds")
    r = sub.add_parser("run", help="load BUNDLE on this machine's GPU, check and time (TVM runtime only)")
    r.add_argument("bundle", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--only", nargs="*", default=[], choices=["ops", "tiny", "gemv", "decode"])
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.bundle, args.skip_decode)
        return 0
    return run(args.bundle, args.out, args.only)


if __name__ == "__main__":
    sys.exit(main())
