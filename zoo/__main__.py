"""``python -m zoo``: train, evaluate and certify 1-Lipschitz models; Wasserstein critics.

Commands:

- ``list``: the models and their options, the datasets, the 2-D
  distributions and the shipped checkpoints.
- ``train MODEL``: train on a dataset (``--data digits`` by default, no
  download), then write a run folder under ``--out`` (default ``runs/``):
  ``model.safetensors``, ``card.json`` and ``certified.png``. Under
  ``torchrun --nproc_per_node=N -m zoo train ...`` it runs PyTorch DDP.
- ``eval RUN_OR_CHECKPOINT``: recompute a card's numbers from its checkpoint
  on the same test set and say whether they are reproduced.
- ``certify RUN_OR_CHECKPOINT``: certified accuracy at any radii, the sound
  bound, and optionally a PGD attack that tries to break the certificates.
- ``wasserstein``: train a critic between two 2-D distributions, print its W1
  estimate next to POT's exact W1 of the same samples.
- ``graft RUN_OR_RECIPE``: linearity grafting (`zoo.graft`): graft a share of the
  ReLU neurons, fine-tune, and compare verification before and after.
- ``demo``: build a small residual GroupSort network and print its sound bound.

Every certified number comes from `lipnets.lipschitz_bound`, computed from the
weights the model has, never from an assumed 1.

Every value is checked at the door by its argparse type (`zoo.arguments`):
a refusal is one line on stderr, status 2, before any data are loaded. A run
folder is written whole or not at all, never over an earlier run
(`zoo.runs`); a card is checked and its checkpoint verified before loading
(`zoo.cards`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lipnets
from zoo import arguments

# ---------------------------------------------------------------- demo


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.Linear(width, width), lipnets.GroupSort(2), nn.Linear(width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + 0.5 * self.f(x)


def demo(width: int, seed: int) -> None:
    """Print a small residual network's sound bound next to a sampled slope (an estimate)."""
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


# ---------------------------------------------------------------- helpers


def _command(argv: list[str], world_size: int) -> str:
    launcher = "python -m zoo"
    if world_size > 1:
        launcher = f"torchrun --nproc_per_node={world_size} -m zoo"
    return f"{launcher} {shlex.join(argv)}"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _print_evaluation(ev: Any, *, header: str) -> None:
    print(header)
    print(f"  clean accuracy          {_percent(ev.clean_accuracy)}")
    radii = "  ".join(f"eps={e:g}: {_percent(a)}" for e, a in ev.certified_accuracy.items())
    print(f"  certified accuracy (l2) {radii}")
    print(f"  sound Lipschitz bound   {ev.lipschitz_bound:.7f}  (lipnets.lipschitz_bound)")
    if ev.lower_bound is not None:
        print(
            f"  lower bound (estimate)  {ev.lower_bound:.7f}  "
            "(lipnets.estimators.lower_bound, near test points)"
        )


def _eps_list(values: list[float] | None, default: tuple[float, ...]) -> list[float]:
    """The radii to certify (checked by `zoo.arguments.radius`), rounded as the card writes them.

    Rounded so that ``eval`` uses the same radii as the card's keys.
    """
    from zoo.train import eps_key

    eps = list(default if values is None else values)
    return [float(eps_key(e)) for e in eps]


# ---------------------------------------------------------------- list


def cmd_list(args: argparse.Namespace) -> int:
    from zoo import cards, data, models, train

    print("models (python -m zoo train MODEL -o KEY=VALUE ...):")
    for spec in models.MODELS.values():
        options = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        print(f"  {spec.name:14s} {spec.summary}")
        print(f"  {'':14s} options: {options}")
        if spec.kind == "classifier":
            c = train.default_config(spec.name)
            print(
                f"  {'':14s} training: --epochs {c.epochs} --batch-size {c.batch_size} "
                f"--lr {c.lr:g} --loss {c.loss} --margin {c.margin:g}"
            )
    print("datasets (--data NAME):")
    for spec in data.DATASETS.values():
        print(f"  {spec.name:14s} {spec.summary}")
    print("2-D distributions (python -m zoo wasserstein --p NAME --q NAME):")
    for name, (summary, _) in data.DISTRIBUTIONS.items():
        print(f"  {name:14s} {summary}")
    print("shipped checkpoints (python -m zoo eval NAME):")
    for name in cards.pretrained() or ["(none)"]:
        print(f"  {name}")
    return 0


# ---------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from zoo import cards, certified, data, models, robustness, train
    from zoo.errors import ZooError

    # At the door: every value was checked by its argparse type; what depends
    # on several values is checked here, before any data are loaded.
    spec = models.get(args.model)
    if spec.kind == "critic":
        raise ZooError(
            f"{args.model} is a Wasserstein critic: it is trained between two 2-D "
            "distributions by `python -m zoo wasserstein` (see --p, --q), not on --data"
        )
    dataset = data.get(args.data)  # an unknown name fails before anything starts
    options = models.parse_options(args.option)
    spec.options(options)  # unknown options fail before data are loaded
    # the options' ranges are checked by the builder: build once on the dataset's known shape
    models.build(
        args.model, input_shape=dataset.input_shape, num_outputs=dataset.num_classes, **options
    )
    config = train.default_config(
        args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        schedule=args.schedule,
        loss=args.loss,
        margin=args.margin,
        alpha=args.alpha,
        temperature=args.temperature,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    ddp = train.Distributed.from_env()
    cert = certified.options_from(args, config.loss, ddp.world_size)  # --eps: l-inf radii
    eps = _eps_list(None if cert else args.eps, dataset.default_eps)
    if config.batch_size % ddp.world_size:
        raise ZooError(
            f"--batch-size must be divisible by the number of processes ({ddp.world_size}), "
            f"got {config.batch_size}: it is the global batch, split evenly over them"
        )
    device = ddp.device(args.device)
    ddp.init(device)
    try:
        split = data.load(args.data, root=args.data_root, download=args.download, seed=0)
        info = split.info
        torch.manual_seed(config.seed)
        model = models.build(
            args.model, input_shape=info.input_shape, num_outputs=info.num_classes, **options
        )
        threads = train.set_threads(args.threads, model)
        progress = not args.no_progress and ddp.main
        if ddp.main:
            print(
                f"training {args.model} on {args.data} ({info.train_size} train / "
                f"{info.test_size} test) for {config.epochs} epochs, {ddp.world_size} "
                f"process(es) on {device.type}, {threads} thread(s) each"
            )
        start = time.perf_counter()
        history = train.fit(
            model,
            split.train,
            config,
            distributed=ddp,
            device=device,
            max_steps=args.max_steps,
            progress=progress,
            certified=cert,
        )
        train.check_finite(history)
        if ddp.main:
            search = train.LOWER_BOUND[args.model]
            evaluation = train.evaluate(
                model, split.test, eps, device=device, lower=search, progress=progress
            )
            name = args.name or f"{args.model}-{args.data}-{datetime.now():%Y%m%d-%H%M%S}"
            arch = cards.architecture(args.model, options, info.input_shape, info.num_classes)
            title = f"{args.model} on {args.data}: verified accuracy ({config.loss})"
            verified = cert and certified.verified_run(model, split.test, cert, title=title)
            budget = robustness.options_from(args)  # CROWN and attack numbers
            robust = budget and robustness.measure(
                model, split.test, eps, budget, progress=progress
            )
            folder = train.write_run(
                args.out,
                name,
                model,
                arch,
                info,
                evaluation,
                training={
                    **train.config_dict(config),
                    "processes": ddp.world_size,
                    "threads": threads,
                    "device": device.type,
                    "steps": history.steps,
                    "final_loss": history.losses[-1] if history.losses else None,
                    "train_seconds": round(history.seconds, 2),
                    **({"certified": cert.as_dict()} if cert else {}),
                },
                lower_bound_search=search,
                command=_command(argv, ddp.world_size),
                verified=verified,
                robustness=robust,
            )
            total = time.perf_counter() - start
            _print_evaluation(
                evaluation,
                header=f"{args.model} on {args.data} held-out test set ({info.test_size} samples), "
                f"trained in {history.seconds:.1f} s ({history.steps} steps), "
                f"{total:.1f} s with evaluation:",
            )
            for line in robustness.describe(robust) if robust else ():
                print(line)
            if verified:
                print(certified.describe(verified))
            print(f"  run folder              {folder}{_kept(args.out, name, folder)}")
        ddp.barrier()
    finally:
        ddp.close()
    return 0


def _kept(out: Path, name: str, folder: Path) -> str:
    """A note when the run went to a suffixed folder because ``name`` was taken."""
    if folder.name == name:
        return ""
    return f"  ({out / name} exists and is kept)"


# ---------------------------------------------------------------- eval / certify


def _load_for_eval(args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None, Any]:
    """The model, its card (or None) and the test split it was evaluated on."""
    from zoo import cards, data
    from zoo.errors import ZooError

    checkpoint, card = cards.find_run(args.run)  # checked card, verified checkpoint
    if card is not None and _kind(card["model"]) == "critic":
        raise ZooError(
            f"{args.run} is a Wasserstein critic: its numbers come from "
            "`python -m zoo wasserstein`, not from a labelled test set"
        )
    expected = None
    if card is not None:
        expected = cards.Architecture(
            model=card["model"],
            options=card["options"],
            input_shape=card["data"]["input_shape"],
            num_outputs=card["data"]["num_classes"],
        )
    model, arch = cards.load_model(checkpoint, expected, device=args.device_)
    from zoo.train import set_threads

    set_threads(args.threads, model)
    if _kind(arch["model"]) == "critic":
        raise ZooError(
            f"{args.run} holds a Wasserstein critic: its numbers come from "
            "`python -m zoo wasserstein`, not from a labelled test set"
        )
    data_name = getattr(args, "data", None) or (card["data"]["name"] if card else None)
    if data_name is None:
        raise ZooError(f"{checkpoint} has no card next to it: pass --data NAME")
    seed = card["data"].get("seed") if card else None
    fraction = card["data"].get("test_fraction") if card else None
    split = data.load(
        data_name,
        root=args.data_root,
        download=args.download,
        seed=0 if seed is None else seed,
        test_fraction=0.25 if fraction is None else fraction,
    )
    if tuple(split.info.input_shape) != tuple(arch["input_shape"]):
        raise ZooError(
            f"the checkpoint takes inputs of shape {tuple(arch['input_shape'])} but {data_name} "
            f"has {tuple(split.info.input_shape)}"
        )
    return model, card, split


def _kind(name: str) -> str:
    """``"classifier"`` or ``"critic"``: the kind of the registered model ``name``."""
    from zoo import models

    return models.get(name).kind


def cmd_eval(args: argparse.Namespace) -> int:
    """Recompute a card's numbers; tolerances and what changed: `zoo.reproduce`."""
    from zoo import certified, robustness, train
    from zoo.errors import ZooError
    from zoo.reproduce import TOLERANCE, changes, close

    model, card, split = _load_for_eval(args)  # the card is checked, the checkpoint verified
    if card is None:
        raise ZooError(f"{args.run} has no card to reproduce: use `python -m zoo certify`")
    eps = [float(k) for k in card["certified_accuracy"]]
    lower = card.get("lower_bound_search") if card["lower_bound"] is not None else None
    ev = train.evaluate(
        model, split.test, eps, device=args.device_, lower=lower, progress=not args.no_progress
    )
    rows = [("clean_accuracy", card["clean_accuracy"], ev.clean_accuracy, TOLERANCE["accuracy"])]
    for key, value in card["certified_accuracy"].items():
        now = ev.certified_accuracy[float(key)]
        rows.append((f"certified_accuracy[{key}]", value, now, TOLERANCE["accuracy"]))
    rows.append(
        (
            "lipschitz_bound",
            card["lipschitz_bound"],
            ev.lipschitz_bound,
            TOLERANCE["lipschitz_bound"],
        )
    )
    if lower is not None:
        rows.append(("lower_bound", card["lower_bound"], ev.lower_bound, TOLERANCE["lower_bound"]))
    rows += certified.eval_rows(card, model, split.test)  # exact, as accuracies
    rows += robustness.eval_rows(card, model, split.test, progress=not args.no_progress)
    print(f"{card['model']} on {card['data']['name']} ({split.info.test_size} test samples)")
    print(f"  {'number':28s} {'card':>12s} {'now':>12s}  tolerance")
    different = []
    for name, was, now, rel in rows:
        ok = close(was, now, rel)
        if not ok:
            different.append(name)
        tol = "exact" if rel == 0 else f"rel {rel:g}"
        print(f"  {name:28s} {was:12.7f} {now:12.7f}  {tol:10s} {'ok' if ok else 'DIFFERENT'}")
    changed = changes(card, split.info)
    if not different:
        print("reproduced: yes" + (f" ({'; '.join(changed)})" if changed else ""))
        return 0
    numbers = ", ".join(different)
    why = (
        "; ".join(changed) + ": a change there can move these numbers"
        if changed
        else "the same lipnets and torch versions and test set size as the card's: the card's "
        "numbers were edited, or the data or this platform differ"
    )
    print(
        f"reproduced: NO: {len(different)} number(s) differ beyond their tolerance ({numbers}); "
        f"the checkpoint is the card's (sha256 verified); {why}"
    )
    return 1


def cmd_certify(args: argparse.Namespace) -> int:
    from zoo import data, train

    model, _, split = _load_for_eval(args)
    data_name = split.info.name
    eps = _eps_list(args.eps, data.get(data_name).default_eps)
    ev = train.evaluate(
        model, split.test, eps, device=args.device_, lower=None, progress=not args.no_progress
    )
    _print_evaluation(
        ev, header=f"{args.run} on {data_name} ({split.info.test_size} test samples):"
    )
    if args.attack:
        from lipnets.estimators import pgd_l2

        x, y = train.tensors_of(split.test)
        x, y = x[: args.attack].to(args.device_), y[: args.attack]
        radii = ev.radii[: args.attack]
        print(f"  PGD-l2 attack on the first {x.shape[0]} test samples (an estimate, not a bound):")
        generator = torch.Generator().manual_seed(0)
        for e in eps:
            adv = pgd_l2(model, x, y, e, steps=50, restarts=2, generator=generator)
            with torch.no_grad():
                robust = model(adv).argmax(dim=1).cpu() == y
            certified = radii > e
            broken = int((certified & ~robust).sum())
            print(
                f"    eps={e:g}: robust under attack {_percent(float(robust.double().mean()))} "
                f">= certified {_percent(float(certified.double().mean()))}; "
                f"certified points broken: {broken}"
            )
            if broken:
                print("    a certified point was broken: the bound is not sound, please report")
                return 1
    return 0


# ---------------------------------------------------------------- wasserstein


def cmd_wasserstein(args: argparse.Namespace, argv: list[str]) -> int:
    from zoo import data, models, train, wasserstein

    options = models.parse_options(args.option)
    models.get("critic").options(options)
    probe = models.build("critic", input_shape=(2,), num_outputs=1, **options)  # the ranges
    threads = train.set_threads(args.threads, probe)
    for name in (args.p, args.q):
        if name not in data.DISTRIBUTIONS:
            data.sample(name, 1)  # raises the error listing the valid names
    config = wasserstein.CriticConfig(
        p=args.p, q=args.q, samples=args.samples, steps=args.steps, lr=args.lr, seed=args.seed
    )
    print(
        f"critic between {args.p} (P) and {args.q} (Q), {args.samples} samples each, "
        f"{threads} thread(s)"
    )
    critic, x_p, x_q, result = wasserstein.train_critic(
        config, options, progress=not args.no_progress
    )
    print(
        f"  W1 estimate (critic)     {result.estimate:.6f}  (lipnets.certify.wasserstein_estimate)"
    )
    print(f"  exact W1 (POT ot.emd2)   {result.exact:.6f}")
    print(f"  relative gap             {100 * result.relative_gap:.3f}%")
    print(f"  median gradient norm     {result.median_gradient_norm:.4f}  (critic on the data)")
    print(f"  sound Lipschitz bound    {result.lipschitz_bound:.7f}")
    print(f"  trained in               {result.seconds:.1f} s ({config.steps} full-batch steps)")
    name = args.name or f"critic-{args.p}-{args.q}-{datetime.now():%Y%m%d-%H%M%S}"
    folder = wasserstein.write_run(
        args.out, name, critic, x_p, x_q, config, result, options=options, command=_command(argv, 1)
    )
    print(f"  run folder               {folder}{_kept(args.out, name, folder)}")
    return 0


# ---------------------------------------------------------------- parser


def _add_data_args(p: argparse.ArgumentParser, *, with_name: bool) -> None:
    if with_name:
        p.add_argument("--data", default="digits", help="dataset name (default: digits)")
    p.add_argument("--data-root", default="data", help="torchvision root (default: data)")
    p.add_argument(
        "--download", action="store_true", help="let torchvision download a missing dataset"
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    _add_threads_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=arguments.count,
        help="torch threads, >= 1 (default: 1 for models under 100k parameters, else "
        "torch's default)",
    )


def _add_run_args(p: argparse.ArgumentParser, *, default_name: str) -> None:
    p.add_argument(
        "--out",
        type=arguments.writable_folder,
        default="runs",  # a string: argparse checks it with the type too
        help="parent folder of the run, a writable folder or one that can be created "
        "(default: runs)",
    )
    p.add_argument(
        "--name",
        type=arguments.run_name,
        help=f"run folder name, a plain name (default: {default_name}); if taken, "
        "NAME-2, NAME-3, ... (an earlier run is never overwritten)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m zoo``; every value's ``type=`` is a check of `zoo.arguments`."""
    parser = arguments.Parser(
        prog="python -m zoo",
        description="Train, evaluate and certify 1-Lipschitz models; Wasserstein critics.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `python -m zoo list` for the models, datasets and shipped checkpoints.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="build a small network and print its sound bound")
    p.add_argument("--width", type=arguments.even_width, default=128, help="an even width >= 2")
    p.add_argument("--seed", type=arguments.seed, default=0)

    sub.add_parser("list", help="models, datasets, distributions, shipped checkpoints")

    count, positive, nonnegative = arguments.count, arguments.positive, arguments.nonnegative
    p = sub.add_parser("train", help="train a model and write a run folder with its card")
    p.add_argument("model", help="a model name (python -m zoo list)")
    _add_data_args(p, with_name=True)
    p.add_argument("--epochs", type=count, help="default: the model's (python -m zoo list)")
    p.add_argument("--batch-size", type=count, help="global batch size (split over processes)")
    p.add_argument("--lr", type=positive, help="peak learning rate of Adam, > 0")
    p.add_argument("--schedule", choices=("cosine", "constant"))
    p.add_argument("--loss", choices=("hinge", "hkr", "ce", "ibp", "crown-ibp"))
    p.add_argument("--margin", type=positive, help="hinge/HKR margin, or cross-entropy offset, > 0")
    p.add_argument("--alpha", type=nonnegative, help="HKR hinge weight, >= 0")
    p.add_argument("--temperature", type=positive, help="cross-entropy temperature, > 0")
    p.add_argument("--weight-decay", type=nonnegative, help="Adam's weight decay, >= 0")
    p.add_argument("--seed", type=arguments.seed)
    p.add_argument("--max-steps", type=count, help="stop after this many optimiser steps")
    p.add_argument(
        "-o", "--option", action="append", metavar="KEY=VALUE", help="a model option (repeatable)"
    )
    p.add_argument(
        "--eps",
        type=arguments.radius,
        nargs="+",
        help="l2 radii (>= 0) to certify in the card; with --loss ibp/crown-ibp, the l-inf "
        "radii to verify by CROWN, the largest being the training radius",
    )
    from zoo import certified, robustness

    certified.add_arguments(p)
    robustness.add_arguments(p)  # --crown-points, --attack-points
    _add_run_args(p, default_name="MODEL-DATA-TIMESTAMP")

    p = sub.add_parser("eval", help="recompute a card's numbers from its checkpoint")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder, card, checkpoint or name")
    _add_data_args(p, with_name=False)

    p = sub.add_parser("certify", help="certified accuracy at any radii, optional PGD check")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder, card, checkpoint or name")
    _add_data_args(p, with_name=False)
    p.add_argument("--data", help="dataset (default: the card's)")
    p.add_argument(
        "--eps", type=arguments.radius, nargs="+", help="l2 radii >= 0 (default: the dataset's)"
    )
    p.add_argument(
        "--attack",
        type=count,
        nargs="?",
        const=200,
        default=0,
        metavar="N",
        help="run PGD-l2 on the first N >= 1 test samples (default 200) against the certificates",
    )

    p = sub.add_parser(
        "wasserstein",
        help="train a critic between two 2-D distributions",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from zoo.wasserstein import CriticConfig

    critic = CriticConfig()
    p.add_argument("--p", default=critic.p, help="distribution P, scored high")
    p.add_argument("--q", default=critic.q, help="distribution Q, scored low")
    p.add_argument("--samples", type=count, default=critic.samples, help="samples of each")
    p.add_argument("--steps", type=count, default=critic.steps, help="full-batch Adam steps")
    p.add_argument(
        "--lr", type=positive, default=critic.lr, help="peak learning rate (cosine), > 0"
    )
    p.add_argument(
        "--seed", type=arguments.seed, default=critic.seed, help="seed of samples and critic"
    )
    p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE", help="critic option")
    _add_threads_arg(p)
    _add_run_args(p, default_name="critic-P-Q-TIMESTAMP")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    from zoo.graft import add_parser as add_graft_parser

    p = add_graft_parser(sub)  # linearity grafting (zoo.graft)
    _add_data_args(p, with_name=False)
    _add_run_args(p, default_name="MODEL-graft-TIMESTAMP")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m zoo`` on ``argv``; every refusal is one line on stderr, status 2.

    A bad value (`zoo.arguments`) or a `ZooError` prints
    ``python -m zoo COMMAND: error: ...`` without a traceback and returns 2;
    an interruption (Ctrl-C) returns 130 and leaves no half-written run.
    """
    from zoo.errors import ZooError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except arguments.CommandLineError as error:
        print(f"{error.prog}: error: {error.message}", file=sys.stderr)
        return 2
    prog = f"python -m zoo {args.command}"
    try:
        if args.command == "demo":
            demo(args.width, args.seed)
            return 0
        if args.command == "list":
            return cmd_list(args)
        if args.command == "train":
            return cmd_train(args, argv)
        if args.command in ("eval", "certify"):
            from zoo.train import Distributed

            args.device_ = Distributed().device(args.device)
            return cmd_eval(args) if args.command == "eval" else cmd_certify(args)
        if args.command == "wasserstein":
            return cmd_wasserstein(args, argv)
        if args.command == "graft":
            from zoo.graft import cmd_graft

            return cmd_graft(args, argv)
    except ZooError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (no run folder was left half written)", file=sys.stderr)
        return 130
    print(f"python -m zoo: error: unknown command {args.command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
