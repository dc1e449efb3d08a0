"""MetaSchedule tuning over TVM RPC (a tracker and two servers on loopback), records applied by trit-compile."""
import json
import socket
import subprocess
import sys
import time

import pytest

from codec.cli import quantize_main
from trit_tvm.cli import compile_main, tune_main
from trit_tvm.runtime import TritModel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rpc_tracker():
    """A TVM RPC tracker with two servers registered under the key 'trit-test'."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                               "--port", str(port), "--port-end", str(port + 1)])]
    time.sleep(2)
    for _ in range(2):
        p = _free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--tracker",
                                       f"127.0.0.1:{port}", "--key", "trit-test", "--host", "127.0.0.1",
                                       "--port", str(p), "--port-end", str(p + 1)]))
    from tvm import rpc
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            summary = rpc.connect_tracker("127.0.0.1", port).summary()
            if any(s["key"].startswith("server:trit-test") for s in summary["server_info"]):
                if sum(1 for s in summary["server_info"] if s["key"].startswith("server:trit-test")) == 2:
                    break
        except (RuntimeError, ConnectionError, OSError):
            pass
        time.sleep(1)
    else:
        pytest.fail("RPC servers did not register with the tracker")
    yield f"127.0.0.1:{port}"
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=10)


def test_tune_over_rpc_then_compile_applies_records(tiny_hf, tmp_path, rpc_tracker):
    trit = tmp_path / "trit"
    assert quantize_main([str(tiny_hf), str(trit), "--depth", "3"]) == 0
    logs = tmp_path / "logs"
    assert tune_main([str(trit), "--trials", "1", "--tuning-logs", str(logs), "--rpc-tracker", rpc_tracker,
                      "--rpc-key", "trit-test"]) == 0
    records = list(logs.glob("*/database_tuning_record.json"))
    assert records and records[0].read_text().strip()
    assert compile_main([str(trit), "-o", str(tmp_path / "tuned"), "--tuning-logs", str(logs)]) == 0
    assert compile_main([str(trit), "-o", str(tmp_path / "hand"), "--no-tuning-logs"]) == 0
    tuned = json.loads((tmp_path / "tuned" / "manifest.json").read_text())["tuned_kernels"]
    assert tuned and json.loads((tmp_path / "hand" / "manifest.json").read_text())["tuned_kernels"] == []
    prompt = [5, 17, 42, 99, 3, 250, 7]
    tuned, hand = TritModel(tmp_path / "tuned"), TritModel(tmp_path / "hand")
    assert tuned.generate(prompt, 24).tokens == hand.generate(prompt, 24).tokens
    _records_that_do_not_win_are_dropped(trit, logs, tmp_path)


def _records_that_do_not_win_are_dropped(trit, logs, tmp_path):
    """keep_records_that_win (what a local trit-tune ends with) on the records above: with no margin to
    beat every record stays; with an unbeatable one every record goes and trit-compile uses the hand rules."""
    from codec import load_trit_checkpoint
    from trit_tvm.compile import checkpoint_depths, export_model
    from trit_tvm.models import architecture_of
    from trit_tvm.targets import parse_target
    from trit_tvm.tuning import decode_gemv_kernels, fused_module, keep_records_that_win
    ckpt = load_trit_checkpoint(trit)
    target = parse_target("llvm")
    kernels = decode_gemv_kernels(fused_module(export_model(*architecture_of(ckpt.config), checkpoint_depths(ckpt),
                                                            target).mod))
    (work_dir,) = [p.parent for p in logs.glob("*/database_tuning_record.json")]
    rows = keep_records_that_win(kernels, work_dir, target, margin=0.0)
    assert rows and all(r["kept"] and r["hand_s"] > 0 and r["tuned_s"] > 0 for r in rows)
    rows = keep_records_that_win(kernels, work_dir, target, margin=float("inf"))
    assert not any(r["kept"] for r in rows)
    assert (work_dir / "database_tuning_record.json").read_text().strip() == ""
    assert compile_main([str(trit), "-o", str(tmp_path / "dropped"), "--tuning-logs", str(logs)]) == 0
    assert json.loads((tmp_path / "dropped" / "manifest.json").read_text())["tuned_kernels"] == []


def test_bad_rpc_tracker_is_a_clear_error(tmp_path, capsys):
    code = tune_main(["--config", "0.5B", "--rpc-tracker", "nowhere", "--tuning-logs", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--rpc-tracker must be HOST:PORT" in err and "Traceback" not in err


def test_unknown_config_is_a_clear_error(tmp_path, capsys):
    code = tune_main(["--config", "13B", "--tuning-logs", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "no such config" in err
