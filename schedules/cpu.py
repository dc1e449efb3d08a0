"""CPU (llvm: x86 and ARM) rules for trit_decode_matmul on the row-interleaved weight layout.

The float rules vectorize over the R interleaved rows (one SIMD load = the same 16-bit word of R rows), decode
each weight with a multiply-high in 16-bit lanes, multiply each group's dot product by its step once, and
spread row panels over the cores. The VNNI rules hand the operator's int8-activation form to the integer
kernels of x86_vnni.py on CPUs that have the instructions (elsewhere the float rules take that form too).
"""
from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .base import FACTORED_STEPS_ATTR, INT8_ACTIVATIONS_ATTR, KERNEL_ATTR, LOGITS_KERNEL, PARTS_ATTR, \
    PREFILL_ROW_TILE, dot_bits, is_trit_decode_matmul, kernel_key, layout_rows, row_count, split_loops, static_extent, \
    trit_blocks, vectorize_lanes
from .x86_lookup import LANES, permute_lookup_intrin
from .x86_vnni import ROWS as VNNI_ROWS
from .x86_vnni import VNNIKnobs, default_knobs, isa_for_target, vnni_gemm_func, vnni_gemv_func


def _applies(func, target: Target) -> bool:
    return target.kind.name == "llvm" and is_trit_decode_matmul(func) and layout_rows(func) > 0


def _applies_words(func, target: Target) -> bool:
    """The float rules read the words layout only (the dot-order ones are the integer kernels')."""
    return _applies(func, target) and not dot_bits(func)


def _word_layout_blocks(sch: s_tir.Schedule) -> dict | None:
    """The operator's blocks, or None when it has a K tail: the CPUs' word layout pads K to whole blocks,
    so a tail means a layout these rules are not written for (the GPUs' digit planes)."""
    b = trit_blocks(sch)
    return None if "trit_matmul_tail" in b else b


def _rows_and_panels(sch: s_tir.Schedule, block, lanes: int):
    """(lead..., n, red...) of an accumulation block -> (x-rows loop, row-panel loop, lane loop, red...)."""
    spatial, reduce = split_loops(sch, block)
    *lead, n = spatial
    m = sch.fuse(*lead)
    nb, r = sch.split(n, factors=[None, lanes])
    return m, nb, r, reduce


def _steps_at(sch: s_tir.Schedule, b: dict, anchor) -> None:
    """The group steps under `anchor`, vectorized over the rows. With WeightLayout.permute_steps the
    operator states the lookup as a one-hot sum over the codebook (after its own index block): the index
    is computed vectorized and the lookup becomes AVX-512 permutes (x86_lookup), 16 rows at a time."""
    step = b["trit_step"]
    sch.compute_at(step, anchor, preserve_unit_loops=True)
    sch.set_scope(step, 0, "local")
    if "trit_step_index" not in b:
        sch.vectorize(sch.get_loops(step)[-1])
        return
    index = b["trit_step_index"]
    sch.compute_at(index, anchor, preserve_unit_loops=True)
    sch.set_scope(index, 0, "local")
    sch.vectorize(sch.get_loops(index)[-1])
    table = next(r.source for r in sch.get(step).reads if r.source.dtype == "float32" and len(r.source.shape) == 1)
    index_dtype = str(sch.get(step).iter_vars[-1].var.ty)
    rows = sch.get_loops(step)[-2]
    if (static_extent(sch, rows) or LANES) % LANES:  # a matrix of fewer rows than a panel: left as a loop
        return
    _, lanes = sch.split(rows, factors=[None, LANES])
    sch.tensorize(lanes, permute_lookup_intrin(int(table.shape[0]), index_dtype))


def _output_at(sch: s_tir.Schedule, b: dict, anchor) -> None:
    """The epilogue under `anchor`, lanes innermost and vectorized."""
    sch.reverse_compute_at(b["trit_out"], anchor, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(b["trit_out"])[-1])


class TritGEMVCPU(ScheduleRule):
    """Decode (one row of x): per row panel and block (m groups sharing their 16-bit words), the m group
    dot products are accumulated together so each word is loaded once for its m digit positions."""

    # knobs MetaSchedule may tune (trit_tvm/tuning.py); the hand rule uses the first of each
    PANELS_PER_TASK = (1, 2, 4, 8)
    UNROLL_STEPS = (0, 16, 64, 512)

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not _applies_words(func, target) or row_count(func) != 1:
            return None
        sch = s_tir.Schedule(func)
        return None if _word_layout_blocks(sch) is None else self.schedule(sch, tunable=False)

    def schedule(self, sch: s_tir.Schedule, tunable: bool) -> s_tir.Schedule:
        """Apply the rule to sch; with tunable, panels per parallel task and the unroll depth of the
        block loop are sampled decisions (a 16-point space for MetaSchedule)."""
        func = sch.mod["main"]
        b = trit_blocks(sch)
        lanes = layout_rows(func)
        sch.compute_inline(b["trit_decode"])
        if "trit_x_padded" in b:  # x zero-padded to whole blocks (the words layout): once, before the panels
            vectorize_lanes(sch, sch.get_loops(b["trit_x_padded"])[-1])
        mm = b["trit_matmul"]
        m, nb, r, (kb, kp) = _rows_and_panels(sch, mm, lanes)
        sch.reorder(m, nb, kb, kp, r)
        sch.vectorize(r)
        sch.compute_at(b["trit_group_dot"], kb, preserve_unit_loops=True)  # trit_xsum stays a small nest
        _steps_at(sch, b, kb)
        *_, pos, lane, kj = sch.get_loops(b["trit_group_dot"])
        sch.reorder(kj, pos, lane)
        sch.unroll(pos)
        sch.vectorize(lane)
        _output_at(sch, b, nb)
        for name in ("trit_group_dot", "trit_matmul"):
            sch.set_scope(b[name], 0, "local")
        if tunable:
            uniform = [1.0 / len(self.UNROLL_STEPS)] * len(self.UNROLL_STEPS)
            sch.annotate(kb, "pragma_auto_unroll_max_step", sch.sample_categorical(list(self.UNROLL_STEPS), uniform))
            sch.annotate(kb, "pragma_unroll_explicit", 1)
            per_task = sch.sample_categorical(list(self.PANELS_PER_TASK), [1.0 / len(self.PANELS_PER_TASK)] * 4)
            nb, _ = sch.split(nb, factors=[None, per_task])
        sch.parallel(nb)  # per-panel tiles are then allocated inside the parallel loop
        # zero the group accumulators before their 16 weights, not under an if inside that loop
        sch.decompose_reduction(b["trit_group_dot"], sch.get_loops(b["trit_group_dot"])[-3])
        return sch


class TritGEMVVNNI(ScheduleRule):
    """Decode with int8 activations on AVX-512 VNNI: the operator's int8-activation form on one row of x,
    16-row panels, becomes the hand-written integer kernel of schedules/x86_vnni.py (same parameters). On
    CPUs with AVX2 but not VNNI, the same for matrices in the 2-bit layout (schedules/x86_avx2.py).

    choices: trit-tune's per-kernel picks by schedules.base.kernel_key, {"variant": "vnni", "knobs": {...}}
    (VNNIKnobs fields) or {"variant": "float"} (decline: the float rules compute the int8 form instead)."""

    single_row = True
    VARIANTS = ("vnni", "float")

    def __init__(self, choices: dict[str, dict] | None = None):
        super().__init__()
        self.choices = choices or {}

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not (_applies(func, target) and int(func.attrs.get(INT8_ACTIVATIONS_ATTR, 0))
                and layout_rows(func) == VNNI_ROWS and (row_count(func) == 1) == self.single_row):
            return None
        isa = isa_for_target(target, bool(dot_bits(func)))
        if isa is None:
            return None
        choice = self.choices.get(kernel_key(func), {})
        if choice.get("variant", "vnni") == "float" and not dot_bits(func):
            return None
        params = list(func.params)  # buffers: x, codes, scales, codebook, [bias], out
        x, codebook, out = params[0], params[3], params[-1]
        knobs = VNNIKnobs(**choice["knobs"]) if "knobs" in choice else default_knobs(isa)
        # the decode kernel may read the codebook parameter's factor tables; the prefill looks its steps up once
        factored = {"factored": bool(int(func.attrs.get(FACTORED_STEPS_ATTR, 0)))} if self.single_row else {}
        kernel = (vnni_gemv_func if self.single_row else vnni_gemm_func)(
            int(func.attrs["trit.n_out"]), int(func.attrs["trit.n_in"]), int(func.attrs["trit.depth"]),
            tuple(int(p) for p in func.attrs[PARTS_ATTR]), bias=len(params) == 6, dtype=str(x.dtype),
            x_shape=tuple(x.shape), out_shape=tuple(out.shape), knobs=knobs, bits=dot_bits(func), isa=isa,
            table_size=int(codebook.shape[0]), **factored)
        return s_tir.Schedule(kernel)


class TritGEMMVNNI(TritGEMVVNNI):
    """Prefill with int8 activations on AVX-512 VNNI (many rows of x): the integer GEMM of
    schedules/x86_vnni.py."""

    single_row = False


def _pad_rows_over_cores(sch: s_tir.Schedule, b: dict) -> None:
    """The zero-padded copy of x (before the row panels, which all read it): rows over the cores, with the
    int8 form's group maxima of each row computed in that row's task."""
    *rows, k = sch.get_loops(b["trit_x_padded"])
    row = sch.fuse(*rows)
    sch.parallel(row)
    vectorize_lanes(sch, k)
    if "trit_x_peak" in b:
        sch.compute_at(b["trit_x_peak"], row, preserve_unit_loops=True)


class TritGEMMCPU(ScheduleRule):
    """Prefill (many rows of x, the dequantized-tile form): per row panel, its weights are decoded once to
    step·q in a float tile (K x R, rows innermost, cache-resident), then a plain GEMM runs over it:
    PREFILL_ROW_TILE rows of x at a time with their accumulators in registers over all of K, so each tile
    vector loaded feeds that many multiply-adds (2x the grouped form's 5 group accumulators per row)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not _applies_words(func, target) or row_count(func) == 1:
            return None
        sch = s_tir.Schedule(func)
        b = _word_layout_blocks(sch)
        if b is None or "trit_group_dot" in b:  # the grouped form: not this rule's (GPUs, single rows)
            return None
        lanes = layout_rows(func)
        mm = b["trit_matmul"]
        m, nb, r, (kb, kp, kj) = _rows_and_panels(sch, mm, lanes)
        mo, mi = sch.split(m, factors=[None, PREFILL_ROW_TILE])
        sch.reorder(nb, mo, kb, kp, kj, mi, r)
        sch.vectorize(r)
        sch.unroll(mi)
        acc = sch.cache_write(mm, 0, "local")  # PREFILL_ROW_TILE x R accumulators, in registers over all of K
        sch.reverse_compute_at(acc, mo, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(acc)[-1])
        sch.compute_at(b["trit_decode"], nb, preserve_unit_loops=True)
        _steps_at(sch, b, nb)
        *_, lane, _, pos, j = sch.get_loops(b["trit_decode"])
        sch.reorder(pos, j, lane)
        sch.unroll(pos)
        sch.vectorize(lane)
        _output_at(sch, b, nb)
        _pad_rows_over_cores(sch, b)
        # the tile with its rows innermost: every read of it is one contiguous vector (rows first, it was
        # a 32-element gather per multiply-add, 5x slower)
        sch.transform_layout(b["trit_decode"], ("write", 0), lambda n, blk, pos, j: (blk, pos, j, n))
        sch.parallel(nb)  # per-panel tiles are then allocated inside the parallel loop
        sch.decompose_reduction(mm, kb)  # zero the accumulators before K, not under an if inside it
        return sch


class DenseLogitsCPU(ScheduleRule):
    """The output projection (logits = h · Wᵀ, W [vocab, hidden] kept dense), its dot products vectorized
    along the contiguous hidden axis (rfactor) and vocabulary rows spread over the cores. One position
    (decode, prefill's last): a row per parallel iteration. Several (`score`'s chunks, for perplexity): a tile
    of `vocab_tile` rows per parallel iteration with the positions inside it, so W is read once per call (with
    the positions outside, a 256-token chunk of SmolLM2 re-read its 113 MB FP32 head 256 times) and each
    vector of h loaded feeds `vocab_tile` multiply-adds into accumulators held in registers. No tile over the
    positions: a chunk's count is symbolic, and the predicate on its last tile put the accumulators in memory."""

    lanes = 16
    vocab_tile = 8

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if target.kind.name != "llvm" or func.attrs is None or func.attrs.get(KERNEL_ATTR) != LOGITS_KERNEL:
            return None
        sch = s_tir.Schedule(func)
        block = sch.get_sblock("logits")
        (*positions, vocab), (k,) = split_loops(sch, block)
        if math.prod(static_extent(sch, p) or 0 for p in positions) == 1:
            return self._one_position(sch, block, positions, vocab, k)
        return self._row_tiles(sch, block, positions, vocab, k)

    def _one_position(self, sch: s_tir.Schedule, block, positions: list, vocab, k) -> s_tir.Schedule:
        sch.reorder(vocab, *positions)
        ko, ki = sch.split(k, factors=[None, self.lanes])
        rf = sch.rfactor(ki, 0)
        vocab_rf, *positions_rf, red, lane = sch.get_loops(rf)  # the loops keep their order
        sch.parallel(vocab_rf)
        sch.vectorize(lane)
        sch.reverse_compute_at(block, positions_rf[-1], preserve_unit_loops=True)
        sch.set_scope(rf, 0, "local")
        return sch

    def _row_tiles(self, sch: s_tir.Schedule, block, positions: list, vocab, k) -> s_tir.Schedule:
        tiles, rows = sch.split(vocab, factors=[None, self.vocab_tile])
        position = sch.fuse(*positions)
        ko, ki = sch.split(k, factors=[None, self.lanes])
        sch.reorder(tiles, position, ko, rows, ki)
        rf = sch.rfactor(ki, 0)
        tiles, position, ko, rows, lane = sch.get_loops(rf)  # rfactor gave the partial sums loops of their own
        sch.reverse_compute_at(block, position, preserve_unit_loops=True)
        sch.set_scope(rf, 0, "local")
        sch.transform_layout(rf, ("write", 0), lambda lane_, b, s, v: (b, s, v, lane_))  # each row's contiguous
        sch.unroll(rows)
        sch.vectorize(lane)
        sch.parallel(tiles)
        sch.decompose_reduction(rf, ko)  # zero the accumulators before K, not under an if inside it
        return sch
