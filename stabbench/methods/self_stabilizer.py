"""self_stabilizer: x_l = phi(beta_l * (W_l x_{l-1}) + b_l), one learnable scalar beta_l per
layer (Ghahremani & Droppo, "Self-stabilized deep neural network", ICASSP 2016;
docs/methods/self_stabilizer.md).

Options: method.parametrization = exp (beta = exp(B), B = 0 at init; the paper's) |
softplus (beta = softplus(s p) / s, CNTK's Stabilizer, s = method.steepness, default 4);
method.output_layer (default true: the output layer gets its own beta too); method.norm =
none | batch | layer as the baseline's, after beta W x + b (batch norm divides a hidden
layer's beta out again, up to its eps; layer norm nearly so while the biases are small). The
network underneath is the baseline's (method.activation, method.init, method.gain, or
method.weight_var and method.bias_var in their place) and is drawn in the same order, so with
beta = 1 at init the same seed gives the same
outputs. Every layer reports its beta, which lands in layers.csv column `beta`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from stabbench import fast
from typing import Optional

from stabbench.methods.base import MeanFieldSpec, Method, MethodConfig, Shape, linear
from stabbench.errors import check_choice, check_range
from stabbench.methods.baseline import INITS, init_layer, init_name, mean_field_spec, validate_variances
from stabbench.model import MLP, NORMS, Activation, NormalizedLayer, normalize_hidden

PARAMETRIZATIONS = ("exp", "softplus")


@dataclass
class Config(MethodConfig):
    name: str = "self_stabilizer"
    parametrization: str = "exp"  # exp | softplus
    steepness: float = 4.0  # softplus only
    output_layer: bool = True  # a beta for the output layer too
    weight_var: Optional[float] = None  # as baseline's: W ~ N(0, sigma_w^2 / fan_in), in place of init
    bias_var: Optional[float] = None  # as baseline's: b ~ N(0, sigma_b^2), in place of zeros
    norm: str = "none"  # none | batch | layer, before every hidden activation


def softplus_param_for_unit_beta(steepness: float) -> float:
    """p with softplus(s p) / s == 1 exactly in float32: ln(e^s - 1) / s (0.99537863 for s = 4),
    nudged by an ulp or two when rounding would otherwise leave beta a hair off 1, so that the
    stabilized network starts bit-identical to the plain one."""
    exact = math.log(math.expm1(steepness)) / steepness
    start = torch.tensor(exact, dtype=torch.float32)
    candidates = [start]
    up, down = start, start
    for _ in range(4):
        up, down = torch.nextafter(up, torch.tensor(math.inf)), torch.nextafter(down, torch.tensor(-math.inf))
        candidates += [up, down]
    for p in candidates:
        if F.softplus(p, beta=steepness).item() == 1.0:
            return p.item()
    return exact


class StabilizedLinear(nn.Module):
    """h = beta * (W x) + b, computed as (beta W) x + b: the same product, and with beta = 1
    the very same kernel call as nn.Linear. `.weight` is the effective matrix beta * W."""

    stacked_seeds = True  # beta [E] scales its own seed's [out, in] matrix

    def __init__(self, in_features: int, out_features: int, parametrization: str, steepness: float):
        super().__init__()
        plain = nn.Linear(in_features, out_features)  # draws W and b exactly as the baseline's layer does
        self.unscaled_weight = plain.weight
        self.bias = plain.bias
        self.parametrization, self.steepness = parametrization, steepness
        # B_l (exp) or p_l (softplus); either gives beta_l = 1 at init.
        start = 0.0 if parametrization == "exp" else softplus_param_for_unit_beta(steepness)
        self.beta_param = nn.Parameter(torch.tensor(start))

    @property
    def beta(self) -> torch.Tensor:
        if self.parametrization == "exp":
            return self.beta_param.exp()
        return F.softplus(self.beta_param, beta=self.steepness)  # log(1 + exp(s p)) / s

    @property
    def weight(self) -> torch.Tensor:
        return self.beta[..., None, None] * self.unscaled_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast.linear(x, self.weight, self.bias)

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return {"beta": self.beta}

    def extra_repr(self) -> str:
        out_features, in_features = self.unscaled_weight.shape
        return f"{in_features}, {out_features}, beta={self.parametrization}" + (
            f"(steepness={self.steepness:g})" if self.parametrization == "softplus" else "")


def unnormalized(layer: nn.Module) -> nn.Module:
    """The weight layer itself, inside a NormalizedLayer or not."""
    return layer.linear if isinstance(layer, NormalizedLayer) else layer


class SelfStabilizer(Method):
    Config = Config

    def validate(self) -> None:
        super().validate()
        cfg = self.cfg
        check_choice("method.init", cfg.init, INITS)
        check_choice("method.parametrization", cfg.parametrization, PARAMETRIZATIONS)
        check_choice("method.norm", cfg.norm, NORMS)
        check_range("method.steepness", cfg.steepness, low=0, low_open=True)
        validate_variances(cfg)

    def build(self, shape: Shape) -> MLP:
        cfg = self.cfg
        sizes = [shape.in_features] + [shape.width] * shape.depth + [shape.out_features]
        pairs = list(zip(sizes[:-1], sizes[1:]))
        layers = [StabilizedLinear(n_in, n_out, cfg.parametrization, cfg.steepness) for n_in, n_out in pairs[:-1]]
        layers.append(StabilizedLinear(*pairs[-1], cfg.parametrization, cfg.steepness) if cfg.output_layer
                      else linear(*pairs[-1]))
        # Same order of draws as baseline.build: every layer's nn.Linear draw, then each init.
        for layer in layers:
            init_layer(layer.unscaled_weight if isinstance(layer, StabilizedLinear) else layer.weight, layer.bias, cfg)
        return MLP(normalize_hidden(layers, cfg.norm, shape.width), Activation(cfg.activation, cfg.negative_slope))

    @torch.no_grad()
    def constants(self, model: MLP) -> dict:
        return {
            "init": init_name(self.cfg),
            "parametrization": self.cfg.parametrization,
            "norm": self.cfg.norm,
            "beta": [layer.beta.item() for layer in map(unnormalized, model.layers) if isinstance(layer, StabilizedLinear)],
            "weight_std": [layer.weight.std().item() for layer in model.layers[:2]],
        }

    def mean_field(self, shape: Shape) -> MeanFieldSpec:
        return mean_field_spec(self.cfg, shape)  # beta = 1 at init: the baseline's network


METHOD = SelfStabilizer
