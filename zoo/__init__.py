"""Ready models and command-line jobs built on lipnets' public API only.

``python -m zoo --help`` lists the commands. From Python, the registry
(`zoo.hub`, in the manner of timm's):

- ``zoo.list_models()``: the registered architectures; ``zoo.list_models(pretrained=True)``:
  the checkpoints shipped with the package;
- ``zoo.load_pretrained(name)``: a shipped checkpoint as ``(model, card)``, the model in
  eval mode, its checkpoint verified against the card's SHA-256;
- ``zoo.load_run(folder)``: the same for a run folder of ``python -m zoo train``.

The modules:

- `zoo.models`: the registry (``groupsort-mlp``, ``lipconvnet``, ``critic``, ``mlp``) and
  ``build``;
- `zoo.data`: digits (embedded), MNIST, Fashion-MNIST and CIFAR-10 through
  torchvision, 2-D distributions for critics;
- `zoo.train`: training (one process or torchrun DDP) and evaluation for cards;
- `zoo.robustness`: the cards' CROWN-certified and attack-robust accuracy;
- `zoo.cards`: safetensors checkpoints and JSON model cards, the shipped checkpoints;
- `zoo.modelcard`: the README.md of every run, rendered from its card;
- `zoo.runs`: run folders written whole or not at all;
- `zoo.wasserstein`: a critic between two 2-D samples, checked against POT;
- `zoo.plots`: certified accuracy against the radius, critic contours.

lipnets never imports this package.
"""

from zoo.hub import list_models, load_pretrained, load_run

__all__ = ["list_models", "load_pretrained", "load_run"]
