"""baseline: x_l = phi(W_l x_{l-1} + b_l), a plain deep MLP (../shared/methods.md, section 1).

Options: method.activation (default tanh, the seed article's plain network),
method.init = torch | xavier | he | lecun | orthogonal (method.gain), biases 0, and
method.norm = none | batch | layer: BatchNorm1d or LayerNorm between every hidden layer's
product and its activation (docs/methods/normalisation.md), the reference every SNN/BSNN
paper compares against. With none the network is exactly the plain one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from stabbench.methods.base import Method, MethodConfig, Shape, check_choice, linear
from stabbench.model import MLP, NORMS, Activation, init_gain, normalize_hidden

INITS = ("torch", "xavier", "he", "lecun", "orthogonal")


@dataclass
class Config(MethodConfig):
    name: str = "baseline"
    norm: str = "none"  # none | batch | layer, before every hidden activation


def init_weight(weight: torch.Tensor, scheme: str, activation: str, negative_slope: float, gain: float) -> None:
    """Initialise one weight matrix in place by the named scheme."""
    fan_in = weight.shape[1]
    with torch.no_grad():
        if scheme == "torch":
            return  # what nn.Linear already drew
        if scheme == "xavier":
            nn.init.xavier_normal_(weight)
        elif scheme == "he":
            weight.normal_(0.0, init_gain(activation, negative_slope) / math.sqrt(fan_in))
        elif scheme == "lecun":
            weight.normal_(0.0, 1.0 / math.sqrt(fan_in))
        elif scheme == "orthogonal":
            nn.init.orthogonal_(weight, gain=gain)
        else:
            raise ValueError(scheme)


class Baseline(Method):
    Config = Config

    def validate(self) -> None:
        super().validate()
        check_choice("method.init", self.cfg.init, INITS)
        check_choice("method.norm", self.cfg.norm, NORMS)

    def build(self, shape: Shape) -> MLP:
        cfg = self.cfg
        sizes = [shape.in_features] + [shape.width] * shape.depth + [shape.out_features]
        layers = [linear(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        for layer in layers:
            init_weight(layer.weight, cfg.init, cfg.activation, cfg.negative_slope, cfg.gain)
            if cfg.init != "torch":
                nn.init.zeros_(layer.bias)
        return MLP(normalize_hidden(layers, cfg.norm, shape.width), Activation(cfg.activation, cfg.negative_slope))

    def constants(self, model: MLP) -> dict:
        return {"init": self.cfg.init, "norm": self.cfg.norm,
                "weight_std": [float(layer.weight.std()) for layer in model.layers[:2]]}


METHOD = Baseline
