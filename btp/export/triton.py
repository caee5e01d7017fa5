"""NVIDIA Triton Inference Server: a model repository for a btp model.onnx, and a local server.

    btp export --format triton --model model.onnx --out REPO [--layout python|ensemble] [--engine onnx|plan]
    btp serve REPO                      # a real tritonserver on 127.0.0.1 (KServe v2 HTTP/gRPC)

The entry model is always ``btp``: input ``points`` FP32 ``[-1, 3]`` (one raw scan), outputs
``object_score`` FP32 ``[1]``, ``point_scores`` FP32 ``[-1]`` (one per input row) and
``global_prob`` FP32 ``[1]``. Layouts:

- ``python`` (default): one Python-backend model running ``btp.runtime.Pipeline`` on the model file
  in its version folder - for servers with only the Python backend (the ``tritonserver`` that
  PyPI's nvidia-pytriton ships, which this project uses locally).
- ``ensemble``: ``btp`` = ensemble of ``btp_pre`` (Python: btp.runtime's load/sample/group
  stages) -> ``btp_engine`` (``onnxruntime_onnx`` with dynamic batching, or ``tensorrt_plan`` from
  ``btp build``) -> ``btp_post`` (Python: propagation and interpolation back to the raw rows,
  and the object score as the runtime makes it).
  For NVIDIA's Triton containers, which carry the ONNX Runtime and TensorRT backends.

Everything the stages need is read from the model file's metadata, as everywhere in btp. The
Python models find btp and its dependencies through ``btp_env.json`` (the ``sys.path`` of the
environment that wrote the repository): Triton's Python stub runs the system interpreter, which
must be the same minor version (checked at load).

nvidia-pytriton pins numpy<2, so it lives in its own venv (``.venv-triton``, made by ``make
setup``); only its ``tritonserver`` binary, Python backend and stubs are used. Torch-free.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from btp.errors import BTPError, NotAvailableError
from btp.io.files import atomic_write_bytes
from btp.runtime.metadata import read_model_meta

LAYOUTS = ("python", "ensemble")
ENGINES = ("onnx", "plan")
# the folder that holds this btp package (site-packages, or the checkout of an editable install):
# the Python stage puts it on its sys.path to import the same btp
PACKAGE_HOME = Path(__file__).resolve().parents[2]
# `make setup` makes .venv-triton in the checkout; looked for in the current folder (else $BTP_TRITONSERVER)
TRITON_VENV = Path(".venv-triton")


class TritonError(BTPError, RuntimeError):
    """The repository cannot be written or the server cannot start; says why and how to fix it."""


_OUTPUTS = '''output [
  { name: "object_score" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "point_scores" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "global_prob" data_type: TYPE_FP32 dims: [ 1 ] }
]'''

# The Python-backend model (layout "python"): Pipeline on the model file beside it.
_PIPELINE_MODEL = '''"""btp: one raw scan -> object score, per-row point scores (btp.runtime.Pipeline). Written by
`btp export --format triton`; the environment is named in btp_env.json beside this file."""
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(_HERE, "btp_env.json")) as fh:
    _ENV = json.load(fh)
sys.path[:0] = [p for p in _ENV["sys_path"] if p not in sys.path]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


def _tensor(name, array):
    # DLPack both ways: the stub's numpy conversions mis-handle numpy 2 arrays
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(array))


def _points(request):
    # DLPack, not as_numpy(): the stub's as_numpy() mis-strides arrays under numpy 2
    return np.ascontiguousarray(np.from_dlpack(pb_utils.get_input_tensor_by_name(request, "points")),
                                dtype=np.float32)


class TritonPythonModel:
    def initialize(self, args):
        if list(sys.version_info[:2]) != _ENV["python"]:
            raise pb_utils.TritonModelException(
                f"the Python stub runs {sys.version_info[:2]}, the btp environment is {_ENV['python']}")
        from btp.runtime import Pipeline

        self.pipe = Pipeline(os.path.join(_HERE, _ENV["model_file"]), threads=_ENV.get("threads"))
        self.need = max(self.pipe.cfg.encoder.num_group, self.pipe.cfg.encoder.group_size)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                pts = _points(request)
                if pts.ndim != 2 or pts.shape[1] != 3:
                    raise ValueError(f"points must be [M, 3] FP32, got shape {list(pts.shape)}")
                finite = np.isfinite(pts).all(axis=1)
                if finite.sum() < self.need:
                    raise ValueError(f"{int(finite.sum())} finite points, fewer than the model's max(G, K) = "
                                     f"{self.need}")
                result = self.pipe(pts[finite])
                scores = np.full(len(pts), np.nan, np.float32)  # one score per input row, NaN where dropped
                scores[finite] = result.point_scores
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    _tensor("object_score", np.array([result.object_score], np.float32)),
                    _tensor("point_scores", scores),
                    _tensor("global_prob", np.array([result.global_prob], np.float32))]))
            except Exception as exc:  # a bad scan is the client's error; the server keeps serving
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"{type(exc).__name__}: {exc}", pb_utils.TritonError.INVALID_ARG)))
        return responses
'''

# Ensemble steps (layout "ensemble"): both read the stages' config from the model file's metadata.
_STAGES_INIT = '''    def initialize(self, args):
        from btp.runtime.metadata import read_model_meta

        self.cfg = read_model_meta(os.path.join(_HERE, _ENV["model_file"])).config
'''
_PRE_MODEL = _PIPELINE_MODEL.split("class TritonPythonModel")[0] + '''class TritonPythonModel:
    """raw points -> engine inputs + what btp_post needs to map scores back."""

''' + _STAGES_INIT + '''
    def execute(self, requests):
        from btp.geometry.prepare import prepare  # the runtime's CPU chain

        cfg, responses = self.cfg, []
        for request in requests:
            try:
                pts = _points(request)
                finite = np.isfinite(pts).all(axis=1) if pts.ndim == 2 else np.zeros(0, bool)
                prep = prepare(pts[finite] if pts.ndim == 2 else pts, cfg)
                vmap = prep.voxel_map
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    _tensor("neighborhood", prep.neighborhood[None]), _tensor("center", prep.center[None]),
                    _tensor("patch_idx", prep.patch_idx.astype(np.int64)),
                    _tensor("sample_idx", prep.sample_idx.astype(np.int64)),
                    _tensor("sampled_points", prep.points.astype(np.float32)),
                    _tensor("row_mask", finite.astype(np.bool_)),
                    # the voxel rule's raw point -> cell map (empty for the other rules)
                    _tensor("cell_rep", vmap.cell_rep if vmap else np.zeros(0, np.int64)),
                    _tensor("cell_of_raw", vmap.cell_of_raw if vmap else np.zeros(0, np.int32))]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"{type(exc).__name__}: {exc}", pb_utils.TritonError.INVALID_ARG)))
        return responses
'''

_POST_MODEL = _PIPELINE_MODEL.split("def _points")[0] + '''def _get(request, name):
    return np.from_dlpack(pb_utils.get_input_tensor_by_name(request, name))


class TritonPythonModel:
    """engine patch probabilities -> per-row point scores (btp.runtime's propagate / interpolate)
    and the object score (btp.geometry.scores.object_score, as the runtime's)."""

''' + _STAGES_INIT + '''
    def execute(self, requests):
        from btp.geometry.prepare import Prepared, scores_to_raw
        from btp.geometry.sampling import VoxelMap
        from btp.geometry.scores import object_score

        cfg, responses = self.cfg, []
        for request in requests:
            raw_all = np.ascontiguousarray(_get(request, "points"), np.float32)
            mask = np.asarray(_get(request, "row_mask"), bool)
            cell_rep = np.asarray(_get(request, "cell_rep"), np.int64)
            vmap = (VoxelMap(cell_rep=cell_rep, cell_of_raw=np.asarray(_get(request, "cell_of_raw"), np.int32),
                             voxel=0.0) if cell_rep.size else None)
            prep = Prepared(raw_points=raw_all[mask], sample_idx=_get(request, "sample_idx"),
                            points=_get(request, "sampled_points"), origin=np.zeros(3, np.float32), scale=1.0,
                            voxel_map=vmap, patch_idx=_get(request, "patch_idx"), center=_get(request, "center")[0])
            scores = np.full(len(raw_all), np.nan, np.float32)
            point_probs = np.asarray(_get(request, "patch_point_probs"))[0] if cfg.gfcm.point_dim else None
            sampled, scores[mask] = scores_to_raw(np.asarray(_get(request, "patch_probs"))[0], prep, cfg,
                                                  point_probs=point_probs)
            obj = object_score(cfg.scoring, float(np.asarray(_get(request, "object_score")).reshape(-1)[0]),
                               float(np.asarray(_get(request, "global_prob")).reshape(-1)[0]), sampled)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                _tensor("point_scores", scores), _tensor("object_score", np.array([obj], np.float32))]))
        return responses
'''


def _env_doc(model_file: str, threads: int | None) -> bytes:
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    return json.dumps({"sys_path": [str(PACKAGE_HOME)] + paths, "python": list(sys.version_info[:2]),
                       "model_file": model_file, "threads": threads}, indent=1).encode()


def _write(path: Path, text: str | bytes) -> None:
    atomic_write_bytes(path, text.encode() if isinstance(text, str) else text)


def export_repository(model_path: str | Path, out: str | Path, *, layout: str = "python", engine: str = "onnx",
                      plan: str | Path | None = None, max_queue_delay_us: int = 2000,
                      threads: int | None = None) -> Path:
    """Write a Triton model repository for ``model_path`` (a btp model.onnx) to ``out``."""
    if layout not in LAYOUTS:
        raise TritonError(f"layout {layout!r}: choose one of {LAYOUTS}")
    if engine not in ENGINES:
        raise TritonError(f"engine {engine!r}: choose one of {ENGINES}")
    model_path = Path(model_path)
    meta = read_model_meta(model_path)  # refuses a file that is not a btp model
    cfg = meta.config
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TritonError(f"{out} is not empty: pass a new folder (a repository is written whole)")
    env = _env_doc("model.onnx", threads)
    if layout == "python":
        version = out / "btp" / "1"
        version.mkdir(parents=True)
        shutil.copyfile(model_path, version / "model.onnx")
        _write(version / "btp_env.json", env)
        _write(version / "model.py", _PIPELINE_MODEL)
        _write(out / "btp" / "config.pbtxt", f'''name: "btp"
backend: "python"
max_batch_size: 0
input [ {{ name: "points" data_type: TYPE_FP32 dims: [ -1, 3 ] }} ]
{_OUTPUTS}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
''')
        return out
    g, k, c = cfg.encoder.num_group, cfg.encoder.group_size, cfg.encoder.in_channels
    per_point = bool(cfg.gfcm.point_dim)  # the engine's per-point probabilities travel to btp_post
    post_point_in = f'  {{ name: "patch_point_probs" data_type: TYPE_FP32 dims: [ 1, {g}, {k} ] }},\n' * per_point
    engine_point_out = f'  {{ name: "patch_point_probs" data_type: TYPE_FP32 dims: [ {g}, {k} ] }},\n' * per_point
    for name, code in (("btp_pre", _PRE_MODEL), ("btp_post", _POST_MODEL)):
        (out / name / "1").mkdir(parents=True)
        shutil.copyfile(model_path, out / name / "1" / "model.onnx")  # metadata: the stages' config
        _write(out / name / "1" / "btp_env.json", env)
        _write(out / name / "1" / "model.py", code)
    _write(out / "btp_pre" / "config.pbtxt", f'''name: "btp_pre"
backend: "python"
max_batch_size: 0
input [ {{ name: "points" data_type: TYPE_FP32 dims: [ -1, 3 ] }} ]
output [
  {{ name: "neighborhood" data_type: TYPE_FP32 dims: [ 1, {g}, {k}, {c} ] }},
  {{ name: "center" data_type: TYPE_FP32 dims: [ 1, {g}, 3 ] }},
  {{ name: "patch_idx" data_type: TYPE_INT64 dims: [ {g}, {k} ] }},
  {{ name: "sample_idx" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "sampled_points" data_type: TYPE_FP32 dims: [ -1, 3 ] }},
  {{ name: "row_mask" data_type: TYPE_BOOL dims: [ -1 ] }},
  {{ name: "cell_rep" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "cell_of_raw" data_type: TYPE_INT32 dims: [ -1 ] }}
]
''')
    _write(out / "btp_post" / "config.pbtxt", f'''name: "btp_post"
backend: "python"
max_batch_size: 0
input [
  {{ name: "points" data_type: TYPE_FP32 dims: [ -1, 3 ] }},
  {{ name: "row_mask" data_type: TYPE_BOOL dims: [ -1 ] }},
  {{ name: "patch_probs" data_type: TYPE_FP32 dims: [ 1, {g} ] }},
{post_point_in}  {{ name: "patch_idx" data_type: TYPE_INT64 dims: [ {g}, {k} ] }},
  {{ name: "sample_idx" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "sampled_points" data_type: TYPE_FP32 dims: [ -1, 3 ] }},
  {{ name: "center" data_type: TYPE_FP32 dims: [ 1, {g}, 3 ] }},
  {{ name: "cell_rep" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "cell_of_raw" data_type: TYPE_INT32 dims: [ -1 ] }},
  {{ name: "object_score" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "global_prob" data_type: TYPE_FP32 dims: [ 1 ] }}
]
output [
  {{ name: "point_scores" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "object_score" data_type: TYPE_FP32 dims: [ 1 ] }}
]
''')
    engine_dir = out / "btp_engine" / "1"
    engine_dir.mkdir(parents=True)
    if engine == "onnx":
        shutil.copyfile(model_path, engine_dir / "model.onnx")
        platform = 'platform: "onnxruntime_onnx"'
    else:
        if plan is None or not Path(plan).is_file():
            raise TritonError("--engine plan needs --plan FILE: a TensorRT engine from `btp build` on the serving GPU")
        shutil.copyfile(plan, engine_dir / "model.plan")
        platform = 'platform: "tensorrt_plan"'
    _write(out / "btp_engine" / "config.pbtxt", f'''name: "btp_engine"
{platform}
max_batch_size: 8
input [
  {{ name: "neighborhood" data_type: TYPE_FP32 dims: [ {g}, {k}, {c} ] }},
  {{ name: "center" data_type: TYPE_FP32 dims: [ {g}, 3 ] }}
]
output [
  {{ name: "patch_probs" data_type: TYPE_FP32 dims: [ {g} ] }},
{engine_point_out}  {{ name: "object_score" data_type: TYPE_FP32 dims: [ 1 ] reshape: {{ shape: [ ] }} }},
  {{ name: "global_prob" data_type: TYPE_FP32 dims: [ 1 ] reshape: {{ shape: [ ] }} }}
]
dynamic_batching {{ max_queue_delay_microseconds: {int(max_queue_delay_us)} }}
''')
    engine_scores = ("patch_probs",) + (("patch_point_probs",) if per_point else ())
    steps = [("btp_pre", {"points": "points"}, {k_: k_ for k_ in ("neighborhood", "center", "patch_idx", "sample_idx",
                                                                   "sampled_points", "row_mask", "cell_rep",
                                                                   "cell_of_raw")}),
             ("btp_engine", {"neighborhood": "neighborhood", "center": "center"},
              {**{k_: k_ for k_ in engine_scores + ("global_prob",)}, "object_score": "engine_object_score"}),
             ("btp_post", {**{k_: k_ for k_ in ("points", "row_mask") + engine_scores + (
                 "patch_idx", "sample_idx", "sampled_points", "center", "cell_rep", "cell_of_raw", "global_prob")},
                 "object_score": "engine_object_score"},
              {"point_scores": "point_scores", "object_score": "object_score"})]
    blocks = []
    for name, inputs, outputs in steps:
        ins = "".join(f'    input_map {{ key: "{a}" value: "{b}" }}\n' for a, b in inputs.items())
        outs = "".join(f'    output_map {{ key: "{a}" value: "{b}" }}\n' for a, b in outputs.items())
        blocks.append(f'  step [ {{\n    model_name: "{name}"\n    model_version: -1\n{ins}{outs}  }} ]\n')
    (out / "btp" / "1").mkdir(parents=True)
    _write(out / "btp" / "config.pbtxt", f'''name: "btp"
platform: "ensemble"
max_batch_size: 0
input [ {{ name: "points" data_type: TYPE_FP32 dims: [ -1, 3 ] }} ]
{_OUTPUTS}
ensemble_scheduling {{
{"".join(blocks)}}}
''')
    return out


# ---- the server ----------------------------------------------------------------------------------

def find_tritonserver() -> tuple[Path, Path]:
    """(tritonserver binary, the pytriton package folder): $BTP_TRITONSERVER's pytriton folder, or
    ``.venv-triton`` in the current folder (``make setup`` makes it in the checkout)."""
    candidates = []
    if os.environ.get("BTP_TRITONSERVER"):
        candidates.append(Path(os.environ["BTP_TRITONSERVER"]))
    candidates += sorted(TRITON_VENV.glob("lib/python3*/site-packages/pytriton/tritonserver"))
    for root in candidates:
        binary = root / "bin" / "tritonserver"
        if binary.is_file():
            return binary, root
    raise NotAvailableError("no tritonserver found: run `make setup` (it makes .venv-triton with PyPI's "
                            "nvidia-pytriton) or set BTP_TRITONSERVER to a pytriton/tritonserver folder")


def backend_dir(server_root: Path, cache: Path) -> Path:
    """A backends folder whose Python backend has the stub for this interpreter's version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise NotAvailableError(f"this tritonserver has no Python-backend stub for Python {version}")
    dest = cache / "backends" / "python"
    dest.mkdir(parents=True, exist_ok=True)
    for f in (server_root / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)
    shutil.copyfile(stub, dest / "triton_python_backend_stub")
    (dest / "triton_python_backend_stub").chmod(0o755)
    return dest.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo: str | Path, *, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 host: str = "127.0.0.1", log_path: str | Path | None = None) -> subprocess.Popen:
    """Start tritonserver on ``repo``, bound to ``host``; returns the process (not yet ready)."""
    binary, root = find_tritonserver()
    cache = Path(os.environ.get("BTP_CACHE", Path.home() / ".cache" / "btp")) / "triton"
    backends = backend_dir(root, cache)
    libs = root.parents[1] / "nvidia_pytriton.libs"
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
        [str(libs), os.environ.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep))
    cmd = [str(binary), f"--model-repository={Path(repo).resolve()}", f"--backend-directory={backends}",
           f"--http-address={host}", f"--http-port={http_port}", f"--grpc-address={host}",
           f"--grpc-port={grpc_port}", f"--metrics-address={host}", f"--metrics-port={metrics_port}",
           "--exit-on-error=true", "--log-verbose=0"]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, http_port: int, host: str = "127.0.0.1", timeout_s: float = 120.0) -> None:
    """Block until ``/v2/health/ready`` answers 200; TritonError if the server exits or times out."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise TritonError(f"tritonserver exited with code {proc.returncode} before it was ready (see its log)")
        try:
            with urllib.request.urlopen(f"http://{host}:{http_port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TritonError(f"tritonserver was not ready on {host}:{http_port} within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM (Triton drains in-flight requests), then SIGKILL after ``timeout_s``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
