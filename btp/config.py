"""One configuration tree for the whole model, serialised into checkpoints and ONNX metadata.

Every number the runtime needs (N, G, K, channels, scoring constants) lives here, so the
exported model describes itself and no flag has to be matched by hand. Torch-free.

Presets:
- ``ulip2``    : the ULIP-2 PointBERT-10k encoder + OpenCLIP ViT-bigG-14 text tower (spec, D=1280).
- ``btp-3dad`` : ``ulip2`` with the official BTP-3DAD code's inference semantics (``btp convert btp-3dad``).
- ``btp-mini`` : the default edge model (small PointBERT, offline MiniLM text encoder, D=384).
- ``tiny``     : a few-second config for tests.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass(kw_only=True)
class EncoderConfig:
    """PointBERT point encoder (ULIP-2 "colored" variant takes xyz + rgb = 6 channels)."""

    in_channels: int = 6
    num_group: int = 512  # G: FPS centers per cloud
    group_size: int = 32  # K: neighbours per patch
    trans_dim: int = 384
    depth: int = 18
    num_heads: int = 6
    mlp_ratio: float = 4.0
    encoder_dims: int = 256  # mini-PointNet token width
    # mini-PointNet widths: first_conv C_in->p0->p1, second_conv 2*p1->p2->encoder_dims
    pointnet_dims: tuple[int, int, int] = (128, 256, 512)
    pos_hidden: int = 128  # positional MLP Linear(3, pos_hidden)-GELU-Linear(pos_hidden, trans_dim)
    feature_layers: tuple[int, ...] = (2, 5, 8, 11)  # 1-based blocks whose patch tokens feed MGFEM


@dataclass(kw_only=True)
class TextConfig:
    """Text side: which encoder, prompt templates and learnable context."""

    kind: str = "openclip"  # "openclip" | "minilm"
    embed_dim: int = 1280  # D: the shared point/text space width
    n_ctx: int = 8  # learnable context tokens in each prompt
    # False: the text embeddings are the encoder's encoding of the plain prompts, the context is not
    # inserted (the official BTP-3DAD scoring: its learned context never reaches the text tower).
    prompt_context: bool = True
    normal_template: str = "normal {}."
    anomaly_template: str = "defective {}."
    object_name: str = "object"
    # OpenCLIP text transformer (ignored for minilm); defaults = ViT-bigG-14
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 1280
    heads: int = 20
    layers: int = 32


@dataclass(kw_only=True)
class GFCMConfig:
    """Geometric feature creation module and its FPFH supervision."""

    conv_dims: tuple[int, int, int] = (64, 128, 256)
    hidden: int = 128
    out_dim: int = 33  # FPFH width
    # What GFCM sees. "world": absolute patch xyz (the spec). "local": each patch centered on its
    # mean, rotated into its own principal-axis frame (signs fixed by the third moment) and scaled
    # by local_scale - a pose-invariant view of the local shape (see models/btp-mini.md).
    frame: str = "world"
    local_scale: float = 10.0
    # context_k > 0: each patch's conv feature is also compared with the mean over its context_k
    # nearest patches (center distance), so the descriptor says how a patch differs from its
    # surroundings. 0 = the spec's per-patch descriptor.
    context_k: int = 0
    # point_dim > 0: "back to point" - every point of every patch also gets its own score, from
    # its per-point conv feature and the patch's pooled feature through a point_dim-wide layer
    # (btp.model.heads.PointRefine); a point's score is then the mean over the patches holding it
    # of its own score in each. 0 = one score per patch (the spec).
    point_dim: int = 0
    # point_geometry = (w, ...): GFCM's convs also read, for every point of every patch, the
    # covariance shape of its neighbourhood inside the patch at each width w (Gaussian weights,
    # sigma = w x the patch's mean radius): surface variation, linearity, planarity, height over
    # the local plane, density, each also against the patch's mean, and the bend of the local
    # normal against the patch's - multi-scale local geometry (btp.model.heads.point_geometry).
    # () = xyz only (the spec).
    point_geometry: tuple[float, ...] = ()
    # context_geometry = (w, ...): the same covariance shape over a wider neighbourhood, the cores
    # (K/4 points nearest the center) of the patch's context_k nearest patches (sigma = w x the
    # patch's mean radius), with the point's in-patch shape against its mean there
    # (btp.model.heads.context_geometry). Needs point_geometry and context_k > 0. () = off.
    context_geometry: tuple[float, ...] = ()
    normal_radius: float = 0.05
    normal_max_nn: int = 30
    fpfh_radius: float = 0.1
    fpfh_max_nn: int = 100
    loss: str = "infonce"  # "infonce" | "cosine" | "mse"
    temperature: float = 0.1


@dataclass
class MGFEMConfig:
    """Multi-granularity feature fusion: hidden width of its MLPs."""

    hidden: int = 512


@dataclass(kw_only=True)
class ScoringConfig:
    """How patch / global probabilities become point and object scores."""

    object_alpha: float = 0.5  # object = alpha * global_prob + (1 - alpha) * mean(top patch probs)
    top_ratio: float = 0.2
    # what the object score's top mean reads: "patches" = the top_ratio share of the G patch
    # probabilities (the spec); "points" = of the G*K per-point probabilities (gfcm.point_dim > 0);
    # both are computed in the graph (its object_score output). "pooled-points" = of the N sampled
    # points' scores, each point once (its mean over the patches that hold it): computed after the
    # engine, by btp.geometry.scores.object_score, on every path (runtime, eval, validation).
    # Scoring only: training's global term reads loss.object_term either way.
    object_source: str = "patches"
    global_temperature: float = 0.07
    raw_interpolation: str = "nearest"  # "nearest" | "idw3": sampled points -> raw scan
    # A point counts as anomalous in run summaries and the demo when its score >= this. 0.5 = the
    # uncalibrated default; the BTP stage sets it to the point-F1-max threshold on its own
    # training samples (btp.train.loop.calibrate_point_threshold).
    point_threshold: float = 0.5
    # Sampled points that lie in no patch: "nearest_center" takes the score of the nearest FPS
    # center; "zero" gives them 0 (the official BTP-3DAD rule: sum / (count + 1e-6)).
    uncovered_points: str = "nearest_center"
    # The part against itself (btp.geometry.features.self_similarity, after the engine, by
    # btp.geometry.scores.object_score on every path): object += selfsim_weight * (top selfsim_top
    # share of the N sampled points' self-similarity distances - selfsim_offset). 0 = off. k nearest
    # points elsewhere on the part, farther than selfsim_exclusion x the bbox diagonal.
    selfsim_weight: float = 0.0
    selfsim_offset: float = 0.0
    selfsim_top: float = 0.25
    selfsim_k: int = 5
    selfsim_exclusion: float = 0.08
    # ... and the point map (btp.geometry.scores.point_map): clip(map + selfsim_point_weight x (the
    # point's self-similarity distance - selfsim_point_center), 0, 1) at the sampled points, then
    # carried to the raw points as the map is. 0 = the model's map as it is.
    selfsim_point_weight: float = 0.0
    selfsim_point_center: float = 0.0
    # ... then averaged over each sampled point's selfsim_point_smooth nearest sampled points (itself
    # included; 0 or 1 = not averaged)
    selfsim_point_smooth: int = 0


OBJECT_SOURCES = ("patches", "points", "pooled-points")
SAMPLING_ORDERS = ("input", "canonical")


@dataclass(kw_only=True)
class PreprocessConfig:
    """What happens between a raw scan and the engine's inputs."""

    num_points: int = 2048  # N: the raw scan is FPS-downsampled to this many points
    fps_start: int = 0  # explicit FPS start index, identical on every backend
    rgb_fill: float = 0.5  # colour channels for scans without colour
    # center at the centroid, divide by the max radius: "unit_sphere" of the N sampled points, or
    # "unit_sphere_raw" of the whole raw scan before downsampling (the official preprocessing)
    normalize: str = "unit_sphere"
    # where the downsampling FPS (raw -> N) starts: "fixed" = fps_start; "seeded-random" = the
    # official code's torch.manual_seed(downsample_seed); torch.randint(0, M) (btp.geometry.prepare)
    downsample_start: str = "fixed"
    downsample_seed: int = 0
    # the raw-scan "voxel" rule (btp.geometry.sampling.voxel_downsample, the runtime's default for
    # scans of more than N points): about this many occupied grid cells per sampled point, among
    # which FPS picks the N samples; the way back to the raw scan evaluates the interpolation at
    # the cells' representatives. Fewer cells: less work per scan, a coarser approximation of the
    # exact rule (training and `btp eval --downsample exact` do not read it). 3: held-out P-AUROC
    # on 100k-point scans within 0.06 point of 6, in less time per scan
    # (benchmarks/results/cpu-findings-amd-epyc-2026-12-03.md)
    voxel_reps: int = 3
    # which point the samplings start from and how ties fall: "input" = by row index (the file's
    # row order matters: fps_start is a row); "canonical" = by the points' values only, so the
    # same point set in any row order gives the same samples and scores, and one point more or
    # less moves them little (btp.geometry.sampling: canonical_order, the voxel rule's hashed
    # representatives and snapped grid)
    sampling_order: str = "input"


@dataclass(kw_only=True)
class LossConfig:
    # point term: "focal" (the spec: sigmoid focal, gamma/alpha below) or "balanced-bce" (BCE with
    # the positives weighted by the batch's negative/positive ratio; see models/btp-mini.md)
    point_loss: str = "focal"
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    dice_weight: float = 1.0
    global_weight: float = 0.5
    geometric_weight: float = 0.1
    # the global term's object logit: alpha * global logit + (1 - alpha) * this part: "patch-max"
    # (the spec: the largest patch logit) or "points-top" (the mean of the top scoring.top_ratio
    # share of the per-point logits: the statistic the runtime's object score reads with
    # scoring.object_source = "points"; needs gfcm.point_dim > 0)
    object_term: str = "patch-max"


@dataclass(kw_only=True)
class TrainConfig:
    lr: float = 5e-4
    lr_prompt: float = 1e-3
    weight_decay: float = 1e-4
    warmup_frac: float = 0.1
    warmup_start: float = 0.1
    min_lr: float = 1e-6
    grad_clip: float = 1.0
    batch_size: int = 2
    epochs: int = 100
    seed: int = 0


@dataclass(kw_only=True)
class BTPConfig:
    name: str = "btp"
    version: str = "0.1.0"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    gfcm: GFCMConfig = field(default_factory=GFCMConfig)
    mgfem: MGFEMConfig = field(default_factory=MGFEMConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schema_version: int = SCHEMA_VERSION

    # ---- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BTPConfig":
        return _from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str) -> "BTPConfig":
        return cls.from_dict(json.loads(text))

    def validate(self) -> "BTPConfig":
        e, p = self.encoder, self.preprocess
        problems = []
        if e.num_group > p.num_points:
            problems.append(f"encoder.num_group={e.num_group} > preprocess.num_points={p.num_points}")
        if e.group_size > p.num_points:
            problems.append(f"encoder.group_size={e.group_size} > preprocess.num_points={p.num_points}")
        if p.voxel_reps < 1:
            problems.append(f"preprocess.voxel_reps={p.voxel_reps}: expected at least 1 cell per sample")
        if e.trans_dim % e.num_heads:
            problems.append(f"encoder.trans_dim={e.trans_dim} not divisible by num_heads={e.num_heads}")
        if any(not 1 <= layer <= e.depth for layer in e.feature_layers):
            problems.append(f"encoder.feature_layers={e.feature_layers} outside 1..depth={e.depth}")
        if e.in_channels not in (3, 6):
            problems.append(f"encoder.in_channels={e.in_channels}: expected 3 (xyz) or 6 (xyz+rgb)")
        if not 0.0 <= self.scoring.object_alpha <= 1.0:
            problems.append(f"scoring.object_alpha={self.scoring.object_alpha} outside [0, 1]")
        if not 0.0 < self.scoring.point_threshold < 1.0:
            problems.append(f"scoring.point_threshold={self.scoring.point_threshold} outside (0, 1)")
        if not 0.0 < self.scoring.top_ratio <= 1.0:
            problems.append(f"scoring.top_ratio={self.scoring.top_ratio} outside (0, 1]")
        if self.text.kind not in ("openclip", "minilm"):
            problems.append(f"text.kind={self.text.kind!r}: expected 'openclip' or 'minilm'")
        if self.loss.point_loss not in ("focal", "balanced-bce"):
            problems.append(f"loss.point_loss={self.loss.point_loss!r}: expected 'focal' or 'balanced-bce'")
        if self.loss.object_term not in ("patch-max", "points-top"):
            problems.append(f"loss.object_term={self.loss.object_term!r}: expected 'patch-max' or 'points-top'")
        elif self.loss.object_term == "points-top" and not self.gfcm.point_dim:
            problems.append("loss.object_term='points-top' needs per-point scores (gfcm.point_dim > 0)")
        if p.normalize not in ("unit_sphere", "unit_sphere_raw"):
            problems.append(f"preprocess.normalize={p.normalize!r}: expected 'unit_sphere' or 'unit_sphere_raw'")
        if p.downsample_start not in ("fixed", "seeded-random"):
            problems.append(f"preprocess.downsample_start={p.downsample_start!r}: expected 'fixed' or 'seeded-random'")
        if p.sampling_order not in SAMPLING_ORDERS:
            problems.append(f"preprocess.sampling_order={p.sampling_order!r}: expected one of {SAMPLING_ORDERS}")
        if self.scoring.uncovered_points not in ("nearest_center", "zero"):
            problems.append(f"scoring.uncovered_points={self.scoring.uncovered_points!r}: "
                            "expected 'nearest_center' or 'zero'")
        if self.gfcm.frame not in ("world", "local"):
            problems.append(f"gfcm.frame={self.gfcm.frame!r}: expected 'world' or 'local'")
        if not 0 <= self.gfcm.context_k < e.num_group:
            problems.append(f"gfcm.context_k={self.gfcm.context_k} outside 0..num_group-1={e.num_group - 1}")
        if self.scoring.selfsim_weight < 0 or not 0.0 < self.scoring.selfsim_top <= 1.0 \
                or self.scoring.selfsim_k < 1 or not 0.0 <= self.scoring.selfsim_exclusion < 1.0 \
                or not self.scoring.selfsim_point_weight >= 0 or not math.isfinite(self.scoring.selfsim_point_weight) \
                or not math.isfinite(self.scoring.selfsim_point_center) or self.scoring.selfsim_point_smooth < 0:
            problems.append(f"scoring.selfsim_*: weight {self.scoring.selfsim_weight} (>= 0), top "
                            f"{self.scoring.selfsim_top} (in (0, 1]), k {self.scoring.selfsim_k} (>= 1), exclusion "
                            f"{self.scoring.selfsim_exclusion} (in [0, 1)), point weight "
                            f"{self.scoring.selfsim_point_weight} (finite, >= 0), point centre "
                            f"{self.scoring.selfsim_point_center} (finite), point smooth "
                            f"{self.scoring.selfsim_point_smooth} (>= 0)")
        if self.scoring.object_source not in OBJECT_SOURCES:
            problems.append(f"scoring.object_source={self.scoring.object_source!r}: expected one of {OBJECT_SOURCES}")
        elif self.scoring.object_source == "points" and not self.gfcm.point_dim:
            problems.append("scoring.object_source='points' needs per-point scores (gfcm.point_dim > 0)")
        if any(not 0.0 < w for w in self.gfcm.point_geometry):
            problems.append(f"gfcm.point_geometry={self.gfcm.point_geometry}: widths must be > 0")
        if any(not 0.0 < w for w in self.gfcm.context_geometry):
            problems.append(f"gfcm.context_geometry={self.gfcm.context_geometry}: widths must be > 0")
        if self.gfcm.context_geometry and not (self.gfcm.point_geometry and self.gfcm.context_k):
            problems.append("gfcm.context_geometry needs gfcm.point_geometry and gfcm.context_k > 0")
        if self.gfcm.context_geometry and e.group_size < 4:
            problems.append(f"gfcm.context_geometry needs encoder.group_size >= 4 (a core is K/4 points), "
                            f"got {e.group_size}")
        if self.gfcm.point_dim < 0:
            problems.append(f"gfcm.point_dim={self.gfcm.point_dim}: expected 0 (off) or a width > 0")
        if problems:
            raise ValueError("invalid BTPConfig: " + "; ".join(problems))
        return self


def _from_dict(cls, data: dict[str, Any]):
    """Build a dataclass from a dict, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}")
    kwargs = {}
    for name, value in data.items():
        ftype = fields[name].type
        default = getattr(cls(), name) if _has_default(fields[name]) else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value)
        elif isinstance(default, tuple) or (isinstance(ftype, str) and ftype.startswith("tuple")):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


# ---- presets ------------------------------------------------------------------------

def ulip2_config() -> BTPConfig:
    """The spec's model: ULIP-2 PointBERT-10k (6-channel) + OpenCLIP ViT-bigG-14 text tower."""
    return BTPConfig(name="btp-ulip2").validate()


def btp3dad_config() -> BTPConfig:
    """A model trained with the official BTP-3DAD code, scored the way its test_standard_aupro.py
    scores it: ULIP-2 PointBERT (G 512, K 32, N 2048, layers 2/5/8/11), the raw scan normalised to
    the unit sphere and then FPS-sampled from a seeded random start, text = the OpenCLIP encoding
    of "normal ." / "defective ." without the learned context, object = 0.5 * global + 0.5 * mean
    of the top 20 % patch probabilities, uncovered sampled points scored 0. ``btp convert btp-3dad``
    fills in the head widths from the checkpoint."""
    return BTPConfig(
        name="btp-3dad",
        text=TextConfig(object_name="", prompt_context=False),
        scoring=ScoringConfig(object_alpha=0.5, top_ratio=0.2, global_temperature=0.07, uncovered_points="zero"),
        preprocess=PreprocessConfig(num_points=2048, normalize="unit_sphere_raw", downsample_start="seeded-random",
                                    downsample_seed=0),
    ).validate()


def btp_mini_config() -> BTPConfig:
    """The default edge model, sized for a 2-core CPU (see models/btp-mini.md for the why).

    Same architecture as ULIP-2 with fewer patches (G=256 of N=2048, each point in ~4 patches),
    a narrower mini-PointNet and transformer (the FLOPs of both scale with G*K and width^2),
    and the offline MiniLM text encoder (D=384) in place of OpenCLIP bigG.
    """
    return BTPConfig(
        name="btp-mini",
        encoder=EncoderConfig(
            in_channels=6, num_group=256, group_size=32, trans_dim=192, depth=6, num_heads=3,
            encoder_dims=192, pointnet_dims=(64, 128, 256), pos_hidden=128, feature_layers=(2, 3, 4, 6),
        ),
        text=TextConfig(kind="minilm", embed_dim=384),
        # Deviations from the spec, each chosen on training-split meshes only (train on 48, validate
        # on the other 10; models/btp-mini.md "Design"): our small self-trained encoder's features
        # carry no transferable defect signal, so the signal has to come from GFCM. It sees each
        # patch in its own principal-axis frame and next to its 8 nearest patches; the point term
        # is class-balanced BCE (focal alpha 0.25 learned nothing: anomalous points are 0.5-8 %);
        # the object score averages the top 2 % of patches (defects cover few of the 256).
        gfcm=GFCMConfig(frame="local", context_k=8),
        loss=LossConfig(point_loss="balanced-bce"),
        scoring=ScoringConfig(top_ratio=0.02),
        mgfem=MGFEMConfig(hidden=256),
        # CPU budget: 4 epochs of batch 8 (580 iterations on 1160 synthetic samples) instead of the
        # spec's 100 epochs of batch 2, at lr 3e-3 (the spec's 5e-4 learned nothing in this budget).
        train=TrainConfig(lr=3e-3, lr_prompt=3e-3, batch_size=8, epochs=4),
    ).validate()


def btp_point_config() -> BTPConfig:
    """btp-mini with per-point scores: each point of each patch also gets its own score from its
    GFCM conv feature through a 32-wide layer (``gfcm.point_dim``), and the object score's top
    mean reads those per-point probabilities (``scoring.object_source``). Both were chosen on a
    validation split inside the corpus's training families (models/btp-mini.md)."""
    cfg = btp_mini_config()
    cfg.gfcm.point_dim = 32
    cfg.scoring.object_source = "points"
    return cfg.validate()


def btp_geo_config() -> BTPConfig:
    """btp_point_config with multi-scale local geometry in GFCM's input: each point's covariance
    shape over Gaussian neighbourhoods of 0.5 and 1 patch radius inside its patch
    (``gfcm.point_geometry``), the kind of features the learned baseline reads (models/btp-mini.md)."""
    cfg = btp_point_config()
    cfg.name = "btp-geo"
    cfg.gfcm.point_geometry = (0.5, 1.0)
    return cfg.validate()


def btp_context_config() -> BTPConfig:
    """btp_geo_config with part of GFCM's geometry read over a neighbourhood wider than one patch:
    the in-patch width 0.5 stays, the in-patch width 1 is replaced by a width-2 neighbourhood over
    the cores of the 8 context patches (``gfcm.context_geometry``, about the learned baseline's 64
    nearest points), at about btp-geo's engine cost. Tried on the validation split and not adopted:
    it loses 1.4 points of point AUROC (models/btp-geo.md "Wider context")."""
    cfg = btp_geo_config()
    cfg.name = "btp-context"
    cfg.gfcm.point_geometry = (0.5,)
    cfg.gfcm.context_geometry = (2.0,)
    return cfg.validate()


def btp_geo4k_config() -> BTPConfig:
    """btp_geo_config on twice the sampled points (N = 4096): the same G = 256 patches of K = 32
    points, so the engine's inputs and cost do not change, but each patch spans half the area and
    the per-point scores come at twice the resolution (about 2 patches per point instead of 4)."""
    cfg = btp_geo_config()
    cfg.name = "btp-geo-4k"
    cfg.preprocess.num_points = 4096
    # scores that do not move with the file's row order (models/btp-geo-4k.md, "Stability")
    cfg.preprocess.sampling_order = "canonical"
    # object score = 0.5 global + 0.5 mean of the N sampled points' scores: the open borders of a
    # single view and one point more or less move it less than a top share (card, "Object rules")
    cfg.scoring.object_source, cfg.scoring.top_ratio = "pooled-points", 1.0
    # ... + 0.247 x (the part against itself - 4.093): the top quarter of the sampled points'
    # self-similarity distances (btp.geometry.features.self_similarity; card, "The part against
    # itself"): the weight makes both terms count the same on the validation split, the offset
    # keeps the score's level
    cfg.scoring.selfsim_weight, cfg.scoring.selfsim_offset = 0.247, 4.093
    # the point map too: + 0.15 x (the point's self-similarity distance - 2.45, its median over good
    # points), clipped to [0, 1]: what is ordinary for the part goes down, what it has nowhere else
    # up; then averaged over each sampled point's 16 nearest (card, "The part against itself, point
    # by point")
    cfg.scoring.selfsim_point_weight, cfg.scoring.selfsim_point_center = 0.15, 2.45
    cfg.scoring.selfsim_point_smooth = 16
    return cfg.validate()


def tiny_config() -> BTPConfig:
    """A test-sized model: runs forward/backward in well under a second on CPU."""
    return BTPConfig(
        name="btp-tiny",
        encoder=EncoderConfig(
            in_channels=6, num_group=32, group_size=16, trans_dim=32, depth=4, num_heads=2,
            encoder_dims=32, pointnet_dims=(16, 32, 64), pos_hidden=16, feature_layers=(1, 2, 3, 4),
        ),
        text=TextConfig(kind="openclip", embed_dim=32, n_ctx=4, vocab_size=49408, context_length=77,
                        width=32, heads=2, layers=2),
        gfcm=GFCMConfig(conv_dims=(16, 32, 64), hidden=32),
        mgfem=MGFEMConfig(hidden=32),
        preprocess=PreprocessConfig(num_points=512),
        train=TrainConfig(epochs=1),
    ).validate()


PRESETS = {"ulip2": ulip2_config, "btp-3dad": btp3dad_config, "btp-mini": btp_mini_config, "btp-geo": btp_geo_config,
           "btp-context": btp_context_config, "btp-geo-4k": btp_geo4k_config,
           "tiny": tiny_config}
# the committed default model: models/<name>.safetensors, what btp-export, btp-run, btp eval and the
# demo use without --model (models/btp-geo-4k.md)
DEFAULT_MODEL_NAME = "btp-geo-4k"


def preset(name: str) -> BTPConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown config preset {name!r}; choose one of {sorted(PRESETS)}") from None
