"""The `btp` command line: one typer app; the commands of each area live in `btp/cli/<area>.py`
(run, calibrate, report, demo in run.py/demo.py; watch, ledger in watch.py; doctor in doctor.py; bench, build, convert, eval,
export, train), the top floor of the package: they may import everything below them.

Heavy imports (torch, onnxruntime, open3d) happen inside the commands, so `btp --help` is instant
and the torch-free commands run without torch installed.
"""
from __future__ import annotations

import sys

import typer

from btp.cli import bench as bench_commands
from btp.cli import build as trt_commands
from btp.cli import convert as model_commands
from btp.cli import doctor as kernel_commands
from btp.cli import eval as eval_commands
from btp.cli import export as export_commands
from btp.cli import reference as reference_commands
from btp.cli import run as runtime_commands
from btp.cli import train as train_commands
from btp.cli import watch as line_commands

app = typer.Typer(
    name="btp",
    help="btp-edge: zero-shot 3D anomaly detection (BTP) - train, evaluate, export, run, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("train")(train_commands.train)
train_commands.data_app.command("eval-sets")(eval_commands.eval_sets)
app.add_typer(train_commands.data_app, name="data")
app.command("eval")(eval_commands.evaluate)
app.command("export")(export_commands.export)
app.command("serve")(export_commands.serve)
app.command("build")(trt_commands.build)
app.command("run")(runtime_commands.run)
app.command("calibrate")(runtime_commands.calibrate)
app.command("report")(runtime_commands.report)
app.command("demo")(runtime_commands.demo)
app.command("watch")(line_commands.watch)
app.add_typer(line_commands.ledger_app, name="ledger")
app.add_typer(bench_commands.app, name="bench")
app.add_typer(reference_commands.app, name="reference")
app.add_typer(model_commands.convert_app, name="convert")
app.command("doctor")(kernel_commands.doctor)


def _single(command, name: str, help: str) -> typer.Typer:
    one = typer.Typer(name=name, help=help, add_completion=False, pretty_exceptions_enable=False)
    one.command(name=name)(command)
    return one


def main() -> None:
    app()


def export_main() -> None:
    """`btp-export` = `btp export`."""
    typer.main.get_command(_single(export_commands.export, "btp-export", "Export a BTP model to ONNX."))()


def run_main() -> None:
    """`btp-run` = `btp run`."""
    typer.main.get_command(_single(runtime_commands.run, "btp-run", "Score point clouds with model.onnx."))()


def bench_main() -> None:
    """`btp-bench` = `btp bench`; a missing input (a shapes folder, a model file) is one line, exit 2."""
    from btp.errors import BTPError

    try:
        bench_commands.app()
    except BTPError as exc:
        print(f"btp-bench: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
