"""Where models live: local paths, Hugging Face ids, and the package's own embedded assets."""

from __future__ import annotations

from pathlib import Path

EMBEDDED_PREFIX = "embedded:"


def assets_dir() -> Path:
    """The folder of assets shipped inside the package (the embedded tiny world)."""
    return Path(__file__).resolve().parent / "assets"


def resolve_path(path: str) -> str:
    """Resolve a recipe path: ``embedded:tiny/lcm`` -> the shipped asset; anything else unchanged.

    Anything else is a local path or a Hugging Face hub id, which the loaders resolve themselves
    (local folder first, then the local Hugging Face cache).
    """
    if path.startswith(EMBEDDED_PREFIX):
        return str(assets_dir() / path[len(EMBEDDED_PREFIX) :].strip("/"))
    return path
