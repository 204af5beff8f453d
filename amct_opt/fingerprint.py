"""Fingerprints that say whether stored calibration, ranking and trials still apply."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

__all__ = ["model_fingerprint", "combine"]


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's state dict: names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            t = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def combine(*parts: Any) -> str:
    """One short fingerprint of several parts (strings or reprs)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(str(part).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]
