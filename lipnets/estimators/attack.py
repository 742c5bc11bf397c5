r"""An $\ell_2$ projected-gradient attack that tries to falsify certificates.

`pgd_l2` searches the $\ell_2$ ball of radius $\varepsilon_i$ around each
input for the point of lowest classification margin
(`lipnets.functional.margin`). A point it returns with a negative margin is a
*witness*: the model really changes its decision inside the ball, so any
certificate claiming a radius of at least $\varepsilon_i$ for that input is
wrong. A margin that stays positive proves nothing. The attack is an
**estimate** (DESIGN.md, "Two numbers, never mixed"): the margin it reaches is
an upper bound on the minimal margin in the ball, never a lower bound, and it
never certifies. Only torch and `lipnets.functional` are used.

# Note [PGD step schedule]

Each restart runs `steps` steps of $\delta \leftarrow \Pi_{\varepsilon}(\delta +
\eta_t \varepsilon\, d_t)$, where $\Pi_{\varepsilon}$ scales $\delta$ back into
the ball and all norms are per sample over every non-batch dimension:

- $d_t$ is a unit heavy-ball direction: $v_t = 0.75\, v_{t-1} + u_t$ with
  $u_t$ the normalised negative gradient of the objective, $d_t = v_t /
  \|v_t\|$.
- **Tangential steps.** Where $\delta$ lies on the sphere ($\|\delta\| \ge
  (1 - 10^{-4})\,\varepsilon$), the outward radial part of $u_t$ and of $v_t$
  is removed before normalising. Near a minimum on the sphere the gradient is
  almost radial; a plain normalised step then moves mostly outward, the
  projection undoes it, and the move *along* the sphere is a small fraction of
  $\eta_t \varepsilon$. A tangential step moves along the sphere by the full
  length. Inside the ball, or when the gradient points inward, the full
  gradient is used.
- **Step lengths** decay from $\eta_0 =$ ``step_size`` (a fraction of each
  sample's own $\varepsilon$, so one call handles radii of any scale; default
  1, so the first step from $x$ reaches the sphere) to $\eta_0 / T^2$ on a
  cosine schedule in log space, $\eta_t = \eta_0\, T^{-(1 - \cos(\pi t / (T -
  1)))}$ for $T$ = ``steps``: a few long steps explore, and many short ones
  converge into the kinks where piecewise-linear networks (ReLU, GroupSort)
  have their minima. More steps buy a finer final step.

Measured on CPU in float64 on 60 random 2-16-16-3 MLPs (30 ReLU, 30
GroupSort; 20 points each, $\varepsilon = 0.5$, 100 steps, 10 restarts),
counting the points whose margin stayed above the minimum over 20 000 random
points of the ball (half of them on the sphere): a plain cosine decay $\eta_0
\to 0$ without tangential steps left 57 of 1200, tangential steps alone 105,
tangential steps with a log-space decay to $10^{-5} \eta_0$ 9; the schedule
above leaves 8 (2 by more than $10^{-3}$, the others by at most $3 \cdot
10^{-4}$) and flips exactly the 281 points that sampling flips. Momentum 0.75
beat 0 and 0.9 (13 and 18 points left). On two 64-256-256-10 ReLU networks
trained on digits (300 test points at radii 0.3, 0.45 and 0.6: 1800 balls),
``(steps, restarts)`` = (100, 10), (50, 3), (20, 2), (10, 1) flipped 1080,
1072, 1049, 1034 points, where classic PGD (untargeted, constant step
$2.5\varepsilon/T$, random restarts) flipped 1068, 1049, 1045, 1031. A fixed
final step of $10^{-5} \eta_0$ fails short budgets: with 5 steps and $\eta_0
= 0.5$ it flipped 568, against 1029 for this schedule with $\eta_0 = 1$.

# Note [PGD restarts and targets]

Restart 0 starts at $x$ and minimises the margin itself, $f_y - \max_{j \ne y}
f_j$. The max picks the class that is closest *locally*, which need not be
the one that is easiest to reach within $\varepsilon$ (a linear model has one
local minimum per class on the sphere). So the restarts of a multiclass model
cycle through the objectives: the margin, then $f_y - f_t$ for the classes $t$
ranked 2nd, 3rd, ..., $(C-1)$-th among the other classes at the clean input,
then the runner-up (ranked 1st), then the margin again. The runner-up comes
last because the untargeted runs mostly end there already: on two digits MLPs
(300 points, 3 radii, 50 steps) starting with "margin, margin, 2nd" flipped 0
to 4 more points per radius than "margin, runner-up, 2nd" with 2 or 3
restarts, never fewer, and the same with 5 or more. Binary models minimise the
margin throughout. Restarts $r \ge 1$ start at a uniformly random point of the
ball. Whatever a run minimises, every point it visits is scored by the true
margin, and each sample keeps its lowest-margin point over all steps and
restarts.

# Note [PGD points stay in the ball]

Projection scales $\delta$ to norm $\varepsilon$, but $x + \delta$ is rounded.
Every candidate is therefore formed as $x_{adv} = x + \delta$ first and its
distance $\|x_{adv} - x\|$ measured in float64; a row that lands outside is
shrunk by a little more than its excess (a few tries), else reset to $x$.
Only such points are evaluated and kept, so every returned point satisfies
$\|x_{adv,i} - x_i\|_2 \le \varepsilon_i$ as measured in float64, and the
margin recorded for it is the margin of exactly the returned point.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lipnets._progress import progress_bar
from lipnets._state import eval_mode, realised_weights
from lipnets.functional.margins import class_indices, is_binary, margin

__all__ = ["pgd_l2"]

_DEFAULT_STEP_SIZE = 1.0  # Note [PGD step schedule]
_MOMENTUM = 0.75
_ON_SPHERE = 1e-4  # relative distance to the sphere below which a point is on it
_SHRINK_TRIES = 8  # Note [PGD points stay in the ball]


def pgd_l2(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    steps: int = 100,
    restarts: int = 10,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    r"""Inputs of lowest margin found within $\ell_2$ balls: an attack to falsify certificates.

    For each sample $i$ this searches $\{x' : \|x' - x_i\|_2 \le
    \varepsilon_i\}$ (norm over all non-batch dimensions) for the point where
    `lipnets.functional.margin` of ``model(x')`` is lowest, by projected
    gradient descent on the margin: `restarts` runs of `steps` steps each,
    with $\ell_2$-normalised heavy-ball steps, tangential on the sphere, whose
    length decays from ``step_size`` $\cdot \varepsilon_i$ to $1/$``steps``$^2$
    of it (see Note [PGD step schedule]). Restart 0 starts at $x$; the others start
    at uniformly random points of the ball and, for multiclass models, target
    the other classes in turn (Note [PGD restarts and targets]). Each sample
    keeps its lowest-margin point over all steps and restarts, so a label
    once flipped stays flipped.

    This is an **estimate**, never a bound: a negative margin at the returned
    point proves that no certificate of radius $\ge \varepsilon_i$ can hold
    for sample $i$; a positive one proves nothing. A module runs in eval mode
    (each submodule's mode is restored afterwards), so evaluate the returned
    points in eval mode too. Parametrized weights are computed once, on a
    private frozen copy (Note [Realised weights] in `lipnets._state`);
    gradients are taken with respect to the input only, so no parameter's
    ``.grad`` changes. `x` is not modified.

    Args:
        model: an ``nn.Module`` or callable mapping a batch of $N$ inputs to
            scores of shape ``(N, C)`` (multiclass) or ``(N,)`` / ``(N, 1)``
            (binary), see Note [Label conventions].
        x: floating-point inputs of shape ``(N, ...)`` with $N \ge 1$ samples.
        y: labels, as `lipnets.functional.margin` takes them: class indices or
            one-hot rows (multiclass), 1 / 0 / -1 (binary).
        eps: radius, a number $\ge 0$ or a tensor of shape ``(N,)`` holding one
            radius per sample (e.g. each point's certified radius). A radius of
            0 returns that sample's input unchanged.
        steps: gradient steps per restart (int >= 1).
        restarts: number of runs (int >= 1); restart 0 starts at `x`.
        step_size: initial step length as a fraction of each sample's radius
            (a finite number > 0); ``None`` means 1, a first step from `x` to
            the sphere.
        generator: random generator for the random starts (its device is used
            to draw them); the global generator if ``None``. The same seed gives
            the same result.
        progress: show a `tqdm` progress bar over restarts (needs `tqdm`).

    Returns:
        The adversarial inputs, a detached tensor with the shape, dtype and
        device of `x`, with $\|x_{adv,i} - x_i\|_2 \le \varepsilon_i$ for
        every sample (Note [PGD points stay in the ball]).

    Raises:
        TypeError: if `model` is not callable, `x` is not a floating-point
            tensor, or the model does not return a floating-point tensor.
        ValueError: if `x` has no batch dimension, `eps` is negative, NaN,
            infinite or of the wrong shape, `steps`, `restarts` or `step_size`
            is out of range, the labels do not fit the scores (see
            `lipnets.functional.margin`), or the model returns another batch
            size or NaN scores.
        RuntimeError: if the model's output does not depend on its input
            through autograd.
        ImportError: if ``progress=True`` and `tqdm` is not installed.

    Examples:
        A linear classifier whose decision boundary is at distance
        $1/\sqrt{2} \approx 0.707$ from the input: the attack flips the label
        within a radius of 0.75 and stays inside the ball.

        >>> import torch
        >>> from lipnets.estimators import pgd_l2
        >>> from lipnets.functional import margin
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2))
        >>> x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
        >>> x_adv = pgd_l2(model, x, y, 0.75, generator=torch.Generator().manual_seed(0))
        >>> bool(margin(model(x_adv), y) < 0), bool(torch.linalg.norm(x_adv - x) <= 0.75)
        (True, True)

    References:
        Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models
        Resistant to Adversarial Attacks", ICLR 2018 (projected gradient
        descent). Croce, Hein, "Reliable evaluation of adversarial robustness
        with an ensemble of diverse parameter-free attacks", ICML 2020
        (step-size schedules and momentum). Gowal, Uesato, Qin, Huang, Mann,
        Kohli, "An Alternative Surrogate Loss for PGD-based Adversarial
        Testing", 2019 (targeting the runner-up classes in turn).
    """
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
    x = _check_x(x)
    n = x.shape[0]
    eps_x, eps64 = _check_eps(eps, n, x)
    _check_count("steps", steps)
    _check_count("restarts", restarts)
    eta0 = _check_step_size(step_size)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    bar = progress_bar(progress, restarts, "pgd_l2")

    try:
        with eval_mode(model), realised_weights(model) as model:
            with torch.no_grad():
                clean = _call(model, x)
                best_margin = margin(clean, y).detach()  # validates the labels
            best = x.clone()
            binary = is_binary(clean)
            labels = ranked = None
            if not binary:
                labels = class_indices(y, clean.shape[1]).to(clean.device)
                others = clean.scatter(1, labels[:, None], float("-inf"))
                ranked = others.argsort(dim=1, descending=True)[:, : clean.shape[1] - 1]
            for r in range(restarts):
                target = None
                if ranked is not None and r >= 1:  # Note [PGD restarts and targets]
                    k = (r - 1) % (ranked.shape[1] + 1)
                    if k > 0:
                        target = ranked[:, k % ranked.shape[1]]
                start = torch.zeros_like(x) if r == 0 else _uniform_in_ball(x, eps_x, generator)
                with torch.enable_grad():
                    best, best_margin = _descend(
                        model,
                        x,
                        y,
                        (eps_x, eps64),
                        start,
                        (labels, target),
                        steps,
                        eta0,
                        (best, best_margin),
                    )
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return best


def _descend(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    radii: tuple[Tensor, Tensor],
    start: Tensor,
    targeting: tuple[Tensor | None, Tensor | None],
    steps: int,
    eta0: float,
    record: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor]:
    """One restart (Note [PGD step schedule]); returns the updated best points and margins.

    `radii` is ``(eps_x, eps64)``, `targeting` ``(class indices, target class)``
    (target ``None``: minimise the margin itself), `record` ``(best points,
    their margins)``.
    """
    eps_x, eps64 = radii
    labels, target = targeting
    best, best_margin = record
    delta, point = _into_ball(x, start, eps_x, eps64)
    velocity = torch.zeros_like(x)
    for t in range(steps):
        point = point.detach().requires_grad_(True)
        out = _call(model, point)
        if not out.requires_grad:
            raise RuntimeError(
                "the model's output does not depend on its input through autograd "
                "(was it computed under torch.no_grad or detached?)"
            )
        m = margin(out, y)
        best, best_margin = _keep_best(point, m, best, best_margin)
        if target is None:
            objective = m
        else:
            objective = out.gather(1, labels[:, None])[:, 0] - out.gather(1, target[:, None])[:, 0]
        (grad,) = torch.autograd.grad(objective.sum(), point, allow_unused=True)
        if grad is None:  # the scores do not depend on the input
            break
        with torch.no_grad():
            descent = -torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            velocity = _MOMENTUM * velocity + _unit(_tangential(descent, delta, eps_x))
            direction = _unit(_tangential(velocity, delta, eps_x))
            eta = _step_length(eta0, t, steps)
            delta, point = _into_ball(x, delta + _rows(eta * eps_x, x) * direction, eps_x, eps64)
    with torch.no_grad():
        best, best_margin = _keep_best(point, margin(_call(model, point), y), best, best_margin)
    return best, best_margin


def _step_length(eta0: float, t: int, steps: int) -> float:
    """Step length `t` of `steps`, from `eta0` down to ``eta0 / steps**2``.

    See Note [PGD step schedule].
    """
    if steps == 1:
        return eta0
    decay = 0.5 * (1.0 - math.cos(math.pi * t / (steps - 1)))  # 0 -> 1
    return eta0 * steps ** (-2.0 * decay)


def _tangential(direction: Tensor, delta: Tensor, eps_x: Tensor) -> Tensor:
    """`direction` without its outward radial part where `delta` is on the sphere.

    See Note [PGD step schedule]: on the sphere, an outward component would be
    undone by the projection and only shorten the move along the sphere.
    """
    normal = _unit(delta)
    radial = (direction * normal).flatten(1).sum(dim=1)
    on_sphere = (_norms(delta) >= eps_x * (1 - _ON_SPHERE)) & (eps_x > 0)
    radial = torch.where(on_sphere & (radial > 0), radial, torch.zeros_like(radial))
    return direction - _rows(radial, direction) * normal


def _unit(t: Tensor) -> Tensor:
    """Rows of `t` scaled to unit l2 norm (zero rows stay zero), safe from underflow."""
    scale = t.flatten(1).abs().amax(dim=1)
    t = t / _rows(torch.where(scale > 0, scale, torch.ones_like(scale)), t)
    norms = _norms(t)
    return t / _rows(torch.where(norms > 0, norms, torch.ones_like(norms)), t)


def _keep_best(
    point: Tensor, m: Tensor, best: Tensor, best_margin: Tensor
) -> tuple[Tensor, Tensor]:
    m = m.detach()
    better = m < best_margin
    return (
        torch.where(_rows(better, best), point.detach(), best),
        torch.where(better, m, best_margin),
    )


def _into_ball(x: Tensor, delta: Tensor, eps_x: Tensor, eps64: Tensor) -> tuple[Tensor, Tensor]:
    """Project `delta` onto the ball; return it with ``x + delta``.

    See Note [PGD points stay in the ball].
    """
    norms = _norms(delta)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    scale = torch.where(norms > eps_x, eps_x / safe, torch.ones_like(norms))
    delta = delta * _rows(scale, x)
    point = torch.where(_rows(eps_x > 0, x), x + delta, x)
    unit = torch.finfo(x.dtype).eps
    for k in range(_SHRINK_TRIES):
        dist = _norms(point.to(torch.float64) - x.to(torch.float64))
        over = dist > eps64
        if not bool(over.any()):
            return point - x, point
        shrink = eps64 / dist.clamp_min(torch.finfo(torch.float64).tiny) * (1 - 4 * unit * 2**k)
        delta = delta * _rows(torch.where(over, shrink, torch.ones_like(shrink)).to(x.dtype), x)
        point = torch.where(_rows(eps_x > 0, x), x + delta, x)
    dist = _norms(point.to(torch.float64) - x.to(torch.float64))
    point = torch.where(_rows(dist > eps64, x), x, point)
    return point - x, point


def _uniform_in_ball(x: Tensor, eps_x: Tensor, generator: torch.Generator | None) -> Tensor:
    """A uniformly random point of each sample's ball, as an offset from `x`."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    device = generator.device if generator is not None else x.device
    direction = torch.randn(x.shape, generator=generator, dtype=dtype, device=device)
    radius = torch.rand(x.shape[0], generator=generator, dtype=dtype, device=device)
    radius = radius ** (1.0 / x[0].numel())  # uniform in volume, not in radius
    direction = direction / _rows(_norms(direction).clamp_min(torch.finfo(dtype).tiny), direction)
    return (direction * _rows(radius, direction)).to(x.device, x.dtype) * _rows(eps_x, x)


def _call(model: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    out = model(x)
    if not isinstance(out, Tensor):
        raise TypeError(f"the model must return a Tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(f"the model must return floating-point scores, got dtype {out.dtype}")
    if out.ndim < 1 or out.shape[0] != x.shape[0]:
        raise ValueError(
            f"the model must map a batch of N inputs to N outputs, got input shape "
            f"{tuple(x.shape)} and output shape {tuple(out.shape)}"
        )
    return out


def _check_x(x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(
            f"x must have a batch dimension and at least one more, shape (N, ...) with "
            f"N >= 1, got {tuple(x.shape)}"
        )
    return x.detach()


def _check_eps(eps: object, n: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample radii, shape ``(N,)``, in the dtype of `x` and in float64."""
    if isinstance(eps, Tensor):
        if eps.is_complex() or eps.dtype == torch.bool:
            raise TypeError(f"eps must be a real tensor, got dtype {eps.dtype}")
        if eps.ndim == 0:
            eps64 = eps.detach().to(x.device, torch.float64).expand(n)
        elif eps.shape == (n,):
            eps64 = eps.detach().to(x.device, torch.float64)
        else:
            raise ValueError(
                f"eps must be a number or a tensor of shape ({n},) (one radius per sample), "
                f"got shape {tuple(eps.shape)}"
            )
    elif isinstance(eps, numbers.Real) and not isinstance(eps, bool):
        eps64 = torch.full((n,), float(eps), dtype=torch.float64, device=x.device)
    else:
        raise TypeError(f"eps must be a number or a tensor, got {type(eps).__name__}")
    if not bool(torch.isfinite(eps64).all()):
        raise ValueError("eps must be finite, got NaN or infinite radii")
    if bool((eps64 < 0).any()):
        raise ValueError(f"eps must be >= 0, got {eps64.min().item()}")
    # Rounding eps down to x's dtype keeps the steps inside the float64 ball.
    eps_x = eps64.to(x.dtype)
    eps_x = torch.where(
        eps_x.to(torch.float64) > eps64, eps_x.nextafter(torch.zeros_like(eps_x)), eps_x
    )
    return eps_x, eps64.clone()


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_step_size(step_size: object) -> float:
    if step_size is None:
        return _DEFAULT_STEP_SIZE
    if (
        isinstance(step_size, bool)
        or not isinstance(step_size, (int, float))
        or not math.isfinite(step_size)
        or step_size <= 0
    ):
        raise ValueError(f"step_size must be a finite number > 0 or None, got {step_size!r}")
    return float(step_size)


def _rows(values: Tensor, like: Tensor) -> Tensor:
    """`values` (N,) shaped to broadcast against `like` (N, ...)."""
    return values.reshape(-1, *[1] * (like.ndim - 1))


def _norms(t: Tensor) -> Tensor:
    """Per-sample l2 norms over every non-batch dimension (PITFALLS row 16)."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1)
