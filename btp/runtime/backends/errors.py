"""The error every backend raises when it cannot run here; its own module so that the backends
import it without importing the package that picks them."""
from __future__ import annotations

from btp.errors import BTPError


class BackendError(BTPError, RuntimeError):
    """A backend cannot be created on this machine (missing provider / GPU / package)."""
