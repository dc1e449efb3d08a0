"""CUDA rules for trit_decode_matmul on the row-interleaved weight layout.

In that layout byte b of 32 consecutive rows is 32 consecutive bytes, so a warp whose 32 lanes are 32
rows reads each packed byte position with one coalesced 32-byte transaction. Both rules decode each
byte once for its 5 digit positions in registers (positions unrolled), from a digit table each thread
block keeps in shared memory (DECODE_TABLE32) or with 32-bit multiplies and shifts (DECODE_INT32), and
multiply each group's dot product by its step once.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .base import is_trit_decode_matmul, layout_rows, row_count, split_loops, trit_blocks

WARP = 32


def _applies(func, target: Target) -> bool:
    return target.kind.name == "cuda" and is_trit_decode_matmul(func) and layout_rows(func) > 0


def _group_dots_at(sch: s_tir.Schedule, b: dict, block_loop) -> None:
    """Per 80-weight block: the 5 group dot products (and group sums of x) in registers, each packed
    byte loaded once and decoded for its 5 positions (position loop innermost, unrolled)."""
    for name, pos_at in (("trit_xsum", -2), ("trit_group_dot", -3)):  # group_dot: (..., pos, row, j)
        sch.compute_at(b[name], block_loop, preserve_unit_loops=True)
        sch.set_scope(b[name], 0, "local")
        loops = sch.get_loops(b[name])
        pos, j = loops[pos_at], loops[-1]
        sch.reorder(j, pos)
        sch.unroll(pos)
        sch.unroll(j)


TABLE = "trit_digit_table"


def _reads_whole_table(sch: s_tir.Schedule, block, read_index: int) -> None:
    """Schedule.annotate_buffer_access, minus its Python check that the buffer has as many dimensions as
    the block has iterators (the table is 1-D, its readers are not)."""
    iters = [iv.var for iv in sch.get(block).iter_vars]
    whole = tirx.IndexMap(iters, [tirx.const(0, "int32"), tirx.const(256, "int32")], None)
    s_tir.schedule._ffi_api.ScheduleAnnotateBufferAccess(sch, block, read_index, 0, whole)  # 0: a read region


def _digit_table_in_shared(sch: s_tir.Schedule, b: dict, block_loop, threads: int) -> None:
    """The 256-entry digit table (DECODE_TABLE32) in shared memory, filled by each thread block's threads.
    Its readers index it by loaded bytes, a region TVM cannot infer: they are annotated as reading it all."""
    if TABLE not in b:
        return
    for block in trit_blocks(sch).values():  # the blocks still there (others were inlined)
        for i, region in enumerate(sch.get(block).reads):
            if region.source.name == TABLE:
                _reads_whole_table(sch, block, i)
    sch.compute_at(b[TABLE], block_loop, preserve_unit_loops=True)
    sch.set_scope(b[TABLE], 0, "shared")
    _, tx = sch.split(sch.get_loops(b[TABLE])[-1], factors=[None, threads])
    sch.bind(tx, "threadIdx.x")


def _tail_and_output_at(sch: s_tir.Schedule, b: dict, anchor, first) -> None:
    """The K-tail and the epilogue per thread, after `first` (the accumulation that owns the loops)."""
    for name in ("trit_matmul_tail", "trit_out"):
        if name in b and b[name] != first:
            sch.reverse_compute_at(b[name], anchor, preserve_unit_loops=True)
    if "trit_matmul_tail" in b:
        sch.unroll(sch.get_loops(b["trit_matmul_tail"])[-1])  # < 80 weights: constant digit positions
    for name in ("trit_matmul", "trit_matmul_tail"):
        if name in b:
            sch.set_scope(b[name], 0, "local")


def _split_row_axis(sch: s_tir.Schedule, block, axis: int, rows: int) -> None:
    """Index a per-thread buffer of a row tile by (row // rows, row % rows, ...): with a symbolic row
    count, buffer compaction cannot bound a tile that the last rows may cut short (it would allocate
    2^31 registers); split this way, the tile is `rows` long. The padding is never read."""
    ndim = len(sch.get(block).writes[0].region)

    def split(*idx):
        return (*idx[:axis], idx[axis] // rows, idx[axis] % rows, *idx[axis + 1:])
    sch.transform_layout(block, ("write", 0), tirx.IndexMap.from_func(split, ndim=ndim),
                         assume_injective_transform=True)


class TritGEMVCuda(ScheduleRule):
    """Decode (one row of x), split-K: a thread block is 32 rows (one warp wide) by `k_split` warps,
    each warp taking every k_split-th 80-weight block; the partial sums meet in a shared-memory
    reduction. More warps per row tile keep more loads in flight when `out` is small (2048 rows are
    only 64 tiles for 132 SMs). With fewer row tiles than `few_tiles` (about a datacenter GPU's SM count: A100
    108, H100 / H200 132), up to 32 warps, down to one 80-weight block each. Measured on an H200 (2026-12-04,
    benchmarks/results/gpu_check_h200_2026-12-04.jsonl): 32 warps took the 2048-row GEMVs (64 and 80 tiles)
    from 19.4 to 15.8 µs and down_proj (64 tiles) from 40.5 to 33.6, and gate_up (688 tiles) from 38.3 to 76.6."""

    def __init__(self, max_k_split: int = 16, min_blocks: int = 4, few_tiles: int = 128):
        self.max_k_split, self.min_blocks, self.few_tiles = max_k_split, min_blocks, few_tiles

    def k_split(self, n_blocks: int, n_tiles: int) -> int:
        """Warps per row tile: a power of two ≤ max_k_split, doubled while n_blocks ≥ min_blocks·that
        (at least min_blocks/2 80-weight blocks per warp); 32 and 1 with fewer than few_tiles row tiles."""
        max_ks, min_blocks = (WARP, 1) if n_tiles < self.few_tiles else (self.max_k_split, self.min_blocks)
        ks = 1
        while ks * 2 <= max_ks and ks * min_blocks <= n_blocks:
            ks *= 2
        return ks

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not _applies(func, target) or row_count(func) != 1:
            return None
        sch = s_tir.Schedule(func)
        b = trit_blocks(sch)
        if "trit_matmul" not in b:  # K < 80: only a tail, nothing to split
            return None
        for name in ("trit_decode", "trit_step", "trit_decode_tail"):
            if name in b:
                sch.compute_inline(b[name])
        spatial, (kb, kp) = split_loops(sch, b["trit_matmul"])
        n_blocks = int(sch.get(kb).extent)
        bx, tx = sch.split(sch.fuse(*spatial), factors=[None, WARP])
        n_tiles = int(sch.get(bx).extent)
        # interleaved: warp w takes blocks w, w + ks, ... so the warps of a tile read neighbouring bytes
        kr, ty = sch.split(kb, factors=[None, self.k_split(n_blocks, n_tiles)])
        sch.reorder(ty, kr)
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        sch.bind(ty, "threadIdx.y")
        _group_dots_at(sch, b, kr)
        sch.unroll(kp)
        _digit_table_in_shared(sch, b, bx, WARP)
        _tail_and_output_at(sch, b, tx, b["trit_matmul"])
        return sch


class TritGEMMCuda(ScheduleRule):
    """Prefill (many rows of x): one thread per output column and `rows_per_thread` rows of x, so each
    80-weight block is decoded once into registers and used for all of those rows. Correct for any
    row count: also the fallback for decode kernels the split-K rule leaves (K < 80)."""

    threads = 128
    rows_per_thread = 8

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not _applies(func, target):
            return None
        # int32 indices: with int64 ones (Relax's seq_len) buffer compaction cannot bound the register
        # tiles of a row block that the symbolic row count may cut short, and CUDA needs them constant
        func = tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({"main": func}))["main"]
        sch = s_tir.Schedule(func)
        b = trit_blocks(sch)
        for name in ("trit_step", "trit_decode_tail"):
            if name in b:
                sch.compute_inline(b[name])
        first = b.get("trit_matmul", b.get("trit_matmul_tail"))
        spatial, reduce = split_loops(sch, first)
        *batch, m, n = spatial
        if batch:  # kept apart from m: a fused (batch, seq) index would leave the register tiles' size symbolic
            sch.bind(sch.fuse(*batch), "blockIdx.z")
        by, mi = sch.split(m, factors=[None, self.rows_per_thread])
        bx, tx = sch.split(n, factors=[None, self.threads])
        sch.reorder(by, bx, tx, *reduce, mi)
        sch.bind(by, "blockIdx.y")
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        if "trit_matmul" in b:
            kb, kp = reduce
            for name in ("trit_xsum", "trit_group_dot"):
                sch.compute_at(b[name], kp, preserve_unit_loops=True)
                sch.set_scope(b[name], 0, "local")
                sch.unroll(sch.get_loops(b[name])[-1])
            sch.compute_at(b["trit_decode"], kb, preserve_unit_loops=True)  # 80 weights, once per block
            sch.set_scope(b["trit_decode"], 0, "local")
            for loop in sch.get_loops(b["trit_decode"])[-2:]:
                sch.unroll(loop)
            sch.unroll(kp)
        _digit_table_in_shared(sch, b, bx, self.threads)
        _tail_and_output_at(sch, b, tx, first)
        for name in ("trit_xsum", "trit_group_dot", "trit_matmul", "trit_matmul_tail"):
            if name in b:
                _split_row_axis(sch, b[name], len(batch), self.rows_per_thread)
        return sch
