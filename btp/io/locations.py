"""Where btp finds files it did not get as an argument: the package's own assets, and the data
folders named by environment variables. Nothing here looks outside the installed package except
through an environment variable the user set.

    packaged_model()                  btp/assets/models/btp-geo-4k.onnx (the default model, exported)
    packaged_model(suffix=".safetensors")   its weights (what btp-export reads)
    asset("models/learned-baseline.txt")    any file under btp/assets
    shapes_dir(None)                  $BTP_SHAPES, else an error naming --shapes

Environment variables:
    BTP_MODELS   a folder searched for ``<name>.safetensors`` before the package's own models
    BTP_SHAPES   the meshes + index.json folder (the shared shapes or a `btp data corpus` folder)
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from btp.config import DEFAULT_MODEL_NAME
from btp.errors import BTPError


class LocationError(BTPError, FileNotFoundError):
    """A file or folder btp needs is not where it looked; the message says where to point it."""


def asset(relative: str) -> Path:
    """The path of ``btp/assets/<relative>`` in the installed package (it may not exist)."""
    root = resources.files("btp").joinpath("assets")
    if not isinstance(root, Path):  # a zipped install: the assets have no file path to hand out
        raise LocationError(f"btp is installed as a zip ({root}); install it unpacked (pip install) to use "
                            "its packaged models and assets")
    return root.joinpath(*relative.split("/"))


def packaged_model(name: str = DEFAULT_MODEL_NAME, suffix: str = ".onnx") -> Path | None:
    """``btp/assets/models/<name><suffix>`` when the package carries it, else None."""
    path = asset(f"models/{name}{suffix}")
    return path if path.is_file() else None


def model_search_paths(name: str) -> list[Path]:
    """Where a named model's weights are looked for, in order: $BTP_MODELS/<name>.safetensors, then
    the package's own btp/assets/models/<name>.safetensors."""
    paths = []
    if os.environ.get("BTP_MODELS"):
        paths.append(Path(os.environ["BTP_MODELS"]) / f"{name}.safetensors")
    paths.append(asset(f"models/{name}.safetensors"))
    return paths


def shapes_dir(given: str | Path | None = None, *, flag: str = "--shapes") -> Path:
    """``given``, else $BTP_SHAPES; neither: LocationError naming ``flag`` and BTP_SHAPES."""
    if given is not None and str(given):
        return Path(given)
    env = os.environ.get("BTP_SHAPES")
    if env:
        return Path(env)
    raise LocationError(f"no shapes folder: pass {flag} DIR (meshes + index.json, e.g. the shared shapes or a "
                        "`btp data corpus` folder) or set BTP_SHAPES=DIR")
