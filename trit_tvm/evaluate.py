"""Perplexity on a text: of a compiled artifact (its `score` function: every position's logits), or of a
Hugging Face checkpoint / GGUF file through transformers, windowed and scored the same way.

Windows of `window` tokens start every `stride` tokens (default: stride = window, no overlap). The first
window scores every token after its first; a later window scores only the tokens the previous one did not
reach, with the rest of the window as context (transformers' causal-LM loss, windowed as in its
perplexity guide). Perplexity = exp(mean negative log-likelihood over the scored tokens).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from codec.errors import CodecError

Logits = Callable[[list[int]], np.ndarray]  # token ids -> float logits [len(ids), vocab]


@dataclass
class Perplexity:
    perplexity: float
    tokens_scored: int
    windows: int
    tok_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def windows(n_tokens: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first scored position within the window) of each window over n_tokens."""
    if window < 2 or not 1 <= stride <= window:
        raise CodecError(f"--window must be >= 2 and --stride in [1, window]; got {window} and {stride}")
    scored_to = 0
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + window, n_tokens)
        first = max(scored_to - begin, 1)
        if end - begin >= 2 and first < end - begin:
            yield begin, end, first
        scored_to = end
        if end == n_tokens:
            break


def window_nll(logits: np.ndarray, ids: list[int], first: int, rows: int = 32) -> np.ndarray:
    """Negative log-likelihoods of ids[first:] given logits of the positions before each (float64), a block
    of rows at a time: each row shifted by its maximum and exponentiated in float32 (numpy's vectorized exp),
    summed in float64. The whole window widened to float64 at once (200 MB for 512 positions of a 49152-token
    vocabulary) took 0.1-0.8 s a window, as long as SmolLM2's compiled prefill of it; this, 0.05 s."""
    z, targets = logits[first - 1:len(ids) - 1], np.asarray(ids[first:])
    nll = np.empty(len(z))
    for start in range(0, len(z), rows):
        block = np.asarray(z[start:start + rows], np.float32)
        shifted = block - block.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64))
        nll[start:start + rows] = log_norm - shifted[np.arange(len(block)), targets[start:start + rows]]
    return nll


def perplexity(logits_of: Logits, ids: list[int], window: int = 512, stride: int | None = None) -> Perplexity:
    """Perplexity of a model (logits_of) on a token sequence, windowed as the module docstring says."""
    if len(ids) < 2:
        raise CodecError("the text is shorter than two tokens: nothing to score")
    nll: list[np.ndarray] = []
    t0 = time.perf_counter()
    processed = 0
    for begin, end, first in windows(len(ids), window, stride or window):
        chunk = ids[begin:end]
        nll.append(window_nll(logits_of(chunk), chunk, first))
        processed += len(chunk)
    seconds = time.perf_counter() - t0
    scored = np.concatenate(nll)
    return Perplexity(float(np.exp(scored.mean())), int(scored.size), len(nll), processed / max(seconds, 1e-9))


def transformers_logits(model_path: Path):
    """(logits function, tokenizer) for a Hugging Face checkpoint dir or a GGUF file, run by transformers in
    float32 on this CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codec.gguf_source import is_gguf
    model_path = Path(model_path)
    where = dict(pretrained_model_name_or_path=str(model_path.parent), gguf_file=model_path.name) \
        if is_gguf(model_path) else dict(pretrained_model_name_or_path=str(model_path))
    try:
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except (OSError, ValueError) as e:
        raise CodecError(f"{model_path}: transformers cannot load it ({str(e).splitlines()[0][:160]})") from None

    def logits_of(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()
    return logits_of, tokenizer
