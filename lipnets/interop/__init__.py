"""Traced forms for the layers of other Lipschitz libraries (deel-torchlip, orthogonium).

Each module here registers, with `lipnets.graph.forms.register_traced_form`, the forms of
one library's modules whose ``forward`` torch.fx cannot trace (Note [Traced forms] in
`lipnets.graph.forms`). `lipnets.graph.trace` imports a module of this package the first
time it meets a class of its library, so lipnets never imports a library that the user's
model does not use; nothing here is imported by ``import lipnets``.

* `lipnets.interop.torchlip`: deel-torchlip's ``GroupSort``, ``GroupSort2``, ``FullSort``
  and ``MaxMin`` (with their ``k_coef_lip``);
* `lipnets.interop.orthogonium`: orthogonium's ``MaxMin``.

Their parametrized layers (deel-torchlip's ``SpectralLinear``, orthogonium's
``OrthoLinear`` and ``AdaptiveOrthoConv2d``) need no form: lipnets bounds every layer
parametrized with ``torch.nn.utils.parametrize`` from the weights it realises (Note
[Realised parametrizations] in `lipnets.graph.realise`).
"""
