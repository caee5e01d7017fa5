"""`btp convert ...` (owned by btp.model)."""
from __future__ import annotations

import typer

from btp._placeholder import not_available

convert_app = typer.Typer(help="Convert third-party checkpoints into btp's checkpoint format.",
                          no_args_is_help=True)


@convert_app.command("ulip2")
def ulip2() -> None:
    """Map an official ULIP-2 PointBERT checkpoint (+ OpenCLIP text tower) into a btp checkpoint."""
    not_available("convert ulip2", "lands with the foundation issue")
