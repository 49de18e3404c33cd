"""`fp4roll pack` and `fp4roll models ...` (placeholder until the pack helper lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root CLI."""
