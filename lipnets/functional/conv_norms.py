r"""Sound spectral-norm bounds for 2-D convolutions, as torch's ``nn.Conv2d`` computes them.

[`conv2d_spectral_norm_bound`][lipnets.functional.conv_norms.conv2d_spectral_norm_bound]
bounds the $\ell_2 \to \ell_2$ norm of ``x -> F.conv2d(pad(x), weight, None, stride, 0,
dilation, groups)`` for every padding torch offers, from the realised weight, in float64.
The proofs are the notes of the two modules beside this one; tests/test_conv_bound.py
checks each against the dense operator's SVD.

* `lipnets.functional._conv_symbol`: the symbol, its polyphase form for a stride, and its
  supremum over all frequencies, certified on a grid (Note [Convolution symbol], Note
  [Polyphase form of a strided convolution], Note [Bound for every input size], Note
  [Certified largest eigenvalue]).
* `lipnets.functional._conv_sizes`: the bounds at a given input size and the norms of the
  pad operators (Note [Zero padding at a given size], Note [Output section at a given
  size], Note [Circular padding at a given size], Note [Reflect and replicate padding]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lipnets._checks import check_choice, check_int, check_int_pair, check_tensor
from lipnets.functional._conv_sizes import _circular_case, _pad_copies, _valid_case, _zeros_case
from lipnets.functional._conv_symbol import _EPS64

__all__ = ["conv2d_spectral_norm_bound"]

_PADDING_MODES = ("zeros", "circular", "reflect", "replicate")


def conv2d_spectral_norm_bound(
    weight: torch.Tensor,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    input_size: Sequence[int] | None = None,
) -> torch.Tensor:
    r"""Sound upper bound on the $\ell_2 \to \ell_2$ norm of a 2-D convolution.

    The operator is ``x -> F.conv2d(pad(x), weight, None, stride, 0, dilation, groups)``
    with ``pad`` exactly as ``nn.Conv2d(padding=padding, padding_mode=padding_mode)``
    applies it; the bias is a translation and plays no part. All arithmetic is float64 with
    rounding slack (Note [Certified largest eigenvalue] in `lipnets.functional._conv_symbol`).

    * Circular padding with ``input_size`` given: the exact norm (Sedghi et al. 2019, one
      $c_{out} \times s_1 s_2 c_{in}$ matrix per frequency for stride $s$; Note [Circular
      padding at a given size]) whenever the padded convolution is the circular one, e.g.
      odd $k$ with padding $(k - 1)/2$ or ``"same"``, and the stride divides the size.
    * Zero padding with ``input_size``: the norm of a circular convolution on a slightly
      larger torus that contains it (Note [Zero padding at a given size]), or, when that
      is smaller, of the layer without the input's edges (exact for small "valid"
      convolutions; Note [Output section at a given size]).
    * Without ``input_size`` the bound holds for every input size: the supremum of the
      symbol over all frequencies, certified on a grid (Note [Bound for every input size]).
    * Reflect and replicate padding multiply by the exact norm of the pad operator (Note
      [Reflect and replicate padding]); circular padding that repeats outputs by the
      square root of the repeat count.

    Args:
        weight: the kernel, shape ``(out_channels, in_channels / groups, kh, kw)``.
        stride: an int or a pair of positive ints.
        padding: an int or a pair of non-negative ints, ``"same"`` or ``"valid"``.
        dilation: an int or a pair of positive ints.
        groups: a positive int dividing ``out_channels``.
        padding_mode: ``"zeros"``, ``"circular"``, ``"reflect"`` or ``"replicate"``.
        input_size: the spatial input size ``(H, W)``, or ``None`` for a bound valid for
            every size.

    Returns:
        A 0-dim float64 tensor on the CPU, detached from autograd.

    Raises:
        TypeError: if ``weight`` is not a floating-point tensor, or an integer argument
            is not an int.
        ValueError: if ``weight`` is not 4-D, is uninitialised, or holds NaN or infinite
            entries; if an argument is out of range (an unknown ``padding_mode``,
            ``padding="same"`` with a stride, ``groups`` not dividing ``out_channels``); or
            if ``input_size`` is too small for the kernel or the padding mode.

    Examples:
        >>> import torch
        >>> from lipnets.functional.conv_norms import conv2d_spectral_norm_bound
        >>> w = torch.zeros(1, 1, 3, 3)
        >>> w[0, 0, 1, :] = torch.tensor([1.0, 2.0, 1.0])  # symbol 2 + 2 cos(w2), max 4 at 0
        >>> exact = conv2d_spectral_norm_bound(
        ...     w, padding=1, padding_mode="circular", input_size=(8, 8)
        ... )
        >>> bool(4.0 <= exact <= 4.0 * (1 + 1e-9))
        True
        >>> every_size = conv2d_spectral_norm_bound(w, padding=1)  # any H, W, zero padding
        >>> bool(4.0 <= every_size <= 4.0 * 1.01)
        True

    References:
        H. Sedghi, V. Gupta, P. M. Long. *The Singular Values of Convolutional Layers*.
        ICLR 2019.

        B. Delattre, Q. Barthélemy, A. Allauzen. *Spectral Norm of Convolutional Layers
        with Circular and Zero Paddings*. arXiv:2402.00240, 2024.
    """
    w = _check_weight(weight)
    strides = check_int_pair(stride, "stride", 1)
    dilations = check_int_pair(dilation, "dilation", 1)
    groups = check_int(groups, "groups")
    if w.shape[0] % groups:
        raise ValueError(
            f"groups must divide out_channels = weight.shape[0] = {w.shape[0]}, got {groups}"
        )
    check_choice(padding_mode, "padding_mode", _PADDING_MODES)
    kernel = (int(w.shape[2]), int(w.shape[3]))
    pads = _pads(padding, kernel, dilations, strides)
    kd = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilations, strict=True))
    size = None if input_size is None else check_int_pair(input_size, "input_size", 1)
    if size is not None:
        _check_size(size, pads, kd, strides, padding_mode)
    if w.numel() == 0 or not bool(w.any()):
        return torch.zeros((), dtype=torch.float64)
    v = w.reshape(groups, w.shape[0] // groups, w.shape[1], *kernel)

    if padding_mode == "zeros":
        lam, repeat = _zeros_case(v, strides, dilations, pads, kd, size), 1
    elif padding_mode == "circular":
        lam, repeat = _circular_case(v, strides, dilations, pads, kd, size)
    else:
        lam = _valid_case(v, strides, dilations, pads, kd, size)
        repeat = math.prod(
            _pad_copies(padding_mode, pads[i], kd[i], None if size is None else size[i])
            for i in range(2)
        )
    bound = math.sqrt(lam * repeat) * (1.0 + 64 * _EPS64)
    return torch.tensor(bound, dtype=torch.float64)


# --- arguments -------------------------------------------------------------------------------


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if isinstance(weight, torch.nn.parameter.UninitializedParameter):
        raise ValueError("weight is an uninitialised lazy parameter: run one forward pass first")
    check_tensor(weight, "weight", floating=True)
    if weight.ndim != 4:
        raise ValueError(
            "weight must be 4-D (out_channels, in_channels / groups, kh, kw), "
            f"got shape {tuple(weight.shape)}"
        )
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight contains NaN or infinite entries; no Lipschitz bound exists")
    return w


def _pads(
    padding: object, kernel: tuple[int, int], dilation: tuple[int, int], stride: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Per-dimension (before, after) pads, as nn.Conv2d applies them."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(
                    f"padding='same' needs stride 1 (as in torch), got stride={stride}"
                )
            total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
            before = [t // 2 for t in total]  # torch puts the odd extra pad after
            return (before[0], total[0] - before[0]), (before[1], total[1] - before[1])
        raise ValueError(
            f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}"
        )
    ph, pw = check_int_pair(padding, "padding", 0)
    return (ph, ph), (pw, pw)


def _check_size(size, pads, kd, strides, mode) -> None:
    for i, dim in enumerate(("H", "W")):
        n, (pt, pb) = size[i], pads[i]
        if n + pt + pb < kd[i]:
            raise ValueError(
                f"input_size {dim}={n} is too small: padded size {n + pt + pb} is below the "
                f"dilated kernel size {kd[i]}"
            )
        if mode == "circular" and max(pt, pb) > n:
            raise ValueError(
                f"circular padding {(pt, pb)} exceeds input_size {dim}={n} (torch refuses it)"
            )
        if mode == "reflect" and max(pt, pb) >= n:
            raise ValueError(
                f"reflect padding {(pt, pb)} must be < input_size {dim}={n} (torch refuses it)"
            )
