"""benchmarks/profile_decode.py's sampling mode: how samples are named and grouped (perf itself is not run here)."""
from __future__ import annotations

import tvm
from tvm import te

from benchmarks.profile_decode import HOST, RUNTIME, WAITING, library_symbols, report_sampled, sampled_group


def test_library_symbols_name_the_compiled_kernels(tmp_path):
    a = te.placeholder((64,), "float32", "a")
    b = te.compute((64,), lambda i: a[i] * 2.0, name="b")
    lib = tvm.compile(tvm.IRModule({"double_it": te.create_prim_func([a, b]).with_attr("global_symbol",
                                                                                        "double_it")}), target="llvm")
    lib.export_library(tmp_path / "model.so")
    starts, names = library_symbols(tmp_path / "model.so")
    assert starts == sorted(starts)
    assert "double_it" in names  # the kernel's body, without TVM's __tvm_ffi_ prefix or _compute_ suffix


def test_samples_are_grouped_by_library_and_kernel():
    head = "trit_decode_matmul4"
    assert sampled_group("model.so", head, head) == "output head"
    assert sampled_group("model.so", "trit_decode_matmul7", head) == "linears"
    assert sampled_group("model.so", "batch_decode_paged_kv_cpu", head) == "attention"
    assert sampled_group("model.so", "rms_norm", head) == "norm, element-wise"
    assert sampled_group("[kernel.kallsyms]", "do_sched_yield", head) == WAITING
    assert sampled_group("libc.so.6", "__sched_yield", head) == WAITING
    assert sampled_group("libtvm_runtime.so", "[unknown]", head) == RUNTIME
    assert sampled_group("libpython3.11.so.1.0", "_PyEval_EvalFrameDefault", head) == HOST


def test_report_takes_shares_of_the_main_thread():
    main = {("model.so", "trit_decode_matmul7"): 50, ("model.so", "trit_decode_matmul4"): 20,
            ("[kernel.kallsyms]", "__schedule"): 10, ("model.so", "batch_decode_paged_kv_cpu"): 15,
            ("libpython3.11.so.1.0", "_PyEval_EvalFrameDefault"): 5}
    # the worker, spinning and yielding between kernels, has more samples than the main thread
    worker = {("model.so", "trit_decode_matmul7"): 60, ("[kernel.kallsyms]", "do_sched_yield"): 60}
    report = report_sampled({"plain_step_s": 0.004, "sampled_step_s": 0.005, "per_thread": [main, worker]},
                            head="trit_decode_matmul4")
    assert report["main_thread_samples"] == 100
    assert report["share"] == {"linears": 0.5, "output head": 0.2, "attention": 0.15, WAITING: 0.1, HOST: 0.05}
    assert report["outside_linears_head_and_waiting"] == 0.2
    assert report["other_threads_waiting"] == [0.5]
    assert report["ms"]["linears"] == 2.0
