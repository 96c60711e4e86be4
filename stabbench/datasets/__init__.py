"""Datasets, each loaded once into tensors on the run's device (no DataLoader in the loop).

A dataset module defines `Config` (its options under `dataset.*`),
`load(cfg) -> Data` returning raw float32 CPU tensors, and `dimensions(cfg) -> Dimensions`
(the sizes `load` will return, known without loading: the memory estimate's input); `prepare`
below does what every dataset shares: the validation split held out of the training split
(`dataset.validation`), the stratified `dataset.fraction` of each of the two, per-feature standardisation with
training-split statistics, and the move to the device.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Optional

import torch

from stabbench.errors import UserError

NAMES = ("synthetic", "synthetic_regression", "mnist", "fashion_mnist", "cifar10")


@dataclass
class DatasetConfig:
    name: str = "synthetic"
    root: Optional[str] = None  # folder holding the files; None = the dataset's default place
    download: bool = False
    # Held out of the training split (stratified for classification); `fraction` then keeps the
    # same share of both, so selection never sees more examples than training. Evaluated every epoch. The tuning protocol (docs/tuning.md) selects on it, never on the test
    # split. 0.1: Fashion-MNIST's 6,000 examples measure accuracy to about +-0.5%, finer than the
    # gaps between learning rates of a grid, at 10% of the training data.
    validation: float = 0.1
    fraction: float = 1.0  # stratified fraction of the training and validation splits kept (data-scarce runs)
    standardize: bool = True  # zero mean, unit variance per feature, training-split statistics
    seed: int = 0  # data generation and the fraction's subset; fixed so model seeds share one task


@dataclass
class Data:
    x_train: torch.Tensor  # [n, features] float32
    y_train: torch.Tensor  # [n] int64 labels, or [n, outputs] float32 targets
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str  # "classification" | "regression"
    n_outputs: int
    x_val: torch.Tensor | None = None  # held out of the training split by `prepare`; None: no validation split
    y_val: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.x_train.shape[1]


@dataclass
class Dimensions:
    """A dataset's sizes before `dataset.fraction`, known from its config alone."""
    in_features: int
    n_outputs: int
    n_train: int
    n_test: int
    task: str = "classification"
    loader_floats: int = 0  # what the loader allocates besides the splits (a synthetic task's teacher)


REGISTRY = {name: importlib.import_module(f"{__name__}.{name}") for name in NAMES}


def load(cfg, device: torch.device) -> Data:
    if cfg.name not in REGISTRY:
        raise UserError(f"dataset={cfg.name!r} is unknown; choose one of: {', '.join(NAMES)}")
    return prepare(REGISTRY[cfg.name].load(cfg), cfg, device)


def selected_on(name: str) -> str:
    """The score the tuning protocol chooses a learning rate by for this dataset: its module's
    `SELECTED_ON`, "validation" (the default: validation accuracy, or loss for regression) or
    "train_loss" (a memorisation task, where fitting the training set is the point)."""
    return getattr(REGISTRY.get(name), "SELECTED_ON", "validation")


def validate(cfg) -> None:
    """The dataset's own options, checked by its module's `validate(cfg)` if it has one
    (raises UserError); before any directory is made."""
    check = getattr(REGISTRY[cfg.name], "validate", None)
    if check is not None:
        check(cfg)


def dimensions(cfg) -> Dimensions:
    return REGISTRY[cfg.name].dimensions(cfg)


def prepare(data: Data, cfg, device: torch.device) -> Data:
    if cfg.validation > 0:
        held_out = stratified_subset(data.y_train if data.task == "classification" else None,
                                     len(data.x_train), cfg.validation, cfg.seed, at_least_one=False)
        if len(held_out):
            rest = torch.ones(len(data.x_train), dtype=torch.bool)
            rest[held_out] = False
            if not rest.any():
                raise UserError(f"dataset.validation={cfg.validation} leaves no training examples "
                                f"(the training split has {len(data.x_train)}); use a smaller fraction or 0")
            data = replace(data, x_val=data.x_train[held_out], y_val=data.y_train[held_out],
                           x_train=data.x_train[rest], y_train=data.y_train[rest])
    if cfg.fraction < 1.0:  # of both splits: selection never sees more examples than training does
        labels = lambda y: y if data.task == "classification" else None
        keep = stratified_subset(labels(data.y_train), len(data.x_train), cfg.fraction, cfg.seed)
        data = replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])
        if data.x_val is not None:
            keep = stratified_subset(labels(data.y_val), len(data.x_val), cfg.fraction, cfg.seed)
            data = replace(data, x_val=data.x_val[keep], y_val=data.y_val[keep])
    if cfg.standardize:
        mean = data.x_train.mean(0)
        # Constant features (MNIST's border pixels) have std 0: leave them centred, unscaled.
        std = data.x_train.std(0).clamp_min(1e-6).where(data.x_train.std(0) > 1e-6, torch.ones(()))
        data = replace(data, x_train=(data.x_train - mean) / std, x_test=(data.x_test - mean) / std,
                       x_val=None if data.x_val is None else (data.x_val - mean) / std)
    return replace(data, **{k: getattr(data, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test",
                                                                      "x_val", "y_val") if getattr(data, k) is not None})


def stratified_subset(labels: Optional[torch.Tensor], n: int, fraction: float, seed: int,
                      at_least_one: bool = True) -> torch.Tensor:
    """Indices of about `fraction` of n examples, the same fraction of each class (>= 1 each
    if at_least_one; else a class too small for its share gives none)."""
    generator = torch.Generator().manual_seed(seed)
    least = 1 if at_least_one else 0
    if labels is None:
        return torch.randperm(n, generator=generator)[: max(least, round(n * fraction))].sort().values
    keep = []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        count = max(least, round(len(members) * fraction))
        keep.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(keep).sort().values
