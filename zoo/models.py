"""Ready models, registered by name: 1-Lipschitz ones, and a plain MLP for certified training.

The 1-Lipschitz models are built from lipnets layers only (orthogonal linear and
convolution layers, sorting activations, invertible down-sampling), so their
sound bound, `lipnets.lipschitz_bound`, is close to 1, and it is *measured*
from the weights, never assumed. A model is rebuilt from its name, its input
shape, its number of outputs and its options, which is what a model card
records.

- ``groupsort-mlp``: Anil, Lucas & Grosse (2019), `BjorckLinear` + `GroupSort`.
- ``lipconvnet``: orthogonal convolutions (`BCOPConv2d` or `CayleyConv2d`),
  `MaxMin`, `InvertibleDownsample` between stages and an orthogonal linear head.
- ``critic``: a Wasserstein critic, a `BjorckLinear` + `GroupSort` MLP with one
  output.
- ``mlp``: plain ``nn.Linear`` layers with ReLU or `MaxMin`, not constrained: the
  model of certified training by bound propagation (``--loss crown-ibp``,
  `zoo.certified`), whose certificates come from CROWN over l-infinity balls. Its
  Lipschitz bound is measured like the others' and is far above 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

import lipnets
from zoo.errors import ZooError, unknown

__all__ = ["MODELS", "ModelSpec", "build", "get", "parse_options"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it and which options it takes.

    Attributes:
        name: the registry name (``python -m zoo train NAME``).
        kind: ``"classifier"`` (trained on a labelled dataset) or ``"critic"``
            (one score per sample, trained by ``python -m zoo wasserstein``).
        summary: one line for ``python -m zoo list``.
        builder: ``builder(input_shape, num_outputs, **options) -> nn.Module``.
        defaults: the options and their default values; an option's type is
            the type of its default.
        choices: allowed values of string options.
    """

    name: str
    kind: str
    summary: str
    builder: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def options(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The full option set: the defaults updated with ``given``, checked."""
        given = dict(given or {})
        bad = sorted(set(given) - set(self.defaults))
        if bad:
            valid = ", ".join(f"{k} (default {v!r})" for k, v in self.defaults.items())
            raise ZooError(f"{self.name} has no option {bad[0]!r}; its options: {valid}")
        options = dict(self.defaults)
        for key, value in given.items():
            options[key] = _coerce(self.name, key, value, self.defaults[key])
            allowed = self.choices.get(key)
            if allowed is not None and options[key] not in allowed:
                raise ZooError(
                    f"{self.name} option {key} must be one of {', '.join(allowed)}, got {value!r}"
                )
        return options


def _coerce(model: str, key: str, value: Any, default: Any) -> Any:
    """``value`` (possibly a CLI string) converted to the type of ``default``."""
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ZooError(
            f"{model} option {key} takes a {kind.__name__} (default {default!r}), got {value!r}"
        ) from None


def _positive(model: str, **values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise ZooError(f"{model} option {key} must be >= 1, got {value}")


def _check_group(model: str, width: int, group_size: int) -> None:
    if width % group_size:
        raise ZooError(
            f"{model}: group_size {group_size} must divide width {width} (GroupSort sorts "
            "groups of that many channels)"
        )


def groupsort_mlp(
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    width: int = 256,
    depth: int = 2,
    group_size: int = 2,
) -> nn.Sequential:
    """``Flatten``, then ``depth`` times (`BjorckLinear`, `GroupSort`), then a `BjorckLinear` head.

    Every linear layer has an orthogonal weight (orthonormal columns when it
    widens, rows when it narrows) and GroupSort is a permutation per input
    region, so the network is 1-Lipschitz and gradient-norm preserving up to
    the rounding its measured bound reports (Anil, Lucas & Grosse 2019).
    """
    _positive("groupsort-mlp", width=width, depth=depth, group_size=group_size)
    _check_group("groupsort-mlp", width, group_size)
    layers: list[nn.Module] = [nn.Flatten()]
    features = math.prod(input_shape)
    for _ in range(depth):
        layers += [lipnets.BjorckLinear(features, width), lipnets.GroupSort(group_size)]
        features = width
    layers.append(lipnets.BjorckLinear(features, num_outputs))
    return nn.Sequential(*layers)


def lipconvnet(
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    conv: str = "bcop",
    width: int = 16,
    depth: int = 2,
    stages: int = 2,
    kernel_size: int = 3,
) -> nn.Sequential:
    """Orthogonal convolutions and MaxMin in stages, invertible down-sampling, orthogonal head.

    Stage ``s`` (``s = 0 .. stages``) has ``depth`` convolutions with
    ``width * 2**s`` output channels, each followed by `MaxMin`. Between stages
    an `InvertibleDownsample(2)` folds 2x2 blocks into channels (an orthogonal
    permutation, nothing discarded), so the first convolution of the next stage
    maps ``4 * width * 2**s`` channels to ``width * 2**(s + 1)`` (orthonormal
    rows). The head flattens and applies a `BjorckLinear`. Convolutions are
    `BCOPConv2d` (``conv="bcop"``) or `CayleyConv2d` (``conv="cayley"``, built
    for the one input size it sees), with circular padding, "same" size.
    Height and width must be divisible by ``2**stages``.
    """
    if len(input_shape) != 3:
        raise ZooError(
            "lipconvnet needs image data of shape (channels, height, width), "
            f"got {tuple(input_shape)}"
        )
    _positive("lipconvnet", width=width, depth=depth, kernel_size=kernel_size)
    if stages < 0:
        raise ZooError(f"lipconvnet option stages must be >= 0, got {stages}")
    channels, height, wide = input_shape
    if height % 2**stages or wide % 2**stages:
        raise ZooError(
            f"lipconvnet with stages={stages} needs height and width divisible by "
            f"{2**stages}, got {height}x{wide}; pass -o stages=... with fewer stages"
        )
    if width % 2:
        raise ZooError(f"lipconvnet option width must be even (MaxMin pairs channels), got {width}")

    def make(cin: int, cout: int) -> nn.Module:
        if conv == "bcop":
            return lipnets.BCOPConv2d(cin, cout, kernel_size)
        # The size is known here: the layer then bounds and exports without being told.
        return lipnets.CayleyConv2d(cin, cout, kernel_size, input_size=(height, wide))

    layers: list[nn.Module] = []
    for stage in range(stages + 1):
        out = width * 2**stage
        for _ in range(depth):
            layers += [make(channels, out), lipnets.MaxMin()]
            channels = out
        if stage < stages:
            layers.append(lipnets.InvertibleDownsample(2))
            channels, height, wide = channels * 4, height // 2, wide // 2
    layers += [nn.Flatten(), lipnets.BjorckLinear(channels * height * wide, num_outputs)]
    return nn.Sequential(*layers)


def critic(
    input_shape: Sequence[int],
    num_outputs: int = 1,
    *,
    width: int = 128,
    depth: int = 3,
    group_size: int = 2,
) -> nn.Sequential:
    """A Wasserstein critic: ``depth`` x (`BjorckLinear`, `GroupSort`), then `BjorckLinear` to 1.

    The head is a single unit-norm row, so the critic is 1-Lipschitz up to the
    measured rounding and its gradient norm can reach 1 everywhere, which an
    optimal transport potential needs (Anil, Lucas & Grosse 2019).
    """
    _positive("critic", width=width, depth=depth, group_size=group_size)
    _check_group("critic", width, group_size)
    if num_outputs != 1:
        raise ZooError(f"a critic has one output, got num_outputs={num_outputs}")
    layers: list[nn.Module] = [nn.Flatten()]
    features = math.prod(input_shape)
    for _ in range(depth):
        layers += [lipnets.BjorckLinear(features, width), lipnets.GroupSort(group_size)]
        features = width
    layers.append(lipnets.BjorckLinear(features, 1))
    return nn.Sequential(*layers)


def mlp(
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    width: int = 128,
    depth: int = 2,
    activation: str = "relu",
) -> nn.Sequential:
    """``Flatten``, then ``depth`` times (``nn.Linear``, ReLU or `MaxMin`), then ``nn.Linear``.

    Unconstrained weights (PyTorch's initialisation): for certified training, where
    the bounds of CROWN-IBP, not a Lipschitz constant, make the network robust
    (Zhang et al. 2020). ``depth=2, width=128`` on digits is 64-128-128-10.
    """
    _positive("mlp", width=width, depth=depth)
    if activation == "maxmin" and width % 2:
        raise ZooError(
            f"mlp with activation=maxmin needs an even width (MaxMin pairs), got {width}"
        )
    layers: list[nn.Module] = [nn.Flatten()]
    features = math.prod(input_shape)
    for _ in range(depth):
        act = nn.ReLU() if activation == "relu" else lipnets.MaxMin()
        layers += [nn.Linear(features, width), act]
        features = width
    layers.append(nn.Linear(features, num_outputs))
    return nn.Sequential(*layers)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "groupsort-mlp",
            "classifier",
            "Anil et al. 2019: BjorckLinear + GroupSort MLP (the main job, on digits)",
            groupsort_mlp,
            {"width": 256, "depth": 2, "group_size": 2},
        ),
        ModelSpec(
            "lipconvnet",
            "classifier",
            "orthogonal convolutions (BCOP or Cayley) + MaxMin, invertible down-sampling, "
            "orthogonal head",
            lipconvnet,
            {"conv": "bcop", "width": 16, "depth": 2, "stages": 2, "kernel_size": 3},
            {"conv": ("bcop", "cayley")},
        ),
        ModelSpec(
            "critic",
            "critic",
            "Wasserstein critic: BjorckLinear + GroupSort MLP, one output "
            "(python -m zoo wasserstein)",
            critic,
            {"width": 128, "depth": 3, "group_size": 2},
        ),
        ModelSpec(
            "mlp",
            "classifier",
            "plain nn.Linear MLP with ReLU or MaxMin, for certified training "
            "(--loss crown-ibp --eps 0.1)",
            mlp,
            {"width": 128, "depth": 2, "activation": "relu"},
            {"activation": ("relu", "maxmin")},
        ),
    )
}


def get(name: str) -> ModelSpec:
    """The registered `ModelSpec` called ``name``; a `ZooError` lists the valid names."""
    if name not in MODELS:
        raise unknown("model", name, list(MODELS))
    return MODELS[name]


def build(
    name: str,
    *,
    input_shape: Sequence[int],
    num_outputs: int,
    **options: Any,
) -> nn.Module:
    """Build the model registered as ``name``.

    Args:
        name: a name of `MODELS` (``groupsort-mlp``, ``lipconvnet``, ``critic``, ``mlp``).
        input_shape: the shape of one sample, without the batch dimension.
        num_outputs: classes of a classifier (1 for a critic).
        **options: the model's options (see `MODELS[name].defaults`); strings
            from the command line are converted to the option's type.

    Returns:
        A fresh ``nn.Module`` in training mode.

    Raises:
        ZooError: for an unknown name or option, or an option out of range.
    """
    spec = get(name)
    return spec.builder(tuple(input_shape), num_outputs, **spec.options(options))


def parse_options(pairs: Sequence[str] | None) -> dict[str, str]:
    """``["width=128", "conv=cayley"]`` as a dict; a `ZooError` for a malformed pair."""
    options: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ZooError(f"a model option is KEY=VALUE (for example -o width=128), got {pair!r}")
        options[key.strip()] = value.strip()
    return options
