"""Schedule rules for trit_decode_matmul, one class per target family and shape of work (dlight style).

`rules_for_target` lists the rules the compiler applies before dlight's defaults; `layout_for_target`
says which run-time weight layout those rules expect (the compiler repacks the checkpoint to it).
"""
from __future__ import annotations

import tvm

from .arm_dotprod import supports as has_arm_dotprod
from .base import DECODE_INT32, DECODE_SIMD16, DECODE_TABLE32, is_trit_decode_matmul
from .cpu import DenseLogitsCPU, TritGEMMCPU, TritGEMMVNNI, TritGEMVCPU, TritGEMVVNNI
from .cpu_rows import ElementwiseCPU, RowReductionCPU
from .cuda import TritGEMMCuda, TritGEMVCuda
from .x86_vnni import ROWS as VNNI_ROWS
from .x86_vnni import DOT_ORDER_ONLY, isa_for_target

__all__ = ["DECODE_INT32", "DECODE_SIMD16", "DECODE_TABLE32", "DenseLogitsCPU", "ElementwiseCPU", "RowReductionCPU",
           "TritGEMMCPU", "TritGEMMCuda", "TritGEMMVNNI", "TritGEMVCPU", "TritGEMVCuda", "TritGEMVVNNI",
           "byte_depth4_for_target", "decode_for_target", "dot_order_for_target", "is_trit_decode_matmul",
           "layout_rows_for_target", "rules_for_target"]

LAYOUT_ROWS = 32  # x86: 32 rows x 16-bit lanes = one AVX-512 register; CUDA: one warp reads 32 rows' bytes
# x86 without AVX-512: 16 rows x 16-bit lanes = one AVX2 register. With 32 there the decode GEMV's group
# accumulators spill (SmolLM2 shapes on Zen 2: 15-24% slower) and the prefill GEMM runs at half the speed.
LAYOUT_ROWS_AVX2 = 16
LAYOUT_ROWS_ARM = 8  # aarch64: 8 rows x 16-bit lanes = one 128-bit NEON register


def rules_for_target(target: tvm.target.Target, choices: dict[str, dict] | None = None) -> list:
    """choices: trit-tune's per-kernel variant and knobs for the hand-written kernels (TritGEMVVNNI)."""
    if target.kind.name == "cuda":
        return [TritGEMVCuda(), TritGEMMCuda()]
    return [TritGEMVVNNI(choices), TritGEMMVNNI(choices), TritGEMVCPU(), TritGEMMCPU(), DenseLogitsCPU(),
            RowReductionCPU(), ElementwiseCPU()]


def layout_rows_for_target(target: tvm.target.Target, int8_activations: bool = False) -> int:
    """Rows interleaved in the run-time weight layout the rules expect (0 = the checkpoint's planes):
    one SIMD register of 16-bit lanes on CPUs (AVX-512, AVX2, NEON), one warp on GPUs; with int8 activations
    on AVX-512 (and aarch64 with dotprod), the 16 int32 lanes of the integer kernels' panels
    (schedules/x86_vnni.py)."""
    if target.kind.name != "llvm":
        return LAYOUT_ROWS
    if str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm64")):
        return VNNI_ROWS if int8_activations and has_arm_dotprod(target) else LAYOUT_ROWS_ARM
    if not tvm.target.codegen.target_has_features("avx512f", target):
        return LAYOUT_ROWS_AVX2
    return VNNI_ROWS if int8_activations else LAYOUT_ROWS


def dot_order_for_target(target: tvm.target.Target, int8_activations: bool = False) -> bool:
    """Depth-1 matrices in 2 bits and depth-3 ones in 5 bits (codec.format.dot_order_codes): what the integer
    kernels (AVX-512 VNNI, AVX2 or aarch64 dotprod) read them in, so only with int8 activations on CPUs that run
    those kernels. A shift and a mask per chunk instead of the words' two 16-bit multiplies a weight and a byte
    permute, in fewer bytes (5 against d=3 words' 5.33 bits); with VNNI on Zen 5, Qwen2.5-3B's d=3 decode GEMVs
    from memory took 8-18% less time in 5 bits than in words (gate/up 697 -> 610 µs)."""
    return (int8_activations and layout_rows_for_target(target, True) == VNNI_ROWS
            and isa_for_target(target, dot_order=True) is not None)


def byte_depth4_for_target(target: tvm.target.Target, int8_activations: bool = False) -> bool:
    """Depth-4 matrices in bytes (codec.format.dot_order_codes) and the codebooks' factor tables where the
    integer kernels are AVX2's or aarch64's: they have no byte permute to take the words layout apart (VNNI's
    read d=4 words about as fast as bytes: the same 8 bits a weight)."""
    return (dot_order_for_target(target, int8_activations)
            and isa_for_target(target, dot_order=True) in DOT_ORDER_ONLY)


def decode_for_target(target: tvm.target.Target) -> str:
    """GPUs decode in 32-bit integers with a shared-memory digit table (no 16-bit integer SIMD to gain there;
    TVM's CUDA code also computes 16-bit products in C's int, without the wrap-around the CPU decode relies
    on). DECODE_INT32 is the table-free alternative the GPU benchmark compares against."""
    return DECODE_TABLE32 if target.kind.name == "cuda" else DECODE_SIMD16
