"""DistDiff engine: run diffusers pipelines over a sidecar of torch.distributed rank processes.

Importing this package starts nothing and imports nothing heavy; names are resolved on first use.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "SessionConfig": "config",
    "Device": "config",
    "DType": "config",
    "Offload": "config",
    "DeviceMapPolicy": "config",
    "ModelFiles": "files",
    "WeightStorage": "files",
    "Session": "session",
    "Conditioning": "session",
    "DecodeTiling": "tiled_decode",
    "VaeTiling": "tiled_decode",
    "get_session": "session",
    "shutdown_all": "session",
    "DistDiffError": "errors",
    "ConfigError": "errors",
    "ModelError": "errors",
    "UnsupportedError": "errors",
    "Cancelled": "errors",
    "SidecarError": "errors",
    "RankError": "errors",
    "RankDied": "errors",
    "RankTimeout": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dist_backend' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
