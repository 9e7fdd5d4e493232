"""Replies smtpguard sends on its own, as named constants.

Each reply carries its basic code, its RFC 3463 enhanced code and its text.
The enhanced code is shown only when the session negotiated
ENHANCEDSTATUSCODES (RFC 2034), as Postfix does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """A local reply: ``code``, ``enhanced`` (RFC 3463) and a text template."""

    code: int
    enhanced: str
    text: str

    def render(self, enhanced: bool, **fields: str) -> bytes:
        """The reply on the wire, one line, CRLF-terminated."""
        text = self.text.format(**fields) if fields else self.text
        if enhanced:
            return f"{self.code} {self.enhanced} {text}\r\n".encode()
        return f"{self.code} {text}\r\n".encode()


#: A command out of sequence; ``{expected}`` names what should come.
BAD_SEQUENCE = Reply(503, "5.5.1", "Error: {expected}")
#: A command we do not know, or one reserved for trusted proxies.
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
#: A command line over the configured length.
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
#: A command line that is not text (NUL byte, not ASCII verb).
BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
#: BDAT without a valid size: what follows cannot be framed, so the session
#: ends (Postfix: 521 and hang up).
BAD_BDAT = Reply(521, "5.5.4", "Syntax: BDAT count [LAST]")
#: A verb of a service extension that was not offered (RFC 5321 4.2.4).
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
#: AUTH when the upstream offers no AUTH (Postfix's text).
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
#: STARTTLS while smtpguard has no TLS configured (Postfix says the same).
STARTTLS_UNAVAILABLE = Reply(502, "5.5.1", "Error: command not implemented")
#: STARTTLS accepted: the TLS handshake follows (RFC 3207).
STARTTLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
#: STARTTLS inside TLS (Postfix's text).
TLS_ALREADY_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")
#: AUTH on a plaintext session when TLS is required (RFC 4954 6, Postfix's text).
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
#: The upstream could not be reached.
UPSTREAM_UNAVAILABLE = Reply(421, "4.3.0", "{hostname} Service not available, try again later")
#: The upstream went away or broke the protocol mid-session.
UPSTREAM_LOST = Reply(421, "4.4.2", "{hostname} Error: lost connection to mail server")
#: The upstream did not answer in time.
UPSTREAM_TIMEOUT = Reply(421, "4.4.2", "{hostname} Error: mail server timeout")
#: The client was idle too long.
CLIENT_TIMEOUT = Reply(421, "4.4.2", "{hostname} Error: timeout exceeded")
#: QUIT answered by smtpguard (deferred connect: no upstream was needed).
BYE = Reply(221, "2.0.0", "Bye")
#: Every upstream session slot is taken and the wait for one ran out.
UPSTREAM_BUSY = Reply(421, "4.3.2", "{hostname} Service busy, try again later")
#: The service is shutting down.
SHUTTING_DOWN = Reply(421, "4.3.2", "{hostname} Service shutting down, closing connection")

# Command syntax (protocol/syntax.py).  Texts follow Postfix 3.7's smtpd.
#: MAIL whose path is not an address (RFC 5321 4.1.2; Postfix's text).
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
#: RCPT whose path is not an address (RFC 5321 4.1.2; Postfix's text).
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
#: MAIL without ``FROM:`` or without a path (Postfix's text).
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
#: RCPT without ``TO:`` or without a path (Postfix's text).
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
#: EHLO/HELO without an argument; ``{verb}`` is EHLO or HELO (Postfix's text).
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: {verb} hostname")
#: EHLO/HELO whose argument is not a domain or an address literal (Postfix's
#: reject_invalid_helo_hostname text, without echoing the name).
BAD_HELO_NAME = Reply(501, "5.5.4", "Helo command rejected: Invalid name")
#: RSET, DATA or STARTTLS with an argument; ``{verb}`` names it (Postfix's text).
NO_ARGUMENT_SYNTAX = Reply(501, "5.5.4", "Syntax: {verb}")
#: Any other argument that breaks the grammar (RFC 5321 4.2.2's text for 501).
ARGUMENT_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
#: A MAIL/RCPT parameter of no extension the upstream advertised (RFC 5321
#: 4.1.1.11); ``{option}`` is its keyword (Postfix's text).
UNSUPPORTED_PARAMETER = Reply(555, "5.5.4", "Unsupported option: {option}")
#: A known MAIL/RCPT parameter with a bad value or repeated; ``{keyword}`` names it.
BAD_PARAMETER = Reply(501, "5.5.4", "Bad {keyword} parameter syntax")
#: A non-ASCII address outside an SMTPUTF8 transaction (RFC 6531 3.6, Postfix's text).
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")


def help_reply(text: tuple[str, ...], enhanced: bool) -> bytes:
    """HELP answered locally: the configured lines, then the end (214, RFC 5321 4.1.1.8)."""
    code = "214-2.0.0 " if enhanced else "214-"
    out = "".join(f"{code}{t}\r\n" for t in text)
    out += "214 2.0.0 End of HELP info\r\n" if enhanced else "214 End of HELP info\r\n"
    return out.encode()
