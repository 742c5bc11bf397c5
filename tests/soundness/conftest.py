"""Fixtures of the soundness suite, and an optional outcome log.

``LIPNETS_SOUNDNESS_LOG=path.json`` records, for every (case, entry point), whether it
was bounded (with the bound and the measured lower bound), refused (with the error), or
raised an untyped error.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.soundness import test_entry_points as T


@pytest.fixture(autouse=True, scope="module")
def _tiny_models(one_thread):
    """The models are tiny: one thread avoids scheduling overhead on a shared machine."""
    yield


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("LIPNETS_SOUNDNESS_LOG")
    if path and T.OUTCOMES:
        with open(path, "w") as f:
            json.dump(T.OUTCOMES, f, indent=1, sort_keys=True)
