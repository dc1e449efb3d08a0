"""trit_decode_matmul against its numpy reference: odd shapes, every depth, bias or not, 1 and 7 rows."""
import re

import numpy as np
import pytest
import tvm
from tvm import te

from codec import pack_matrix, quantize_matrix
from schedules import rules_for_target
from trit_tvm.operator import reference_decode_matmul, trit_decode_matmul_te, trit_op_attrs


def _prim_func(n_out, n_in, depth, bias, dtype="float32"):
    x = te.placeholder((te.var("m"), n_in), dtype, "x")
    codes = te.placeholder((n_out, depth, -(-n_in // 5)), "uint8", "codes")
    scales = te.placeholder((n_out, 3, -(-(n_in // 16) // 5)), "uint8", "scales")
    codebook = te.placeholder((27,), "float32", "codebook")
    args = [x, codes, scales, codebook]
    if bias:
        args.append(te.placeholder((n_out,), dtype, "bias"))
    y = trit_decode_matmul_te(*args)
    return te.create_prim_func(args + [y]).with_attr(trit_op_attrs(n_out, n_in, depth, bias))


def _schedule(func, target):
    for rule in rules_for_target(target):
        sch = rule.apply(func, target, False)
        if sch is not None:
            return sch.mod["main"]
    raise AssertionError(f"no rule for {target}")


def _inputs(n_out, n_in, depth, rows, bias, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    packed = pack_matrix(quantize_matrix(w, depth))
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    arrays = [x, packed["trit_codes"], packed["trit_scales"], packed["trit_codebook"]]
    if bias:
        arrays.append(rng.standard_normal(n_out).astype(np.float32))
    return arrays


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("n_out,n_in", [(37, 16 * 5), (131, 16 * 21), (7, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_llvm_matches_numpy_reference(depth, n_out, n_in, bias):
    target = tvm.target.Target({"kind": "llvm"})
    lib = tvm.compile(_schedule(_prim_func(n_out, n_in, depth, bias), target), target=target)
    for rows in (1, 7):
        arrays = _inputs(n_out, n_in, depth, rows, bias, seed=depth * 100 + rows)
        dev = tvm.cpu()
        out = tvm.runtime.tensor(np.zeros((rows, n_out), np.float32), dev)
        lib(*[tvm.runtime.tensor(a, dev) for a in arrays], out)
        ref = reference_decode_matmul(*arrays)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


def test_the_operator_is_one_tagged_primfunc():
    f = _prim_func(37, 80, 3, True)
    assert f.attrs["trit.op"] == "decode_matmul" and int(f.attrs["trit.depth"]) == 3
    script = f.script()
    # decode + multiply-accumulate in one function; the only intermediate buffer is the [m, N] accumulator
    assert set(re.findall(r'T\.sblock\("(\w+)"\)', script)) - {"root"} == {"trit_matmul", "trit_out"}
    assert script.count("T.sblock_alloc_buffer(") == 1 and "T.sblock_alloc_buffer((m, 37))" in script


def test_cuda_kernel_builds_without_a_gpu():
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    lib = tvm.compile(_schedule(_prim_func(131, 336, 3, True, "float16"), target), target=target)
    src = lib.mod.imports[0].inspect_source()
    assert "__global__" in src


@pytest.mark.gpu
def test_cuda_matches_numpy_reference():
    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU")
    target = tvm.target.Target.from_device(tvm.cuda(0))
    for depth in (2, 3):
        lib = tvm.compile(_schedule(_prim_func(131, 336, depth, True), target), target=target)
        for rows in (1, 7):
            arrays = _inputs(131, 336, depth, rows, True, seed=rows)
            dev = tvm.cuda(0)
            out = tvm.runtime.tensor(np.zeros((rows, 131), np.float32), dev)
            lib(*[tvm.runtime.tensor(a, dev) for a in arrays], out)
            ref = reference_decode_matmul(*arrays)
            np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
