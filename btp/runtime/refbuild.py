"""``btp reference build``: good scans (+ optional CAD model) and a model.onnx -> PART.btpref. Torch-free.

    files --Pipeline (the model's zero-shot point scores of each good scan)--> points, scores
          --btp.runtime.guided.build_reference (with settings.embedding, Pipeline.embed: the model's
            patch embeddings of each good scan in the template's frame)--> Reference
          --write_reference--> PART.btpref

The model's file sha256 goes into the reference (``btp-run --reference`` refuses it with another
model), with each source file's sha256 and the settings.
"""
from __future__ import annotations

from pathlib import Path

from btp.io.files import file_sha256
from btp.runtime.guided import Settings, build_reference
from btp.runtime.pipeline import Pipeline
from btp.runtime.reference import SUFFIX, Reference, write_reference

CAD_POINTS = 50_000  # points sampled from a CAD model's surface for its template


def build_from_files(model_path: str | Path, files: list[Path], out: str | Path, *, cad: str | Path | None = None,
                     name: str | None = None, settings: Settings = Settings(), pipeline: Pipeline | None = None,
                     log=lambda msg: None) -> Reference:
    """Build and write ``out`` from the good scans ``files``; -> the Reference written.
    ``name``: the part's name (default: ``out``'s stem); ``pipeline``: one to reuse (same model)."""
    model_path, out = Path(model_path), Path(out)
    if out.suffix != SUFFIX:
        raise ValueError(f"{out}: a reference file ends in {SUFFIX} (e.g. --out part{SUFFIX})")
    pipe = pipeline or Pipeline(model_path)
    if settings.embedding and not pipe.has_embeddings:
        raise ValueError(f"{model_path} gives no patch embeddings (no patch_embed output), which a reference with "
                         "the model's embeddings needs: export the model with `btp-export --patch-embed`, or build "
                         "the reference without --embeddings (geometry and the zero-shot map)")
    results = pipe.run_batch(files)
    sources = [{"file": str(f), "sha256": file_sha256(f), "points": int(len(r.points))} for f, r in zip(files, results)]
    cad_points = None
    if cad is not None:
        cad_points = cad_surface(cad, settings.seed)
        sources.append({"file": str(cad), "sha256": file_sha256(cad), "points": CAD_POINTS, "cad": True})
    model = {"sha256": file_sha256(model_path), "name": pipe.meta.name, "file": str(model_path),
             "weights_sha256": pipe.meta.model.get("weights_sha256")}
    ref = build_reference([r.points for r in results], [r.point_scores for r in results], name=name or out.stem,
                          model=model, sources=sources, settings=settings, cad=cad_points,
                          embed=pipe.embed if settings.embedding else None, log=log)
    write_reference(out, ref)
    return Reference(name=ref.name, header=ref.header, arrays=ref.arrays, path=out)


def cad_surface(path: str | Path, seed: int = 0):
    """float32 [CAD_POINTS, 3]: points sampled from a CAD model's surface (.stl .ply .obj), the
    template of a reference built with it."""
    from btp.io import load_mesh, sample_surface

    vertices, faces = load_mesh(path)
    points, _ = sample_surface(vertices, faces, CAD_POINTS, seed)
    return points
