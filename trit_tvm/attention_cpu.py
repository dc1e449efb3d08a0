"""CPU kernels for the KV cache's attention, in place of TVM's: the ragged prefill attention (the tokens of
the current prefill chunk attending to each other), the paged prefill attention (a later chunk attending to
the pages of the earlier ones) and the paged decode attention (one new token attending to the cache).

TVM's CPU version (relax/frontend/nn/llm/_prefill_kernels.py, `batch_prefill_ragged_kv`) is scalar and
serial: for every (query, key, head) it walks the head dimension one element at a time, and its scratch
buffers are shared across queries, so no schedule can spread it over the cores. At the Qwen2.5-0.5B shape
it took 7 ms per layer for a 128-token prompt, a fifth of the whole prefill. This one computes the same
outputs (`output` and the log2-domain `lse` the cache merges chunks with) per query head in parallel:
the head's keys transposed once into a [d, keys] tile, scores for 16 keys per vector, the softmax in
log2 space as TVM's kernels have it, and the weighted sum of values vectorized along the head dimension.
It handles the cache's `rotary_mode` 0 (RoPE applied before the cache, RopeMode.NORMAL, what
trit_tvm.models use) and says so if called otherwise.

TVM's CPU decode kernel (_decode_kernels.py, `batch_decode_paged_kv_cpu`) is serial over heads and scalar
along the head dimension, with an online softmax rescaling the output at every key. Ours runs (key/value head,
range of pages) tasks in parallel, scores 16 keys per vector for all the query heads that share them (GQA), then
the softmax and the weighted sum of values vectorized along the head dimension (each value read once for all
those query heads), and merges the ranges. The keys come from the pages as they are: our append kernel
(kv_append) stores each page's keys as [d, 16] tiles; with TVM's [16, d] the kernels gathered every 16-key
vector (SmolLM2 at 1000 tokens, 30 layers' caches in turn: 158 → 104 µs per layer; a decode step 10.5 → 9.1 ms
with the same logits, AMD EPYC Zen 4, 2 cores, 2026-12-03).
At 130 tokens of context (Intel Xeon, 2 cores): 62 → 21 µs per layer for SmolLM2's 9/3 heads, 90 → 24 µs for
Qwen2.5-0.5B's 14/2, one task per key/value head. The ranges (AMD EPYC Zen 4, 2 cores, 30 layers' caches in
turn, median µs per layer): SmolLM2 at 600 / 2000 tokens 128 → 102 / 434 → 312, Qwen2.5-0.5B 102 → 97 /
284 → 268; at 150 tokens within this VM's noise.
"""
from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

from . import fastmath
from .artifact import PAGE_SIZE

KERNEL_SYMBOL = "batch_prefill_ragged_kv"  # TVM's name for it; the KV cache calls it by its GlobalVar
DECODE_SYMBOL = "batch_decode_paged_kv_cpu"  # TVM's CPU decode kernel (without a sliding window)
PAGED_PREFILL_SYMBOL = "batch_prefill_paged_kv_cpu"  # TVM's CPU prefill over the paged cache (likewise)
APPEND_SYMBOL = "tir_kv_cache_transpose_append"  # TVM's kernel writing new keys and values into the pages
LANES = 16
CHAINS = 4  # independent partial sums of a query-key dot product (_softmax_weights); d % CHAINS == 0
DECODE_TASKS = 12  # decode: up to this many (key/value head, key range) tasks, so that the cores share them evenly
DECODE_RANGE_PAGES = 4  # decode: pages a key range holds at least (shorter ones cost more than they share)
AHEAD_PAGES = 1  # decode: pages ahead whose keys (values) are prefetched (SmolLM2, 1000 keys, caches from memory:
# 1 page 43 µs a layer, 2: 49, 4: 52, none: 62)


@T.macro
def _softmax_weights(query, key, scores, at, stride, tile, peak, sums, best, total, g0, heads, chains, n_keys, d,
                     ahead, ahead_lines):
    """The kernels' softmax in log2 space, for `heads` query heads that share their keys (query[u·d + c]):
    scores[at + u·stride + j] = query u · key j for the n_keys keys (16 per vector, key(tile, c, lane) = element
    c of key 16·tile + lane, loaded once for all the heads; `chains` independent sums over d per head, not one
    chain of d dependent FMAs), then scores = 2^(score - best), their sum in total[g0 + u] and the maximum in
    best[g0 + u]; the lanes past n_keys are -inf, then 0 (fastmath.exp2: libm's would be a call per key).
    tile holds heads·chains·16 floats, peak heads·16. ahead(tile, line): what to do first for each tile (a
    prefetch of one of `ahead_lines` cache lines further on)."""
    for u in T.serial(heads):
        for ji in T.vectorized(LANES):
            peak[u * LANES + ji] = T.float32(-3.0e38)
    for jo in T.serial((n_keys + LANES - 1) // LANES):
        for line in T.unroll(ahead_lines):
            T.evaluate(ahead(jo, line))
        for i in T.unroll(heads * chains):
            for ji in T.vectorized(LANES):
                tile[i * LANES + ji] = T.float32(0)
        for c in T.serial(d // chains):
            for w in T.unroll(chains):
                for u in T.unroll(heads):
                    for ji in T.vectorized(LANES):
                        tile[(u * chains + w) * LANES + ji] += \
                            query[u * d + c * chains + w] * key(jo, c * chains + w, ji)
        for u in T.unroll(heads):
            for w in T.unroll(1, chains):
                for ji in T.vectorized(LANES):
                    tile[u * chains * LANES + ji] += tile[(u * chains + w) * LANES + ji]
            for ji in T.vectorized(LANES):
                scores[at + u * stride + jo * LANES + ji] = T.if_then_else(
                    jo * LANES + ji < n_keys, tile[u * chains * LANES + ji], T.float32(-3.0e38))
                peak[u * LANES + ji] = T.max(peak[u * LANES + ji], scores[at + u * stride + jo * LANES + ji])
    for u in T.serial(heads):
        best[g0 + u] = T.float32(-3.0e38)
        for ji in T.serial(LANES):
            best[g0 + u] = T.max(best[g0 + u], peak[u * LANES + ji])
        for ji in T.vectorized(LANES):
            sums[ji] = T.float32(0)
        for jo in T.serial((n_keys + LANES - 1) // LANES):
            for ji in T.vectorized(LANES):
                scores[at + u * stride + jo * LANES + ji] = T.if_then_else(
                    jo * LANES + ji < n_keys, fastmath.exp2(scores[at + u * stride + jo * LANES + ji] - best[g0 + u]),
                    T.float32(0))
                sums[ji] += scores[at + u * stride + jo * LANES + ji]
        total[g0 + u] = T.float32(0)
        for ji in T.serial(LANES):
            total[g0 + u] += sums[ji]


def _prefetch(buf, page, kind, head, elem):
    """Prefetch (read, into all cache levels) of element `elem` of a page's keys (kind 0) or values (1) of one
    head, in a [pages, 2, heads, ...] KV-cache buffer: in a model's step the cache comes from memory (30 layers of
    SmolLM2 at 1000 tokens: 23 MB), and the pages lie scattered, beyond the hardware prefetcher's reach."""
    inner = buf.shape[4]
    return T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(buf[page, kind, head, elem // inner,
                                                                            elem % inner]),
                              T.int32(0), T.int32(3), T.int32(1))


def _page_ahead(page_values, at, j, count):
    """The page AHEAD_PAGES after the j-th of the `count` pages listed from page_values[at] (the last one at the
    end: a prefetch past it would only repeat it)."""
    return page_values[at + T.min(j + AHEAD_PAGES, count - 1)]


def ragged_prefill_attention(h_kv: int, h_q: int, d: int, dtype: str) -> tvm.tirx.PrimFunc:
    """The kernel for h_q query heads sharing h_kv key/value heads of size d (GQA), activations in dtype."""
    group = h_q // h_kv
    log2e = math.log2(math.e)

    # pylint: disable=too-many-locals
    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
                                var_kv_indptr: T.handle, var_q_rope_position: T.handle,
                                var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
                                causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32,
                                rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"global_symbol": KERNEL_SYMBOL, "tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32",  # noqa: F841
                                         elem_offset=q_rope_position_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",  # noqa: F841
                                           elem_offset=k_rope_pos_offset_elem_offset)
        output = T.match_buffer(var_output, (qo_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")

        assert rotary_mode == 0, "trit-tvm's CPU prefill attention expects RoPE applied before the KV cache"
        for b in T.serial(batch_size):
            for h in T.parallel(h_q):
                with T.sblock("attn"):
                    T.reads(q[0:qo_len, h, 0:d], k[0:kv_len, h // group, 0:d], v[0:kv_len, h // group, 0:d],
                            q_indptr[b:b + 2], kv_indptr[b:b + 2])
                    T.writes(output[0:qo_len, h, 0:d], lse[0:qo_len, h])
                    key_tiles = T.sblock_alloc_buffer(((kv_len + LANES - 1) // LANES, d, LANES), "float32")
                    scores = T.sblock_alloc_buffer(((kv_len + LANES - 1) // LANES * LANES,), "float32")
                    query = T.sblock_alloc_buffer((d,), "float32")
                    acc = T.sblock_alloc_buffer((d,), "float32")
                    tile = T.sblock_alloc_buffer((CHAINS * LANES,), "float32")
                    peak = T.sblock_alloc_buffer((LANES,), "float32")
                    sums = T.sblock_alloc_buffer((LANES,), "float32")
                    best = T.sblock_alloc_buffer((1,), "float32")
                    total = T.sblock_alloc_buffer((1,), "float32")
                    q0: T.let[T.int32] = q_indptr[b]
                    nq: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    k0: T.let[T.int32] = kv_indptr[b]
                    nk: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                    hk: T.let[T.int32] = h // group
                    # this head's keys, 16 per tile column (zeros past the last key)
                    for jo, c in T.grid((nk + LANES - 1) // LANES, d):
                        for ji in T.vectorized(LANES):
                            key_tiles[jo, c, ji] = T.if_then_else(
                                jo * LANES + ji < nk, T.Cast("float32", k[k0 + T.min(jo * LANES + ji, nk - 1), hk, c]),
                                T.float32(0))
                    for i in T.serial(nq):
                        # causal: query i of this chunk sees the keys up to its own position
                        seen: T.let[T.int32] = T.if_then_else(causal > 0, T.min(nk - nq + i + 1, nk), nk)
                        for c in T.vectorized(d):
                            query[c] = T.Cast("float32", q[q0 + i, h, c]) * (sm_scale * T.float32(log2e))
                        _softmax_weights(query, lambda jo, c, ji: key_tiles[jo, c, ji], scores, 0, 0, tile, peak,
                                         sums, best, total, 0, 1, CHAINS, seen, d,
                                         lambda jo, line: 0, 0)
                        for c in T.vectorized(d):
                            acc[c] = T.float32(0)
                        for j in T.serial(seen):
                            for c in T.vectorized(d):
                                acc[c] += scores[j] * T.Cast("float32", v[k0 + j, hk, c])
                        for c in T.vectorized(d):
                            output[q0 + i, h, c] = T.Cast(dtype, acc[c] / total[0])
                        lse[q0 + i, h] = best[0] + T.log2(total[0])

    return batch_prefill_ragged_kv


def paged_decode_attention(h_kv: int, h_q: int, d: int, dtype: str, page_size: int = PAGE_SIZE) -> tvm.tirx.PrimFunc:
    """The decode kernel (one query per sequence) for h_q query heads sharing h_kv key/value heads of size d.
    Each key/value head's pages are split into up to `splits` ranges of at least DECODE_RANGE_PAGES pages, one
    parallel task each (flash-decoding): with 3 heads on 2 cores, or 2 heads on 16, one range per head left
    cores idle. A task writes its query heads' unnormalized outputs with their softmax maximum and sum, and a
    serial pass merges the ranges of every query head. Within a task, the scores of up to 3 query heads at a time
    share each key's load (their 2 x 3 partial sums of 16 lanes fill AVX2's 16 registers with the key and the
    query), and the values are summed `chunk` elements of d at a time for the whole group, whose accumulators then
    stay in registers (all of d at once spilled them: SmolLM2's 3 x 64). In a model's step the cache comes from
    memory, on scattered pages: each page's keys are prefetched a page ahead, its values as its keys are scored
    and again a page ahead of their own pass (SmolLM2, 1000 keys, 30 layers' caches in turn: 71 -> 42 µs a layer
    with the two changes above; warm 43 -> 31)."""
    group = h_q // h_kv
    splits = -(-DECODE_TASKS // h_kv)
    tasks = h_kv * splits
    log2e = math.log2(math.e)
    heads = max(h for h in (3, 2, 1) if group % h == 0)  # query heads scored together
    chains = CHAINS if heads == 1 else 2
    chunk = next((c for c in ((16, 8) if group <= 4 else (8,)) if d % c == 0), d)  # of d, summed over the values
    line_elems = 64 * 8 // tvm.DataType(dtype).bits  # a cache line's elements
    tile_lines = max(d * page_size // line_elems, 1)  # of a page's keys (or values) of one head
    assert page_size == LANES, "a page's keys are one 16-key tile of _softmax_weights"
    assert d % CHAINS == 0

    def range_keys(max_num_pages):
        """Keys of the longest range: ceil(pages / splits) pages, or under 2·DECODE_RANGE_PAGES if fewer ranges."""
        return ((max_num_pages + splits - 1) // splits + 2 * DECODE_RANGE_PAGES) * page_size

    # pylint: disable=too-many-locals
    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(var_q: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
                              var_page_values: T.handle, var_last_page_len: T.handle,
                              var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
                              var_output: T.handle, var_lse: T.handle, rotary_mode: T.int32,
                              rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"global_symbol": DECODE_SYMBOL, "tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        last_page_len_elem_offset = T.int32()
        q = T.match_buffer(var_q, (batch_size, h_q, d), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        last_page_len = T.match_buffer(var_last_page_len, (batch_size,), "int32",
                                       elem_offset=last_page_len_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",  # noqa: F841
                                           elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (batch_size,), "int32",  # noqa: F841
                                         elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (batch_size, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (batch_size, h_q), "float32")
        key_tiles = T.decl_buffer((max_num_pages, 2, h_kv, d, page_size), dtype, data=pages.data)  # kv_append
        # each task's results: its query heads' sums of weighted values, softmax maxima and sums
        part_acc = T.alloc_buffer((tasks * group * d,), "float32")
        part_best = T.alloc_buffer((tasks * group,), "float32")
        part_total = T.alloc_buffer((tasks * group,), "float32")
        merged = T.alloc_buffer((d,), "float32")
        weight = T.alloc_buffer((1,), "float32")
        peak_all = T.alloc_buffer((1,), "float32")
        total_all = T.alloc_buffer((1,), "float32")

        assert rotary_mode == 0, "trit-tvm's CPU decode attention expects RoPE applied before the KV cache"
        for b in T.serial(batch_size):
            p0: T.let[T.int32] = page_indptr[b]
            n_pages: T.let[T.int32] = page_indptr[b + 1] - page_indptr[b]
            n: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * page_size + last_page_len[b], 0)
            # key ranges per head: as many as the pages allow, up to `splits`
            ranges: T.let[T.int32] = T.max(T.min(n_pages // DECODE_RANGE_PAGES, splits), 1)
            for t in T.parallel(h_kv * ranges):
                with T.sblock("attn"):
                    T.reads(q[b, 0:h_q, 0:d], pages[0:max_num_pages, 1, 0:h_kv, 0:page_size, 0:d],
                            key_tiles[0:max_num_pages, 0, 0:h_kv, 0:d, 0:page_size], page_values[0:nnz_pages])
                    T.writes(part_acc[t * group * d:(t + 1) * group * d], part_best[t * group:(t + 1) * group],
                             part_total[t * group:(t + 1) * group])
                    scores = T.sblock_alloc_buffer((group * range_keys(max_num_pages),), "float32")  # per query head
                    query = T.sblock_alloc_buffer((heads * d,), "float32")
                    acc = T.sblock_alloc_buffer((group * d,), "float32")
                    tile = T.sblock_alloc_buffer((heads * chains * LANES,), "float32")
                    peak = T.sblock_alloc_buffer((heads * LANES,), "float32")
                    sums = T.sblock_alloc_buffer((page_size,), "float32")
                    best = T.sblock_alloc_buffer((group,), "float32")
                    total = T.sblock_alloc_buffer((group,), "float32")
                    hk: T.let[T.int32] = t // ranges
                    first: T.let[T.int32] = t % ranges * n_pages // ranges  # this task's pages: [first, last)
                    last: T.let[T.int32] = (t % ranges + 1) * n_pages // ranges
                    n_keys: T.let[T.int32] = T.max(T.min(n, last * page_size) - first * page_size, 0)
                    for gb in T.serial(group // heads):
                        for u in T.serial(heads):
                            for c in T.vectorized(d):
                                query[u * d + c] = T.Cast("float32", q[b, hk * group + gb * heads + u, c]) \
                                    * (sm_scale * T.float32(log2e))
                        # a page's keys are one tile of the macro's 16
                        _softmax_weights(query, lambda jo, c, ji: key_tiles[page_values[p0 + first + jo], 0, hk, c, ji],
                                         scores, gb * heads * range_keys(max_num_pages), range_keys(max_num_pages),
                                         tile, peak, sums, best, total, gb * heads, heads, chains, n_keys, d,
                                         lambda jo, line: T.if_then_else(  # the next page's keys, this page's values
                                             line < tile_lines,
                                             _prefetch(key_tiles, _page_ahead(page_values, p0 + first, jo,
                                                                                last - first),
                                                       0, hk, line * line_elems),
                                             _prefetch(pages, page_values[p0 + first + jo], 1, hk,
                                                       (line - tile_lines) * line_elems)),
                                         2 * tile_lines)
                    for i in T.serial(group * d):
                        acc[i] = T.float32(0)
                    for pj in T.serial(last - first):  # each value read once for the group's query heads
                        page: T.let[T.int32] = page_values[p0 + first + pj]
                        for line in T.unroll(tile_lines):  # again: the keys since have pushed them out of L1
                            T.evaluate(_prefetch(pages, _page_ahead(page_values, p0 + first, pj, last - first), 1,
                                                 hk, line * line_elems))
                        for ch in T.serial(d // chunk):  # a page's values stay in L1 over the chunks of d
                            for ji in T.serial(T.min(page_size, n_keys - pj * page_size)):
                                for g in T.unroll(group):
                                    for c in T.vectorized(chunk):
                                        acc[g * d + ch * chunk + c] += \
                                            scores[g * range_keys(max_num_pages) + pj * page_size + ji] \
                                            * T.Cast("float32", pages[page, 1, hk, ji, ch * chunk + c])
                    for g in T.serial(group):
                        for c in T.vectorized(d):
                            part_acc[(t * group + g) * d + c] = acc[g * d + c]
                        part_best[t * group + g] = best[g]
                        part_total[t * group + g] = total[g]
            for h in T.serial(h_q):  # the ranges merged: weights 2^(range max - overall max)
                peak_all[0] = T.float32(-3.0e38)
                for sp in T.serial(ranges):
                    peak_all[0] = T.max(peak_all[0], part_best[(h // group * ranges + sp) * group + h % group])
                total_all[0] = T.float32(0)
                for c in T.vectorized(d):
                    merged[c] = T.float32(0)
                for sp in T.serial(ranges):
                    slot: T.let[T.int32] = (h // group * ranges + sp) * group + h % group  # task's result for h
                    weight[0] = fastmath.exp2(part_best[slot] - peak_all[0])
                    total_all[0] += part_total[slot] * weight[0]
                    for c in T.vectorized(d):
                        merged[c] += part_acc[slot * d + c] * weight[0]
                for c in T.vectorized(d):  # an empty sequence gives zeros, as TVM's kernel does
                    output[b, h, c] = T.Cast(dtype, merged[c] / T.max(total_all[0], T.float32(1e-30)))
                lse[b, h] = peak_all[0] + T.log2(T.max(total_all[0], T.float32(1e-30)))

    return batch_decode_paged_kv


def paged_prefill_attention(h_kv: int, h_q: int, d: int, dtype: str, page_size: int = PAGE_SIZE) -> tvm.tirx.PrimFunc:
    """The prefill kernel over the paged cache (a later prefill chunk's queries attending to the cached prefix),
    in place of TVM's `batch_prefill_paged_kv_cpu` (without a sliding window): the ragged kernel's method, query
    heads in parallel, the keys gathered from their pages. TVM's scans the cache's whole capacity for every
    query and head, scalar, with three exp2 calls per key: a 1000-token SmolLM2 prompt prefilled at 168–177
    tok/s, 0.31–0.35x transformers FP32 (AMD EPYC Zen 4, 2 cores, 2026-12-03)."""
    group = h_q // h_kv
    log2e = math.log2(math.e)
    assert page_size == LANES, "a page's keys are one 16-key tile of _softmax_weights"
    assert d % CHAINS == 0

    # pylint: disable=too-many-locals
    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv(var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle,
                               var_page_indptr: T.handle, var_page_values: T.handle, var_length_info: T.handle,
                               var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
                               var_output: T.handle, var_lse: T.handle, causal: T.int32, rotary_mode: T.int32,
                               rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"global_symbol": PAGED_PREFILL_SYMBOL, "tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        last_page_len = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",  # noqa: F841
                                           elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32",  # noqa: F841
                                         elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        key_tiles = T.decl_buffer((max_num_pages, 2, h_kv, d, page_size), dtype, data=pages.data)  # kv_append

        assert rotary_mode == 0, "trit-tvm's CPU prefill attention expects RoPE applied before the KV cache"
        for b in T.serial(batch_size):
            for h in T.parallel(h_q):
                with T.sblock("attn"):
                    T.reads(q[0:total_len, h, 0:d], pages[0:max_num_pages, 1, h // group, 0:page_size, 0:d],
                            key_tiles[0:max_num_pages, 0, h // group, 0:d, 0:page_size], q_indptr[b:b + 2],
                            page_indptr[b:b + 2], page_values[0:nnz_pages], last_page_len[b])
                    T.writes(output[0:total_len, h, 0:d], lse[0:total_len, h])
                    scores = T.sblock_alloc_buffer((max_num_pages * page_size,), "float32")
                    query = T.sblock_alloc_buffer((d,), "float32")
                    acc = T.sblock_alloc_buffer((d,), "float32")
                    tile = T.sblock_alloc_buffer((CHAINS * LANES,), "float32")
                    peak = T.sblock_alloc_buffer((LANES,), "float32")
                    sums = T.sblock_alloc_buffer((LANES,), "float32")
                    best = T.sblock_alloc_buffer((1,), "float32")
                    total = T.sblock_alloc_buffer((1,), "float32")
                    q0: T.let[T.int32] = q_indptr[b]
                    nq: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    p0: T.let[T.int32] = page_indptr[b]
                    n_pages: T.let[T.int32] = page_indptr[b + 1] - page_indptr[b]
                    nk: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * page_size + last_page_len[b], 0)
                    hk: T.let[T.int32] = h // group
                    for i in T.serial(nq):
                        # causal: query i of the chunk sees the keys up to its own position (TVM's mask)
                        seen: T.let[T.int32] = T.max(T.if_then_else(causal > 0, T.min(nk - nq + i + 1, nk), nk), 0)
                        for c in T.vectorized(d):
                            query[c] = T.Cast("float32", q[q0 + i, h, c]) * (sm_scale * T.float32(log2e))
                        _softmax_weights(query, lambda jo, c, ji: key_tiles[page_values[p0 + jo], 0, hk, c, ji], scores,
                                         0, 0, tile, peak, sums, best, total, 0, 1, CHAINS, seen, d,
                                         lambda jo, line: 0, 0)
                        for c in T.vectorized(d):
                            acc[c] = T.float32(0)
                        for j in T.serial(seen):
                            value_page: T.let[T.int32] = page_values[p0 + j // page_size]
                            for c in T.vectorized(d):
                                acc[c] += scores[j] * T.Cast("float32", pages[value_page, 1, hk, j % page_size, c])
                        for c in T.vectorized(d):  # no key seen: zeros
                            output[q0 + i, h, c] = T.Cast(dtype, acc[c] / T.max(total[0], T.float32(1e-30)))
                        lse[q0 + i, h] = best[0] + T.log2(T.max(total[0], T.float32(1e-30)))

    return batch_prefill_paged_kv


def kv_append(h_kv: int, d: int, dtype: str, page_size: int = PAGE_SIZE) -> tvm.tirx.PrimFunc:
    """The KV cache's append kernel, in place of TVM's `tir_kv_cache_transpose_append`: a page's values as TVM
    stores them ([16 tokens, d] per head), its keys as one key tile ([d, 16 tokens] per head, the same bytes
    transposed), so that the attention kernels load 16 keys' element c as one vector. TVM's layout made them
    gather every such vector from 16 rows: three quarters of SmolLM2's decode attention at 1000 tokens."""

    @T.prim_func(s_tir=True)
    def kv_cache_append(var_pages: T.handle, var_k_data: T.handle, var_v_data: T.handle,
                        var_position_map: T.handle):
        T.func_attr({"global_symbol": APPEND_SYMBOL, "tirx.is_scheduled": True, "tirx.noalias": True})
        n_tokens = T.int64()
        num_pages = T.int64()
        pages_elem_offset = T.int64()
        position_map_elem_offset = T.int32()
        pages = T.match_buffer(var_pages, (num_pages, 2, h_kv, page_size, d), dtype, elem_offset=pages_elem_offset)
        k_data = T.match_buffer(var_k_data, (n_tokens, h_kv, d), dtype)
        v_data = T.match_buffer(var_v_data, (n_tokens, h_kv, d), dtype)
        position_map = T.match_buffer(var_position_map, (n_tokens,), "int32", elem_offset=position_map_elem_offset)
        key_tiles = T.decl_buffer((num_pages, 2, h_kv, d, page_size), dtype, data=pages.data,
                                  elem_offset=pages_elem_offset)
        for s in T.serial(n_tokens):
            position: T.let[T.int32] = position_map[s]
            if position != -1:  # TVM's mark for a token not to store
                for h in T.serial(h_kv):
                    for c in T.serial(d):
                        key_tiles[position // page_size, 0, h, c, position % page_size] = k_data[s, h, c]
                    for c in T.vectorized(d):
                        pages[position // page_size, 1, h, position % page_size, c] = v_data[s, h, c]

    return kv_cache_append


ROPE_SYMBOL = "fused_rope"  # TVM's name for the KV cache's RoPE kernel (llama_rope_with_position_map)
ROPE_TYPES = (None, "default", "llama3")  # the inverse frequency depends on the dimension d only via 2d mod d_rot


def rope_kernel(h_kv: int, h_q: int, d: int, dtype: str, theta: float, rope_scaling: dict) -> tvm.tirx.PrimFunc:
    """The KV cache's split-and-rotate kernel (q/k/v out of the fused qkv, RoPE on q and k), in place of
    TVM's `llama_rope_with_position_map`, whose every element computes its own power, cosine and sine (scalar
    libm calls, a sixth of a SmolLM2 prefill here). Per token: the cosines and sines of the d/2 frequencies
    once, from the same expressions TVM's kernel uses (switch_rope_freq_func), then every head rotated with
    them, vectorized; tokens in parallel."""
    from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func
    half, fused = d // 2, h_q + 2 * h_kv
    freq_of = switch_rope_freq_func(rope_scaling)

    def cos_sin(pos, i, which: int):
        *values, var_map = freq_of(pos, i, d, theta, "float32")
        value = values[which]
        for var, bound in var_map.items():
            value = tvm.tirx.Let(var, bound, value)
        return value

    @T.prim_func(s_tir=True)
    def fused_rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle,
                   var_v: T.handle, apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int32()
        position_map_elem_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, fused, d), dtype)
        q = T.match_buffer(var_q, (seq_len, h_q, d), dtype)
        k = T.match_buffer(var_k, (seq_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (seq_len, h_kv, d), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=position_map_elem_offset)
        for s in T.parallel(seq_len):
            with T.sblock("rope"):
                T.reads(qkv[s, 0:fused, 0:d], position_map[s])
                T.writes(q[s, 0:h_q, 0:d], k[s, 0:h_kv, 0:d], v[s, 0:h_kv, 0:d])
                cos_t = T.sblock_alloc_buffer((half,), "float32")
                sin_t = T.sblock_alloc_buffer((half,), "float32")
                pos: T.let[T.float32] = T.Cast("float32", position_map[s])
                for i in T.serial(half):
                    cos_t[i] = T.if_then_else(apply_rope > 0, cos_sin(pos, i, 0), T.float32(1))
                    sin_t[i] = T.if_then_else(apply_rope > 0, cos_sin(pos, i, 1), T.float32(0))
                for h, i in T.grid(h_q, half):
                    q[s, h, i] = T.Cast(dtype, T.Cast("float32", qkv[s, h, i]) * cos_t[i]
                                        - T.Cast("float32", qkv[s, h, i + half]) * sin_t[i])
                    q[s, h, i + half] = T.Cast(dtype, T.Cast("float32", qkv[s, h, i + half]) * cos_t[i]
                                               + T.Cast("float32", qkv[s, h, i]) * sin_t[i])
                for h, i in T.grid(h_kv, half):
                    k[s, h, i] = T.Cast(dtype, T.Cast("float32", qkv[s, h_q + h, i]) * cos_t[i]
                                        - T.Cast("float32", qkv[s, h_q + h, i + half]) * sin_t[i])
                    k[s, h, i + half] = T.Cast(dtype, T.Cast("float32", qkv[s, h_q + h, i + half]) * cos_t[i]
                                               + T.Cast("float32", qkv[s, h_q + h, i]) * sin_t[i])
                for h, c in T.grid(h_kv, d):
                    v[s, h, c] = qkv[s, h_q + h_kv + h, c]

    return fused_rope


def use_cpu_attention(mod: tvm.IRModule, h_kv: int, h_q: int, d: int, dtype: str, theta: float = 10000.0,
                      rope_scaling: dict | None = None) -> tvm.IRModule:
    """A CPU build's module with TVM's ragged and paged prefill and paged decode attention and its append kernel,
    and its RoPE kernel where the rope scaling is one rope_kernel handles, replaced by ours (same GlobalVars, so
    the KV cache calls these). The append and the paged kernels share the key-tile page layout (kv_append), so
    they are replaced together; TVM's kernels that read pages otherwise (sliding window, token trees, forks) are
    not called by trit_tvm's runtime (support_sliding_window=0, one sequence, no forks)."""
    kernels = {KERNEL_SYMBOL: ragged_prefill_attention, DECODE_SYMBOL: paged_decode_attention,
               PAGED_PREFILL_SYMBOL: paged_prefill_attention,
               APPEND_SYMBOL: lambda h_kv, _h_q, d, dtype: kv_append(h_kv, d, dtype)}
    rope_scaling = dict(rope_scaling or {})
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        symbol = func.attrs.get("global_symbol") if func.attrs else None
        if symbol in kernels:
            mod[gv] = kernels[symbol](h_kv, h_q, d, dtype)
        elif symbol == ROPE_SYMBOL and rope_scaling.get("rope_type") in ROPE_TYPES:
            mod[gv] = rope_kernel(h_kv, h_q, d, dtype, theta, rope_scaling)
    return mod
