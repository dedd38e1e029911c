"""Silence library warnings that are noise on this project's setups (torchvision-less CPU machines)."""

from __future__ import annotations

import logging

_NOISE = ("requires torchvision", "`torch_dtype` is deprecated")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in _NOISE)


def quiet_library_warnings() -> None:
    """Drop transformers' 'requires torchvision' fallback notices (we never use torchvision backends)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    root = hf_logging._get_library_root_logger()
    for h in root.handlers:
        if not any(isinstance(f, _DropNoise) for f in h.filters):
            h.addFilter(_DropNoise())
