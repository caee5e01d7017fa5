"""Typed errors of btp.geometry: each says what was wrong with which array and how to fix it."""
from __future__ import annotations

from btp.errors import BTPError


class GeometryError(BTPError, ValueError):
    """Bad input to a geometry op (shape, dtype, size, degenerate cloud)."""


class DegenerateCloudError(GeometryError):
    """The cloud has no extent (all points identical), so it cannot be scaled to the unit sphere."""
