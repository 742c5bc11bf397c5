"""Ready models and command-line jobs built on lipnets' public API only.

``python -m zoo --help`` lists the commands. The modules:

- `zoo.models`: the registry (``groupsort-mlp``, ``lipconvnet``, ``critic``) and ``build``;
- `zoo.data`: digits (embedded), MNIST, Fashion-MNIST and CIFAR-10 through
  torchvision, 2-D distributions for critics;
- `zoo.train`: training (one process or torchrun DDP) and evaluation for cards;
- `zoo.cards`: safetensors checkpoints and JSON model cards, the shipped checkpoints;
- `zoo.wasserstein`: a critic between two 2-D samples, checked against POT;
- `zoo.plots`: certified accuracy against the radius, critic contours.

lipnets never imports this package.
"""
