"""exp2 / exp as plain float32 arithmetic, so that vectorized CPU kernels stay vectorized.

TVM lowers `exp` / `exp2` to LLVM's intrinsics, and LLVM turns a vector of them into one libm call per lane:
in a SmolLM2 prefill (Intel Xeon, 2 cores) the SwiGLU's sigmoid took 12.4 of 155 ms, and `expf`, `exp2f`,
`powf`, `sinf`, `cosf` were the hottest symbols under perf. Here 2^x = 2^n · 2^f with n = round(x),
|f| ≤ 1/2, 2^f by its degree-7 Taylor polynomial (truncation below 7e-9 relative, under float32's rounding),
2^n built in the exponent bits; x is clamped to [-126, 127], so results underflow to 2^-126 and overflow to
2^127·2^f rather than to 0 / inf (callers mask where that matters). exp(x) = exp2(x·log2 e) rounds that
product to float32 first, so its relative error grows as ~|x|·6e-8 (5e-6 at x = -87; 1e-6 at |x| = 16).
"""
from __future__ import annotations

import math

from tvm import tirx

LOG2E = math.log2(math.e)
_COEFFS = [math.log(2) ** k / math.factorial(k) for k in range(8)]  # 2^f = Σ (f·ln 2)^k / k!


def exp2(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """2^x for a float32 (scalar or vector) expression."""
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    x = tirx.max(tirx.min(x, f32(127.0)), f32(-126.0))
    n = tirx.floor(x + f32(0.5))
    f = x - n
    p = f32(_COEFFS[-1])
    for c in reversed(_COEFFS[:-1]):
        p = p * f + f32(c)
    bits = tirx.shift_left(n.astype("int32") + tirx.const(127, "int32"), tirx.const(23, "int32"))
    return p * tirx.reinterpret("float32", bits)


def exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """e^x for a float32 expression (as exp2(x·log2 e))."""
    return exp2(x * tirx.const(LOG2E, "float32"))
