"""synthetic_regression: x ~ N(0, I) inputs and independent N(0, 1) targets, the BSNN
paper's synthetic setting (a memorisation task that exposes gradient flow), MSE loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stabbench.datasets import Data, DatasetConfig, Dimensions

# The targets are noise: nothing generalises, and a validation loss would reward the lr that
# fits least. The tuning protocol selects on the training loss instead (docs/tuning.md).
SELECTED_ON = "train_loss"


@dataclass
class Config(DatasetConfig):
    name: str = "synthetic_regression"
    features: int = 64
    outputs: int = 10
    n_train: int = 4096
    n_test: int = 1024


def validate(cfg) -> None:
    from stabbench.errors import check_range

    for key in ("features", "outputs", "n_train", "n_test"):
        check_range(f"dataset.{key}", cfg[key], low=1)


def dimensions(cfg) -> Dimensions:
    return Dimensions(cfg.features, cfg.outputs, cfg.n_train, cfg.n_test, "regression")


def load(cfg) -> Data:
    generator = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n_train + cfg.n_test
    x = torch.randn(n, cfg.features, generator=generator)
    y = torch.randn(n, cfg.outputs, generator=generator)
    return Data(x[: cfg.n_train], y[: cfg.n_train], x[cfg.n_train:], y[cfg.n_train:], "regression", cfg.outputs)
