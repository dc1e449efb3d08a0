"""The one exception type the codec raises for bad input.

CLIs catch it and print its message (which names the file, tensor or field at fault) without a
traceback, then exit with status 2.
"""


import json
from pathlib import Path


class CodecError(Exception):
    """Bad input or a failed check, described in words a user can act on."""


def unique_keys(pairs: list) -> dict:
    """json object hook: a name given twice is an error, not silently the last one."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"name {dup!r} appears twice")
    return out


def read_json(path: Path):
    """A JSON file's content, or a CodecError naming the file (unreadable, not JSON, a name given twice)."""
    try:
        return json.loads(Path(path).read_text(), object_pairs_hook=unique_keys)
    except OSError as e:
        raise CodecError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise CodecError(f"{path}: invalid JSON ({e})") from None
