"""FlexLoRA edge client: probe the device, pick a LoRA rank, train locally, exchange updates.

Importing the package is cheap and never imports torch or the server: submodules load on
first attribute access (``edge_client.trainer`` pulls in torch, ``edge_client.wire`` only
numpy and safetensors).
"""
from __future__ import annotations

import importlib

__all__ = ["wire", "resources", "memory", "rank_policy", "trainer", "export", "cli", "data",
           "ClientUpdate", "GlobalFactors", "DecodeLimits", "encode_update", "decode_update",
           "encode_global", "decode_global", "DeviceProfile", "probe", "estimate", "choose_rank",
           "LocalTrainer"]

_SUBMODULES = {"wire", "resources", "memory", "rank_policy", "trainer", "export", "cli", "data", "testing",
               "flower_app"}
_NAMES = {
    "ClientUpdate": "wire", "GlobalFactors": "wire", "DecodeLimits": "wire", "RankSpec": "wire",
    "encode_update": "wire", "decode_update": "wire", "encode_global": "wire",
    "decode_global": "wire", "DeviceProfile": "resources", "probe": "resources",
    "estimate": "memory", "MemoryEstimate": "memory", "choose_rank": "rank_policy",
    "RankChoice": "rank_policy", "LocalTrainer": "trainer", "TrainConfig": "trainer",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
