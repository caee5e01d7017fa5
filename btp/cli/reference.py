"""`btp reference build`: one part's reference from a few good scans (owned by btp.runtime). Torch-free."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(name="reference", help="Per-part references: a few good scans make the decision trustworthy.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.command("build")
def build(
    good: List[str] = typer.Argument(..., help="Good scans of ONE part (files, folders or globs), any poses; 2 or more."),
    model: Path = typer.Option(..., "--model", "-m", help="model.onnx the reference is for (btp-run refuses it "
                                                          "with another model)."),
    out: Path = typer.Option(..., "--out", "-o", help="The reference file to write, PART.btpref."),
    cad: Optional[Path] = typer.Option(None, "--cad", help="The part's CAD model (.stl .ply .obj): its sampled "
                                                           "surface becomes the template."),
    name: Optional[str] = typer.Option(None, "--name", help="The part's name (routing with --reference DIR "
                                                            "matches it against folders and file names; default: "
                                                            "the --out file's stem)."),
    embeddings: bool = typer.Option(False, "--embeddings/--no-embeddings", help="Also bank the model's own patch "
                                    "embeddings of the good scans (the model must give them: `btp-export "
                                    "--patch-embed`); every scan then runs through the model a second time, in the "
                                    "template's frame. Off by default: on the validation sets it did not beat the "
                                    "geometric bank (models/reference-guided.md)."),
) -> None:
    """Build PART.btpref: the good scans registered to each other (any orientation) into a template,
    a coreset bank of multi-scale FPFH descriptors, and the good scans' own leave-one-out score
    statistics and threshold. Use it with `btp-run MODEL.onnx SCANS --reference PART.btpref`."""
    from rich.console import Console
    from rich.markup import escape

    from btp.errors import BTPError
    from btp.runtime.guided import EMBEDDING_SETTINGS, Settings
    from btp.runtime.refbuild import build_from_files
    from btp.runtime.run import expand_inputs

    console = Console(stderr=True)
    files = expand_inputs(good, exclude=None)
    if len(files) < 2:
        console.print(f"[red]btp reference build: {len(files)} good scan(s) found in {good}; pass at least 2")
        raise typer.Exit(code=2)
    try:
        ref = build_from_files(model, files, out, cad=cad, name=name,
                               settings=EMBEDDING_SETTINGS if embeddings else Settings(),
                               log=lambda msg: console.print(f"btp reference build: {escape(msg)}"))
    except (BTPError, ValueError, OSError) as exc:
        console.print(f"[red]btp reference build: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    size = out.stat().st_size / 1e6
    console.print(f"[green]wrote[/green] {escape(str(out))}: part {ref.name!r}, {len(files)} good scans, "
                  f"threshold {ref.threshold:.4f}, {size:.2f} MB, {ref.header['build_seconds']:.1f} s")
