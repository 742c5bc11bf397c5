"""Traced forms for deel-torchlip's activations (Note [Traced forms] in `lipnets.graph.forms`).

deel-torchlip's ``GroupSort.forward`` calls ``group_sort(input, group_size)``, which
branches on ``input.shape[1]`` (torch.fx cannot trace that), and multiplies by
``k_coef_lip``; ``MaxMin.forward`` calls ``max_min(input, dim)``, which picks its dimension
from ``len(input.shape)`` when ``dim`` is None. The forms below compute the same
functions, checked bit for bit against deel-torchlip's modules in tests/interop (and
registered only while deel-torchlip's code is that of the version they were checked
against, 1.0.5: `lipnets.graph.forms.register_checked_form`):

* ``GroupSort(group_size)`` (and ``GroupSort2``, ``FullSort``, which set ``group_size``
  to 2 and None): the channels (dimension 1) are cut into contiguous groups of
  ``group_size``, each sorted in ascending order (`lipnets.functional.group_sort`), or
  all sorted at once when ``group_size`` is None (`lipnets.functional.full_sort`), then
  multiplied by ``k_coef_lip``. deel-torchlip sorts every channel when ``group_size``
  exceeds their number; the form does not know the number when it is traced and refuses
  that case (``group_size`` must divide it);
* ``MaxMin(dim)``: ``cat((relu(x), relu(-x)), dim) * k_coef_lip``, ``dim`` 1 when None
  (deel-torchlip's choice for inputs with a batch dimension). This map (CReLU) is
  1-Lipschitz, but the fold bounds the concatenation of two 1-Lipschitz maps by
  $\\sqrt 2$: the bound is sound and loose by that factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deel.torchlip import functional as deel_functional
from deel.torchlip.modules.activation import GroupSort, MaxMin
from torch import Tensor

import lipnets.functional as LF
from lipnets.graph.forms import register_checked_form

__all__: list[str] = []


def _group_sort(module: GroupSort, input: Tensor) -> Tensor:
    size = module.group_size
    out = LF.full_sort(input, dim=1) if size is None else LF.group_sort(input, size, dim=1)
    return out * module._coefficient_lip


def _max_min(module: MaxMin, input: Tensor) -> Tensor:
    dim = 1 if module._dim is None else module._dim
    return torch.cat((F.relu(input), F.relu(-input)), dim=dim) * module._coefficient_lip


# The digests of the code the forms replicate, in deel-torchlip 1.0.5 (`source_digest`).
_GROUP_SORT = "0fa1a9eafd9dad97209702a78d0b105d541bcf2ac9969fc37e98d79f03b4cb7e"
_MAX_MIN = "bec0b25f673fbfbdb2ee849bbde2c79388e28978ea0ce1158edf2bee453ae7bf"
register_checked_form(
    GroupSort, _group_sort, (GroupSort.forward, deel_functional.group_sort), _GROUP_SORT
)
register_checked_form(MaxMin, _max_min, (MaxMin.forward, deel_functional.max_min), _MAX_MIN)
