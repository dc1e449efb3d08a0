"""Seeded fuzzing of every file reader: trit checkpoints (trit.json and shards), Hugging Face safetensors
headers, artifacts (manifest.json and params.safetensors) and GGUF files. Each mutation (truncation, byte
flips, huge lengths and shapes, wrong offsets, duplicate names, JSON values of the wrong type) must end in a
load that works (checksums verify) or in a one-line CodecError naming the file; never another exception."""
import json
import random
import shutil
import struct

import numpy as np
import pytest

from codec.errors import CodecError

WRONG_VALUES = [None, [], {}, "x", -1, 0, 2 ** 63, 1e308, True, [2 ** 40, 2 ** 40], [-5, 16], {"a": 1}]


def _paths(obj, prefix=()):
    """Every (path to a value) in a JSON tree."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            yield from _paths(v, prefix + (i,))


def mutate_json(text: str, rng: random.Random) -> str:
    """Delete a key, give a value a wrong type, or repeat a key (a duplicate name)."""
    obj = json.loads(text)
    paths = [p for p in _paths(obj) if p]
    if not paths:
        return rng.choice(["[]", "null", "{", '"x"'])
    path = rng.choice(paths)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    op = rng.random()
    if op < 0.2 and isinstance(parent, dict):
        del parent[path[-1]]
    elif op < 0.3 and isinstance(parent, dict):
        dumped = json.dumps(obj)
        key = json.dumps(path[-1])
        return dumped.replace(f"{key}:", f"{key}: {json.dumps(rng.choice(WRONG_VALUES))}, {key}:", 1)
    else:
        parent[path[-1]] = rng.choice(WRONG_VALUES)
    return json.dumps(obj)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Truncate, flip bytes, or write a huge 64-bit length somewhere."""
    op = rng.random()
    if op < 0.3:
        return data[:rng.randrange(len(data))]
    b = bytearray(data)
    if op < 0.7:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    else:
        at = rng.randrange(max(1, len(b) - 8))
        b[at:at + 8] = struct.pack("<Q", rng.choice([2 ** 63 - 1, 2 ** 40, 2 ** 32 + 1, 0xFFFFFFFFFFFFFFFF]))
    return bytes(b)


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    """Half the time a mutation of the header's JSON (shapes, offsets, dtypes, names), else of the bytes."""
    if rng.random() < 0.5:
        return mutate_bytes(data, rng)
    n = struct.unpack("<Q", data[:8])[0]
    header = mutate_json(data[8:8 + n].decode(), rng).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data[8 + n:]


def fuzz(target, mutate, load, name: str, n: int, seed: int, mentions) -> dict:
    """Apply n seeded mutations to `target` (restored after each), run `load`; returns the tally."""
    original = target.read_bytes()
    rng = random.Random(seed)
    tally = {"reader": name, "mutations": 0, "loaded": 0, "clean_errors": 0, "crashes": 0}
    crashes = []
    try:
        for _ in range(n):
            mutated = mutate(original, rng)
            if mutated == original:
                continue
            target.write_bytes(mutated)
            tally["mutations"] += 1
            try:
                load()
                tally["loaded"] += 1
            except CodecError as e:
                msg = str(e)
                if "\n" in msg or mentions not in msg:
                    crashes.append(f"unclear error: {msg!r}")
                else:
                    tally["clean_errors"] += 1
            except Exception as e:  # noqa: BLE001  (what the test looks for)
                crashes.append(f"{type(e).__name__}: {str(e)[:200]}")
    finally:
        target.write_bytes(original)
    tally["crashes"] = len(crashes)
    print(json.dumps(tally))
    assert not crashes, crashes[:5]
    return tally


def _text_mutation(data: bytes, rng: random.Random) -> bytes:
    return mutate_json(data.decode(), rng).encode() if rng.random() < 0.7 else mutate_bytes(data, rng)


def _copy(src, tmp_path_factory, name: str):
    """A copy to mutate (the session fixtures stay intact for other tests)."""
    dst = tmp_path_factory.mktemp("fuzz") / name
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def trit_copy(trit_ckpt, tmp_path_factory):
    return _copy(trit_ckpt, tmp_path_factory, "trit")


def _load_trit(path):
    from codec.checkpoint import load_trit_checkpoint
    ckpt = load_trit_checkpoint(path)
    for name in ckpt.quantized_names:
        ckpt.matrix(name).dequantize()
    for name in ckpt.kept_names:
        np.asarray(ckpt.kept(name)[0]).sum()


def test_fuzz_trit_checkpoint_manifest(trit_copy):
    fuzz(trit_copy / "trit.json", _text_mutation, lambda: _load_trit(trit_copy), "trit.json", 400, 1, str(trit_copy))


def test_fuzz_trit_checkpoint_shard(trit_copy):
    shard = next(trit_copy.glob("*.safetensors"))
    fuzz(shard, mutate_safetensors, lambda: _load_trit(trit_copy), "trit shard", 300, 2, str(trit_copy))


def test_fuzz_hf_safetensors(tiny_hf, tmp_path):
    from codec.checkpoint import read_source
    from codec.safetensors_io import to_float32
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf, src)

    def load():
        _, files = read_source(src)
        for f in files:
            for name in f.keys():
                to_float32(f.read(name), f.tensors[name].dtype).sum()
    fuzz(src / "model.safetensors", mutate_safetensors, load, "HF safetensors", 400, 3, str(src))


@pytest.fixture(scope="module")
def artifact_copy(llvm_artifact, tmp_path_factory):
    return _copy(llvm_artifact, tmp_path_factory, "art")


def _load_artifact(path):
    from trit_tvm.runtime import TritModel
    model = TritModel(path)
    model.generate([1, 2, 3], 2)


def test_fuzz_artifact_manifest(artifact_copy):
    fuzz(artifact_copy / "manifest.json", _text_mutation, lambda: _load_artifact(artifact_copy), "manifest.json",
         300, 4, str(artifact_copy))


def test_fuzz_artifact_params(artifact_copy):
    fuzz(artifact_copy / "params.safetensors", mutate_safetensors, lambda: _load_artifact(artifact_copy),
         "params.safetensors", 200, 5, str(artifact_copy))


def test_fuzz_gguf(tmp_path):
    import gguf

    from codec.gguf_source import read_gguf_tensors
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    rng = np.random.default_rng(0)
    for name, kind in (("token_embd.weight", "F32"), ("blk.0.attn_q.weight", "Q8_0"),
                       ("blk.0.ffn_up.weight", "Q4_1"), ("output_norm.weight", "F16")):
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, gguf.quants.quantize(rng.standard_normal((8, 64)).astype(np.float32), qtype),
                          raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    def load():
        for _name, _kind, arr in read_gguf_tensors(path):
            np.asarray(arr).sum()
    fuzz(path, mutate_bytes, load, "GGUF", 400, 6, str(path))
