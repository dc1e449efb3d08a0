"""Faults while writing outputs: a run killed mid-write, a full disk, two runs racing for one OUT, the
permissions of what is written, a missing cross compiler."""
import errno
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from codec.cli import quantize_main
from trit_tvm.cli import compile_main

QUANTIZE = "from codec.cli import quantize_main; raise SystemExit(quantize_main())"
COMPILE = "from trit_tvm.cli import compile_main; raise SystemExit(compile_main())"


def _siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _kill_when_writing(code: str, args: list, out, timeout: float = 120.0) -> None:
    """Start a CLI, SIGKILL it as soon as its work dir beside OUT exists (it is writing)."""
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    end = time.monotonic() + timeout
    while not _siblings(out):
        assert proc.poll() is None, "finished before it could be killed"
        assert time.monotonic() < end
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("tool", ["quantize", "compile"])
def test_killed_mid_write_leaves_nothing_and_the_next_run_succeeds(tool, tiny_hf, trit_ckpt, tmp_path):
    out = tmp_path / "out"
    code, args = (QUANTIZE, [tiny_hf, out]) if tool == "quantize" else (COMPILE, [trit_ckpt, "-o", out])
    _kill_when_writing(code, args, out)
    assert not out.exists() and _siblings(out)  # no output; the dead run's work dir is still there
    main = quantize_main if tool == "quantize" else compile_main
    assert main([str(a) for a in args]) == 0  # no --force needed
    assert out.is_dir() and _siblings(out) == []  # and the stale work dir is gone


@pytest.mark.parametrize("where", ["shard", "rename"])
def test_a_full_disk_is_one_line_and_leaves_nothing(where, tiny_hf, tmp_path, monkeypatch, capsys):
    import codec.atomic
    import codec.safetensors_io

    def no_space(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "shard":
        monkeypatch.setattr(codec.safetensors_io.ShardWriter, "close", no_space)
    else:
        monkeypatch.setattr(codec.atomic.os, "rename", no_space)
    out = tmp_path / "out"
    assert quantize_main([str(tiny_hf), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"trit-quantize: error: {out}: cannot write (No space left on device); nothing was written"
    assert "Traceback" not in "".join(err) and not out.exists() and _siblings(out) == []


def test_two_compiles_racing_for_one_out(trit_ckpt, tmp_path):
    out = tmp_path / "art"
    runs = [subprocess.Popen([sys.executable, "-c", COMPILE, str(trit_ckpt), "-o", str(out)], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    print(loser.strip().splitlines()[-1])  # which of the two checks caught it (-s shows it)
    assert ("another run wrote this output directory meanwhile" in loser or "output directory exists" in loser)
    assert "Traceback" not in loser
    assert {"manifest.json", "model.so", "params.safetensors"} <= {p.name for p in out.iterdir()}
    assert _siblings(out) == []
    from trit_tvm.runtime import TritModel
    assert len(TritModel(out).generate([1, 2, 3], 4).tokens) == 4  # whole: its checksum verifies


def test_outputs_get_the_usual_permissions(tiny_hf, tmp_path):
    old = os.umask(0o022)
    try:
        assert quantize_main([str(tiny_hf), str(tmp_path / "trit")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "trit").stat().st_mode) == 0o755


def test_aarch64_without_its_cross_compiler_fails_before_building(trit_ckpt, tmp_path, monkeypatch, capsys):
    import trit_tvm.compile
    monkeypatch.setattr(trit_tvm.compile.shutil, "which", lambda _name: None)
    t0 = time.perf_counter()
    assert compile_main([str(trit_ckpt), "--target", "aarch64", "-o", str(tmp_path / "arm")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "aarch64-linux-gnu-g++" in err and "apt-get install g++-aarch64-linux-gnu" in err
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "arm").exists()


def test_aarch64_output_is_named_after_its_target():
    from trit_tvm.targets import parse_target, target_label
    assert target_label(parse_target("aarch64")) == "aarch64" and target_label(parse_target("llvm")) == "llvm"
