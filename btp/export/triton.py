"""NVIDIA Triton Inference Server: a model repository for a btp model.onnx, and a local server.

    btp export --format triton --model model.onnx --out REPO [--layout python|ensemble] [--engine onnx|plan]
               [--reference PART.btpref]
    btp serve REPO                      # a real tritonserver on 127.0.0.1 (KServe v2 HTTP/gRPC)

The entry model is always ``btp``: input ``points`` FP32 ``[-1, 3]`` (one raw scan), outputs
``object_score`` FP32 ``[1]``, ``point_scores`` FP32 ``[-1]`` (one per input row) and
``global_prob`` FP32 ``[1]``. With ``--reference PART.btpref`` (built with this model file), every
scan is also scored against the part's reference as ``btp-run --reference`` scores it, and the
entry model gives ``triton_stages.REFERENCE`` too (fused map, signed deviation, fused and reference
scores, the part's threshold, registration fitness, registered, anomalous). The file is read and
checked against the model here, copied into the version folder of the stage that scores with it
(``btp``, or ``btp_post`` of the ensemble), named by that config's parameter ``reference``, and
read and checked again when the server loads the model. Layouts:

- ``python`` (default): one Python-backend model running ``btp.runtime.Pipeline`` on the model file
  in its version folder - for servers with only the Python backend (the ``tritonserver`` that
  PyPI's nvidia-pytriton ships, which this project uses locally).
- ``ensemble``: ``btp`` = ensemble of ``btp_pre`` (Python: btp.runtime's load/sample/group
  stages) -> ``btp_engine`` (``onnxruntime_onnx`` with dynamic batching, or ``tensorrt_plan`` from
  ``btp build``) -> ``btp_post`` (Python: propagation and interpolation back to the raw rows,
  and the object score as the runtime makes it).
  For NVIDIA's Triton containers, which carry the ONNX Runtime and TensorRT backends.

Every Python model is ``btp/export/triton_stages.py`` copied as ``model.py`` (its stage named in
``btp_env.json``); every config.pbtxt lists the tensors ``triton_stages.ports`` gives, the engine's
from ``btp.contract``. Everything the stages need is read from the model file's metadata, as
everywhere in btp. The Python models find btp and its dependencies through ``btp_env.json`` (the ``sys.path`` of the
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
from importlib import resources
from pathlib import Path

from btp.contract import check_choice, export_format
from btp.errors import BTPError, NotAvailableError
from btp.export import triton_stages as stages
from btp.io.files import atomic_write_bytes
from btp.runtime.metadata import read_model_meta
from btp.runtime.reference import SUFFIX

LAYOUTS = export_format("triton").choices["--layout"]
ENGINES = export_format("triton").choices["--engine"]
# the folder that holds this btp package (site-packages, or the checkout of an editable install):
# the Python stage puts it on its sys.path to import the same btp
PACKAGE_HOME = Path(__file__).resolve().parents[2]
# `make setup` makes .venv-triton in the checkout; looked for in the current folder (else $BTP_TRITONSERVER)
TRITON_VENV = Path(".venv-triton")


class TritonError(BTPError, RuntimeError):
    """The repository cannot be written or the server cannot start; says why and how to fix it."""


def _env_doc(model_file: str, threads: int | None, stage: str) -> bytes:
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    return json.dumps({"sys_path": [str(PACKAGE_HOME)] + paths, "python": list(sys.version_info[:2]),
                       "model_file": model_file, "threads": threads, "stage": stage}, indent=1).encode()


def _write(path: Path, text: str | bytes) -> None:
    atomic_write_bytes(path, text.encode() if isinstance(text, str) else text)


def _port(p: stages.Port) -> str:
    reshape = f" reshape: {{ shape: [ {', '.join(map(str, p.reshape))} ] }}" if p.reshape is not None else ""
    return f'{{ name: "{p.name}" data_type: TYPE_{p.dtype} dims: [ {", ".join(map(str, p.dims))} ]{reshape} }}'


def _ports(kind: str, ports) -> str:
    return f"{kind} [\n" + ",\n".join(f"  {_port(p)}" for p in ports) + "\n]\n"


def _config(name: str, head: str, stage: str, cfg, *, max_batch_size: int = 0, tail: str = "",
            guided: bool = False) -> str:
    """config.pbtxt of model ``name``; its inputs and outputs are ``stage``'s (btp.export.triton_stages.ports;
    ``guided``: of a repository that scores with a reference)."""
    ins, outs = stages.ports(stage, cfg, reference=guided)
    return (f'name: "{name}"\n{head}\nmax_batch_size: {max_batch_size}\n' + _ports("input", ins)
            + _ports("output", outs) + tail)


def _python_model(folder: Path, model_path: Path, env: bytes, stage: str, cfg, name: str, tail: str = "",
                  reference: Path | None = None) -> None:
    """A Python-backend model: the model file (its metadata configures the stage), btp_env.json,
    model.py = btp/export/triton_stages.py as it is, config.pbtxt; with ``reference``, a copy of the
    .btpref file the stage scores with, named in config.pbtxt."""
    version = folder / "1"
    version.mkdir(parents=True)
    shutil.copyfile(model_path, version / "model.onnx")
    if reference is not None:
        copy = reference.name if reference.suffix == SUFFIX else f"reference{SUFFIX}"  # never over model.onnx
        shutil.copyfile(reference, version / copy)
        tail = (f'parameters {{ key: "{stages.REFERENCE_PARAMETER}" value: {{ string_value: {json.dumps(copy)} }} }}\n'
                + tail)
    _write(version / stages.ENV_FILE, env)
    _write(version / "model.py", resources.files("btp.export").joinpath("triton_stages.py").read_bytes())
    _write(folder / "config.pbtxt", _config(name, 'backend: "python"', stage, cfg, tail=tail,
                                            guided=reference is not None))


def check_reference(reference: str | Path, model_path: Path) -> Path:
    """``--reference``: one .btpref file, valid and built for ``model_path`` (TritonError otherwise)."""
    from btp.runtime.pipeline import load_references

    reference = Path(reference)
    if reference.is_dir():
        raise TritonError(f"--reference {reference} is a folder: a Triton request carries no file path to route "
                          "a scan to its part by, so a repository serves one part; pass one PART.btpref and "
                          "export one repository per part")
    load_references(reference, model_path)  # the file's own checks, then its model's sha256
    return reference


def export_repository(model_path: str | Path, out: str | Path, *, layout: str = "python", engine: str = "onnx",
                      plan: str | Path | None = None, max_queue_delay_us: int = 2000,
                      threads: int | None = None, reference: str | Path | None = None) -> Path:
    """Write a Triton model repository for ``model_path`` (a btp model.onnx) to ``out``; with
    ``reference`` (a .btpref built with that model file), one whose pipeline also scores with it."""
    try:
        check_choice("triton", "--layout", layout)
        check_choice("triton", "--engine", engine)
    except ValueError as exc:
        raise TritonError(str(exc)) from None
    model_path = Path(model_path)
    meta = read_model_meta(model_path)  # refuses a file that is not a btp model
    cfg = meta.config
    if reference is not None:
        reference = check_reference(reference, model_path)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TritonError(f"{out} is not empty: pass a new folder (a repository is written whole)")
    if layout == "python":
        _python_model(out / "btp", model_path, _env_doc("model.onnx", threads, "pipeline"), "pipeline", cfg, "btp",
                      tail="instance_group [ { count: 1 kind: KIND_CPU } ]\n", reference=reference)
        return out
    if engine == "plan" and (plan is None or not Path(plan).is_file()):
        raise TritonError("--engine plan needs --plan FILE: a TensorRT engine from `btp build` on the serving GPU")
    for stage in ("pre", "post"):
        _python_model(out / f"btp_{stage}", model_path, _env_doc("model.onnx", threads, stage), stage, cfg,
                      f"btp_{stage}", reference=reference if stage == "post" else None)
    engine_dir = out / "btp_engine" / "1"
    engine_dir.mkdir(parents=True)
    if engine == "onnx":
        shutil.copyfile(model_path, engine_dir / "model.onnx")
        platform = 'platform: "onnxruntime_onnx"'
    else:
        shutil.copyfile(plan, engine_dir / "model.plan")
        platform = 'platform: "tensorrt_plan"'
    _write(out / "btp_engine" / "config.pbtxt", _config(
        "btp_engine", platform, "engine", cfg, max_batch_size=8,
        tail=f"dynamic_batching {{ max_queue_delay_microseconds: {int(max_queue_delay_us)} }}\n"))
    _write(out / "btp" / "config.pbtxt", _ensemble(cfg, reference is not None))
    (out / "btp" / "1").mkdir(parents=True)
    return out


def _ensemble(cfg, reference: bool) -> str:
    """The entry model ``btp``: btp_pre -> btp_engine -> btp_post, every tensor passed by its own name
    (the engine's object score as ``engine_object_score``: btp_post makes the served one)."""
    renamed = {"object_score": "engine_object_score"}
    pre_out = [p.name for p in stages.ports("pre", cfg)[1]]
    engine_in, engine_out = ([p.name for p in ports] for ports in stages.ports("engine", cfg))
    post_in, post_out = ([p.name for p in ports] for ports in stages.ports("post", cfg, reference=reference))
    steps = [("btp_pre", {"points": "points"}, {k: k for k in pre_out}),
             ("btp_engine", {k: k for k in engine_in}, {k: renamed.get(k, k) for k in engine_out}),
             ("btp_post", {k: renamed.get(k, k) for k in post_in}, {k: k for k in post_out})]
    blocks = []
    for name, inputs, outputs in steps:
        ins = "".join(f'    input_map {{ key: "{a}" value: "{b}" }}\n' for a, b in inputs.items())
        outs = "".join(f'    output_map {{ key: "{a}" value: "{b}" }}\n' for a, b in outputs.items())
        blocks.append(f'  step [ {{\n    model_name: "{name}"\n    model_version: -1\n{ins}{outs}  }} ]\n')
    return _config("btp", 'platform: "ensemble"', "pipeline", cfg, guided=reference,
                   tail=f'ensemble_scheduling {{\n{"".join(blocks)}}}\n')


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
    # replaced, never rewritten in place: a server already running from this folder (another `btp
    # serve`) keeps the files it has open or mapped
    for f in (server_root / "backends" / "python").iterdir():
        if f.is_file():
            atomic_write_bytes(dest / f.name, f.read_bytes())
    atomic_write_bytes(dest / "triton_python_backend_stub", stub.read_bytes())
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
    from btp.kernels.build import cache_dir

    cache = cache_dir() / "triton"  # $BTP_CACHE_DIR/triton, beside the kernels and the TensorRT engines
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
