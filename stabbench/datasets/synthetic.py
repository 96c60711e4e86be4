"""synthetic: x ~ N(0, I), labels from a fixed random teacher network (learnable structure,
no files). Generated from `dataset.seed`, so every model seed sees the same task."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stabbench.datasets import Data, DatasetConfig, Dimensions


@dataclass
class Config(DatasetConfig):
    name: str = "synthetic"
    features: int = 64
    classes: int = 10
    n_train: int = 8192
    n_test: int = 2048
    teacher_width: int = 64


def validate(cfg) -> None:
    from stabbench.errors import check_range

    for key in ("features", "n_train", "n_test", "teacher_width"):
        check_range(f"dataset.{key}", cfg[key], low=1)
    check_range("dataset.classes", cfg.classes, low=2)  # one class leaves nothing to learn


def dimensions(cfg) -> Dimensions:
    teacher = cfg.features * cfg.teacher_width + cfg.teacher_width * cfg.classes
    return Dimensions(cfg.features, cfg.classes, cfg.n_train, cfg.n_test, loader_floats=teacher)


def load(cfg) -> Data:
    generator = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n_train + cfg.n_test
    x = torch.randn(n, cfg.features, generator=generator)
    # A one-hidden-layer tanh teacher: labels depend nonlinearly on every input feature.
    w1 = torch.randn(cfg.features, cfg.teacher_width, generator=generator) * (2.0 / cfg.features) ** 0.5
    w2 = torch.randn(cfg.teacher_width, cfg.classes, generator=generator)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    return Data(x[: cfg.n_train], y[: cfg.n_train], x[cfg.n_train:], y[cfg.n_train:], "classification", cfg.classes)
