"""trit-eval: perplexity scored by the compiled module equals transformers on the same weights, and both
equal the loss computed here from transformers' logits; windows and bad input."""
import json

import numpy as np
import pytest
import torch

from codec.cli import dequantize_main
from trit_tvm.cli import eval_main
from trit_tvm.evaluate import window_nll, windows

TEXT = ("Balanced ternary writes every number with the digits minus one, zero and plus one. "
        "The compiler reads the packed trits directly and never expands them to floating point. ") * 6


@pytest.fixture(scope="module")
def setup(llvm_artifact, trit_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    assert dequantize_main([str(trit_ckpt), str(root / "deq"), "--dtype", "float32"]) == 0
    (root / "text.txt").write_text(TEXT)
    return llvm_artifact, root / "deq", root / "text.txt"


def _eval_json(capsys, *argv) -> dict:
    assert eval_main([str(a) for a in argv] + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("window,stride", [(64, None), (64, 16), (200, None)])
def test_compiled_perplexity_equals_transformers_and_the_loss_computed_here(setup, capsys, window, stride):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    art, deq, text = setup
    extra = ["--window", window] + (["--stride", stride] if stride else [])
    ours = _eval_json(capsys, art, "--text", text, *extra)
    theirs = _eval_json(capsys, deq, "--text", text, *extra)
    assert ours["tokens_scored"] == theirs["tokens_scored"] and ours["windows"] == theirs["windows"]
    assert abs(ours["perplexity"] / theirs["perplexity"] - 1) < 1e-4
    # the same number from transformers' own loss, window by window
    ids = AutoTokenizer.from_pretrained(deq).encode(TEXT)
    hf = AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for begin, end, first in windows(len(ids), window, stride or window):
        labels = torch.tensor([ids[begin:end]])
        labels[0, :first] = -100  # context only
        with torch.no_grad():
            loss = hf(torch.tensor([ids[begin:end]]), labels=labels).loss
        n = end - begin - first
        total, count = total + float(loss) * n, count + n
    assert count == ours["tokens_scored"]
    assert abs(ours["perplexity"] / np.exp(total / count) - 1) < 1e-4


def test_window_nll_in_row_blocks_equals_the_float64_log_softmax():
    """window_nll (float32 exp, a block of rows at a time) on 70 positions (two full blocks and a partial
    one), scoring from the 5th: the float64 log-softmax computed whole, within 1e-5 per token."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((70, 1000)) * 8).astype(np.float32)
    ids = rng.integers(0, 1000, 70).tolist()
    z = logits[3:69].astype(np.float64)
    expected = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(66), ids[4:]]
    np.testing.assert_allclose(window_nll(logits, ids, 4), expected, rtol=0, atol=1e-5)


def test_windows_score_each_token_at_most_once():
    """Non-overlapping windows leave each window's first token unscored (no context); overlapping ones
    score every token after the first exactly once."""
    for n, window, stride in [(1000, 512, 512), (1000, 512, 128), (513, 512, 512), (50, 512, 100)]:
        scored = [i for b, e, f in windows(n, window, stride) for i in range(b + f, e)]
        assert scored == [i for i in range(1, n) if stride < window or i % window], (n, window, stride)


@pytest.mark.parametrize("content, message", [(b"", "the text is empty"), (b"\xff\xfe\x00bad", "not UTF-8")])
def test_bad_text_is_one_line(setup, tmp_path, capsys, content, message):
    art, _, _ = setup
    (tmp_path / "t.txt").write_bytes(content)
    assert eval_main([str(art), "--text", str(tmp_path / "t.txt")]) == 2
    assert message in capsys.readouterr().err


def test_bad_window(setup, capsys):
    art, _, text = setup
    assert eval_main([str(art), "--text", str(text), "--window", "64", "--stride", "65"]) == 2
    assert "--stride in [1, window]" in capsys.readouterr().err


def test_held_out_split_writes_disjoint_texts_into_a_new_folder(tmp_path):
    """bench_quality.split_texts (the README's calibration / evaluation texts): alternate pydoc topics, none in
    both files, the folder created if missing."""
    import pydoc_data.topics
    from benchmarks.bench_quality import split_texts
    calibration, evaluation = split_texts(tmp_path / "texts" / "new")
    held_out, seen = evaluation.read_text(), calibration.read_text()
    topics = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    assert topics[1] in held_out and topics[1] not in seen and topics[0] in seen and topics[0] not in held_out
