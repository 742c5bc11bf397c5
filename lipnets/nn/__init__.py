"""Lipschitz-by-construction modules, drop-in replacements for torch.nn."""

from lipnets.nn.activations import FullSort, GroupSort, MaxMin

__all__ = ["FullSort", "GroupSort", "MaxMin"]
