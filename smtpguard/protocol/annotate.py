"""The annotation header: a line prepended to a message recording the
session's sequence violations (``annotate.mode``), for the upstream's filters.
"""

from __future__ import annotations

from collections.abc import Set

from .options import AnnotateMode

#: Most violation kinds ("VERB@phase") a session remembers, and names.
MAX_KINDS = 32
MAX_KINDS_SHOWN = 20


def header(mode: AnnotateMode, name: str, hostname: str, violations: int, kinds: Set[str]) -> bytes:
    """The header line for a message (CRLF included), or ``b""`` for none."""
    if mode is AnnotateMode.OFF or (mode is AnnotateMode.VIOLATIONS and not violations):
        return b""
    text = f"{name}: {hostname}; violations={violations}"
    if kinds:
        text += "; kinds=" + ",".join(sorted(kinds)[:MAX_KINDS_SHOWN])
    return text.encode("ascii", "replace") + b"\r\n"
