"""trit_decode_matmul with 8-bit activations on AVX-512 VNNI: integer dot products on the trit digits.

The operator's int8-activation form (trit_tvm.operator, `WeightLayout.int8_activations`) states y = x̂ @ Ŵᵀ
with x̂ = x quantized per group of 16 (scale max|x|/127, nearest integer). These kernels compute exactly that
with integers: per panel of 16 rows and group g,
    dot[r]  = Σ_j xq[16g+j] · u[r, 16g+j] − qmax · Σ_j xq[16g+j]        (int32, exact)
    y[r]   += float(dot[r]) · step[r, g] · scale_x[g]
with u = q + qmax ∈ [0, 3^d) as unsigned bytes and xq signed bytes: `vpdpbusd` does 64 such products (16
rows × 4 weights) per instruction. The weights are the words layout with 16 rows per panel: one 512-bit
load holds 2 weights × 16 rows of 16-bit words, and each of its m base-3^d digits (one group each) comes out
with a multiply-high (and a wrapping multiply for the next digit), as in the FP32 kernels. `vpermt2b` then
gathers the low bytes of two such registers into the 16 rows × 4 weights byte order `vpdpbusd` reads.
Depth-1 matrices are in the 2-bit layout instead (codec.format.dot_order_codes): one 512-bit load per group
and panel, stored in that byte order already, so each group of 4 weights × 16 rows is a shift and a mask;
depth-3 matrices are in 5 bits in that order too (4-bit fields and a plane of bit 4), and on AVX2 CPUs
depth-4 ones in bytes (nothing to decode).

Decode (one row of x, `vnni_gemv_func`): the digits go straight into the dot products, ~34 instructions per
256 weights against ~64 for the FP32 GEMV (digits widened to float, one FMA per weight and 16 rows), whose
decode of a cached d=1 matrix is instruction-bound. Prefill (`vnni_gemm_func`): each panel's weights are
decoded once into a byte tile (and its steps into a float tile), then every ROW_TILE rows of x share each tile
load: 4 `vpdpbusd` per 256 multiply-adds where the FP32 GEMM needs 16 FMAs. On AVX2 the prefill goes a row of x
at a time over GROUP_BLOCK_AVX2 groups of the tile, which hold q (signed) where x is offset to unsigned bytes, so
that every tile vector is a memory operand of `vpmaddubsw` (x86_avx2.group_dot_offset): with row tiles, LLVM kept
the tile's vectors in registers and spilled the accumulators (Zen 2, Qwen2.5-3B gate/up, 128 rows: 50.8 ms
before, 45.8 after; 44.2–44.8 with the offset's correction added as a float, _tile_group_dot).
On aarch64 CPUs with the dot-product extension the same kernels read the dot-order layouts with `sdot`
(arm_dotprod.py: a group's 16 rows are four registers of 4).
The kernels are hand-written TVMScript; TritGEMVVNNI / TritGEMMVNNI (schedules/cpu.py) substitute them for
the operator's int8 form on targets with avx512vnni and avx512vbmi (or AVX2 or aarch64's dotprod). x is quantized
first, per row (over the cores for a prefill), before the parallel loop over panels.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.script import tirx as T

from codec.format import DOT_HIGH_BITS, DOT_ROWS, FACTORS, dot_field_bits, factor_tables_start, padded_blocks, \
    word_block, word_digits
from codec.quantize import CODEBOOK_SIZE, GROUP_SIZE, qmax_of

from . import arm_dotprod, x86_avx2
from .base import ACT_MAX, ACT_OFFSET
from .prefetch import LINE_BYTES, PREFETCH_BLOCKS, prefetch_call
from .x86_lookup import TABLE_WINDOW, permute_lookup

ROWS = 16  # weight rows per panel: the int32 lanes of one 512-bit register
assert DOT_ROWS == ROWS, "the dot-order layouts are stored in the byte order of these kernels' vpdpbusd operands"
WORD_PAIRS = 8  # 512-bit loads per block and panel: 16 weights x 16 rows of 16-bit words, 2 weights each
CHUNKS = GROUP_SIZE // 4  # vpdpbusd instructions per group and panel (4 weights each)
TILE_BYTES = 64  # one chunk of a panel's byte tile: 16 rows x 4 weights
ROW_TILE = 8  # prefill: rows of x per pass over a panel's tile (their accumulators stay in registers)
ROW_TILE_AVX2 = 1  # AVX2 (16 ymm registers): one row at a time, its 16 accumulators in 2 (see GROUP_BLOCK_AVX2)
GROUP_BLOCK_AVX2 = 64  # AVX2 prefill: groups per pass over the rows, their tile (16 KB), steps and sums in L1
ROW_TILE_DOTPROD = 4  # aarch64 prefill: 4 rows' 16 accumulators in 16 of the 32 NEON registers (not timed)
ISA_VNNI = "avx512-vnni"  # vpdpbusd, vpermt2b, vpermi2ps: every layout
SCALE_DIGITS = word_digits(CODEBOOK_SIZE)  # step indices per 16-bit scale word
ISA_AVX2 = "avx2"  # vpmaddubsw + vpmaddwd, vpermps (x86_avx2.py): the dot-order layouts only
ISA_DOTPROD = arm_dotprod.ISA  # aarch64 sdot (arm_dotprod.py): the dot-order layouts only
DOT_ORDER_ONLY = (ISA_AVX2, ISA_DOTPROD)  # the ISAs without a byte permute for the words layout


@dataclass(frozen=True)
class VNNIKnobs:
    """The choices in these kernels that trit-tune may change per kernel (the defaults: the hand-written ones)."""
    prefetch_blocks: int = PREFETCH_BLOCKS  # weight blocks ahead that each block iteration prefetches (0: none)
    row_tile: int = ROW_TILE  # prefill: rows of x per pass over a panel's tile, 16 accumulators each
    group_block: int = 0  # prefill: groups of a panel's tile per pass over the rows of x (0: all of K)

    def __post_init__(self):
        if not (isinstance(self.prefetch_blocks, int) and self.prefetch_blocks >= 0
                and isinstance(self.row_tile, int) and 1 <= self.row_tile <= 16
                and isinstance(self.group_block, int) and self.group_block >= 0):
            raise ValueError("VNNIKnobs: prefetch_blocks >= 0, row_tile in 1..16 and group_block >= 0 (integers), "
                             f"got {self}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_knobs(isa: str) -> VNNIKnobs:
    """The hand-written choices of an ISA's kernels (AVX2: the prefill a row at a time over L1-sized tiles; aarch64:
    ROW_TILE_DOTPROD rows, whose accumulators and a chunk of the tile fit NEON's 32 registers, over such tiles)."""
    if isa == ISA_AVX2:
        return VNNIKnobs(row_tile=ROW_TILE_AVX2, group_block=GROUP_BLOCK_AVX2)
    if isa == ISA_DOTPROD:
        return VNNIKnobs(row_tile=ROW_TILE_DOTPROD, group_block=GROUP_BLOCK_AVX2)
    return VNNIKnobs()


REQUIRED_FEATURES = ("avx512bw", "avx512vnni", "avx512vbmi")  # 16-bit multiplies, vpdpbusd, vpermt2b


def supports(target: tvm.target.Target) -> bool:
    """The target's CPU has the instructions these kernels use."""
    return target.kind.name == "llvm" and all(
        bool(tvm.target.codegen.target_has_features(f, target)) for f in REQUIRED_FEATURES)


def isa_for_target(target: tvm.target.Target, dot_order: bool) -> str | None:
    """Which form of these kernels the target runs for a matrix in the words layout or (dot_order) a dot-order
    one: AVX-512 VNNI for both, AVX2 and aarch64's dotprod for the dot-order layouts only, None where they do not
    run."""
    if supports(target):
        return ISA_VNNI
    if not dot_order:
        return None
    if arm_dotprod.supports(target):
        return ISA_DOTPROD
    return ISA_AVX2 if x86_avx2.supports(target) else None


def _byte_order() -> tirx.PrimExpr:
    """vpermt2b indices: byte 4t+q of the result = the low byte of weight q of row t, where the first source
    holds weights 0, 1 and the second weights 2, 3 (16 rows each, 16-bit words): 2t + 32q."""
    lane = tirx.Ramp(tirx.const(0, "int8"), tirx.const(1, "int8"), 64)
    two, three, stride = (tirx.Broadcast(tirx.const(v, "int8"), 64) for v in (2, 3, 32))
    return tirx.shift_right(lane, two) * two + tirx.bitwise_and(lane, three) * stride


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


@dataclass(frozen=True)
class _Sizes:
    """A matrix's sizes in the 16-row words layout, or a dot-order layout of `bits` per weight (one group per
    block, bits/2 planes of 64 bytes per group)."""
    n_out: int
    n_in: int
    depth: int
    parts: tuple[int, ...]
    bits: int = 0
    isa: str = ISA_VNNI
    table_size: int | None = None  # codebook parameter entries (default: padded for the AVX-512 permutes)
    factored: bool = False  # the codebook parameter ends in factor tables (codec.format.codebook_factors)

    def __post_init__(self):
        if self.isa in DOT_ORDER_ONLY and not self.bits:
            raise ValueError(f"the {self.isa} integer kernels read the dot-order layouts only")

    @property
    def m(self) -> int:  # digits (groups) per word
        return 1 if self.bits else word_block(self.depth)[0]

    @property
    def blocks(self) -> int:
        return self.n_in // GROUP_SIZE if self.bits else padded_blocks(self.n_in, self.depth)

    @property
    def groups(self) -> int:  # of the padded K
        return self.blocks * self.m

    @property
    def panels(self) -> int:
        return -(-self.n_out // ROWS)

    @property
    def units(self) -> int:  # 16-bit words per row (dot order: 16 rows x 16 weights x bits = bits x 16 words)
        return self.blocks * (self.bits or GROUP_SIZE)

    @property
    def planes(self) -> int:  # 64-byte planes per group of a dot-order layout (5-bit: and a 32-byte one)
        return self.bits // 2

    @property
    def lines(self) -> int:  # cache lines per group of a dot-order layout
        return -(-self.bits * 32 // LINE_BYTES)

    @property
    def scale_words(self) -> int:
        return -(-self.groups // SCALE_DIGITS)

    @property
    def table(self) -> int:  # codebook entries, padded for the permutes
        if self.table_size is not None:
            return self.table_size
        return -(-CODEBOOK_SIZE * max(len(self.parts), 1) // TABLE_WINDOW) * TABLE_WINDOW

    @property
    def panel_lookup(self) -> bool:
        """Steps looked up in the panel's own matrix's codebook (AVX2, every panel within one matrix): the step
        indices are then relative to it."""
        return self.isa == ISA_AVX2 and all(p % ROWS == 0 for p in itertools.accumulate(self.parts[:-1]))

    def lookup(self, codebook, index, panel, factored: bool = False) -> tirx.PrimExpr:
        """The 16 rows' steps (float32x16) at the codebook indices in `index` (int32x16 buffer, step_index's);
        factored: from the panel's matrix's factor tables (for panels whose tables are exact)."""
        if self.isa == ISA_VNNI:
            return permute_lookup(codebook, index)
        if self.isa == ISA_DOTPROD:  # absolute indices (panel_lookup is AVX2's), a load per lane
            return codebook[index[tirx.Ramp(0, 1, ROWS)]]
        if factored:
            return x86_avx2.factored_lookup(codebook, index[tirx.Ramp(0, 1, ROWS)], self.factor_tables(panel * ROWS))
        return x86_avx2.step_lookup(codebook, index[tirx.Ramp(0, 1, ROWS)],
                                    self.codebook_base(panel * ROWS) if self.panel_lookup else None)

    def factor_tables(self, row) -> tirx.PrimExpr:
        """Offset of the row's matrix's factor tables in the codebook parameter."""
        return factor_tables_start(max(len(self.parts), 1)) + self._part_offset(row, FACTORS)

    def exact_factors(self, codebook, panel) -> tirx.PrimExpr | bool:
        """Whether the panel's steps come from its matrix's factor tables: False where the kernel has none (or
        its panels may straddle matrices), else the tables' `exact` entry tested at run time."""
        if not (self.factored and self.panel_lookup):
            return False
        return codebook[self.factor_tables(panel * ROWS) + FACTORS - 1] > tirx.const(0, "float32")

    def group_dot(self, chunks: list, x4s: list, init: tirx.PrimExpr) -> tirx.PrimExpr:
        """init + the 16 rows' dot products over a group's 4 chunks (64 weight bytes, 4 activation bytes each)."""
        if self.isa == ISA_AVX2:
            return x86_avx2.group_dot(chunks, x4s, init, 3 ** self.depth - 1)
        if self.isa == ISA_DOTPROD:
            return arm_dotprod.group_dot(chunks, x4s, init)
        for chunk, x4 in zip(chunks, x4s):
            init = _dot(init, chunk, x4)
        return init

    def codebook_base(self, row) -> tirx.PrimExpr:
        """Offset of the row's matrix's codebook in the concatenated codebooks (stacked matrices)."""
        return self._part_offset(row, CODEBOOK_SIZE)

    def _part_offset(self, row, stride: int) -> tirx.PrimExpr:
        """stride × the index of the stacked matrix the row is in."""
        total = tirx.const(0, "int32")
        for start in itertools.accumulate(self.parts[:-1]):
            total = total + tirx.Select(row >= start, tirx.const(stride, "int32"), tirx.const(0, "int32"))
        return total

    def step_index(self, scales_flat, panel, g, offset) -> tirx.PrimExpr:
        """Codebook indices of group g for the panel's 16 rows (int32x16): digit g % 3 (most significant
        first) of the 16-bit scale words, the high half of 27·(word·27^(g%3) mod 2^16) as
        codec.format.chain_digits, plus the rows' codebook offsets (not with panel_lookup)."""
        word = tirx.Cast("int32x16", scales_flat[tirx.Ramp((panel * self.scale_words + g // SCALE_DIGITS) * ROWS, 1,
                                                            ROWS)])
        k = tirx.truncmod(g, SCALE_DIGITS)
        mult = tirx.Select(k == 0, tirx.const(1, "int32"),
                           tirx.Select(k == 1, tirx.const(CODEBOOK_SIZE, "int32"),
                                       tirx.const(CODEBOOK_SIZE ** 2 % 65536, "int32")))
        t = tirx.bitwise_and(word * tirx.Broadcast(mult, ROWS), tirx.Broadcast(tirx.const(0xFFFF, "int32"), ROWS))
        digit = tirx.shift_right(t * tirx.Broadcast(tirx.const(CODEBOOK_SIZE, "int32"), ROWS),
                                 tirx.Broadcast(tirx.const(16, "int32"), ROWS))
        return digit if self.panel_lookup else digit + offset[tirx.Ramp(0, 1, ROWS)]


def _reduce_lanes(vec: tirx.PrimExpr, lanes: int, op) -> tirx.PrimExpr:
    """op over a vector's lanes, halving it each time (max: exact in any order; + on integers likewise)."""
    while lanes > 1:
        lanes //= 2
        vec = op(x86_avx2.half(vec, 0, lanes), x86_avx2.half(vec, 1, lanes))
    return vec


def _group_values(s: _Sizes, x_flat, row, g) -> tirx.PrimExpr:
    """Group g of row `row` of x as float32x16."""
    return tirx.Cast("float32x16", x_flat[tirx.Ramp(row * s.n_in + g * GROUP_SIZE, 1, GROUP_SIZE)])


def _group_levels(s: _Sizes, x_flat, row, g, peak) -> tirx.PrimExpr:
    """The group's int8 levels as int32x16: x · (127 / peak) rounded half to even (peak > 0)."""
    factor = tirx.const(ACT_MAX, "float32") / peak
    return tirx.Cast("int32x16", tirx.nearbyint(_group_values(s, x_flat, row, g) * tirx.Broadcast(factor, GROUP_SIZE)))


@T.macro
def _quantize_row(s, x_flat, row, xq4, x_scale, x_corr, peak, levels, offset):
    """Row `row` of x to int8 per group of 16 (trit_tvm.operator.quantize_activations), in vectors: 4 levels per
    int32 in xq4, the scale and −qmax·Σ levels per group; the groups past K (the layout's padding) and groups of
    zeros are zeros. offset (AVX2's prefill): the levels + 128 as unsigned bytes instead, and no x_corr. (It runs
    on one core while the others wait: one level at a time, SmolLM2's int8 decode step took 5.12 ms against 4.97,
    Zen 2.)"""
    for g in T.serial(s.groups):
        peak[0] = T.float32(0)
        if g < s.n_in // GROUP_SIZE:
            peak[0] = _reduce_lanes(T.fabs(_group_values(s, x_flat, row, g)), GROUP_SIZE, tirx.max)
        x_scale[row * s.groups + g] = peak[0] / T.float32(ACT_MAX)
        levels[T.ramp(0, 1, GROUP_SIZE)] = T.Broadcast(T.int32(0), GROUP_SIZE)
        if peak[0] > T.float32(0):
            levels[T.ramp(0, 1, GROUP_SIZE)] = _group_levels(s, x_flat, row, g, peak[0])
        if offset:
            xq4[T.ramp((row * s.groups + g) * CHUNKS, 1, CHUNKS)] = T.reinterpret("int32x4", T.Cast(
                "uint8x16", levels[T.ramp(0, 1, GROUP_SIZE)] + T.Broadcast(T.int32(ACT_OFFSET), GROUP_SIZE)))
        else:
            xq4[T.ramp((row * s.groups + g) * CHUNKS, 1, CHUNKS)] = T.reinterpret(
                "int32x4", T.Cast("int8x16", levels[T.ramp(0, 1, GROUP_SIZE)]))
            x_corr[row * s.groups + g] = _reduce_lanes(levels[T.ramp(0, 1, GROUP_SIZE)], GROUP_SIZE, tirx.Add) * (
                -qmax_of(s.depth))


@T.macro
def _load_block(s, knobs, codes_flat, words, panel, b):
    """The block's 16 weights x 16 rows of 16-bit words into `words` (8 registers), after prefetching the
    codes knobs.prefetch_blocks blocks ahead in memory, 8 lines (into the next panels when K is short: a
    core's panels are consecutive; the scales, 1/16 of the bytes, are left to the hardware prefetcher)."""
    if knobs.prefetch_blocks > 0:
        for line in T.unroll(GROUP_SIZE * ROWS * 2 // LINE_BYTES):
            T.evaluate(prefetch_call(codes_flat, (panel * s.units + (b + knobs.prefetch_blocks) * GROUP_SIZE)
                                     * ROWS + line * (LINE_BYTES // 2)))
    for v in T.unroll(WORD_PAIRS):
        words[T.ramp(v * 32, 1, 32)] = codes_flat[T.ramp((panel * s.units + b * GROUP_SIZE + v * 2) * ROWS, 1, 32)]


@T.macro
def _load_group_dot(s, knobs, codes_flat, words, panel, g):
    """The group's planes (dot-order layout, 64 bytes each) into `words`, after prefetching their lines as many
    bytes ahead as the words layout's prefetch (knobs.prefetch_blocks blocks of 512 bytes)."""
    if knobs.prefetch_blocks > 0:
        for line in T.unroll(s.lines):
            T.evaluate(prefetch_call(codes_flat, (panel * s.units + g * s.bits + knobs.prefetch_blocks * GROUP_SIZE
                                                  + line * 2) * ROWS))
    for plane in T.unroll(s.planes):
        words[T.ramp(plane * 32, 1, 32)] = codes_flat[T.ramp((panel * s.units + g * s.bits + plane * 2) * ROWS, 1, 32)]
    if s.bits == DOT_HIGH_BITS:
        words[T.ramp(s.planes * 32, 1, ROWS)] = codes_flat[T.ramp((panel * s.units + g * s.bits + s.planes * 2) * ROWS,
                                                                  1, ROWS)]


def _shifted_bits(lanes: tirx.PrimExpr, n: int, shift, mask: int) -> tirx.PrimExpr:
    """(lanes >> shift, or << -shift) & mask in each of the n 16-bit lanes, mask repeated in both of its bytes;
    shift an int or an expression of an unrolled loop's variable."""
    if isinstance(shift, int):
        right, left = max(shift, 0), max(-shift, 0)
    else:
        right, left = tirx.max(shift, 0), tirx.max(-shift, 0)
    for amount, op in ((left, tirx.shift_left), (right, tirx.shift_right)):
        if not (isinstance(amount, int) and amount == 0):
            lanes = op(lanes, tirx.Broadcast(tirx.Cast("uint16", amount), n))
    return tirx.bitwise_and(lanes, tirx.Broadcast(tirx.const(mask * 0x0101, "uint16"), n))


def _dot_chunk(s: _Sizes, words, c) -> tirx.PrimExpr:
    """Chunk c of the group loaded in `words` -> 64 bytes, byte 4t+q = u of weight 4c+q of row t: its plane,
    with fields of less than 8 bits a shift of the 16-bit lanes and a mask of each byte, with 5 bits also bit 4
    from the 32-byte plane after the others: bit c of its bytes for rows 0-7, bit c + 4 for rows 8-15
    (codec.format.dot_order_codes)."""
    field = dot_field_bits(s.bits)
    fields = 8 // field
    plane = words.vload([c // fields * 32], "uint16x32")
    if fields == 1:
        return tirx.reinterpret("int8x64", plane)
    low = _shifted_bits(plane, 32, field * (c % fields), (1 << field) - 1)
    if s.bits != DOT_HIGH_BITS:
        return tirx.reinterpret("int8x64", low)
    high_plane = words.vload([s.planes * 32], "uint16x16")
    high = x86_avx2.concat(*[_shifted_bits(high_plane, ROWS, c + 4 * k - field, 1 << field) for k in range(2)], ROWS)
    return tirx.reinterpret("int8x64", tirx.bitwise_or(low, high))


def _dot_group_dot(s: _Sizes, words, xq4, g, init: tirx.PrimExpr) -> tirx.PrimExpr:
    """init + the panel's dot products over group g, its dot-order codes loaded in `words` (decode)."""
    return s.group_dot([_dot_chunk(s, words, c) for c in range(CHUNKS)], [xq4[g * CHUNKS + c] for c in range(CHUNKS)],
                       init)


def _tile_group_dot(s: _Sizes, tile, xq4, w_corr, x_corr, row, g, slot) -> tirx.PrimExpr:
    """The panel's 16 dot products over group g with row `row` of x, from slot `slot` of its byte tile (prefill),
    as float32: u = q + qmax against the levels, started from −qmax·Σ levels; on AVX2 q against the levels + 128,
    plus the rows' −128·Σ q (x86_avx2.group_dot_offset) as a float add, exact (|sum| < 2^24): Zen 2 runs float adds
    on two pipes apart from its one integer-multiply pipe, where an integer add may take that pipe's slot (its
    loop 14.5 -> 12.7 cycles a row and group in C)."""
    chunks = [tile.vload([(slot * CHUNKS + c) * TILE_BYTES], "int8x64") for c in range(CHUNKS)]
    x4s = [xq4[(row * s.groups + g) * CHUNKS + c] for c in range(CHUNKS)]
    if s.isa == ISA_AVX2:
        return T.Cast("float32x16", x86_avx2.group_dot_offset(chunks, x4s, qmax_of(s.depth))) + w_corr[
            T.ramp(slot * ROWS, 1, ROWS)]
    return T.Cast("float32x16", s.group_dot(chunks, x4s, T.Broadcast(x_corr[row * s.groups + g], ROWS)))


@T.macro
def _next_digit(s, words, p):
    """T_p+1 = T_p · 3^d mod 2^16 in every word (after the block's last digit: nothing)."""
    if p < s.m - 1:
        for v in T.unroll(WORD_PAIRS):
            words[T.ramp(v * 32, 1, 32)] = words[T.ramp(v * 32, 1, 32)] * T.Broadcast(T.uint16(3 ** s.depth), 32)


def _signature(s: _Sizes, bias: bool, dtype: str, x_shape, out_shape, body) -> tirx.PrimFunc:
    """The operator's parameter list (x, codes, scales, codebook, [bias], out) around a kernel body."""
    code_shape, scale_shape = (s.panels, s.units, ROWS), (s.panels, s.scale_words, ROWS)
    if bias:
        @T.prim_func(s_tir=True)
        def with_bias(x: T.Buffer(x_shape, dtype), codes: T.Buffer(code_shape, "uint16"),
                      scales: T.Buffer(scale_shape, "uint16"), codebook: T.Buffer((s.table,), "float32"),
                      b: T.Buffer((s.n_out,), dtype), out: T.Buffer(out_shape, dtype)):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            body(x, codes, scales, codebook, out, lambda n: T.Cast("float32", b[n]))
        return with_bias

    @T.prim_func(s_tir=True)
    def without_bias(x: T.Buffer(x_shape, dtype), codes: T.Buffer(code_shape, "uint16"),
                     scales: T.Buffer(scale_shape, "uint16"), codebook: T.Buffer((s.table,), "float32"),
                     out: T.Buffer(out_shape, dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        body(x, codes, scales, codebook, out, lambda n: T.float32(0))
    return without_bias


@T.macro
def _accumulate_group(s, scales_flat, codebook, x_scale, dot, index, offset, acc, panel, g, factored):
    """acc[16 rows] += float(dot) · step of group g · x's scale of group g."""
    index[T.ramp(0, 1, ROWS)] = s.step_index(scales_flat, panel, g, offset)
    acc[T.ramp(0, 1, ROWS)] = acc[T.ramp(0, 1, ROWS)] + T.Cast("float32x16", dot[T.ramp(0, 1, ROWS)]) * (
        s.lookup(codebook, index, panel, factored) * T.Broadcast(x_scale[g], ROWS))


@T.macro
def _group_dots_words(s, knobs, codes_flat, scales_flat, codebook, xq4, x_scale, x_corr, words, dot, index, offset,
                      acc, panel):
    """Decode: the panel's dot products over all groups, words layout (m groups per block of words)."""
    for b in T.serial(s.blocks):
        _load_block(s, knobs, codes_flat, words, panel, b)
        for p in T.unroll(s.m):
            dot[T.ramp(0, 1, ROWS)] = T.Broadcast(x_corr[b * s.m + p], ROWS)
            for c in T.unroll(CHUNKS):
                dot[T.ramp(0, 1, ROWS)] = _dot(
                    dot[T.ramp(0, 1, ROWS)],
                    _weight_bytes(_mulhi(words[T.ramp(c * 64, 1, 32)], 3 ** s.depth),
                                  _mulhi(words[T.ramp(c * 64 + 32, 1, 32)], 3 ** s.depth)),
                    xq4[(b * s.m + p) * CHUNKS + c])
            _next_digit(s, words, p)
            _accumulate_group(s, scales_flat, codebook, x_scale, dot, index, offset, acc, panel, b * s.m + p, False)


@T.macro
def _dot_order_groups(s, knobs, codes_flat, scales_flat, codebook, xq4, x_scale, x_corr, words, dot, index, offset,
                      acc, panel, factored):
    """Decode: the panel's dot products over all groups, dot-order layout (one 64-byte load per plane). The groups
    go in threes, the step indices of one scale word, so that each one's digit multiplier is a constant (Zen 2,
    Qwen2.5-3B int8 gate/up: d=3 1005 -> 908 us, d=1 717 -> 638)."""
    for w in T.serial((s.groups + SCALE_DIGITS - 1) // SCALE_DIGITS):
        for k in T.unroll(SCALE_DIGITS):  # g = w·3 + k written out: bound to a name, it no longer folds g % 3
            if w * SCALE_DIGITS + k < s.groups:
                _load_group_dot(s, knobs, codes_flat, words, panel, w * SCALE_DIGITS + k)
                dot[T.ramp(0, 1, ROWS)] = _dot_group_dot(s, words, xq4, w * SCALE_DIGITS + k,
                                                         T.Broadcast(x_corr[w * SCALE_DIGITS + k], ROWS))
                _accumulate_group(s, scales_flat, codebook, x_scale, dot, index, offset, acc, panel,
                                  w * SCALE_DIGITS + k, factored)


@T.macro
def _group_dots_dot_order(s, knobs, codes_flat, scales_flat, codebook, xq4, x_scale, x_corr, words, dot, index, offset,
                          acc, panel):
    """_dot_order_groups, with the steps from the factor tables for the panels whose matrix's are exact."""
    if s.exact_factors(codebook, panel):
        _dot_order_groups(s, knobs, codes_flat, scales_flat, codebook, xq4, x_scale, x_corr, words, dot, index, offset,
                          acc, panel, True)
    else:
        _dot_order_groups(s, knobs, codes_flat, scales_flat, codebook, xq4, x_scale, x_corr, words, dot, index, offset,
                          acc, panel, False)


def vnni_gemv_func(n_out: int, n_in: int, depth: int, parts: tuple[int, ...] = (), bias: bool = False,
                   dtype: str = "float32", x_shape: tuple | None = None, out_shape: tuple | None = None,
                   knobs: VNNIKnobs | None = None, bits: int = 0, isa: str = ISA_VNNI,
                   table_size: int | None = None, factored: bool = False) -> tirx.PrimFunc:
    """The decode kernel: one row of x (x_shape, default [1, n_in]; leading dims of 1), a words layout of 16
    rows per panel (codes [ceil(n_out/16), 16·B, 16], scales [ceil(n_out/16), ceil(m·B/3), 16]) or with
    bits a dot-order layout (codes [ceil(n_out/16), K·bits/16, 16], scales [ceil(n_out/16), ceil(K/48), 16]), the
    operator's parameters (x, codes, scales, codebook, [bias], out); parts: row counts of stacked matrices.
    isa: ISA_VNNI, or ISA_AVX2 or ISA_DOTPROD (dot order only); table_size: entries of the codebook parameter
    (default: padded to the AVX-512 permutes' 32-entry windows, as WeightLayout.permute_steps has it); factored:
    the parameter ends in factor tables (WeightLayout.factored_steps)."""
    s = _Sizes(n_out, n_in, depth, tuple(parts), bits, isa, table_size, factored)
    knobs = knobs or default_knobs(isa)
    group_dots = _group_dots_dot_order if bits else _group_dots_words

    @T.macro
    def body(x, codes, scales, codebook, out, bias_at):
        x_flat = T.decl_buffer((n_in,), dtype, data=x.data)
        out_flat = T.decl_buffer((n_out,), dtype, data=out.data)
        codes_flat = T.decl_buffer((s.panels * s.units * ROWS,), "uint16", data=codes.data)
        scales_flat = T.decl_buffer((s.panels * s.scale_words * ROWS,), "uint16", data=scales.data)
        xq4 = T.alloc_buffer((s.groups * CHUNKS,), "int32")
        x_scale = T.alloc_buffer((s.groups,), "float32")
        x_corr = T.alloc_buffer((s.groups,), "int32")
        peak = T.alloc_buffer((1,), "float32")
        levels = T.alloc_buffer((GROUP_SIZE,), "int32")
        _quantize_row(s, x_flat, 0, xq4, x_scale, x_corr, peak, levels, False)
        for panel in T.parallel(s.panels):
            with T.sblock("trit_vnni_gemv"):
                T.reads(codes_flat[panel * s.units * ROWS:(panel + 1) * s.units * ROWS],
                        scales_flat[panel * s.scale_words * ROWS:(panel + 1) * s.scale_words * ROWS],
                        xq4[0:s.groups * CHUNKS], x_scale[0:s.groups], x_corr[0:s.groups], codebook[0:s.table])
                T.writes(out_flat[panel * ROWS:T.min(panel * ROWS + ROWS, n_out)])
                acc = T.sblock_alloc_buffer((ROWS,), "float32")
                dot = T.sblock_alloc_buffer((ROWS,), "int32")
                index = T.sblock_alloc_buffer((ROWS,), "int32")
                offset = T.sblock_alloc_buffer((ROWS,), "int32")
                words = T.sblock_alloc_buffer((WORD_PAIRS * 32,), "uint16")
                for r in T.vectorized(ROWS):
                    acc[r] = T.float32(0)
                    offset[r] = s.codebook_base(panel * ROWS + r)
                group_dots(s, knobs, codes_flat, scales_flat, codebook, xq4, x_scale, x_corr, words, dot, index,
                           offset, acc, panel)
                for r in T.serial(ROWS):
                    if panel * ROWS + r < n_out:
                        out_flat[panel * ROWS + r] = T.Cast(dtype, acc[r] + bias_at(panel * ROWS + r))

    return _signature(s, bias, dtype, x_shape or (1, n_in), out_shape or (1, n_out), body)


@T.macro
def _fill_tile_words(s, knobs, codes_flat, scales_flat, codebook, words, index, offset, tile, steps, panel,
                     w_corr, first, count):
    """Prefill: the panel's weights of groups [first, first + count) (whole blocks) as bytes in vpdpbusd's order
    and their steps, words layout (AVX-512 VNNI only, so w_corr, the AVX2 form's sums, is not written)."""
    for bi in T.serial(count // s.m):
        _load_block(s, knobs, codes_flat, words, panel, first // s.m + bi)
        for p in T.unroll(s.m):
            for c in T.unroll(CHUNKS):
                tile[T.ramp(((bi * s.m + p) * CHUNKS + c) * TILE_BYTES, 1, TILE_BYTES)] = _weight_bytes(
                    _mulhi(words[T.ramp(c * 64, 1, 32)], 3 ** s.depth),
                    _mulhi(words[T.ramp(c * 64 + 32, 1, 32)], 3 ** s.depth))
            _next_digit(s, words, p)
            index[T.ramp(0, 1, ROWS)] = s.step_index(scales_flat, panel, first + bi * s.m + p, offset)
            steps[T.ramp((bi * s.m + p) * ROWS, 1, ROWS)] = permute_lookup(codebook, index)


@T.macro
def _fill_tile_dot_order(s, knobs, codes_flat, scales_flat, codebook, words, index, offset, tile, steps, panel,
                         w_corr, first, count):
    """Prefill: the panel's weights of groups [first, first + count) as bytes in vpdpbusd's order and their steps,
    dot-order layout; on AVX2 the bytes are q = u − qmax (signed) and w_corr holds each row's −128·Σ q per group
    (x86_avx2.group_dot_offset)."""
    for g in T.serial(count):
        _load_group_dot(s, knobs, codes_flat, words, panel, first + g)
        if s.isa == ISA_AVX2:
            for c in T.unroll(CHUNKS):
                tile[T.ramp((g * CHUNKS + c) * TILE_BYTES, 1, TILE_BYTES)] = _dot_chunk(
                    s, words, c) - T.Broadcast(T.int8(qmax_of(s.depth)), TILE_BYTES)
            w_corr[T.ramp(g * ROWS, 1, ROWS)] = T.Cast("float32x16", x86_avx2.group_dot_offset(
                [tile.vload([(g * CHUNKS + c) * TILE_BYTES], "int8x64") for c in range(CHUNKS)],
                [T.int32(0x01010101)] * CHUNKS, qmax_of(s.depth)) * T.Broadcast(
                    T.int32(-ACT_OFFSET), ROWS))
        else:
            for c in T.unroll(CHUNKS):
                tile[T.ramp((g * CHUNKS + c) * TILE_BYTES, 1, TILE_BYTES)] = _dot_chunk(s, words, c)
        index[T.ramp(0, 1, ROWS)] = s.step_index(scales_flat, panel, first + g, offset)
        if s.isa == ISA_VNNI or s.panel_lookup:
            steps[T.ramp(g * ROWS, 1, ROWS)] = s.lookup(codebook, index, panel)
        else:  # a lane at a time: TVM's buffer planning fails on this vector gather inside the passes
            for r in T.serial(ROWS):
                steps[g * ROWS + r] = codebook[index[r]]


def vnni_gemm_func(n_out: int, n_in: int, depth: int, parts: tuple[int, ...], bias: bool, dtype: str,
                   x_shape: tuple, out_shape: tuple, knobs: VNNIKnobs | None = None,
                   bits: int = 0, isa: str = ISA_VNNI, table_size: int | None = None) -> tirx.PrimFunc:
    """The prefill kernel: any number of rows of x (x_shape [..., n_in], symbolic dims allowed), the same
    layouts and parameters as vnni_gemv_func but `factored` (its steps, looked up once per panel and group for
    all rows, come from the codebooks)."""
    s = _Sizes(n_out, n_in, depth, tuple(parts), bits, isa, table_size)
    knobs = knobs or default_knobs(isa)
    fill_tile = _fill_tile_dot_order if bits else _fill_tile_words
    row_tile = knobs.row_tile
    n_rows = tirx.Cast("int32", math.prod(x_shape[:-1]))
    group_block = min(knobs.group_block or s.groups, s.groups)
    if not bits:
        group_block = -(-group_block // s.m) * s.m  # whole blocks of words
    passes = -(-s.groups // group_block)

    @T.macro
    def body(x, codes, scales, codebook, out, bias_at):
        x_flat = T.decl_buffer((n_rows * n_in,), dtype, data=x.data)
        out_flat = T.decl_buffer((n_rows * n_out,), dtype, data=out.data)
        codes_flat = T.decl_buffer((s.panels * s.units * ROWS,), "uint16", data=codes.data)
        scales_flat = T.decl_buffer((s.panels * s.scale_words * ROWS,), "uint16", data=scales.data)
        xq4 = T.alloc_buffer((n_rows * s.groups * CHUNKS,), "int32")
        x_scale = T.alloc_buffer((n_rows * s.groups,), "float32")
        x_corr = T.alloc_buffer((n_rows * s.groups,), "int32")
        for row in T.parallel(n_rows):
            with T.sblock("trit_vnni_quantize"):
                T.reads(x_flat[row * n_in:(row + 1) * n_in])
                T.writes(xq4[row * s.groups * CHUNKS:(row + 1) * s.groups * CHUNKS],
                         x_scale[row * s.groups:(row + 1) * s.groups], x_corr[row * s.groups:(row + 1) * s.groups])
                peak = T.sblock_alloc_buffer((1,), "float32")
                levels = T.sblock_alloc_buffer((GROUP_SIZE,), "int32")
                _quantize_row(s, x_flat, row, xq4, x_scale, x_corr, peak, levels, s.isa == ISA_AVX2)
        for panel in T.parallel(s.panels):
            with T.sblock("trit_vnni_gemm"):
                T.reads(codes_flat[panel * s.units * ROWS:(panel + 1) * s.units * ROWS],
                        scales_flat[panel * s.scale_words * ROWS:(panel + 1) * s.scale_words * ROWS],
                        xq4[0:n_rows * s.groups * CHUNKS], x_scale[0:n_rows * s.groups],
                        x_corr[0:n_rows * s.groups], codebook[0:s.table])
                T.writes(out_flat[0:n_rows * n_out])
                tile = T.sblock_alloc_buffer((group_block * CHUNKS * TILE_BYTES,), "int8")
                steps = T.sblock_alloc_buffer((group_block * ROWS,), "float32")
                w_corr = T.sblock_alloc_buffer((group_block * ROWS if s.isa == ISA_AVX2 else 1,), "float32")
                acc = T.sblock_alloc_buffer((row_tile * ROWS,), "float32")
                partial = T.sblock_alloc_buffer((n_rows * ROWS,), "float32")
                dot = T.sblock_alloc_buffer((ROWS,), "float32")
                index = T.sblock_alloc_buffer((ROWS,), "int32")
                offset = T.sblock_alloc_buffer((ROWS,), "int32")
                words = T.sblock_alloc_buffer((WORD_PAIRS * 32,), "uint16")
                for r in T.vectorized(ROWS):
                    offset[r] = s.codebook_base(panel * ROWS + r)
                for gb in T.serial(passes):
                    # the weights of group_block groups as bytes in vpdpbusd's order and their steps, once
                    fill_tile(s, knobs, codes_flat, scales_flat, codebook, words, index, offset, tile, steps, panel,
                              w_corr, gb * group_block, T.min(group_block, s.groups - gb * group_block))
                    # row_tile rows of x at a time over the tile, each tile vector feeding all of them
                    for rt in T.serial((n_rows + row_tile - 1) // row_tile):
                        for r in T.unroll(row_tile):
                            acc[T.ramp(r * ROWS, 1, ROWS)] = T.Broadcast(T.float32(0), ROWS)
                            if gb > 0:
                                acc[T.ramp(r * ROWS, 1, ROWS)] = partial[T.ramp(
                                    T.min(rt * row_tile + r, n_rows - 1) * ROWS, 1, ROWS)]
                        for gi in T.serial(T.min(group_block, s.groups - gb * group_block)):
                            for r in T.unroll(row_tile):
                                row: T.let[T.int32] = T.min(rt * row_tile + r, n_rows - 1)
                                dot[T.ramp(0, 1, ROWS)] = _tile_group_dot(s, tile, xq4, w_corr, x_corr, row,
                                                                          gb * group_block + gi, gi)
                                acc[T.ramp(r * ROWS, 1, ROWS)] = acc[T.ramp(r * ROWS, 1, ROWS)] + dot[T.ramp(
                                    0, 1, ROWS)] * (steps[T.ramp(gi * ROWS, 1, ROWS)]
                                    * T.Broadcast(x_scale[row * s.groups + gb * group_block + gi], ROWS))
                        for r in T.unroll(row_tile):
                            partial[T.ramp(T.min(rt * row_tile + r, n_rows - 1) * ROWS, 1, ROWS)] = acc[
                                T.ramp(r * ROWS, 1, ROWS)]
                for row, t in T.grid(n_rows, ROWS):
                    if panel * ROWS + t < n_out:
                        out_flat[row * n_out + panel * ROWS + t] = T.Cast(dtype, partial[row * ROWS + t]
                                                                          + bias_at(panel * ROWS + t))

    return _signature(s, bias, dtype, x_shape, out_shape, body)
