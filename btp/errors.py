"""Typed errors shared by every stage. Each names the file (when there is one) and the reason."""
from __future__ import annotations



class BTPError(Exception):
    """Base class of every error btp raises on purpose."""


class NotAvailableError(BTPError):
    """A feature that needs something this machine lacks (a GPU, TensorRT, pycuda, torch)."""
