"""The argument validators of lipnets._checks, shared by every subpackage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lipnets import _checks as C
from lipnets.errors import ArgumentTypeError
from lipnets.functional.orthogonal import _CAPS


def test_argument_type_error_is_both_builtins():
    # Validators raised TypeError in some places and ValueError in others for a wrong
    # type; the shared error keeps both except clauses working.
    assert issubclass(ArgumentTypeError, TypeError)
    assert issubclass(ArgumentTypeError, ValueError)
    for bad in (True, 1.5, "2", None):
        with pytest.raises(ArgumentTypeError):
            C.check_int(bad, "n")


def test_check_int():
    assert C.check_int(3, "n") == 3
    assert type(C.check_int(np.int64(4), "n")) is int
    assert C.check_int(0, "padding", 0) == 0
    assert C.check_int(5, "c", maximum=5) == 5
    with pytest.raises(ValueError, match=r"^n must be an int >= 1, got 0$"):
        C.check_int(0, "n")
    with pytest.raises(ValueError, match=r"c must be an int in \[1, 4\], got 5"):
        C.check_int(5, "c", maximum=4)
    with pytest.raises(TypeError, match=r"n must be an int >= 1, got True \(bool\)"):
        C.check_int(True, "n")


def test_check_optional_int():
    assert C.check_optional_int(None, "iterations") is None
    assert C.check_optional_int(2, "iterations") == 2
    with pytest.raises(ValueError, match="iterations must be None or an int >= 1, got 0"):
        C.check_optional_int(0, "iterations")
    with pytest.raises(TypeError, match="iterations must be None or an int"):
        C.check_optional_int(1.0, "iterations")


def test_check_int_pair():
    assert C.check_int_pair(2, "k") == (2, 2)
    assert C.check_int_pair((1, 3), "k") == (1, 3)
    assert C.check_int_pair([4], "k") == (4, 4)  # one entry, as torch.nn.Conv2d reads it
    assert C.check_int_pair(torch.Size([2, 5]), "k") == (2, 5)
    assert C.check_int_pair((0, 0), "padding", 0) == (0, 0)
    message = r"k must be an int >= 1 or a pair of such ints, got "
    with pytest.raises(ValueError, match=message + r"\(1, 2, 3\)"):
        C.check_int_pair((1, 2, 3), "k")
    with pytest.raises(ValueError, match=message + r"\(0, 2\)"):
        C.check_int_pair((0, 2), "k")
    for bad in (True, 1.5, (1, 1.5), (True, 2), "ab", None):
        with pytest.raises(ArgumentTypeError, match=message):
            C.check_int_pair(bad, "k")


def test_check_square():
    assert C.check_square(3, "k") == 3
    assert C.check_square([2, 2], "k") == 2
    with pytest.raises(ValueError, match=r"s must be an int >= 1 or a pair of equal ints \(why\)"):
        C.check_square((1, 2), "s", why=" (why)")
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        C.check_square(0, "k")
    with pytest.raises(ArgumentTypeError):
        C.check_square(2.0, "k")


def test_check_dim():
    assert C.check_dim(-1) == -1
    with pytest.raises(TypeError, match=r"dim must be an int, got 1.0 \(float\)"):
        C.check_dim(1.0)


def test_check_real_and_probability():
    assert C.check_real(2, "x") == 2.0
    assert C.check_real(0.0, "alpha", low=0.0) == 0.0
    with pytest.raises(ValueError, match=r"margin must be finite and in \(0, inf\), got 0"):
        C.check_real(0, "margin", low=0.0, low_open=True)
    with pytest.raises(ValueError, match=r"x must be finite and in \(-inf, inf\), got nan"):
        C.check_real(math.nan, "x")
    with pytest.raises(ValueError, match=r"t must be finite and in \[0, 1\], got 2"):
        C.check_real(2, "t", low=0.0, high=1.0)
    with pytest.raises(TypeError, match="x must be a real number, got bool"):
        C.check_real(True, "x")
    with pytest.raises(TypeError, match="x must be a real number, got Tensor"):
        C.check_real(torch.tensor(1.0), "x")
    assert C.check_probability(0.5, "p") == 0.5
    assert C.check_probability(1, "p", closed=True) == 1.0
    for bad in (0, 1, -0.1):
        with pytest.raises(ValueError, match=r"p must be finite and in \(0, 1\)"):
            C.check_probability(bad, "p")


def test_check_choice():
    assert C.check_choice("sum", "reduction", ("none", "mean", "sum")) == "sum"
    assert C.check_choice(np.int64(2), "order", (1, 2)) == 2
    assert C.check_choice(torch.float64, "dtype", (torch.float32, torch.float64)) is torch.float64
    for bad in (True, 1.0, "1"):  # equal to 1 in Python, but not the choice 1
        with pytest.raises(ValueError, match="order must be one of 1 or 2, got"):
            C.check_choice(bad, "order", (1, 2))
    with pytest.raises(ValueError, match=r"one of 'a', 'b' or 'c' \(why\), got \['a'\]"):
        C.check_choice(["a"], "x", ("a", "b", "c"), why=" (why)")
    with pytest.raises(ValueError, match="one of"):
        C.check_choice(torch.tensor(1), "order", (1, 2))


@pytest.mark.parametrize(
    ("spelling", "value"),
    [(2, 2.0), (2.0, 2.0), ("2", 2.0), ("L2", 2.0), (math.inf, math.inf), ("inf", math.inf)],
)
def test_check_norm(spelling, value):
    assert C.check_norm(spelling) == value
    assert C.check_norm("linf") == math.inf


@pytest.mark.parametrize("bad", [1, 3, "l1", True, None, -math.inf])
def test_check_norm_refuses(bad):
    with pytest.raises(ValueError, match=r"norm must be 2 or float\('inf'\)"):
        C.check_norm(bad)


def test_check_eps():
    radii = C.check_eps(0.5, 3)
    assert radii.shape == (3,) and radii.dtype == torch.float64
    per_sample = torch.tensor([0.0, 1.0], dtype=torch.float32)
    assert torch.equal(C.check_eps(per_sample, 2, dtype=torch.float32), per_sample)
    assert torch.equal(C.check_eps(torch.tensor(2.0), 2), torch.full((2,), 2.0).double())
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        C.check_eps(-1.0, 2)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        C.check_eps(torch.tensor([0.0, math.inf]), 2)
    with pytest.raises(ValueError, match=r"eps must be a float or a real tensor of shape"):
        C.check_eps(torch.zeros(3), 2)
    with pytest.raises(TypeError, match=r"eps must be a float or a real tensor"):
        C.check_eps("0.1", 2)
    with pytest.raises(TypeError, match=r"dtype torch\.bool"):
        C.check_eps(torch.tensor(True), 2)


def test_check_radii():
    assert C.check_radii(0.5) == [0.5]
    assert C.check_radii((0, 1)) == [0.0, 1.0]
    assert C.check_radii(torch.tensor([0.25, 0.5])) == [0.25, 0.5]
    assert C.check_radii(torch.tensor(0.5)) == [0.5]
    with pytest.raises(ValueError, match="non-empty"):
        C.check_radii([])
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        C.check_radii([0.1, -0.1])
    with pytest.raises(TypeError, match="eps must be a number or a sequence of numbers"):
        C.check_radii([0.1, None])


def test_check_tensor_and_instance():
    t = torch.zeros(2)
    assert C.check_tensor(t) is t
    with pytest.raises(TypeError, match=r"^x must be a torch\.Tensor, got list$"):
        C.check_tensor([1.0])
    with pytest.raises(
        TypeError, match=r"w must be a floating-point tensor, got dtype torch\.int64"
    ):
        C.check_tensor(torch.zeros(2, dtype=torch.int64), "w", floating=True)
    with pytest.raises(TypeError, match=r"w must be a floating-point torch\.Tensor, got list"):
        C.check_tensor([1.0], "w", floating=True)
    z = torch.zeros(2, dtype=torch.complex64)
    assert C.check_tensor(z, floating=True, allow_complex=True) is z
    with pytest.raises(TypeError, match="floating-point tensor"):
        C.check_tensor(z, floating=True)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got int"):
        C.check_instance(3, "model", torch.nn.Module, what="an nn.Module")
    with pytest.raises(TypeError, match="config must be a dict, got list"):
        C.check_instance([], "config", dict)


def test_check_shapes():
    assert C.check_shape(torch.Size([1, 3])) == (1, 3)
    assert C.check_spatial_shape((3, 8, 9)) == (3, 8, 9)
    assert C.check_spatial_shape([np.int64(8), 9]) == (8, 9)
    for bad in ((5,), (1, 0, 4), (1, 2.0, 4), "ab", None, 3):
        with pytest.raises(ValueError, match=r"input_shape must be a sequence of .*\(H, W\)"):
            C.check_spatial_shape(bad)
    with pytest.raises(ValueError, match="shape must be a sequence of at least 1 positive"):
        C.check_shape((), "shape")


def test_bjorck_options_and_orders():
    assert tuple(_CAPS) == C.BJORCK_ORDERS  # one pre-scaling cap per accepted order
    C.check_bjorck_options(1, 1e-3, None, 64)
    C.check_bjorck_options(2, 0.5, 3, 1)
    with pytest.raises(ValueError, match="order must be one of 1 or 2, got 3"):
        C.check_bjorck_options(3, 1e-3, None, 64)
    with pytest.raises(ValueError, match=r"tol must be finite and in \(0, 1\), got 1"):
        C.check_bjorck_options(1, 1, None, 64)
    with pytest.raises(ValueError, match="iterations must be None or an int >= 1, got 0"):
        C.check_bjorck_options(1, 1e-3, 0, 64)
    with pytest.raises(ValueError, match="max_iterations must be an int >= 1, got 0"):
        C.check_bjorck_options(1, 1e-3, None, 0)
