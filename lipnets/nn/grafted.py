r"""`GraftedReLU`: a ReLU whose chosen neurons are replaced by learned lines.

Linearity grafting (Chen et al., 2022) replaces the ReLUs of chosen neurons
(``mask`` true) by an affine function $a_i x_i + b_i$ with a trainable slope
and intercept per neuron, so that verification has fewer non-linearities to
relax or branch on. `lipnets.graft` picks the neurons and swaps the modules.

# Note [Grafted ReLU]

Per entry $i$ of a per-sample shape $S$, $y_i = \mathrm{relu}(x_i)$ where
$m_i = 0$ and $y_i = a_i x_i + b_i$ where $m_i = 1$. The map is elementwise,
so for $x, x'$, $|y_i - y'_i| \le s_i |x_i - x'_i|$ with $s_i = 1$ for an
ungrafted entry (ReLU is 1-Lipschitz) and $s_i = |a_i|$ for a grafted one,
hence $\|y - y'\|_2 \le \max_i s_i \, \|x - x'\|_2$: the l2 Lipschitz
constant is $\max(1, \max_{m_i = 1} |a_i|)$, or $\max_i |a_i|$ when every
entry is grafted (the maximum is attained, so the bound is exact). It is
computed from the realised slopes (after the optional clamp), and the
conversion of a slope to float64, its modulus and the maximum are exact, so
no rounding slack is needed. The paper's slopes are unconstrained, so a
grafted layer can have a constant above 1; ``max_slope`` (a departure from
the paper) clamps them in ``forward`` to $[-c, c]$, and ``max_slope=1`` keeps
the layer 1-Lipschitz. With an all-zero mask the module computes exactly
``torch.relu`` (``torch.where`` picks the ReLU branch bit for bit), and every
entry point gives what it gives for ``nn.ReLU``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lipnets._checks import check_instance, check_real, check_shape

__all__ = ["GraftedReLU"]

_INIT_SLOPE = 0.4
"""The paper's initial slope of a grafted neuron (its intercept starts at 0)."""


def _as_mask(mask: object, shape: tuple[int, ...]) -> Tensor:
    """``mask`` as a bool tensor of ``shape`` (bool, or 0/1 entries of any dtype)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool tensor of shape {shape}, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(
            f"mask must have the module's shape {shape} (one entry per neuron), "
            f"got shape {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"mask must hold only 0/1 (or bool) entries, got dtype {mask.dtype}")
        mask = mask != 0
    return mask.detach().clone()


class GraftedReLU(nn.Module):
    r"""ReLU on ungrafted neurons, a learned line $a_i x + b_i$ on grafted ones.

    For an input of shape $(N, *S)$ with $S$ = ``shape`` (``(C,)`` for a
    batch of features, ``(C, H, W)`` for images: one neuron per channel and
    position), entry $i$ of each sample is $\mathrm{relu}(x_i)$ where
    ``mask[i]`` is false and ``slope[i] * x_i + intercept[i]`` where it is
    true (Note [Grafted ReLU]). ``slope`` and ``intercept`` are trainable
    parameters of shape $S$, initialised to 0.4 and 0 as in the paper and
    unconstrained by default; ``mask`` is a bool buffer (saved in the
    ``state_dict``).

    The Lipschitz bound is $\max(1, \max_{\text{grafted}} |a_i|)$ (just
    $\max |a_i|$ when every neuron is grafted); bound propagation treats grafted
    neurons exactly (their two lines are the neuron itself: never unstable,
    never branched on), and `lipnets.propagation.local_lipschitz` uses $|a_i|$
    per grafted neuron.

    Args:
        shape: The per-sample shape $S$ of the input (without the batch
            dimension), a sequence of positive ints.
        mask: Which neurons are grafted: a bool (or 0/1) tensor of shape
            ``shape``; ``None`` (the default) grafts none.
        max_slope: ``None`` (the paper: unconstrained slopes) or a bound
            $c > 0$: ``forward`` uses $\mathrm{clamp}(a, -c, c)$, so that the
            layer's constant is at most $\max(1, c)$; ``max_slope=1.0`` keeps
            it 1-Lipschitz. A departure from the paper, off by default.
        device: Device of the parameters and the mask.
        dtype: Floating dtype of the parameters.

    Raises:
        ValueError: If ``shape`` is not a sequence of positive ints, ``mask``
            has another shape or entries other than 0/1, ``max_slope`` is not
            a finite number $> 0$, or (in ``forward``) the input's per-sample
            shape is not ``shape``.
        TypeError: If ``mask`` is not a tensor.

    Examples:
        >>> act = GraftedReLU((3,), mask=torch.tensor([False, True, True]))
        >>> x = torch.tensor([[-2.0, -2.0, 5.0]])
        >>> act(x)  # relu(-2), 0.4 * (-2), 0.4 * 5
        tensor([[ 0.0000, -0.8000,  2.0000]], grad_fn=<WhereBackward0>)
        >>> with torch.no_grad():
        ...     act.slope[2] = -3.0
        >>> act.lipschitz_bound()  # max(1, |0.4|, |-3|)
        tensor(3., dtype=torch.float64)
        >>> GraftedReLU((3,), act.mask, max_slope=1.0).lipschitz_bound()
        tensor(1., dtype=torch.float64)

    References:
        Chen, T., Zhang, H., Zhang, Z., Chang, S., Liu, S., Chen, P.-Y. &
        Wang, Z. (2022). Linearity grafting: relaxed neuron pruning helps
        certifiable robustness. *Proceedings of the 39th International
        Conference on Machine Learning (ICML)*, PMLR 162:3760-3772.
    """

    mask: Tensor

    def __init__(
        self,
        shape: Sequence[int],
        mask: Tensor | None = None,
        *,
        max_slope: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.shape = check_shape(shape, "shape")
        if max_slope is not None:
            max_slope = check_real(max_slope, "max_slope", low=0.0, low_open=True)
        self.max_slope = max_slope
        if mask is None:
            mask = torch.zeros(self.shape, dtype=torch.bool)
        self.register_buffer("mask", _as_mask(mask, self.shape).to(device))
        factory = {"device": device, "dtype": dtype}
        self.slope = nn.Parameter(torch.full(self.shape, _INIT_SLOPE, **factory))
        self.intercept = nn.Parameter(torch.zeros(self.shape, **factory))

    @classmethod
    def from_relu(
        cls,
        relu: nn.ReLU,
        shape: Sequence[int],
        mask: Tensor | None = None,
        *,
        max_slope: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> GraftedReLU:
        """A `GraftedReLU` to put in place of ``relu`` (its input's per-sample shape is
        ``shape``); with no grafted neuron it computes what ``relu`` computes (not in
        place, even for ``nn.ReLU(inplace=True)``).

        Raises:
            TypeError: If ``relu`` is not an ``nn.ReLU``.

        Examples:
            >>> act = GraftedReLU.from_relu(nn.ReLU(), (4, 2, 2))
            >>> x = torch.randn(5, 4, 2, 2)
            >>> bool(torch.equal(act(x), torch.relu(x)))
            True
        """
        check_instance(relu, "relu", nn.ReLU, what="an nn.ReLU")
        return cls(shape, mask, max_slope=max_slope, device=device, dtype=dtype)

    def effective_slope(self) -> Tensor:
        """The slopes ``forward`` uses: ``slope``, clamped to ``[-max_slope, max_slope]``."""
        if self.max_slope is None:
            return self.slope
        return self.slope.clamp(-self.max_slope, self.max_slope)

    def forward(self, x: Tensor) -> Tensor:
        """``relu(x)`` on ungrafted entries, ``a * x + b`` on grafted ones."""
        if x.ndim != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"GraftedReLU(shape={self.shape}) takes inputs of shape (N, *{self.shape}), "
                f"got shape {tuple(x.shape)}"
            )
        line = self.effective_slope() * x + self.intercept
        return torch.where(self.mask, line, torch.relu(x))

    def lipschitz_bound(self, input_shape: Sequence[int] | None = None) -> Tensor:
        r"""Return the l2 → l2 Lipschitz bound $\max(1, \max_{\text{grafted}} |a_i|)$.

        Note [Grafted ReLU] has the proof; the bound is exact, computed from
        the realised (clamped) slopes of the grafted neurons only. With every
        neuron grafted it is $\max_i |a_i|$, which can be below 1.

        Args:
            input_shape: Optional shape $(N, *S)$ of an input batch; when given,
                $S$ must equal ``shape``. The bound holds for every batch size.

        Returns:
            A 0-dim float64 CPU tensor.

        Raises:
            ValueError: If ``input_shape`` does not end with ``shape``, or a
                grafted slope is NaN or infinite.
        """
        if input_shape is not None and tuple(input_shape)[1:] != self.shape:
            raise ValueError(
                f"GraftedReLU(shape={self.shape}) takes inputs of shape (N, *{self.shape}), "
                f"got input_shape {tuple(input_shape)}"
            )
        with torch.no_grad():
            mask = self.mask.cpu()
            grafted = self.effective_slope().detach().cpu().to(torch.float64)[mask].abs()
        if not bool(torch.isfinite(grafted).all()):
            raise ValueError("GraftedReLU has a NaN or infinite slope on a grafted neuron")
        bound = 1.0 if not bool(mask.all()) else 0.0
        if grafted.numel():
            bound = max(bound, float(grafted.max()))
        return torch.tensor(bound, dtype=torch.float64)

    def extra_repr(self) -> str:
        grafted = int(self.mask.sum())
        total = math.prod(self.shape)
        extra = f", max_slope={self.max_slope}" if self.max_slope is not None else ""
        return f"shape={self.shape}, grafted={grafted}/{total}{extra}"
