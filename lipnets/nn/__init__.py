"""Lipschitz-by-construction modules, drop-in replacements for torch.nn."""

from lipnets.nn.activations import FullSort, GroupSort, MaxMin
from lipnets.nn.linear import BjorckLinear, CayleyLinear

__all__ = ["BjorckLinear", "CayleyLinear", "FullSort", "GroupSort", "MaxMin"]
