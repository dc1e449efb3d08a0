"""The packed form of one quantized matrix (docs/FORMAT.md is the byte-level spec).

Three tensors per matrix W [N, K] at depth d, G = K/16:
  <name>.trit_codes    uint8 [N, d, ceil(K/5)]   digit plane i of every weight, 5 per byte, group-aligned:
                       in each block of 80 weights (5 groups), byte j holds weights j, 16+j, .., 64+j, so
                       digit position p of the block's 16 bytes is exactly group p; a tail of < 80 weights
                       is packed in plain order
  <name>.trit_scales   uint8 [N, 3, ceil(G/5)]   the 3 digits of each group's codebook index, 5 per byte
  <name>.trit_codebook float32 [27]              the steps
Weight digits are the base-3 digits of u = q + qmax, which are exactly q's balanced-ternary digits + 1,
so q = Σ_i digit_i·3^i - qmax.
"""
from __future__ import annotations

import functools

import numpy as np

from .errors import CodecError
from .quantize import CODEBOOK_SIZE, FACTOR_TABLE, GROUP_SIZE, QuantizedMatrix, qmax_of
from .trits import TRITS_PER_BYTE, from_digits, pack_trits, packed_len, to_digits, unpack_trits

CODES, SCALES, CODEBOOK = "trit_codes", "trit_scales", "trit_codebook"
SCALE_DIGITS = 3  # 27 codebook entries = 3 trits


def packed_shapes(n_out: int, n_in: int, depth: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the three packed tensors of an [n_out, n_in] matrix."""
    return {CODES: (n_out, depth, packed_len(n_in)),
            SCALES: (n_out, SCALE_DIGITS, packed_len(n_in // GROUP_SIZE)),
            CODEBOOK: (CODEBOOK_SIZE,)}


BLOCK = GROUP_SIZE * TRITS_PER_BYTE  # 80 weights: 16 bytes per digit plane


def _block_order(values: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Last axis: weight order -> packing order (or back with inverse).

    Packing position of weight k = 80·b + 16·p + j (k < 80·B) is 80·b + 5·j + p; the tail keeps its order.
    """
    lead, n_in = values.shape[:-1], values.shape[-1]
    main = n_in - n_in % BLOCK
    inner = (TRITS_PER_BYTE, GROUP_SIZE) if not inverse else (GROUP_SIZE, TRITS_PER_BYTE)
    head = np.swapaxes(values[..., :main].reshape(lead + (-1,) + inner), -1, -2).reshape(lead + (main,))
    return np.concatenate([head, values[..., main:]], axis=-1)


def pack_matrix(qm: QuantizedMatrix) -> dict[str, np.ndarray]:
    """QuantizedMatrix -> {suffix: packed array}."""
    u = qm.codes.astype(np.int32) + qmax_of(qm.depth)
    return {CODES: pack_trits(_block_order(to_digits(u, qm.depth))),
            SCALES: pack_trits(to_digits(qm.scale_idx, SCALE_DIGITS)),
            CODEBOOK: np.asarray(qm.codebook, np.float32)}


def unpack_matrix(packed: dict[str, np.ndarray], n_in: int, name: str = "weight") -> QuantizedMatrix:
    """Inverse of pack_matrix; checks shapes against n_in so a corrupt file fails with a clear message."""
    codes, scales, codebook = (np.asarray(packed[k]) for k in (CODES, SCALES, CODEBOOK))
    n_out, depth = codes.shape[0], codes.shape[1]
    want = packed_shapes(n_out, n_in, depth)
    for key, arr in ((CODES, codes), (SCALES, scales), (CODEBOOK, codebook)):
        if tuple(arr.shape) != want[key]:
            raise CodecError(f"tensor '{name}.{key}': shape {list(arr.shape)} does not match "
                             f"{list(want[key])} for a [{n_out}, {n_in}] matrix at depth {depth}")
    u = from_digits(_block_order(unpack_trits(codes, n_in), inverse=True))
    idx = from_digits(unpack_trits(scales, n_in // GROUP_SIZE))
    return QuantizedMatrix((u - qmax_of(depth)).astype(np.int8), idx.astype(np.uint8),
                           codebook.astype(np.float32), depth)


def packed_bits(n_out: int, n_in: int, depth: int) -> int:
    """Bits the three packed tensors take on disk."""
    return 8 * sum(int(np.prod(s)) * (4 if k == CODEBOOK else 1)
                   for k, s in packed_shapes(n_out, n_in, depth).items())


def bits_per_weight(n_out: int, n_in: int, depth: int) -> float:
    """Packed bits / weight, counting codes, scale indices and the codebook."""
    return packed_bits(n_out, n_in, depth) / (n_out * n_in)


def interleave_rows(packed: np.ndarray, rows: int) -> np.ndarray:
    """[N, planes, bytes] -> [ceil(N/rows), planes, bytes, rows]: `rows` consecutive output rows innermost
    (the kernels' run-time layout: the same bytes, zero rows up to a multiple of `rows`)."""
    pad = -packed.shape[0] % rows
    if pad:
        packed = np.concatenate([packed, np.zeros((pad,) + packed.shape[1:], packed.dtype)])
    return np.ascontiguousarray(np.moveaxis(packed.reshape((-1, rows) + packed.shape[1:]), 1, -1))


WORD_BITS = 16


def chain_digits(words: np.ndarray, base: int, ndigits: int) -> np.ndarray:
    """The kernels' word decode in numpy: digit p (most significant first) of a 16-bit word is
    (base·T_p) >> 16, with T_0 = word and T_p+1 = base·T_p mod 2^16; digits on a new last axis."""
    t, digits = np.asarray(words, np.uint32), []
    for _ in range(ndigits):
        digits.append((t * base) >> WORD_BITS)
        t = (t * base) & 0xFFFF
    return np.stack(digits, -1)


def values_to_words(values: np.ndarray, base: int, ndigits: int) -> np.ndarray:
    """Base-`base` digits along the last axis (length a multiple of ndigits), ndigits per 16-bit word,
    most significant first, as ceil(V·2^16/base^ndigits) (llama.cpp's TQ1_0 fixed point, in base 3^d)."""
    v = np.asarray(values, np.int64)
    pows = base ** np.arange(ndigits - 1, -1, -1, dtype=np.int64)
    value = v.reshape(v.shape[:-1] + (-1, ndigits)) @ pows
    return (-(-(value << WORD_BITS) // base ** ndigits)).astype(np.uint16)


@functools.lru_cache(maxsize=None)
def word_digits(base: int) -> int:
    """Most base-`base` digits a 16-bit word holds such that chain_digits gives every value back exactly
    (checked exhaustively: at most 2^16 values)."""
    best = 1
    while base ** (best + 1) <= 1 << WORD_BITS:
        m = best + 1
        values = np.arange(base ** m, dtype=np.int64)
        digits = (values[:, None] // base ** np.arange(m - 1, -1, -1, dtype=np.int64)) % base
        if not np.array_equal(chain_digits(values_to_words(digits.reshape(-1), base, m), base, m), digits):
            break
        best = m
    return best


def word_block(depth: int) -> tuple[int, int]:
    """(digits per word m, weights per block 16·m) of the word layout at this depth."""
    m = word_digits(3 ** depth)
    return m, m * GROUP_SIZE


def padded_blocks(n_in: int, depth: int) -> int:
    """Blocks of the word layout: K zero-padded up to whole blocks of 16·m weights (kernels pad x alike)."""
    return -(-n_in // word_block(depth)[1])


def code_words(packed_codes: np.ndarray, n_in: int) -> np.ndarray:
    """[N, d, ceil(K/5)] checkpoint codes -> [N, 16·B] uint16: each weight's u = q + qmax (base 3^d, all d
    planes at once), m per word (word_block), K zero-padded to B whole blocks of 16·m weights. In a block
    word j holds weights j, 16+j, .., 16(m-1)+j, so digit p of the block's 16 words is group p. CPU
    kernels decode one weight with one multiply-high (and a multiply to step), instead of one multiply chain
    per digit plane; whole blocks leave them no K tail (the padding meets zeros in x)."""
    n_out, depth = packed_codes.shape[:2]
    m, block = word_block(depth)
    u = from_digits(_block_order(unpack_trits(packed_codes, n_in), inverse=True))
    padded = padded_blocks(n_in, depth) * block
    u = np.concatenate([u, np.zeros((n_out, padded - n_in), u.dtype)], axis=1)
    blocked = np.swapaxes(u.reshape(n_out, -1, m, GROUP_SIZE), -1, -2).reshape(n_out, padded)
    return values_to_words(blocked, 3 ** depth, m)


def scale_words(packed_scales: np.ndarray, n_in: int, depth: int, groups: int | None = None) -> np.ndarray:
    """[N, 3, ceil(G/5)] checkpoint scales -> [N, ceil(G'/3)] uint16: 3 codebook indices (base 27) per
    word, group g in word g//3, digit g%3; G' = `groups`, by default those of padded_blocks (index 0 for the
    padding)."""
    n_groups = n_in // GROUP_SIZE
    idx = from_digits(unpack_trits(packed_scales, n_groups))
    m = word_digits(CODEBOOK_SIZE)
    total = -(-(groups or padded_blocks(n_in, depth) * word_block(depth)[0]) // m) * m
    idx = np.concatenate([idx, np.zeros(idx.shape[:-1] + (total - n_groups,), idx.dtype)], axis=-1)
    return values_to_words(idx, CODEBOOK_SIZE, m)


DOT_ROWS = 16  # rows per panel of the dot-order layouts: the int32 lanes of one vpdpbusd
DOT_CHUNK = 4  # weights of a row per 4-byte lane (vpdpbusd multiplies 4 bytes per lane)
DOT_BITS = (2, 5, 8)  # bits per weight of the dot-order layouts: 2-bit (depth 1), 5-bit (depth 3), bytes (depth 4)
DOT_HIGH_BITS = 5  # the layout whose fields (4 bits) hold u's low bits, its bit 4 in a plane of its own
DOT_PLANE = 64  # bytes per plane: one chunk of 16 rows x 4 weights


def dot_field_bits(bits: int) -> int:
    """Width of the fields of a dot-order layout's 64-byte planes (5-bit: the low 4 bits of u)."""
    return 4 if bits == DOT_HIGH_BITS else bits


def _dot_planes(u: np.ndarray, bits: int) -> np.ndarray:
    """u [panel, t, group, 16] (each < 2^bits) -> [panel, group, planes·64] bytes: byte 4t+q of plane c div f holds
    weight 4c+q in bits bits·(c mod f).. (f = 8/bits fields per byte)."""
    fields = 8 // bits
    u = u.reshape(u.shape[:3] + (GROUP_SIZE // DOT_CHUNK // fields, fields, DOT_CHUNK))  # [panel, t, g, plane, f, q]
    shifts = (bits * np.arange(fields, dtype=np.uint8))[:, None]
    data = np.bitwise_or.reduce(u << shifts, axis=4).transpose(0, 2, 3, 1, 4)  # [panel, g, plane, t, q]
    return data.reshape(data.shape[:2] + (-1,))


def _dot_high_plane(high: np.ndarray) -> np.ndarray:
    """Bit 4 of u [panel, t, group, 16] -> [panel, group, 32] bytes: the bit of weight 4c+q of row t (position
    i = 4t+q of chunk c) is bit c + 4·(i div 32) of byte i mod 32."""
    h = high.reshape(high.shape[:3] + (GROUP_SIZE // DOT_CHUNK, DOT_CHUNK)).transpose(0, 2, 3, 1, 4)  # [p, g, c, t, q]
    h = h.reshape(h.shape[:3] + (2, DOT_PLANE // 2))  # [panel, g, c, half k, byte]
    shifts = (np.arange(GROUP_SIZE // DOT_CHUNK, dtype=np.uint8)[:, None] + 4 * np.arange(2, dtype=np.uint8))
    return np.bitwise_or.reduce((h << shifts[..., None]).reshape(h.shape[:2] + (-1, DOT_PLANE // 2)), axis=2)


def dot_order_codes(packed_codes: np.ndarray, n_in: int, bits: int) -> np.ndarray:
    """[N, d, ceil(K/5)] checkpoint codes -> [ceil(N/16), K·bits/16, 16] uint16 (the bytes of a dot-order run-time
    layout, docs/FORMAT.md): per panel of 16 rows and group g, 32·bits bytes. 2 and 8 bits: bits/2 planes of
    64; weight 16g+4c+q of row t is u = q + qmax in bits b·(c mod f)..+b of byte 4t+q of plane c div f (f = 8/bits
    fields per byte). Shifting plane c div f right and masking each byte gives chunk c in the byte order
    `vpdpbusd` and `vpmaddubsw` read (16 rows x 4 weights): 2-bit (depth 1): one plane, a shift and a mask per
    64 weights; bytes (depth 4, u ≤ 80): four planes, nothing to decode, at the words layout's 8 bits a weight.
    5 bits (depth 3, u ≤ 26): u's low 4 bits as the 4-bit rule's two planes, then a 32-byte plane of bit 4
    (_dot_high_plane), a shift and a mask per chunk half more: 5 bits a weight, below d=3 words' 5.33."""
    n_out, depth = packed_codes.shape[:2]
    if bits not in DOT_BITS or 3 ** depth > 1 << bits or n_in % GROUP_SIZE:
        raise CodecError(f"a {bits}-bit dot-order layout holds depths with 3^d ≤ 2^{bits} and whole groups, got "
                         f"depth {depth}, K = {n_in}")
    u = from_digits(_block_order(unpack_trits(packed_codes, n_in), inverse=True)).astype(np.uint8)
    u = np.concatenate([u, np.zeros((-n_out % DOT_ROWS, n_in), np.uint8)])
    u = u.reshape(-1, DOT_ROWS, n_in // GROUP_SIZE, GROUP_SIZE)  # [panel, t, g, weight]
    field = dot_field_bits(bits)
    data = _dot_planes(u & ((1 << field) - 1), field)
    if bits == DOT_HIGH_BITS:
        data = np.concatenate([data, _dot_high_plane(u >> field)], axis=-1)
    return np.ascontiguousarray(data).view("<u2").reshape(data.shape[0], -1, DOT_ROWS)


FACTORS = 2 * FACTOR_TABLE  # entries of a matrix's factor tables: B_0..B_7, then A_0..A_3, 0, 0, 0, exact
_FACTOR_ULPS = np.arange(-2, 3)  # B_b candidates around the float32 of entry b / entry 0, in units in the last place


def factor_tables_start(parts: int) -> int:
    """Where a run-time codebook parameter with factor tables has them: after the `parts` codebooks, padded to a
    multiple of 8 entries; matrix i's 16 at start + 16·i."""
    return -(-CODEBOOK_SIZE * parts // FACTOR_TABLE) * FACTOR_TABLE


def codebook_factors(codebooks: np.ndarray) -> np.ndarray:
    """Concatenated codebooks [27·M] -> [M, 16] float32 factor tables: B_0..B_7, A_0..A_3, three zeros and
    `exact`. exact = 1 where entry 8a + b is the float32 product A_a·B_b for every entry (A_a = entry 8a, B_b found
    next to entry b / entry 0), as in every codebook codec.quantize writes; then a step is two 8-entry lookups
    and a multiply, bit for bit the entry. Otherwise (recovered codebooks, whose steps are the data's) exact = 0
    and a kernel reads the entries themselves."""
    books = codebooks.reshape(-1, CODEBOOK_SIZE).astype(np.float32)
    k = np.arange(CODEBOOK_SIZE)
    outer = books[:, ::FACTOR_TABLE]  # [M, 4]
    first = books[:, :1].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        guess = np.where(first > 0, books[:, :FACTOR_TABLE] / first, 1.0).astype(np.float32)  # [M, 8]
    candidates = (guess.view(np.int32)[..., None] + _FACTOR_ULPS).view(np.float32)  # [M, 8, 5]
    entry = np.full((len(books), FACTOR_TABLE, 4), np.nan, np.float32)  # entry 8a + b, NaN past the codebook
    entry.reshape(len(books), -1)[:, (k % FACTOR_TABLE) * 4 + k // FACTOR_TABLE] = books
    products = outer[:, None, None, :] * candidates[..., None]  # [M, 8, 5, 4]
    fits = ((products == entry[:, :, None, :]) | np.isnan(entry[:, :, None, :])).all(axis=-1)  # [M, 8, 5]
    inner = np.take_along_axis(candidates, fits.argmax(axis=-1)[..., None], axis=-1)[..., 0]
    exact = fits.any(axis=-1).all(axis=-1) & np.isfinite(books).all(axis=-1)
    tables = np.zeros((len(books), FACTORS), np.float32)
    tables[:, :FACTOR_TABLE] = inner
    tables[:, FACTOR_TABLE:FACTOR_TABLE + outer.shape[1]] = outer
    tables[:, -1] = exact
    return tables
