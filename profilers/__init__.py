"""nasprune profilers: real latency of exported sub-networks on torch, ONNX Runtime and TensorRT,
into a resumable per-device profile store (``docs/profiling.md``).

Attributes load lazily: the timing worker and the edge runner import ``profilers.standalone``
without pulling in torch and transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "profile_subnetworks": "profilers.api",
    "choose_subnetworks": "profilers.api",
    "ProfileStore": "profilers.store",
    "Protocol": "profilers.standalone",
    "list_engines": "profilers.base",
    "get_engine": "profilers.base",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'profilers' has no attribute {name!r}")
