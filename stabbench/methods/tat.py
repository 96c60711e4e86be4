"""tat: Deep Kernel Shaping (Martens, Ballard, Desjardins, Swirszcz, Dalibard, Sohl-Dickstein,
Schoenholz; arXiv 2110.01765) and Tailored Activation Transformations (Zhang, Botev, Martens,
ICLR 2022, arXiv 2203.08120), built on DeepMind's `dks` package. docs/methods/tat.md.

A plain deep MLP (no normalisation, no skip connections) whose activation is transformed for
the network's depth, phi_hat(x) = gamma * (phi(alpha x + beta) + delta), so that the whole
network's C-map (the composition of its `depth` local C-maps) is neither close to the
identity nor degenerate:
- method.transform=tat (default; method.activation=leaky_relu): dks picks the negative slope
  so that the network's C-map value at 0 is method.c_val_0_target (eta, default 0.9), and
  gamma = sqrt(2 / (1 + slope^2)) so that every layer keeps q = 1;
- method.transform=dks (tanh, softplus, ... : DKS_ACTIVATIONS): dks picks alpha, beta, gamma,
  delta so that each local C-map has value 0 at 0, the local Q-map slope 1 at q = 1, and the
  network's C-map slope at 1 is method.c_slope_1_target (zeta, default 1.5).
Every weight matrix is drawn by dks's scaled uniform orthogonal sampler, biases 0; with
method.input_normalization=pln (default) each input gets DKS's per-location normalisation
(a constant coordinate 1 appended, then scaled to a mean square of 1), so q = 1 from the
first layer on, as the C-map analysis assumes.

`constants()` reports the transform and the network's C-map values computed here by our own
quadrature of the module the network runs (independent of dks), composed over depth.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from stabbench.errors import UserError, check_choice, check_range
from stabbench.methods.base import Method, MethodConfig, Shape, linear
from stabbench.model import MLP, Activation, activation_fn

TRANSFORMS = ("tat", "dks")
# Activations dks transforms whose torch function this module runs (dks's names).
DKS_ACTIVATIONS = ("tanh", "softplus", "leaky_relu", "elu", "selu", "sigmoid", "erf", "atan", "asinh", "softsign")
INPUT_NORMALIZATIONS = ("pln", "none")
QUADRATURE_RANGE = 12.0  # N(0, 1) beyond +-12 weighs < 1e-32
QUADRATURE_NODES = 64  # Gauss-Legendre nodes per smooth piece: 6e-11 off the leaky-ReLU closed form


@dataclass
class Config(MethodConfig):
    name: str = "tat"
    activation: str = "leaky_relu"  # tat: leaky_relu; dks: one of DKS_ACTIVATIONS
    negative_slope: Optional[float] = None  # computed by TAT; not an option
    init: str = "scaled_uniform_orthogonal"  # fixed: dks's sampler, biases 0
    transform: str = "tat"  # tat | dks
    c_val_0_target: float = 0.9  # tat: eta, the network C-map's value at 0
    c_slope_1_target: float = 1.5  # dks: zeta, the network C-map's slope at 1
    input_normalization: str = "pln"  # pln (DKS's per-location normalisation) | none


@functools.lru_cache(maxsize=None)
def dks_modules():
    """dks's activation transform and parameter sampler, imported on first use (every CLI
    start imports all methods). absl, which dks logs through, binds its handler to sys.stderr
    as it is at import; inside a captured call (pytest) that is a file closed before exit,
    and the interpreter then dies at exit ("lost sys.stderr"): point it at the process's own."""
    import sys

    from absl import logging as absl_logging
    from dks.pytorch import activation_transform, parameter_sampling_functions

    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__
    return activation_transform, parameter_sampling_functions


@functools.lru_cache(maxsize=None)
def transform_parameters(activation: str, transform: str, depth: int, target: float) -> dict[str, float]:
    """dks's transformation of `activation` for a plain MLP of `depth` nonlinear layers, as
    plain floats: input_scale (alpha), input_shift (beta), output_shift (delta), output_scale
    (gamma), negative_slope (leaky ReLU). Computed once per argument tuple (DKS takes seconds).

    dks's public API returns the transformed activation as a closure; its numbers are read off
    the closure's variables (dks is pinned; tests/test_tat.py checks the module built from
    them against dks's own function)."""
    get_transformed_activations = dks_modules()[0].get_transformed_activations

    def subnet_max(x, local_map):
        # A plain MLP's only subnetwork of interest is the whole chain: the local map `depth` times.
        for _ in range(depth):
            x = local_map(x)
        return x

    options = {"tat_params": {"c_val_0_target": target}} if transform == "tat" else \
        {"dks_params": {"c_slope_1_target": target}}
    try:
        function = get_transformed_activations([activation], method=transform.upper(), subnet_max_func=subnet_max,
                                               **options)[activation]
    except ValueError as error:  # e.g. a target the depth cannot reach
        key = "c_val_0_target" if transform == "tat" else "c_slope_1_target"
        raise UserError(f"method.{key}={target} cannot be reached by method.transform={transform} with "
                        f"method.activation={activation} at depth={depth} (dks: {str(error).split('. ')[0]}); "
                        f"allowed: a smaller target or a deeper network") from None
    captured = inspect.getclosurevars(function).nonlocals
    numbers = {key: captured.get(key) for key in ("input_scale", "input_shift", "output_shift", "output_scale")}
    numbers["negative_slope"] = captured.get("params", {}).get("negative_slope")
    return {key: float(value) for key, value in numbers.items() if value is not None}


def base_function(name: str, negative_slope: float | None = None):
    """phi for a dks activation name: the project's fast kernels where it has them, else torch's."""
    if name == "leaky_relu":
        return activation_fn(name, negative_slope)
    if name in ("tanh", "elu", "selu", "sigmoid"):
        return activation_fn(name)
    return getattr(F, name, None) or getattr(torch, name)


class TransformedActivation(Activation):
    """phi_hat(x) = gamma * (phi(alpha x + beta) + delta), elementwise, computed as
    (gamma phi(alpha x + beta)) + gamma delta: Activation's scale and shift."""

    def __init__(self, name: str, parameters: dict[str, float]):
        gamma, delta = parameters.get("output_scale", 1.0), parameters.get("output_shift", 0.0)
        slope = parameters.get("negative_slope", 0.01)
        super().__init__(name, slope, scale=gamma, shift=gamma * delta, base=base_function(name, slope))
        self.input_scale, self.input_shift = parameters.get("input_scale", 1.0), parameters.get("input_shift", 0.0)

    @property
    def kink(self) -> float:
        """Where phi_hat's input puts phi's at 0 (where ReLU-like activations bend)."""
        return -self.input_shift / self.input_scale

    def forward(self, x):
        if self.input_scale != 1.0:
            x = x * self.input_scale
        if self.input_shift != 0.0:
            x = x + self.input_shift
        return super().forward(x)

    def extra_repr(self):
        return f"{super().extra_repr()}, input_scale={self.input_scale:.4f}, input_shift={self.input_shift:.4f}"


class PerLocationNormalization(nn.Module):
    """DKS's per-location normalisation of a flat input (one location): a homogeneous
    coordinate 1 appended, then each example scaled so that its mean square is 1 (q = 1)."""

    stacked_seeds = True  # acts on the last dimension alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, torch.ones_like(x[..., :1])], -1)
        return x / x.square().mean(-1, keepdim=True).sqrt()


# -- our own C-map quadrature (independent of dks) ------------------------------------------
@functools.lru_cache(maxsize=None)
def _legendre_on_unit_interval(nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(nodes)
    return torch.from_numpy(x), torch.from_numpy(w)


def _legendre(low: torch.Tensor, high: torch.Tensor, nodes: int):
    """Gauss-Legendre nodes and weights on [low, high] (broadcast over tensors of intervals)."""
    x, w = _legendre_on_unit_interval(nodes)
    half = (high - low).unsqueeze(-1) / 2
    return (low.unsqueeze(-1) + half * (x + 1)), half * w


def _pieces(kink: torch.Tensor, nodes: int):
    """Nodes and Gaussian-weighted weights for E over N(0, 1), split at `kink` (clamped to the range)."""
    limit = torch.tensor(QUADRATURE_RANGE, dtype=torch.float64)
    kink = kink.clamp(-limit, limit)
    left, left_w = _legendre(-limit.expand_as(kink), kink, nodes)
    right, right_w = _legendre(kink, limit.expand_as(kink), nodes)
    z, w = torch.cat([left, right], -1), torch.cat([left_w, right_w], -1)
    return z, w * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


@torch.no_grad()
def gaussian_mean(function, kink: float = 0.0, nodes: int = QUADRATURE_NODES) -> float:
    """E[function(z)], z ~ N(0, 1), piecewise Gauss-Legendre split where phi bends."""
    z, w = _pieces(torch.tensor(kink, dtype=torch.float64), nodes)
    return float((function(z) * w).sum())


@torch.no_grad()
def local_c_map(phi, c: float, kink: float = 0.0, nodes: int = QUADRATURE_NODES) -> float:
    """The local C-map at c for inputs of q = 1: E[phi(u) phi(v)] / E[phi(u)^2], (u, v) standard
    normal with correlation c; v = c u + sqrt(1 - c^2) w, the inner integral over w split where v
    reaches the kink, the outer one where u does."""
    second_moment = gaussian_mean(lambda z: phi(z) ** 2, kink, nodes)
    if c >= 1.0:
        return 1.0
    s = math.sqrt(1.0 - c * c)
    u, u_weights = _pieces(torch.tensor(kink, dtype=torch.float64), nodes)
    w, w_weights = _pieces((kink - c * u) / s, nodes)  # [2n, 2n]: for each u, the w pieces
    inner = (phi(c * u.unsqueeze(-1) + s * w) * w_weights).sum(-1)
    return float((phi(u) * inner * u_weights).sum()) / second_moment


def _slope(phi):
    def derivative(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(phi(z).sum(), z)
        return grad
    return derivative


@torch.no_grad()
def network_c_map(activation: TransformedActivation, depth: int) -> dict[str, float]:
    """The network's C-map figures for `depth` layers of `activation` at q = 1: its value at 0
    (the local map composed depth times from 0), its slope at 1 (the local slope at 1 to the
    power depth, since every local map fixes 1), and the local Q-map value at 1 (1 keeps q = 1)."""
    phi = lambda z: activation(z)
    kink = activation.kink
    q_map_1 = gaussian_mean(lambda z: phi(z) ** 2, kink)
    slope_1 = gaussian_mean(lambda z: _slope(phi)(z) ** 2, kink) / q_map_1
    c = 0.0
    for _ in range(depth):
        c = local_c_map(phi, c, kink)
    return {"network_c_map_0": c, "network_c_slope_1": slope_1 ** depth, "local_c_slope_1": slope_1,
            "local_q_map_1": q_map_1}


class TAT(Method):
    Config = Config

    def validate(self) -> None:
        cfg = self.cfg
        check_choice("method.transform", cfg.transform, TRANSFORMS)
        check_choice("method.input_normalization", cfg.input_normalization, INPUT_NORMALIZATIONS)
        if cfg.transform == "tat":
            check_choice("method.activation", cfg.activation, ("leaky_relu",))
            check_range("method.c_val_0_target", cfg.c_val_0_target, low=0, high=1, low_open=True, high_open=True)
        else:
            check_choice("method.activation", cfg.activation, DKS_ACTIVATIONS)
            check_range("method.c_slope_1_target", cfg.c_slope_1_target, low=1, low_open=True)
        check_choice("method.init", cfg.init, ("scaled_uniform_orthogonal",))
        check_choice("method.gain", cfg.gain, (1.0,))
        if cfg.negative_slope is not None:
            raise UserError(f"method.negative_slope={cfg.negative_slope} is TAT's to choose (from depth and "
                            f"method.c_val_0_target); allowed: null")
        if cfg.alpha_dropout != 0:
            raise UserError(f"method.alpha_dropout={cfg.alpha_dropout} is for method=snn only; allowed here: 0")

    def validate_run(self, cfg) -> None:
        self.parameters(cfg.depth)  # an unreachable target fails before any directory is made

    @property
    def target(self) -> float:
        return float(self.cfg.c_val_0_target if self.cfg.transform == "tat" else self.cfg.c_slope_1_target)

    def parameters(self, depth: int) -> dict[str, float]:
        return transform_parameters(self.cfg.activation, self.cfg.transform, depth, self.target)

    def build(self, shape: Shape) -> MLP:
        scaled_uniform_orthogonal_ = dks_modules()[1].scaled_uniform_orthogonal_
        pln = self.cfg.input_normalization == "pln"
        sizes = [shape.in_features + pln] + [shape.width] * shape.depth + [shape.out_features]
        layers = [linear(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        for layer in layers:
            # dks 0.1.2's PyTorch sampler reads a 2-D tensor as [in, out] (JAX's layout); torch's
            # Linear stores [out, in]. Given the weight itself it scales a 785 -> 128 layer's q by
            # 6.1 and a 128 -> 10 one's by 0.078; given the transposed view (written in place) it
            # keeps q, as the SUO distribution means to.
            scaled_uniform_orthogonal_(layer.weight.T)
            nn.init.zeros_(layer.bias)
        return MLP(layers, TransformedActivation(self.cfg.activation, self.parameters(shape.depth)),
                   input_map=PerLocationNormalization() if pln else None)

    def constants(self, model: MLP) -> dict:
        cfg = self.cfg
        target_key = "c_val_0_target" if cfg.transform == "tat" else "c_slope_1_target"
        return {"transform": cfg.transform, "activation": cfg.activation, target_key: self.target,
                **self.parameters(model.depth), **network_c_map(model.activation, model.depth),
                "init": "scaled uniform orthogonal (dks), biases 0", "input_normalization": cfg.input_normalization}


METHOD = TAT
