"""The interface between the runner and a method. The runner calls only these; it never
tests a method's name. A method module defines a `Config` dataclass (its options, under
`method.*`), a `Method` subclass, and registers it by setting `METHOD = <the class>`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from stabbench.errors import UserError, check_choice, check_range
from stabbench.model import ACTIVATIONS, MLP, Linear


@dataclass
class MethodConfig:
    name: str = "baseline"
    activation: str = "tanh"
    negative_slope: float = 0.01  # leaky_relu only
    init: str = "xavier"
    gain: float = 1.0  # orthogonal init only
    alpha_dropout: float = 0.0  # only methods that use it (snn)


@dataclass
class Shape:
    in_features: int
    out_features: int
    depth: int
    width: int
    task: str = "classification"  # or "regression": what the outputs are trained for


@dataclass
class MeanFieldSpec:
    """What the mean-field theory of signal propagation (Poole et al. 2016; Schoenholz et al.
    2017; docs/theory.md) needs to know of a method's network at initialisation: the weight
    and bias variances in its terms, sigma_w^2 = fan_in * Var(W_ij) and sigma_b^2 = Var(b_i),
    of the square hidden layers and of layer 1 (inputs -> width). The activation is taken
    from the built network itself. `weight_var` None: the theory does not describe this
    method's network, and `note` says why; otherwise `note` says where it is only approximate."""
    weight_var: float | None = None
    bias_var: float = 0.0
    input_weight_var: float | None = None
    input_bias_var: float = 0.0
    weights: str = "gaussian"  # gaussian | uniform | orthogonal: the distribution the variances are of
    note: str = ""

    @property
    def applies(self) -> bool:
        return self.weight_var is not None


@dataclass
class Stage:
    """One network trained to the end. Most methods train a single stage of `depth`;
    a staged method (SAL) returns several, each later one guided by the one before."""
    depth: int
    epochs: int
    index: int = 0
    guided: bool = False  # trained with the previous stage's network as a frozen guide
    extra: dict = field(default_factory=dict)


class Method:
    Config = MethodConfig
    uses_alpha_dropout = False  # a method whose network applies method.alpha_dropout says so

    def __init__(self, cfg):
        self.cfg = cfg

    # -- building ---------------------------------------------------------------------
    def build(self, shape: Shape) -> MLP:
        """One network at its initialisation. Called under torch.manual_seed(seed)."""
        raise NotImplementedError

    def validate(self) -> None:
        """Raise UserError naming any bad option and what is allowed."""
        check_choice("method.activation", self.cfg.activation, ACTIVATIONS)
        self.check_shared_options()

    def check_shared_options(self) -> None:
        """The options every method's config has: numbers finite even where this method's
        network does not read them, and no alpha dropout that nothing would apply."""
        for key in ("negative_slope", "gain"):
            if self.cfg.get(key) is not None:
                check_range(f"method.{key}", self.cfg[key])
        if not self.uses_alpha_dropout and self.cfg.get("alpha_dropout") not in (None, 0):
            raise UserError(f"method.alpha_dropout={self.cfg.alpha_dropout} is for method=snn only; allowed here: 0")

    def validate_run(self, cfg) -> None:
        """Checks of the method's options against the whole run config (e.g. a schedule
        against `depth`); called before any directory is made, for every sweep point."""

    # -- training schedule ------------------------------------------------------------
    def stages(self, depth: int, epochs: int) -> list[Stage]:
        return [Stage(depth=depth, epochs=epochs)]

    def warm_start(self, student, guide, stage: Stage) -> None:
        """Optionally copy weights from the previous stage's networks (both are Ensembles)."""

    def guidance_losses(self, student: dict, guide: dict, stage: Stage) -> dict[str, torch.Tensor]:
        """Extra loss terms for a guided stage, from both networks' forward outputs
        (`logits`, `hidden`). Each value is a scalar for one network (called under vmap)."""
        return {}

    # -- reporting --------------------------------------------------------------------
    def constants(self, model: MLP) -> dict:
        """The method's derived constants for probe.json (e.g. GPN's a and b)."""
        return {}

    def mean_field(self, shape: Shape) -> MeanFieldSpec:
        """The weight and bias variances the mean-field theory should use for this method's
        network of `shape` (probe.json's `mean_field` block, the report's phase diagram)."""
        return MeanFieldSpec(note=f"method={self.cfg.name} does not declare its weight and bias variances "
                                  "to the mean-field theory")


def linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    return Linear(in_features, out_features, bias=bias)
