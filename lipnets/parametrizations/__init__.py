"""Parametrizations for torch.nn.utils.parametrize (orthogonal weights arrive here)."""

__all__: list[str] = []
