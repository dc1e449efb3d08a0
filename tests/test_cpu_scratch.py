"""Scratch buffers of CPU kernels on the stack (schedules/cpu_scratch.py): the rules' "local" tiles become
"global" (stack arrays) after scheduling, also in a tuned GEMV whose step lookup is tensorized; a compiled
decode GEMV then calls the runtime's workspace pool a fixed number of times, not once per row panel; the
results stay the reference's."""
import ctypes
import os

import numpy as np
import pytest
import tvm
from tvm import s_tir

from codec import pack_matrix, quantize_matrix
from schedules import TritGEMMCPU, TritGEMVCPU
from schedules.cpu_scratch import scratch_buffers_global
from trit_tvm.operator import WeightLayout, reference_decode_matmul, trit_decode_matmul_func
from trit_tvm.pipeline import schedule_pass
from trit_tvm.targets import parse_target

LLVM = tvm.target.Target({"kind": "llvm"})
AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})  # the permute lookup's instructions
HOST_HAS_AVX512 = bool(tvm.target.codegen.target_has_features("avx512f", parse_target("llvm")))
ROWS = 32


def _local_buffers(func: tvm.tirx.PrimFunc) -> int:
    return func.script().count('scope="local"')


def _args(n_out: int, n_in: int, depth: int, x_rows: int, layout: WeightLayout = WeightLayout(ROWS)):
    rng = np.random.default_rng(n_out + x_rows)
    packed = pack_matrix(quantize_matrix(rng.standard_normal((n_out, n_in)).astype(np.float32), depth))
    x = rng.standard_normal((x_rows, n_in)).astype(np.float32)
    ref = reference_decode_matmul(x, packed["trit_codes"], packed["trit_scales"], packed["trit_codebook"])
    args = [x, layout.repack_codes(packed["trit_codes"], n_in),
            layout.repack_scales(packed["trit_scales"], n_in, depth), layout.repack_codebook(packed["trit_codebook"]),
            np.zeros((x_rows, n_out), np.float32)]
    return [tvm.runtime.tensor(a, tvm.cpu()) for a in args], ref


@pytest.mark.parametrize("x_rows", [1, 7])
def test_rules_leave_no_local_buffers(x_rows):
    """Decode GEMV and prefill GEMM: the schedule rule alone makes "local" tiles, the pipeline none."""
    func = trit_decode_matmul_func(100, 16 * 9, 3, WeightLayout(ROWS), rows=x_rows)
    rule = TritGEMVCPU() if x_rows == 1 else TritGEMMCPU()
    with LLVM:
        assert _local_buffers(rule.apply(func, LLVM, False).mod["main"]) > 0
        scheduled = schedule_pass(LLVM)(tvm.IRModule({"main": func}))["main"]
    assert _local_buffers(scheduled) == 0
    args, ref = _args(100, 16 * 9, 3, x_rows)
    tvm.compile(tvm.IRModule({"main": scheduled}), target=LLVM)(*args)
    np.testing.assert_allclose(args[-1].numpy(), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_tuned_gemv_with_tensorized_lookup():
    """A GEMV scheduled as a tuning record replays it (sampled knobs, the permute lookup tensorized): its
    "local" tiles, the tensorized block's too, become global and it still computes the reference."""
    layout = WeightLayout(ROWS, permute_steps=True)
    func = trit_decode_matmul_func(100, 16 * 9, 3, layout, rows=1)
    tuned = TritGEMVCPU().schedule(s_tir.Schedule(func), tunable=True).mod["main"]
    assert "T.match_buffer" in tuned.script() and _local_buffers(tuned) > 0  # the intrinsic's buffers
    fixed = scratch_buffers_global(tuned)
    assert _local_buffers(fixed) == 0
    lib = tvm.compile(tvm.IRModule({"main": fixed}), target=AVX512)
    if not HOST_HAS_AVX512:  # running it here would die of SIGILL and take the whole test run with it
        pytest.skip("built; not run: this CPU has no AVX-512")
    args, ref = _args(100, 16 * 9, 3, 1, layout)
    lib(*args)
    np.testing.assert_allclose(args[-1].numpy(), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def _workspace_allocations(lib_path, call) -> int:
    """How many times `call` asks the runtime for workspace memory, counted by putting a counter in the
    loaded library's pointer to TVMBackendAllocWorkspace (exported by the library when a kernel calls it)."""
    lib = ctypes.CDLL(str(lib_path), mode=os.RTLD_NOLOAD)
    try:
        slot = ctypes.c_void_p.in_dll(lib, "__TVMBackendAllocWorkspace")
    except ValueError:  # the library has no such pointer: no kernel in it ever asks
        call()
        return 0
    alloc_type = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_int,
                                  ctypes.c_int)
    original = slot.value
    count = [0]

    def counting(*args):
        count[0] += 1
        return alloc_type(original)(*args)
    counter = alloc_type(counting)
    slot.value = ctypes.cast(counter, ctypes.c_void_p).value
    try:
        call()
    finally:
        slot.value = original
    return count[0]


def test_decode_gemv_allocates_per_call_not_per_panel(tmp_path):
    """640 rows = 20 panels of 32: with the rule's tiles in the workspace pool a call made 3 allocations per
    panel (measured: 60); on the stack, none."""
    n_out, n_in = 20 * ROWS, 16 * 9
    mod = tvm.IRModule({"main": trit_decode_matmul_func(n_out, n_in, 3, WeightLayout(ROWS), rows=1)})
    args, ref = _args(n_out, n_in, 3, 1)
    counts = {}
    with LLVM:
        scheduled = {"rule": TritGEMVCPU().apply(mod["main"], LLVM, False).mod, "pipeline": schedule_pass(LLVM)(mod)}
    for name, module in scheduled.items():
        path = tmp_path / f"{name}.so"
        tvm.compile(module, target=LLVM).export_library(str(path))
        kernel = tvm.runtime.load_module(str(path))
        counts[name] = _workspace_allocations(path, lambda: kernel["main"](*args))
        np.testing.assert_allclose(args[-1].numpy(), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert counts["rule"] >= n_out // ROWS
    assert counts["pipeline"] == 0
