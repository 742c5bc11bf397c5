"""Lipschitz-by-construction modules, drop-in replacements for torch.nn."""

from lipnets.nn.activations import FullSort, GroupSort, MaxMin
from lipnets.nn.bcop import BCOPConv2d
from lipnets.nn.cayley_conv import CayleyConv2d, FrequencyConv2d
from lipnets.nn.grafted import GraftedReLU
from lipnets.nn.linear import BjorckLinear, CayleyLinear
from lipnets.nn.pooling import InvertibleDownsample, L2NormPool2d

__all__ = [
    "BCOPConv2d",
    "BjorckLinear",
    "CayleyConv2d",
    "CayleyLinear",
    "FrequencyConv2d",
    "FullSort",
    "GraftedReLU",
    "GroupSort",
    "InvertibleDownsample",
    "L2NormPool2d",
    "MaxMin",
]
