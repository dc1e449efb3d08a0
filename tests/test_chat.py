"""Chat and streaming: the history kept in the KV cache across turns, text streamed piece by piece (whole
characters only), control characters never printed raw, and `trit-run --chat` driven through a terminal."""
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from trit_tvm.cli import printable
from trit_tvm.runtime import Generation, TritModel, detokenize


def test_second_turn_prefills_only_new_tokens_and_equals_a_fresh_prefill(llvm_artifact):
    model = TritModel(llvm_artifact)
    session = model.chat()
    first = "".join(session.send("Balanced ternary", max_new_tokens=12))
    timing = Generation([], 0, 0.0, 0.0)
    second = "".join(session.send("writes every number", max_new_tokens=12, timing=timing))
    history = model.tokenizer.apply_chat_template(session.messages[:-1], add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)
    assert first and session.messages[1] == {"role": "assistant", "content": first}
    assert 0 < timing.prompt_tokens < len(history)  # the cache already held the first turn
    fresh = model.generate(list(history), 12, stop_ids=model.stop_ids).tokens
    assert timing.tokens == fresh  # same tokens as prefilling the whole history at once
    assert second == model.tokenizer.decode([t for t in fresh if t not in model.stop_ids])
    session.reset()
    assert session.messages == [] and "".join(session.send("Balanced ternary", max_new_tokens=12)) == first


def test_chat_needs_a_template(llvm_artifact, tmp_path):
    import json
    import shutil

    from trit_tvm.errors import CompileError
    art = tmp_path / "art"
    shutil.copytree(llvm_artifact, art)
    (art / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((art / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (art / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompileError, match="no chat template"):
        TritModel(art).chat()


def test_stream_pieces_are_whole_characters(llvm_artifact):
    tok = TritModel(llvm_artifact).tokenizer
    text = "naïve ☃ trits ✓"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # the multi-byte characters are split over byte-level tokens
    pieces = list(detokenize(tok, iter(ids)))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces) and len(pieces) > 3


def test_printable_escapes_control_characters():
    assert printable("a\x1b[2Jb\tc\nd\x07\x9b") == "a\\x1b[2Jb\tc\nd\\x07\\x9b"
    assert printable("naïve ☃") == "naïve ☃"


def _read_until(fd: int, marker: bytes, timeout: float = 120.0) -> list[tuple[float, bytes]]:
    """Chunks read from the terminal (with their arrival times) until `marker` has appeared."""
    chunks, seen, end = [], b"", time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out waiting for {marker!r}; got {seen[-300:]!r}")
        try:
            data = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        chunks.append((time.monotonic(), data))
        seen += data
    return chunks


def test_chat_cli_in_a_terminal_two_turns_reset_and_ctrl_d(smollm2):
    """`trit-run ART --chat -v` on SmolLM2 through a pseudo-terminal: the reply streams (arrives over several
    reads spread in time), the second turn prefills only its own tokens (the first is in the KV cache),
    /reset forgets (the next turn prefills the whole template again), Ctrl-D ends with exit code 0."""
    model, _ = smollm2
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", "from trit_tvm.cli import run_main; raise SystemExit(run_main())",
                             str(model.path), "--chat", "-v", "--max-new-tokens", "48"],
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    try:
        _read_until(master, b"> ")
        os.write(master, b"My name is Ada. Say hello to me.\n")
        first = _read_until(master, b"\r\n> ")
        reply = b"".join(c for _, c in first).decode(errors="replace")
        assert len(first) >= 3 and first[-1][0] - first[0][0] > 0.05, first  # streamed, not printed at once
        os.write(master, b"What is my name?\n")
        second = b"".join(c for _, c in _read_until(master, b"\r\n> ")).decode(errors="replace")
        os.write(master, b"/reset\n")
        assert b"(conversation reset)" in b"".join(c for _, c in _read_until(master, b"> "))
        os.write(master, b"What is my name?\n")
        third = b"".join(c for _, c in _read_until(master, b"\r\n> ")).decode(errors="replace")
        os.write(master, b"\x04")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
    assert "\x1b" not in reply and reply.strip()
    prefilled = [int(re.search(r"prefill (\d+) tokens", text).group(1)) for text in (reply, second, third)]
    assert prefilled[1] < prefilled[0] and prefilled[2] > prefilled[1], prefilled


def test_an_abandoned_reply_leaves_the_history_and_a_correct_cache(llvm_artifact):
    model = TritModel(llvm_artifact)
    session = model.chat()
    pieces = session.send("Balanced ternary", max_new_tokens=12)
    next(pieces)
    pieces.close()  # the user interrupted the reply
    assert session.messages == []
    assert "".join(session.send("Balanced ternary", max_new_tokens=12)) == \
        "".join(model.chat().send("Balanced ternary", max_new_tokens=12))
