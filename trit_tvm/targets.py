"""Target names users type (llvm, cuda, aarch64, aarch64-dotprod, a TVM tag or dict) -> tvm.target.Target."""
from __future__ import annotations

import json
import platform

import tvm

from .errors import CompileError

SHORT_TARGETS = {
    "llvm": {"kind": "llvm"},  # + mcpu of this machine (see parse_target)
    "cpu": {"kind": "llvm"},
    "cuda": {"kind": "cuda", "arch": "sm_80"},  # PTX for sm_80 also runs on Hopper; override with a dict
    "aarch64": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
    # ARMv8.2's dot product (Cortex-A76 and later: Raspberry Pi 5, Jetson Orin): --int8-activations runs `sdot`
    "aarch64-dotprod": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]},
}
# what a CUDA target needs to say when no GPU is here to ask (every card since sm_50 has at least these);
# without them TVM warns at every build that the target lacks max_shared_memory_per_block
CUDA_LIMITS = {"max_shared_memory_per_block": 49152, "max_threads_per_block": 1024, "thread_warp_size": 32}
_HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def parse_target(spec: str) -> tvm.target.Target:
    """A short name, a JSON dict ('{"kind":"cuda","arch":"sm_90"}') or a TVM target tag.

    `llvm`/`cpu` mean this machine's CPU (its mcpu, so its SIMD width); '{"kind":"llvm"}' is a portable
    baseline x86-64 build.
    """
    spec = spec.strip()
    try:
        if spec in SHORT_TARGETS:
            cfg = dict(SHORT_TARGETS[spec])
            if spec == "cuda" and tvm.cuda(0).exist:
                return tvm.target.Target.from_device(tvm.cuda(0))
            if cfg["kind"] == "cuda":
                cfg.update(CUDA_LIMITS)
            if cfg == {"kind": "llvm"}:  # like -march=native: this CPU's vector units (AVX-512, NEON, ...)
                cfg["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
            return tvm.target.Target(cfg)
        if spec.startswith("{"):
            cfg = json.loads(spec)
            if isinstance(cfg, dict) and cfg.get("kind") == "cuda":
                cfg = {**CUDA_LIMITS, **cfg}
            return tvm.target.Target(cfg)
        return tvm.target.Target(spec)
    except (ValueError, TypeError, RuntimeError, tvm.error.InternalError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompileError(f"unknown target {spec!r} ({first[:160]}); use one of {', '.join(SHORT_TARGETS)}, "
                           "a TVM tag, or a dict such as '{\"kind\":\"cuda\",\"arch\":\"sm_90\"}'") from None


def target_to_json(target: tvm.target.Target) -> dict:
    """The target as plain JSON (the dict form parse_target accepts back)."""
    def plain(v):
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if hasattr(v, "items"):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, tvm.target.Target):
            return target_to_json(v)
        try:
            return [plain(x) for x in v]
        except TypeError:
            return str(v)
    return plain(target.export())


def target_device_kind(target: tvm.target.Target) -> str:
    """'cuda' or 'cpu': where the artifact's kernels run."""
    return "cuda" if target.kind.name == "cuda" else "cpu" if target.kind.name == "llvm" else target.kind.name


def target_arch(target: tvm.target.Target) -> str:
    """The CPU architecture the host code is built for (x86_64, aarch64, ...)."""
    host = target.host if target.host is not None else target
    triple = str(host.attrs.get("mtriple", "")) if host.kind.name == "llvm" else ""
    if triple:
        return _HOST_ARCH.get(triple.split("-")[0], triple.split("-")[0])
    return host_arch()


def target_label(target: tvm.target.Target) -> str:
    """A short name for output dirs: the device kind, or the CPU architecture of a cross-compiled CPU build
    (an aarch64 build is not named llvm)."""
    if target.kind.name == "llvm" and target_arch(target) != host_arch():
        return target_arch(target)
    return target.kind.name


def host_arch() -> str:
    return _HOST_ARCH.get(platform.machine().lower(), platform.machine().lower())


def target_key(target: tvm.target.Target) -> str:
    """A short stable name for tuning-record folders: kind, arch/mcpu or mtriple."""
    parts = [target.kind.name]
    for attr in ("arch", "mcpu", "mtriple"):
        v = target.attrs.get(attr)
        if v:
            parts.append(str(v))
    return "-".join(parts).replace("/", "_")
