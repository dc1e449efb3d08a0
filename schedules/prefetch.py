"""Software prefetch of the weights in the CPU decode GEMV and the dense output head (a pass over scheduled
kernels).

Measured on an Intel Xeon (2 cores, 2026-12-02), Qwen2.5-0.5B's gate/up GEMV at d=3: 234 µs with its weights
in cache, 515 µs when they come from memory (as in a model, whose 240 MB of weights never stay cached),
only 12 GB/s of the 24–29 GB/s a plain streaming read gets; at d=1, with a third of the bytes, 652 µs.
The kernel spends ~400 instructions on each 1 KB block of a row panel, so out-of-order execution keeps
only a line or two in flight and the hardware prefetcher does not run far enough ahead. Prefetching the
block 16 KB ahead at the top of every block iteration: 346 µs at d=3, 279 µs at d=1.

The pass runs after the schedule rules (and after replayed tuning records, which it does not change): in
every trit decode GEMV for an llvm target it finds the loop over weight blocks (the one the accumulation
block's first reduction axis is bound to, under the parallel row-panel loops) and puts at the top of its
body one `llvm.prefetch` per cache line of the block PREFETCH_BLOCKS iterations ahead, in the codes and in
the scales. In the 16-bit output head (one vocabulary row per parallel iteration, a tighter loop with more
loads in flight) the row PREFETCH_ROWS ahead: Qwen2.5-0.5B's head 14.7 -> 12.5 ms.
"""
from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx

from .base import KERNEL_ATTR, LOGITS_KERNEL, is_trit_decode_matmul, layout_rows, row_count

PREFETCH_BLOCKS = 16  # iterations ahead; x86 (1 KB of codes per iteration) 8 KB: 350 µs, 16 KB: 346 µs, 32–64 KB:
# 351–354 µs (gate/up, d=3, above)
PREFETCH_ROWS = 8  # the dense output head: vocabulary rows ahead
LINE_BYTES = 64


WEIGHT_READERS = {"codes": "trit_group_dot", "scales": "trit_step"}  # block name prefix -> the array it reads


def _weights_read(block: s_tir.stmt.SBlock, reader: str):
    """The packed array (3-D, integer: [panels, units, rows]) a block of the operator reads, by the block's
    name (the model's kernels name their buffers after the parameters)."""
    if not block.name_hint.startswith(reader):
        return None
    return next((r.source for r in block.reads if len(r.source.shape) == 3 and "int" in str(r.source.dtype)), None)


def _find_buffers(func: tirx.PrimFunc) -> dict:
    """The codes and scales buffers, read by the operator's blocks, and the loop variable over weight blocks
    (what the accumulation block binds its first reduction axis to)."""
    found: dict = {}
    for realize in _realizes(func.body):
        block = realize.block
        if block.name_hint == "trit_matmul":
            reduce = [v for iv, v in zip(block.iter_vars, realize.iter_values)
                      if iv.iter_type == tirx.IterVar.CommReduce]
            if reduce and isinstance(reduce[0], tirx.Var):
                found.setdefault("block_loop", reduce[0])
        for name, reader in WEIGHT_READERS.items():
            buf = _weights_read(block, reader)
            if buf is not None:
                found.setdefault(name, buf)
    return found


def prefetch_call(buf: tirx.Buffer, flat: tirx.PrimExpr) -> tirx.PrimExpr:
    """Prefetch (read, into all cache levels) of buffer element `flat` in row-major order, clamped to the
    buffer's last element (also what the hand-written kernels of x86_vnni.py call)."""
    shape = [int(e) for e in buf.shape]
    rest, index = tirx.min(flat, math.prod(shape) - 1), []
    for extent in reversed(shape[1:]):
        index.append(tirx.floormod(rest, extent))
        rest = tirx.floordiv(rest, extent)
    address = tirx.address_of(tirx.BufferLoad(buf, [rest] + list(reversed(index))))
    return tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, tirx.const(0, "int32"),
                                 tirx.const(3, "int32"), tirx.const(1, "int32"))



def _lines(buf: tirx.Buffer, first: tirx.PrimExpr, elems: int) -> list[tirx.Stmt]:
    """Prefetches of the cache lines of `elems` elements of buf from element `first` on."""
    elem_bytes = tvm.DataType(buf.dtype).bits // 8
    lines = max(1, elems * elem_bytes // LINE_BYTES)
    return [tirx.Evaluate(prefetch_call(buf, first + line * (LINE_BYTES // elem_bytes))) for line in range(lines)]


def _block_prefetches(codes: tirx.Buffer, scales: tirx.Buffer, panel: tirx.PrimExpr, block: tirx.Var,
                      n_blocks: int) -> tirx.Stmt:
    """Prefetches for block iteration `block` of row panel `panel` (codes [P, Kw, R], scales [P, Gw, R])."""
    stmts = []
    for buf in (codes, scales):
        panel_elems = int(buf.shape[1]) * int(buf.shape[2])
        per_block = panel_elems // n_blocks  # elements of a panel one block iteration reads (the scales: about)
        stmts += _lines(buf, panel * panel_elems + (block + PREFETCH_BLOCKS) * per_block, per_block)
    return tirx.SeqStmt(stmts)


def _insert_at_loop(stmt, ctx: dict, make):
    """Rebuild the path from the root to the loop `make` accepts, with what it returns put at the top of the
    loop's body. make(loop, panel) -> Stmt or None, where panel fuses the loops from the outermost parallel
    one down to (not including) this one (row panels, split for the parallel tasks); None above it."""
    if isinstance(stmt, s_tir.stmt.SBlockRealize):
        b = stmt.block
        block = s_tir.stmt.SBlock(b.iter_vars, b.reads, b.writes, b.name_hint, _insert_at_loop(b.body, ctx, make),
                                  b.init, b.alloc_buffers, b.match_buffers, b.annotations)
        return s_tir.stmt.SBlockRealize(stmt.iter_values, stmt.predicate, block)
    if isinstance(stmt, tirx.SeqStmt):
        return tirx.SeqStmt([_insert_at_loop(s, ctx, make) for s in stmt.seq])
    if not isinstance(stmt, tirx.For) or ctx.get("done"):
        return stmt
    panel = ctx.get("panel")
    extra = make(stmt, panel)
    if extra is not None:
        ctx["done"] = True
        body = tirx.SeqStmt([extra, stmt.body])
    else:
        if stmt.kind == tirx.ForKind.PARALLEL or panel is not None:
            ctx["panel"] = stmt.loop_var if panel is None else panel * stmt.extent + stmt.loop_var
        body = _insert_at_loop(stmt.body, ctx, make)
        ctx["panel"] = panel
    return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding, stmt.annotations)


def _with_prefetches(func: tirx.PrimFunc, make) -> tirx.PrimFunc:
    ctx: dict = {}
    body = _insert_at_loop(func.body, ctx, make)
    return func.with_body(body) if ctx.get("done") else func


def prefetch_weights(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The scheduled GEMV with weight prefetches; unchanged when its loop nest is not the expected one."""
    found = _find_buffers(func)
    if set(found) != {"codes", "scales", "block_loop"}:
        return func

    def make(loop: tirx.For, panel):
        if panel is None or not loop.loop_var.same_as(found["block_loop"]):
            return None
        return _block_prefetches(found["codes"], found["scales"], panel, loop.loop_var, int(loop.extent))
    return _with_prefetches(func, make)


def prefetch_logits_rows(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The dense output head of one position (DenseLogitsCPU: one vocabulary row per parallel iteration):
    the row PREFETCH_ROWS ahead prefetched at the top of each."""
    weight = None
    for realize in _realizes(func.body):
        if realize.block.name_hint == "logits_rf":
            weight = next((r.source for r in realize.block.reads if len(r.source.shape) == 2), None)
    if weight is None:
        return func
    vocab, hidden = (int(e) for e in weight.shape)

    def make(loop: tirx.For, _panel):
        if loop.kind != tirx.ForKind.PARALLEL or not isinstance(loop.extent, tirx.IntImm) \
                or int(loop.extent) != vocab:  # the tiles of several positions' logits are long enough
            return None
        return tirx.SeqStmt(_lines(weight, (tirx.floormod(loop.loop_var, vocab) + PREFETCH_ROWS) * hidden, hidden))
    return _with_prefetches(func, make)


def _realizes(stmt):
    """The block realizations of a For / SeqStmt / block nest (what scheduled kernels are made of)."""
    if isinstance(stmt, tirx.For):
        yield from _realizes(stmt.body)
    elif isinstance(stmt, tirx.SeqStmt):
        for s in stmt.seq:
            yield from _realizes(s)
    elif isinstance(stmt, s_tir.stmt.SBlockRealize):
        yield stmt
        yield from _realizes(stmt.block.body)


@tvm.transform.module_pass(opt_level=0, name="PrefetchTritWeights")
def prefetch_trit_weights(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
    """prefetch_weights on every scheduled single-row trit_decode_matmul of the row-interleaved layout."""
    functions = {}
    for gv, func in mod.functions.items():
        if is_trit_decode_matmul(func) and layout_rows(func) > 0 and row_count(func) == 1:
            func = prefetch_weights(func)
        elif isinstance(func, tirx.PrimFunc) and func.attrs is not None \
                and func.attrs.get(KERNEL_ATTR) == LOGITS_KERNEL:
            func = prefetch_logits_rows(func)
        functions[gv] = func
    return tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)
