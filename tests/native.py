"""Tests of a C module run where it is built; under CI a module that did not build is a failure."""
import os

import pytest


def require_built(built: bool, what: str, source: str) -> None:
    """Fail (under CI) or skip the test when the C module ``what`` (from ``source``) is not built."""
    if built:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} did not build ({source}): is a C compiler installed?")
    pytest.skip(f"{what} is not built here (no C compiler, or MARLGRC_NO_NATIVE)")
