"""Where a decode step's time goes on this CPU: every VM call of one `decode` (after a prompt of --prompt-tokens)
timed through the VM's instrument hook, grouped into the quantized linears, the output head, attention over
the KV cache (with RoPE and the cache append it runs), norms / element-wise work, and the rest (the VM's
allocations and builtins, the embedding lookup), each as a share of the time inside calls. The hook adds
~25 µs to every call (the instrumented step against the plain one says how much), so small calls weigh
more here than they do in the plain step.

    python -m benchmarks.profile_decode [--model 0.5B|smollm2] [--depth 3] [--quantize-head] [--steps 16]
                                        [--prefill] [--int8-activations] [--kv-cache-dtype float16]
                                        [--prompt-tokens 128]

Prints one JSON line: milliseconds and shares per group, and the slowest kernels.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.common import machine
from trit_tvm.artifact import KV_CACHE_DTYPES

GROUPS = (  # (group, substrings of a VM call's symbol), first match wins
    ("output head", ("lm_head", "logits")),
    ("linears", ("trit_",)),
    ("attention", ("attention", "attn", "kv_cache", "kv_state", "paged", "merge_state", "copy_single_page")),
    ("norm, element-wise", ("norm", "add", "multiply", "silu", "split", "reshape", "concat", "fused")),
)


def group_of(symbol: str) -> str:
    s = symbol.lower()
    return next((g for g, keys in GROUPS if any(k in s for k in keys)), "other")


def profile(model, prompt: list[int], steps: int, prefill: bool = False) -> dict:
    """Per-symbol seconds summed over `steps` decode steps (or prefills of the prompt), and the plain steps'
    seconds."""
    import tvm
    ids = np.asarray(prompt, np.int64)
    kv = model._new_cache(len(prompt) + 2 * steps + 1)
    model._prefill(kv, ids)
    token = np.array([int(prompt[-1])])

    def step():
        if prefill:
            model._prefill(model._new_cache(len(prompt) + 1), ids)
        else:
            model._forward(kv, "decode", token)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    plain = (time.perf_counter() - t0) / steps

    per_symbol: dict[str, float] = defaultdict(float)
    started: dict[str, float] = {}

    vocab = int(model.config["vocab_size"])

    def instrument(_func, symbol, before, _ret, *args):
        output = args[-1] if args else None  # call_tir passes the output buffer last
        if symbol.startswith("trit_") and getattr(output, "shape", (0,))[-1] == vocab:
            symbol = f"lm_head ({symbol})"  # the quantized head is a trit kernel too
        if before:
            started[symbol] = time.perf_counter()
        else:
            per_symbol[symbol] += time.perf_counter() - started.pop(symbol)
        return 0  # VMInstrumentReturnKind.kNoOp: run the call as usual

    model.vm.set_instrument(tvm.runtime.convert(instrument))
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        instrumented = (time.perf_counter() - t0) / steps
    finally:
        model.vm.set_instrument(None)
    return {"plain_step_s": plain, "instrumented_step_s": instrumented,
            "per_symbol_s": {k: v / steps for k, v in per_symbol.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="0.5B", choices=["0.5B", "1.5B", "3B", "smollm2"])
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--quantize-head", action="store_true", help="the output head as depth-4 trits")
    ap.add_argument("--int8-activations", action="store_true", help="compile with 8-bit activations (trit-compile's)")
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="float32",
                    help="the KV cache's storage (trit-compile's)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps averaged")
    ap.add_argument("--layers", type=int, help="fewer layers than the real model (quick runs)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="the prompt: the context the decode steps run after")
    ap.add_argument("--prefill", action="store_true", help="profile the prompt's prefill instead of decode steps")
    args = ap.parse_args()

    from benchmarks.bench_peer import write_random_qwen
    from codec.checkpoint import write_trit_checkpoint
    from codec.gguf_source import gguf_to_hf
    from trit_tvm.compile import compile_model
    from trit_tvm.demo import smollm2_gguf
    from trit_tvm.runtime import TritModel
    from trit_tvm.targets import parse_target

    with tempfile.TemporaryDirectory(prefix="trit-profile-") as tmp:
        tmp = Path(tmp)
        if args.model == "smollm2":
            src, description = gguf_to_hf(smollm2_gguf(), tmp / "hf"), "SmolLM2-135M-Instruct"
        else:
            src, _ = write_random_qwen(args.model, tmp, args.layers)
            description = f"Qwen2.5-{args.model} shape, random weights"
        write_trit_checkpoint(src, tmp / "trit", depth=args.depth, quantize_head=args.quantize_head)
        compile_model(tmp / "trit", parse_target("llvm"), tmp / "art", stage=lambda _m: None,
                      int8_activations=args.int8_activations, kv_cache_dtype=args.kv_cache_dtype)
        model = TritModel(tmp / "art")
        prompt = np.random.default_rng(0).integers(0, 32000, size=args.prompt_tokens).tolist()
        model.generate(prompt[:8], 2)  # warm-up
        result = profile(model, prompt, args.steps, args.prefill)
    groups: dict[str, float] = defaultdict(float)
    for symbol, s in result["per_symbol_s"].items():
        groups[group_of(symbol)] += s
    inside = sum(groups.values())
    top = sorted(result["per_symbol_s"].items(), key=lambda kv: -kv[1])[:8]
    print(json.dumps({
        "bench": "profile_decode", "model": description, "phase": "prefill" if args.prefill else "decode",
        "depth": args.depth, "quantized_head": args.quantize_head, "prompt_tokens": args.prompt_tokens,
        "activations": "int8" if args.int8_activations else "float", "kv_cache_dtype": args.kv_cache_dtype,
        **machine(), "step_ms": round(result["plain_step_s"] * 1e3, 2),
        "instrumented_step_ms": round(result["instrumented_step_s"] * 1e3, 2),
        "ms": {g: round(s * 1e3, 2) for g, s in groups.items()},
        "share": {g: round(s / inside, 3) for g, s in groups.items()},
        "outside_linears_and_head": round(1 - (groups["linears"] + groups["output head"]) / inside, 3),
        "top_kernels_ms": {k: round(v * 1e3, 3) for k, v in top}}))

if __name__ == "__main__":
    main()
