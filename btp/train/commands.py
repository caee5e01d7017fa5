"""`btp train` and `btp data ...` (owned by btp.train)."""
from __future__ import annotations

import typer

from btp._placeholder import not_available

data_app = typer.Typer(help="Make datasets: synthetic defects on real shapes, in the public layouts.",
                       no_args_is_help=True)


def train() -> None:
    """Train a BTP model (encoder pre-training, then the BTP stage)."""
    not_available("train", "training lands with the training issue")


@data_app.command("synth")
def synth() -> None:
    """Write a synthetic-defect dataset in the Anomaly-ShapeNet layout."""
    not_available("data synth", "synthetic defects land with the training issue")
