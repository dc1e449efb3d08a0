"""Load a compiled artifact and generate: embed → prefill (in chunks) → decode loop, with sampling; text in
and out through the artifact's tokenizer, streamed token by token, and chat with the history kept in the
KV cache across turns.

    from trit_tvm import TritModel
    model = TritModel("trit-demo-llvm")
    print(model.generate_text("Once upon a time", max_new_tokens=40))
    for piece in model.stream_text("The capital of France is"):
        print(piece, end="", flush=True)
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np
import tvm
from tvm.runtime import ShapeTuple
from tvm.runtime.vm import VirtualMachine

from codec.checkpoint import sha256_file
from codec.safetensors_io import SafetensorsFile

from .artifact import ARTIFACT_MANIFEST, LIBRARY, PAGE_SIZE, PARAMS, read_artifact_manifest
from .errors import CompileError
from .targets import host_arch

PREFILL_CHUNK = 256


def load_cuda_runtime() -> None:
    """TVM's CUDA runtime library. `import tvm` loads it, except in a runtime-only install
    (TVM_USE_RUNTIME_LIB=1, as on deployment machines), where device backends are skipped."""
    if tvm.base._RUNTIME_ONLY and "tvm_runtime_cuda" not in tvm.base._LOADED_LIBS:
        from tvm_ffi.libinfo import load_lib_ctypes
        runtime_dir = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        try:
            tvm.base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
                package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
        except (OSError, RuntimeError):
            pass  # no CUDA here: the caller's device check says so


def device_for(manifest: dict, artifact: Path) -> tvm.runtime.Device:
    """The local device the artifact's kernels run on, or a clear error if this machine has none."""
    arch = manifest.get("arch")
    if arch and arch != host_arch():
        raise CompileError(f"{artifact}: built for {arch} ({manifest.get('target_kind')}), this machine is "
                           f"{host_arch()}; run it on such a device (trit-run --rpc) or rebuild with --target llvm")
    if manifest["device"] == "cuda":
        load_cuda_runtime()
        dev = tvm.cuda(0)
        if not dev.exist:
            raise CompileError(f"{artifact}: built for CUDA, but no CUDA GPU is visible here; "
                               "rebuild with --target llvm to run on this CPU")
        return dev
    if manifest["device"] != "cpu":
        raise CompileError(f"{artifact}: built for device {manifest['device']!r}, which this runtime cannot run")
    return tvm.cpu(0)


@dataclass
class Generation:
    """The tokens of one generation and its timings (filled in as the tokens come)."""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0, else nucleus sampling over the softmax at `temperature`."""
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64).ravel()
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.cumsum(p[order]) - p[order] < top_p
    keep[0] = True
    chosen = order[keep]
    return int(rng.choice(chosen, p=p[chosen] / p[chosen].sum()))


def _as_tvm_array(f: SafetensorsFile, name: str) -> np.ndarray:
    """A stored parameter as numpy; BF16 bits become ml_dtypes.bfloat16 (what tvm.runtime.tensor takes)."""
    arr = np.ascontiguousarray(f.read(name))
    return arr.view(ml_dtypes.bfloat16) if f.tensors[name].dtype == "BF16" else arr


class LocalRuntime:
    """Where TritModel's calls go: TVM's runtime in this process. trit_tvm.remote.RemoteRuntime sends the
    same calls to a device over TVM RPC."""

    description = "local"

    def function(self, name: str):
        return tvm.get_global_func(name)

    def shape(self, *dims: int):
        return ShapeTuple(list(dims))

    def array(self, items: list):
        """One TVM array, built once: a Python list passed to a VM function is converted at every call
        (~11 µs for SmolLM2's 425 parameters, twice per decode step)."""
        return tvm.runtime.convert(list(items))

    def unpack(self, value, n: int) -> tuple:
        return tuple(value)

    def load_library(self, path: Path, arch: str | None = None):
        del arch  # checked against this machine by device_for; RemoteRuntime names it in its load error
        return tvm.runtime.load_module(str(path))

    def device(self, manifest: dict, artifact: Path) -> tvm.runtime.Device:
        return device_for(manifest, artifact)


class TritModel:
    """A loaded artifact on its device: this machine's, or a remote one (runtime=RemoteRuntime(...))."""

    def __init__(self, artifact: str | Path, params: list | None = None, runtime=None):
        """params: tensors already on the device, in the manifest's order, instead of the artifact's
        params.safetensors (benchmarks fill shape-only builds with random weights this way)."""
        self.path = Path(artifact)
        self.manifest = read_artifact_manifest(self.path)
        self.config = self.manifest["config"]
        self.runtime = runtime or LocalRuntime()
        self.device = self.runtime.device(self.manifest, self.path)
        self.vm = VirtualMachine(self.runtime.load_library(self.path / LIBRARY, self.manifest.get("arch")),
                                 self.device)
        self.params = self._load_params() if params is None else params
        self._param_arg = self.runtime.array(self.params)
        # In this process's CPU memory, token ids go in through a buffer per length, written through a numpy
        # view, and logits come out as a view of the VM's output: tvm.runtime.tensor and .numpy() cost 90-130
        # µs a call with the caches full of weights (SmolLM2's decode step: 4.03 -> 3.51 ms without them).
        self._host_memory = self.device.dlpack_device_type() == 1
        self._id_buffers: dict[int, tuple] = {}
        self._shapes: dict[tuple, object] = {}
        fn = self.runtime.function
        self._reshape = fn("vm.builtin.reshape")
        self._add_seq = fn("vm.builtin.kv_state_add_sequence")
        self._begin = fn("vm.builtin.kv_state_begin_forward")
        self._end = fn("vm.builtin.kv_state_end_forward")
        self._popn = fn("vm.builtin.kv_state_popn")
        self.max_seq_len = int(self.manifest["context_length"])
        self._tokenizer = None

    def _load_params(self) -> list:
        """The parameters from params.safetensors, its checksum verified against the manifest first."""
        path = self.path / PARAMS
        if not path.exists():
            raise CompileError(f"{path}: missing (artifact is incomplete; rebuild it with trit-compile)")
        expected = self.manifest.get("params_sha256")
        if not isinstance(expected, str):
            raise CompileError(f"{self.path / ARTIFACT_MANIFEST}: field 'params_sha256' is missing (rebuild the "
                               "artifact with trit-compile)")
        if sha256_file(path) != expected:
            raise CompileError(f"{path}: checksum mismatch (sha256 differs from {ARTIFACT_MANIFEST}); the file is "
                               "corrupt")
        f = SafetensorsFile(path)
        names = self.manifest["params"]
        missing = [n for n in names if n not in f.tensors]
        if missing:
            raise CompileError(f"{self.path / PARAMS}: missing parameter '{missing[0]}' (artifact is corrupt)")
        if names != list(f.tensors):  # the file holds them in the VM's order (compile writes it so)
            raise CompileError(f"{self.path / ARTIFACT_MANIFEST}: field 'params' does not list the parameters of "
                               f"{PARAMS} in their order (artifact is corrupt)")
        return [tvm.runtime.tensor(_as_tvm_array(f, n), self.device) for n in names]

    @property
    def resident_weight_bytes(self) -> int:
        return sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in self.params)

    def _new_cache(self, tokens: int):
        """A KV cache for one sequence of up to `tokens` tokens. Sized per request, not to the model's
        context: trit_tvm.attention_cpu's score buffers are sized by the cache's capacity."""
        shape = self.runtime.shape
        capacity = min(self.max_seq_len, -(-tokens // PAGE_SIZE) * PAGE_SIZE)
        kv = self.vm["create_tir_paged_kv_cache"](shape(1), shape(capacity), shape(PREFILL_CHUNK), shape(PAGE_SIZE))
        self._add_seq(kv, 0)
        return kv

    def _shape(self, *dims: int):
        """A shape tuple, made once per value (each costs a few µs to make)."""
        shape = self._shapes.get(dims)
        if shape is None:
            shape = self._shapes[dims] = self.runtime.shape(*dims)
        return shape

    def _ids_tensor(self, ids: np.ndarray):
        """ids as an int32 tensor on the device; in host memory one buffer per length (≤ PREFILL_CHUNK)."""
        if not self._host_memory:
            return tvm.runtime.tensor(ids.astype(np.int32), self.device)
        if len(ids) not in self._id_buffers:
            buffer = tvm.runtime.empty((len(ids),), "int32", self.device)
            self._id_buffers[len(ids)] = buffer, np.from_dlpack(buffer)
        buffer, view = self._id_buffers[len(ids)]
        view[:] = ids
        return buffer

    def _embed(self, ids: np.ndarray):
        h = self.vm["embed"](self._ids_tensor(ids), self._param_arg)
        return self._reshape(h, self._shape(1, *h.shape))

    def _forward(self, kv, fn: str, ids: np.ndarray) -> np.ndarray:
        """float32 logits, flat: a view of the VM's output tensor (which it keeps alive) in this process's
        memory, else a copy."""
        self._begin(kv, self._shape(0), self._shape(len(ids)))
        logits, kv = self.runtime.unpack(self.vm[fn](self._embed(ids), kv, self._param_arg), 2)
        self._end(kv)
        return (np.from_dlpack(logits) if self._host_memory else logits.numpy()).reshape(-1)

    def _prefill(self, kv, ids: np.ndarray) -> np.ndarray:
        for start in range(0, len(ids), PREFILL_CHUNK):
            logits = self._forward(kv, "prefill", ids[start:start + PREFILL_CHUNK])
        return logits

    def _check_prompt(self, ids: list[int]) -> np.ndarray:
        if len(ids) == 0:
            raise CompileError("the prompt is empty: give at least one token")
        arr = np.asarray(ids, np.int64)
        vocab = int(self.config["vocab_size"])
        if arr.min() < 0 or arr.max() >= vocab:
            raise CompileError(f"prompt token ids must be in [0, {vocab}); got {int(arr.min())}..{int(arr.max())}")
        return arr

    def score_logits(self, ids: list[int]) -> np.ndarray:
        """float32 logits [len(ids), vocab] of every position after a fresh prefill of ids (in chunks)."""
        prompt = self._check_prompt(ids)
        self._check_length(len(prompt))
        kv = self._new_cache(len(prompt))
        chunks = [prompt[start:start + PREFILL_CHUNK] for start in range(0, len(prompt), PREFILL_CHUNK)]
        return np.concatenate([self._forward(kv, "score", c).reshape(len(c), -1) for c in chunks])

    def prefill_logits(self, ids: list[int]) -> np.ndarray:
        """Last-position logits (float32 [vocab]) after a fresh prefill of ids."""
        return self._prefill(self._new_cache(len(ids)), self._check_prompt(ids))

    def decode_logits(self, prompt: list[int], continuation: list[int]) -> list[np.ndarray]:
        """Logits after prefilling prompt, then after each decode step feeding one token of continuation."""
        kv = self._new_cache(len(prompt) + len(continuation))
        out = [self._prefill(kv, self._check_prompt(prompt))]
        out += [self._forward(kv, "decode", np.array([t])) for t in continuation]
        return out

    def _check_length(self, tokens: int) -> None:
        if tokens > self.max_seq_len:
            window = self.config.get("sliding_window")
            why = (f" (its sliding window of {window} tokens: attention beyond the window is not implemented)"
                   if window and window <= self.max_seq_len else "")
            raise CompileError(f"{tokens} tokens exceed the model's context length {self.max_seq_len}{why}")

    def _steps(self, kv, prompt: np.ndarray, max_new_tokens: int, temperature: float, top_p: float, seed: int,
               stop_ids: tuple[int, ...], timing: Generation) -> Iterator[int]:
        """Prefill prompt into kv, then sample and decode until max_new_tokens or a stop id (yielded too)."""
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        logits = self._prefill(kv, prompt)
        t1 = time.perf_counter()
        timing.prompt_tokens, timing.prefill_seconds = len(prompt), t1 - t0
        for n in range(1, max_new_tokens + 1):
            tok = sample_token(logits, temperature, top_p, rng)
            timing.tokens.append(tok)
            yield tok
            if tok in stop_ids or n == max_new_tokens:
                return
            t0 = time.perf_counter()
            logits = self._forward(kv, "decode", np.array([tok]))
            timing.decode_seconds += time.perf_counter() - t0
            timing.decode_steps += 1

    def stream(self, ids: list[int], max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, stop_ids: tuple[int, ...] = (), timing: Generation | None = None) -> Iterator[int]:
        """Token ids as they are generated (a stop id ends the stream and is yielded). `timing`, if given,
        is filled with the tokens and prefill/decode times as they happen."""
        prompt = self._check_prompt(ids)  # checked now, not at the first token (a plain function, not a generator)
        self._check_length(len(prompt) + max_new_tokens)
        kv = self._new_cache(len(prompt) + max_new_tokens)
        return self._steps(kv, prompt, max_new_tokens, temperature, top_p, seed, stop_ids,
                           timing if timing is not None else Generation())

    def generate(self, ids: list[int], max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop_ids: tuple[int, ...] = ()) -> Generation:
        """Generate from token ids: greedy at temperature 0, else nucleus sampling (seeded)."""
        timing = Generation()
        for _ in self.stream(ids, max_new_tokens, temperature, top_p, seed, stop_ids, timing):
            pass
        return timing

    # --- text in, text out (the artifact's tokenizer) ---

    @property
    def tokenizer(self):
        """The artifact's tokenizer (transformers), loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    @functools.cached_property
    def stop_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids: the tokenizer's and those config.json / generation_config.json list."""
        ids = {self.tokenizer.eos_token_id}
        for name in ("config.json", "generation_config.json"):
            path = self.path / name
            eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
            ids.update(eos if isinstance(eos, list) else [eos])
        return tuple(sorted(i for i in ids if isinstance(i, int)))

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt as the tokenizer makes them (its own special tokens, if it adds any)."""
        return self.tokenizer.encode(text)

    def stream_text(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                    seed: int = 0, timing: Generation | None = None) -> Iterator[str]:
        """The continuation of `prompt`, piece by piece as tokens are generated; stops at an EOS token."""
        ids = self.stream(self.encode(prompt), max_new_tokens, temperature, top_p, seed, self.stop_ids, timing)
        return detokenize(self.tokenizer, ids, self.stop_ids)

    def generate_text(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                      seed: int = 0) -> str:
        """The continuation of `prompt` as one string."""
        return "".join(self.stream_text(prompt, max_new_tokens, temperature, top_p, seed))

    def chat(self, system: str | None = None) -> "ChatSession":
        """A conversation with the tokenizer's chat template, its history kept in the KV cache."""
        return ChatSession(self, system)


def load_tokenizer(artifact: Path):
    """The tokenizer saved in an artifact (or checkpoint) dir."""
    artifact = Path(artifact)
    if not (artifact / "tokenizer.json").exists() and not (artifact / "tokenizer_config.json").exists():
        raise CompileError(f"{artifact}: has no tokenizer files; use token ids (--prompt-ids)")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(artifact))


def detokenize(tokenizer, ids: Iterator[int], stop_ids: tuple[int, ...] = ()) -> Iterator[str]:
    """Text pieces of a token stream as soon as they are whole characters (a multi-byte character split over
    tokens waits for its last token); stop ids end the text without being printed."""
    tokens: list[int] = []
    shown = ""
    for tok in ids:
        if tok in stop_ids:
            break
        tokens.append(tok)
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            continue
        if text.startswith(shown):
            piece, shown = text[len(shown):], text
            if piece:
                yield piece
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    if len(text) > len(shown) and text.startswith(shown):
        yield text[len(shown):]


class ChatSession:
    """Turns of a chat: each message is rendered with the tokenizer's chat template, and only the tokens
    the KV cache does not hold yet are prefilled. The cache keeps the longest prefix it shares with the new
    rendering (a reply re-tokenized by the template may differ from the generated tokens near its end; the
    rest is popped); it grows, re-prefilling the history, when full."""

    def __init__(self, model: TritModel, system: str | None = None):
        self.model, self.system = model, system
        if not getattr(model.tokenizer, "chat_template", None):
            raise CompileError(f"{model.path}: the tokenizer has no chat template; use a prompt instead")
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (and the KV cache's contents)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._kv, self._capacity, self._cached = None, 0, []

    def _ensure_cache(self, tokens: int) -> list[int]:
        """A cache that holds `tokens` tokens; returns the ids it already holds (a prefix of the history)."""
        if self._kv is None or tokens > self._capacity:
            self._capacity = min(self.model.max_seq_len, max(1024, 2 * tokens))
            self._kv, self._cached = self.model._new_cache(self._capacity), []
        return self._cached

    def send(self, message: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, timing: Generation | None = None) -> Iterator[str]:
        """The assistant's reply to `message`, piece by piece; the turn joins the history when the reply is
        complete (a reply abandoned midway leaves the history as it was and the cache to be rebuilt)."""
        tok = self.model.tokenizer
        messages = self.messages + [{"role": "user", "content": message}]
        ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        self.model._check_length(len(ids) + max_new_tokens)
        cached = self._ensure_cache(len(ids) + max_new_tokens)
        keep = next((i for i, (a, b) in enumerate(zip(ids, cached)) if a != b), min(len(ids), len(cached)))
        keep = min(keep, len(ids) - 1)  # at least one token to prefill: its logits start the reply
        if len(cached) > keep:
            self.model._popn(self._kv, 0, len(cached) - keep)
        stop = self.model.stop_ids
        generated: list[int] = []

        def steps() -> Iterator[int]:
            for t in self.model._steps(self._kv, np.asarray(ids[keep:], np.int64), max_new_tokens, temperature,
                                       top_p, seed, stop, timing if timing is not None else Generation()):
                generated.append(t)
                yield t

        reply = []
        try:
            for piece in detokenize(tok, steps(), stop):
                reply.append(piece)
                yield piece
        except BaseException:  # interrupted: what the cache holds is no longer known
            self._kv, self._capacity, self._cached = None, 0, []
            raise
        # the cache holds the prompt and every generated token but the last (never fed back)
        self._cached = ids + generated[:-1]
        self.messages = messages + [{"role": "assistant", "content": "".join(reply)}]
