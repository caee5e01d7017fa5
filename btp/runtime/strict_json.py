"""Values made fit for strict JSON (RFC 8259: no NaN, no Infinity), shared by every writer of
JSON in the runtime: per-scan documents and summaries (``btp.runtime.outputs.write_json``), the
report page's data, ledger rows and watch messages."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def finite(value):
    """``value`` with every NaN or infinite float as None and numpy arrays and floats as Python
    lists and floats, through dicts, lists and tuples: what strict JSON (RFC 8259) can hold."""
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return finite(value.tolist())
    return value


def jsonable(value):
    """``json.dumps``'s ``default``: numpy scalars and arrays, paths."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
