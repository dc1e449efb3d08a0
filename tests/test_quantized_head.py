"""--quantize-head: the output head as depth-4 trits, run by the trit operator, against transformers on the
same dequantized weights (its own reference: the head differs from the 16-bit one by design)."""

import numpy as np
import pytest
import torch

from codec.checkpoint import EMBEDDING, HEAD, HEAD_DEPTH, load_trit_checkpoint
from helpers import compile_with_reference, hf_greedy
from trit_tvm.cli import compile_main


@pytest.mark.parametrize("fixture", ["tiny_hf_tied", "tiny_hf"])
def test_quantized_head_is_token_exact_against_its_dequantized_reference(fixture, request, tmp_path):
    model, hf = compile_with_reference(request.getfixturevalue(fixture), tmp_path, 3, ("--quantize-head",))
    ckpt = load_trit_checkpoint(tmp_path / "trit")
    assert ckpt.manifest["quantized"][HEAD]["depth"] == HEAD_DEPTH and HEAD not in ckpt.manifest["kept"]
    assert EMBEDDING in ckpt.manifest["kept"]  # lookups still read the 16-bit (here 32-bit) embedding
    assert not hf.config.tie_word_embeddings
    head = ckpt.matrix(HEAD).dequantize()
    np.testing.assert_array_equal(hf.lm_head.weight.detach().numpy(), head)
    source = ckpt.manifest["quantized_head"]["source"]
    assert source == (EMBEDDING if fixture == "tiny_hf_tied" else HEAD)
    assert not np.array_equal(head, hf.model.embed_tokens.weight.detach().numpy())  # a quantized copy, not the same
    # the artifact reads the head as trits: its parameters are the head's packed arrays, not a dense matrix
    assert {p for p in model.manifest["params"] if p.startswith("lm_head.")} == {
        "lm_head.trit_codes", "lm_head.trit_scales", "lm_head.trit_codebook"}
    prompt = [5, 17, 42, 99, 3, 64]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0, -1].numpy()
    np.testing.assert_allclose(model.prefill_logits(prompt), want, atol=1e-3, rtol=0)
    assert model.generate(prompt, 24).tokens == hf_greedy(hf, prompt, 24)


def test_quantize_head_needs_a_checkpoint_that_has_it(trit_ckpt, tmp_path, capsys):
    assert compile_main([str(trit_ckpt), "--quantize-head", "-o", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "keeps its head in 16 bits" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "art").exists()
