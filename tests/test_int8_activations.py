"""The int8-activation form of trit_decode_matmul (x quantized to 8 bits per group of 16) against the numpy
reference that models that quantization: through the generic CPU rules on every depth and odd shapes, as the
AVX-512 VNNI integer kernels where this CPU has them, as the AVX2 ones (dot-order layouts) on any x86 CPU, as the
aarch64 `sdot` ones on the emulated device (scripts/arm_device.sh), and in a compiled model."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm

from codec import quantize_matrix
from codec.format import FACTOR_TABLE, codebook_factors, factor_tables_start
from helpers import SHAPES, STACKS, operator_inputs, stacked_operator_inputs
from schedules import TritGEMMCPU, TritGEMMVNNI, TritGEMVCPU, TritGEMVVNNI
from schedules import x86_avx2
from schedules.base import kernel_key
from schedules.x86_vnni import isa_for_target
from schedules.x86_vnni import supports as vnni_supported
from trit_tvm.operator import WeightLayout, layout_for_target, quantize_activations, reference_decode_matmul, \
    trit_decode_matmul_func
from trit_tvm.targets import parse_target

LLVM = tvm.target.Target({"kind": "llvm"})
INT8 = WeightLayout(16, int8_activations=True)
ICELAKE = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"})  # AVX-512 VNNI and VBMI
INT8_PERMUTE = WeightLayout(16, permute_steps=True, int8_activations=True)
INT8_2BIT = WeightLayout(16, permute_steps=True, int8_activations=True, two_bit_depth1=True)
INT8_DOT = WeightLayout(16, permute_steps=True, int8_activations=True, two_bit_depth1=True,
                        five_bit_depth3=True)  # what ICELAKE gets
AVX2_INT8 = WeightLayout(16, int8_activations=True, two_bit_depth1=True, byte_depth4=True,
                         five_bit_depth3=True, factored_steps=True)  # what ZEN2 gets
ZEN2 = tvm.target.Target({"kind": "llvm", "mcpu": "znver2"})  # AVX2, no AVX-512: the AVX2 integer kernels
ARM_DOTPROD = parse_target("aarch64-dotprod")  # sdot: the dot-order layouts, as on AVX2
REPO = Path(__file__).resolve().parent.parent
ARM_ROOT = Path(os.environ.get("TRIT_ARM_ROOT", Path.home() / ".cache" / "trit-arm"))
HOST = parse_target("llvm")
HOST_HAS_VNNI = vnni_supported(HOST)
HOST_HAS_AVX2 = x86_avx2.supports(HOST)


def test_quantize_activations_rounds_each_group_to_127_levels():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64)).astype(np.float32) * np.float32([[1], [1e-3], [50]])
    x[1, 16:32] = 0  # an all-zero group: scale 0, levels 0
    levels, scale = quantize_activations(x)
    assert levels.dtype == np.int8 and scale.shape == (3, 4)
    groups = levels.reshape(3, 4, 16).astype(np.int32)
    assert np.abs(groups).max(-1)[scale > 0].min() == 127 and not groups[1, 1].any() and scale[1, 1] == 0
    error = np.abs(groups * scale[..., None] - x.reshape(3, 4, 16))
    assert (error <= scale[..., None] * 0.5 + 1e-7).all()


def _repacked(layout, arrays, n_in, depth) -> list:
    """The operator's inputs with codes, scales and codebook in the run-time layout."""
    arrays = list(arrays)
    arrays[1:4] = (layout.repack_codes(arrays[1], n_in), layout.repack_scales(arrays[2], n_in, depth),
                   layout.repack_codebook(arrays[3]))
    return arrays


def _run(lib, layout, arrays, n_in, depth, rows, n_out):
    out = tvm.runtime.tensor(np.zeros((rows, n_out), np.float32), tvm.cpu())
    lib(*[tvm.runtime.tensor(a, tvm.cpu()) for a in _repacked(layout, arrays, n_in, depth)], out)
    return out.numpy()


def _assert_int8_result(got, arrays, parts=()):
    """got equals the int8-activation reference and not the float one (the quantization is not ignored)."""
    ref = reference_decode_matmul(*arrays, parts=parts, int8_activations=True)
    exact = reference_decode_matmul(*arrays, parts=parts)
    tol = 2e-6 * np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=tol)
    assert np.abs(exact - ref).max() > 20 * tol


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("n_out,n_in", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_form_through_cpu_rules_matches_reference(depth, n_out, n_in, bias):
    """The operator's int8 form, decode (TritGEMVCPU) and prefill (TritGEMMCPU, 1 and 7 rows) on a generic
    x86-64 target: float arithmetic on the quantized activations."""
    gemv = TritGEMVCPU().apply(trit_decode_matmul_func(n_out, n_in, depth, INT8, rows=1, bias=bias), LLVM, False)
    gemm = TritGEMMCPU().apply(trit_decode_matmul_func(n_out, n_in, depth, INT8, bias=bias), LLVM, False)
    for rows, sch in ((1, gemv), (1, gemm), (7, gemm)):
        arrays = operator_inputs(n_out, n_in, depth, rows, bias, seed=depth * 100 + rows + n_out)
        got = _run(tvm.compile(sch.mod["main"], target=LLVM), INT8, arrays, n_in, depth, rows, n_out)
        _assert_int8_result(got, arrays)


def test_layout_for_int8_activations_has_16_row_panels():
    assert layout_for_target(ICELAKE, int8_activations=True) == INT8_DOT  # d=1 in 2 bits, d=3 in 5, for VNNI
    assert layout_for_target(ICELAKE).rows == 32 and not layout_for_target(ICELAKE).int8_activations
    no_vnni = layout_for_target(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}), True)
    assert no_vnni.int8_activations and no_vnni.permute_steps  # d=1, d=3 and d=4: the AVX2 kernels
    assert not no_vnni.factored_steps  # its codebook parameter stays in the permutes' 32-entry windows
    assert [no_vnni.dot_bits(d) for d in (1, 2, 3, 4)] == [2, 0, 5, 8]
    avx2 = layout_for_target(ZEN2, True)
    assert avx2 == AVX2_INT8 and avx2.codebook_size(3) == 88 + 3 * 16  # 81 entries padded to 8, 3 factor tables
    assert avx2.name == "trit-rows16-words-v1+d1-2bit-v1+d3-5bit-v1+d4-bytes-v1+factored-steps-v1"
    assert layout_for_target(ZEN2) == WeightLayout(16) and layout_for_target(ICELAKE, True).dot_bits(4) == 0
    assert [layout_for_target(ICELAKE, True).dot_bits(d) for d in (1, 2, 3, 4)] == [2, 0, 5, 0]  # d=4: words
    arm = layout_for_target(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}), True)
    assert arm.rows == 8 and arm.int8_activations and not any(arm.dot_bits(d) for d in (1, 2, 3, 4))
    assert INT8_2BIT.dot_bits(1) == 2 and not INT8_2BIT.dot_bits(2)
    assert INT8_2BIT.name == "trit-rows16-words-v1+d1-2bit-v1"
    for dot_order in ("two_bit_depth1", "five_bit_depth3", "byte_depth4", "factored_steps"):
        with pytest.raises(ValueError):
            WeightLayout(32, **{dot_order: True})  # only the 16-row int8 layout has them
    with pytest.raises(ValueError):
        WeightLayout(16, permute_steps=True, int8_activations=True, factored_steps=True)


def test_vnni_rules_take_only_the_int8_form_on_vnni_cpus():
    decode = trit_decode_matmul_func(64, 96, 3, INT8_PERMUTE, rows=1)
    prefill = trit_decode_matmul_func(64, 96, 3, INT8_PERMUTE)
    assert TritGEMVVNNI().apply(decode, ICELAKE, False) is not None
    assert TritGEMMVNNI().apply(prefill, ICELAKE, False) is not None
    assert TritGEMVVNNI().apply(prefill, ICELAKE, False) is None
    assert TritGEMMVNNI().apply(decode, ICELAKE, False) is None
    no_vnni = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    assert TritGEMVVNNI().apply(decode, no_vnni, False) is None
    assert TritGEMMVNNI().apply(prefill, no_vnni, False) is None
    float_form = trit_decode_matmul_func(64, 96, 3, WeightLayout(16, permute_steps=True), rows=1)
    assert TritGEMVVNNI().apply(float_form, ICELAKE, False) is None


def _vnni_libs(n_out, n_in, depth, bias=False, parts=(), layout=INT8_PERMUTE):
    """The decode and prefill VNNI kernels of one matrix, built for this CPU."""
    libs = []
    for rule, rows in ((TritGEMVVNNI(), 1), (TritGEMMVNNI(), None)):
        func = trit_decode_matmul_func(n_out, n_in, depth, layout, rows=rows, bias=bias, parts=parts)
        libs.append(tvm.compile(rule.apply(func, HOST, False).mod["main"], target=HOST))
    assert all("vpdpbusd" in lib.mod.inspect_source("asm") for lib in libs)
    return libs


@pytest.mark.parametrize("depth,layout", [(1, INT8_2BIT), (3, INT8_PERMUTE), (3, INT8_DOT)])
def test_vnni_kernels_build_everywhere(depth, layout):
    """The VNNI kernels compile for an AVX-512 VNNI target on any host (the runs below need such a CPU)."""
    for rule, rows in ((TritGEMVVNNI(), 1), (TritGEMMVNNI(), None)):
        func = trit_decode_matmul_func(37, 16 * 13, depth, layout, rows=rows, parts=(21, 16))
        asm = tvm.compile(rule.apply(func, ICELAKE, False).mod["main"], target=ICELAKE).mod.inspect_source("asm")
        assert "vpdpbusd" in asm and "zmm" in asm


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI / VBMI")
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("n_out,n_in", SHAPES + [(300, 16 * 61)])
@pytest.mark.parametrize("bias", [False, True])
def test_vnni_kernels_match_reference(depth, n_out, n_in, bias):
    """Integer dot products (vpdpbusd) on odd shapes: N not a multiple of the 16-row panel, K not a multiple
    of the word block (the layout pads it), one group, K long enough for the weight prefetches; the prefill
    kernel on 1, 7 and 13 rows (not a multiple of its row tile)."""
    gemv, gemm = _vnni_libs(n_out, n_in, depth, bias)
    for lib, rows in ((gemv, 1), (gemm, 1), (gemm, 7), (gemm, 13)):
        arrays = operator_inputs(n_out, n_in, depth, rows, bias, seed=depth * 100 + n_out + rows)
        _assert_int8_result(_run(lib, INT8_PERMUTE, arrays, n_in, depth, rows, n_out), arrays)


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI / VBMI")
@pytest.mark.parametrize("parts", STACKS)
def test_vnni_kernels_read_each_stacked_matrix_codebook(parts):
    n_out, n_in = sum(parts), 16 * 13
    for lib, rows in zip(_vnni_libs(n_out, n_in, 3, parts=parts), (1, 7)):
        x, codes, scales, codebook = stacked_operator_inputs(parts, n_in, 3, rows, seed=len(parts) + rows)
        got = _run(lib, INT8_PERMUTE, [x, codes, scales, codebook], n_in, 3, rows, n_out)
        _assert_int8_result(got, [x, codes, scales, codebook], parts)


def test_two_bit_layout_is_the_vnni_kernels_alone():
    """Depth-1 matrices in the 2-bit layout: only the VNNI rules take them (the float rules read words), whatever
    variant a tuning record names; other depths keep the words layout and its rules; the tuning key differs."""
    from schedules.base import kernel_key
    decode = trit_decode_matmul_func(64, 96, 1, INT8_2BIT, rows=1)
    prefill = trit_decode_matmul_func(64, 96, 1, INT8_2BIT)
    assert TritGEMVCPU().apply(decode, ICELAKE, False) is None and TritGEMMCPU().apply(prefill, ICELAKE, False) is None
    as_float = {kernel_key(decode): {"variant": "float"}}
    assert TritGEMVVNNI(as_float).apply(decode, ICELAKE, False) is not None
    assert kernel_key(decode) == "gemv d1 96->64 int8 2bit"
    words = trit_decode_matmul_func(64, 96, 1, INT8_PERMUTE, rows=1)
    assert kernel_key(words) == "gemv d1 96->64 int8" and TritGEMVVNNI({kernel_key(words): {"variant": "float"}}
                                                                        ).apply(words, ICELAKE, False) is None
    d2 = trit_decode_matmul_func(64, 96, 2, INT8_2BIT, rows=1)
    assert TritGEMVCPU().apply(d2, ICELAKE, False) is not None


@pytest.mark.parametrize("depth,bits", [(1, 2), (3, 5), (4, 8)])
@pytest.mark.parametrize("n_out,n_in", SHAPES + [(300, 16 * 61)])
def test_dot_order_codes_decode_to_the_checkpoint_weights(n_out, n_in, depth, bits):
    """codec.format.dot_order_codes: per panel of 16 rows and group, 32·bits bytes; weight 4c+q of row t in bits
    b·(c mod f).. of byte 4t+q of plane c div f (64-byte planes, b-bit fields, f = 8/b; b = bits but 4 for 5 bits,
    whose bit 4 is bit c + 4·(i div 32) of byte i mod 32, i = 4t+q, of a last 32-byte plane); zero rows pad the
    last panel; `bits` bits per weight; scales as the words layout's."""
    arrays = operator_inputs(n_out, n_in, depth, 1, False, seed=n_out)
    codes = AVX2_INT8.repack_codes(arrays[1], n_in)
    assert codes.dtype == np.uint16 and AVX2_INT8.dot_bits(depth) == bits
    assert codes.shape == AVX2_INT8.code_shape(n_out, n_in, depth) == (-(-n_out // 16), n_in * bits // 16, 16)
    field = 4 if bits == 5 else bits
    fields, planes = 8 // field, field // 2
    group_bytes = codes.view(np.uint8).reshape(-1, n_in // 16, bits * 32)
    panel_bytes = group_bytes[:, :, :planes * 64].reshape(-1, n_in // 16, planes, 16, 4)  # [panel, g, plane, t, q]
    u = np.stack([(panel_bytes[:, :, c // fields] >> (field * (c % fields))) & ((1 << field) - 1) for c in range(4)],
                 axis=3)  # [panel, group, t, c, q]
    if bits == 5:
        high = group_bytes[:, :, 128:160]
        i = 4 * np.arange(16)[:, None] + np.arange(4)  # [t, q]
        for c in range(4):
            u[:, :, :, c] |= (((high[:, :, i % 32] >> (c + 4 * (i // 32))) & 1) << 4).astype(np.uint8)
    u = u.transpose(0, 2, 1, 3, 4).reshape(-1, n_in).astype(np.int64)
    from codec.format import unpack_matrix
    qm = unpack_matrix({"trit_codes": arrays[1], "trit_scales": arrays[2], "trit_codebook": arrays[3]}, n_in)
    np.testing.assert_array_equal(u[:n_out] - (3 ** depth - 1) // 2, qm.codes)
    assert not u[n_out:].any() and codes.nbytes == -(-n_out // 16) * 16 * n_in * bits // 8
    assert AVX2_INT8.repack_scales(arrays[2], n_in, depth).shape == AVX2_INT8.scale_shape(n_out, n_in, depth) == \
        (-(-n_out // 16), -(-n_in // 48), 16)


@pytest.mark.parametrize("depth", [1, 3, 4])
@pytest.mark.parametrize("n_out,n_in", [(37, 16 * 5), (7, 16)])
def test_dot_order_operator_states_the_layout(n_out, n_in, depth):
    """The operator's compute on the 2-bit, 5-bit and byte layouts, unscheduled (what a target without the rules would
    run), equals the int8 reference: the TE reads the layout it claims."""
    func = trit_decode_matmul_func(n_out, n_in, depth, AVX2_INT8, rows=3)
    arrays = operator_inputs(n_out, n_in, depth, 3, False, seed=n_out + 1)
    _assert_int8_result(_run(tvm.compile(func, target=LLVM), AVX2_INT8, arrays, n_in, depth, 3, n_out), arrays)


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI / VBMI")
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("n_out,n_in", SHAPES + [(300, 16 * 61)])
@pytest.mark.parametrize("bias", [False, True])
def test_dot_order_vnni_kernels_match_reference(n_out, n_in, bias, depth):
    """The VNNI kernels on the 2-bit (d=1) and 5-bit (d=3) layouts: odd N, one group, K long enough for the
    prefetches; the prefill kernel on 1, 7 and 13 rows."""
    gemv, gemm = _vnni_libs(n_out, n_in, depth, bias, layout=INT8_DOT)
    for lib, rows in ((gemv, 1), (gemm, 1), (gemm, 7), (gemm, 13)):
        arrays = operator_inputs(n_out, n_in, depth, rows, bias, seed=n_out + rows)
        _assert_int8_result(_run(lib, INT8_DOT, arrays, n_in, depth, rows, n_out), arrays)


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI / VBMI")
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("parts", STACKS)
def test_dot_order_vnni_kernels_read_each_stacked_matrix_codebook(parts, depth):
    n_out, n_in = sum(parts), 16 * 13
    for lib, rows in zip(_vnni_libs(n_out, n_in, depth, parts=parts, layout=INT8_DOT), (1, 7)):
        x, codes, scales, codebook = stacked_operator_inputs(parts, n_in, depth, rows, seed=len(parts) + rows)
        got = _run(lib, INT8_DOT, [x, codes, scales, codebook], n_in, depth, rows, n_out)
        _assert_int8_result(got, [x, codes, scales, codebook], parts)


def _avx2_libs(n_out, n_in, depth, bias=False, parts=()):
    """The decode and prefill kernels of a matrix as the rules give them for an AVX2-only x86 CPU."""
    layout = layout_for_target(ZEN2, True)
    libs = []
    for rule, rows in ((TritGEMVVNNI(), 1), (TritGEMMVNNI(), None)):
        func = trit_decode_matmul_func(n_out, n_in, depth, layout, rows=rows, bias=bias, parts=parts)
        libs.append(tvm.compile(rule.apply(func, ZEN2, False).mod["main"], target=ZEN2))
    for lib in libs:
        asm = lib.mod.inspect_source("asm")
        assert "vpmaddubsw" in asm and "zmm" not in asm
    return layout, libs


def test_avx2_rules_take_only_the_dot_order_layouts():
    layout = layout_for_target(ZEN2, True)
    assert TritGEMVVNNI().apply(trit_decode_matmul_func(64, 96, 1, layout, rows=1), ZEN2, False) is not None
    d4 = trit_decode_matmul_func(64, 96, 4, layout)
    assert TritGEMMVNNI().apply(d4, ZEN2, False) is not None and TritGEMMCPU().apply(d4, ZEN2, False) is None
    assert kernel_key(d4).endswith("int8 bytes")
    d3 = trit_decode_matmul_func(64, 96, 3, layout, rows=1)
    assert TritGEMVVNNI().apply(d3, ZEN2, False) is not None and TritGEMVCPU().apply(d3, ZEN2, False) is None
    assert kernel_key(d3).endswith("int8 5bit")
    assert TritGEMMVNNI().apply(trit_decode_matmul_func(64, 96, 2, layout), ZEN2, False) is None
    assert TritGEMVCPU().apply(trit_decode_matmul_func(64, 96, 2, layout, rows=1), ZEN2, False) is not None


@pytest.mark.skipif(not HOST_HAS_AVX2, reason="this CPU has no AVX2")
@pytest.mark.parametrize("depth", [1, 3, 4])
@pytest.mark.parametrize("n_out,n_in", SHAPES + [(300, 16 * 61)])
@pytest.mark.parametrize("bias", [False, True])
def test_avx2_kernels_match_reference(n_out, n_in, bias, depth):
    """vpmaddubsw / vpmaddwd dot products and vpermps step lookups on the 2-bit (d=1), 5-bit (d=3) and byte
    (d=4) layouts: odd N, one group, K long enough for the prefetches; the prefill kernel on 1, 7 and 13 rows
    (not a multiple of its row tile). At d=4 the activations' extremes (±127 against u = 80) would pass 16 bits
    if the chunks' pair sums were added before widening."""
    layout, (gemv, gemm) = _avx2_libs(n_out, n_in, depth, bias)
    for lib, rows in ((gemv, 1), (gemm, 1), (gemm, 7), (gemm, 13)):
        arrays = operator_inputs(n_out, n_in, depth, rows, bias, seed=n_out + rows + 7)
        _assert_int8_result(_run(lib, layout, arrays, n_in, depth, rows, n_out), arrays)


@pytest.mark.skipif(not HOST_HAS_AVX2, reason="this CPU has no AVX2")
@pytest.mark.parametrize("depth", [1, 3, 4])
@pytest.mark.parametrize("knobs", [{"row_tile": 1, "group_block": 2}, {"row_tile": 3, "group_block": 3},
                                   {"row_tile": 4, "group_block": 0}])
def test_avx2_prefill_over_blocks_of_groups_matches_reference(depth, knobs):
    """The prefill's passes over blocks of the tile's groups (7 groups: passes of 2 and 3 with a shorter last
    one, and all at once) and its row tiles (7 and 13 rows: not multiples of 3 or 4), each pass adding to
    the rows' partial sums."""
    n_out, n_in = 37, 16 * 7
    layout = layout_for_target(ZEN2, True)
    func = trit_decode_matmul_func(n_out, n_in, depth, layout, bias=True)
    key = kernel_key(func)
    rule = TritGEMMVNNI({key: {"variant": "vnni", "knobs": knobs}})
    lib = tvm.compile(rule.apply(func, ZEN2, False).mod["main"], target=ZEN2)
    for rows in (7, 13):
        arrays = operator_inputs(n_out, n_in, depth, rows, True, seed=depth + rows)
        _assert_int8_result(_run(lib, layout, arrays, n_in, depth, rows, n_out), arrays)


@pytest.mark.skipif(not HOST_HAS_AVX2, reason="this CPU has no AVX2")
@pytest.mark.parametrize("parts,depth", [(parts, 1) for parts in STACKS] + [((24, 40, 8), 1), ((24, 40, 8), 3),
                                                                           ((32, 48, 16), 3)])
def test_avx2_kernels_read_each_stacked_matrix_codebook(parts, depth):
    """Stacked matrices: panels within one matrix look their steps up in its 27 entries (vpermps windows at
    the panel's offset); (37, 16, 16), (40, 40) and (24, 40, 8) have panels across two matrices (per-lane
    loads)."""
    n_out, n_in = sum(parts), 16 * 13
    layout, libs = _avx2_libs(n_out, n_in, depth, parts=parts)
    for lib, rows in zip(libs, (1, 7)):
        x, codes, scales, codebook = stacked_operator_inputs(parts, n_in, depth, rows, seed=len(parts) + rows + 3)
        got = _run(lib, layout, [x, codes, scales, codebook], n_in, depth, rows, n_out)
        _assert_int8_result(got, [x, codes, scales, codebook], parts)


def test_dotprod_rules_take_only_the_dot_order_layouts():
    """aarch64 with dotprod: AVX2's layout (16-row panels, depths 1, 3 and 4 in dot order, factor tables) and the
    integer kernels for those depths; depth 2 (words) through the float rules; plain NEON keeps its float layout."""
    layout = layout_for_target(ARM_DOTPROD, True)
    assert layout == AVX2_INT8 and isa_for_target(ARM_DOTPROD, dot_order=True) == "neon-dotprod"
    assert isa_for_target(ARM_DOTPROD, dot_order=False) is None
    for depth in (1, 3, 4):
        for rule, rows in ((TritGEMVVNNI(), 1), (TritGEMMVNNI(), None)):
            assert rule.apply(trit_decode_matmul_func(64, 96, depth, layout, rows=rows), ARM_DOTPROD, False)
    assert TritGEMVVNNI().apply(trit_decode_matmul_func(64, 96, 2, layout, rows=1), ARM_DOTPROD, False) is None
    assert TritGEMVCPU().apply(trit_decode_matmul_func(64, 96, 2, layout, rows=1), ARM_DOTPROD, False) is not None
    plain = layout_for_target(parse_target("aarch64"), True)
    assert plain.rows == 8 and not any(plain.dot_bits(d) for d in (1, 2, 3, 4))
    assert layout_for_target(ARM_DOTPROD) == layout_for_target(parse_target("aarch64"))  # float activations


def _dotprod_cases() -> list[tuple]:
    """(name, depth, n_out, n_in, parts, bias, rows, knobs): decode and prefill (7 rows; on the first shape also 1
    and 13) at every dot-order depth on odd shapes, stacked matrices (panels across two of them), and prefill row
    tiles and blocks of groups other than the defaults."""
    cases = []
    for depth in (1, 3, 4):
        for i, (n_out, n_in) in enumerate(SHAPES + [(300, 16 * 61)]):
            for rows in (1, -7, -1, -13) if i == 0 else (1, -7):
                cases.append((f"d{depth}_{n_out}x{n_in}_r{rows}", depth, n_out, n_in, (), i % 2 == 1, rows, None))
    for depth, parts in ((1, (37, 16, 16)), (3, (24, 40, 8)), (4, (32, 48, 16))):
        for rows in (1, -7):
            cases.append((f"d{depth}_stack{len(parts)}_r{rows}", depth, sum(parts), 16 * 13, parts, False, rows, None))
    for depth in (1, 3, 4):
        cases.append((f"d{depth}_knobs", depth, 37, 16 * 7, (), True, -13, {"row_tile": 3, "group_block": 3}))
    return cases


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64") is None
                    or not (ARM_ROOT / "ready").exists(),
                    reason="no emulated aarch64 device (scripts/arm_device.sh prepare: qemu-user, the cross "
                           "compiler and an arm64 Python with TVM's runtime)")
def test_dotprod_kernels_match_reference_on_emulated_aarch64(tmp_path):
    """The `sdot` kernels, cross-compiled and run on the emulated aarch64 device, against the reference of the
    int8 form (rows < 0: the prefill kernel on that many rows)."""
    from tvm.support import cc
    layout, expected = layout_for_target(ARM_DOTPROD, True), {}
    for name, depth, n_out, n_in, parts, bias, rows, knobs in _dotprod_cases():
        rule = TritGEMVVNNI() if rows > 0 else TritGEMMVNNI()
        func = trit_decode_matmul_func(n_out, n_in, depth, layout, rows=1 if rows > 0 else None, bias=bias,
                                       parts=parts)
        if knobs:
            rule = TritGEMMVNNI({kernel_key(func): {"variant": "vnni", "knobs": knobs}})
        lib = tvm.compile(rule.apply(func, ARM_DOTPROD, False).mod["main"], target=ARM_DOTPROD)
        assert "sdot" in lib.mod.inspect_source("asm")
        lib.export_library(str(tmp_path / f"{name}.so"), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
        rows = abs(rows)
        if parts:
            arrays = stacked_operator_inputs(parts, n_in, depth, rows, seed=len(parts) + rows)
        else:
            arrays = operator_inputs(n_out, n_in, depth, rows, bias, seed=n_out + rows + depth)
        packed = _repacked(layout, arrays, n_in, depth)
        np.savez(tmp_path / f"{name}.npz", **{f"a{i}": a for i, a in enumerate(packed)}, out_shape=(rows, n_out))
        expected[name] = (arrays, parts)
    runner = REPO / "tests" / "device_kernels.py"
    subprocess.run(["bash", str(REPO / "scripts" / "arm_device.sh"), "python", str(runner), str(tmp_path)], check=True,
                   timeout=900)
    for name, (arrays, parts) in expected.items():
        _assert_int8_result(np.load(tmp_path / f"{name}.out.npy"), arrays, parts)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["mse", "reference"])
def test_codec_codebooks_are_exact_products(depth, mode):
    """Entry 8a + b of a codebook the codec writes is the float32 product A_a·B_b of its factor tables, bit for
    bit; a codebook that is no such product (sorted random steps) is flagged, all zeros is a product."""
    w = np.random.default_rng(depth).standard_normal((40, 96)).astype(np.float32) * 0.02
    book = quantize_matrix(w, depth, mode).codebook
    tables = codebook_factors(np.concatenate([book, np.sort(np.random.default_rng(0).uniform(0.1, 1, 27)),
                                              np.zeros(27)]).astype(np.float32))
    assert tables[:, -1].tolist() == [1, 0, 1]
    k = np.arange(27)
    inner, outer = tables[0, :FACTOR_TABLE], tables[0, FACTOR_TABLE:]
    np.testing.assert_array_equal(outer[k // FACTOR_TABLE] * inner[k % FACTOR_TABLE], book)
    assert len(np.unique(book)) == 27 and (np.diff(book) > 0).all()


@pytest.mark.skipif(not HOST_HAS_AVX2, reason="this CPU has no AVX2")
def test_avx2_decode_reads_factor_tables_where_exact():
    """Decode takes a matrix's steps from its factor tables where their `exact` entry is set (doubling B doubles
    that matrix's outputs) and from its codebook where not (a codebook that is no product: still the reference's
    result, and the doubled tables change nothing there)."""
    parts, n_in = (32, 48), 16 * 13
    layout, (gemv, _) = _avx2_libs(sum(parts), n_in, 1, parts=parts)
    x, codes, scales, codebook = stacked_operator_inputs(parts, n_in, 1, 1, seed=5)
    codebook[27:] *= (1 + 0.01 * np.sin(np.arange(27))).astype(np.float32)
    params = [x, layout.repack_codes(codes, n_in), layout.repack_scales(scales, n_in, 1),
              layout.repack_codebook(codebook)]
    tables = params[3][factor_tables_start(len(parts)):].reshape(len(parts), -1)
    assert tables[:, -1].tolist() == [1, 0]

    def run():
        out = tvm.runtime.tensor(np.zeros((1, sum(parts)), np.float32), tvm.cpu())
        gemv(*[tvm.runtime.tensor(a, tvm.cpu()) for a in params], out)
        return out.numpy()

    good = run()
    _assert_int8_result(good, [x, codes, scales, codebook], parts)
    tables[:, :FACTOR_TABLE] *= 2  # a view into params[3]
    doubled = run()
    np.testing.assert_allclose(doubled[:, :32], 2 * good[:, :32], rtol=1e-6)
    np.testing.assert_array_equal(doubled[:, 32:], good[:, 32:])


def test_int8_model_decodes_as_it_prefills_near_the_float_model(int8_artifact, llvm_artifact):
    """Decode steps (one-row kernels) give the logits of a prefill (many-row kernels) on the same quantized
    activations; against float activations the logits move, by less than a tenth of their spread (this random
    tiny model: 0.025 of 0.66; on SmolLM2 the perplexity moves by 0.01%, README)."""
    from trit_tvm.runtime import TritModel
    assert json.loads((int8_artifact / "manifest.json").read_text())["activations"] == "int8"
    int8, float_model = TritModel(int8_artifact), TritModel(llvm_artifact)
    prompt, cont = [5, 17, 42, 99, 3, 250, 7], [11, 12, 13, 14, 15]
    steps = int8.decode_logits(prompt, cont)
    for i in range(len(cont) + 1):
        np.testing.assert_allclose(steps[i], int8.prefill_logits(prompt + cont[:i]), atol=1e-4)
    for ids in (prompt, list(range(20, 61))):
        got, exact = int8.prefill_logits(ids), float_model.prefill_logits(ids)
        assert 1e-4 < np.abs(got - exact).max() < 0.1 * exact.std()


def test_depth_1_int8_model_decodes_as_it_prefills(tiny_hf, tmp_path_factory):
    """The tiny model at d=1 compiled with --int8-activations: on a VNNI CPU its linears are in the 2-bit layout
    (manifest), and decode steps give the logits of a prefill."""
    from codec.cli import quantize_main
    from trit_tvm.cli import compile_main
    from trit_tvm.runtime import TritModel
    tmp = tmp_path_factory.mktemp("d1int8")
    assert quantize_main([str(tiny_hf), str(tmp / "trit"), "--depth", "1"]) == 0
    assert compile_main([str(tmp / "trit"), "--target", "llvm", "--int8-activations", "-o", str(tmp / "art")]) == 0
    layout = json.loads((tmp / "art" / "manifest.json").read_text())["weight_layout"]
    assert layout == layout_for_target(HOST, True).name
    assert ("2bit" in layout) == (isa_for_target(HOST, dot_order=True) is not None)
    model = TritModel(tmp / "art")
    prompt, cont = [5, 17, 42, 99, 3, 250, 7], [11, 12, 13]
    steps = model.decode_logits(prompt, cont)
    for i in range(len(cont) + 1):
        np.testing.assert_allclose(steps[i], model.prefill_logits(prompt + cont[:i]), atol=1e-4)
