"""The configuration schema. Hydra composes conf/*.yaml on top of these dataclasses, so a
typo'd key or a wrong type fails at start-up instead of being silently ignored.

Method and dataset schemas live beside their code (stabbench/methods/*.py,
stabbench/datasets/*.py) and are registered here under `<group>/<name>_schema`; each
conf/<group>/<name>.yaml lists that schema first in its defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from stabbench.errors import UserError


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam
    momentum: float = 0.9  # sgd only
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam only
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class TrainerConfig:
    # Speed switches; see stabbench/fast.py for what each buys.
    cuda_graph: str = "auto"  # auto | on | off
    tf32: bool = False
    eval_batch_size: int = 1024


@dataclass
class ProbeConfig:
    networks: int = 16  # independent draws of the network
    batch_size: int = 64  # 64 x width values per layer: ample for the statistics, 4x cheaper than 256
    error: str = "loss"  # loss: the task loss's, through the output layer | gaussian: N(0, I) at the last hidden layer
    jacobian_examples: int = 2  # inputs per draw whose deep Jacobian d x_depth / d x_1 is computed; 0: none


@dataclass
class BenchConfig:
    steps: int = 61  # steps per turn: timed between log steps, from the second one on (61: 5 stretches of 10)
    repeats: int = 7  # turns of each loop, taken alternately
    reference: bool = True  # also time the tutorial-style reference loop


@dataclass
class Config:
    method: Any = MISSING
    dataset: Any = MISSING
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    depth: int = 20  # hidden layers
    width: int = 128
    seed: int = 0
    seeds: int = 1  # seeds seed..seed+seeds-1 train together as one batched model
    device: str = "auto"  # auto | cpu | cuda
    epochs: int = 10
    max_steps: Optional[int] = None  # cap on optimiser steps (per stage)
    batch_size: int = 128
    lr: float = 0.01
    # A learning-rate grid trained as one batched model: len(lrs) x seeds members, each an
    # (lr, seed) pair (lr_grid.py); null: every member trains with `lr`.
    lrs: Optional[list[float]] = None
    log_every: int = 10  # steps between train rows in metrics.csv / layers.csv
    checkpoint_every: int = 0  # steps; 0 = only on preemption signals
    skip_done: bool = True  # a rerun finds a complete summary.json with the same config and does nothing
    # A member whose train loss ends beyond explode_factor x its initial loss (or whose hidden
    # gradients are all exactly 0 with no progress) is "exploded": finite, yet not trained.
    explode_factor: float = 100.0


def register_schemas() -> None:
    """Register every schema with Hydra's ConfigStore (idempotent)."""
    from stabbench import datasets, methods

    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    store.store(group="optimizer", name="optimizer_schema", node=OptimizerConfig)
    for name, method_class in methods.REGISTRY.items():
        store.store(group="method", name=f"{name}_schema", node=method_class.Config)
    for name, dataset_module in datasets.REGISTRY.items():
        store.store(group="dataset", name=f"{name}_schema", node=dataset_module.Config)


SEED_MAX = 2 ** 32 - 1


def validate(cfg) -> None:
    """Range and choice checks Hydra's types cannot express; raises UserError naming the
    bad value and what is allowed. Runs before any run directory is made."""
    from stabbench import datasets, devices, lr_grid, methods
    from stabbench.errors import check_choice, check_range

    for key in ("depth", "width", "batch_size", "epochs", "seeds", "log_every"):
        check_range(key, cfg[key], low=1)
    # torch seeds generators with 64-bit integers, and the data order's with seed x 1,000,003:
    # 32-bit seeds keep every derived seed in range.
    check_range("seed", cfg.seed, low=0, high=SEED_MAX)
    check_range("seed + seeds - 1", cfg.seed + cfg.seeds - 1, high=SEED_MAX)
    check_range("seed + probe.networks - 1", cfg.seed + cfg.probe.networks - 1, high=SEED_MAX)
    check_range("dataset.seed", cfg.dataset.seed, low=0, high=SEED_MAX)
    if cfg.max_steps is not None:
        check_range("max_steps", cfg.max_steps, low=1)
    check_range("checkpoint_every", cfg.checkpoint_every, low=0)
    check_range("lr", cfg.lr, low=0, low_open=True)
    check_range("explode_factor", cfg.explode_factor, low=1, low_open=True)
    lr_grid.validate(cfg)
    devices.resolve(cfg.device)  # a name not allowed, or cuda without CUDA
    check_optimizer(cfg.optimizer)
    check_choice("trainer.cuda_graph", cfg.trainer.cuda_graph, ("auto", "on", "off"))
    if cfg.trainer.cuda_graph == "on" and devices.device_type(cfg.device) != "cuda":
        raise UserError(f"trainer.cuda_graph=on needs CUDA (device={cfg.device}); use trainer.cuda_graph=auto or off")
    check_range("trainer.eval_batch_size", cfg.trainer.eval_batch_size, low=1)
    check_range("probe.networks", cfg.probe.networks, low=1)
    check_range("probe.batch_size", cfg.probe.batch_size, low=1)
    check_choice("probe.error", cfg.probe.error, ("loss", "gaussian"))
    check_range("probe.jacobian_examples", cfg.probe.jacobian_examples, low=0, high=cfg.probe.batch_size)
    check_range("bench.steps", cfg.bench.steps, low=1)
    check_range("bench.repeats", cfg.bench.repeats, low=1)
    check_choice("dataset", cfg.dataset.name, datasets.NAMES)
    check_schema_keys(cfg)
    check_range("dataset.fraction", cfg.dataset.fraction, low=0, high=1, low_open=True)
    check_range("dataset.validation", cfg.dataset.validation, low=0, high=1, high_open=True)
    datasets.validate(cfg.dataset)
    methods.create(cfg.method).validate_run(cfg)


def check_optimizer(opt) -> None:
    """Every optimiser option, with the others, as torch.optim would check it once the run
    directory exists (SGD: momentum, nesterov; Adam: betas, eps), and the options that
    would silently do nothing under the chosen optimiser."""
    from stabbench.errors import check_choice, check_range

    check_choice("optimizer", opt.name, ("sgd", "adam"))
    check_range("optimizer.momentum", opt.momentum, low=0, high=1, high_open=True)
    check_range("optimizer.weight_decay", opt.weight_decay, low=0)
    check_range("optimizer.eps", opt.eps, low=0, low_open=True)
    if len(opt.betas) != 2:
        raise UserError(f"optimizer.betas={list(opt.betas)} must be two numbers [beta1, beta2], each >= 0 and < 1")
    for index, beta in enumerate(opt.betas):
        check_range(f"optimizer.betas[{index}]", beta, low=0, high=1, high_open=True)
    if opt.name == "sgd" and opt.nesterov and opt.momentum == 0:
        raise UserError("optimizer.nesterov=true needs optimizer.momentum > 0 (Nesterov momentum without momentum "
                        "is undefined); set optimizer.momentum or optimizer.nesterov=false")
    if opt.name == "adam" and opt.nesterov:
        raise UserError("optimizer.nesterov=true is for optimizer=sgd only; Adam has no Nesterov option here")


def check_schema_keys(cfg) -> None:
    """Keys Hydra lets through but nothing reads: `+foo=1` appends a key even to a
    structured config, and `dataset.name=mnist` renames the synthetic dataset's config
    instead of selecting MNIST's. Both would run something other than what was typed."""
    from dataclasses import fields

    from stabbench import datasets, methods

    def extra(node, schema) -> list[str]:
        return sorted(set(node.keys()) - {f.name for f in fields(schema)})

    unknown = extra(cfg, Config) and [k for k in extra(cfg, Config) if k != "hydra"]
    if unknown:
        raise UserError(f"unknown key {unknown[0]!r}; allowed top-level keys: {', '.join(f.name for f in fields(Config))}")
    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None) or {}  # present before Hydra runs
    for group, registry in (("method", methods.REGISTRY), ("dataset", datasets.REGISTRY)):
        node = cfg[group]
        chosen = choices.get(group)
        if chosen is not None and chosen != node.name:
            raise UserError(f"{group}.name={node.name!r} but {group}={chosen} is selected; "
                            f"choose a {group} with {group}={node.name}, not {group}.name=")
        if node.name not in registry:
            continue
        allowed = {f.name for f in fields(registry[node.name].Config)}
        unknown = sorted(set(node.keys()) - allowed)
        if unknown:
            raise UserError(f"unknown key '{group}.{unknown[0]}' for {group}={node.name}; "
                            f"allowed: {', '.join(sorted(allowed))}")
