"""Placeholder for the certify subpackage (see DESIGN.md)."""

__all__: list[str] = []
