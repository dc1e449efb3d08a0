"""trit-tvm's CPU attention kernels against numpy. Ragged prefill: GQA, two sequences in one batch, causal
with more keys than queries (a later prefill chunk) and not causal. The append: keys as [d, 16] tiles per page.
Paged decode and paged prefill: GQA, sequences whose pages lie scattered in the cache (in the append's layout),
last pages partly filled. All refuse a rotary_mode they do not handle."""
import math

import numpy as np
import pytest
import tvm

from trit_tvm.attention_cpu import (PAGE_SIZE, kv_append, paged_decode_attention, paged_prefill_attention,
                                    ragged_prefill_attention)

H_Q, H_KV, D = 6, 2, 24


def _attention(q, k, v, causal, sm_scale):
    """numpy: (output, log2-domain lse) of one sequence, as the KV cache's kernels define them."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    s = np.einsum("qhd,khd->hqk", q, np.repeat(k, group, axis=1)) * sm_scale * math.log2(math.e)
    nq, nk = q.shape[0], k.shape[0]
    if causal:
        s = np.where(np.arange(nk)[None, None, :] < nk - nq + np.arange(nq)[None, :, None] + 1, s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp2(s - m)
    out = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), np.repeat(v, group, axis=1))
    return out, (m[..., 0] + np.log2(p.sum(-1))).T


@pytest.fixture(scope="module")
def kernel():
    func = ragged_prefill_attention(H_KV, H_Q, D, "float32").with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target="llvm")


@pytest.mark.parametrize("causal", [1, 0])
def test_matches_numpy(kernel, causal):
    rng = np.random.default_rng(causal)
    q_lens, kv_lens = [5, 19], [5, 23]  # the second sequence already has 4 tokens in the cache
    q = rng.standard_normal((sum(q_lens), H_Q, D)).astype(np.float32)
    k, v = (rng.standard_normal((sum(kv_lens), H_KV, D)).astype(np.float32) for _ in range(2))
    q_indptr, kv_indptr = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (q_lens, kv_lens))
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros_like(q), dev)
    lse = tvm.runtime.tensor(np.zeros((sum(q_lens), H_Q), np.float32), dev)
    args = [q, q_indptr, k, v, kv_indptr, np.zeros(sum(q_lens), np.int32), np.zeros(2, np.int32)]
    sm_scale = D ** -0.5
    kernel(*[tvm.runtime.tensor(a, dev) for a in args], out, lse, causal, 0, 1.0, 1e4, sm_scale)
    for b in range(2):
        qs, ks = slice(q_indptr[b], q_indptr[b + 1]), slice(kv_indptr[b], kv_indptr[b + 1])
        ref_out, ref_lse = _attention(q[qs], k[ks], v[ks], causal, sm_scale)
        np.testing.assert_allclose(out.numpy()[qs], ref_out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lse.numpy()[qs], ref_lse, rtol=1e-5, atol=1e-5)


def test_refuses_inline_rope(kernel):
    dev = tvm.cpu()
    z = lambda *s, dt=np.float32: tvm.runtime.tensor(np.zeros(s, dt), dev)  # noqa: E731
    with pytest.raises(Exception, match="RoPE applied before the KV cache"):
        kernel(z(2, H_Q, D), z(2, dt=np.int32), z(2, H_KV, D), z(2, H_KV, D), z(2, dt=np.int32),
               z(2, dt=np.int32), z(1, dt=np.int32), z(2, H_Q, D), z(2, H_Q), 1, 1, 1.0, 1e4, 1.0)


def _store(pages, positions, k, v):
    """numpy: tokens' keys and values [n, h_kv, d] written at cache positions (page · 16 + slot) in the pages'
    layout: per page and head, the keys as one [d, 16] tile (kv_append), the values [16, d] as TVM has them."""
    page, slot = positions // PAGE_SIZE, positions % PAGE_SIZE
    h_kv, d = k.shape[1:]
    pages.reshape(len(pages), 2, h_kv, d, PAGE_SIZE)[page, 0, :, :, slot] = k  # a view of the same memory
    pages[page, 1, :, slot, :] = v


def _paged_cache(rng, lengths, h_kv=H_KV, d=D, dtype=np.float32):
    """A cache holding sequences of `lengths` tokens on scattered pages, the other slots random: (pages,
    page_indptr, page_values, last_page_len, per-sequence (k, v) [n, h_kv, d])."""
    n_pages = [-(-n // PAGE_SIZE) for n in lengths]
    pages = rng.standard_normal((sum(n_pages) + 3, 2, h_kv, PAGE_SIZE, d)).astype(dtype)
    page_values = rng.permutation(len(pages))[:sum(n_pages)].astype(np.int32)  # scattered, some unused
    page_indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    last_page_len = np.array([n - (p - 1) * PAGE_SIZE for n, p in zip(lengths, n_pages)], np.int32)
    kv = []
    for b, n in enumerate(lengths):
        t = np.arange(n)
        positions = page_values[page_indptr[b] + t // PAGE_SIZE] * PAGE_SIZE + t % PAGE_SIZE
        k, v = (rng.standard_normal((n, h_kv, d)).astype(dtype) for _ in range(2))
        _store(pages, positions, k, v)
        kv.append([k, v])
    return pages, page_indptr, page_values, last_page_len, kv


def test_append_writes_key_tiles_and_skips_unmarked_tokens():
    """kv_append against numpy's layout: 21 tokens over scattered slots of 4 pages, two marked -1 (not stored)."""
    lib = tvm.compile(tvm.IRModule({"main": kv_append(H_KV, D, "float32").with_attr("global_symbol", "main")}),
                      target="llvm")
    rng = np.random.default_rng(5)
    pages = rng.standard_normal((4, 2, H_KV, PAGE_SIZE, D)).astype(np.float32)
    positions = rng.permutation(4 * PAGE_SIZE)[:21].astype(np.int32)
    positions[[3, 17]] = -1
    k, v = (rng.standard_normal((21, H_KV, D)).astype(np.float32) for _ in range(2))
    expected = pages.copy()
    kept = positions >= 0
    _store(expected, positions[kept], k[kept], v[kept])
    dev = tvm.cpu()
    out = tvm.runtime.tensor(pages, dev)
    lib(out, *[tvm.runtime.tensor(a, dev) for a in (k, v, positions)])
    np.testing.assert_array_equal(out.numpy(), expected)
    assert not np.array_equal(expected, pages)


@pytest.fixture(scope="module")
def decode_kernel():
    func = paged_decode_attention(H_KV, H_Q, D, "float32").with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target="llvm")


# group 3 (3 query heads scored together, d in chunks of 8), SmolLM2's 3 of 64 in 16-bit, group 7 (one head at a
# time, chunks of 8), group 8 (two at a time), group 4 with d = 20 (one chunk of all of d)
@pytest.mark.parametrize("h_q, h_kv, d, dtype", [(H_Q, H_KV, D, "float32"), (9, 3, 64, "float16"),
                                                 (14, 2, 64, "float32"), (16, 2, 40, "float16"),
                                                 (4, 1, 20, "float32")])
def test_decode_matches_numpy(decode_kernel, h_q, h_kv, d, dtype):
    lib = decode_kernel if (h_q, h_kv, d, dtype) == (H_Q, H_KV, D, "float32") else tvm.compile(
        tvm.IRModule({"main": paged_decode_attention(h_kv, h_q, d, dtype).with_attr("global_symbol", "main")}),
        target="llvm")
    rng = np.random.default_rng(3)
    # 3 pages, the last holding 5 tokens; one full page; 13 pages (ranges of several pages per task); one token
    # (most tasks' page ranges empty)
    lengths = [37, 16, 203, 1]
    pages, page_indptr, page_values, last_page_len, kv = _paged_cache(rng, lengths, h_kv, d, dtype)
    q = rng.standard_normal((len(lengths), h_q, d)).astype(dtype)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros_like(q), dev)
    lse = tvm.runtime.tensor(np.zeros((len(lengths), h_q), np.float32), dev)
    zeros = np.zeros(len(lengths), np.int32)
    args = [q, pages, page_indptr, page_values, last_page_len, zeros, zeros]
    sm_scale = d ** -0.5
    lib(*[tvm.runtime.tensor(a, dev) for a in args], out, lse, 0, 1.0, 1e4, sm_scale)
    tol = 1e-5 if dtype == "float32" else 2e-3  # the 16-bit output's rounding
    for b in range(len(lengths)):
        ref_out, ref_lse = _attention(q[b:b + 1], *kv[b], 0, sm_scale)
        np.testing.assert_allclose(out.numpy()[b:b + 1].astype(np.float64), ref_out, rtol=tol, atol=tol)
        np.testing.assert_allclose(lse.numpy()[b:b + 1], ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [1, 0])
def test_paged_prefill_matches_numpy(causal):
    """A later prefill chunk against the cached prefix: 5 queries over 37 cached keys, 16 over 203."""
    lib = tvm.compile(tvm.IRModule({"main": paged_prefill_attention(H_KV, H_Q, D, "float32")
                                    .with_attr("global_symbol", "main")}), target="llvm")
    rng = np.random.default_rng(10 + causal)
    q_lens, kv_lens = [5, 16], [37, 203]
    pages, page_indptr, page_values, last_page_len, kv = _paged_cache(rng, kv_lens)
    q = rng.standard_normal((sum(q_lens), H_Q, D)).astype(np.float32)
    q_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros_like(q), dev)
    lse = tvm.runtime.tensor(np.zeros((sum(q_lens), H_Q), np.float32), dev)
    args = [q, q_indptr, pages, page_indptr, page_values, last_page_len, np.zeros(2, np.int32),
            np.zeros(sum(q_lens), np.int32)]
    sm_scale = D ** -0.5
    lib(*[tvm.runtime.tensor(a, dev) for a in args], out, lse, causal, 0, 1.0, 1e4, sm_scale)
    for b in range(2):
        qs = slice(q_indptr[b], q_indptr[b + 1])
        ref_out, ref_lse = _attention(q[qs], *kv[b], causal, sm_scale)
        np.testing.assert_allclose(out.numpy()[qs], ref_out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lse.numpy()[qs], ref_lse, rtol=1e-5, atol=1e-5)


def test_paged_prefill_refuses_inline_rope():
    lib = tvm.compile(tvm.IRModule({"main": paged_prefill_attention(H_KV, H_Q, D, "float32")
                                    .with_attr("global_symbol", "main")}), target="llvm")
    dev = tvm.cpu()
    z = lambda *s, dt=np.float32: tvm.runtime.tensor(np.zeros(s, dt), dev)  # noqa: E731
    with pytest.raises(Exception, match="RoPE applied before the KV cache"):
        lib(z(1, H_Q, D), z(2, dt=np.int32), z(1, 2, H_KV, PAGE_SIZE, D), z(2, dt=np.int32), z(1, dt=np.int32),
            z(1, dt=np.int32), z(1, dt=np.int32), z(1, dt=np.int32), z(1, H_Q, D), z(1, H_Q), 0, 1, 1.0, 1e4, 1.0)


def test_decode_refuses_inline_rope(decode_kernel):
    dev = tvm.cpu()
    z = lambda *s, dt=np.float32: tvm.runtime.tensor(np.zeros(s, dt), dev)  # noqa: E731
    with pytest.raises(Exception, match="RoPE applied before the KV cache"):
        decode_kernel(z(1, H_Q, D), z(1, 2, H_KV, PAGE_SIZE, D), z(2, dt=np.int32), z(1, dt=np.int32),
                      z(1, dt=np.int32), z(1, dt=np.int32), z(1, dt=np.int32), z(1, H_Q, D), z(1, H_Q),
                      1, 1.0, 1e4, 1.0)


@pytest.mark.parametrize("scaling", [{}, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
@pytest.mark.parametrize("apply_rope", [1, 0])
def test_rope_kernel_matches_tvms(scaling, apply_rope):
    """Our split-and-rotate kernel gives TVM's llama_rope_with_position_map's q, k, v (positions past a
    cached prefix, default and llama3 frequencies, rope on and off)."""
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

    from trit_tvm.attention_cpu import rope_kernel
    n = 37
    ours = tvm.compile(tvm.IRModule({"main": rope_kernel(H_KV, H_Q, D, "float32", 5e5, scaling)}), target="llvm")
    theirs = tvm.compile(tvm.IRModule({"main": llama_rope_with_position_map(5e5, 1.0, D, H_Q, H_KV, "float32",
                                                                             scaling)}), target="llvm")
    rng = np.random.default_rng(apply_rope)
    qkv = rng.standard_normal((n, H_Q + 2 * H_KV, D)).astype(np.float32)
    positions = (np.arange(n) + 1000).astype(np.int32)
    results = []
    for lib in (ours, theirs):
        outs = [tvm.runtime.tensor(np.zeros((n, h, D), np.float32)) for h in (H_Q, H_KV, H_KV)]
        lib(tvm.runtime.tensor(qkv), tvm.runtime.tensor(positions), *outs, apply_rope)
        results.append([o.numpy() for o in outs])
    for mine, ref in zip(*results):
        np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=2e-5)
