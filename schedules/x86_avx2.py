"""The integer kernels' two primitives on CPUs with AVX2 but not AVX-512 VNNI (AMD Zen 2, older Intel).

The kernels of x86_vnni.py are written per panel of 16 rows: a group's dot products are an int32x16 vector and
its steps a float32x16 one; on AVX2 each is two 256-bit halves (rows 0-7 and 8-15), which LLVM keeps in two
registers. Only the dot-order layouts run here (codec.format.dot_order_codes: depth 1 in 2 bits, depth 3 in
5, depth 4 in bytes): their 64 bytes per chunk of 4 weights are in the order `vpmaddubsw` reads after shifts and
masks, where the words layout needs AVX-512 VBMI's byte permute to get there (and its decode is as many
multiplies per weight as the float kernels', on the one pipe Zen 2 multiplies integers on).

- Dot: `vpmaddubsw` multiplies the unsigned weight bytes by the signed activation bytes and adds pairs into
  16-bit lanes, then `vpmaddwd` by ones adds the pairs of each row into its int32 lane (VNNI's `vpdpbusd`
  does both). No sum may pass 32767: at depths 1 and 3 (u ≤ 2, u ≤ 26) a group's 4 chunks add up in 16 bits
  first (at most 2032 and 26416) and take one `vpmaddwd`; at depth 4 (u ≤ 80, 20320 a chunk) every chunk
  takes its own. The prefill's form (`group_dot_offset`) has the signs the other way round: signed weights q,
  activations + 128 as unsigned bytes (at depth 3 at most 26520 in 16 bits), so the weights can be the
  instruction's memory operand.
- Step lookup: AVX-512's two-table permute picks from 32 entries; AVX2's `vpermps` from 8. When every panel
  of 16 rows lies in one matrix (stacked parts multiples of 16, as in every model here) the 27 entries of
  that matrix are 4 windows of 8 read at the panel's codebook offset (the last one ending at entry 26, so
  nothing past the codebook is read), picked by bits 3 and 4 of the index; otherwise each lane loads its own.
  This lookup was about half of a decode GEMV's time (4-entry `vpermilps` windows and `vpgatherdd` measured
  slower on Zen 2, the index digits by 16-bit multiplies instead of 32-bit ones no faster). The codebooks the
  codec writes are products, entry 8a + b = A_a·B_b (codec.quantize._log_codebook), and the layout's factor
  tables hold A and B (codec.format.codebook_factors): `factored_lookup` is then two `vpermps` and a multiply,
  bit for bit the entry (Zen 2, Qwen2.5-3B gate/up d=1: 1048 -> 717 us). A matrix whose codebook is not such a
  product (recovered from a published checkpoint) has its tables' `exact` entry 0, and the kernels take the
  four windows for its panels.
"""
from __future__ import annotations

import tvm
from tvm import tirx

from codec.quantize import CODEBOOK_SIZE, FACTOR_TABLE

from .base import ACT_MAX

HALF = 8  # int32 / float32 lanes of one 256-bit register
INT16_MAX = 32767
WINDOWS = -(-CODEBOOK_SIZE // HALF)  # vpermps tables per codebook


def supports(target: tvm.target.Target) -> bool:
    """An x86 llvm target with AVX2 (every x86-64 CPU this project benchmarks on)."""
    return (target.kind.name == "llvm" and not str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm64"))
            and bool(tvm.target.codegen.target_has_features("avx2", target)))


def half(vec: tirx.PrimExpr, h: int, lanes: int) -> tirx.PrimExpr:
    """Lanes [h·lanes, (h+1)·lanes) of a vector."""
    return tirx.Shuffle([vec], [tirx.const(h * lanes + i, "int32") for i in range(lanes)])


def concat(low: tirx.PrimExpr, high: tirx.PrimExpr, lanes: int = HALF) -> tirx.PrimExpr:
    """Two vectors of `lanes` lanes as one."""
    return tirx.Shuffle([low, high], [tirx.const(i, "int32") for i in range(2 * lanes)])


def group_dot(chunks: list[tirx.PrimExpr], x4s: list[tirx.PrimExpr], init: tirx.PrimExpr,
              max_u: int) -> tirx.PrimExpr:
    """init (int32x16) + Σ over the group's chunks of the 16 rows' dot products: chunk c is 64 bytes (int8x64,
    byte 4t+q = u of weight 4c+q of row t, u ≤ max_u), x4s[c] the 4 signed activation bytes of those weights
    packed in an int32."""
    return _pair_sums(chunks, x4s, init, max_u * ACT_MAX, lambda chunk, x_bytes: (chunk, x_bytes))


def group_dot_offset(chunks: list[tirx.PrimExpr], x4s: list[tirx.PrimExpr], max_q: int) -> tirx.PrimExpr:
    """The prefill's form of group_dot, with the signs the other way: chunk bytes the signed weights q
    (|q| ≤ max_q), x4s the activations offset by 128 as unsigned bytes, so the caller adds −128·Σ q of each row.
    `vpmaddubsw` then reads the weights as its memory operand: the prefill's tile vectors need no registers."""
    return _pair_sums(chunks, x4s, tirx.Broadcast(tirx.const(0, "int32"), 2 * HALF), max_q * (2 * ACT_MAX + 1),
                      lambda chunk, x_bytes: (x_bytes, chunk))


def _pair_sums(chunks, x4s, init, max_product: int, operands) -> tirx.PrimExpr:
    """init + Σ over chunks of `vpmaddubsw`(*operands(chunk half, x bytes)), pair sums added in 16 bits as long
    as no sum can pass 32767 (products at most max_product), then into each row's int32 lane by `vpmaddwd`."""
    per_sum = max(1, INT16_MAX // (2 * max_product))  # chunks whose pair sums add up in 16 bits
    ones = tirx.Broadcast(tirx.const(1, "int16"), 16)
    rows = [None, None]
    for first in range(0, len(chunks), per_sum):
        for h in range(2):
            pairs = None
            for chunk, x4 in zip(chunks[first:first + per_sum], x4s[first:first + per_sum]):
                x_bytes = tirx.reinterpret("int8x32", tirx.Broadcast(x4, HALF))
                pair = tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw",
                                                  *operands(half(chunk, h, 32), x_bytes))
                pairs = pair if pairs is None else pairs + pair
            row = tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, ones)
            rows[h] = row if rows[h] is None else rows[h] + row
    return init + concat(*rows)


def step_lookup(codebook, index: tirx.PrimExpr, panel_base: tirx.PrimExpr | None) -> tirx.PrimExpr:
    """The steps of 16 rows (float32x16). panel_base: the codebook offset of the matrix all 16 rows are in, and
    `index` (int32x16) indices into its 27 entries; None: the panel straddles stacked matrices and `index`
    holds absolute indices into the concatenated codebooks."""
    if panel_base is None:
        return codebook[index]
    halves = []
    for h in range(2):
        rel = half(index, h, HALF)
        picks = []
        for w in range(WINDOWS):
            start = min(w * HALF, CODEBOOK_SIZE - HALF)  # the last window ends at the codebook's last entry
            # vpermps reads an index's low 3 bits (rel - start where start is a multiple of 8)
            idx = rel if start == w * HALF else rel - tirx.Broadcast(tirx.const(start, "int32"), HALF)
            picks.append(tirx.call_llvm_pure_intrin("float32x8", "llvm.x86.avx2.permps",
                                                    codebook.vload([panel_base + start], "float32x8"), idx))
        # the window's number is bits 3 and 4 of the index, each moved to the sign bit (which vblendvps tests)
        for bit in (3, 4):
            chosen = (rel << tirx.Broadcast(tirx.const(31 - bit, "int32"), HALF)) < tirx.Broadcast(
                tirx.const(0, "int32"), HALF)
            picks = [tirx.Select(chosen, picks[i + 1], picks[i]) for i in range(0, len(picks), 2)]
        halves.append(picks[0])
    return concat(*halves)


def factored_lookup(codebook, index: tirx.PrimExpr, tables: tirx.PrimExpr) -> tirx.PrimExpr:
    """The steps of 16 rows (float32x16) at `index` (int32x16, 0..26) from the factor tables of their matrix at
    offset `tables` of the codebook parameter: B[k mod 8]·A[k div 8] (vpermps reads an index's low 3 bits)."""
    inner = codebook.vload([tables], "float32x8")
    outer = codebook.vload([tables + FACTOR_TABLE], "float32x8")
    three = tirx.Broadcast(tirx.const(3, "int32"), HALF)
    halves = [tirx.call_llvm_pure_intrin("float32x8", "llvm.x86.avx2.permps", outer, half(index, h, HALF) >> three)
              * tirx.call_llvm_pure_intrin("float32x8", "llvm.x86.avx2.permps", inner, half(index, h, HALF))
              for h in range(2)]
    return concat(*halves)
