"""`btp bench whatif`: measured prototypes of runtime changes, before anyone edits btp.runtime.

Each variant runs the real ``btp.runtime.Pipeline`` (ORT CPU) in its own subprocess (thread
settings such as OMP_NUM_THREADS are read when a process starts), with the change applied as a
small, named patch. The report puts every variant's per-stage p50 next to the default, so the
runtime's owner sees what a change buys before making it. Variants:

- ``default``: the runtime as it is.
- ``omp1``: OMP_NUM_THREADS=1 (pykdtree's OpenMP kNN in group/interpolate single-threaded).
- ``nospin``: ORT session config ``session.intra_op.allow_spinning = 0`` (ORT's idle worker
  threads stop busy-waiting after a run, leaving the cores to the post-processing).
- ``omp1+nospin``: both.
- ``omp1+nospin+nearest1``: both, and the raw-scan interpolation as one plain pykdtree k=1
  query (no extra candidates, no exact tie resolution: ties at exactly equal distance have
  measure zero on real scans; where they happen the score is that of an equally near sample).
- ``ort1``: ORT with 1 intra-op thread (what a loaded / shared 2-core box may prefer).
- ``omp1+nearest1+thin``: omp1 and nearest1, and scans above 8 N points are first thinned by a
  fixed stride to about 8 N points, then bucket FPS picks N of those (a lighter downsampling
  path for huge scans; the covering radius against the default path is reported).
- ``split-concat-conv``: model.onnx rewritten by ``split_concat_conv`` (below): the mini-PointNet's
  ``Conv(Concat([Expand(max), local]))`` becomes ``Conv_local(local) + Conv_global(max)``, the
  same linear map with the global half applied once per patch instead of once per point
  (-2*G*K*p1*p2 FLOPs, no Expand/Concat); outputs checked against the original model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

VARIANTS = {
    "default": {"env": {}, "spin": None, "nearest1": False, "threads": None},
    "omp1": {"env": {"OMP_NUM_THREADS": "1"}, "spin": None, "nearest1": False, "threads": None},
    "nospin": {"env": {}, "spin": "0", "nearest1": False, "threads": None},
    "omp1+nospin": {"env": {"OMP_NUM_THREADS": "1"}, "spin": "0", "nearest1": False, "threads": None},
    "omp1+nospin+nearest1": {"env": {"OMP_NUM_THREADS": "1"}, "spin": "0", "nearest1": True, "threads": None},
    "ort1": {"env": {}, "spin": None, "nearest1": False, "threads": 1},
    "omp1+nearest1+thin": {"env": {"OMP_NUM_THREADS": "1"}, "spin": None, "nearest1": True, "threads": None,
                           "thin": 8},
    "split-concat-conv": {"env": {}, "spin": None, "nearest1": False, "threads": None, "graph": "split"},
}


def split_concat_conv(src, dst) -> int:
    """Rewrite every ``Conv(Concat([Expand(g), x], axis=1))`` with a 1-wide kernel into
    ``Conv(x, W_x, b) + Conv(g, W_g)`` (broadcast over the points): W = [W_g | W_x] split along
    its input channels. Exact algebra (float rounding aside). Returns how many were rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {i.name: i for i in graph.initializer}
    rewritten = 0
    for cat in list(graph.node):
        users = consumers.get(cat.output[0], [])
        if cat.op_type != "Concat" or len(cat.input) != 2 or len(users) != 1 or users[0].op_type != "Conv":
            continue
        expand, conv = producer.get(cat.input[0]), users[0]
        axis = next((a.i for a in cat.attribute if a.name == "axis"), None)
        if expand is None or expand.op_type != "Expand" or axis != 1 or conv.input[1] not in inits:
            continue
        weight = numpy_helper.to_array(inits[conv.input[1]])  # [C_out, C_g + C_x, 1]
        if weight.ndim != 3 or weight.shape[2] != 1:
            continue
        c_g = weight.shape[1] // 2
        tag = cat.name.strip("/").replace("/", "_")
        graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(weight[:, :c_g]), f"{tag}_Wg"),
                                  numpy_helper.from_array(np.ascontiguousarray(weight[:, c_g:]), f"{tag}_Wx")])
        local = helper.make_node("Conv", [cat.input[1], f"{tag}_Wx", *conv.input[2:]], [f"{tag}_local"],
                                 name=f"{tag}_conv_local")
        glob = helper.make_node("Conv", [expand.input[0], f"{tag}_Wg"], [f"{tag}_global"], name=f"{tag}_conv_global")
        for node in (local, glob):
            node.attribute.extend(conv.attribute)
        add = helper.make_node("Add", [f"{tag}_local", f"{tag}_global"], [conv.output[0]], name=f"{tag}_add")
        graph.node.remove(conv)
        graph.node.remove(cat)
        if len(consumers.get(expand.output[0], [])) == 1:
            graph.node.remove(expand)
        graph.node.extend([local, glob, add])
        rewritten += 1
    available = {i.name for i in graph.input} | set(inits) | {i.name for i in graph.initializer}
    pending, ordered = list(graph.node), []
    while pending:  # topological order again
        ready = [n for n in pending if all(not i or i in available for i in n.input)]
        if not ready:
            raise RuntimeError(f"{src}: graph rewrite left a cycle or a dangling input")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
            pending.remove(node)
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return rewritten


def _max_output_diff(model_a, model_b, scans) -> dict[str, float]:
    """max abs diff per output of two ONNX models on the runtime's preprocessing of ``scans``."""
    import onnxruntime as ort

    from btp.runtime import Pipeline

    pipe = Pipeline(model_a)
    a = ort.InferenceSession(str(model_a), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(model_b), providers=["CPUExecutionProvider"])
    names = [o.name for o in a.get_outputs()]
    worst = dict.fromkeys(names, 0.0)
    for scan in scans:
        prep = pipe.prepare(scan).prep
        feeds = {"neighborhood": prep.neighborhood[None], "center": prep.center[None]}
        for name, x, y in zip(names, a.run(names, feeds), b.run(names, feeds)):
            worst[name] = max(worst[name], float(np.max(np.abs(x - y))))
    return worst


def _apply(variant: dict) -> None:
    """Patch the runtime in this (child) process as the variant says."""
    if variant["spin"] is not None:
        from btp.runtime.backends import ort as ort_backend

        original = ort_backend.session_options

        def session_options(threads):
            opts = original(threads)
            opts.add_session_config_entry("session.intra_op.allow_spinning", variant["spin"])
            return opts

        ort_backend.session_options = session_options
    if variant["nearest1"]:
        import numpy as np
        from pykdtree.kdtree import KDTree

        from btp.runtime import stages

        exact = stages.interpolate

        def interpolate(sampled_scores, prep, cfg):
            if cfg.scoring.raw_interpolation != "nearest" or len(prep.sample_idx) == len(prep.raw_points):
                return exact(sampled_scores, prep, cfg)
            raw = prep.raw_points
            _, idx = KDTree(np.ascontiguousarray(raw[prep.sample_idx])).query(raw, k=1)
            return np.asarray(sampled_scores, dtype=np.float32)[idx.reshape(-1)]

        stages.interpolate = interpolate


def _thin_then_bucket(factor: int):
    """A downsample_points replacement: stride-thin scans above factor*N points, then bucket FPS."""
    import numpy as np

    from btp.geometry import downsample
    from btp.runtime import stages

    default = stages.downsample_points

    def downsample_points(raw, cfg, method="auto"):
        n = cfg.preprocess.num_points
        if raw.shape[0] <= factor * n:
            return default(raw, cfg, method)
        keep = np.arange(0, raw.shape[0], raw.shape[0] // (factor * n), dtype=np.int64)
        return keep[downsample(raw[keep], n, cfg.preprocess.fps_start, method="bucket")]

    return default, downsample_points


def _child(model: str, name: str, points: list[int], warmup: float, duration: float, threads: int | None) -> dict:
    variant = VARIANTS[name]
    _apply(variant)
    from btp.benchmarks.latency import bench_one, make_scans
    from btp.runtime import Pipeline

    extra = {}
    if variant.get("thin"):
        from btp.benchmarks.ops import covering_radius
        from btp.runtime import stages
        from btp.runtime.metadata import read_model_meta

        cfg = read_model_meta(model).config
        default, thinned = _thin_then_bucket(variant["thin"])
        stages.downsample_points = thinned
        extra["cover_vs_default"] = {}
        for n in (p for p in points if p > variant["thin"] * cfg.preprocess.num_points):
            raw = make_scans(n, 1)[0]
            extra["cover_vs_default"][str(n)] = (covering_radius(raw, raw[thinned(raw, cfg)])
                                                 / covering_radius(raw, raw[default(raw, cfg)]))
    if variant.get("graph") == "split":
        import tempfile

        rewritten = Path(tempfile.mkdtemp(prefix="btp-whatif-")) / "model-split.onnx"
        extra["rewritten_nodes"] = split_concat_conv(model, rewritten)
        extra["max_output_diff"] = _max_output_diff(model, rewritten, make_scans(2048, 3))
        model = str(rewritten)

    pipe = Pipeline(model, backend="ort-cpu", threads=variant["threads"] or threads)
    rows = []
    for n in points:
        stats, iters = bench_one(pipe, make_scans(n, 1), warmup_s=warmup, duration_s=duration)
        rows.append({"points": n, "iterations": iters, "stages": {k: v.to_dict() for k, v in stats.items()}})
    return {"variant": name, "rows": rows, **extra}


def run_whatif(model, *, variants=tuple(VARIANTS), points=(2048, 400000), warmup: float = 0.5,
               duration: float = 3.0, threads: int | None = None, progress=None) -> dict:
    from btp.benchmarks.machine import describe_machine

    out = {"machine": describe_machine(), "model": str(model), "points": list(points),
           "settings": {"warmup_s": warmup, "duration_s": duration, "threads": threads}, "variants": []}
    for name in variants:
        if progress:
            progress(f"variant {name}")
        env = dict(os.environ, **VARIANTS[name]["env"])
        args = [sys.executable, "-m", "btp.benchmarks.whatif", str(model), name, ",".join(map(str, points)),
                str(warmup), str(duration), str(threads or 0)]
        proc = subprocess.run(args, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            out["variants"].append({"variant": name, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        out["variants"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def whatif_markdown(data: dict) -> str:
    from btp.benchmarks.report import _header, _ordered_stages

    lines = _header("btp-bench whatif: measured prototypes of runtime changes (ORT CPU)", data["machine"])
    lines += [f"- Model: `{data['model']}`; settings {data['settings']}; one subprocess per variant.",
              "- Variants (see btp/benchmarks/whatif.py): " + "; ".join(VARIANTS), ""]
    for n in data["points"]:
        rows = [(v["variant"], next(r for r in v["rows"] if r["points"] == n)) for v in data["variants"] if "rows" in v]
        if not rows:
            continue
        stages = _ordered_stages({k for _, r in rows for k in r["stages"]})
        base = rows[0][1]["stages"]["end_to_end"]["p50"]
        lines += [f"## {n} points (p50 ms per stage)", "",
                  "| variant | e2e p50 | vs default | pre+post share | " + " | ".join(stages) + " |",
                  "|---|---|---|---|" + "---|" * len(stages)]
        for name, r in rows:
            e2e = r["stages"]["end_to_end"]["p50"]
            eng = r["stages"].get("engine", {}).get("p50", 0.0)
            cells = " | ".join(f"{r['stages'][s]['p50']:.2f}" if s in r["stages"] else "-" for s in stages)
            lines.append(f"| {name} | {e2e:.2f} | {e2e / base:.2f}x | {(e2e - eng) / e2e:.0%} | {cells} |")
        lines.append("")
    for v in data["variants"]:
        if "error" in v:
            lines.append(f"- {v['variant']}: failed: {v['error']}")
        if "cover_vs_default" in v:
            cover = ", ".join(f"{n} pts {r:.2f}x" for n, r in v["cover_vs_default"].items())
            lines.append(f"- {v['variant']}: covering radius of the sampled points vs the default path: {cover} "
                         "(1.00x = as well spread)")
        if "max_output_diff" in v:
            diffs = ", ".join(f"{k} {d:.1e}" for k, d in v["max_output_diff"].items())
            lines.append(f"- {v['variant']}: {v['rewritten_nodes']} Concat+Conv rewritten; max abs output diff vs "
                         f"the original model on 3 real scans: {diffs}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    model_arg, name_arg, points_arg, warm_arg, dur_arg, threads_arg = sys.argv[1:7]
    result = _child(model_arg, name_arg, [int(p) for p in points_arg.split(",")], float(warm_arg), float(dur_arg),
                    int(threads_arg) or None)
    print(json.dumps(result))
