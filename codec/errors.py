"""The one exception type the codec raises for bad input.

CLIs catch it and print its message (which names the file, tensor or field at fault) without a
traceback, then exit with status 2.
"""


import json
from pathlib import Path


class CodecError(Exception):
    """Bad input or a failed check, described in words a user can act on."""


def read_json(path: Path):
    """A JSON file's content, or a CodecError naming the file (unreadable or not JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise CodecError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise CodecError(f"{path}: invalid JSON ({e})") from None
