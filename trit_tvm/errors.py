"""The exception the compiler, runtime and CLIs raise for bad input (printed as one line, exit code 2)."""
from codec.errors import CodecError


class CompileError(CodecError):
    """Bad model, target or artifact, described so a user can act on it."""
