"""--recover: codes recovered from synthesized Entrit-style FP16/BF16 checkpoints reproduce them bit-exactly."""

import numpy as np
import pytest

from codec import CodecError, dequantize_as, load_trit_checkpoint, quantize_matrix, recover_matrix, write_trit_checkpoint
from codec.safetensors_io import SafetensorsFile, ShardWriter, from_float


def _entrit_style(w, depth, dtype):
    """The reference rule, then step·q in float32 rounded to the file dtype (as torch would)."""
    qm = quantize_matrix(w, depth, "reference")
    prod = (np.repeat(qm.codebook[qm.scale_idx], 16, axis=1) * qm.codes).astype(np.float32)
    return qm, (prod.astype(np.float16) if dtype == "F16" else from_float(prod, "BF16"))


@pytest.mark.parametrize("dtype,depth", [("F16", 1), ("F16", 2), ("F16", 3), ("F16", 4),
                                         ("BF16", 1), ("BF16", 2), ("BF16", 3)])
def test_recover_matrix_bit_exact(dtype, depth):
    w = (np.random.default_rng(depth).standard_normal((96, 256)) * 0.03).astype(np.float32)
    qm, stored = _entrit_style(w, depth, dtype)
    got = recover_matrix(stored, dtype, "m")
    assert got.depth == depth
    assert dequantize_as(got, dtype).tobytes() == stored.tobytes()
    np.testing.assert_array_equal(got.codes, qm.codes)


def test_not_trit_representable_names_the_tensor():
    stored = (np.random.default_rng(0).standard_normal((8, 32))).astype(np.float16)
    with pytest.raises(CodecError, match="'model.layers.0.mlp.up_proj.weight': not trit-representable"):
        recover_matrix(stored, "F16", "model.layers.0.mlp.up_proj.weight")


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_recover_checkpoint_reproduces_every_tensor(tiny_hf, tmp_path, dtype):
    src = SafetensorsFile(tiny_hf / "model.safetensors")
    ent = tmp_path / "entrit"
    ent.mkdir()
    (ent / "config.json").write_text((tiny_hf / "config.json").read_text())
    writer = ShardWriter(ent / "model.safetensors")
    expected = {}
    for name in src.keys():
        w = np.asarray(src.read(name))
        if w.ndim == 2 and "embed" not in name and "lm_head" not in name:
            _, stored = _entrit_style(w, 3, dtype)
        else:
            stored = w.astype(np.float16) if dtype == "F16" else from_float(w, "BF16")
        writer.add(name, stored, dtype)
        expected[name] = stored
    writer.close()
    write_trit_checkpoint(ent, tmp_path / "rec", recover=True)
    ckpt = load_trit_checkpoint(tmp_path / "rec")
    assert ckpt.manifest["codec_mode"] == "recovered" and ckpt.manifest["depth"] == 3
    for name in ckpt.quantized_names:
        assert dequantize_as(ckpt.matrix(name), dtype).tobytes() == expected[name].tobytes(), name
    for name in ckpt.kept_names:
        assert np.asarray(ckpt.kept(name)[0]).tobytes() == expected[name].tobytes(), name


def test_recover_refuses_a_plain_checkpoint(tiny_hf, tmp_path):
    with pytest.raises(CodecError, match="not trit-representable"):
        write_trit_checkpoint(tiny_hf, tmp_path / "rec", recover=True)
    assert not (tmp_path / "rec").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rec")]
