"""A CA and a server certificate for in-process TLS tests (trustme)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class TLSFiles:
    ca: trustme.CA
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def make_tls_files(folder: Path) -> TLSFiles:
    """A certificate for ``localhost`` and ``guard.test`` with its key, in ``folder``."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "guard.test")
    cert, key = folder / "cert.pem", folder / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return TLSFiles(ca, cert, key)
