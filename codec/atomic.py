"""Output directories that appear whole or not at all.

Work happens in a hidden sibling `.OUT.<kind>-<pid>-<random>` that is renamed to OUT at the end. A run
killed on the way (SIGKILL, power loss) leaves its sibling behind; the next run for the same OUT removes
siblings whose process is gone, so no `--force` is needed and nothing stray accumulates. Two runs racing for
one OUT: the first rename wins, the other run reports it. A full disk or another OS error becomes a one-line
CodecError naming OUT.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CodecError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_siblings(out: Path) -> None:
    """Remove `.OUT.*-<pid>-*` work dirs beside OUT whose process no longer runs."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.*-*-*"):
        pid = p.name[len(out.name) + 2:].split("-")[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def scratch_dir(out: Path, kind: str) -> Path:
    """A new hidden work dir beside OUT, with the permissions a plain mkdir would give (mkdtemp's are 0700,
    which would keep the finished output from other users and deploy steps)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def os_errors(out: Path) -> Iterator[None]:
    """OS errors while writing OUT (a full disk, a read-only dir) as a one-line CodecError."""
    try:
        yield
    except OSError as e:
        raise CodecError(f"{out}: cannot write ({e.strerror or e}); nothing was written") from None


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a work dir beside `out`; on success move it to `out` (replacing it only with force)."""
    out = Path(out)
    if out.exists() and not force:
        raise CodecError(f"{out}: output directory exists (use --force to replace it)")
    with os_errors(out):
        remove_stale_siblings(out)
        tmp = scratch_dir(out, "tmp")
    try:
        with os_errors(out):
            yield tmp
            _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise CodecError(f"{out}: another run wrote this output directory meanwhile; it was left as that "
                             "run wrote it (use --force to replace it)")
        trash = scratch_dir(out, "old")
        os.rename(out, trash / "old")
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)  # fails if another run's complete dir took the name first
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise CodecError(f"{out}: another run wrote this output directory meanwhile; it was left as that "
                             "run wrote it") from None
        raise
