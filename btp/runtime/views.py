"""How a scan is looked at: the three views from its principal axes and the colour scales of its
maps. The PNG of ``btp.runtime.outputs.render_views`` and the report page's 3D view start from
the same frame and colour the same way. numpy (and matplotlib's colour maps) only."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def principal_axes(points: np.ndarray) -> np.ndarray:
    """[3, 3] rows e1, e2, e3: the part's principal axes, longest extent first, each signed so that
    its largest component is positive (deterministic), e3 = e1 x e2 (a right-handed frame)."""
    pts = np.asarray(points, dtype=np.float64)
    centered = pts - pts.mean(axis=0)
    _, vecs = np.linalg.eigh(centered.T @ centered)
    axes = vecs[:, ::-1].T.copy()
    for a in axes[:2]:
        if a[np.argmax(np.abs(a))] < 0:
            a *= -1
    axes[2] = np.cross(axes[0], axes[1])
    return axes


def view_axes(points: np.ndarray, scores: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Three views from the part's principal axes (``principal_axes``), none of them edge-on:

    front          along the thinnest axis e3, from the side of the highest-scoring region
    three-quarter  along e1 + e2 + e3 (each signed towards that region): a corner view that sees
                   the front and two sides at once, foreshortened but never edge-on
    back           the opposite of front

    The highest-scoring region: the top 1 % of points, weighted by how far their scores stand
    above the median (none for a flat map: then the axes keep their own signs). The longest axis
    runs across each view. -> [(name, view direction d, right u, up v)]: a point p is drawn at
    (p.u, p.v), depth p.d (the camera on d's side looking back at the part: depth grows towards it)."""
    pts = np.asarray(points, dtype=np.float64)
    sc = np.asarray(scores, dtype=np.float64)
    center = pts.mean(axis=0)
    axes = principal_axes(pts)
    w = np.clip(sc - np.median(sc), 0, None) if len(sc) else np.zeros(0)
    cut = np.quantile(w, 0.99) if w.any() else 0.0
    if cut > 0:  # more than 1 % above the median: keep the top 1 %
        w = np.where(w >= cut, w, 0.0)
    hot = (w[:, None] * (pts - center)).sum(axis=0) / w.sum() if w.any() else np.zeros(3)
    signs = np.where(axes @ hot < 0, -1.0, 1.0)
    e1, e2, e3 = axes * signs[:, None]

    def frame(d: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = d / np.linalg.norm(d)
        u = right - (right @ d) * d
        u /= np.linalg.norm(u)
        return d, u, np.cross(d, u)  # right-handed: u x v = d

    return [("front", *frame(e3, e1)), ("three-quarter", *frame(e1 + e2 + e3, e1)), ("back", *frame(-e3, -e1))]


@dataclass(frozen=True, kw_only=True)
class MapScale:
    """How ``render_views`` colours a map: its colour-bar ``label``, range ``vmin``..``vmax``
    (values beyond it take the end colours), matplotlib ``cmap``, and ``mark``: a level drawn as a
    labelled tick and line on the bar (``mark_label``) whose points get a black rim (None: none)."""

    label: str = "anomaly score"
    vmin: float = 0.0
    vmax: float = 1.0
    cmap: str = "turbo"
    mark: float | None = None
    mark_label: str = "point threshold"


def fused_scale(threshold: float) -> MapScale:
    """The fused map of a scan checked against its part's reference: 0 (a typical good point) to
    twice the part's threshold, the threshold mid-scale and marked (as ``<stem>.fused.ply``)."""
    top = 2.0 * max(float(threshold), 1e-6)
    return MapScale(label="fused score (0 = typical good point)", vmax=top, mark=float(threshold),
                    mark_label="part threshold")


def deviation_scale(deviation: np.ndarray) -> MapScale:
    """The signed deviation from the part's template in scan units (+ outside the template's
    surface, - inside): blue - white - red, symmetric about 0 up to the 99.9th percentile of |deviation|."""
    dev = np.abs(np.asarray(deviation, dtype=np.float64))
    top = float(np.quantile(dev, 0.999)) if len(dev) else 0.0
    top = top if top > 0 else 1e-6
    return MapScale(label="deviation from the template (scan units; + outside)", vmin=-top, vmax=top,
                    cmap="coolwarm")


def map_colors(values: np.ndarray, scale: MapScale) -> np.ndarray:
    """uint8 RGB [M, 3] of ``values`` [M] on ``scale`` (as ``render_views`` draws them; NaN as the low end)."""
    from matplotlib import colormaps

    span = max(scale.vmax - scale.vmin, 1e-12)
    t = np.clip((np.nan_to_num(np.asarray(values, dtype=np.float64), nan=scale.vmin) - scale.vmin) / span, 0.0, 1.0)
    return (colormaps[scale.cmap](t)[:, :3] * 255.0 + 0.5).astype(np.uint8)
