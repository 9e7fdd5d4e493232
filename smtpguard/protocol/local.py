"""The local answers that are more than a fixed reply (see
:class:`.rules.Answer`), as pure functions of the command and what the
session knows.

- HELP (with ``help_local``): 214 with the configured text, or the text of
  the topic asked for (:func:`help_reply`).
- EHLO/HELO after STARTTLS: the client must greet again (RFC 3207 4.2), but
  the upstream, which never saw STARTTLS, already has its greeting; the
  reply is made from the upstream's last EHLO reply (:func:`identify`).

The session pushes the reply, applies the transition locally and records
the :class:`~.events.LocalReply`; STARTTLS itself (220, then the handshake)
is the session's, since it changes what the I/O layer does.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import ehlo
from . import replies as R
from .options import SessionOptions
from .queue import Render
from .rules import Verb


def help_text(line: bytes, options: SessionOptions) -> tuple[str, ...]:
    """The help text for ``HELP [topic]`` (an unknown topic gets the general text)."""
    parts = line.split(None, 1)
    topic = parts[1].strip().upper().decode("ascii", "replace") if len(parts) > 1 else ""
    return options.help_topics.get(topic, options.help_text) if topic else options.help_text


def help_reply(line: bytes, options: SessionOptions) -> Render:
    """The 214 reply to ``line``, rendered when it is sent."""
    text = help_text(line, options)
    return lambda enhanced: R.help_reply(text, enhanced)


def identify(
    verb: Verb, upstream_ehlo: Sequence[bytes], options: SessionOptions, tls_active: bool
) -> tuple[bytes, ehlo.Capabilities]:
    """EHLO/HELO after STARTTLS: the reply, from the upstream's last EHLO
    reply, and what the client may use from now on."""
    if verb is Verb.EHLO:
        return ehlo.rewrite(upstream_ehlo, options, tls_active)
    return ehlo.helo_reply(upstream_ehlo, options.hostname), ehlo.NO_EXTENSIONS
