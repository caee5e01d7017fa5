"""FLOPs of the exported encoder, counted from the ONNX graph, and the machine's matmul peak.

``onnx_flops(model_path)`` runs the graph once in ONNX Runtime (CPU) with every MatMul / Gemm /
Conv / Einsum input and output exposed as a graph output, so every shape is the real one (no
reliance on static shape inference through Reshapes), and counts 2 FLOPs per multiply-add:

- MatMul ``[..., m, k] @ [..., k, n]``: 2 * prod(out.shape) * k
- Gemm: 2 * M * N * K
- Conv: 2 * prod(out.shape) * (C_in / group) * prod(kernel)
- Einsum: 2 * prod(out.shape) * (product of the contracted dimensions)

Element-wise ops, softmax, norms are not counted (a few % of the total for a transformer);
that makes achieved GFLOP/s a slight under-estimate, stated in the reports.

``matmul_peak()`` times float32 GEMM in numpy (its BLAS) and torch (if importable) on all
usable cores: the FP32 ceiling this CPU reaches on the best-shaped work.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

COUNTED_OPS = ("MatMul", "Gemm", "Conv", "Einsum", "FusedMatMul")


@dataclass(frozen=True, kw_only=True)
class FlopCount:
    total: float  # FLOPs per forward at the given batch
    by_op: dict = field(default_factory=dict)  # op type -> FLOPs
    batch: int = 1
    counted_ops: tuple = COUNTED_OPS

    @property
    def gflop(self) -> float:
        return self.total / 1e9

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gflop"] = self.gflop
        return d


def _feeds(session, batch: int, rng) -> dict:
    feeds = {}
    for inp in session.get_inputs():
        shape = [batch if (not isinstance(d, int) or d <= 0) and i == 0 else d
                 for i, d in enumerate(inp.shape)]
        if any(not isinstance(d, int) for d in shape):
            raise ValueError(f"input {inp.name} has a symbolic dimension besides the batch: {inp.shape}")
        if "int" in inp.type:
            feeds[inp.name] = np.zeros(shape, dtype=np.int64)
        else:
            feeds[inp.name] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    return feeds


def onnx_flops(model_path, batch: int = 1) -> FlopCount:
    """Count the FLOPs of one forward of ``model_path`` at ``batch`` (see module docstring)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    nodes = [n for n in model.graph.node if n.op_type in COUNTED_OPS]
    existing = {o.name for o in model.graph.output}
    wanted = []
    for node in nodes:
        for name in list(node.input[:2]) + [node.output[0]]:
            if name and name not in existing and name not in wanted:
                wanted.append(name)
    initializers = {init.name: tuple(init.dims) for init in model.graph.initializer}
    wanted = [w for w in wanted if w not in initializers]
    for name in wanted:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep node names
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(None, _feeds(session, batch, np.random.default_rng(0)))
    shapes = {n: tuple(v.shape) for n, v in zip(names, values)}
    shapes.update(initializers)
    by_op: Counter = Counter()
    for node in nodes:
        out = shapes.get(node.output[0])
        a = shapes.get(node.input[0])
        b = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if out is None or a is None:
            continue
        out_elems = float(np.prod(out))
        if node.op_type in ("MatMul", "FusedMatMul"):
            by_op[node.op_type] += 2.0 * out_elems * a[-1]
        elif node.op_type == "Gemm":
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
            by_op["Gemm"] += 2.0 * out_elems * k
        elif node.op_type == "Conv" and b is not None:
            group = next((at.i for at in node.attribute if at.name == "group"), 1)
            by_op["Conv"] += 2.0 * out_elems * (a[1] / group) * float(np.prod(b[2:]))
        elif node.op_type == "Einsum":
            eq = next(at.s.decode() for at in node.attribute if at.name == "equation")
            lhs, rhs = eq.replace(" ", "").split("->")
            dims = {}
            for term, shape in zip(lhs.split(","), (a, b)):
                if shape is not None:
                    dims.update({c: s for c, s in zip(term[-len(shape):], shape)})
            contracted = float(np.prod([dims[c] for c in set(lhs.replace(",", "")) - set(rhs) if c in dims]))
            by_op["Einsum"] += 2.0 * out_elems * contracted
    return FlopCount(total=float(sum(by_op.values())), by_op=dict(by_op), batch=batch)


@dataclass(frozen=True, kw_only=True)
class MatmulPeak:
    gflops: float  # the best of the libraries below
    by_library: dict  # "numpy (openblas)" -> GFLOP/s
    size: int
    threads: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def _best_gflops(fn, flop: float, seconds: float) -> float:
    fn()
    best = float("inf")
    t_end = time.perf_counter() + seconds
    reps = 0
    while reps < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return flop / best / 1e9


def matmul_peak(size: int = 1024, seconds: float = 1.0, threads: int | None = None) -> MatmulPeak:
    """Best float32 GEMM rate of [size, size] @ [size, size] in numpy and torch (if present)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    flop = 2.0 * size ** 3
    by_lib = {}
    blas = _numpy_blas()
    by_lib[f"numpy sgemm ({blas})"] = _best_gflops(lambda: np.matmul(a, b, out=out), flop, seconds)
    try:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        tout = torch.empty_like(ta)
        with torch.inference_mode():
            by_lib[f"torch mm ({torch.get_num_threads()} threads)"] = _best_gflops(
                lambda: torch.mm(ta, tb, out=tout), flop, seconds)
    except ImportError:
        pass
    return MatmulPeak(gflops=max(by_lib.values()), by_library=by_lib, size=size, threads=threads)


def _numpy_blas() -> str:
    try:
        cfg = np.show_config(mode="dicts")
        return str(cfg["Build Dependencies"]["blas"]["name"])
    except Exception:  # noqa: BLE001 - only a label
        return "blas"
