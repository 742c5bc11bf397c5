"""Placeholder for the estimators subpackage (see DESIGN.md)."""

__all__: list[str] = []
