"""Where a command computes: `device=auto|cpu|cuda`, resolved in one place for the run, the
probe, the bench, the config check and the memory estimate."""
from __future__ import annotations

import torch

from stabbench.errors import UserError, check_choice

CHOICES = ("auto", "cpu", "cuda")


def device_type(name: str) -> str:
    """"cuda" or "cpu": what `name` means on this machine (auto: CUDA when available)."""
    return "cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu"


def resolve(name: str) -> torch.device:
    """The torch device for `name`; UserError for a name not in CHOICES, or cuda without CUDA."""
    check_choice("device", name, CHOICES)
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available here; use device=cpu or device=auto")
    return torch.device(device_type(name))
