"""Test-wide settings."""

import os
from pathlib import Path

import pytest
from hypothesis import settings
from support.tls import TLSFiles, make_tls_files

# In CI the Hypothesis searches are derandomized: the same examples every run,
# so a landing never depends on luck.  Locally they explore new examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    """A CA and a server certificate (``localhost``, ``guard.test``) as PEM files."""
    return make_tls_files(tmp_path)
