"""``python -m zoo demo``: build a small residual GroupSort network, print its sound bound.

This is the interim main job until the zoo's training CLI lands. The sampled
slope it prints is an *estimate* (a lower bound found on random pairs), shown
next to the sound bound to illustrate the gap; it never certifies anything.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import lipnets


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.Linear(width, width), lipnets.GroupSort(2), nn.Linear(width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + 0.5 * self.f(x)


def demo(width: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, width), lipnets.MaxMin(), ResidualBlock(width), nn.Linear(width, 10)
    ).eval()
    bound = lipnets.lipschitz_bound(model, input_shape=(1, 64))
    with torch.no_grad():
        x = torch.rand(4096, 64)
        y = x + 1e-3 * torch.randn_like(x)
        slope = ((model(x) - model(y)).norm(dim=1) / (x - y).norm(dim=1)).max()
    print(f"lipnets {lipnets.__version__}")
    print(model)
    print(f"sound Lipschitz bound (l2 -> l2): {float(bound):.6f}")
    print(f"largest slope on 4096 random pairs (an estimate, not a bound): {float(slope):.6f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="build a small network and print its sound bound")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.width < 2 or args.width % 2:
        parser.error(f"--width must be an even number >= 2, got {args.width}")
    demo(args.width, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
