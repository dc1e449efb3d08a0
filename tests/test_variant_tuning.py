"""trit-tune --int8-activations: the integer kernels' variants and knobs (trit_tvm/variant_tuning.py), their
records, and trit-compile applying them."""
import json

import numpy as np
import pytest
import tvm

from helpers import operator_inputs
from schedules import TritGEMMVNNI, TritGEMVVNNI
from schedules.base import kernel_key
from schedules import x86_avx2
from schedules.x86_vnni import ISA_AVX2, VNNIKnobs, default_knobs
from schedules.x86_vnni import supports as vnni_supported
from trit_tvm.errors import CompileError
from trit_tvm.operator import WeightLayout, reference_decode_matmul, trit_decode_matmul_func
from trit_tvm.targets import parse_target
from trit_tvm.variant_tuning import VARIANTS_FILE, build_candidate, candidates, load_choices, save_choices, \
    tune_variants

HOST = parse_target("llvm")
ICELAKE = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"})  # AVX-512 VNNI and VBMI
INT8 = WeightLayout(16, permute_steps=True, int8_activations=True)
AVX2_INT8 = WeightLayout(16, int8_activations=True, two_bit_depth1=True, byte_depth4=True,
                         five_bit_depth3=True)  # what an AVX2-only x86 CPU gets
needs_vnni = pytest.mark.skipif(not vnni_supported(HOST), reason="this CPU has no AVX-512 VNNI / VBMI")


def _func(rows, n_out=64, n_in=16 * 61, depth=3):
    return trit_decode_matmul_func(n_out, n_in, depth, INT8, rows=rows)


def test_candidates_start_with_the_default_and_include_the_float_rules():
    decode, prefill = candidates(_func(1)), candidates(_func(None))
    for cands in (decode, prefill):
        assert cands[0] == {"variant": "vnni", "knobs": VNNIKnobs().as_dict()}
        assert cands[-1] == {"variant": "float"}
        assert len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)
    assert {c["knobs"]["prefetch_blocks"] for c in decode[:-1]} >= {0, 64}
    assert {c["knobs"]["row_tile"] for c in prefill[:-1]} == {4, 8, 12, 16}
    assert {c["knobs"]["group_block"] for c in prefill[:-1]} == {0, 32, 64}
    avx2 = candidates(trit_decode_matmul_func(64, 96, 4, AVX2_INT8), ISA_AVX2)  # bytes: no float variant
    assert avx2[0]["knobs"] == {"prefetch_blocks": 16, "row_tile": 1, "group_block": 64}
    assert {c["knobs"]["row_tile"] for c in avx2} == {1, 2, 4}
    two_bit = WeightLayout(16, permute_steps=True, int8_activations=True, two_bit_depth1=True)
    d1 = candidates(trit_decode_matmul_func(64, 96, 1, two_bit, rows=1))  # the float rules cannot read it
    assert d1 == decode[:-1]


def test_kernel_key_names_rows_depth_shape_and_form():
    assert kernel_key(_func(1)) == "gemv d3 976->64 int8"
    assert kernel_key(_func(None)) == "gemm d3 976->64 int8"
    stacked = trit_decode_matmul_func(96, 80, 2, INT8, rows=1, parts=(64, 16, 16))
    assert kernel_key(stacked) == "gemv d2 80->64+16+16 int8"


def test_choices_change_the_kernel():
    """The knobs reach the kernel (no prefetch at distance 0; the row tile sizes the accumulators) and the
    float variant leaves the int8 form to the float rules."""
    decode, prefill = _func(1), _func(None)

    def kernel(rule, func, choice):
        sch = rule(choices={kernel_key(func): choice}).apply(func, ICELAKE, False)
        return None if sch is None else sch.mod["main"].script()
    assert "prefetch" in kernel(TritGEMVVNNI, decode, {"variant": "vnni"})
    assert "prefetch" not in kernel(TritGEMVVNNI, decode, {"variant": "vnni", "knobs": {"prefetch_blocks": 0}})
    assert "(192,)" in kernel(TritGEMMVNNI, prefill, {"variant": "vnni", "knobs": {"row_tile": 12}})
    assert kernel(TritGEMVVNNI, decode, {"variant": "float"}) is None
    assert kernel(TritGEMMVNNI, prefill, {"variant": "float"}) is None


@needs_vnni
@pytest.mark.parametrize("choice", [{"variant": "vnni", "knobs": {"prefetch_blocks": 0, "row_tile": 5}},
                                    {"variant": "vnni", "knobs": {"prefetch_blocks": 64, "row_tile": 16}},
                                    {"variant": "float"}])
def test_every_candidate_computes_the_int8_form(choice):
    """Each choice, built as trit-tune builds it, against the int8 reference (prefill on rows that are not
    a multiple of the row tile)."""
    n_out, n_in, depth = 37, 16 * 61, 3
    for rows, shape_rows in ((1, 1), (None, 13)):
        func = trit_decode_matmul_func(n_out, n_in, depth, INT8, rows=rows)
        lib = build_candidate(func, HOST, choice)
        x, codes, scales, codebook = operator_inputs(n_out, n_in, depth, shape_rows, False, seed=shape_rows)
        args = [x, INT8.repack_codes(codes, n_in), INT8.repack_scales(scales, n_in, depth),
                INT8.repack_codebook(codebook)]
        out = tvm.runtime.tensor(np.zeros((shape_rows, n_out), np.float32), tvm.cpu())
        lib["main"](*[tvm.runtime.tensor(a, tvm.cpu()) for a in args], out)
        ref = reference_decode_matmul(x, codes, scales, codebook, int8_activations=True)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=2e-6 * np.abs(ref).max())


def _row(key, default_s, best_s, best):
    return {"key": key, "default_s": default_s, "best_s": best_s, "best": best}


def test_save_choices_keeps_only_winners_and_drops_stale_records(tmp_path):
    win = {"variant": "vnni", "knobs": {"prefetch_blocks": 4}}
    rows = save_choices([_row("gemv a", 1.2, 1.0, win), _row("gemv b", 1.02, 1.0, {"variant": "float"})], tmp_path)
    assert [r["kept"] for r in rows] == [True, False]
    assert load_choices(tmp_path) == {"gemv a": win}
    save_choices([_row("gemv a", 1.0, 1.0, win)], tmp_path)  # no longer a winner: its record goes
    assert load_choices(tmp_path) == {}
    assert load_choices(None) == {} and load_choices(tmp_path / "absent") == {}


@pytest.mark.parametrize("text", ["{", '{"gemv a": {"variant": "cuda"}}', '{"gemv a": {"variant": "vnni", '
                                  '"knobs": {"unroll": 2}}}', '{"gemv a": {"variant": "vnni", "knobs": '
                                  '{"row_tile": 0}}}', "[1]"])
def test_malformed_variants_file_is_a_one_line_error(tmp_path, text):
    (tmp_path / VARIANTS_FILE).write_text(text)
    with pytest.raises(CompileError, match=VARIANTS_FILE) as err:
        load_choices(tmp_path)
    assert "\n" not in str(err.value)


def test_tuning_int8_kernels_needs_integer_kernels():
    with pytest.raises(CompileError, match="VNNI, AVX2 or aarch64.s dotprod"):
        tune_variants({"k": _func(1)}, parse_target("aarch64"))
    zen2 = tvm.target.Target({"kind": "llvm", "mcpu": "znver2"})
    with pytest.raises(CompileError, match="no int8-activation trit kernels with an integer kernel"):
        tune_variants({"d3": _func(1)}, zen2)  # AVX2: words (depth 3) have the float rules only


@pytest.mark.skipif(not x86_avx2.supports(HOST), reason="this CPU has no AVX2")
def test_tuning_on_avx2_times_the_dot_order_kernels():
    """On an AVX2-only target the depth-1, 3 and 4 kernels are tuned (their candidates, AVX2 defaults first)
    and the words-layout ones (depth 2) left to the float rules."""
    zen2 = tvm.target.Target({"kind": "llvm", "mcpu": "znver2"})
    kernels = {"d1": trit_decode_matmul_func(64, 96, 1, AVX2_INT8, rows=1),
               "d4": trit_decode_matmul_func(37, 80, 4, AVX2_INT8),
               "d3": trit_decode_matmul_func(48, 96, 3, AVX2_INT8, rows=1),
               "d2": trit_decode_matmul_func(64, 96, 2, AVX2_INT8, rows=1)}
    rows = tune_variants(kernels, zen2, progress=lambda _: None)
    assert sorted(r["key"] for r in rows) == ["gemm d4 80->37 int8 bytes", "gemv d1 96->64 int8 2bit",
                                              "gemv d3 96->48 int8 5bit"]
    assert all(r["candidates"][0]["knobs"] == default_knobs(ISA_AVX2).as_dict() and r["best_s"] > 0 for r in rows)


@needs_vnni
def test_tune_then_compile_applies_the_choices(trit_ckpt, tmp_path):
    """tune_variants on the tiny model's int8 kernels (one decode, one prefill) times every candidate;
    trit-compile --int8-activations then applies recorded choices: the kernels they name are listed as
    tuned, and with knobs that do not change the arithmetic (prefetch distance, rows per pass) the logits
    equal the hand-written build's exactly."""
    from codec import load_trit_checkpoint
    from trit_tvm.cli import compile_main
    from trit_tvm.compile import checkpoint_depths, export_model
    from trit_tvm.models import architecture_of
    from trit_tvm.runtime import TritModel
    from trit_tvm.tuning import fused_module, logs_dir
    from trit_tvm.variant_tuning import int8_kernels
    ckpt = load_trit_checkpoint(trit_ckpt)
    kernels = int8_kernels(fused_module(export_model(*architecture_of(ckpt.config), checkpoint_depths(ckpt), HOST,
                                                     int8_activations=True).mod))
    picked = {kernel_key(f)[:4]: (k, f) for k, f in sorted(kernels.items())}
    assert set(picked) == {"gemv", "gemm"}
    rows = tune_variants(dict(picked.values()), HOST, progress=lambda _: None)
    # in the search the winner is at least as fast as the default (the re-timing of the two may order them
    # either way on a noisy machine)
    assert all(min(c["s"] for c in r["candidates"]) <= r["candidates"][0]["s"]
               and len(r["candidates"]) == len(candidates(picked[r["key"][:4]][1])) for r in rows)
    assert {r["decode"] for r in rows} == {True, False} and all(r["weight_bytes"] > 0 for r in rows)

    logs = tmp_path / "logs"
    records = logs_dir(logs, HOST)
    records.mkdir(parents=True)
    knobs = {"variant": "vnni", "knobs": {"prefetch_blocks": 0, "row_tile": 4}}
    (records / VARIANTS_FILE).write_text(json.dumps({kernel_key(f): knobs for f in kernels.values()}))
    assert compile_main([str(trit_ckpt), "--int8-activations", "-o", str(tmp_path / "tuned"),
                         "--tuning-logs", str(logs)]) == 0
    assert compile_main([str(trit_ckpt), "--int8-activations", "-o", str(tmp_path / "hand"),
                         "--no-tuning-logs"]) == 0
    manifest = json.loads((tmp_path / "tuned" / "manifest.json").read_text())
    assert len(manifest["tuned_kernels"]) >= len({kernel_key(f) for f in kernels.values()})
    prompt = [5, 17, 42, 99, 3, 250, 7]
    tuned, hand = TritModel(tmp_path / "tuned"), TritModel(tmp_path / "hand")
    np.testing.assert_array_equal(tuned.prefill_logits(prompt), hand.prefill_logits(prompt))
    np.testing.assert_array_equal(tuned.decode_logits(prompt, [11, 12])[-1], hand.decode_logits(prompt, [11, 12])[-1])
