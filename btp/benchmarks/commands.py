"""`btp bench` / `btp-bench`: latency, parity, ops (owned by btp.benchmarks)."""
from __future__ import annotations

import typer

from btp._placeholder import not_available

app = typer.Typer(name="btp-bench", help="Latency and accuracy-parity reports.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


@app.command()
def latency() -> None:
    """End-to-end and per-stage latency per backend."""
    not_available("bench latency", "lands with the benchmark issue")


@app.command()
def parity() -> None:
    """Accuracy parity of each backend against a reference."""
    not_available("bench parity", "lands with the benchmark issue")


@app.command()
def ops() -> None:
    """Our FPS/kNN against the libraries."""
    not_available("bench ops", "lands with the benchmark issue")
