"""BTP's trainable heads: GFCM (geometric descriptors) and MGFEM (multi-granularity fusion)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from btp.config import GFCMConfig

_FRAME_SQUARINGS = 12  # power iteration by repeated squaring: eigenvalue ratios enter as r**4096


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


def _diag3(m: torch.Tensor) -> torch.Tensor:
    """The diagonal [..., 3] of ``m [..., 3, 3]``: every 4th entry of the flattened matrix, one
    strided Slice in ONNX; torch.onnx writes ``Tensor.diagonal`` as an If/EyeLike/CumSum/GatherND
    subgraph."""
    return m.flatten(-2)[..., ::4]


def _dominant_eigvec(m: torch.Tensor) -> torch.Tensor:
    """Unit eigenvector of the largest eigenvalue of symmetric PSD ``m [..., 3, 3]`` (sign arbitrary).

    Repeated squaring (trace-normalised) leaves ~ e e^T; its column with the largest diagonal
    entry is a multiple of e. MatMul/ArgMax/GatherElements only, so it exports to ONNX/TensorRT,
    unlike torch.linalg.eigh.
    """
    for _ in range(_FRAME_SQUARINGS):
        m = m @ m
        m = m / _diag3(m).sum(-1).clamp_min(1e-30)[..., None, None]
    idx = _diag3(m).argmax(dim=-1)  # [...]
    col = torch.gather(m, -1, idx[..., None, None].expand(*m.shape[:-1], 1)).select(-1, 0)  # [..., 3]
    return col / col.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ax, ay, az = a.unbind(-1)
    bx, by, bz = b.unbind(-1)
    return torch.stack([ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx], dim=-1)


def local_frame(patch_xyz: torch.Tensor, scale: float) -> torch.Tensor:
    """Patch xyz [B,G,K,3] -> the same points centered on the patch mean, in the patch's principal
    axes (largest, middle, smallest variance), each axis signed so the third moment is >= 0, times
    ``scale``. Invariant to the patch's position and rotation (and to reflections)."""
    x = (patch_xyz - patch_xyz.mean(dim=2, keepdim=True)) * scale  # [B, G, K, 3]
    with torch.no_grad():  # the frame is preprocessing: no gradient flows through it
        cov = x.transpose(2, 3) @ x  # [B, G, 3, 3]
        cov = cov / _diag3(cov).sum(-1).clamp_min(1e-30)[..., None, None]
        eye = torch.eye(3, dtype=x.dtype, device=x.device)
        normal = _dominant_eigvec(eye - cov)  # smallest-variance axis
        proj = eye - normal.unsqueeze(-1) * normal.unsqueeze(-2)
        major = _dominant_eigvec(proj @ cov @ proj)
        major = major - (major * normal).sum(-1, keepdim=True) * normal
        major = major / major.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        frame = torch.stack([major, _cross(normal, major), normal], dim=-1)  # [B, G, 3, 3] columns
    y = x @ frame  # [B, G, K, 3]
    sign = torch.where(y.pow(3).sum(dim=2, keepdim=True) >= 0, 1.0, -1.0).to(y.dtype)  # [B, G, 1, 3]
    return y * sign


def _sym3_eigh(c: torch.Tensor):
    """Covariances given by their entries ``c [..., 6]`` = (xx, yy, zz, xy, xz, yz) -> eigenvalues
    [..., 3] ascending and the unit eigenvector of the smallest [..., 3] (sign arbitrary).

    Closed form, so it exports to a few plain ONNX nodes: the eigenvalues from the trigonometric
    solution of the characteristic cubic, the eigenvector as the longest cross product of two
    rows of C - lambda_min I.
    """
    c00, c11, c22, c01, c02, c12 = c.unbind(-1)
    q = (c00 + c11 + c22) / 3.0
    a00, a11, a22 = c00 - q, c11 - q, c22 - q
    p = torch.sqrt((a00 * a00 + a11 * a11 + a22 * a22 + 2.0 * (c01 * c01 + c02 * c02 + c12 * c12)) / 6.0)
    p = p.clamp_min(1e-10)  # an isotropic or empty covariance: p**3 stays a normal float32
    det = a00 * (a11 * a22 - c12 * c12) - c01 * (c01 * a22 - c12 * c02) + c02 * (c01 * c12 - a11 * c02)
    phi = torch.acos((det / (2.0 * p * p * p)).clamp(-1.0, 1.0)) / 3.0
    largest = q + 2.0 * p * torch.cos(phi)
    smallest = q + 2.0 * p * torch.cos(phi + 2.0943951023931957)  # + 2 pi / 3
    evals = torch.stack([smallest, 3.0 * q - largest - smallest, largest], dim=-1).clamp_min(0.0)
    r0 = torch.stack([c00 - smallest, c01, c02], dim=-1)
    r1 = torch.stack([c01, c11 - smallest, c12], dim=-1)
    r2 = torch.stack([c02, c12, c22 - smallest], dim=-1)
    cands = torch.stack([_cross(r0, r1), _cross(r0, r2), _cross(r1, r2)], dim=-2)  # [..., 3, 3]
    best = cands.norm(dim=-1).argmax(dim=-1)  # [...]
    v = torch.gather(cands, -2, best[..., None, None].expand(*cands.shape[:-2], 1, 3)).select(-2, 0)
    return evals, v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def _outer6(v: torch.Tensor) -> torch.Tensor:
    """v [..., 3] -> the entries (xx, yy, zz, xy, xz, yz) of v v^T [..., 6], as ``_sym3_eigh`` reads them."""
    x, y, z = v.unbind(-1)
    return torch.stack([x * x, y * y, z * z, x * y, x * z, y * z], dim=-1)


def point_geometry(patch_xyz: torch.Tensor, widths: tuple[float, ...]) -> torch.Tensor:
    """Multi-scale local geometry of every point of every patch: patch xyz [B,G,K,3] -> [B,G,K,F],
    F = 10 per width + 2, all invariant to position, rotation and scale.

    Each point's neighbourhood at width w is the patch's points weighted by
    exp(-d^2 / (2 (w r)^2)), r = the patch points' mean distance to their centroid. From its
    weighted covariance: surface variation, linearity, planarity, the point's height over the
    weighted plane (in the neighbourhood's rms radius), density (total weight over the patch's
    mean of it); the first four minus their patch mean; the bend of the local normal against
    the patch's (1 - |cos|). Once: the point's height over the patch plane (in r) and the
    patch's surface variation. The learned baseline's multi-scale covariance features
    (``btp.eval.baselines.local_features``) with Gaussian instead of kNN neighbourhoods: no
    sorting, no ties, a handful of matrix products.
    """
    return _point_geometry_parts(patch_xyz, widths)[0]


class _PatchGeometry(NamedTuple):
    """``point_geometry``'s features and what ``context_geometry`` reuses of its work."""

    features: torch.Tensor  # [B, G, K, F]
    shape: torch.Tensor  # the finest width's surface variation, linearity, planarity, height [B, G, K, 4]
    normal: torch.Tensor  # the finest width's unit normal [B, G, K, 3] (sign arbitrary)
    centroid: torch.Tensor  # the patch mean [B, G, 1, 3]
    radius: torch.Tensor  # the patch points' mean distance to it [B, G, 1, 1]
    unit: torch.Tensor  # the patch centered on its mean, in units of its radius [B, G, K, 3]


def _point_geometry_parts(patch_xyz: torch.Tensor, widths: tuple[float, ...]) -> _PatchGeometry:
    with torch.no_grad():  # preprocessing of the input: no gradient flows through it
        centroid = patch_xyz.mean(dim=2, keepdim=True)
        x = patch_xyz - centroid  # [B, G, K, 3]
        patch_radius = x.norm(dim=-1).mean(dim=2, keepdim=True).clamp_min(1e-12).unsqueeze(-1)
        x = x / patch_radius  # mean radius 1
        b, g, k_all, _ = x.shape
        s = len(widths)
        second = _outer6(x)  # [B, G, K, 6]
        sq = second[..., :3].sum(-1)
        d2 = (sq.unsqueeze(3) + sq.unsqueeze(2) - 2.0 * (x @ x.transpose(2, 3))).clamp_min(0.0)  # [B, G, K, K]
        weights = torch.exp(torch.stack([d2 * (-0.5 / (w * w)) for w in widths]))  # [S, B, G, K, K]
        moments = weights @ torch.cat([torch.ones_like(sq).unsqueeze(-1), x, second], dim=-1)  # [S, B, G, K, 10]
        mass = moments[..., :1]
        mean = moments[..., 1:4] / mass
        cov = moments[..., 4:] / mass - _outer6(mean)
        patch_cov = second.mean(dim=2, keepdim=True).expand(-1, -1, k_all, -1)  # the patch, seen whole
        evals, normal = _sym3_eigh(torch.cat([cov, patch_cov.unsqueeze(0)], dim=0))  # [S+1, B, G, K, ...]
        l3, l2, l1 = evals.unbind(-1)
        total = evals.sum(-1).clamp_min(1e-30)
        l1 = l1.clamp_min(1e-30)
        offset = torch.cat([x - mean, x.unsqueeze(0)], dim=0)  # from the weighted / the patch's centroid
        radius = torch.cat([total[:s].sqrt(), torch.ones_like(total[s:])], dim=0)
        height = (offset * normal).sum(-1).abs() / radius.clamp_min(1e-12)
        shape = torch.stack([l3 / total, (l1 - l2) / l1, (l2 - l3) / l1, height], dim=-1)  # [S+1, B, G, K, 4]
        local = shape[:s]
        density = mass[:s] / mass[:s].mean(dim=3, keepdim=True)
        bend = 1.0 - (normal[:s] * normal[s:]).sum(-1, keepdim=True).abs()
        per_width = torch.cat([local, density, local - local.mean(dim=3, keepdim=True), bend], dim=-1)
        per_width = per_width.permute(1, 2, 3, 0, 4).reshape(b, g, k_all, 10 * s)  # [B, G, K, 10 S]
        features = torch.cat([per_width, shape[s, ..., 3:4], shape[s, ..., 0:1]], dim=-1)
        return _PatchGeometry(features, local[0], normal[0], centroid, patch_radius, x)


def point_geometry_width(widths: tuple[float, ...]) -> int:
    return 10 * len(widths) + 2 if widths else 0


def _gather_patches(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """values [B,G,K,F], idx [B,G,C] patch indices -> the C patches' rows [B,G,C*K,F]."""
    b, g, k, f = values.shape
    c = idx.shape[-1]
    flat = idx.reshape(b, g * c, 1).expand(-1, -1, k * f)
    return torch.gather(values.reshape(b, g, k * f), 1, flat).reshape(b, g, c * k, f)


def context_geometry(patch_xyz: torch.Tensor, center: torch.Tensor, context: torch.Tensor, widths: tuple[float, ...],
                     own: _PatchGeometry) -> torch.Tensor:
    """Geometry of every point of every patch over a neighbourhood wider than its patch: patch xyz
    [B,G,K,3], centers [B,G,3], ``context`` [B,G,C] the indices of each patch's C nearest patches
    (itself included), ``own`` the patches' ``_point_geometry_parts`` -> [B,G,K,10 per width],
    invariant to position, rotation and scale.

    The neighbourhood is the cores of the context patches, a core being the K/4 points of a patch
    nearest its center: each point lies in about four patches, so the cores cover the surface
    about once, and 8 context patches give 64 points, the learned baseline's wide neighbourhood.
    The points are weighted by exp(-d^2 / (2 (w r)^2)), r the patch's mean radius as in
    ``point_geometry``. From its
    weighted covariance: surface variation, linearity, planarity, the point's height over the wide
    plane (in the neighbourhood's rms radius), density (mass over the patch's mean of it); the
    bend of the point's finest in-patch normal against the wide one (1 - |cos|); and the point's
    finest in-patch shape (``own.shape``) minus its weighted mean over the neighbourhood - the
    learned baseline's "relative to the 64 nearest" features, centered on the point instead of
    cut at its patch's edge.
    """
    with torch.no_grad():
        b, g, k, _ = patch_xyz.shape
        x, local_shape = own.unit, own.shape  # [B, G, K, 3], [B, G, K, 4]
        rows = torch.cat([patch_xyz, local_shape], dim=-1)  # [B, G, K, 7]
        to_center = (patch_xyz - center.unsqueeze(2)).pow(2).sum(-1)  # [B, G, K]
        core = to_center.topk(k // 4, dim=-1, largest=False).indices  # [B, G, K/4]; K >= 4 (config)
        core = torch.gather(rows, 2, core.unsqueeze(-1).expand(-1, -1, -1, rows.shape[-1]))  # [B, G, K/4, 7]
        ctx = _gather_patches(core, context)  # [B, G, C K/4, 7]
        y = (ctx[..., :3] - own.centroid) / own.radius
        sq_x, sq_y = (x * x).sum(-1), (y * y).sum(-1)
        d2 = (sq_x.unsqueeze(3) + sq_y.unsqueeze(2) - 2.0 * (x @ y.transpose(2, 3))).clamp_min(0.0)  # [B, G, K, C K/4]
        weights = torch.exp(torch.stack([d2 * (-0.5 / (w * w)) for w in widths]))  # [S, B, G, K, C K/4]
        moments = weights @ torch.cat([torch.ones_like(sq_y).unsqueeze(-1), y, _outer6(y), ctx[..., 3:]], dim=-1)
        mass = moments[..., :1]  # [S, B, G, K, 1]
        centroid = moments[..., 1:4] / mass
        cov = moments[..., 4:10] / mass - _outer6(centroid)
        evals, normal = _sym3_eigh(cov)
        l3, l2, l1 = evals.unbind(-1)
        total = evals.sum(-1).clamp_min(1e-30)
        l1 = l1.clamp_min(1e-30)
        height = ((x - centroid) * normal).sum(-1).abs() / total.sqrt().clamp_min(1e-12)
        shape = torch.stack([l3 / total, (l1 - l2) / l1, (l2 - l3) / l1, height], dim=-1)  # [S, B, G, K, 4]
        density = mass / mass.mean(dim=3, keepdim=True)
        bend = 1.0 - (normal * own.normal).sum(-1, keepdim=True).abs()
        relative = local_shape - moments[..., 10:] / mass
        per_width = torch.cat([shape, density, bend, relative], dim=-1)  # [S, B, G, K, 10]
        return per_width.permute(1, 2, 3, 0, 4).reshape(b, g, k, 10 * len(widths))


def context_geometry_width(widths: tuple[float, ...]) -> int:
    return 10 * len(widths)


class GFCM(nn.Module):
    """Geometric feature creation: patch xyz [B,G,K,3] -> learned descriptor [B,G,out_dim].

    Input view: absolute xyz (``frame="world"``, the spec) or ``local_frame`` (``frame="local"``),
    with ``point_geometry`` features appended per point when ``cfg.point_geometry`` names widths,
    and ``context_geometry`` features over the context patches when ``cfg.context_geometry`` does.
    Conv2d(3 [+ F],c0)-BN-ReLU, Conv2d(c0,c1)-BN-ReLU, Conv2d(c1,c2)-BN-ReLU (1x1), max over K, then
    (``context_k > 0``) [h, h - mean of h over the context_k nearest patches], then
    Linear(.,hidden)-ReLU-Linear(hidden,out_dim) (out_dim = 33, the FPFH width it learns to mimic).
    """

    def __init__(self, cfg: GFCMConfig):
        super().__init__()
        c0, c1, c2 = cfg.conv_dims
        self.frame, self.local_scale, self.context_k = cfg.frame, cfg.local_scale, cfg.context_k
        self.geometry = tuple(cfg.point_geometry)
        self.context_geometry = tuple(cfg.context_geometry)
        c_geo = point_geometry_width(self.geometry) + context_geometry_width(self.context_geometry)
        layers: list[nn.Module] = []
        for c_in, c_out in ((3 + c_geo, c0), (c0, c1), (c1, c2)):
            layers += [nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.head = _mlp(2 * c2 if cfg.context_k else c2, cfg.hidden, cfg.out_dim)

    def forward(self, patch_xyz: torch.Tensor, center: torch.Tensor | None = None):
        """-> (descriptor [B, G, out_dim], per-point conv features [B, c2, G, K], the pooled patch
        feature the head reads [B, G, c2] or [B, G, 2 c2] with context).

        Called as a module (not through a method) so the exported graph names its frame and
        geometry ops under ``gfcm/``, where the TensorRT precision plan keeps them FP32."""
        # patch_xyz [B, G, K, 3] absolute coordinates; center [B, G, 3] (needed when context_k > 0)
        if self.context_k:
            if center is None:
                raise ValueError("GFCM with context_k > 0 needs the patch centers")
            dist = torch.cdist(center, center)  # [B, G, G]
            nearest = dist.topk(self.context_k, dim=-1, largest=False)  # self included
        view = local_frame(patch_xyz, self.local_scale) if self.frame == "local" else patch_xyz
        if self.geometry:
            own = _point_geometry_parts(patch_xyz, self.geometry)
            parts = [view, own.features]
            if self.context_geometry:
                parts.append(context_geometry(patch_xyz, center, nearest.indices, self.context_geometry, own))
            view = torch.cat(parts, dim=-1)  # [B, G, K, 3 + F]
        per_point = self.convs(view.permute(0, 3, 1, 2))  # [B, c2, G, K]
        x = per_point.max(dim=3).values.transpose(1, 2)  # [B, G, c2]
        if self.context_k:
            near = (dist <= nearest.values[..., -1:]).to(x.dtype)  # ties may add a neighbour
            context = (near / near.sum(dim=-1, keepdim=True)) @ x  # [B, G, c2]
            x = torch.cat([x, x - context], dim=-1)
        return self.head(x), per_point, x  # [B, G, out_dim], [B, c2, G, K], [B, G, c2 | 2 c2]


class PointRefine(nn.Module):
    """Back to the points: a feature u [B, G, K, point_dim] for every point of every patch.

    u = ReLU(W_p f + W_h h + b), f = the point's GFCM conv feature in that patch, h = the patch's
    pooled GFCM feature. ``offset`` maps u to the text space (Linear(point_dim, D), no bias,
    zero-initialised so training starts from the patch scores): the point's embedding in that
    patch is Z + offset(u), scored against the text like Z.
    """

    def __init__(self, point_in: int, patch_in: int, point_dim: int, embed_dim: int):
        super().__init__()
        self.point_proj = nn.Conv2d(point_in, point_dim, 1)
        self.patch_proj = nn.Linear(patch_in, point_dim, bias=False)
        self.offset = nn.Linear(point_dim, embed_dim, bias=False)
        nn.init.zeros_(self.offset.weight)

    def forward(self, per_point: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        # per_point [B, c, G, K], pooled [B, G, P] -> u [B, G, K, point_dim]
        u = self.point_proj(per_point).permute(0, 2, 3, 1) + self.patch_proj(pooled).unsqueeze(2)
        return torch.relu(u)


class MGFEM(nn.Module):
    """Multi-granularity fusion -> patch embedding Z [B,G,D] (not normalised).

    ONE shared MLP(T->hidden->D) over each layer feature, softmax-weighted sum over layers
    (weights init 1); descriptor MLP(33->hidden->D); CLS MLP(T->hidden->D) broadcast to every
    patch; concat [3D] -> Linear(3D,D)-ReLU-Linear(D,D).
    """

    def __init__(self, trans_dim: int, desc_dim: int, hidden: int, embed_dim: int, n_layers: int):
        super().__init__()
        self.layer_mlp = _mlp(trans_dim, hidden, embed_dim)
        self.layer_weights = nn.Parameter(torch.ones(n_layers))
        self.desc_mlp = _mlp(desc_dim, hidden, embed_dim)
        self.cls_mlp = _mlp(trans_dim, hidden, embed_dim)
        self.fuse = _mlp(3 * embed_dim, embed_dim, embed_dim)

    def forward(self, layer_features: list[torch.Tensor], geo_desc: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        # layer_features L x [B, G, T]; geo_desc [B, G, 33]; cls [B, T]
        per_layer = torch.stack([self.layer_mlp(f) for f in layer_features], dim=0)  # [L, B, G, D]
        weights = self.layer_weights.softmax(dim=0).reshape(-1, 1, 1, 1)  # [L, 1, 1, 1]
        layer_embed = (weights * per_layer).sum(dim=0)  # [B, G, D]
        desc_embed = self.desc_mlp(geo_desc)  # [B, G, D]
        cls_embed = self.cls_mlp(cls).unsqueeze(1).expand_as(layer_embed)  # [B, G, D]
        return self.fuse(torch.cat([layer_embed, desc_embed, cls_embed], dim=-1))  # [B, G, D]
