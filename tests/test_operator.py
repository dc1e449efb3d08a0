"""trit_decode_matmul against its numpy reference: odd shapes, every depth, bias or not, 1 and 7 rows,
unscheduled on the checkpoint layout and through every schedule rule on the row-interleaved one."""
import re

import numpy as np
import pytest
import tvm

from codec import pack_matrix, quantize_matrix
from helpers import SHAPES, STACKS, operator_inputs, stacked_operator_inputs
from schedules import TritGEMMCPU, TritGEMMCuda, TritGEMVCPU, TritGEMVCuda
from trit_tvm.operator import DECODE_INT32, DECODE_TABLE32, PLANES, WeightLayout, layout_for_target, \
    reference_decode_matmul, trit_decode_matmul_func
from trit_tvm.targets import parse_target

ROWS32 = WeightLayout(32)
CUDA_LAYOUT = WeightLayout(32, DECODE_TABLE32)
LLVM = tvm.target.Target({"kind": "llvm"})


def _prim_func(n_out, n_in, depth, bias, layout, rows=None, dtype="float32"):
    return trit_decode_matmul_func(n_out, n_in, depth, layout, rows=rows, bias=bias, dtype=dtype)


def _check(lib, dev, layout, n_out, n_in, depth, rows, bias, atol_scale=1e-5):
    arrays = operator_inputs(n_out, n_in, depth, rows, bias, seed=depth * 100 + rows + n_out)
    ref = reference_decode_matmul(*arrays)
    arrays[1:4] = (layout.repack_codes(arrays[1], n_in), layout.repack_scales(arrays[2], n_in, depth),
                   layout.repack_codebook(arrays[3]))
    out = tvm.runtime.tensor(np.zeros((rows, n_out), np.float32), dev)
    lib(*[tvm.runtime.tensor(a, dev) for a in arrays], out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=atol_scale * np.abs(ref).max())


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("n_out,n_in", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_unscheduled_checkpoint_layout_matches_reference(depth, n_out, n_in, bias):
    lib = tvm.compile(_prim_func(n_out, n_in, depth, bias, PLANES), target=LLVM)
    for rows in (1, 7):
        _check(lib, tvm.cpu(), PLANES, n_out, n_in, depth, rows, bias)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("n_out,n_in", SHAPES)
@pytest.mark.parametrize("decode", [DECODE_INT32, DECODE_TABLE32])
def test_gpu_decodes_match_reference(depth, n_out, n_in, decode):
    """The GPUs' 32-bit decodes (masked products or a digit table; float by bit pattern), unscheduled on
    the CPU: the same numbers."""
    layout = WeightLayout(32, decode)
    lib = tvm.compile(_prim_func(n_out, n_in, depth, True, layout), target=LLVM)
    for rows in (1, 7):
        _check(lib, tvm.cpu(), layout, n_out, n_in, depth, rows, True)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("n_out,n_in", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_rules_match_reference(depth, n_out, n_in, bias):
    gemv = TritGEMVCPU().apply(_prim_func(n_out, n_in, depth, bias, ROWS32, rows=1), LLVM, False)
    _check(tvm.compile(gemv.mod["main"], target=LLVM), tvm.cpu(), ROWS32, n_out, n_in, depth, 1, bias)
    gemm = TritGEMMCPU().apply(_prim_func(n_out, n_in, depth, bias, ROWS32), LLVM, False)
    lib = tvm.compile(gemm.mod["main"], target=LLVM)
    for rows in (1, 7):
        _check(lib, tvm.cpu(), ROWS32, n_out, n_in, depth, rows, bias)


@pytest.mark.parametrize("parts", STACKS)
@pytest.mark.parametrize("layout,rules", [(PLANES, (None, None)), (ROWS32, (TritGEMVCPU(), TritGEMMCPU())),
                                          (CUDA_LAYOUT, (None, None))])
def test_stacked_matrices_read_their_own_codebooks(parts, layout, rules):
    """q/k/v or gate/up stacked into one operator: every row's steps come from its own matrix's codebook
    (the matrices are scaled 1x, 2x, 3x, so a row reading a neighbour's codebook is off by 2x)."""
    n_out, n_in = sum(parts), 16 * 13
    for rows, rule in ((1, rules[0]), (7, rules[1])):
        func = trit_decode_matmul_func(n_out, n_in, 3, layout, rows=1 if rows == 1 else None, parts=parts)
        lib = tvm.compile(rule.apply(func, LLVM, False).mod["main"] if rule else func, target=LLVM)
        x, codes, scales, codebook = stacked_operator_inputs(parts, n_in, 3, rows, seed=len(parts) + rows)
        ref = reference_decode_matmul(x, codes, scales, codebook, parts=parts)
        out = tvm.runtime.tensor(np.zeros((rows, n_out), np.float32), tvm.cpu())
        inputs = (x, layout.repack_codes(codes, n_in), layout.repack_scales(scales, n_in, 3),
                  layout.repack_codebook(codebook))
        lib(*[tvm.runtime.tensor(a, tvm.cpu()) for a in inputs], out)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
PERMUTE = WeightLayout(32, permute_steps=True)
HOST_HAS_AVX512 = bool(tvm.target.codegen.target_has_features("avx512f", parse_target("llvm")))


def test_layout_for_x86_avx512_looks_steps_up_by_permutes():
    assert layout_for_target(AVX512) == PERMUTE and PERMUTE.codebook_size(3) == 96 and PERMUTE.codebook_size(1) == 32
    assert not layout_for_target(LLVM).permute_steps  # generic x86-64: no AVX-512
    assert not layout_for_target(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})).permute_steps


def test_layout_for_x86_without_avx512_has_16_row_panels():
    """One AVX2 register of 16-bit lanes (32 rows spill the GEMV's accumulators there); AVX-512 keeps 32."""
    for cpu in ("znver2", "haswell"):
        assert layout_for_target(tvm.target.Target({"kind": "llvm", "mcpu": cpu})).rows == 16
    assert layout_for_target(LLVM).rows == 16 and layout_for_target(AVX512).rows == 32


@pytest.mark.skipif(not HOST_HAS_AVX512, reason="this CPU has no AVX-512")
@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("n_out,n_in,parts",
                         [(131, 336, ()), (37, 80, ()), (69, 208, (37, 16, 16)), (80, 208, (40, 40))])
def test_avx512_permute_lookup_matches_reference(depth, n_out, n_in, parts):
    """The group steps as vpermi2ps permutes (one codebook, or stacked ones padded to 64/96 entries): the
    same numbers as the reference, for the GEMV and the GEMM rule, on odd row counts too."""
    for rows, rule in ((1, TritGEMVCPU()), (7, TritGEMMCPU())):
        func = trit_decode_matmul_func(n_out, n_in, depth, PERMUTE, rows=1 if rows == 1 else None, parts=parts)
        lib = tvm.compile(rule.apply(func, AVX512, False).mod["main"], target=AVX512)
        assert "vpermi2ps" in lib.mod.inspect_source("asm") or "vpermt2ps" in lib.mod.inspect_source("asm")
        x, codes, scales, codebook = stacked_operator_inputs(parts or (n_out,), n_in, depth, rows,
                                                             seed=n_out + rows)
        ref = reference_decode_matmul(x, codes, scales, codebook, parts=parts)
        out = tvm.runtime.tensor(np.zeros((rows, n_out), np.float32), tvm.cpu())
        lib(*[tvm.runtime.tensor(a, tvm.cpu()) for a in (x, PERMUTE.repack_codes(codes, n_in),
                                                          PERMUTE.repack_scales(scales, n_in, depth),
                                                          PERMUTE.repack_codebook(codebook))], out)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_rules_pick_their_shape_of_work():
    decode, prefill = _prim_func(64, 96, 3, False, ROWS32, rows=1), _prim_func(64, 96, 3, False, ROWS32)
    assert TritGEMVCPU().apply(decode, LLVM, False) is not None
    assert TritGEMVCPU().apply(prefill, LLVM, False) is None
    assert TritGEMMCPU().apply(prefill, LLVM, False) is not None
    assert TritGEMMCPU().apply(decode, LLVM, False) is None
    assert TritGEMVCPU().apply(_prim_func(64, 96, 3, False, PLANES, rows=1), LLVM, False) is None


def _compacted_allocations(sch) -> list[tuple[int, str]]:
    """(elements, scope) of every buffer the scheduled kernel allocates, after buffer compaction."""
    t = tvm.s_tir.transform
    mod = tvm.transform.Sequential([t.LowerInitBlock(), t.PlanAndUpdateBufferAllocationLocation(),
                                    t.ConvertBlocksToOpaque(), t.CompactBufferAllocation()])(sch.mod)
    found = re.findall(r'T\.sblock_alloc_buffer\(\(([\d, ]+)\)[^)]*?(?:scope="(\w+)")?\)', mod["main"].script())
    return [(int(np.prod([int(v) for v in shape.split(",") if v.strip()])), scope or "global")
            for shape, scope in found]


@pytest.mark.parametrize("rule,rows", [(TritGEMVCPU(), 1), (TritGEMMCPU(), None)])
def test_no_decoded_weight_matrix_is_materialized(rule, rows):
    f = _prim_func(2048, 2048, 3, True, ROWS32, rows=rows)
    assert f.attrs["trit.op"] == "decode_matmul" and int(f.attrs["trit.depth"]) == 3
    allocs = _compacted_allocations(rule.apply(f, LLVM, False))
    # decode and multiply-accumulate in one function: the GEMV decodes one block of 32 rows (d=3: 3
    # groups, 3·16·32 floats) at a time, the GEMM one 32-row panel (K·32 floats, K padded to whole blocks
    # of 48 weights: 2064); never a decoded [N, K] buffer
    padded_k = 2064
    tile = 3 * 16 * 32 if rows == 1 else padded_k * 32
    assert allocs and all(n <= tile for n, _ in allocs if n > padded_k)  # (larger than a row of x or y)


@pytest.mark.parametrize("rule,rows", [(TritGEMVCPU(), 1), (TritGEMMCPU(), None)])
def test_a_partial_last_row_panel_leaves_the_kernel_loops_unpredicated(rule, rows):
    """2000 rows (62.5 panels of 32): the kernels compute whole panels of the zero-padded layout and only the
    epilogue keeps the first 2000. A bounds check in the row loops (T.where) kept them from vectorizing: the
    GEMV and the GEMM of such a matrix (row blocks) were 5-20x slower per weight than at 2048 rows (Zen 4)."""
    script = rule.apply(_prim_func(2000, 576, 3, False, ROWS32, rows=rows), LLVM, False).mod["main"].script()
    blocks = re.findall(r'T\.sblock\("(\w+)"\)', script)
    predicated = [block for block, body in zip(blocks, re.split(r'T\.sblock\("\w+"\)', script)[1:])
                  if "T.where" in body.split("T.sblock")[0]]
    assert "trit_out" in blocks and predicated == ["trit_out"]


CUDA_SHAPES = [(131, 336), (37, 80), (7, 16), (2048, 2048)]  # tails, K = one block, K < one block, 3B o_proj


def _cuda_kernels(target, depth, dtype="float32"):
    """(rule, rows, n_out, n_in, scheduled PrimFunc): split-K GEMV for decode, the GEMM rule for any rows."""
    for n_out, n_in in CUDA_SHAPES:
        for rule, rows in ((TritGEMVCuda(), 1), (TritGEMMCuda(), None), (TritGEMMCuda(), 1)):
            func = _prim_func(n_out, n_in, depth, n_out % 2 == 1, CUDA_LAYOUT, rows=rows, dtype=dtype)
            sch = rule.apply(func, target, False)
            if sch is None:
                assert isinstance(rule, TritGEMVCuda) and n_in < 80  # no full block to split: the GEMM rule takes it
                continue
            yield rule, rows, n_out, n_in, sch.mod["main"]


def test_cuda_kernels_build_without_a_gpu():
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    built = 0
    for *_, func in _cuda_kernels(target, 3, "float16"):
        src = tvm.compile(func, target=target).mod.imports[0].inspect_source()
        assert "__global__" in src
        # per-thread arrays of constant, small size (a symbolic row count once made them 2^31 long); shared
        # memory aside (the split-K reduction's 32 x 32 partial sums)
        sizes = [int(n) for n in re.findall(r"^\s*alignas\(\d+\) \w+ \w+\[(\d+)\];", src, re.M)]
        assert sizes and max(sizes) <= 256, sizes
        built += 1
    assert built == 11


def test_cuda_gemv_splits_k_across_warps():
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    sch = TritGEMVCuda().apply(_prim_func(2048, 11008, 3, False, CUDA_LAYOUT, rows=1), target, False)
    src = tvm.compile(sch.mod["main"], target=target).mod.imports[0].inspect_source()
    assert "threadIdx.y" in src and "__shared__" in src  # warps of a row tile meet in shared memory
    # many row tiles (gate/up's 688): up to 16 warps of ≥ 2 blocks; fewer tiles than SMs: up to 32 warps
    assert TritGEMVCuda().k_split(11008 // 80, 688) == 16 and TritGEMVCuda().k_split(25, 688) == 8
    assert TritGEMVCuda().k_split(11008 // 80, 64) == 32 and TritGEMVCuda().k_split(25, 80) == 32
    assert TritGEMVCuda().k_split(3, 64) == 4  # no more warps than blocks
    assert TritGEMVCuda().apply(_prim_func(64, 96, 3, False, CUDA_LAYOUT), target, False) is None  # prefill: GEMM rule


@pytest.mark.gpu
def test_cuda_matches_numpy_reference():
    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU")
    target = tvm.target.Target.from_device(tvm.cuda(0))
    for depth in (2, 3):
        for _rule, rows, n_out, n_in, func in _cuda_kernels(target, depth):
            lib = tvm.compile(func, target=target)
            for r in ((1, 7) if rows is None else (rows,)):
                _check(lib, tvm.cuda(0), CUDA_LAYOUT, n_out, n_in, depth, r, n_out % 2 == 1, atol_scale=1e-4)


@pytest.mark.parametrize("n_out", [32, 37, 96])
def test_row_interleaved_layout_is_a_reordering(n_out):
    """The GPUs' run-time layout: the checkpoint's bytes, rows interleaved."""
    packed = np.random.default_rng(n_out).integers(0, 256, size=(n_out, 3, 41), dtype=np.uint8)
    rt = CUDA_LAYOUT.repack_codes(packed, 205)
    assert rt.shape == (-(-n_out // 32), 3, 41, 32)
    load = CUDA_LAYOUT.load(rt)
    back = np.array([[[load(n, i, b) for b in range(41)] for i in range(3)] for n in range(n_out)])
    np.testing.assert_array_equal(back, packed)
    assert rt.nbytes == packed.nbytes + (-n_out % 32) * 3 * 41  # only zero padding rows added


@pytest.mark.parametrize("depth,digits_per_word", [(1, 10), (2, 5), (3, 3), (4, 2)])
@pytest.mark.parametrize("n_in", [16 * 13, 16 * 30])
def test_word_layout_decodes_to_the_checkpoint_weights(depth, digits_per_word, n_in):
    """The CPUs' run-time layout: every weight's u = q + qmax as a base-3^d digit of a 16-bit word, m per
    word, decoded by the kernels' multiply chain (numpy here): block j of m groups, word j of a block holds
    weight j of each group, K zero-padded to whole blocks; three scale indices per word; rows interleaved."""
    from codec.format import chain_digits, unpack_matrix
    rng = np.random.default_rng(depth)
    packed = pack_matrix(quantize_matrix(rng.standard_normal((45, n_in)).astype(np.float32), depth))
    qm = unpack_matrix(packed, n_in)
    codes = ROWS32.repack_codes(packed["trit_codes"], n_in)
    scales = ROWS32.repack_scales(packed["trit_scales"], n_in, depth)
    assert ROWS32.words and ROWS32.name == "trit-rows32-words-v1" and codes.dtype == scales.dtype == np.uint16
    m, block = digits_per_word, 16 * digits_per_word
    blocks = -(-n_in // block)
    assert codes.shape == ROWS32.code_shape(45, n_in, depth) == (2, 16 * blocks, 32)
    assert scales.shape == ROWS32.scale_shape(45, n_in, depth) == (2, -(-blocks * m // 3), 32)
    words = np.moveaxis(codes, -1, 1).reshape(64, -1)[:45]
    u = chain_digits(words, 3 ** depth, m).astype(np.int64)  # [45, words, m]
    u = u.reshape(45, blocks, 16, m).swapaxes(-1, -2).reshape(45, blocks * block)
    np.testing.assert_array_equal(u[:, :n_in] - (3 ** depth - 1) // 2, qm.codes)
    assert not u[:, n_in:].any()  # the padding
    idx = chain_digits(np.moveaxis(scales, -1, 1).reshape(64, -1)[:45], 27, 3).reshape(45, -1)
    np.testing.assert_array_equal(idx[:, :n_in // 16], qm.scale_idx)
    if n_in % block == 0:  # no padding: d=2 the checkpoint's bytes, d=3 11% more, d=4 25% more
        checkpoint_bits = 8 * (packed["trit_codes"].nbytes + packed["trit_scales"].nbytes) / 45
        assert 2 * (words.shape[1] + scales.shape[1]) * 8 <= checkpoint_bits * (1.12 if depth == 3 else 1.26)


def test_word_digits_are_the_most_a_16_bit_word_decodes_exactly():
    """word_digits checks every value; one digit more would not fit 16 bits (3^(d·(m+1)) > 2^16)."""
    from codec.format import word_digits
    for depth, m in ((1, 10), (2, 5), (3, 3), (4, 2)):
        assert word_digits(3 ** depth) == m and 3 ** (depth * (m + 1)) > 1 << 16
