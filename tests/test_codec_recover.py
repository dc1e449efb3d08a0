"""--recover: codes recovered from Entrit-style FP16/BF16 checkpoints reproduce them bit-exactly, however the
checkpoint computed step·q (float64, float32, or in the storage dtype itself) and whatever the weights were
(Gaussian, heavy outliers, trained MiniLM matrices). The sign of a zero is the one thing not kept: a code of
0 has none (-0.0 and 0.0 compare equal below)."""
import numpy as np
import pytest

from codec import (CodecError, dequantize_as, load_trit_checkpoint, quantize_matrix, recover_matrix,
                   write_trit_checkpoint)
from codec.quantize import qmax_of
from codec.safetensors_io import SafetensorsFile, ShardWriter, from_float, to_float32
from helpers import minilm_matrices

ARITHMETICS = ("float64", "float32", "storage")  # numpy float64, torch float32, torch FP16/BF16


def _reference_float64(w: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """An independent statement of the reference rule with float64 steps (as a numpy implementation would
    have them: not float32 values): per group the MSE-best of 4 order-statistic amplitudes, 27 log-spaced
    amplitudes from the smallest to the largest, each group snapped to the nearest, q = round(w / step)."""
    qmax = qmax_of(depth)
    g = w.reshape(-1, 16).astype(np.float64)
    amps = np.sort(np.abs(g), axis=1)[:, [10, 12, 14, 15]]
    errs = []
    for c in range(4):
        step = amps[:, c:c + 1] / qmax
        q = np.clip(np.rint(np.divide(g, step, out=np.zeros_like(g), where=step > 0)), -qmax, qmax)
        errs.append(((g - q * step) ** 2).sum(axis=1))
    amp = amps[np.arange(len(g)), np.argmin(np.stack(errs, axis=1), axis=1)]
    book = np.exp(np.linspace(np.log(amp[amp > 0].min()), np.log(amp.max()), 27))
    pos = (np.log(np.maximum(amp, 1e-300)) - np.log(book[0])) / (np.log(book[-1]) - np.log(book[0])) * 26
    step = book[np.clip(np.rint(pos), 0, 26).astype(int)] / qmax
    return step, np.clip(np.rint(g / step[:, None]), -qmax, qmax)


def entrit_style(w: np.ndarray, depth: int, dtype: str, arithmetic: str, steps: str = "float64") -> np.ndarray:
    """A dequantized trit checkpoint tensor: steps from the reference rule (`float64` as above, or `float32`:
    this codec's reference mode), step·q computed in `arithmetic`, stored in `dtype` (F16 or BF16)."""
    if steps == "float32":
        qm = quantize_matrix(w, depth, "reference")
        step, q = qm.codebook[qm.scale_idx].reshape(-1).astype(np.float64), qm.codes.reshape(-1, 16).astype(np.float64)
    else:
        step, q = _reference_float64(w, depth)
    if arithmetic == "float64":
        prod = step[:, None] * q
    elif arithmetic == "float32":
        prod = step.astype(np.float32)[:, None] * q.astype(np.float32)
    elif dtype == "F16":  # FP16 arithmetic: the step rounded to FP16, the product rounded to FP16
        prod = step.astype(np.float16)[:, None] * q.astype(np.float16)
    else:  # BF16 arithmetic: the same in BF16
        step_bf16 = to_float32(from_float(step, "BF16"), "BF16")
        prod = to_float32(from_float(step_bf16[:, None].astype(np.float64) * q, "BF16"), "BF16")
    prod = np.asarray(prod).reshape(w.shape)
    return prod.astype(np.float16) if dtype == "F16" else from_float(prod, "BF16")


def _same_values(a: np.ndarray, b: np.ndarray, dtype: str) -> bool:
    """Bit-equal, except that -0.0 equals 0.0."""
    zero = (to_float32(a, dtype) == 0) & (to_float32(b, dtype) == 0)
    width = np.dtype(f"u{a.dtype.itemsize}")
    return bool(((a.view(width) == b.view(width)) | zero).all())


def _gaussian(seed, shape=(160, 256)):
    return np.random.default_rng(seed).standard_normal(shape) * 0.02


def _outliers(seed, shape=(256, 160)):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * 0.02
    w[rng.random(shape) < 1e-3] *= 20
    return w


def _minilm():
    return [w.astype(np.float64) for w in minilm_matrices(4)]


CASES = [(dtype, depth) for dtype in ("F16", "BF16") for depth in (1, 2, 3, 4)]


@pytest.mark.parametrize("dtype,depth", CASES, ids=[f"{d}-d{k}" for d, k in CASES])
@pytest.mark.parametrize("arithmetic", ARITHMETICS)
@pytest.mark.parametrize("weights", ["gaussian", "outliers", "minilm"])
def test_recover_matrix_bit_exact(weights, arithmetic, dtype, depth):
    sources = {"gaussian": lambda: [_gaussian(depth)], "outliers": lambda: [_outliers(depth)], "minilm": _minilm}
    mats = sources[weights]()
    for steps in ("float64", "float32"):
        for w in mats:
            stored = entrit_style(w, depth, dtype, arithmetic, steps)
            got = recover_matrix(stored, dtype, "m")
            assert got.depth == depth
            assert _same_values(dequantize_as(got, dtype), stored, dtype), (steps, w.shape)


def test_recovered_codes_are_the_quantizer_codes():
    w = _outliers(7)
    qm = quantize_matrix(w, 3, "reference")
    got = recover_matrix(from_float(qm.dequantize(np.float64), "F16"), "F16", "m")
    np.testing.assert_array_equal(got.codes, qm.codes)


def test_not_trit_representable_names_the_tensor():
    stored = (np.random.default_rng(0).standard_normal((8, 32))).astype(np.float16)
    with pytest.raises(CodecError, match="'model.layers.0.mlp.up_proj.weight': not trit-representable"):
        recover_matrix(stored, "F16", "model.layers.0.mlp.up_proj.weight")


def test_more_than_27_steps_is_not_trit_representable():
    """28 groups on 28 unrelated steps, each group's codes spanning 1..13 (no step can serve two of them)."""
    steps = np.exp(np.linspace(np.log(1e-3), np.log(1.0), 28))
    q = np.tile(np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 13, 7, 5], np.float64), (28, 1))
    stored = (steps[:, None] * q).astype(np.float16).reshape(4, 112)
    with pytest.raises(CodecError, match="'m': not trit-representable: more than 27 distinct group steps"):
        recover_matrix(stored, "F16", "m")


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
@pytest.mark.parametrize("arithmetic", ARITHMETICS)
def test_recover_checkpoint_reproduces_every_tensor(tiny_hf, tmp_path, dtype, arithmetic):
    src = SafetensorsFile(tiny_hf / "model.safetensors")
    ent = tmp_path / "entrit"
    ent.mkdir()
    (ent / "config.json").write_text((tiny_hf / "config.json").read_text())
    writer = ShardWriter(ent / "model.safetensors")
    expected = {}
    for name in src.keys():
        w = np.asarray(src.read(name))
        if w.ndim == 2 and "embed" not in name and "lm_head" not in name:
            stored = entrit_style(w.astype(np.float64), 3, dtype, arithmetic)
        else:
            stored = w.astype(np.float16) if dtype == "F16" else from_float(w, "BF16")
        writer.add(name, stored, dtype)
        expected[name] = stored
    writer.close()
    write_trit_checkpoint(ent, tmp_path / "rec", recover=True)
    ckpt = load_trit_checkpoint(tmp_path / "rec")
    assert ckpt.manifest["codec_mode"] == "recovered" and ckpt.manifest["depth"] == 3
    for name in ckpt.quantized_names:
        assert _same_values(dequantize_as(ckpt.matrix(name), dtype), expected[name], dtype), name
    for name in ckpt.kept_names:
        assert np.asarray(ckpt.kept(name)[0]).tobytes() == expected[name].tobytes(), name


def test_recover_refuses_a_plain_checkpoint(tiny_hf, tmp_path):
    with pytest.raises(CodecError, match="not trit-representable"):
        write_trit_checkpoint(tiny_hf, tmp_path / "rec", recover=True)
    assert not (tmp_path / "rec").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rec")]
