"""The `btp` command line: one typer app; each area owns its commands in `btp/<area>/commands.py`.

Heavy imports (torch, onnxruntime, open3d) happen inside the commands, so `btp --help` is instant
and the torch-free commands run without torch installed.
"""
from __future__ import annotations

import typer

from btp.benchmarks import commands as bench_commands
from btp.eval import commands as eval_commands
from btp.export import commands as export_commands
from btp.export import trt_commands
from btp.kernels import commands as kernel_commands
from btp.model import commands as model_commands
from btp.runtime import commands as runtime_commands
from btp.train import commands as train_commands

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
app.add_typer(bench_commands.app, name="bench")
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
    """`btp-bench` = `btp bench`."""
    bench_commands.app()


if __name__ == "__main__":
    main()
