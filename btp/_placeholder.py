"""Commands whose owning module has not landed yet exit 2 with this message (never silently)."""
from __future__ import annotations

import typer


def not_available(name: str, what: str) -> None:
    typer.echo(f"btp {name}: not available yet ({what}).", err=True)
    raise typer.Exit(code=2)
