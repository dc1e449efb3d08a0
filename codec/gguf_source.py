"""GGUF files as a source: a llama.cpp model file -> a Hugging Face checkpoint dir (config.json, tokenizer
files, float safetensors), which the rest of the codec reads like any other.

What transformers already does for GGUF is reused, not restated: its config and tokenizer conversion
(`from_pretrained(..., gguf_file=...)`), its GGUF -> transformers tensor-name map and its per-architecture
tensor fix-ups (llama.cpp stores Llama's q/k rows permuted for its RoPE; transformers' processor reverses
it). Tensors are dequantized one at a time by the `gguf` package and streamed to a safetensors file.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .atomic import os_errors, scratch_dir
from .errors import CodecError
from .safetensors_io import ShardWriter

log = logging.getLogger("trit")

# GGUF tensor types read here: name -> safetensors dtype the dequantized tensor is written in (F16 keeps
# its own; BF16 and block-quantized ones become float32, which holds their values exactly)
TENSOR_TYPES = {"F32": "F32", "F16": "F16", "BF16": "F32", "Q8_0": "F32", "Q4_0": "F32", "Q4_1": "F32",
                "Q4_K": "F32", "Q6_K": "F32"}
# GGUF general.architecture values read here (llama.cpp writes Mistral models as "llama"; a "mistral" file has no
# tensor name map in gguf-py, so transformers cannot map its tensors either)
ARCHITECTURES = ("llama", "qwen2", "qwen3")
Progress = Callable[[str, int], None]


def is_gguf(path: Path) -> bool:
    return Path(path).is_file() and Path(path).suffix.lower() == ".gguf"


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise CodecError(f"{path}: reading GGUF needs the 'gguf' package (pip install gguf)") from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001  (a third-party parser on untrusted bytes: any failure is a bad file)
        raise CodecError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from None


def _architecture(reader, path: Path) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise CodecError(f"{path}: GGUF field 'general.architecture' is missing")
    arch = str(field.contents())
    if arch not in ARCHITECTURES:
        raise CodecError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    return arch


def _checked_tensors(reader, path: Path) -> list:
    """The reader's tensors, each of a supported type and with data of its shape's size."""
    for t in reader.tensors:
        kind = getattr(t.tensor_type, "name", str(t.tensor_type))
        if kind not in TENSOR_TYPES:
            raise CodecError(f"{path}: tensor '{t.name}' has GGUF type {kind}, which is not supported "
                             f"(supported: {', '.join(TENSOR_TYPES)})")
    return list(reader.tensors)


def read_gguf_tensors(path: Path, reader=None) -> Iterator[tuple[str, str, np.ndarray]]:
    """(GGUF tensor name, GGUF type name, dequantized values) for every tensor, one at a time; reader: the file's
    GGUFReader when already open (parsing a file's metadata takes seconds: a tokenizer is thousands of fields)."""
    import gguf
    path = Path(path)
    for t in _checked_tensors(reader or _reader(path), path):
        try:
            yield t.name, t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:  # noqa: BLE001  (malformed block data in an untrusted file)
            raise CodecError(f"{path}: tensor '{t.name}' cannot be dequantized ({type(e).__name__}: "
                             f"{str(e)[:120]})") from None


def gguf_tensor_count(path: Path) -> int:
    """Elements of all tensors (for progress bars)."""
    return sum(int(t.n_elements) for t in _reader(Path(path)).tensors)


def gguf_to_hf(path: Path, out_dir: Path, progress: Progress | None = None) -> Path:
    """Write the GGUF model at `path` as a Hugging Face checkpoint into out_dir (created if needed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path, out_dir = Path(path), Path(out_dir)
    reader = _reader(path)
    arch = _architecture(reader, path)
    _checked_tensors(reader, path)  # an unsupported tensor type fails before transformers' conversion
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise CodecError(f"{path}: transformers cannot read its config or tokenizer ({e})") from None
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())  # the heads to un-permute
    view = _NamesOnly(skeleton)
    names = get_gguf_hf_weights_map(view, processor)
    expected = {n for n in view.state_dict() if not (config.tie_word_embeddings and n == "lm_head.weight")}
    writer = ShardWriter(out_dir / "model.safetensors")
    for gguf_name, kind, weights in read_gguf_tensors(path, reader):
        fixed = processor.process(weights=weights, name=gguf_name, tensor_key_mapping=names, parsed_parameters={})
        name = names.get(fixed.name)
        if name is None:
            log.debug("%s: tensor '%s' has no transformers counterpart; skipped", path, gguf_name)
            continue
        dtype = TENSOR_TYPES[kind]
        arr = np.asarray(fixed.weights)
        writer.add(name, arr.astype(np.float16 if dtype == "F16" else np.float32, copy=False), dtype)
        expected.discard(name)
        if progress:
            progress(name, arr.size)
    if expected:
        raise CodecError(f"{path}: tensor for '{sorted(expected)[0]}' is missing from the GGUF file")
    writer.close({"format": "pt", "source": path.name})
    return out_dir


class _NamesOnly:
    """What transformers' get_gguf_hf_weights_map reads of a model, without its submodules: it maps the model's
    fully qualified names, then again each submodule's (for models converted from a base class, as Bloom), building
    gguf's name map anew each time (about 400 times for SmolLM2, 5 s); the architectures read here need only the
    first pass."""

    def __init__(self, model):
        self.config, self._state_dict = model.config, model.state_dict()

    def state_dict(self) -> dict:
        return self._state_dict

    def named_children(self) -> tuple:
        return ()


@contextlib.contextmanager
def hf_source(src: Path, out: Path) -> Iterator[Path]:
    """A Hugging Face checkpoint dir for `src`: src itself, or for a GGUF file its conversion in a work dir
    beside `out` (the output it is read for), removed afterwards."""
    src = Path(src)
    if not is_gguf(src):
        yield src
        return
    with os_errors(out):
        tmp = scratch_dir(out, "hf")
    try:
        log.info("reading GGUF %s", src)
        with os_errors(out):
            hf = gguf_to_hf(src, tmp)
        yield hf
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
