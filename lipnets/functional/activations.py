r"""Sorting activations: GroupSort, MaxMin and FullSort.

Each activation rearranges the entries of its input along one dimension (the
channel dimension by default) without changing any value. On every region where
the order of the entries is fixed, the map is a fixed permutation matrix, which
is orthogonal; the map is continuous, so it is 1-Lipschitz in $\ell_2$ and its
Jacobian, where it exists, preserves the norm of every vector. This is what
makes these activations the standard choice for 1-Lipschitz networks: unlike
ReLU they lose no gradient norm.

The backward pass of every function here is a permutation as well, even where
entries tie: each output's gradient is routed to exactly one input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lipnets._checks import check_dim, check_int, check_tensor

__all__ = ["full_sort", "group_sort", "max_min"]


def _check_dim(x: Tensor, dim: object) -> int:
    """Return ``dim`` as a non-negative index into ``x``'s dimensions."""
    dim = check_dim(dim)
    ndim = x.ndim
    if ndim == 0:
        raise IndexError(
            f"dim={dim} is out of range: x is 0-dimensional (x.ndim=0); "
            "sorting activations need x.ndim >= 1"
        )
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"dim={dim} is out of range for x with x.ndim={ndim} "
            f"(expected dim in [{-ndim}, {ndim - 1}])"
        )
    return dim % ndim


def group_sort(x: Tensor, group_size: int, dim: int = 1) -> Tensor:
    r"""Sort contiguous groups of channels in ascending order (GroupSort).

    Dimension `dim` of size $C$ is split into $C / g$ contiguous groups of
    $g$ = `group_size` channels, $[0, g), [g, 2g), \dots$, and each group is
    sorted in ascending order. Values are only rearranged, never changed, so
    the output is a permutation of the input within each group.

    The map is 1-Lipschitz in $\ell_2$: it is continuous and, on each region
    where the order of the entries is fixed, equal to a fixed permutation
    matrix. Its vector-Jacobian product is a permutation of the upstream
    gradient (also at ties), so gradient norms are preserved exactly.
    `group_size=2` is MaxMin up to the order within each pair (see
    `max_min`); `group_size=C` is
    `full_sort`.

    Args:
        x: Input tensor of any rank $\geq 1$, any dtype that `torch.sort`
            supports, on any device.
        group_size: Number $g \geq 1$ of channels per group; it must divide
            `x.shape[dim]`. `group_size=1` returns `x` unchanged.
        dim: Dimension holding the channels; negative values count from the
            end (`dim=-1` for channels-last layouts such as NHWC).

    Returns:
        A tensor with the shape, dtype and device of `x` whose groups along
        `dim` are sorted in ascending order.

    Raises:
        TypeError: If `x` is not a tensor or `dim` is not an int.
        ValueError: If `group_size` is not an int $\geq 1$ (a bool is not
            accepted), or does not divide the number of channels.
        IndexError: If `dim` is out of range for `x.ndim`.

    Examples:
        >>> x = torch.tensor([[3.0, 1.0, -2.0, 5.0]])
        >>> y = group_sort(x, group_size=2)
        >>> y
        tensor([[ 1.,  3., -2.,  5.]])
        >>> # each group of the output holds the same values as the input group
        >>> bool(torch.equal(y.view(2, 2).sort().values, x.view(2, 2).sort().values))
        True

    References:
        Anil, C., Lucas, J. & Grosse, R. (2019). Sorting out Lipschitz function
        approximation. *Proceedings of the 36th International Conference on
        Machine Learning (ICML)*, PMLR 97:291-301.
    """
    check_tensor(x)
    group_size = check_int(group_size, "group_size")
    given_dim = dim
    dim = _check_dim(x, dim)
    channels = x.shape[dim]
    if channels % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the {channels} channels along dim {given_dim}"
        )
    if group_size == 1:
        return x
    if group_size == channels:
        return torch.sort(x, dim=dim).values
    # Split the channel dimension into (groups, group_size) and sort the new
    # inner dimension; a reshape of a view, no data moves except the sort.
    grouped = x.unflatten(dim, (channels // group_size, group_size))
    return torch.sort(grouped, dim=dim + 1).values.flatten(dim, dim + 1)


def max_min(x: Tensor, dim: int = 1) -> Tensor:
    r"""Write the maximum then the minimum of each adjacent channel pair (MaxMin).

    Channels $(2i, 2i + 1)$ along `dim` form a pair $(a, b)$, and the output
    holds $(\max(a, b), \min(a, b))$ at positions $(2i, 2i + 1)$.

    **Documented order.** The larger entry comes first, so `max_min(x)` equals
    `group_sort(x, 2, dim)` with the two entries of every pair swapped. Both
    orders appear in implementations; the order does not change the Lipschitz
    constant, but it does change which weights a trained network expects, so
    it is fixed here.

    No sort is used: the outputs are `torch.maximum(a, b)` and
    `torch.minimum(a, b)`, so ONNX export gives elementwise `Max` and `Min`
    (no `TopK` or `Sort`), which external verifiers and bound propagation
    understand. A NaN in a pair makes both of its outputs NaN.

    Note [MaxMin ties]: off exact ties ($a \neq b$, all but a measure-zero
    set) the Jacobian is a permutation, so gradients keep their norm. At an
    exact tie `torch.maximum`/`torch.minimum` split the gradient evenly, which
    maps an upstream gradient $(g_0, g_1)$ to $\tfrac12(g_0 + g_1)(1, 1)$: a
    norm that can shrink but never grow, so the layer stays 1-Lipschitz.

    Args:
        x: Input tensor of any rank $\geq 1$ with an even number of channels
            along `dim`.
        dim: Dimension holding the channels; negative values count from the
            end.

    Returns:
        A tensor with the shape, dtype and device of `x`, holding the maximum
        then the minimum of each pair along `dim`.

    Raises:
        TypeError: If `x` is not a tensor or `dim` is not an int.
        ValueError: If the number of channels along `dim` is odd.
        IndexError: If `dim` is out of range for `x.ndim`.

    Examples:
        >>> x = torch.tensor([[1.0, 4.0, 2.0, -3.0]])
        >>> y = max_min(x)
        >>> y
        tensor([[ 4.,  1.,  2., -3.]])
        >>> bool(torch.equal(y, group_sort(x, 2).unflatten(1, (2, 2)).flip(2).flatten(1)))
        True

    References:
        Chernodub, A. & Nowicki, D. (2016). Norm-preserving Orthogonal
        Permutation Linear Unit activation functions (OPLU). arXiv:1604.02313.

        Anil, C., Lucas, J. & Grosse, R. (2019). Sorting out Lipschitz function
        approximation. *Proceedings of the 36th International Conference on
        Machine Learning (ICML)*, PMLR 97:291-301.
    """
    check_tensor(x)
    given_dim = dim
    dim = _check_dim(x, dim)
    channels = x.shape[dim]
    if channels % 2 != 0:
        raise ValueError(
            f"max_min pairs adjacent channels, so the channel count along dim {given_dim} "
            f"must be divisible by 2; got {channels} channels"
        )
    pairs = x.unflatten(dim, (channels // 2, 2))
    a, b = pairs.unbind(dim + 1)
    # See Note [MaxMin ties] in the docstring for the gradient at a == b.
    high = torch.maximum(a, b)
    low = torch.minimum(a, b)
    return torch.stack((high, low), dim=dim + 1).flatten(dim, dim + 1)


def full_sort(x: Tensor, dim: int = 1) -> Tensor:
    r"""Sort the whole dimension `dim` in ascending order (FullSort).

    This is `group_sort` with a
    single group holding every channel. It is 1-Lipschitz in $\ell_2$ and its
    vector-Jacobian product is a permutation of the upstream gradient.

    Args:
        x: Input tensor of any rank $\geq 1$.
        dim: Dimension to sort; negative values count from the end.

    Returns:
        A tensor with the shape, dtype and device of `x`, sorted in ascending
        order along `dim`.

    Raises:
        TypeError: If `x` is not a tensor or `dim` is not an int.
        IndexError: If `dim` is out of range for `x.ndim`.

    Examples:
        >>> x = torch.tensor([[2.0, -1.0, 0.5]])
        >>> y = full_sort(x)
        >>> y
        tensor([[-1.0000,  0.5000,  2.0000]])
        >>> bool(torch.equal(y.sort().values, x.sort().values))  # a permutation of x
        True

    References:
        Anil, C., Lucas, J. & Grosse, R. (2019). Sorting out Lipschitz function
        approximation. *Proceedings of the 36th International Conference on
        Machine Learning (ICML)*, PMLR 97:291-301.
    """
    check_tensor(x)
    dim = _check_dim(x, dim)
    return torch.sort(x, dim=dim).values
