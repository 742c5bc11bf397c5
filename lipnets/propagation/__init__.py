"""Placeholder for the propagation subpackage (see DESIGN.md)."""

__all__: list[str] = []
