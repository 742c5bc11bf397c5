"""Linearity grafting in the zoo: ``python -m zoo graft RUN_OR_RECIPE --ratio 0.5 --eps 0.1``.

The source is a zoo run (a run folder, card, checkpoint or shipped name, as ``eval``
takes) or a *recipe*: a model name (``mlp``), which is first trained here as the
baseline by adversarial training, FGSM from a random start plus GradAlign
(`lipnets.graft.finetune` on the un-grafted model, ``--base-epochs``). Then:

1. `lipnets.graft.graft_mask` picks ``round(ratio * N)`` of the ``N`` ReLU neurons by
   ``--score`` on ``--calib`` training inputs at the l-infinity radius ``--eps``;
2. `lipnets.graft.graft` swaps the ``nn.ReLU`` modules for `lipnets.nn.GraftedReLU`;
3. `lipnets.graft.finetune` fine-tunes for ``--epochs`` (slopes and intercepts at
   ``--slope-lr-scale`` times ``--lr``, no weight decay on them);
4. the source and the grafted model are evaluated the same way, in float64, on the
   test set at ``--eps``: clean accuracy, unstable ReLUs (`lipnets.graft.unstable_relus`),
   CROWN-verified accuracy (`lipnets.certify.certify_crown`), and on the first
   ``--verify-points`` test inputs complete verification (`lipnets.verify.verify`,
   ``--time-limit`` seconds and ``--max-nodes`` domains per input) with its time and
   domains.

The run folder holds the grafted ``model.safetensors`` (its masks, slopes and intercepts
with the weights; the metadata ``zoo.grafted`` names the grafted modules, and
`load_grafted` rebuilds the model) and ``card.json``: the usual classifier fields of the
grafted model (clean accuracy, l2 certified accuracy from its sound Lipschitz bound,
which includes the grafted slopes), its ``crown_verified_accuracy`` at ``--eps``, and a
``graft`` object with the ratio, the score, the neuron counts and the numbers before and
after.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import lipnets
from lipnets.certify import certify_crown
from lipnets.graft import SCORES, finetune, graft, graft_mask, unstable_relus
from lipnets.nn import GraftedReLU
from lipnets.verify import verify
from zoo import arguments
from zoo.errors import ZooError

__all__ = ["GRAFTED_KEY", "add_parser", "cmd_graft", "load_grafted", "measure"]

#: The checkpoint metadata key naming the grafted modules (a JSON list of module names).
GRAFTED_KEY = "zoo.grafted"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``graft`` sub-command's own options (the data and run options are
    ``python -m zoo``'s, added by the caller)."""
    count, positive, nonnegative = arguments.count, arguments.positive, arguments.nonnegative
    p = sub.add_parser("graft", help="linearity grafting: graft, fine-tune, verify before/after")
    p.add_argument(
        "source",
        metavar="RUN_OR_RECIPE",
        help="a run folder, card, checkpoint or shipped name; or a model name (mlp), "
        "trained here first by FGSM + GradAlign",
    )
    p.add_argument(
        "--eps",
        type=arguments.radius,
        required=True,
        help="l-inf radius (> 0) of the scores, the fine-tuning and the verification",
    )
    p.add_argument(
        "--ratio", type=arguments.unit, default=0.5, help="share of neurons to graft, in [0, 1]"
    )
    p.add_argument("--score", choices=SCORES, default="combined", help="neuron score")
    p.add_argument("--epochs", type=count, default=20, help="fine-tuning epochs, >= 1")
    p.add_argument("--lr", type=positive, default=1e-3, help="weights' learning rate (Adam)")
    p.add_argument(
        "--slope-lr-scale", type=positive, default=10.0, help="slopes' lr over --lr, > 0"
    )
    p.add_argument("--grad-align", type=nonnegative, default=0.2, help="GradAlign weight, >= 0")
    p.add_argument("--batch-size", type=count, default=64)
    p.add_argument("--base-epochs", type=count, help="recipe only: baseline epochs (default 40)")
    p.add_argument(
        "-o", "--option", action="append", metavar="KEY=VALUE", help="recipe only: model option"
    )
    p.add_argument("--seed", type=arguments.seed, default=0, help="initialisation, data order")
    p.add_argument("--calib", type=count, default=512, help="training inputs scored")
    p.add_argument(
        "--verify-points", type=count, default=50, help="test inputs verified by BaB, >= 1"
    )
    p.add_argument("--time-limit", type=positive, default=2.0, help="BaB seconds per input")
    p.add_argument("--max-nodes", type=count, default=2000, help="BaB domains per input")
    p.add_argument("--data", help="dataset (default: the card's; digits for a recipe)")
    return p


# ---------------------------------------------------------------- checkpoints


def save_grafted(path: Path, model: nn.Module, arch: dict[str, Any]) -> None:
    """The zoo's checkpoint of a grafted model, with the grafted module names."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    names = [n for n, m in model.named_modules() if isinstance(m, GraftedReLU)]
    metadata = {
        "zoo.model": arch["model"],
        "zoo.options": json.dumps(arch["options"], sort_keys=True),
        "zoo.input_shape": json.dumps(arch["input_shape"]),
        "zoo.num_outputs": str(arch["num_outputs"]),
        "lipnets_version": lipnets.__version__,
        GRAFTED_KEY: json.dumps(names),
    }
    save_file(state, str(path), metadata=metadata)
    path.chmod(0o644)


def load_grafted(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the grafted model of a ``python -m zoo graft`` checkpoint (eval mode).

    Raises:
        ZooError: if the file is not a zoo checkpoint of a grafted model or its tensors
            do not fit.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from zoo import cards, models

    arch = cards.read_architecture(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if GRAFTED_KEY not in meta:
        raise ZooError(f"{str(path)!r} is not a grafted checkpoint: no {GRAFTED_KEY!r} metadata")
    names = json.loads(meta[GRAFTED_KEY])
    state = load_file(str(path))
    base = models.build(
        arch["model"],
        input_shape=arch["input_shape"],
        num_outputs=arch["num_outputs"],
        **arch["options"],
    )
    try:
        masks = {name: state[f"{name}.mask"] for name in names}
        model = graft(base, masks)
        model.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ZooError(
            f"checkpoint {str(path)!r} does not fit its grafted model: {error}"
        ) from None
    return model.to(device).eval()


# ---------------------------------------------------------------- the numbers


def measure(model: nn.Module, x: Tensor, y: Tensor, eps: float, args: Any) -> dict[str, Any]:
    """Clean, CROWN-verified and BaB-verified accuracy, unstable ReLUs and BaB cost of
    ``model`` on ``(x, y)`` at l-inf ``eps`` (float64 copy, eval mode)."""
    frozen = copy.deepcopy(model).to(device=x.device, dtype=torch.float64).eval()
    x = x.to(torch.float64)
    n = x.shape[0]
    with torch.no_grad():
        clean = frozen(x).argmax(1).cpu() == y.cpu()
    start = time.perf_counter()
    crown = certify_crown(frozen, x, y.to(x.device), eps, norm="inf").cpu()
    crown_seconds = time.perf_counter() - start
    unstable = unstable_relus(frozen, x, eps, norm="inf")
    p = min(args.verify_points, n)
    result = verify(
        frozen,
        x[:p],
        y[:p].to(x.device),
        eps,
        norm="inf",
        time_limit=args.time_limit,
        max_nodes=args.max_nodes,
        progress=not args.no_progress,
    )
    status = result.status
    return {
        "clean_accuracy": int(clean.sum()) / n,
        "crown_verified_accuracy": int(crown.sum()) / n,
        "crown_seconds": round(crown_seconds, 4),
        "unstable_relus_per_input": float(unstable.double().mean()),
        "unstable_relus_total": int(unstable.sum()),
        "bab_points": p,
        "bab_verified_accuracy": status.count("verified") / p,
        "bab_falsified": status.count("falsified"),
        "bab_unknown": status.count("unknown"),
        "bab_seconds_per_input": float(result.time.mean()),
        "bab_seconds_total": float(result.time.sum()),
        "bab_nodes_per_input": float(result.nodes.double().mean()),
    }


# ---------------------------------------------------------------- the command


def _source(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, dict, Any, str]:
    """The source model, its architecture, the data split and ``"run"`` or ``"recipe"``."""
    from zoo import cards, data, models

    path = Path(args.source)
    shipped = cards.pretrained()
    if not path.exists() and args.source not in shipped and args.source not in models.MODELS:
        raise ZooError(
            f"{args.source!r} is neither a run folder, a card, a checkpoint, a shipped model "
            f"({', '.join(shipped) or 'none'}) nor a recipe (a model name: "
            f"{', '.join(models.MODELS)})"
        )
    if not path.exists() and args.source in models.MODELS and args.source not in shipped:
        spec = models.get(args.source)
        if spec.kind != "classifier":
            raise ZooError(f"{args.source} is a Wasserstein critic: only classifiers are grafted")
        options = models.parse_options(args.option)
        options = spec.options(options)
        name = args.data or "digits"
        dataset = data.get(name)
        models.build(
            args.source, input_shape=dataset.input_shape, num_outputs=dataset.num_classes, **options
        )
        if not _has_relu(args.source, options):
            raise ZooError(
                f"{args.source} with options {options} has no nn.ReLU to graft "
                "(for mlp: -o activation=relu, the default)"
            )
        split = data.load(name, root=args.data_root, download=args.download, seed=0)
        torch.manual_seed(args.seed)
        model = models.build(
            args.source,
            input_shape=split.info.input_shape,
            num_outputs=split.info.num_classes,
            **options,
        )
        arch = cards.architecture(
            args.source, options, split.info.input_shape, split.info.num_classes
        )
        return model.to(device), dict(arch), split, "recipe"
    for flag, value in (("--base-epochs", args.base_epochs), ("-o/--option", args.option)):
        if value is not None:
            raise ZooError(
                f"{flag} is for a recipe (a model name such as mlp), not for the run "
                f"{args.source!r}, which is already trained"
            )
    checkpoint, card = cards.find_run(args.source)
    model, arch = cards.load_model(checkpoint, device=device)
    if models.get(arch["model"]).kind != "classifier":
        raise ZooError(f"{args.source} holds a Wasserstein critic: only classifiers are grafted")
    if not any(isinstance(m, nn.ReLU) for m in model.modules()):
        raise ZooError(f"{args.source} holds a {arch['model']} without nn.ReLU: nothing to graft")
    name = args.data or (card["data"]["name"] if card else None)
    if name is None:
        raise ZooError(f"{checkpoint} has no card next to it: pass --data NAME")
    seed = card["data"].get("seed") if card else None
    fraction = card["data"].get("test_fraction") if card else None
    split = data.load(
        name,
        root=args.data_root,
        download=args.download,
        seed=0 if seed is None else seed,
        test_fraction=0.25 if fraction is None else fraction,
    )
    if tuple(split.info.input_shape) != tuple(arch["input_shape"]):
        raise ZooError(
            f"the checkpoint takes inputs of shape {tuple(arch['input_shape'])} but {name} "
            f"has {tuple(split.info.input_shape)}"
        )
    return model, dict(arch), split, "run"


def _has_relu(model_name: str, options: dict[str, Any]) -> bool:
    from zoo import models

    probe = models.build(model_name, input_shape=(1, 2, 2), num_outputs=2, **options)
    return any(isinstance(m, nn.ReLU) for m in probe.modules())


def _line(label: str, before: dict, after: dict, key: str, fmt: str) -> str:
    return f"  {label:28s} {format(before[key], fmt):>10s} -> {format(after[key], fmt):>10s}"


def cmd_graft(args: argparse.Namespace, argv: list[str]) -> int:
    """``python -m zoo graft``: see the module's docstring."""
    from zoo import cards, runs, train
    from zoo.train import Distributed, eps_key

    if args.eps <= 0:
        raise ZooError(f"--eps must be > 0 (the l-inf radius to graft for), got {args.eps:g}")
    device = Distributed().device(args.device)
    model, arch, split, kind = _source(args, device)
    threads = train.set_threads(args.threads, model)
    progress = not args.no_progress
    x_train, y_train = train.tensors_of(split.train)
    x_test, y_test = train.tensors_of(split.test)
    x_train, y_train = x_train.to(device), y_train.to(device)
    x_test = x_test.to(device)
    recipe = {
        "norm": "inf",
        "eps": args.eps,
        "grad_align": args.grad_align,
        "optimizer": "adam",
        "schedule": "cosine",
        "batch_size": args.batch_size,
    }
    options = {k: v for k, v in recipe.items() if k != "eps"}
    start = time.perf_counter()
    base_epochs = None
    if kind == "recipe":
        base_epochs = 40 if args.base_epochs is None else args.base_epochs
        print(
            f"training the baseline {arch['model']}: {base_epochs} epochs of FGSM + GradAlign "
            f"at l-inf {args.eps:g}, {threads} thread(s)"
        )
        finetune(
            model,
            (x_train, y_train),
            args.eps,
            epochs=base_epochs,
            lr=args.lr,
            generator=torch.Generator().manual_seed(args.seed),
            progress=progress,
            **options,
        )
    model.eval()
    print(f"measuring the source at l-inf {args.eps:g} ({x_test.shape[0]} test inputs)")
    before = measure(model, x_test, y_test, args.eps, args)
    calib = x_train[: args.calib].to(torch.float64)
    mask = graft_mask(
        copy.deepcopy(model).double(),
        calib,
        args.eps,
        norm="inf",
        ratio=args.ratio,
        score=args.score,
        generator=torch.Generator().manual_seed(args.seed),
    )
    grafted = graft(model, mask)
    chosen = sum(int(m.sum()) for m in mask.values())
    neurons = sum(m.numel() for m in mask.values())
    print(
        f"grafting {chosen} of {neurons} neurons ({args.score} score), fine-tuning "
        f"{args.epochs} epochs"
    )
    history = finetune(
        grafted,
        (x_train, y_train),
        args.eps,
        epochs=args.epochs,
        lr=args.lr,
        slope_lr_scale=args.slope_lr_scale,
        progress=progress,
        generator=torch.Generator().manual_seed(args.seed + 1),
        **options,
    )
    if not history.losses or not math.isfinite(history.losses[-1]):
        raise ZooError("fine-tuning diverged (a non-finite loss): lower --lr")
    grafted.eval()
    after = measure(grafted, x_test, y_test, args.eps, args)
    l2 = [float(eps_key(e)) for e in _default_l2(split.info.name)]
    evaluation = train.evaluate(grafted, split.test, l2, device=device, lower=None)
    seconds = time.perf_counter() - start
    graft_field = {
        "source": str(args.source),
        "source_kind": kind,
        "ratio": args.ratio,
        "score": args.score,
        "norm": "inf",
        "eps": args.eps,
        "calibration_inputs": int(calib.shape[0]),
        "neurons": neurons,
        "grafted_neurons": chosen,
        "grafted_per_module": {k: int(v.sum()) for k, v in mask.items()},
        "finetune": {
            **recipe,
            "epochs": args.epochs,
            "lr": args.lr,
            "slope_lr_scale": args.slope_lr_scale,
            "seed": args.seed,
            "steps": history.steps,
            "final_loss": history.losses[-1],
            "base_epochs": base_epochs,
        },
        "verification": {
            "method": "lipnets.verify.verify",
            "time_limit": args.time_limit,
            "max_nodes": args.max_nodes,
            "dtype": "float64",
        },
        "before": before,
        "after": after,
    }
    fields = {
        "model": arch["model"],
        "options": dict(arch["options"]),
        "data": split.info.as_dict(),
        **evaluation.card_fields(),
        "lower_bound_search": None,
        "crown_verified_accuracy": {
            "norm": "inf",
            "method": "crown",
            "dtype": "float64",
            "accuracy": {eps_key(args.eps): after["crown_verified_accuracy"]},
        },
        "training": {
            "grafted": True,
            "seconds": round(seconds, 2),
            "threads": threads,
            "device": device.type,
        },
        "graft": graft_field,
    }
    command = "python -m zoo " + shlex.join(argv)

    def checkpoint(path: Path) -> None:
        save_grafted(path, grafted, arch)

    def card(path: Path) -> None:
        cards.write_card(path.parent, {**fields, **cards.provenance(path.parent, command)})

    name = args.name or f"{arch['model']}-graft-{datetime.now():%Y%m%d-%H%M%S}"
    folder = runs.write_run_folder(
        args.out, name, [(cards.WEIGHTS, checkpoint), (cards.CARD, card)]
    )
    print(
        f"{arch['model']} grafted at ratio {args.ratio:g} ({args.score}), l-inf eps "
        f"{args.eps:g}, before -> after:"
    )
    pct = "7.1%"
    for label, key, fmt in (
        ("clean accuracy", "clean_accuracy", pct),
        ("CROWN-verified", "crown_verified_accuracy", pct),
        (f"BaB-verified (first {after['bab_points']})", "bab_verified_accuracy", pct),
        ("BaB unknown", "bab_unknown", "d"),
        ("unstable ReLUs per input", "unstable_relus_per_input", ".1f"),
        ("BaB seconds per input", "bab_seconds_per_input", ".3f"),
        ("BaB domains per input", "bab_nodes_per_input", ".1f"),
    ):
        print(_line(label, before, after, key, fmt))
    print(f"  sound Lipschitz bound (l2)   {evaluation.lipschitz_bound:.6g}")
    print(f"  run folder                   {folder}")
    return 0


def _default_l2(name: str) -> tuple[float, ...]:
    from zoo import data

    return data.get(name).default_eps
