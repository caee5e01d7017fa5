"""The Python-backend model of a Triton repository from `btp export --format triton`.

`btp.export.triton.export_repository` copies this file, as it is, to ``model.py`` of every Python
model it writes, next to ``btp_env.json`` (the ``sys.path`` of the environment that wrote the
repository, the Python version, the model file and which stage this model is):

- ``pipeline`` (layout "python", model ``btp``): one raw scan -> ``btp.runtime.Pipeline`` -> object
  score, one point score per input row (NaN where a NaN/inf row was dropped), global probability.
- ``pre`` (layout "ensemble", ``btp_pre``): raw scan -> the engine's inputs (``btp.geometry.prepare``)
  and the prepared scan that ``btp_post`` needs to map scores back.
- ``post`` (``btp_post``): the engine's outputs + the prepared scan -> point scores per input row and
  the object score as the runtime makes it (``btp.geometry.prepare.score_maps``,
  ``btp.geometry.scores.object_score``).

With a reference (``btp export --format triton --reference PART.btpref``), the ``pipeline`` or
``post`` stage also scores the scan against the part's reference, as ``btp-run --reference`` does
(``btp.runtime.pipeline.load_references`` reads it, checks it against the model file;
``btp.runtime.guided.ReferenceSet`` registers and scores), and gives ``REFERENCE``'s outputs. The
reference file lies in the model's version folder; its name is the config's parameter
``reference``.

A request's rows go through ``btp.io.cloud_from_array``, the readers' own NaN dropping and
minimum-points check. Each stage is a plain class over numpy dicts (``STAGES``), so tests run it
without Triton; ``TritonPythonModel`` only moves tensors in and out (DLPack both ways: the stub's
numpy conversions mis-handle numpy 2 arrays). ``ports`` gives each stage's inputs and outputs, from
which the exporter writes the config.pbtxt files.
"""
# no `from __future__ import annotations`: Triton's stub may load this file without registering it in
# sys.modules, where dataclasses cannot resolve string annotations
import json
import os
import sys

ENV_FILE = "btp_env.json"


def _use_environment() -> dict:
    """In a repository, put the writing environment's sys.path first (Triton's stub runs the
    system interpreter); imported from the package, there is no ``btp_env.json`` and nothing to do."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), ENV_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        env = json.load(fh)
    sys.path[:0] = [p for p in env["sys_path"] if p not in sys.path]
    return env


_ENV = _use_environment()

from dataclasses import KW_ONLY, dataclass  # noqa: E402

import numpy as np  # noqa: E402

from btp import contract  # noqa: E402
from btp.config import BTPConfig  # noqa: E402


# ---- the tensors each stage takes and gives ----------------------------------------------------

@dataclass(frozen=True)
class Port:
    """One tensor of a Triton model's config: dims are sizes, -1 (variable) or contract symbols."""

    name: str
    _: KW_ONLY
    dtype: str                  # Triton's name without TYPE_: FP32, INT64, INT32, BOOL
    dims: tuple
    reshape: tuple | None = None  # Triton's reshape of a batched model's tensor (a scalar per scan: ())

    def resolved(self, cfg: BTPConfig) -> "Port":
        size = contract.sizes(cfg)
        return Port(self.name, dtype=self.dtype, dims=tuple(size[d] if isinstance(d, str) else d for d in self.dims),
                    reshape=self.reshape)


_DTYPES = {"float32": "FP32", "int64": "INT64", "int32": "INT32", "bool": "BOOL"}

SCAN = (Port("points", dtype="FP32", dims=(-1, 3)),)  # the entry model's input: one raw scan, any number of rows
SCORES = (Port("object_score", dtype="FP32", dims=(1,)), Port("point_scores", dtype="FP32", dims=(-1,)),
          Port("global_prob", dtype="FP32", dims=(1,)))  # the entry model's outputs
# with a reference: the scan against the part's reference (btp.runtime.guided), maps one value per input
# row (NaN where a row was dropped or the scan did not register), the rest one value per scan
REFERENCE = (Port("fused_scores", dtype="FP32", dims=(-1,)),        # the fused map the decision is made on
             Port("deviation", dtype="FP32", dims=(-1,)),           # signed distance to the template, scan units
             Port("fused_object_score", dtype="FP32", dims=(1,)),   # NaN when the scan did not register
             Port("reference_score", dtype="FP32", dims=(1,)),      # the reference maps' alone (NaN likewise)
             Port("threshold", dtype="FP32", dims=(1,)),            # the part's, from its good scans
             Port("fitness", dtype="FP32", dims=(1,)),              # of the scan -> template registration
             Port("registered", dtype="BOOL", dims=(1,)),           # False: not scored against the reference
             Port("anomalous", dtype="BOOL", dims=(1,)))            # registered and fused score > threshold
REFERENCE_PARAMETER = "reference"  # the config.pbtxt parameter naming the reference file
# the prepared scan, from btp_pre to btp_post (with the engine's center and the raw points)
PREPARED = (Port("patch_idx", dtype="INT64", dims=("G", "K")), Port("sample_idx", dtype="INT64", dims=(-1,)),
            Port("sampled_points", dtype="FP32", dims=(-1, 3)), Port("row_mask", dtype="BOOL", dims=(-1,)),
            Port("cell_rep", dtype="INT64", dims=(-1,)),       # the voxel rule's raw point -> cell map (empty for
            Port("cell_of_raw", dtype="INT32", dims=(-1,)))    # the other rules)


def engine_port(tensor: contract.Tensor, batched: bool) -> Port:
    """A contract tensor as a Triton port: with the batch axis as 1 (``batched=False``: a Python
    stage's one scan), or without it for a model that batches (a per-scan scalar reshaped to [])."""
    dims = tuple(tensor.shape[1:])
    if not batched:
        return Port(tensor.name, dtype=_DTYPES[tensor.dtype], dims=(1,) + dims)
    return Port(tensor.name, dtype=_DTYPES[tensor.dtype], dims=dims or (1,), reshape=() if not dims else None)


def ports(stage: str, cfg: BTPConfig, reference: bool = False) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
    """(inputs, outputs) of ``stage`` ("pipeline", "pre", "post", or "engine": the ONNX/TensorRT model)
    for a model of ``cfg``, dims resolved; ``reference``: the repository scores with a reference
    (the pipeline and post stages then also give ``REFERENCE``)."""
    engine_in, engine_out = contract.inputs(), contract.runtime_outputs(cfg)
    guided = REFERENCE if reference else ()
    if stage == "pipeline":
        ins, outs = SCAN, SCORES + guided
    elif stage == "pre":
        ins, outs = SCAN, tuple(engine_port(t, False) for t in engine_in) + PREPARED
    elif stage == "post":
        ins = SCAN + PREPARED + (engine_port(contract.tensor("center"), False),) + tuple(
            engine_port(t, False) for t in engine_out)
        outs = tuple(p for p in SCORES if p.name != "global_prob") + guided  # global_prob: the engine's own
    elif stage == "engine":
        ins, outs = tuple(engine_port(t, True) for t in engine_in), tuple(engine_port(t, True) for t in engine_out)
    else:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)} or engine")
    return tuple(p.resolved(cfg) for p in ins), tuple(p.resolved(cfg) for p in outs)


# ---- the stages (numpy in, numpy out) ----------------------------------------------------------

def _scan(tensors: dict, cfg: BTPConfig):
    """The request's points -> PointCloud through btp.io (NaN/inf rows dropped, max(G, K) rows needed)."""
    from btp.geometry.prepare import min_points
    from btp.io import cloud_from_array

    return cloud_from_array(np.ascontiguousarray(tensors["points"], dtype=np.float32), min_points=min_points(cfg))


def _rows(cloud) -> np.ndarray:
    return cloud.row_mask if cloud.row_mask is not None else np.ones(len(cloud.points), bool)


def _reference_outputs(guided, rows: np.ndarray) -> dict:
    """A scan's ``btp.runtime.guided.GuidedResult`` -> REFERENCE's tensors; ``rows``: bool [R], the
    input rows its points came from."""
    scores = guided.scores
    fused, deviation = (np.full(len(rows), np.nan, np.float32) for _ in range(2))
    if scores.registered:
        fused[rows], deviation[rows] = scores.fused, scores.deviation
    return {"fused_scores": fused, "deviation": deviation,
            "fused_object_score": np.array([scores.object_score], np.float32),
            "reference_score": np.array([scores.reference_score], np.float32),
            "threshold": np.array([guided.threshold], np.float32),
            "fitness": np.array([scores.fitness], np.float32),
            "registered": np.array([scores.registered], bool),
            "anomalous": np.array([guided.decision == "anomalous"], bool)}


class PipelineStage:
    """One raw scan -> btp.runtime.Pipeline -> the entry model's outputs (with ``reference``, a
    .btpref file: also scored against it, REFERENCE's outputs)."""

    def __init__(self, model_file: str, threads: int | None = None, reference: str | None = None):
        from btp.runtime import Pipeline

        self.pipe = Pipeline(model_file, threads=threads, reference=reference)
        self.cfg = self.pipe.cfg

    def __call__(self, tensors: dict) -> dict:
        result = self.pipe(_scan(tensors, self.cfg))
        out = {"object_score": np.array([result.object_score], np.float32),
               "point_scores": np.asarray(result.scores_per_row(), np.float32),
               "global_prob": np.array([result.global_prob], np.float32)}
        if result.reference is not None:
            rows = result.row_mask if result.row_mask is not None else np.ones(len(result.point_scores), bool)
            out.update(_reference_outputs(result.reference, rows))
        return out


class PreStage:
    """Raw scan -> the engine's inputs (a batch of one) and the prepared scan for PostStage
    (``reference`` is PostStage's: taken for the common signature, not used)."""

    def __init__(self, model_file: str, threads: int | None = None, reference: str | None = None):
        from btp.runtime.metadata import read_model_meta

        self.cfg = read_model_meta(model_file).config

    def __call__(self, tensors: dict) -> dict:
        from btp.geometry.prepare import prepare  # the runtime's CPU chain

        cloud = _scan(tensors, self.cfg)
        prep = prepare(cloud.points, self.cfg)
        vmap = prep.voxel_map
        return {"neighborhood": prep.neighborhood[None], "center": prep.center[None],
                "patch_idx": prep.patch_idx.astype(np.int64), "sample_idx": prep.sample_idx.astype(np.int64),
                "sampled_points": prep.points.astype(np.float32), "row_mask": _rows(cloud),
                "cell_rep": vmap.cell_rep.astype(np.int64) if vmap else np.zeros(0, np.int64),
                "cell_of_raw": vmap.cell_of_raw.astype(np.int32) if vmap else np.zeros(0, np.int32)}


class PostStage:
    """The engine's outputs + the prepared scan -> point scores per input row, object score (with
    ``reference``, a .btpref file: also scored against it, REFERENCE's outputs)."""

    def __init__(self, model_file: str, threads: int | None = None, reference: str | None = None):
        from btp.runtime.metadata import read_model_meta
        from btp.runtime.pipeline import load_references

        self.cfg = read_model_meta(model_file).config
        self.references = None if reference is None else load_references(reference, model_file)
        self.embed = None  # a reference with the model's patch embeddings runs the model on the aligned scan
        if self.references is not None and any(r.settings.get("embedding") for r in self.references.refs.values()):
            from btp.runtime import Pipeline

            self.embed = Pipeline(model_file, threads=threads).embed

    def __call__(self, tensors: dict) -> dict:
        from btp.geometry.prepare import Prepared, score_maps
        from btp.geometry.sampling import VoxelMap
        from btp.geometry.scores import object_score

        cfg = self.cfg
        raw_all = np.ascontiguousarray(tensors["points"], np.float32)
        mask = np.asarray(tensors["row_mask"], bool)
        cell_rep = np.asarray(tensors["cell_rep"], np.int64)
        vmap = (VoxelMap(cell_rep=cell_rep, cell_of_raw=np.asarray(tensors["cell_of_raw"], np.int32), voxel=0.0)
                if cell_rep.size else None)
        prep = Prepared(raw_points=raw_all[mask], sample_idx=np.asarray(tensors["sample_idx"]),
                        points=np.asarray(tensors["sampled_points"]), origin=np.zeros(3, np.float32), scale=1.0,
                        voxel_map=vmap, patch_idx=np.asarray(tensors["patch_idx"]),
                        center=np.asarray(tensors["center"])[0])
        scores = np.full(len(raw_all), np.nan, np.float32)  # one score per input row, NaN where dropped
        point_probs = np.asarray(tensors["patch_point_probs"])[0] if "patch_point_probs" in tensors else None
        maps = score_maps(np.asarray(tensors["patch_probs"])[0], prep, cfg, point_probs=point_probs)
        scores[mask] = maps.raw
        obj = object_score(cfg.scoring, float(np.asarray(tensors["object_score"]).reshape(-1)[0]),
                           float(np.asarray(tensors["global_prob"]).reshape(-1)[0]), maps.model,
                           selfsim=maps.selfsim)
        out = {"point_scores": scores, "object_score": np.array([obj], np.float32)}
        if self.references is not None:  # as Pipeline does: the raw points and their zero-shot scores
            out.update(_reference_outputs(self.references.score(None, prep.raw_points, scores[mask], self.embed),
                                          mask))
        return out


STAGES = {"pipeline": PipelineStage, "pre": PreStage, "post": PostStage}


def reference_file(model_config: dict) -> str | None:
    """The reference file a model's config names (parameter ``reference``, a file in its version
    folder), None when it names none."""
    value = model_config.get("parameters", {}).get(REFERENCE_PARAMETER, {}).get("string_value")
    return value or None


# ---- Triton's side -----------------------------------------------------------------------------

class TritonPythonModel:
    """Triton's entry point: the stage named in btp_env.json, its tensors moved by DLPack."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        if list(sys.version_info[:2]) != _ENV["python"]:
            raise pb_utils.TritonModelException(
                f"the Python stub runs {sys.version_info[:2]}, the btp environment is {_ENV['python']}")
        here = os.path.dirname(os.path.abspath(__file__))
        reference = reference_file(json.loads(args.get("model_config") or "{}"))
        self.stage = STAGES[_ENV["stage"]](os.path.join(here, _ENV["model_file"]), threads=_ENV.get("threads"),
                                           reference=None if reference is None else os.path.join(here, reference))
        self.inputs = [p.name for p in ports(_ENV["stage"], self.stage.cfg)[0]]

    def execute(self, requests):
        pb, responses = self.pb, []
        for request in requests:
            try:
                tensors = {}
                for name in self.inputs:
                    tensor = pb.get_input_tensor_by_name(request, name)
                    if tensor is not None:  # an optional engine output this model does not give
                        tensors[name] = np.from_dlpack(tensor)
                out = self.stage(tensors)
                responses.append(pb.InferenceResponse(output_tensors=[
                    pb.Tensor.from_dlpack(name, np.ascontiguousarray(value)) for name, value in out.items()]))
            except Exception as exc:  # a bad scan is the client's error; the server keeps serving
                responses.append(pb.InferenceResponse(error=pb.TritonError(
                    f"{type(exc).__name__}: {exc}", pb.TritonError.INVALID_ARG)))
        return responses
