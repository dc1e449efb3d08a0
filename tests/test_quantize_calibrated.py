"""Calibrated (GPTQ) quantization and mixed depth by sensitivity: the calibration lowers the output error it
targets, budgets are met, overrides apply, the checkpoints compile token-exact, bad input is one line."""

import numpy as np
import pytest
import torch

from codec.checkpoint import load_trit_checkpoint
from codec.cli import dequantize_main, inspect_main, quantize_main
from codec.gptq import descend, gptq_depths, gptq_matrix, loss_increase_by_depth, output_error
from codec.mixed import allocate
from codec.quantize import quantize_matrix
from trit_tvm.cli import compile_main

from helpers import CALIBRATION_TEXT



def _correlated_inputs(n_in: int, rows: int = 2048, seed: int = 0) -> np.ndarray:
    """Inputs whose features are correlated and unequal in scale, as a layer's real inputs are."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n_in, n_in)) * (rng.random(n_in) ** 3)[:, None]
    return rng.standard_normal((rows, n_in)) @ mix


@pytest.mark.parametrize("depth", [2, 3])
def test_gptq_lowers_the_output_error_it_is_given(depth):
    rng = np.random.default_rng(depth)
    w = rng.standard_normal((96, 128)) * 0.02
    x = _correlated_inputs(128)
    h = x.T @ x
    data_free = output_error(w, quantize_matrix(w.astype(np.float32), depth, "mse"), h)
    calibrated = output_error(w, gptq_matrix(w, h, depth), h)
    # and the statistics matter: the same quantizer told nothing about the inputs does worse on them
    blind = output_error(w, gptq_matrix(w, np.eye(128), depth), h)
    assert calibrated < 0.7 * data_free and calibrated < 0.7 * blind, (calibrated, data_free, blind)


def test_blocked_sweep_equals_gptq_column_by_column():
    """The sweep's lazy updates (runs of columns inside blocks of 128) and its inverse Hessian factor give the
    codes of the textbook form: columns in act-order, each one's error pushed at once onto every later column
    through the upper Cholesky factor of H⁻¹ (computed here as cholesky(inv(H))); 208 inputs cross a block."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((24, 208)) * 0.02
    x = _correlated_inputs(208, seed=7)
    h = x.T @ x
    for depth, qm in gptq_depths(w, h, (2, 3)).items():
        order = np.argsort(-np.diag(h), kind="stable")
        hd = h[np.ix_(order, order)] + 0.01 * np.mean(np.diag(h)) * np.eye(208)
        u = np.linalg.cholesky(np.linalg.inv(hd)).T
        steps = np.repeat(qm.codebook.astype(np.float64)[qm.scale_idx], 16, axis=1)[:, order]
        qmax, work, codes = (3 ** depth - 1) // 2, w[:, order].copy(), np.zeros_like(w)
        for i in range(208):
            codes[:, i] = np.clip(np.rint(work[:, i] / steps[:, i]), -qmax, qmax)
            work[:, i:] -= np.outer((work[:, i] - codes[:, i] * steps[:, i]) / u[i, i], u[i, i:])
        np.testing.assert_array_equal(qm.codes[:, order], codes)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_descent_lowers_the_output_error_gptq_leaves(depth):
    """Coordinate descent from GPTQ's sweep: a lower error on these inputs, in range, the codebook kept; told
    nothing about the inputs (H = I) it does not find that error."""
    rng = np.random.default_rng(10 + depth)
    w = rng.standard_normal((64, 96)) * 0.02
    x = _correlated_inputs(96, seed=depth)
    h = x.T @ x
    swept = gptq_depths(w, h, (depth,))[depth]
    refined = descend(w, swept, h)
    assert output_error(w, refined, h) < 0.97 * output_error(w, swept, h)
    assert output_error(w, descend(w, swept, np.eye(96)), h) > output_error(w, refined, h)
    assert np.abs(refined.codes).max() <= (3 ** depth - 1) // 2 and refined.scale_idx.max() < 27
    assert refined.codebook is swept.codebook and not np.array_equal(refined.codes, swept.codes)
    np.testing.assert_array_equal(gptq_matrix(w, h, depth).codes, refined.codes)


def test_all_depths_in_one_sweep_equal_one_sweep_per_depth():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 96)) * 0.02
    x = _correlated_inputs(96, seed=3)
    together = gptq_depths(w, x.T @ x, (1, 2, 3, 4))
    for d in (1, 2, 3, 4):
        alone = gptq_depths(w, x.T @ x, (d,))[d]
        np.testing.assert_array_equal(together[d].codes, alone.codes)
        np.testing.assert_array_equal(together[d].scale_idx, alone.scale_idx)


def test_mixed_depth_spends_bits_where_the_loss_is_sensitive():
    """Two matrices with the same weights and inputs: the one whose outputs move the loss more gets the depth."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 128)) * 0.02
    x = _correlated_inputs(128, seed=4)
    g = rng.random(64)
    errors = {"model.layers.0.mlp.down_proj.weight": loss_increase_by_depth(w, x.T @ x, g, (1, 2, 3, 4)),
              "model.layers.1.mlp.down_proj.weight": loss_increase_by_depth(w, x.T @ x, 50 * g, (1, 2, 3, 4))}
    assert all(errors[n][d] > errors[n][d + 1] for n in errors for d in (1, 2, 3))
    depth = allocate(errors, dict.fromkeys(errors, (64, 128)), 4.4, {})
    assert depth["model.layers.1.mlp.down_proj.weight"] > depth["model.layers.0.mlp.down_proj.weight"], depth


def test_allocation_meets_the_budget_and_spends_it():
    rng = np.random.default_rng(0)
    shapes, errors = {}, {}
    for i in range(120):
        name = f"model.layers.{i // 7}.mlp.m{i}.weight"
        shapes[name] = (int(rng.integers(2, 40)) * 16, int(rng.integers(2, 40)) * 16)
        scale = float(rng.random()) * shapes[name][0] * shapes[name][1]
        errors[name] = {d: scale * 3.0 ** (-2 * d) for d in (1, 2, 3, 4)}
    total = sum(a * b for a, b in shapes.values())
    from codec.format import packed_bits
    for budget in (2.5, 3.5, 4.4, 5.5):
        depth = allocate(errors, shapes, budget, {})
        used = sum(packed_bits(*shapes[n], d) for n, d in depth.items()) / total
        assert budget - 0.05 <= used <= budget, (budget, used)


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calibration.txt"
    path.write_text(CALIBRATION_TEXT)
    return path


@pytest.mark.parametrize("flags, warned", [(["--depth", "1"], True), (["--depth", "2"], False),
                                           (["--depth", "1", "--calibration", "TEXT", "--samples", "1"], False)])
def test_data_free_depth_1_warns_that_calibration_helps(tiny_hf, calib_text, tmp_path, caplog, flags, warned):
    """Data-free d=1 loses most of a model (README, Quality), calibration most of that loss back: say so where the
    choice is made."""
    flags = [str(calib_text) if f == "TEXT" else f for f in flags]
    with caplog.at_level("WARNING", logger="trit"):
        assert quantize_main([str(tiny_hf), str(tmp_path / "trit"), *flags]) == 0
    assert any("give --calibration" in r.getMessage() for r in caplog.records) == warned


def test_calibrated_checkpoint_records_its_calibration_and_runs_token_exact(tiny_hf, calib_text, tmp_path):
    from transformers import AutoModelForCausalLM

    from trit_tvm.runtime import TritModel
    out = tmp_path / "trit"
    assert quantize_main([str(tiny_hf), str(out), "--calibration", str(calib_text), "--samples", "2", "--bpw", "4.4",
                          "--tensor-depth", "*.mlp.down_proj.weight=4", "--tune-norms", "1"]) == 0
    manifest = load_trit_checkpoint(out).manifest
    assert manifest["codec_mode"] == "gptq" and manifest["calibration"]["file"] == "calibration.txt"
    assert manifest["calibration"]["norm_tuning"]["epochs"] == 1  # the tuned norms are what runs token-exact
    assert manifest["calibration"]["samples"] == 2 and manifest["bits_per_weight_budget"] == 4.4
    depths = {n: e["depth"] for n, e in manifest["quantized"].items()}
    assert all(d == 4 for n, d in depths.items() if n.endswith("down_proj.weight"))
    assert len(set(depths.values())) > 1  # mixed
    for i in range(2):  # stacked matrices share a depth
        assert len({depths[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"}) == 1
    n = sum(e["shape"][0] * e["shape"][1] for e in manifest["quantized"].values())
    assert load_trit_checkpoint(out).packed_bytes() * 8 / n <= 4.4
    assert dequantize_main([str(out), str(tmp_path / "deq"), "--dtype", "float32"]) == 0
    assert compile_main([str(out), "-o", str(tmp_path / "art")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32).eval()
    model, prompt, ids = TritModel(tmp_path / "art"), [5, 17, 42, 99, 3], [5, 17, 42, 99, 3]
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    assert model.generate(prompt, 24).tokens == ids[len(prompt):]


def test_mixed_depth_writes_the_gptq_results_it_measured(tiny_hf, calib_text, tmp_path, monkeypatch):
    """One GPTQ sweep per matrix (all depths, measured for the choice), and the matrix written at the chosen depth
    is exactly GPTQ at that depth (the sweep's result, descended): no second sweep."""
    import codec.checkpoint as checkpoint
    from codec.calibration import collect_hessians
    from codec.safetensors_io import SafetensorsFile, iter_checkpoint_files
    calib = collect_hessians(tiny_hf, calib_text, 2, output_gradients=True)
    swept = []
    sweep = checkpoint.gptq_depths
    monkeypatch.setattr(checkpoint, "gptq_depths",
                        lambda w, h, depths, name: swept.append(name) or sweep(w, h, depths, name))
    monkeypatch.setattr(checkpoint, "gptq_matrix", lambda *_: pytest.fail("a second GPTQ sweep"))
    manifest = checkpoint.write_trit_checkpoint(tiny_hf, tmp_path / "trit", calibration=calib, bpw=4.4)
    assert sorted(swept) == sorted(manifest["quantized"])
    written = load_trit_checkpoint(tmp_path / "trit")
    source = {name: f for f in map(SafetensorsFile, iter_checkpoint_files(tiny_hf)) for name in f.tensors}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        w = np.asarray(source[name].read(name), np.float32)
        expected = gptq_matrix(w, calib.hessians[name], manifest["quantized"][name]["depth"], name)
        np.testing.assert_array_equal(written.matrix(name).codes, expected.codes)
        np.testing.assert_array_equal(written.matrix(name).scale_idx, expected.scale_idx)


def _kl_from_source(source_dir, model_dir, windows) -> float:
    """Mean KL divergence (nats per token) of model_dir's next-token distributions from source_dir's."""
    from transformers import AutoModelForCausalLM
    p, q = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (source_dir, model_dir))
    with torch.no_grad():
        kl = [torch.nn.functional.kl_div(torch.log_softmax(q(torch.tensor([w])).logits[0], -1),
                                         torch.log_softmax(p(torch.tensor([w])).logits[0], -1),
                                         log_target=True, reduction="batchmean") for w in windows]
    return float(sum(kl) / len(kl))


def test_norm_tuning_brings_the_quantized_model_closer_to_the_source(tiny_hf, calib_text, tmp_path, capsys):
    """The same GPTQ codes with and without --tune-norms: only the norms change, and with them the quantized
    model's distributions move toward the source model's on the calibration text (a run that ignored the
    tuning, or wrote the source's norms, would fail)."""
    from codec.calibration import collect_hessians
    windows = collect_hessians(tiny_hf, calib_text, 2).windows
    for name, flags in (("plain", []), ("tuned", ["--tune-norms", "3"])):
        assert quantize_main([str(tiny_hf), str(tmp_path / name), "--depth", "2", "--calibration", str(calib_text),
                              "--samples", "2", *flags]) == 0
        assert dequantize_main([str(tmp_path / name), str(tmp_path / f"{name}-hf"), "--dtype", "float32"]) == 0
    plain, tuned = load_trit_checkpoint(tmp_path / "plain"), load_trit_checkpoint(tmp_path / "tuned")
    record = tuned.manifest["calibration"]["norm_tuning"]
    assert record["epochs"] == 3 and record["windows"] == 2 and len(record["kl"]) == 3
    assert "norm_tuning" not in plain.manifest["calibration"]
    for name in plain.quantized_names:
        np.testing.assert_array_equal(plain.matrix(name).codes, tuned.matrix(name).codes)
    norms = [n for n in plain.kept_names if n.endswith("norm.weight")]
    assert len(norms) == 5 and all(not np.array_equal(plain.kept(n)[0], tuned.kept(n)[0]) for n in norms)
    before = _kl_from_source(tiny_hf, tmp_path / "plain-hf", windows)
    after = _kl_from_source(tiny_hf, tmp_path / "tuned-hf", windows)
    assert after < 0.95 * before, (before, after)
    assert inspect_main([str(tmp_path / "tuned")]) == 0
    assert "norms tuned: 3 passes" in capsys.readouterr().out.splitlines()[-1]


def test_tensor_depth_overrides_a_uniform_depth(tiny_hf, tmp_path):
    assert quantize_main([str(tiny_hf), str(tmp_path / "t"), "--depth", "2", "--tensor-depth",
                          "model.layers.1.*=3", "--tensor-depth", "*.o_proj.weight=1"]) == 0
    q = load_trit_checkpoint(tmp_path / "t").manifest["quantized"]
    for name, e in q.items():
        want = 1 if name.endswith("o_proj.weight") else 3 if name.startswith("model.layers.1.") else 2
        assert e["depth"] == want, name


@pytest.mark.parametrize("flags, message", [
    (["--calibration", "EMPTY"], "the text is empty"),
    (["--calibration", "BINARY"], "not UTF-8"),
    (["--bpw", "1.5"], "--bpw 1.5 is outside [1.9, 6.7]"),
    (["--bpw", "7"], "is outside [1.9, 6.7]"),
    (["--tensor-depth", "*.nothing_here=3"], "matches no quantized tensor"),
    (["--tensor-depth", "*.o_proj.weight"], "expected PATTERN=D"),
    (["--tensor-depth", "*.o_proj.weight=5"], "expected PATTERN=D with D in [1, 2, 3, 4]"),
    (["--tune-norms"], "--tune-norms needs --calibration"),
    (["--calibration", "TEXT", "--tune-norms", "-1"], "the number of passes must be at least 1"),
    (["--bpw", "4.4", "--row-blocks"], "--row-blocks needs --bpw and --calibration"),
])
def test_bad_input_is_one_line(tiny_hf, tmp_path, capsys, flags, message):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81")
    (tmp_path / "text.txt").write_text(CALIBRATION_TEXT)
    paths = {"EMPTY": tmp_path / "empty.txt", "BINARY": tmp_path / "binary.txt", "TEXT": tmp_path / "text.txt"}
    flags = [str(paths[f]) if f in paths else f for f in flags]
    assert quantize_main([str(tiny_hf), str(tmp_path / "out")] + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err), err
    assert not (tmp_path / "out").exists()

