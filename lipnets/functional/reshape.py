r"""Lossless reshapes between spatial resolution and channels.

`space_to_depth` folds every $f \times f$ spatial block into the channel
dimension; `depth_to_space` undoes it. Both only move entries, so each is a
permutation of the flattened tensor: an orthogonal linear map with Lipschitz
constant exactly 1 in $\ell_2$, whose inverse is its transpose. This is the
norm-preserving way to downsample inside a 1-Lipschitz network (an
"invertible downsampling"), in contrast to strided convolutions or pooling,
which lose gradient norm.

Channel order (relied upon by other lipnets modules): the entry of input
channel $c$ at spatial position $(h f + i, w f + j)$, $0 \le i, j < f$, moves
to output channel $c f^2 + i f + j$ at position $(h, w)$. This is the
einops pattern `"b c (h f1) (w f2) -> b (c f1 f2) h w"`, and it is exactly the
order of `torch.nn.functional.pixel_unshuffle` (and `pixel_shuffle` for the
inverse), which the tests check.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor

from lipnets._checks import check_int, check_tensor

__all__ = ["depth_to_space", "space_to_depth"]


def _check_input(x: object, name: str) -> Tensor:
    x = check_tensor(x, "x")
    if x.ndim < 3:
        raise ValueError(
            f"{name} expects x of shape (*, C, H, W) with x.ndim >= 3, "
            f"got x.ndim={x.ndim} (shape {tuple(x.shape)})"
        )
    return x


def space_to_depth(x: Tensor, factor: int) -> Tensor:
    r"""Fold each $f \times f$ spatial block into channels (invertible downsampling).

    Maps a tensor of shape $(*, C, H, W)$ to $(*, C f^2, H / f, W / f)$ with
    $f$ = `factor`. Input channel $c$ at position $(h f + i, w f + j)$ goes to
    output channel $c f^2 + i f + j$ at $(h, w)$, i.e. the einops pattern
    `"b c (h f1) (w f2) -> b (c f1 f2) h w"`. This is the same operation, with
    the same channel order, as `torch.nn.functional.pixel_unshuffle(x, f)`.

    The map permutes the entries of `x`, so it is linear and orthogonal:
    $\|\mathrm{s2d}(x) - \mathrm{s2d}(y)\|_2 = \|x - y\|_2$ for all $x, y$, and
    its Lipschitz constant is exactly 1. `depth_to_space` is its inverse.

    Args:
        x: Tensor of shape $(*, C, H, W)$ with at least 3 dimensions; the
            leading dimensions (usually one batch dimension) are kept.
        factor: Block size $f$, an int $\geq 1$ dividing both $H$ and $W$.

    Returns:
        A tensor of shape $(*, C f^2, H / f, W / f)$ with the dtype and device
        of `x`.

    Raises:
        TypeError: If `x` is not a tensor.
        ValueError: If `factor` is not an int $\geq 1$ (a bool is not
            accepted), `x` has fewer than 3 dimensions, or $H$ or $W$ is not
            divisible by `factor`.

    Examples:
        >>> import torch
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> y = space_to_depth(x, 2)
        >>> y.shape
        torch.Size([1, 4, 2, 2])
        >>> y[0, :, 0, 0]  # the top-left 2x2 block, row by row
        tensor([0., 1., 4., 5.])
        >>> bool(torch.equal(y, torch.nn.functional.pixel_unshuffle(x, 2)))
        True
        >>> bool(torch.equal(depth_to_space(y, 2), x))
        True

    References:
        Shi, W. et al. (2016). Real-time single image and video super-resolution
        using an efficient sub-pixel convolutional neural network. *CVPR*.

        Jacobsen, J.-H., Smeulders, A. & Oyallon, E. (2018). i-RevNet: Deep
        invertible networks. *ICLR*.
    """
    factor = check_int(factor, "factor")
    x = _check_input(x, "space_to_depth")
    height, width = x.shape[-2], x.shape[-1]
    if height % factor != 0 or width % factor != 0:
        raise ValueError(
            f"space_to_depth needs the spatial size to be divisible by factor={factor}, "
            f"got H={height} and W={width}"
        )
    return rearrange(x, "... c (h f1) (w f2) -> ... (c f1 f2) h w", f1=factor, f2=factor)


def depth_to_space(x: Tensor, factor: int) -> Tensor:
    r"""Unfold channels into $f \times f$ spatial blocks: the inverse of `space_to_depth`.

    Maps a tensor of shape $(*, C f^2, H, W)$ to $(*, C, H f, W f)$ with
    $f$ = `factor`, sending channel $c f^2 + i f + j$ at $(h, w)$ to channel
    $c$ at $(h f + i, w f + j)$ (einops pattern
    `"b (c f1 f2) h w -> b c (h f1) (w f2)"`). This is the same operation as
    `torch.nn.functional.pixel_shuffle(x, f)`. Like its inverse it is a
    permutation of entries, hence orthogonal with Lipschitz constant exactly 1.

    Args:
        x: Tensor of shape $(*, C f^2, H, W)$ with at least 3 dimensions.
        factor: Block size $f$, an int $\geq 1$ whose square divides the
            number of channels.

    Returns:
        A tensor of shape $(*, C, H f, W f)$ with the dtype and device of `x`.

    Raises:
        TypeError: If `x` is not a tensor.
        ValueError: If `factor` is not an int $\geq 1$, `x` has fewer than 3
            dimensions, or the number of channels is not divisible by
            `factor**2`.

    Examples:
        >>> import torch
        >>> x = torch.randn(2, 8, 3, 5)
        >>> y = depth_to_space(x, 2)
        >>> y.shape
        torch.Size([2, 2, 6, 10])
        >>> bool(torch.equal(space_to_depth(y, 2), x))
        True

    References:
        Shi, W. et al. (2016). Real-time single image and video super-resolution
        using an efficient sub-pixel convolutional neural network. *CVPR*.
    """
    factor = check_int(factor, "factor")
    x = _check_input(x, "depth_to_space")
    channels = x.shape[-3]
    if channels % (factor * factor) != 0:
        raise ValueError(
            f"depth_to_space needs the number of channels to be divisible by "
            f"factor**2={factor * factor} (factor={factor}), got C={channels}"
        )
    return rearrange(x, "... (c f1 f2) h w -> ... c (h f1) (w f2)", f1=factor, f2=factor)
