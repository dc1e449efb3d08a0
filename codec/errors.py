"""The one exception type the codec raises for bad input.

CLIs catch it and print its message (which names the file, tensor or field at fault) without a
traceback, then exit with status 2.
"""


class CodecError(Exception):
    """Bad input or a failed check, described in words a user can act on."""
