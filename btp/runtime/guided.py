"""Reference-guided scoring: a few good scans of a part make the decision trustworthy. Torch-free.

Explicit inputs and outputs, no pipeline state: ``build_reference`` turns good scans (and their
zero-shot point scores) into a ``Reference``; ``ReferenceScorer`` scores one scan (and its
zero-shot point scores) against it and returns ``GuidedScores``.

Scoring one scan [M,3], in the scan's units:

    map cells [c,3] (cell_of [M]): the points up to MAP_POINTS, else voxel cells of size / MAP_CELLS;
    registration and maps run on them
    register the cells to the template in any orientation (btp.geometry.registration: centroid
    ICP, else FPFH + RANSAC, then coarse-to-fine ICP; fitness scan -> template only)
                                                              -> pose, fitness
    fitness < min_fitness (statistics)                       -> registered = False, no scores
    residual   [M]  mean distance of the point's cell to the RESIDUAL_K nearest template points
    deviation  [M]  signed distance of the point's cell to the nearest template point's tangent
                    plane (+ = outside)
    feature    [M]  distance of the multi-scale FPFH of the point's feature cell to the nearest of
                    the bank
    embedding  [M]  (a reference with the model's patch embeddings) the scan turned into the
                    template's frame, run through the model again (``embed``): each patch's embedding's
                    distance to the nearest of the good scans' (in the same frame), spread to the
                    points as the patch scores are
    zero_shot  [M]  the model's point scores (given)
    each map -> (s - median_good) / (q99_good - median_good)   (the good scans' leave-one-out maps:
                 0 = a typical good point, 1 = the 99th percentile of good points)
    reference map = the maximum of the reference's normalised maps (residual, feature[, embedding]);
    fused map = FUSION (see FUSIONS)
    object score = mean of the top OBJECT_TOP_RATIO of the fused map; decision: > threshold

The threshold is the good scans' own: each good scan is scored leave-one-out (template and bank
from the others), and threshold = max + (max - median) of their fused object scores: with K good
scans, a new good scan exceeds the largest of K with chance 1/(K+1) (20 % at K = 4); the margin
of one more spread above it is what keeps good parts from being flagged, at the cost of the
weakest defects (the report lists the leave-one-out scores, so the margin can be judged).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from btp.geometry import registration as reg
from btp.geometry.scores import top_mean
from btp.runtime.reference import Reference, ReferenceError

RESIDUAL_K = 16
# a scan of up to MAP_POINTS points is registered and mapped point by point; a denser one on its
# voxel cells of size / MAP_CELLS, the maps gathered back to every point of the cell (coarser
# cells smooth a small defect's peak, which the top-1 % object score needs)
MAP_POINTS = 50_000
MAP_CELLS = 150.0
BUILD_MIN_FITNESS = 0.3  # a good scan that fits the others' union worse is refused (another part?)
OBJECT_TOP_RATIO = 0.01
MAPS = ("residual", "feature", "zero_shot")
EMBEDDING = "embedding"  # the map of the model's patch embeddings, in references that hold them
# fused map from the normalised maps; the rule in use is Settings.fusion (chosen on validation sets)
FUSIONS = {
    "max": lambda z: np.maximum.reduce([z["residual"], z["feature"], z["zero_shot"]]),
    "mean": lambda z: (z["residual"] + z["feature"] + z["zero_shot"]) / 3.0,
    "ref-max+zs": lambda z: np.maximum(z["residual"], z["feature"]) + 0.5 * z["zero_shot"],
    # with the embedding map: one more reference map in the maximum, or beside the zero-shot map
    "ref3-max+zs": lambda z: np.maximum.reduce([z["residual"], z["feature"], z[EMBEDDING]]) + 0.5 * z["zero_shot"],
    "ref-max+emb+zs": lambda z: np.maximum(z["residual"], z["feature"]) + 0.5 * (z[EMBEDDING] + z["zero_shot"]),
    "ref-max+emb": lambda z: np.maximum(z["residual"], z["feature"]) + 0.5 * z[EMBEDDING],
}
EMBEDDING_FUSIONS = ("ref3-max+zs", "ref-max+emb+zs", "ref-max+emb")  # need the embedding map


@dataclass(frozen=True)
class Embedded:
    """The model run on a scan [M,3]: its patch embeddings float32 [G,D] and ``spread``: per-patch
    values [G] -> the scan's points [M], as the patch scores are spread."""

    embeddings: np.ndarray
    spread: Callable[[np.ndarray], np.ndarray]


Embedder = Callable[[np.ndarray], Embedded]  # btp.runtime.Pipeline.embed


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How a reference is built and used; every length is a fraction of the part's size (the
    template's bounding-box diagonal) and stored in scan units in the file."""

    register_cells: float = 40.0  # registration voxel = size / register_cells
    template_cells: float = 100.0  # template voxel = size / template_cells
    feature_cells: float = 64.0  # feature voxel = size / feature_cells
    feature_radii: tuple[float, ...] = (3.0, 5.0, 8.0)  # multi-scale FPFH radii, in feature voxels
    bank_size: int = 4096  # coreset size of the whole bank (split evenly over the good scans)
    fusion: str = "ref-max+zs"
    embedding: bool = False  # a bank of the model's patch embeddings beside the descriptors'
    fitness_cells: float = 50.0  # a scan point fits when a template point lies within size / fitness_cells
    min_fitness: float = 0.6  # a scan whose fitness is lower is reported as not registered
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["feature_radii"] = list(self.feature_radii)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Settings":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "feature_radii" in known:
            known["feature_radii"] = tuple(float(r) for r in known["feature_radii"])
        return cls(**known)


# `btp reference build --embeddings`: the model's patch embeddings banked beside the descriptors, in
# the rule that fused them best on the validation sets (models/reference-guided.md)
EMBEDDING_SETTINGS = Settings(embedding=True, fusion="ref-max+emb+zs")


@dataclass(frozen=True, kw_only=True)
class GuidedScores:
    """One scan scored with a reference. Maps are float32 [M] in the scan's row order; None when the
    scan did not register (then only ``registered``, ``fitness``, ``rmse`` and ``transform`` mean anything).

    registered       fitness >= the reference's min_fitness
    fitness, rmse    of the scan -> template registration (share of points; scan units)
    transform        float64 [4,4] scan -> template
    residual         mean distance to the 16 nearest template points (scan units)
    deviation        signed distance to the nearest template point's tangent plane (scan units)
    feature          distance of the point's cell's descriptor to the nearest bank descriptor
    embedding        distance of the model's embedding of the point's patches (scan in the template's
                     frame) to the nearest good one; None for a reference without embeddings
    reference_map    max of the reference's normalised maps (residual, feature[, embedding])
    fused            the fused map (Settings.fusion) the decision is made on
    object_score     top-1 % mean of ``fused``; reference_score: the same of ``reference_map``
    """

    registered: bool
    fitness: float
    rmse: float
    transform: np.ndarray = field(repr=False)
    residual: np.ndarray | None = field(default=None, repr=False)
    deviation: np.ndarray | None = field(default=None, repr=False)
    feature: np.ndarray | None = field(default=None, repr=False)
    embedding: np.ndarray | None = field(default=None, repr=False)
    reference_map: np.ndarray | None = field(default=None, repr=False)
    fused: np.ndarray | None = field(default=None, repr=False)
    object_score: float = float("nan")
    reference_score: float = float("nan")
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self, threshold: float) -> dict[str, Any]:
        """The per-scan JSON's ``reference`` block (numbers in scan units where they have units)."""
        doc: dict[str, Any] = {"registered": self.registered, "fitness": round(self.fitness, 4),
                               "rmse": self.rmse, "threshold": threshold}
        if self.registered:
            dev = np.abs(self.deviation)
            doc.update(object_score=self.object_score, reference_score=self.reference_score,
                       decision="anomalous" if self.object_score > threshold else "normal",
                       deviation={"max_abs": float(dev.max()), "p99_abs": float(np.quantile(dev, 0.99)),
                                  "mean_abs": float(dev.mean()), "residual_max": float(self.residual.max())})
        else:
            doc["decision"] = "not registered"
        return doc


# ---- the geometry shared by building and scoring ------------------------------------------------

def _scales(size: float, s: Settings) -> dict[str, float]:
    return {"size": size, "register_voxel": size / s.register_cells, "template_voxel": size / s.template_cells,
            "feature_voxel": size / s.feature_cells, "fitness_radius": size / s.fitness_cells}


def _features(aligned: np.ndarray, center: np.ndarray, units: dict, s: Settings) -> tuple[np.ndarray, np.ndarray]:
    """(cells [c,3], multi-scale FPFH [c,F]) of an aligned scan, normals oriented from the template's center."""
    v = units["feature_voxel"]
    cells = reg.voxel_down(aligned, v)
    nrm = reg.normals(cells, reg.NORMAL_RADIUS * v, center=center)
    return cells, reg.multiscale_fpfh(cells, nrm, [r * v for r in s.feature_radii])


def _min_sq_dist(bank: np.ndarray, queries: np.ndarray, block: int) -> np.ndarray:
    """float32 [q]: squared Euclidean distance of each query row to its nearest bank row; per
    block one matrix product against -2 x bank, |b|^2 added in place, the row minimum, then |q|^2
    (the product is the whole cost)."""
    out = np.full(len(queries), np.inf, dtype=np.float32)
    if len(bank) == 0:
        return out
    minus_2bt = np.ascontiguousarray(-2.0 * bank.T)
    b2 = np.einsum("ij,ij->i", bank, bank)
    for i in range(0, len(queries), block):
        q = queries[i:i + block]
        d2 = q @ minus_2bt
        d2 += b2
        out[i:i + block] = d2.min(axis=1) + np.einsum("ij,ij->i", q, q)
    return out


def _fold(rows: np.ndarray) -> np.ndarray:
    """Rows whose last FPFH block repeats the one before, that block dropped and the one before
    weighted by sqrt(2): the same distances between two such rows, on a third fewer columns."""
    w = reg.FPFH_BINS
    return np.concatenate([rows[:, :-2 * w], np.float32(np.sqrt(2.0)) * rows[:, -2 * w:-w]], axis=1)


def _nearest_dist(bank: np.ndarray, queries: np.ndarray, block: int = 1024) -> np.ndarray:
    """float32 [q]: Euclidean distance of each query row to its nearest bank row (brute force in
    float32 blocks: at F ~ 100 dims a k-d tree prunes little; see benchmarks for the measurement).

    Where a descriptor's largest radius reaches no farther than the one before it (its max_nn
    nearest neighbours all nearer than both), the two FPFH blocks are equal; between two such rows
    the product runs folded (``_fold``)."""
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    w = reg.FPFH_BINS
    if bank.shape[1] < 2 * w:
        return np.sqrt(np.maximum(_min_sq_dist(bank, queries, block), 0.0))
    q_rep = np.all(queries[:, -w:] == queries[:, -2 * w:-w], axis=1)
    b_rep = np.all(bank[:, -w:] == bank[:, -2 * w:-w], axis=1)
    out = np.empty(len(queries), dtype=np.float32)
    out[q_rep] = np.minimum(_min_sq_dist(_fold(bank[b_rep]), _fold(queries[q_rep]), block),
                            _min_sq_dist(bank[~b_rep], queries[q_rep], block))
    out[~q_rep] = _min_sq_dist(bank, queries[~q_rep], block)
    return np.sqrt(np.maximum(out, 0.0))


def _to_points(cells: np.ndarray, values: np.ndarray, points: np.ndarray) -> np.ndarray:
    """float32 [M]: each point takes the value of its nearest cell."""
    from btp.geometry import knn

    idx, _ = knn(np.ascontiguousarray(cells, dtype=np.float32), np.ascontiguousarray(points, dtype=np.float32), 1)
    return values[idx[:, 0]].astype(np.float32)


def map_cells(points: np.ndarray, size: float) -> tuple[np.ndarray, np.ndarray]:
    """(cells [c,3], cell_of [M]) the maps of a scan [M,3] are computed on: the points themselves
    up to MAP_POINTS, else their voxel cells of size / MAP_CELLS."""
    if len(points) <= MAP_POINTS:
        return np.asarray(points, dtype=np.float32), np.arange(len(points), dtype=np.int64)
    return reg.voxel_cells(points, size / MAP_CELLS)


def _tree(points: np.ndarray):
    from pykdtree.kdtree import KDTree

    return KDTree(np.ascontiguousarray(points, dtype=np.float32))


def _feature_map(aligned: np.ndarray, bank: np.ndarray, center: np.ndarray, units: dict, s: Settings) -> np.ndarray:
    """float32 [m]: distance to the bank of the descriptor of the feature cell nearest each aligned
    point [m,3] (descriptors as the bank's: multi-scale FPFH of the feature cells)."""
    cells, feats = _features(aligned, center, units, s)
    _, owner = _tree(cells).query(np.ascontiguousarray(aligned, dtype=np.float32), k=1)
    return _nearest_dist(bank, feats)[owner.astype(np.int64)]


def normalise(value: np.ndarray, stats: dict[str, float]) -> np.ndarray:
    """(s - median) / (q99 - median) of the good scans' map: 0 typical good, 1 its 99th percentile."""
    spread = max(float(stats["q99"]) - float(stats["median"]), 1e-12)
    return ((np.asarray(value, dtype=np.float64) - float(stats["median"])) / spread).astype(np.float32)


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"median": float(np.median(values)), "q99": float(np.quantile(values, 0.99))}


def map_names(s: Settings) -> tuple[str, ...]:
    """The raw maps a reference of these settings normalises and fuses."""
    return MAPS + ((EMBEDDING,) if s.embedding else ())


def check_settings(s: Settings) -> None:
    """ValueError for a fusion rule these settings cannot run."""
    if s.fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {s.fusion!r}; choose one of {', '.join(FUSIONS)}")
    if s.fusion in EMBEDDING_FUSIONS and not s.embedding:
        raise ValueError(f"fusion {s.fusion!r} needs the model's patch embeddings (Settings.embedding)")


def _unit_rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), np.float32(1e-12))


def _embed(points: np.ndarray, embed: Embedder) -> Embedded:
    """The model's view of an aligned scan, embeddings unit length."""
    got = embed(np.ascontiguousarray(points, dtype=np.float32))
    return Embedded(_unit_rows(got.embeddings), got.spread)


def _embedding_map(got: Embedded, bank: np.ndarray) -> np.ndarray:
    """float32 [M]: each patch embedding's distance to the nearest bank row, spread to the points."""
    dist = np.sqrt(np.maximum(_min_sq_dist(np.ascontiguousarray(bank, dtype=np.float32), got.embeddings, 1024), 0.0))
    return np.asarray(got.spread(dist.astype(np.float32)), dtype=np.float32)


@dataclass(frozen=True)
class _Maps:
    residual: np.ndarray
    deviation: np.ndarray
    feature: np.ndarray


def _raw_maps(points: np.ndarray, pose: np.ndarray, template: np.ndarray, template_normals: np.ndarray,
              bank: np.ndarray, center: np.ndarray, units: dict, s: Settings, *, tree=None,
              cells: tuple[np.ndarray, np.ndarray] | None = None) -> _Maps:
    """The raw maps [M] of a scan [M,3] under ``pose``; ``center``: the whole template's centroid
    (descriptor normals); ``tree``: a pykdtree of ``template``; ``cells``: the scan's
    ``map_cells`` when the caller has them. Residual and descriptor distance
    and the signed deviation (to the tangent plane of the nearest template point) are computed per
    cell and gathered to its points."""
    cell_pts, cell_of = cells if cells is not None else map_cells(points, units["size"])
    aligned_cells = reg.transform(cell_pts, pose)
    tree = tree if tree is not None else _tree(template)
    k = min(RESIDUAL_K, len(template))
    dist, idx = tree.query(aligned_cells, k=k)
    dist, idx = dist.reshape(len(aligned_cells), k), idx.reshape(len(aligned_cells), k)
    residual = dist.mean(axis=1).astype(np.float32)[cell_of]
    nearest = idx[:, 0].astype(np.int64)
    deviation = np.einsum("ij,ij->i", aligned_cells - template[nearest], template_normals[nearest])
    deviation = deviation.astype(np.float32)[cell_of]
    feature = _feature_map(aligned_cells, bank, center, units, s)[cell_of]
    return _Maps(residual, deviation, feature)


def fuse(maps: dict[str, np.ndarray], statistics: dict[str, Any], fusion: str) -> tuple[np.ndarray, np.ndarray]:
    """(reference map [M], fused map [M]) from raw maps {residual, feature, zero_shot[, embedding]} [M]."""
    z = normalised(maps, statistics)
    return reference_map(z), FUSIONS[fusion](z).astype(np.float32)


def normalised(maps: dict[str, np.ndarray], statistics: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each raw map normalised by the good scans' statistics of it."""
    return {name: normalise(value, statistics[name]) for name, value in maps.items()}


def reference_map(z: dict[str, np.ndarray]) -> np.ndarray:
    """The maximum of the reference's own normalised maps (all but the zero-shot one)."""
    return np.maximum.reduce([z[name] for name in ("residual", "feature", EMBEDDING) if name in z])


# ---- building --------------------------------------------------------------------------------

def build_reference(scans: Sequence[np.ndarray], zero_shot: Sequence[np.ndarray], *, name: str,
                    model: dict[str, Any], sources: list[dict[str, Any]], settings: Settings = Settings(),
                    cad: np.ndarray | None = None, embed: Embedder | None = None, leave_out_misfits: bool = False,
                    log=lambda msg: None) -> Reference:
    """A part's reference from ``scans`` (float32 [M_i,3], any poses) and the model's point scores
    of each (float32 [M_i]); ``cad``: points sampled from the part's CAD model (then the template);
    ``embed``: the model's patch embeddings (``settings.embedding``), run on each good scan turned
    into the template's frame. A good scan that fits the others under BUILD_MIN_FITNESS is refused
    (ValueError), or with ``leave_out_misfits`` left out (named in the header's ``left_out``) while
    2 or more remain.

    model: {"sha256", "name", "weights_sha256"} of the model.onnx; sources: one entry per input file.
    """
    if len(scans) < 2:
        raise ValueError(f"{len(scans)} good scan(s): a reference needs at least 2 (each one's "
                         "statistics come from a template and bank of the others)")
    if len(zero_shot) != len(scans):
        raise ValueError("one zero-shot map per good scan")
    s = settings
    check_settings(s)
    if s.embedding and embed is None:
        raise ValueError("Settings.embedding: the model's patch embeddings are needed (embed)")
    t0 = time.perf_counter()
    # the widest scan anchors the template (a whole part before a single view); each next scan, widest
    # first, registers to the union of those before it, so partial views that overlap little with the
    # anchor still find their place
    order = sorted(range(len(scans)), key=lambda i: -reg.part_size(scans[i]))
    anchor = np.asarray(cad if cad is not None else scans[order[0]], dtype=np.float32)
    units = _scales(reg.part_size(anchor), s)
    poses: list = [None] * len(scans)
    fits = [1.0] * len(scans)
    merged = [anchor]
    left_out: list[dict] = []
    for i in order:
        if cad is None and i == order[0]:
            poses[i] = np.eye(4)
            continue
        target = reg.make_target(np.concatenate(merged), units["register_voxel"])
        got = reg.register(scans[i], target, seed=s.seed)
        poses[i] = got.transform
        fits[i] = reg.evaluate(scans[i], target, got.transform, units["fitness_radius"]).fitness
        if fits[i] < BUILD_MIN_FITNESS:
            why = (f"good scan {sources[i]['file']} registers to the others with fitness {fits[i]:.2f} "
                   f"(< {BUILD_MIN_FITNESS})")
            if not leave_out_misfits:
                raise ValueError(f"{why}: is it the same part? Leave it out, or pass --cad")
            left_out.append({"file": sources[i]["file"], "fitness": fits[i]})
            log(f"{why}: left out")
            continue
        if cad is None:
            merged.append(reg.transform(scans[i], got.transform))
    if left_out:
        n = len(scans)
        keep = [i for i in range(n) if fits[i] >= BUILD_MIN_FITNESS]
        if len(keep) < 2:
            raise ValueError(f"only {len(keep)} of {n} good scans register to each other: is it one part? "
                             "Pass --cad, or more good scans")
        scans, zero_shot, poses, fits = ([seq[i] for i in keep] for seq in (scans, zero_shot, poses, fits))
        sources = [sources[i] for i in keep] + list(sources[n:])  # a CAD model's entry stays last
    aligned = [reg.transform(scan, pose) for scan, pose in zip(scans, poses)]
    log(f"registered {len(scans)} good scans (fitness {', '.join(f'{f:.2f}' for f in fits)})")
    tv = units["template_voxel"]

    def template_of(clouds: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        pts = reg.voxel_down(np.concatenate(clouds), tv)
        return pts, reg.normals(pts, reg.NORMAL_RADIUS * tv)

    per_scan = max(s.bank_size // len(scans), 1)
    template, template_n = template_of([anchor] if cad is not None else aligned)
    center = template.mean(axis=0)
    banks, embedded, embedding_banks = [], [], []
    for i, a in enumerate(aligned):
        _, feats = _features(a, center, units, s)
        banks.append(feats[reg.greedy_coreset(feats, per_scan, seed=s.seed + i)])
        if s.embedding:
            got = _embed(a, embed)
            keep = reg.greedy_coreset(got.embeddings, per_scan, seed=s.seed + i)
            embedded.append(got)
            embedding_banks.append(got.embeddings[keep])
    names = map_names(s)
    # leave-one-out maps of every good scan: what an unseen good scan of this part looks like
    loo: dict[str, list[np.ndarray]] = {m: [] for m in names}
    loo_fitness = []
    for i in range(len(scans)):
        others = [a for j, a in enumerate(aligned) if j != i]
        tmpl, tmpl_n = template_of([anchor] if cad is not None else others)
        bank = np.concatenate([b for j, b in enumerate(banks) if j != i])
        loo_target = reg.make_target(tmpl, units["register_voxel"])
        loo_fitness.append(reg.evaluate(aligned[i], loo_target, np.eye(4), units["fitness_radius"]).fitness)
        maps = _raw_maps(aligned[i], np.eye(4), tmpl, tmpl_n, bank, center, units, s)
        loo["residual"].append(maps.residual)
        loo["feature"].append(maps.feature)
        loo["zero_shot"].append(np.asarray(zero_shot[i], dtype=np.float32))
        if s.embedding:
            other_embeddings = np.concatenate([b for j, b in enumerate(embedding_banks) if j != i])
            loo[EMBEDDING].append(_embedding_map(embedded[i], other_embeddings))
    statistics = {m: _stats(np.concatenate(loo[m])) for m in names}
    loo_scores = []
    for i in range(len(scans)):
        _, fused = fuse({m: loo[m][i] for m in names}, statistics, s.fusion)
        loo_scores.append(top_mean(fused, OBJECT_TOP_RATIO))
    top, mid = max(loo_scores), float(np.median(loo_scores))
    threshold = {"value": top + (top - mid), "rule": "max + (max - median) of the good scans' leave-one-out "
                                                      "fused object scores",
                 "leave_one_out_scores": loo_scores}
    statistics["leave_one_out_fitness"] = loo_fitness
    # a good single view may overlap the others' union little: the bar for "registered" is lowered to
    # 0.8 x the worst leave-one-out fitness of the good scans themselves, never raised
    statistics["min_fitness"] = min(s.min_fitness, 0.8 * min(loo_fitness))
    header = {"model": model, "sources": sources, "settings": {**s.to_dict(), **units},
              "statistics": statistics, "threshold": threshold,
              "template_from": "cad" if cad is not None else "good scans", "left_out": left_out,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "build_seconds": round(time.perf_counter() - t0, 3)}
    arrays = {"template": template.astype(np.float32), "template_normals": template_n.astype(np.float32),
              "bank": np.concatenate(banks).astype(np.float32),
              "poses": np.stack(poses).astype(np.float64)}
    if s.embedding:
        arrays["embedding_bank"] = np.concatenate(embedding_banks).astype(np.float32)
    log(f"template {len(template)} points, bank {len(arrays['bank'])} x {arrays['bank'].shape[1]}, "
        f"threshold {threshold['value']:.3f} (leave-one-out {', '.join(f'{x:.3f}' for x in loo_scores)})")
    return Reference(name=name, header=header, arrays=arrays)


# ---- scoring -----------------------------------------------------------------------------------

class ReferenceScorer:
    """Scores scans against one reference: ``scorer(points [M,3], zero_shot [M]) -> GuidedScores``."""

    def __init__(self, ref: Reference):
        self.ref = ref
        self.settings = Settings.from_dict(ref.settings)
        try:
            check_settings(self.settings)
            if self.settings.embedding and "embedding_bank" not in ref.arrays:
                raise ValueError("its settings name the model's embeddings, its payload holds none")
        except ValueError as exc:
            raise ReferenceError(ref.path or Path("<reference>"), f"{exc}: rebuild it with this btp-edge") from None
        self.units = {k: float(ref.settings[k]) for k in ("size", "register_voxel", "template_voxel",
                                                          "feature_voxel", "fitness_radius")}
        self.template = ref.arrays["template"]
        self.template_normals = ref.arrays["template_normals"]
        self.bank = ref.arrays["bank"]
        self.target = reg.make_target(self.template, self.units["register_voxel"])
        self.tree = _tree(self.template)
        self.center = self.template.mean(axis=0)
        self.min_fitness = float(ref.statistics.get("min_fitness", self.settings.min_fitness))

    @property
    def threshold(self) -> float:
        return self.ref.threshold

    @property
    def needs_embed(self) -> bool:
        """Whether scoring runs the model again (the reference holds the model's patch embeddings)."""
        return self.settings.embedding

    def __call__(self, points: np.ndarray, zero_shot: np.ndarray, embed: Embedder | None = None) -> GuidedScores:
        """``embed``: the model (``btp.runtime.Pipeline.embed``), for a reference with embeddings."""
        if self.needs_embed and embed is None:
            raise ReferenceError(self.ref.path or Path("<reference>"),
                                 "this reference holds the model's patch embeddings: score with a model to run "
                                 "(btp-run / Pipeline(..., reference=...))")
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        points = np.asarray(points, dtype=np.float32)
        # registered and mapped on its map cells (finer than the registration voxel)
        cells = map_cells(points, self.units["size"])
        got = reg.register(cells[0], self.target, seed=self.settings.seed)
        fit = reg.evaluate(cells[0], self.target, got.transform, self.units["fitness_radius"])
        t["register"] = (time.perf_counter() - t0) * 1e3
        if fit.fitness < self.min_fitness:
            return GuidedScores(registered=False, fitness=fit.fitness, rmse=fit.rmse, transform=got.transform,
                                timings=t)
        t0 = time.perf_counter()
        maps = _raw_maps(points, got.transform, self.template, self.template_normals, self.bank, self.center,
                         self.units, self.settings, tree=self.tree, cells=cells)
        raw = {"residual": maps.residual, "feature": maps.feature, "zero_shot": np.asarray(zero_shot, dtype=np.float32)}
        t["reference_maps"] = (time.perf_counter() - t0) * 1e3
        if self.needs_embed:
            t0 = time.perf_counter()
            raw[EMBEDDING] = _embedding_map(_embed(reg.transform(points, got.transform), embed),
                                            self.ref.arrays["embedding_bank"])
            t["embedding"] = (time.perf_counter() - t0) * 1e3
        ref_map, fused = fuse(raw, self.ref.statistics, self.settings.fusion)
        return GuidedScores(registered=True, fitness=fit.fitness, rmse=fit.rmse, transform=got.transform,
                            residual=maps.residual, deviation=maps.deviation, feature=maps.feature,
                            embedding=raw.get(EMBEDDING), reference_map=ref_map, fused=fused,
                            object_score=top_mean(fused, OBJECT_TOP_RATIO),
                            reference_score=top_mean(ref_map, OBJECT_TOP_RATIO), timings=t)


@dataclass(frozen=True, kw_only=True)
class GuidedResult:
    """A scan's reference outcome: the part it was routed to (None: no part matched), the rule
    that routed it, its scores (None when no part matched) and that part's threshold."""

    part: str | None
    route: str
    scores: GuidedScores | None = None
    threshold: float | None = None
    reference_file: str | None = None
    min_fitness: float = Settings.min_fitness

    @property
    def decision(self) -> str:
        if self.part is None:
            return "no reference"
        if not self.scores.registered:
            return "not registered"
        return "anomalous" if self.scores.object_score > self.threshold else "normal"

    def doc(self) -> dict[str, Any]:
        """The per-scan JSON's ``reference`` block."""
        doc: dict[str, Any] = {"part": self.part, "route": self.route, "file": self.reference_file}
        if self.scores is not None:
            doc.update(self.scores.summary(self.threshold))
        doc["decision"] = self.decision
        return doc

    def warning(self) -> str | None:
        if self.part is None:
            return f"no reference part matched this scan ({self.route}): it was not inspected against a reference"
        if not self.scores.registered:
            return (f"the scan does not register to the template of part {self.part!r} (fitness "
                    f"{self.scores.fitness:.2f} < {self.min_fitness}): wrong part, or too little of it "
                    "in view; it was not scored against the reference")
        return None


class ReferenceSet:
    """The references of a run (one per part) and their scorers:
    ``refs.score(path, points, zero_shot) -> GuidedResult`` (routing by ``btp.runtime.reference.route``)."""

    def __init__(self, refs: dict[str, Reference]):
        if not refs:
            raise ValueError("no references")
        self.refs = refs
        self._scorers: dict[str, ReferenceScorer] = {}

    def scorer(self, part: str) -> ReferenceScorer:
        if part not in self._scorers:
            self._scorers[part] = ReferenceScorer(self.refs[part])
        return self._scorers[part]

    def score(self, path, points: np.ndarray, zero_shot: np.ndarray, embed: Embedder | None = None) -> GuidedResult:
        """``embed``: the model, for references that hold its patch embeddings."""
        from btp.runtime.reference import route

        where = route(path, self.refs)
        if where.part is None:
            return GuidedResult(part=None, route=where.rule)
        scorer = self.scorer(where.part)
        return GuidedResult(part=where.part, route=where.rule, scores=scorer(points, zero_shot, embed),
                            threshold=scorer.threshold, reference_file=str(self.refs[where.part].path),
                            min_fitness=scorer.min_fitness)
