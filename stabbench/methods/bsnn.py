"""bsnn: Bidirectionally Self-Normalizing Neural Networks (Lu, Gould, Ajanthan; arXiv
2006.12169; Neural Networks 167, 2023; docs/methods/bsnn.md).

A Gaussian-Poincare normalized (GPN) activation phi = a * phi0 + b, with a and b chosen so
that E[phi(z)^2] = 1 and E[phi'(z)^2] = 1 for z ~ N(0, 1), and orthogonal square hidden
layers without bias. Options: method.activation (phi0, default tanh), method.gpn (default
true; false keeps phi0 itself), method.constraint = rownorm (default, the reference code's:
each unit's incoming weight row is scaled to unit L2 norm at every forward pass) |
orthogonal (W stays exactly orthogonal: torch's orthogonal parametrization, the Cayley
transform of a trained skew matrix times the initial orthogonal matrix) | none, and
method.batch_norm (BatchNorm1d between every hidden layer's product and its activation).
The first (inputs -> width) and output layers are ordinary linear layers with bias,
orthogonally initialised, biases 0, unconstrained.

Here "gelu" is x * sigmoid(1.702 x), the form the published GPN constants are computed for
(other methods' gelu is torch's erf form); the same function is integrated and run.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from stabbench import fast
from stabbench.methods.base import MeanFieldSpec, Method, MethodConfig, Shape, linear
from stabbench.errors import check_choice
from stabbench.model import MLP, Activation, activation_fn, normalize_hidden

CONSTRAINTS = ("rownorm", "orthogonal", "none")


@dataclass
class Config(MethodConfig):
    name: str = "bsnn"
    activation: str = "tanh"
    init: str = "orthogonal"  # fixed: Haar-orthogonal (gain 1)
    gpn: bool = True
    constraint: str = "rownorm"  # rownorm | orthogonal | none (square hidden layers)
    batch_norm: bool = False


def base_activation(name: str, negative_slope: float = 0.01):
    """phi0 as BSNN defines it: the shared activations, except gelu = x * sigmoid(1.702 x)."""
    if name == "gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    return activation_fn(name, negative_slope)


def gaussian_mean(f) -> float:
    """E[f(z)], z ~ N(0, 1), by adaptive quadrature on each side of 0 separately: relu, elu
    and selu have a kink there, and one interval across it costs the third decimal."""
    from scipy import integrate  # here, not at the top: every CLI start imports all methods

    density = lambda z: f(z) * math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return sum(integrate.quad(density, low, high, epsabs=1e-12, epsrel=1e-12, limit=200)[0]
               for low, high in ((-math.inf, 0.0), (0.0, math.inf)))


@functools.lru_cache(maxsize=None)
def gpn_constants(name: str, negative_slope: float = 0.01) -> tuple[float, float]:
    """(a, b) with E[(a phi0 + b)^2] = 1 and E[(a phi0')^2] = 1 under N(0, 1):
    a = 1 / sqrt(E[phi0'^2]), b = -a E[phi0] + s sqrt(a^2 E[phi0]^2 - a^2 E[phi0^2] + 1),
    s = -1 for gelu, +1 otherwise (the paper's choice of root). phi0' by autograd in float64,
    so any activation works without a hand-written derivative."""
    fn = base_activation(name, negative_slope)

    def value(z: float) -> float:
        return fn(torch.tensor(z, dtype=torch.float64)).item()

    def slope(z: float) -> float:
        x = torch.tensor(z, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(fn(x), x)
        return grad.item()

    mean = gaussian_mean(value)
    second_moment = gaussian_mean(lambda z: value(z) ** 2)
    slope_second_moment = gaussian_mean(lambda z: slope(z) ** 2)
    a = 1.0 / math.sqrt(slope_second_moment)
    # >= 0 up to rounding by the Gaussian-Poincare inequality Var(phi0) <= E[phi0'^2].
    radicand = max(a * a * mean * mean - a * a * second_moment + 1.0, 0.0)
    sign = -1.0 if name == "gelu" else 1.0
    b = -a * mean + sign * math.sqrt(radicand)
    return a, b


class GPNActivation(Activation):
    """phi = a * phi0 + b (a = 1, b = 0 when method.gpn=false), with BSNN's phi0."""

    def __init__(self, name: str, negative_slope: float = 0.01, gpn: bool = True):
        a, b = gpn_constants(name, negative_slope) if gpn else (1.0, 0.0)
        super().__init__(name, negative_slope, scale=a, shift=b)
        self.base = base_activation(name, negative_slope)


class RowNormalizedLinear(nn.Module):
    """Bias-free h = W x with W = V / ||V_i|| row by row: each unit's incoming weights have
    unit L2 norm at every forward pass (the reference code's constraint). The trained
    parameter is the raw V; `.weight` is the normalised W. A plain module rather than a
    torch parametrization: the same computation, with less Python per step under vmap
    (~1.5x faster at depth 200 on the CPU)."""

    stacked_seeds = True  # rows along the last dimension: right with a leading seed dimension too

    def __init__(self, initial: torch.Tensor):
        super().__init__()
        self.raw_weight = nn.Parameter(initial.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.raw_weight / self.raw_weight.norm(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.raw_weight.shape[1]}, {self.raw_weight.shape[0]}, rows normalised"


def square_layer(width: int, constraint: str) -> nn.Module:
    # Every constraint starts from the same draw, so one seed gives one initial network.
    layer = linear(width, width, bias=False)
    nn.init.orthogonal_(layer.weight)  # Haar: QR of a Gaussian matrix, signs fixed
    if constraint == "rownorm":
        return RowNormalizedLinear(layer.weight)
    if constraint == "orthogonal":
        # torch's parametrization keeps buffer Q = the initial matrix and trains a skew A:
        # W = Q cayley(A) = Q (I - A/2)^-1 (I + A/2), W = Q at init. Cayley rather than torch's
        # default matrix_exp: same manifold, ~6x cheaper forward + backward on the CPU.
        orthogonal(layer, "weight", orthogonal_map="cayley")
    return layer


def open_layer(in_features: int, out_features: int) -> nn.Linear:
    layer = linear(in_features, out_features)
    nn.init.orthogonal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class BSNN(Method):
    Config = Config

    def validate(self) -> None:
        super().validate()
        cfg = self.cfg
        check_choice("method.constraint", cfg.constraint, CONSTRAINTS)
        check_choice("method.init", cfg.init, ("orthogonal",))
        check_choice("method.gain", cfg.gain, (1.0,))

    def build(self, shape: Shape) -> MLP:
        cfg = self.cfg
        layers = [open_layer(shape.in_features, shape.width)]
        layers += [square_layer(shape.width, cfg.constraint) for _ in range(shape.depth - 1)]
        layers.append(open_layer(shape.width, shape.out_features))
        layers = normalize_hidden(layers, "batch" if cfg.batch_norm else "none", shape.width)
        return MLP(layers, GPNActivation(cfg.activation, cfg.negative_slope, cfg.gpn))

    def constants(self, model: MLP) -> dict:
        cfg = self.cfg
        a, b = gpn_constants(cfg.activation, cfg.negative_slope) if cfg.gpn else (1.0, 0.0)
        return {
            "gpn_a": a, "gpn_b": b, "gpn": cfg.gpn, "activation": cfg.activation,
            "init": "orthogonal (gain 1) for every layer; square hidden layers bias-free",
            "constraint": cfg.constraint, "batch_norm": cfg.batch_norm,
        }

    def mean_field(self, shape: Shape) -> MeanFieldSpec:
        if self.cfg.batch_norm:
            return MeanFieldSpec(note="method.batch_norm=true renormalises every pre-activation over the batch: "
                                      "the length and correlation maps do not describe it")
        # Orthonormal rows (and, under rownorm, unit rows by construction): sigma_w^2 = 1, no bias.
        # Layer 1 (in_features -> width), orthogonal: entries of variance 1 / max(in, width).
        return MeanFieldSpec(
            weight_var=1.0, bias_var=0.0, weights="orthogonal",
            input_weight_var=shape.in_features / max(shape.in_features, shape.width), input_bias_var=0.0,
            note="orthogonal square layers: the length and correlation maps are those of Gaussian weights "
                 "of variance 1/width at large width (GPN puts q* = 1 and chi_1 = 1 there: the critical line); "
                 "the Jacobian spectrum is not, see deep_jacobian; rownorm and orthogonal differ only once trained")


METHOD = BSNN
