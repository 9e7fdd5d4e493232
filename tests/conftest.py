"""Test-wide settings."""

import os

from hypothesis import settings

# In CI the Hypothesis searches are derandomized: the same examples every run,
# so a landing never depends on luck.  Locally they explore new examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
