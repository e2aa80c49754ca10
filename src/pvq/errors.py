"""How pvq reports a failure it caught: one line a user can read, never a traceback."""
from __future__ import annotations


def one_line(exc: BaseException, with_type: bool = False) -> str:
    """The first line of an exception's message (its type name when it has none, or in front if asked)."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    if not first:
        return type(exc).__name__
    return f"{type(exc).__name__}: {first}" if with_type else first
