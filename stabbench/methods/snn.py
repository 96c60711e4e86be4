"""snn: Self-Normalizing Neural Networks (Klambauer et al., NeurIPS 2017, arXiv 1706.02515;
docs/methods/snn.md).

SELU with torch's constants (alpha = 1.6732632..., lambda = 1.0507009...), weights
N(0, 1/fan_in) (LeCun normal), biases 0, and optional alpha dropout after every hidden
activation (method.alpha_dropout, default 0). The inputs are standardised per feature
with training-split statistics by the dataset layer (dataset.standardize, on by default),
as the paper requires for the fixed point (0, 1) to hold from the first layer.

Trap avoided: torch.nn.init.calculate_gain('selu') is 3/4, not the SNN init (with it the
activation std decays to ~0.2 by depth 32). The variance here is exactly 1/fan_in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stabbench.methods.base import MeanFieldSpec, Method, MethodConfig, Shape, linear
from stabbench.errors import check_choice, check_range
from stabbench.methods.baseline import init_weight
from stabbench.model import MLP, Activation


@dataclass
class Config(MethodConfig):
    name: str = "snn"
    activation: str = "selu"  # fixed: the method is SELU (baseline offers selu with other inits)
    init: str = "lecun"  # fixed: N(0, 1/fan_in)
    alpha_dropout: float = 0.0  # rate; the paper recommends 0.05 or 0.10


class SNN(Method):
    Config = Config
    uses_alpha_dropout = True

    def validate(self) -> None:
        super().validate()
        check_choice("method.activation", self.cfg.activation, ("selu",))
        check_choice("method.init", self.cfg.init, ("lecun",))
        check_range("method.alpha_dropout", self.cfg.alpha_dropout, low=0, high=1, high_open=True)

    def build(self, shape: Shape) -> MLP:
        cfg = self.cfg
        sizes = [shape.in_features] + [shape.width] * shape.depth + [shape.out_features]
        layers = [linear(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        for layer in layers:
            init_weight(layer.weight, "lecun", "selu", cfg.negative_slope, cfg.gain)
            nn.init.zeros_(layer.bias)
        dropout = nn.AlphaDropout(cfg.alpha_dropout) if cfg.alpha_dropout > 0 else None
        return MLP(layers, Activation("selu"), dropout=dropout)

    @torch.no_grad()
    def constants(self, model: MLP) -> dict:
        return {
            "init": "lecun",
            "weight_variance_times_fan_in": [(layer.weight.var() * layer.weight.shape[1]).item()
                                             for layer in model.layers[:2]],
            "alpha_dropout": self.cfg.alpha_dropout,
        }

    def mean_field(self, shape: Shape) -> MeanFieldSpec:
        note = "LeCun normal weights N(0, 1/fan_in), biases 0: the theory's own setting (sigma_w^2 = 1, sigma_b^2 = 0)"
        if self.cfg.alpha_dropout > 0:
            note += ("; alpha dropout is outside the theory: the measured q_l and c_l are of the same network "
                     "without it")
        return MeanFieldSpec(weight_var=1.0, bias_var=0.0, input_weight_var=1.0, input_bias_var=0.0, note=note)


METHOD = SNN
