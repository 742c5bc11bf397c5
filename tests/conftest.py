"""Fixtures shared by the whole suite: the floating dtypes and their tolerances.

``dtype`` runs a test once in float32 and once in float64; ``tol`` gives that dtype's
tolerances; ``f64_tol`` gives the float64 ones to a test that runs in float64 only (a
dense float64 ground truth). A tolerance here bounds *rounding*: a check whose error
comes from an iterative method (power iteration, Bjorck steps, gradient ascent) keeps
the tolerance of that method, written where it is used.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Relative and absolute tolerances for one dtype, and that dtype's machine epsilon."""

    rtol: float
    atol: float
    eps: float

    def assert_close(self, actual, expected, **kwargs) -> None:
        """``torch.testing.assert_close`` with these tolerances."""
        torch.testing.assert_close(actual, expected, rtol=self.rtol, atol=self.atol, **kwargs)

    def approx(self, expected):
        """``pytest.approx`` with these tolerances (``abs`` defaults to ``atol``)."""
        return pytest.approx(expected, rel=self.rtol, abs=self.atol)


TOLERANCES = {
    # float32 (eps ~1.2e-7): rtol 1e-4 is ~840 eps, room for the rounding of a short chain
    # of float32 matmuls, convolutions and FFTs on O(1) data; atol 1e-5 (~84 eps) covers
    # entries that cancel to about zero. Looser than torch's float32 defaults (rtol 1.3e-6,
    # atol 1e-5): use it for new float32 coverage, never in place of a tighter check.
    torch.float32: Tolerance(rtol=1e-4, atol=1e-5, eps=torch.finfo(torch.float32).eps),
    # float64 (eps ~2.2e-16): rtol = atol = 1e-12 (~4500 eps), the value the suite's float64
    # ground-truth checks already used (dense operators, closed forms, exact identities).
    # Tighter than torch's float64 defaults (rtol 1e-7, atol 1e-7).
    torch.float64: Tolerance(rtol=1e-12, atol=1e-12, eps=torch.finfo(torch.float64).eps),
}
"""The tolerance of each floating dtype the ``dtype`` fixture runs."""


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request) -> torch.dtype:
    """The floating dtype of this run of the test: float32, then float64."""
    return request.param


@pytest.fixture
def tol(dtype: torch.dtype) -> Tolerance:
    """The tolerances of the current ``dtype`` (see ``TOLERANCES``)."""
    return TOLERANCES[dtype]


@pytest.fixture
def f64_tol() -> Tolerance:
    """The float64 tolerances, for a test that runs in float64 only."""
    return TOLERANCES[torch.float64]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: under two xdist workers on two cores, heavy
    tests that each use every core fight, and small dense SVDs in multi-threaded LAPACK
    spin (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``). The setting
    is restored afterwards, so the rest of the session keeps its own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
