"""A depth per q/k/v head and MLP channel (`trit-quantize --row-blocks`): the allocation meets its budget and
favours sensitive rows, the MLP's channels are reordered consistently, the row-block checkpoint compiles and runs
token-exact against transformers on its dequantized weights, and a malformed `row_blocks` field is one line."""
import json

import numpy as np
import pytest
import torch

from codec.checkpoint import load_trit_checkpoint
from codec.cli import dequantize_main, quantize_main
from codec.errors import CodecError
from codec.format import packed_bits
from codec.row_blocks import allocate_rows, runs, units_by
from codec.safetensors_io import SafetensorsFile, iter_checkpoint_files
from trit_tvm.cli import compile_main

from helpers import CALIBRATION_TEXT

LAYERS = ("model.layers.0", "model.layers.1")


def test_row_allocation_meets_the_budget_and_favours_sensitive_rows():
    """Within the budget, spent, the rows that move the loss more deeper; gate/up rows of a channel share a
    depth, by head so do a head's q rows, and a pinned matrix keeps its depth."""
    shapes = {"model.layers.0.self_attn.q_proj.weight": (32, 64), "model.layers.0.mlp.gate_proj.weight": (16, 64),
              "model.layers.0.mlp.up_proj.weight": (16, 64), "model.layers.0.mlp.down_proj.weight": (64, 16)}
    rng = np.random.default_rng(5)
    sensitivity = {n: rng.random(out) * 10 ** rng.integers(0, 3, out) for n, (out, _) in shapes.items()}
    row_errors = {n: {d: s * 3.0 ** -d for d in (1, 2, 3, 4)} for n, s in sensitivity.items()}
    row_bits = {n: {d: packed_bits(*shapes[n], d) / shapes[n][0] for d in (1, 2, 3, 4)} for n in shapes}
    total = sum(a * b for a, b in shapes.values())
    depths = allocate_rows(units_by("channels+qkv", shapes, 8), row_errors, row_bits, 4.0 * total)
    used = sum(row_bits[n][d] for n, rows in depths.items() for d in rows) / total
    assert 3.9 < used <= 4.0, used
    np.testing.assert_array_equal(depths["model.layers.0.mlp.gate_proj.weight"],
                                  depths["model.layers.0.mlp.up_proj.weight"])
    assert len(set(depths["model.layers.0.mlp.down_proj.weight"])) == 1  # o/down stay one depth
    q = "model.layers.0.self_attn.q_proj.weight"
    order = np.argsort(sensitivity[q])
    assert depths[q][order[-4:]].min() >= depths[q][order[:4]].max() and depths[q].max() > depths[q].min()
    by_head = allocate_rows(units_by("channels+heads", shapes, 8), row_errors, row_bits, 4.0 * total)
    assert all(len(set(by_head[q][h:h + 8])) == 1 for h in range(0, 32, 8)) and len(set(by_head[q])) > 1
    pinned = allocate_rows(units_by("channels+heads", shapes, 8), row_errors, row_bits, 4.0 * total, {q: 2})
    assert set(pinned[q]) == {2}  # by head, q alone mixes depths 1 and 2 here


def test_runs_cut_where_the_depth_changes():
    assert runs(np.array([2, 2, 3, 2, 2, 2])) == [(0, 2, 2), (2, 3, 3), (3, 6, 2)]
    assert runs(np.array([4])) == [(0, 1, 4)]


@pytest.fixture(scope="module")
def row_block_ckpt(tiny_hf, tmp_path_factory):
    """tiny_hf (Qwen2: q/k/v biases, GQA, head_dim 16) at 4.4 bpw with a depth per head and channel, dequantized."""
    root = tmp_path_factory.mktemp("row_blocks")
    (root / "calibration.txt").write_text(CALIBRATION_TEXT)
    assert quantize_main([str(tiny_hf), str(root / "trit"), "--calibration", str(root / "calibration.txt"),
                          "--samples", "2", "--bpw", "4.4", "--row-blocks"]) == 0
    assert dequantize_main([str(root / "trit"), str(root / "deq"), "--dtype", "float32"]) == 0
    return root


def test_row_blocks_meet_the_budget_and_reorder_the_channels_consistently(tiny_hf, row_block_ckpt):
    ckpt = load_trit_checkpoint(row_block_ckpt / "trit")
    m = ckpt.manifest
    assert m["format_version"] == 2 and m["bits_per_weight_budget"] == 4.4
    n = sum(e["shape"][0] * e["shape"][1] for e in m["quantized"].values())
    assert ckpt.packed_bytes() * 8 / n <= 4.4
    for name, blocks in ckpt.row_blocks.items():
        depths = [m["quantized"][b]["depth"] for b in blocks]
        assert len(blocks) > 1 and all(a != b for a, b in zip(depths, depths[1:])), (name, depths)
    # heads in place: a q/k/v block is whole heads; the MLP's channels in order of depth: gate/up hold one run each
    for layer in LAYERS:
        for p in "qkv":
            for b in ckpt.row_blocks.get(f"{layer}.self_attn.{p}_proj.weight", []):
                assert m["quantized"][b]["shape"][0] % 16 == 0
        gate = [m["quantized"][b]["depth"] for b in ckpt.row_blocks.get(f"{layer}.mlp.gate_proj.weight", [])]
        assert gate == sorted(gate)
    assert any(f"{layer}.mlp" in m["channel_orders"] for layer in LAYERS)
    # the dequantized MLP with its channels put back is close to the source's; not put back, it is not
    source = {name: f for f in map(SafetensorsFile, iter_checkpoint_files(tiny_hf)) for name in f.tensors}
    deq = SafetensorsFile(row_block_ckpt / "deq" / "model.safetensors")
    for prefix, order in m["channel_orders"].items():
        for name, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            w = np.asarray(source[f"{prefix}.{name}.weight"].read(f"{prefix}.{name}.weight"), np.float32)
            w_hat = np.asarray(deq.read(f"{prefix}.{name}.weight"), np.float32)
            put_back = np.take(w_hat, np.argsort(order), axis=axis)
            assert np.mean((put_back - w) ** 2) < 0.25 * np.mean((w_hat - w) ** 2), (prefix, name)


def test_row_block_checkpoint_runs_token_exact(row_block_ckpt, tmp_path):
    """Compiled (one operator per depth and layer, blocks put back in row order, then the bias) against
    transformers on the dequantized weights: the same greedy tokens and close logits."""
    from transformers import AutoModelForCausalLM

    from trit_tvm.runtime import TritModel
    m = load_trit_checkpoint(row_block_ckpt / "trit").manifest
    out_of_order = [n for n, bs in m["row_blocks"].items()
                    if len({m["quantized"][b]["depth"] for b in bs}) < len(bs)]  # a depth in two runs
    assert out_of_order, "the tiny model's allocation no longer exercises putting blocks back in order"
    assert compile_main([str(row_block_ckpt / "trit"), "-o", str(tmp_path / "art")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(row_block_ckpt / "deq", dtype=torch.float32).eval()
    model, prompt = TritModel(tmp_path / "art"), [5, 17, 42, 99, 3]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    assert model.generate(prompt, 24).tokens == ids[len(prompt):]
    np.testing.assert_allclose(model.score_logits(ids), expected, atol=2e-4, rtol=0)


def test_malformed_row_blocks_are_one_line(row_block_ckpt, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(row_block_ckpt / "trit", bad)
    m = json.loads((bad / "trit.json").read_text())
    name, blocks = next(iter(m["row_blocks"].items()))
    m["row_blocks"][name] = blocks[:1] + ["model.layers.0.no_such_block"]
    (bad / "trit.json").write_text(json.dumps(m))
    with pytest.raises(CodecError, match=f"row_blocks of '{name}': malformed"):
        load_trit_checkpoint(bad)
    m = json.loads((row_block_ckpt / "trit" / "trit.json").read_text())
    mlp = next(iter(m["channel_orders"]))
    m["channel_orders"][mlp][0] = m["channel_orders"][mlp][1]
    (bad / "trit.json").write_text(json.dumps(m))
    with pytest.raises(CodecError, match=f"channel_orders of '{mlp}': not a permutation"):
        load_trit_checkpoint(bad)


def test_row_block_measures_descend_what_is_written_and_estimate_down_proj_from_a_sample():
    """Rows are allocated by the errors of what is written: q/k/v/o/gate/up results come back descended, with their
    own errors; down_proj (quantized again when written) keeps its sweep results, its errors scaled to what the
    descent gives on a sample of rows: a total within 3% of descending all (the descent alone moves it 3-8% here)."""
    from codec.checkpoint import _row_block_results
    from codec.gptq import descend, gptq_depths, output_error_rows
    rng = np.random.default_rng(3)
    x = rng.standard_normal((512, 128)) * rng.uniform(0.2, 3.0, 128)
    h, w = x.T @ x, rng.standard_normal((96, 128)).astype(np.float32) * 0.05
    g = rng.uniform(0.5, 2.0, 96)
    swept = gptq_depths(w, h, (1, 2, 3, 4))
    results, rows = _row_block_results(w, h, g, "model.layers.0.mlp.up_proj.weight", swept)
    for d, qm in results.items():
        expected = descend(w, swept[d], h)
        np.testing.assert_array_equal(qm.codes, expected.codes)
        np.testing.assert_allclose(rows[d], output_error_rows(w, expected, h))
    results, rows = _row_block_results(w, h, g, "model.layers.0.mlp.down_proj.weight", swept)
    for d, qm in results.items():
        np.testing.assert_array_equal(qm.codes, swept[d].codes)
        full = output_error_rows(w, descend(w, swept[d], h), h) @ g
        assert abs(rows[d] @ g / full - 1) < 0.03, (d, rows[d] @ g / full)
