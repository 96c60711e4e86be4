"""baseline: x_l = phi(W_l x_{l-1} + b_l), a plain deep MLP (docs/methods/baseline.md).

Options: method.activation (default tanh, the seed article's plain network),
method.init = torch | xavier | he | lecun | orthogonal (method.gain), biases 0; or the
mean-field theory's parametrization (Poole et al. 2016; Schoenholz et al. 2017, docs/theory.md):
method.weight_var = sigma_w^2 draws every W ~ N(0, sigma_w^2 / fan_in) in place of method.init,
method.bias_var = sigma_b^2 draws every b ~ N(0, sigma_b^2) in place of zeros.
method.norm = none | batch | layer: BatchNorm1d or LayerNorm between every hidden layer's
product and its activation (docs/methods/normalisation.md), the reference every SNN/BSNN
paper compares against. With none the network is exactly the plain one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from stabbench.methods.base import MeanFieldSpec, Method, MethodConfig, Shape, linear
from stabbench.errors import check_choice, check_range
from stabbench.model import MLP, NORMS, Activation, init_gain, normalize_hidden

INITS = ("torch", "xavier", "he", "lecun", "orthogonal")


@dataclass
class Config(MethodConfig):
    name: str = "baseline"
    weight_var: Optional[float] = None  # sigma_w^2: W ~ N(0, sigma_w^2 / fan_in), in place of init
    bias_var: Optional[float] = None  # sigma_b^2: b ~ N(0, sigma_b^2), in place of zeros
    norm: str = "none"  # none | batch | layer, before every hidden activation


def validate_variances(cfg) -> None:
    """method.weight_var > 0 and method.bias_var >= 0 when set (baseline and self_stabilizer)."""
    if cfg.weight_var is not None:
        check_range("method.weight_var", cfg.weight_var, low=0, low_open=True)
    if cfg.bias_var is not None:
        check_range("method.bias_var", cfg.bias_var, low=0)


def init_layer(weight: torch.Tensor, bias: torch.Tensor | None, cfg) -> None:
    """One layer's weights and bias in place: N(0, weight_var / fan_in) and N(0, bias_var)
    when those are set, else method.init's scheme (biases 0 unless init=torch)."""
    with torch.no_grad():
        if cfg.weight_var is not None:
            weight.normal_(0.0, math.sqrt(cfg.weight_var / weight.shape[1]))
        else:
            init_weight(weight, cfg.init, cfg.activation, cfg.negative_slope, cfg.gain)
        if bias is None:
            return
        if cfg.bias_var is not None:
            bias.normal_(0.0, math.sqrt(cfg.bias_var))
        elif cfg.init != "torch" or cfg.weight_var is not None:
            bias.zero_()


def init_variances(cfg, fan_in: int, fan_out: int) -> tuple[float, float, str]:
    """(sigma_w^2, sigma_b^2, distribution) of one layer as built by init_layer, in the
    mean-field theory's terms: fan_in * Var(W_ij) and Var(b_i)."""
    bias_var = cfg.bias_var if cfg.bias_var is not None else 0.0
    if cfg.weight_var is not None:
        return cfg.weight_var, bias_var, "gaussian"
    scheme = cfg.init
    if scheme == "torch":  # nn.Linear's own: U(+-1/sqrt(fan_in)) for weights and biases alike
        return 1.0 / 3.0, bias_var if cfg.bias_var is not None else 1.0 / (3.0 * fan_in), "uniform"
    if scheme == "xavier":
        return 2.0 * fan_in / (fan_in + fan_out), bias_var, "gaussian"
    if scheme == "he":
        return init_gain(cfg.activation, cfg.negative_slope) ** 2, bias_var, "gaussian"
    if scheme == "lecun":
        return 1.0, bias_var, "gaussian"
    # orthogonal: entries of variance 1/max(fan_in, fan_out) (orthonormal rows or columns)
    return cfg.gain ** 2 * fan_in / max(fan_in, fan_out), bias_var, "orthogonal"


def mean_field_spec(cfg, shape: Shape) -> MeanFieldSpec:
    """The theory's sigma_w^2, sigma_b^2 for baseline-built networks (baseline, self_stabilizer)."""
    if cfg.norm != "none":
        return MeanFieldSpec(note=f"method.norm={cfg.norm} renormalises every pre-activation: "
                                  "the length and correlation maps do not describe it")
    weight_var, bias_var, weights = init_variances(cfg, shape.width, shape.width)
    input_weight_var, input_bias_var, _ = init_variances(cfg, shape.in_features, shape.width)
    notes = {
        "uniform": "nn.Linear's uniform weights and biases: at large width only their variances matter",
        "orthogonal": "orthogonal weights: the length and correlation maps are those of Gaussian weights "
                      "of the same variance at large width; the Jacobian spectrum is not",
    }
    return MeanFieldSpec(weight_var=weight_var, bias_var=bias_var, input_weight_var=input_weight_var,
                         input_bias_var=input_bias_var, weights=weights, note=notes.get(weights, ""))


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
        validate_variances(self.cfg)
        check_choice("method.norm", self.cfg.norm, NORMS)

    def build(self, shape: Shape) -> MLP:
        cfg = self.cfg
        sizes = [shape.in_features] + [shape.width] * shape.depth + [shape.out_features]
        layers = [linear(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        for layer in layers:
            init_layer(layer.weight, layer.bias, cfg)
        return MLP(normalize_hidden(layers, cfg.norm, shape.width), Activation(cfg.activation, cfg.negative_slope))

    def constants(self, model: MLP) -> dict:
        return {"init": init_name(self.cfg), "norm": self.cfg.norm,
                "weight_std": [float(layer.weight.std()) for layer in model.layers[:2]]}

    def mean_field(self, shape: Shape) -> MeanFieldSpec:
        return mean_field_spec(self.cfg, shape)


def init_name(cfg) -> str:
    if cfg.weight_var is None:
        return cfg.init
    return f"N(0, {cfg.weight_var:g}/fan_in), biases N(0, {cfg.bias_var or 0:g})"


METHOD = Baseline
