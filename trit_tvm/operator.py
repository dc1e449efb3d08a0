"""trit_decode_matmul: y = x @ Ŵᵀ (+ bias), reading the packed trits of Ŵ directly.

Packed layout (docs/FORMAT.md): in each block b of 80 weights, byte 16b+j of digit plane i holds the
digits of weights 80b+16p+j for p = 0..4, so digit position p of a block is group 5b+p; a tail of
r < 5 groups is packed in plain order (weight 80B+t: byte 16B + t/5, position t%5).
    digit(byte, p) = ((byte · 3^p) & 255) · 3 >> 8                (multiply and shift, no division)
    q              = Σ_i digit_i · 3^i − qmax
    step[n, g]     = codebook[Σ_i digit(scales[n, i, g/5], g%5) · 3^i]
CPU kernels read the words layout instead (WeightLayout.words): u = q + qmax of every weight as one
base-3^d digit of a 16-bit word, m per word, blocks of m groups, K zero-padded to whole blocks (x is padded
alike, so there is no tail): digit(word, p) = (3^d · T_p) >> 16. With int8 activations on CPUs with the
integer kernels, depth-1 matrices are in the 2-bit layout instead and depth-3 ones in 5 bits (WeightLayout.
two_bit_depth1, five_bit_depth3; codec.format.dot_order_codes), and where those kernels are AVX2's, depth-4 ones
in bytes (byte_depth4).
The TE below states the computation as blocks of one PrimFunc, in one of two forms (`_dequantized_tiles`):
  grouped:     trit_decode (u = q + qmax), per-group dot products (trit_group_dot, corrected by qmax·Σx
               from trit_xsum), group steps (trit_step) and their accumulation (trit_matmul)
  dequantized: trit_step, trit_decode (step·q) and a plain dot product over it (trit_matmul)
then the K tail (trit_decode_tail: step·q; trit_matmul_tail adds its sum) and trit_out.
schedules/ inline the decode into the reduction loop (GEMV) or compute it tile by tile (GEMM),
so no full-size float copy of Ŵ ever exists.
The PrimFunc carries TRIT_OP_ATTR so schedule rules find it without guessing by name.
`reference_decode_matmul` is the numpy statement of the same math, used by the tests.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx

from codec.format import BLOCK, DOT_CHUNK, DOT_HIGH_BITS, DOT_PLANE, DOT_ROWS, FACTORS, SCALE_DIGITS, \
    codebook_factors, code_words, dot_field_bits, dot_order_codes, factor_tables_start, interleave_rows, \
    padded_blocks, scale_words, unpack_matrix, word_block, word_digits
from codec.quantize import CODEBOOK_SIZE, GROUP_SIZE, qmax_of
from codec.trits import TRITS_PER_BYTE, packed_len
from schedules import byte_depth4_for_target, decode_for_target, dot_order_for_target, layout_rows_for_target
from schedules.base import ACT_MAX, DECODE_INT32, DECODE_SIMD16, DECODE_TABLE32, INT8_ACTIVATIONS_ATTR, \
    DOT_BITS_ATTR, FACTORED_STEPS_ATTR, LAYOUT_ROWS_ATTR, PARTS_ATTR, PREFILL_ROW_TILE, TRIT_OP_ATTR
from schedules.x86_lookup import LANES, TABLE_WINDOW

TRIT_OP_NAME = "decode_matmul"
OP_PATTERN_OPAQUE = 8  # relax FuseOps leaves the call alone: it stays one kernel with its attributes


def _digit(byte: tirx.PrimExpr, pos, wide: bool = False) -> tirx.PrimExpr:
    """Digit `pos` of a packed byte in 16-bit lanes, two SIMD operations per digit.

    With T_0 = byte·256 and T_p = 3^p·T_0 mod 2^16 (= ((byte·3^p) mod 256)·256), the digit is
    ((byte·3^p) mod 256)·3 >> 8 = high half of 3·T_p: one wrapping 16-bit multiply to step to the next
    position, one high-half multiply per digit. The five positions share the chain once the position
    loop is unrolled (a Select chain the simplifier folds).
    wide: the same in 32-bit integers, with an explicit mask for the wrap-around (GPUs: their integer
    units are 32-bit, and TVM's CUDA code computes 16-bit products in C's int, which does not wrap).
    """
    lane = "uint32" if wide else "uint16"
    return _chain_digit(tirx.shift_left(byte.astype(lane), tirx.const(8, lane)), pos, 3, wide)


def _chain_digit(t: tirx.PrimExpr, pos, base: int, wide: bool = False, ndigits: int = TRITS_PER_BYTE) -> tirx.PrimExpr:
    """Digit `pos` (most significant first) of a fixed-point word T_0 = t in 16 bits: the high half of
    base·T_p, with T_p+1 = base·T_p mod 2^16 (bytes: base 3, T_0 = byte·256; words: base 3^d, T_0 = word;
    codec.format.chain_digits is the same in numpy)."""
    lane = "uint32" if wide else "uint16"
    candidates = []
    for p in range(ndigits):
        if p:
            t = t * tirx.const(base, lane)
            t = tirx.bitwise_and(t, tirx.const(0xFFFF, lane)) if wide else t
        candidates.append(tirx.shift_right((t if wide else t.astype("uint32")) * tirx.const(base, "uint32"),
                                           tirx.const(16, "uint32")))
    if isinstance(pos, int):
        digit = candidates[pos]
    else:
        digit = candidates[-1]
        for p in range(ndigits - 2, -1, -1):
            digit = tirx.Select(pos == p, candidates[p], digit)
    return digit if wide else digit.astype("uint16")


def digit_table() -> te.Tensor:
    """[256] uint32: the 5 digits of byte b at bits FIELD_BITS·p (DECODE_TABLE32).

    Σ_{i<3} 3^i·table[byte_i] then holds the base-3 values of 3 digit planes (each < 27 < 2^6) for the byte's
    5 weights in separate fields: one lookup per plane and byte instead of per-digit arithmetic.
    """
    def entry(b):
        total = tirx.const(0, "uint32")
        for p in range(TRITS_PER_BYTE):
            total = total + tirx.shift_left(_digit(b, p, wide=True), tirx.const(FIELD_BITS * p, "uint32"))
        return total
    return te.compute((256,), entry, name="trit_digit_table")


def _base3_table(table: te.Tensor, planes, ndigits: int, byte, pos) -> tirx.PrimExpr:
    """Σ_j digit_j · 3^j of position `pos` read from the digit table, three planes per table sum."""
    shift = tirx.const(pos * FIELD_BITS, "uint32") if isinstance(pos, int) else (pos * FIELD_BITS).astype("uint32")
    total = None
    for first in range(0, ndigits, 3):
        fields = table[planes(first, byte)]
        for j in range(first + 1, min(first + 3, ndigits)):
            fields = fields + table[planes(j, byte)] * tirx.const(3 ** (j - first), "uint32")
        value = tirx.bitwise_and(tirx.shift_right(fields, shift), tirx.const(FIELD_MASK, "uint32"))
        total = value if total is None else total + value * tirx.const(3 ** first, "uint32")
    return total.astype("int32")


def _small_int_to_float(u: tirx.PrimExpr) -> tirx.PrimExpr:
    """float(u) for 0 ≤ u < 2^23 as an OR and a subtract (2^23 + u is exact): cheaper than the GPU's
    integer-to-float conversion, which runs at a quarter of the FMA rate."""
    bits = tirx.bitwise_or(u.astype("uint32"), tirx.const(0x4B000000, "uint32"))
    return tirx.reinterpret("float32", bits) - tirx.const(8388608.0, "float32")


FIELD_BITS, FIELD_MASK = 6, 63  # one weight's 3-plane base-3 value (< 27) per field of a digit-table sum


def _base3(planes, ndigits: int, byte, pos, wide: bool = False) -> tirx.PrimExpr:
    """Σ_j digit_j · 3^j (< 81, kept in 16-bit lanes, or 32-bit when wide) of position `pos` in byte
    `byte` of the planes."""
    total = _digit(planes(0, byte), pos, wide)
    for j in range(1, ndigits):
        total = total + _digit(planes(j, byte), pos, wide) * tirx.const(3 ** j, "uint32" if wide else "uint16")
    return total.astype("int32")


_base3_int32 = functools.partial(_base3, wide=True)


@dataclass(frozen=True)
class WeightLayout:
    """How the packed weights sit in memory at run time.

    rows == 0: the checkpoint's own arrays, codes [N, d, Kb] and scales [N, 3, Gb] ("planes").
    rows == R: R consecutive output rows interleaved innermost, so one SIMD load fetches the same unit of
    R rows (CPU kernels vectorize over rows). With DECODE_SIMD16 (CPUs) the units are 16-bit words
    (`words`, docs/FORMAT.md): codes [ceil(N/R), Kw, R] hold each weight's q + qmax in base 3^d, m per
    word (codec.format.code_words), scales [ceil(N/R), ceil(G/3), R] three codebook indices per word.
    Otherwise (GPUs) the checkpoint's bytes reordered, codes [ceil(N/R), d, Kb, R] and scales
    [ceil(N/R), 3, Gb, R]. Zero rows pad N to a multiple of R.
    decode: how kernels decode digits (DECODE_SIMD16 on CPUs; DECODE_INT32 / DECODE_TABLE32 on GPUs).
    int8_activations: the operator quantizes x to 8 bits per group of 16 (quantize_activations) before the
    product, so kernels may compute it with integer dot products (schedules/x86_vnni.py).
    two_bit_depth1: depth-1 matrices in the 2-bit layout instead of words (codec.format.dot_order_codes: the
    bytes `vpdpbusd` and `sdot` read after a shift and a mask; 16 rows per panel, int8 activations on x86 and
    on aarch64 with dotprod).
    byte_depth4: depth-4 matrices in the same order as bytes (the words' 8 bits a weight, nothing to decode;
    int8 activations where the integer kernels are AVX2's or aarch64's, which have no byte permute to decode
    words with).
    five_bit_depth3: depth-3 matrices in the 5-bit dot-order layout (4-bit fields and a plane of bit 4; below
    the d=3 words' 5.33 bits a weight), also for the AVX2 integer kernels.
    factored_steps: the codebook parameter also holds every matrix's factor tables (codec.format.codebook_factors,
    after all the codebooks): AVX2's permute reads 8 entries, so a step is two lookups and a multiply there
    instead of four lookups and three blends (not with permute_steps: AVX-512 CPUs without VNNI run the AVX2
    kernels with the float kernels' 32-entry codebook windows).
    """
    rows: int = 0
    decode: str = DECODE_SIMD16
    permute_steps: bool = False  # x86 AVX-512: group steps by register permutes (schedules/x86_lookup.py)
    int8_activations: bool = False
    two_bit_depth1: bool = False
    byte_depth4: bool = False
    five_bit_depth3: bool = False
    factored_steps: bool = False

    def __post_init__(self):
        if (self.two_bit_depth1 or self.byte_depth4 or self.five_bit_depth3 or self.factored_steps) and not (
                self.rows == DOT_ROWS and self.words and self.int8_activations):
            raise ValueError(f"the dot-order layouts are for {DOT_ROWS}-row words layouts with int8 activations")
        if self.factored_steps and self.permute_steps:
            raise ValueError("factored_steps is for AVX2's 8-entry permutes; permute_steps reads 32-entry windows")

    def dot_bits(self, depth: int) -> int:
        """Bits per weight of the dot-order layout a matrix of this depth is in (2, 5 or 8), 0 for words or planes."""
        return {1: 2 * self.two_bit_depth1, 3: 5 * self.five_bit_depth3, 4: 8 * self.byte_depth4}.get(depth, 0)

    @property
    def words(self) -> bool:
        """CPU kernels' layout: 16-bit words of whole weights (base 3^d), not digit planes."""
        return self.rows > 0 and self.decode == DECODE_SIMD16

    @property
    def name(self) -> str:
        if self.rows == 0:
            return "trit-planes-v1"
        if self.words:
            return (f"trit-rows{self.rows}-words-v1" + ("+d1-2bit-v1" if self.two_bit_depth1 else "")
                    + ("+d3-5bit-v1" if self.five_bit_depth3 else "")
                    + ("+d4-bytes-v1" if self.byte_depth4 else "")
                    + ("+factored-steps-v1" if self.factored_steps else ""))
        return f"trit-rows{self.rows}-v1"

    @property
    def activations(self) -> str:
        """What x is multiplied as: "int8" (quantized per group of 16) or "float"."""
        return "int8" if self.int8_activations else "float"

    @property
    def unit_dtype(self) -> str:
        return "uint16" if self.words else "uint8"

    def _rows_outer(self, n_out: int, inner: tuple[int, ...]) -> tuple[int, ...]:
        return (n_out,) + inner if self.rows == 0 else (-(-n_out // self.rows),) + inner + (self.rows,)

    def code_shape(self, n_out: int, n_in: int, depth: int) -> tuple[int, ...]:
        if self.dot_bits(depth):  # 16 rows x 16 weights x bits per group: bits·16 uint16
            return self._rows_outer(n_out, (n_in * self.dot_bits(depth) // 16,))
        if self.words:
            return self._rows_outer(n_out, (padded_blocks(n_in, depth) * GROUP_SIZE,))
        return self._rows_outer(n_out, (depth, packed_len(n_in)))

    def scale_shape(self, n_out: int, n_in: int, depth: int) -> tuple[int, ...]:
        if self.words:
            groups = self._groups(n_in, depth)
            return self._rows_outer(n_out, (-(-groups // word_digits(CODEBOOK_SIZE)),))
        return self._rows_outer(n_out, (SCALE_DIGITS, packed_len(n_in // GROUP_SIZE)))

    def load(self, buf: te.Tensor):
        """Accessor (row, *unit index) -> element of a codes or scales buffer in this layout."""
        if self.rows == 0:
            return lambda n, *i: buf[(n,) + i]
        return lambda n, *i: buf[(n // self.rows,) + i + (n % self.rows,)]

    def _groups(self, n_in: int, depth: int) -> int:
        """Groups of K as the kernels see it: the words layout pads K to whole blocks, the 2-bit one does not."""
        return n_in // GROUP_SIZE if self.dot_bits(depth) else padded_blocks(n_in, depth) * word_block(depth)[0]

    def repack_codes(self, packed: np.ndarray, n_in: int) -> np.ndarray:
        """Checkpoint codes [N, d, Kb] -> this layout (numpy, at compile time)."""
        if self.dot_bits(packed.shape[1]):
            return dot_order_codes(packed, n_in, self.dot_bits(packed.shape[1]))
        return self._interleave(code_words(packed, n_in) if self.words else packed)

    def repack_scales(self, packed: np.ndarray, n_in: int, depth: int) -> np.ndarray:
        """Checkpoint scales [N, 3, Gb] -> this layout (the words layout pads groups as it pads K)."""
        if self.words:
            return self._interleave(scale_words(packed, n_in, depth, self._groups(n_in, depth)))
        return self._interleave(packed)

    def codebook_size(self, parts: int = 1) -> int:
        """Entries of the (concatenated) codebook parameter: 27 per matrix, zero-padded to a multiple of 32
        with permute_steps (the permutes read whole 32-entry windows); with factored_steps padded to a multiple
        of 8, then 16 entries of factor tables per matrix."""
        size = CODEBOOK_SIZE * parts
        if self.factored_steps:
            return factor_tables_start(parts) + FACTORS * parts
        return -(-size // TABLE_WINDOW) * TABLE_WINDOW if self.permute_steps else size

    def repack_codebook(self, codebook: np.ndarray) -> np.ndarray:
        """Concatenated codebooks -> the codebook parameter (zero padding, see codebook_size)."""
        parts = len(codebook) // CODEBOOK_SIZE
        out = np.zeros(self.codebook_size(parts), np.float32)
        out[:len(codebook)] = codebook
        if self.factored_steps:
            out[factor_tables_start(parts):] = codebook_factors(codebook).ravel()
        return out

    def _interleave(self, arr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(arr) if self.rows == 0 else interleave_rows(arr, self.rows)


PLANES = WeightLayout(0)


def layout_for_target(target, int8_activations: bool = False) -> WeightLayout:
    """The run-time layout and decode the target's schedule rules expect (with int8 activations on x86 and on
    aarch64 with dotprod, 16 rows per panel: the int32 lanes of vpdpbusd, four registers of sdot)."""
    rows, decode = layout_rows_for_target(target, int8_activations), decode_for_target(target)
    permute = (target.kind.name == "llvm" and rows % LANES == 0
               and bool(tvm.target.codegen.target_has_features("avx512f", target)))
    dot_order = dot_order_for_target(target, int8_activations)
    byte_depth4 = byte_depth4_for_target(target, int8_activations)
    return WeightLayout(rows, decode, permute, int8_activations, two_bit_depth1=dot_order, five_bit_depth3=dot_order,
                        byte_depth4=byte_depth4, factored_steps=byte_depth4 and not permute)


def _dequantized_tiles(layout: WeightLayout, lead: list) -> bool:
    """The form of the computation (docstring at the top of the module).

    Grouped (decode, and GPUs): per group Σ x·u, times the step once per 16 weights; the least arithmetic
    per weight, for kernels that use each weight once. Dequantized tiles (CPU prefill, many rows): each
    weight decoded to step·q once per tile and then reused by every row of x, a plain GEMM inner loop
    (5 group accumulators per row, as in the grouped form, do not fit the registers).
    """
    single_row = all(isinstance(d, (int, tirx.IntImm)) and int(d) == 1 for d in lead)
    return layout.decode == DECODE_SIMD16 and not single_row


def stacked_row_starts(parts: tuple[int, ...]) -> list[int]:
    """First row of every stacked matrix after the first (q/k/v or gate/up fused into one operator)."""
    return list(itertools.accumulate(parts[:-1]))


def _word_digit(word: tirx.PrimExpr, pos, base: int, ndigits: int) -> tirx.PrimExpr:
    """Digit `pos` of a 16-bit word of the words layout (codec.format.values_to_words), as int32."""
    return _chain_digit(word, pos, base, ndigits=ndigits).astype("int32")


def _dot_order_byte(codes: te.Tensor, n, offset) -> tirx.PrimExpr:
    """Byte `offset` of the panel of row n in a dot-order layout, read from its uint16 words (little-endian), as
    int32."""
    word = codes[n // DOT_ROWS, offset // 2 // DOT_ROWS, offset // 2 % DOT_ROWS].astype("int32")
    return tirx.bitwise_and(tirx.shift_right(word, offset % 2 * 8), tirx.const(0xFF, "int32"))


def _dot_order_value(codes: te.Tensor, n, unit, bits: int) -> tirx.PrimExpr:
    """u of weight `unit` (16g + 4c + q) of row n in a dot-order layout (codec.format.dot_order_codes): in a
    group's 32·bits bytes, field c mod f (b bits, f = 8/b per byte) of byte 4t + q of plane c div f (t = n mod
    16, planes of 64 bytes); with 5 bits (b = 4) plus bit c + 4·(i div 32) of byte 128 + i mod 32 (i = 4t + q)
    as bit 4."""
    field = dot_field_bits(bits)
    fields = 8 // field
    g, c, q = unit // GROUP_SIZE, unit % GROUP_SIZE // DOT_CHUNK, unit % DOT_CHUNK
    i = DOT_CHUNK * (n % DOT_ROWS) + q
    low = tirx.bitwise_and(tirx.shift_right(_dot_order_byte(codes, n, g * 32 * bits + c // fields * DOT_PLANE + i),
                                            c % fields * field), tirx.const((1 << field) - 1, "int32"))
    if bits != DOT_HIGH_BITS:
        return low
    high = _dot_order_byte(codes, n, g * 32 * bits + 2 * DOT_PLANE + i % (DOT_PLANE // 2))
    bit = tirx.bitwise_and(tirx.shift_right(high, c + 4 * (i // (DOT_PLANE // 2))), tirx.const(1, "int32"))
    return low + tirx.shift_left(bit, tirx.const(field, "int32"))


def _activation_values(x: te.Tensor, int8: bool):
    """Accessor (index..., k) -> x[..., k] as float32 (k < K), or with int8 its 8-bit quantization per group of
    16, dequantized: round(x · (127 / peak)) · (peak / 127), peak = max |x| over the group (0 when peak is 0).
    Integer kernels multiply the rounded values and apply the scale per group (quantize_activations)."""
    if not int8:
        return lambda i: x[i].astype("float32")
    n_in = int(x.shape[-1])
    j = te.reduce_axis((0, GROUP_SIZE), "xj")
    peak = te.compute(list(x.shape[:-1]) + [n_in // GROUP_SIZE], lambda *i: te.max(
        tirx.abs(x[i[:-1] + (i[-1] * GROUP_SIZE + j,)].astype("float32")), axis=j), name="trit_x_peak")
    limit = tirx.const(float(ACT_MAX), "float32")

    def value(i):
        top = peak[tuple(i[:-1]) + (tirx.min(i[-1], n_in - 1) // GROUP_SIZE,)]
        level = tirx.nearbyint(x[i].astype("float32") * (limit / top))
        return tirx.if_then_else(top > tirx.const(0.0, "float32"), level * (top / limit), tirx.const(0.0, "float32"))
    return value


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy: x [..., K] -> (int8 levels [..., K], float32 scales [..., K/16]) as the operator's int8 form
    computes them (float32 arithmetic, round half to even); x ≈ levels · scale of their group."""
    x = np.asarray(x, np.float32)
    groups = x.reshape(x.shape[:-1] + (-1, GROUP_SIZE))
    peak = np.abs(groups).max(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.rint(groups * (np.float32(ACT_MAX) / peak)[..., None])
    levels = np.where(peak[..., None] > 0, levels, 0).astype(np.int8)
    return levels.reshape(x.shape), (peak / np.float32(ACT_MAX)).astype(np.float32)


def trit_decode_matmul_te(x: te.Tensor, codes: te.Tensor, scales: te.Tensor, codebook: te.Tensor,
                          bias: te.Tensor | None = None, *, n_out: int, depth: int, layout: WeightLayout = PLANES,
                          parts: tuple[int, ...] = (), out_dtype: str | None = None) -> te.Tensor:
    """TE compute of the operator; x is [..., K], the result [..., n_out].

    y = Σ_groups step · (Σ_{16 weights} x·q): the step multiplies a group's dot product once.
    parts: row counts of matrices stacked into this one (fused q/k/v, gate/up), each with its own
    codebook: `codebook` is their 27-entry codebooks concatenated, row n reads the one of its matrix.
    A block is `positions` groups whose weights share their packed units (bytes of the digit planes: 5
    groups; 16-bit words: m groups); unit j of a block holds weight j of each of its groups.
    """
    n_in = int(x.shape[-1])
    qmax = qmax_of(depth)
    dot_bits = layout.dot_bits(depth)
    if dot_bits:  # a block is one group; K is whole groups
        positions, block, n_blocks, tail = 1, GROUP_SIZE, n_in // GROUP_SIZE, 0
    elif layout.words:  # K padded to whole blocks (codec.format.padded_blocks): no tail, x padded with zeros
        (positions, block), n_blocks, tail = word_block(depth), padded_blocks(n_in, depth), 0
    else:
        positions, block = TRITS_PER_BYTE, BLOCK
        n_blocks, tail = n_in // block, n_in % block
    k_len = n_blocks * block + tail
    out_dtype = out_dtype or x.dtype
    lead = list(x.shape[:-1])
    code_at, scale_at = layout.load(codes), layout.load(scales)
    to_float = lambda v: v.astype("float32")  # noqa: E731

    if layout.words:
        scale_m = word_digits(CODEBOOK_SIZE)

        # (the words layout has no K tail: `tail` is only the planes layouts' switch)
        def code_value(n, unit, pos, tail=False):  # u = q + qmax, in [0, 3^d)
            if dot_bits:
                return _dot_order_value(codes, n, unit, dot_bits)
            return _word_digit(code_at(n, unit), pos, 3 ** depth, positions)

        def scale_index(n, g, tail=False):
            return _word_digit(scale_at(n, g // scale_m), g % scale_m, CODEBOOK_SIZE, scale_m)
    else:
        tail_base3 = None  # the K-tail's decode, when it differs from the blocks'
        if layout.decode == DECODE_TABLE32:  # the tail (< 80 weights) reads no table: one owner per table copy
            base3, tail_base3 = functools.partial(_base3_table, digit_table()), _base3_int32
            to_float = _small_int_to_float
        elif layout.decode == DECODE_INT32:
            base3, to_float = _base3_int32, _small_int_to_float
        else:
            base3 = _base3

        def code_value(n, unit, pos, tail=False):
            return (tail_base3 if tail and tail_base3 else base3)(lambda i, b: code_at(n, i, b), depth, unit, pos)

        def scale_index(n, g, tail=False):
            return (tail_base3 if tail and tail_base3 else base3)(lambda i, b: scale_at(n, i, b), SCALE_DIGITS,
                                                                   g // TRITS_PER_BYTE, g % TRITS_PER_BYTE)

    def index_of(n, g, tail=False):  # into the concatenated codebooks
        idx = scale_index(n, g, tail)
        for start in stacked_row_starts(parts):
            idx = idx + tirx.Select(n >= start, tirx.const(CODEBOOK_SIZE, "int32"), tirx.const(0, "int32"))
        return idx

    def step_of(n, g, tail=False):
        return codebook[index_of(n, g, tail)]

    def u(n, unit, pos, tail=False):  # q + qmax as float
        return to_float(code_value(n, unit, pos, tail))

    x_value = _activation_values(x, layout.int8_activations)
    x_src = x
    if (k_len > n_in or layout.int8_activations) and not _dequantized_tiles(layout, lead):
        x_src = te.compute(lead + [k_len], lambda *i: tirx.if_then_else(
            i[-1] < n_in, x_value(i), tirx.const(0.0, "float32")), name="trit_x_padded")

    def x_at(i, k):
        return x_src[tuple(i[:-1]) + (k,)].astype("float32")

    # the words layouts' rows are stored in whole panels (zero-padded): computed over whole panels too, so no row
    # loop of the kernels has a partial last panel (a bounds check there keeps the whole loop from vectorizing:
    # 5-8x slower GEMVs at 2000 rows on Zen 4); trit_out keeps the first n_out
    n_rows = -(-n_out // layout.rows) * layout.rows if layout.words else n_out
    acc = None
    if n_blocks:
        if layout.permute_steps:  # the lookup as a one-hot sum, which schedules/x86_lookup.py replaces
            index = te.compute((n_blocks, positions, n_rows), lambda b, p, n: index_of(n, b * positions + p),
                               name="trit_step_index")
            cb = te.reduce_axis((0, int(codebook.shape[0])), "cb")
            step = te.compute((n_blocks, positions, n_rows), lambda b, p, n: te.sum(tirx.Select(
                index[b, p, n] == cb, codebook[cb], tirx.const(0.0, "float32")), axis=cb), name="trit_step")
        else:
            step = te.compute((n_blocks, positions, n_rows), lambda b, p, n: step_of(n, b * positions + p),
                              name="trit_step")
        kb = te.reduce_axis((0, n_blocks), "kb")
        kp = te.reduce_axis((0, positions), "kp")
        kj = te.reduce_axis((0, GROUP_SIZE), "kj")
        if _dequantized_tiles(layout, lead):
            w = te.compute((n_rows, n_blocks, positions, GROUP_SIZE), lambda n, b, p, j: step[b, p, n] * (
                u(n, b * GROUP_SIZE + j, p) - float(qmax)), name="trit_decode")
            # rows padded with zeros to a multiple of the GEMM's row tile: its inner loop needs no bounds check
            padded = lead[:-1] + [(lead[-1] + PREFILL_ROW_TILE - 1) // PREFILL_ROW_TILE * PREFILL_ROW_TILE]
            xp = te.compute(padded + [k_len], lambda *i: tirx.if_then_else(
                tirx.all(i[-2] < lead[-1], i[-1] < n_in), x_value(i[:-2] + (tirx.min(i[-2], lead[-1] - 1), i[-1])),
                tirx.const(0.0, "float32")), name="trit_x_padded")
            acc = te.compute(padded + [n_rows], lambda *i: te.sum(
                xp[tuple(i[:-1]) + (kb * block + kp * GROUP_SIZE + kj,)] * w[i[-1], kb, kp, kj],
                axis=[kb, kp, kj]), name="trit_matmul")
        else:
            w = te.compute((n_rows, n_blocks, positions, GROUP_SIZE),
                           lambda n, b, p, j: u(n, b * GROUP_SIZE + j, p), name="trit_decode")
            ks = te.reduce_axis((0, GROUP_SIZE), "ks")
            # Σ x·q = Σ x·u − qmax·Σ x: the group sums of x are shared by every row
            xsum = te.compute(lead + [n_blocks, positions], lambda *i: te.sum(
                x_at(i[:-1], i[-2] * block + i[-1] * GROUP_SIZE + ks), axis=ks), name="trit_xsum")
            # output rows innermost, so a tile of rows is contiguous for SIMD lanes
            dot = te.compute(lead + [n_blocks, positions, n_rows], lambda *i: te.sum(
                x_at(i[:-2], i[-3] * block + i[-2] * GROUP_SIZE + kj) * w[i[-1], i[-3], i[-2], kj], axis=kj),
                name="trit_group_dot")
            acc = te.compute(lead + [n_rows], lambda *i: te.sum(step[kb, kp, i[-1]] * (
                dot[tuple(i[:-1]) + (kb, kp, i[-1])] - float(qmax) * xsum[tuple(i[:-1]) + (kb, kp)]),
                axis=[kb, kp]), name="trit_matmul")
    if tail:
        base = n_blocks * GROUP_SIZE  # first tail unit; tail weights are in plain order
        wt = te.compute((n_out, tail), lambda n, t: step_of(n, n_blocks * positions + t // GROUP_SIZE, tail=True)
                        * (u(n, base + t // positions, t % positions, tail=True) - float(qmax)),
                        name="trit_decode_tail")
        kt = te.reduce_axis((0, tail), "kt")
        prev = acc

        def tail_sum(*i):
            term = x_at(i, n_blocks * block + kt) * wt[i[-1], kt]
            if prev is not None:  # continue from the blocks' sum, so one loop nest can hold both
                term = term + tirx.Select(kt == 0, prev[i], tirx.const(0.0, "float32"))
            return te.sum(term, axis=kt)
        acc = te.compute(lead + [n_out], tail_sum, name="trit_matmul_tail")

    def finish(*i):
        y = acc[i] if bias is None else acc[i] + bias[i[-1]].astype("float32")
        return y.astype(out_dtype)
    return te.compute(lead + [n_out], finish, name="trit_out")


def trit_op_attrs(n_out: int, n_in: int, depth: int, has_bias: bool, layout: WeightLayout = PLANES,
                  parts: tuple[int, ...] = ()) -> dict:
    """PrimFunc attributes: the tag schedule rules match, the static weight shape, layout, op pattern; with
    int8 activations also the mode and the stacked matrices' rows (what the VNNI kernels are built from; the
    float form keeps the attributes its tuning records were taken with, as they match on them)."""
    attrs = {TRIT_OP_ATTR: TRIT_OP_NAME, "trit.n_out": n_out, "trit.n_in": n_in, "trit.depth": depth,
             "trit.bias": int(has_bias), LAYOUT_ROWS_ATTR: layout.rows, "op_pattern": OP_PATTERN_OPAQUE}
    if layout.int8_activations:
        attrs.update({INT8_ACTIVATIONS_ATTR: 1, PARTS_ATTR: list(parts or (n_out,))})
    if layout.dot_bits(depth):
        attrs[DOT_BITS_ATTR] = layout.dot_bits(depth)
    if layout.factored_steps:
        attrs[FACTORED_STEPS_ATTR] = 1
    return attrs


def trit_decode_matmul_func(n_out: int, n_in: int, depth: int, layout: WeightLayout = PLANES, rows: int | None = None,
                            bias: bool = False, dtype: str = "float32", parts: tuple[int, ...] = ()) -> tirx.PrimFunc:
    """A standalone operator PrimFunc (x [rows, n_in], symbolic rows when None), tagged for the rules:
    what tests and benchmarks build kernels from. parts: stacked matrices (see trit_decode_matmul_te)."""
    x = te.placeholder((rows if rows else te.var("m"), n_in), dtype, "x")
    codes = te.placeholder(layout.code_shape(n_out, n_in, depth), layout.unit_dtype, "codes")
    scales = te.placeholder(layout.scale_shape(n_out, n_in, depth), layout.unit_dtype, "scales")
    codebook = te.placeholder((layout.codebook_size(max(len(parts), 1)),), "float32", "codebook")
    args = [x, codes, scales, codebook] + ([te.placeholder((n_out,), dtype, "bias")] if bias else [])
    y = trit_decode_matmul_te(*args, n_out=n_out, depth=depth, layout=layout, parts=parts)
    return te.create_prim_func(args + [y]).with_attr(trit_op_attrs(n_out, n_in, depth, bias, layout, parts))


def reference_decode_matmul(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, codebook: np.ndarray,
                            bias: np.ndarray | None = None, parts: tuple[int, ...] = (),
                            int8_activations: bool = False) -> np.ndarray:
    """numpy: x @ Ŵᵀ (+ bias) in float64, Ŵ unpacked by the codec (the operator's specification);
    with parts, the stacked matrices are unpacked one by one, each with its own codebook; with
    int8_activations, x is first quantized as the operator's int8 form does (quantize_activations)."""
    if int8_activations:
        levels, scale = quantize_activations(x)
        x = (levels.reshape(scale.shape + (GROUP_SIZE,)) * scale[..., None].astype(np.float64)).reshape(x.shape)
    starts = [0, *stacked_row_starts(parts), codes.shape[0]]
    w = np.concatenate([unpack_matrix({"trit_codes": codes[a:b], "trit_scales": scales[a:b],
                                       "trit_codebook": codebook[CODEBOOK_SIZE * i:CODEBOOK_SIZE * (i + 1)]},
                                      x.shape[-1]).dequantize(np.float64)
                         for i, (a, b) in enumerate(zip(starts, starts[1:]))])
    y = x.astype(np.float64) @ w.T
    return y if bias is None else y + bias.astype(np.float64)
