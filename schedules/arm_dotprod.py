"""The integer kernels' dot product on aarch64 CPUs with the dot-product extension (ARMv8.2 `dotprod`: Cortex-A76
and later, as in the Raspberry Pi 5 and Jetson Orin; not the Pi 4's Cortex-A72).

The kernels of x86_vnni.py are written per panel of 16 rows, and the dot-order layouts (codec.format.dot_order_codes:
depth 1 in 2 bits, depth 3 in 5, depth 4 in bytes) give 64 bytes per chunk of 4 weights, byte 4t+q = u of weight q
of row t: four 128-bit registers of 4 rows each, in the order `sdot` reads them with the 4 activation bytes
broadcast to every lane. `sdot` multiplies signed bytes by signed bytes; the weights u = q + qmax (at most 80) are
below 128, so it takes them as VNNI's `vpdpbusd` takes them unsigned, from the same −qmax·Σ levels start, and the
sums are the same exact integers. The words layout (a byte permute to take its digits apart) is not read here:
depth-2 matrices run the int8 form through the float rules, as on AVX2.

The steps' codebook lookup is one load per lane (TVM's code for a vector load at vector indices). A `tbl` form
over the factor tables, like AVX2's `vpermps` one (B's 32 bytes a two-register `tbl`, A's a one-register one, at
byte indices 4k..4k+3), was written and left out: by llvm-mca's Cortex-A76 model (there is no aarch64 CPU here to
time on) it made the decode loop slower, 212 -> 249 cycles per 768 weights at d=1, 306 -> 315 at d=3.
"""
from __future__ import annotations

import tvm
from tvm import tirx

from .x86_avx2 import concat, half

ISA = "neon-dotprod"
QUARTER = 4  # int32 lanes (rows) of one 128-bit register
REQUIRED_FEATURES = ("neon", "dotprod")


def supports(target: tvm.target.Target) -> bool:
    """An aarch64 llvm target whose CPU has `sdot` (mattr +dotprod, or an mcpu that has it)."""
    return (target.kind.name == "llvm" and str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm64"))
            and all(bool(tvm.target.codegen.target_has_features(f, target)) for f in REQUIRED_FEATURES))


def _sdot(acc: tirx.PrimExpr, weights: tirx.PrimExpr, x4: tirx.PrimExpr) -> tirx.PrimExpr:
    """acc[t] += Σ_q s8(weights[t].byte q) · s8(x4.byte q), 4 lanes (`sdot`)."""
    return tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc, weights,
                                      tirx.reinterpret("int8x16", tirx.Broadcast(x4, QUARTER)))


def group_dot(chunks: list[tirx.PrimExpr], x4s: list[tirx.PrimExpr], init: tirx.PrimExpr) -> tirx.PrimExpr:
    """init (int32x16) + Σ over the group's chunks of the 16 rows' dot products: chunk c is 64 bytes (int8x64,
    byte 4t+q = u of weight 4c+q of row t), x4s[c] the 4 signed activation bytes of those weights packed in an
    int32. Each quarter of 4 rows accumulates in its own register."""
    quarters = [half(init, k, QUARTER) for k in range(4)]
    for chunk, x4 in zip(chunks, x4s):
        quarters = [_sdot(acc, half(chunk, k, 16), x4) for k, acc in enumerate(quarters)]
    return concat(concat(quarters[0], quarters[1], QUARTER), concat(quarters[2], quarters[3], QUARTER), 2 * QUARTER)
