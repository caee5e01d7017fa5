"""Draws docs/design.png: one scan's data flow through btp.runtime.Pipeline (CPU chain and device
chain) above the package's floors and their one-way imports. Run from the repository root:

    .venv/bin/python docs/design_figure.py

The floors are read from tests/test_layers.py (FLOORS), so the picture shows what the test enforces.
"""
from __future__ import annotations

import ast
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def floors() -> list[tuple[str, ...]]:
    tree = ast.parse((ROOT / "tests" / "test_layers.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "FLOORS":
            return [tuple(e.value for e in t.elts) for t in node.value.elts]
    raise SystemExit("tests/test_layers.py has no FLOORS")


def box(ax, x, y, w, h, text, color, size=8.5):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="#333",
                                lw=0.8))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, wrap=True)


def arrow(ax, x0, y0, x1, y1, color="#333", style="-|>"):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle=style, mutation_scale=10, color=color, lw=1.0))


def main() -> None:
    fig, ax = plt.subplots(figsize=(13, 8.2))
    ax.set_xlim(0, 13)
    ax.set_ylim(0, 8.2)
    ax.axis("off")
    ax.text(0.1, 7.95, "One scan through Pipeline (btp/runtime/pipeline.py)", fontsize=12, weight="bold")

    # the data flow, left to right
    cpu, dev, eng, io = "#dbe9f6", "#fde2c8", "#d9f0d3", "#eeeeee"
    stages = [("file\n.pcd .ply .npy ...", io, "btp.io\nread_point_cloud"),
              ("sanitize\ncheck_scan", cpu, ""), ("downsample\nM -> N", cpu, ""), ("normalize", cpu, ""),
              ("FPS\nG centers", cpu, ""), ("kNN group\n[G,K,C]", cpu, "")]
    x = 0.2
    xs = []
    for text, color, note in stages:
        box(ax, x, 6.3, 1.35, 0.85, text, color)
        if note:
            ax.text(x + 0.67, 7.3, note, ha="center", fontsize=7.5, color="#555")
        xs.append(x)
        x += 1.6
    ax.text(xs[1], 5.95, "btp.geometry.prepare.prepare(raw, cfg, method) -> Prepared", fontsize=8, color="#1f4e79")
    for a, b in zip(xs, xs[1:]):
        arrow(ax, a + 1.35, 6.72, b, 6.72)
    box(ax, 9.9, 6.3, 1.5, 0.85, "engine\nbackend.run", eng)
    ax.text(10.65, 7.3, "ORT CPU/CUDA, TensorRT,\nor any backend object", ha="center", fontsize=7.5, color="#555")
    arrow(ax, xs[-1] + 1.35, 6.72, 9.9, 6.72)
    box(ax, 11.6, 6.3, 1.3, 0.85, "patch_probs [G]\nobject_score", eng, 8)
    arrow(ax, 11.4, 6.72, 11.6, 6.72)
    # way back
    box(ax, 11.6, 4.9, 1.3, 0.85, "propagate\n[G] -> [N]", cpu)
    box(ax, 9.9, 4.9, 1.5, 0.85, "interpolate\n[N] -> raw [M]", cpu)
    box(ax, 8.0, 4.9, 1.6, 0.85, "Result\nper-row scores", io)
    box(ax, 5.95, 4.9, 1.75, 0.85, "btp-run outputs\n.npy .ply .png .json", io)
    arrow(ax, 12.25, 6.3, 12.25, 5.75)
    arrow(ax, 11.6, 5.32, 11.4, 5.32)
    arrow(ax, 9.9, 5.32, 9.6, 5.32)
    arrow(ax, 8.0, 5.32, 7.7, 5.32)
    ax.text(9.9, 4.6, "scores_to_raw(patch_probs, prepared, cfg)", fontsize=8, color="#1f4e79")
    # device chain
    box(ax, 1.8, 4.8, 3.8, 1.0, "DeviceChain (preprocess = cuda | cuda-emu):\nour kernels: downsample ... kNN group\n"
        "into the engine's input buffers,\nthen propagate + interpolate", dev, 8)
    arrow(ax, 2.45, 6.3, 2.45, 5.8, color="#c55a11")
    arrow(ax, 5.6, 5.6, 9.9, 6.35, color="#c55a11")
    ax.text(0.2, 4.45, "cuda: pycuda or cuda-python (btp.kernels.devices), TensorRT / ORT CUDA on device buffers; "
            "cuda-emu: the same .cu source on the CPU (btp.kernels.emu)", fontsize=7.5, color="#c55a11")

    # the floors
    ax.text(0.1, 3.85, "Floors: imports run downward, never in a circle (tests/test_layers.py walks every import, "
            "function-level ones included)", fontsize=11, weight="bold")
    rows = floors()
    h = 3.3 / len(rows)
    for i, rooms in enumerate(reversed(rows)):
        level = len(rows) - 1 - i
        y = 3.55 - (i + 1) * h
        box(ax, 0.6, y + 0.04, 11.8, h - 0.1, "   ".join(rooms), "#f4f4f4" if level % 2 else "#e8e8e8", 9)
        ax.text(0.25, y + h / 2, str(level), fontsize=9, va="center")
    arrow(ax, 12.7, 3.4, 12.7, 0.35, style="-|>")
    ax.text(12.55, 1.9, "imports", rotation=90, fontsize=8, va="center")
    out = ROOT / "docs" / "design.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main()
