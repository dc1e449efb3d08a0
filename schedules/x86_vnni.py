"""The decode GEMV with 8-bit activations on AVX-512 VNNI: integer dot products on the trit digits.

The operator's int8-activation form (trit_tvm.operator, `WeightLayout.int8_activations`) states y = x̂ @ Ŵᵀ
with x̂ = x quantized per group of 16 (scale max|x|/127, nearest integer). On one row of x this kernel
computes exactly that with integers: per panel of 16 rows and group g,
    dot[r]  = Σ_j xq[16g+j] · u[r, 16g+j] − qmax · Σ_j xq[16g+j]        (int32, exact)
    y[r]   += float(dot[r]) · step[r, g] · scale_x[g]
with u = q + qmax ∈ [0, 3^d) as unsigned bytes and xq signed bytes: `vpdpbusd` does 64 such products (16
rows × 4 weights) per instruction. The weights are the words layout with 16 rows per panel: one 512-bit
load holds 2 weights × 16 rows of 16-bit words, and each of its m base-3^d digits (one group each) comes out
with a multiply-high (and a wrapping multiply for the next digit), as in the FP32 kernels. `vpermt2b` then
gathers the low bytes of two such registers into the 16 rows × 4 weights byte order `vpdpbusd` reads.

Per 256 weights this is ~34 instructions against ~64 for the FP32 GEMV (digits widened to float and one FMA
per 16 weights): the FP32 decode of a cached d=1 matrix is instruction-bound, not memory-bound.
The kernel is hand-written TVMScript; TritGEMVVNNI (schedules/cpu.py) substitutes it for the operator's
int8-activation decode GEMV on targets with avx512vnni and avx512vbmi. The quantization of x runs once per
call on the calling thread (K/16 groups, scalar), before the parallel loop over panels.
"""
from __future__ import annotations

import itertools

import tvm
from tvm import tirx
from tvm.script import tirx as T

from codec.format import padded_blocks, word_block, word_digits
from codec.quantize import CODEBOOK_SIZE, GROUP_SIZE, qmax_of

from .base import ACT_MAX
from .prefetch import LINE_BYTES, PREFETCH_BLOCKS
from .x86_lookup import TABLE_WINDOW, _permute_lookup

ROWS = 16  # rows per panel: the int32 lanes of one 512-bit register
WORD_PAIRS = 8  # 512-bit loads per block and panel: 16 weights x 16 rows of 16-bit words, 2 weights each
CHUNKS = GROUP_SIZE // 4  # vpdpbusd instructions per group and panel (4 weights each)


def required_features() -> tuple[str, ...]:
    return ("avx512bw", "avx512vnni", "avx512vbmi")


def supports(target: tvm.target.Target) -> bool:
    """The target's CPU has the instructions this kernel uses."""
    return target.kind.name == "llvm" and all(
        bool(tvm.target.codegen.target_has_features(f, target)) for f in required_features())


def _byte_order() -> tirx.PrimExpr:
    """vpermt2b indices: byte 4t+q of the result = the low byte of weight q of row t, where the first source
    holds weights 0, 1 and the second weights 2, 3 (16 rows each, 16-bit words): 2t + 32q."""
    lane = tirx.Ramp(tirx.const(0, "int8"), tirx.const(1, "int8"), 64)
    three = tirx.Broadcast(tirx.const(3, "int8"), 64)
    two = tirx.Broadcast(tirx.const(2, "int8"), 64)
    return tirx.shift_right(lane, two) * two + tirx.bitwise_and(lane, three) * tirx.Broadcast(tirx.const(32, "int8"), 64)


def _weight_bytes(low: tirx.PrimExpr, high: tirx.PrimExpr) -> tirx.PrimExpr:
    """Two registers of digits (uint16x32: weights 4c, 4c+1 and 4c+2, 4c+3 of 16 rows) -> 64 bytes, bytes
    4t..4t+3 the 4 weights of row t."""
    return tirx.call_llvm_pure_intrin("int8x64", "llvm.x86.avx512.vpermi2var.qi.512",
                                      tirx.reinterpret("int8x64", low), _byte_order(),
                                      tirx.reinterpret("int8x64", high))


def _mulhi(words: tirx.PrimExpr, base: int) -> tirx.PrimExpr:
    """Digit of each 16-bit word: the high half of word·base."""
    return tirx.call_llvm_pure_intrin("uint16x32", "llvm.x86.avx512.pmulhu.w.512", words,
                                      tirx.Broadcast(tirx.const(base, "uint16"), 32))


def _dot(acc: tirx.PrimExpr, weights: tirx.PrimExpr, x4: tirx.PrimExpr) -> tirx.PrimExpr:
    """acc[t] += Σ_q u8(weights[t].byte q) · s8(x4.byte q), 16 lanes (vpdpbusd)."""
    return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, weights,
                                      tirx.reinterpret("int8x64", tirx.Broadcast(x4, 16)))


def vnni_gemv_func(n_out: int, n_in: int, depth: int, parts: tuple[int, ...] = (), bias: bool = False,
                   dtype: str = "float32", x_shape: tuple[int, ...] | None = None,
                   out_shape: tuple[int, ...] | None = None) -> tirx.PrimFunc:
    """The kernel for one row of x (x_shape, default [1, n_in]; leading dims of 1) and a words layout of 16
    rows per panel (codes [ceil(n_out/16), 16·B, 16], scales [ceil(n_out/16), ceil(m·B/3), 16]), with the
    operator's parameters (x, codes, scales, codebook, [bias], out); parts: row counts of stacked matrices."""
    m, _ = word_block(depth)
    n_blocks = padded_blocks(n_in, depth)
    groups, real_groups = n_blocks * m, n_in // GROUP_SIZE
    panels = -(-n_out // ROWS)
    scale_m = word_digits(CODEBOOK_SIZE)
    scale_words = -(-groups // scale_m)
    table = -(-CODEBOOK_SIZE * max(len(parts), 1) // TABLE_WINDOW) * TABLE_WINDOW
    base, qmax = 3 ** depth, qmax_of(depth)
    starts = list(itertools.accumulate(parts[:-1]))
    units = n_blocks * GROUP_SIZE
    x_shape, out_shape = x_shape or (1, n_in), out_shape or (1, n_out)
    ahead = PREFETCH_BLOCKS * GROUP_SIZE * ROWS  # words: the block PREFETCH_BLOCKS iterations ahead

    def codebook_base(row):
        """Offset of the row's matrix's codebook in the concatenated codebooks (stacked matrices)."""
        total = tirx.const(0, "int32")
        for start in starts:
            total = total + tirx.Select(row >= start, tirx.const(CODEBOOK_SIZE, "int32"), tirx.const(0, "int32"))
        return total

    def scale_digit(word, g):
        """Digit g % 3 (most significant first) of 16-bit scale words, in int32 lanes: the high half of
        27·(word·27^(g%3) mod 2^16), as codec.format.chain_digits."""
        k = tirx.truncmod(g, scale_m)
        mult = tirx.Select(k == 0, tirx.const(1, "int32"),
                           tirx.Select(k == 1, tirx.const(CODEBOOK_SIZE, "int32"),
                                       tirx.const(CODEBOOK_SIZE ** 2 % 65536, "int32")))
        t = tirx.bitwise_and(word * tirx.Broadcast(mult, ROWS), tirx.Broadcast(tirx.const(0xFFFF, "int32"), ROWS))
        return tirx.shift_right(t * tirx.Broadcast(tirx.const(CODEBOOK_SIZE, "int32"), ROWS),
                                tirx.Broadcast(tirx.const(16, "int32"), ROWS))

    def prefetch(buf, offset):
        return tirx.call_llvm_intrin("void", "llvm.prefetch.p0", tirx.address_of(buf[offset]),
                                     tirx.const(0, "int32"), tirx.const(3, "int32"), tirx.const(1, "int32"))

    @T.macro
    def body(x, codes, scales, codebook, out, bias_at):
        x_flat = T.decl_buffer((n_in,), dtype, data=x.data)
        out_flat = T.decl_buffer((n_out,), dtype, data=out.data)
        codes_flat = T.decl_buffer((panels * units * ROWS,), "uint16", data=codes.data)
        scales_flat = T.decl_buffer((panels * scale_words * ROWS,), "uint16", data=scales.data)
        xq4 = T.alloc_buffer((groups * CHUNKS,), "int32")
        x_scale = T.alloc_buffer((groups,), "float32")
        x_corr = T.alloc_buffer((groups,), "int32")
        peak = T.alloc_buffer((1,), "float32")
        total = T.alloc_buffer((1,), "int32")
        word = T.alloc_buffer((1,), "int32")
        # x to int8 per group of 16 (trit_tvm.operator.quantize_activations), 4 levels per int32; the groups
        # past K (the layout's padding) are zeros
        for g in T.serial(groups):
            peak[0] = T.float32(0)
            total[0] = 0
            if g < real_groups:
                for j in T.serial(GROUP_SIZE):
                    peak[0] = T.max(peak[0], T.fabs(T.Cast("float32", x_flat[g * GROUP_SIZE + j])))
            x_scale[g] = peak[0] / T.float32(ACT_MAX)
            for c in T.serial(CHUNKS):
                word[0] = 0
                if peak[0] > T.float32(0):
                    for q in T.unroll(4):
                        level: T.let[T.int32] = T.Cast("int32", T.nearbyint(
                            T.Cast("float32", x_flat[g * GROUP_SIZE + c * 4 + q]) * (T.float32(ACT_MAX) / peak[0])))
                        total[0] += level
                        word[0] = T.bitwise_or(word[0], T.shift_left(T.bitwise_and(level, 255), q * 8))
                xq4[g * CHUNKS + c] = word[0]
            x_corr[g] = total[0] * (-qmax)
        for panel in T.parallel(panels):
            with T.sblock("trit_vnni_panel"):
                T.reads(codes_flat[panel * units * ROWS:(panel + 1) * units * ROWS],
                        scales_flat[panel * scale_words * ROWS:(panel + 1) * scale_words * ROWS],
                        xq4[0:groups * CHUNKS], x_scale[0:groups], x_corr[0:groups], codebook[0:table])
                T.writes(out_flat[panel * ROWS:T.min(panel * ROWS + ROWS, n_out)])
                acc = T.sblock_alloc_buffer((ROWS,), "float32", scope="local")
                dot = T.sblock_alloc_buffer((ROWS,), "int32", scope="local")
                index = T.sblock_alloc_buffer((ROWS,), "int32", scope="local")
                offset = T.sblock_alloc_buffer((ROWS,), "int32", scope="local")
                words = T.sblock_alloc_buffer((WORD_PAIRS * 32,), "uint16", scope="local")
                for r in T.vectorized(ROWS):
                    acc[r] = T.float32(0)
                    offset[r] = codebook_base(panel * ROWS + r)
                for b in T.serial(n_blocks):
                    if b + PREFETCH_BLOCKS < n_blocks:  # 512 bytes of codes per block: 8 lines
                        for line in T.unroll(GROUP_SIZE * ROWS * 2 // LINE_BYTES):
                            T.evaluate(prefetch(codes_flat, (panel * units + b * GROUP_SIZE) * ROWS + ahead
                                                + line * (LINE_BYTES // 2)))
                        T.evaluate(prefetch(scales_flat, (panel * scale_words + (b + PREFETCH_BLOCKS) * m // scale_m)
                                            * ROWS))
                    for v in T.unroll(WORD_PAIRS):
                        words[T.ramp(v * 32, 1, 32)] = codes_flat[T.ramp((panel * units + b * GROUP_SIZE + v * 2)
                                                                         * ROWS, 1, 32)]
                    for p in T.unroll(m):
                        dot[T.ramp(0, 1, ROWS)] = T.Broadcast(x_corr[b * m + p], ROWS)
                        for c in T.unroll(CHUNKS):
                            dot[T.ramp(0, 1, ROWS)] = _dot(
                                dot[T.ramp(0, 1, ROWS)],
                                _weight_bytes(_mulhi(words[T.ramp(c * 64, 1, 32)], base),
                                              _mulhi(words[T.ramp(c * 64 + 32, 1, 32)], base)),
                                xq4[(b * m + p) * CHUNKS + c])
                        if p < m - 1:  # the next digit: T_p+1 = T_p · 3^d mod 2^16
                            for v in T.unroll(WORD_PAIRS):
                                words[T.ramp(v * 32, 1, 32)] = words[T.ramp(v * 32, 1, 32)] * T.Broadcast(
                                    T.uint16(base), 32)
                        index[T.ramp(0, 1, ROWS)] = scale_digit(T.Cast("int32x16", scales_flat[T.ramp(
                            (panel * scale_words + (b * m + p) // scale_m) * ROWS, 1, ROWS)]), b * m + p) \
                            + offset[T.ramp(0, 1, ROWS)]
                        acc[T.ramp(0, 1, ROWS)] = acc[T.ramp(0, 1, ROWS)] + T.Cast(
                            "float32x16", dot[T.ramp(0, 1, ROWS)]) * (
                            _permute_lookup(codebook, index) * T.Broadcast(x_scale[b * m + p], ROWS))
                for r in T.serial(ROWS):
                    if panel * ROWS + r < n_out:
                        out_flat[panel * ROWS + r] = T.Cast(dtype, acc[r] + bias_at(panel * ROWS + r))

    if bias:
        @T.prim_func(s_tir=True)
        def with_bias(x: T.Buffer(x_shape, dtype), codes: T.Buffer((panels, units, ROWS), "uint16"),
                      scales: T.Buffer((panels, scale_words, ROWS), "uint16"), codebook: T.Buffer((table,), "float32"),
                      b: T.Buffer((n_out,), dtype), out: T.Buffer(out_shape, dtype)):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            body(x, codes, scales, codebook, out, lambda n: T.Cast("float32", b[n]))
        return with_bias

    @T.prim_func(s_tir=True)
    def without_bias(x: T.Buffer(x_shape, dtype), codes: T.Buffer((panels, units, ROWS), "uint16"),
                     scales: T.Buffer((panels, scale_words, ROWS), "uint16"), codebook: T.Buffer((table,), "float32"),
                     out: T.Buffer(out_shape, dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        body(x, codes, scales, codebook, out, lambda n: T.float32(0))
    return without_bias
