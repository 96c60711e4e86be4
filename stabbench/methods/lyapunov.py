"""lyapunov: Lyapunov initialisation of bias-free leaky-ReLU nets (Kogler, Schwarz, Kittle,
arXiv 2602.10949, 2026; docs/methods/lyapunov.md).

In a bias-free leaky-ReLU net phi(x) = max(x, alpha x) of width d, log ||x_l|| grows
linearly in l with rate lambda (the Lyapunov exponent). For square layers

    J(d, alpha) = int_0^inf [exp(-t) - (0.5 (1+2t)^(-1/2) + 0.5 (1+2 alpha^2 t)^(-1/2))^d] / t dt
                = E log sum_i s_i z_i^2      (z_i ~ N(0,1), s_i in {1, alpha^2} with prob. 1/2)

  gaussian   W ~ N(0, sigma^2/d):  lambda = log sigma - log(d)/2 + J/2  ->  sigma^2_crit = d exp(-J)
  orthogonal W = eta O, O Haar:    lambda = log eta + (J - psi(d/2) - log 2)/2
                                                                     ->  eta^2_crit = 2 exp(psi(d/2) - J)

He init (sigma^2 = 2/(1+alpha^2)) gives lambda < 0 at finite width; the critical scale
makes lambda = 0. The first (non-square) layer is He, the output layer an ordinary linear
layer (bias, LeCun-normal weights, our reading); hidden layers carry no bias, as in the theory.

Options: method.negative_slope (alpha, default 0.01, nonzero), method.weights =
gaussian | orthogonal, method.sampling: the sampling variant (our reading of the paper's
Algorithm 2): draw ceil(sqrt(depth)) candidate networks at the critical scale and keep the
one whose measured log-norm growth rate on a probe batch is closest to zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from stabbench.errors import UserError, check_choice
from stabbench.methods.base import MeanFieldSpec, Method, MethodConfig, Shape, linear
from stabbench.model import MLP, Activation

WEIGHTS = ("gaussian", "orthogonal")
SAMPLING_BATCH = 64  # probe-batch size for the sampling variant


@dataclass
class Config(MethodConfig):
    name: str = "lyapunov"
    activation: str = "leaky_relu"  # fixed: the theory is for leaky ReLU
    negative_slope: float = 0.01
    init: str = "lyapunov"  # fixed; method.weights picks the distribution
    weights: str = "gaussian"  # gaussian | orthogonal
    sampling: bool = False


# -- the integral and the critical scales ------------------------------------------------

def _integrand(u: float, d: int, alpha2: float) -> float:
    """exp(-t) - a(t)^d at t = e^u: J's integrand times t, written in log t so that both the
    1/t near t=0 and the slow power-law tail for small alpha become smooth in u. Each piece
    is formed with expm1/log1p: near t=0 both terms are 1 - O(t) and a direct difference
    would lose every digit."""
    t = math.exp(u)
    r1, r2 = -0.5 * math.log1p(2.0 * t), -0.5 * math.log1p(2.0 * alpha2 * t)  # log of each half's factor
    a_minus_1 = 0.5 * math.expm1(r1) + 0.5 * math.expm1(r2)
    if a_minus_1 > -0.5:
        log_ad = d * math.log1p(a_minus_1)  # log a(t)^d, exact to the last digit near t = 0
    else:  # far tail: a(t) -> 0, where log1p(a - 1) would lose a
        top = max(r1, r2)
        log_ad = d * (math.log(0.5) + top + math.log(math.exp(r1 - top) + math.exp(r2 - top)))
    gap = -t - log_ad
    if abs(gap) < 1.0:  # the two terms nearly cancel: exp(log_ad) * expm1(gap) keeps the digits
        return math.exp(log_ad) * math.expm1(gap)
    return math.exp(-t) - math.exp(log_ad)


@lru_cache(maxsize=None)
def lyapunov_integral(d: int, negative_slope: float) -> float:
    """J(d, alpha) = E log sum_i s_i z_i^2 (docs/methods/lyapunov.md), by adaptive quadrature in u = log t."""
    from scipy.integrate import quad

    if d < 1:
        raise ValueError(f"width d={d} must be >= 1")
    alpha2 = float(negative_slope) ** 2
    if alpha2 == 0:
        raise ValueError("negative_slope must be nonzero")
    # Below u_low the integrand is ~ t (d(1+alpha^2)/2 - 1): its integral from -inf is that
    # slope times e^u_low, added in closed form. Above u_high, a(t)^d < e^-40 and falls
    # like exp(-d u / 2): the rest is below 1e-17.
    u_low = -30.0
    small = min(alpha2, 1.0)
    # a(t) <= 0.5 (2t)^-1/2 + 0.5 (2 alpha^2 t)^-1/2 <= (2 small t)^-1/2 for t >= 1/(2 small)
    u_high = min(math.log(1.0 / (2.0 * small)) + 2.0 * 40.0 / d + 5.0, 700.0)
    # Kinks of the integrand's shape: t ~ 1 (the 1+2t factor), t ~ 1/(2 alpha^2), t ~ 1/(2 alpha^-2).
    breaks = sorted({u_low, 0.0, math.log(1.0 / (2.0 * small)), math.log(1.0 / (2.0 * max(alpha2, 1.0))), u_high})
    breaks = [b for b in breaks if u_low <= b <= u_high]
    total = math.exp(u_low) * (d * (1.0 + alpha2) / 2.0 - 1.0)
    for lo, hi in zip(breaks[:-1], breaks[1:]):
        value, _ = quad(_integrand, lo, hi, args=(d, alpha2), limit=400, epsabs=1e-13, epsrel=1e-12)
        total += value
    return total


def lyapunov_exponent(d: int, negative_slope: float, scale: float, weights: str) -> float:
    """Predicted per-layer growth rate of log ||x_l|| for square layers at the given scale
    (sigma for gaussian weights N(0, sigma^2/d), eta for orthogonal eta*O)."""
    from scipy.special import digamma

    J = lyapunov_integral(d, negative_slope)
    if weights == "gaussian":
        return math.log(scale) - math.log(d) / 2 + J / 2
    if weights == "orthogonal":
        return math.log(scale) + (J - float(digamma(d / 2)) - math.log(2.0)) / 2
    raise ValueError(weights)


@lru_cache(maxsize=None)
def critical_variance(d: int, negative_slope: float) -> float:
    """sigma^2_crit = d exp(-J(d, alpha)) for W ~ N(0, sigma^2/d)."""
    return d * math.exp(-lyapunov_integral(d, negative_slope))


@lru_cache(maxsize=None)
def critical_gain_squared(d: int, negative_slope: float) -> float:
    """eta^2_crit = 2 exp(psi(d/2) - J(d, alpha)) for W = eta O."""
    from scipy.special import digamma

    return 2.0 * math.exp(float(digamma(d / 2)) - lyapunov_integral(d, negative_slope))


def he_variance(negative_slope: float) -> float:
    return 2.0 / (1.0 + negative_slope ** 2)


# -- the method ----------------------------------------------------------------------------

def growth_rate(log_norms: torch.Tensor) -> torch.Tensor:
    """Least-squares slope of log-norms [..., L] against the layer index: the measured
    Lyapunov exponent per network (NaN with fewer than 2 layers)."""
    n = log_norms.shape[-1]
    if n < 2:
        return torch.full(log_norms.shape[:-1], float("nan"))
    layer = torch.arange(n, dtype=log_norms.dtype, device=log_norms.device)
    centred = layer - layer.mean()
    return ((log_norms - log_norms.mean(-1, keepdim=True)) * centred).sum(-1) / centred.pow(2).sum()


def sampling_candidates(depth: int) -> int:
    """How many draws the sampling variant compares: about sqrt(depth)."""
    return max(1, math.ceil(math.sqrt(depth))) if depth >= 3 else 1


class Lyapunov(Method):
    Config = Config

    def validate(self) -> None:
        cfg = self.cfg
        if cfg.activation != "leaky_relu":
            raise UserError(f"method.activation={cfg.activation!r} is not allowed for lyapunov; "
                            "allowed: leaky_relu (the theory is for leaky ReLU; compare others with method=baseline)")
        if cfg.init != "lyapunov":
            raise UserError(f"method.init={cfg.init!r} is not allowed for lyapunov; allowed: lyapunov "
                            "(choose the distribution with method.weights=gaussian|orthogonal)")
        if not math.isfinite(cfg.negative_slope) or cfg.negative_slope == 0:
            raise UserError(f"method.negative_slope={cfg.negative_slope} is not allowed; allowed: any finite "
                            "nonzero value (at 0, plain ReLU, the Lyapunov exponent is undefined)")
        check_choice("method.weights", cfg.weights, WEIGHTS)
        self.check_shared_options()

    def hidden_scale(self, width: int) -> float:
        """sigma_crit (gaussian) or eta_crit (orthogonal) for square layers of this width."""
        if self.cfg.weights == "gaussian":
            return math.sqrt(critical_variance(width, float(self.cfg.negative_slope)))
        return math.sqrt(critical_gain_squared(width, float(self.cfg.negative_slope)))

    def draw(self, shape: Shape) -> MLP:
        alpha = float(self.cfg.negative_slope)
        sizes = [shape.in_features] + [shape.width] * shape.depth
        layers = [linear(n_in, n_out, bias=False) for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        scale = self.hidden_scale(shape.width)
        with torch.no_grad():
            layers[0].weight.normal_(0.0, math.sqrt(he_variance(alpha) / shape.in_features))
            for layer in layers[1:]:
                if self.cfg.weights == "gaussian":
                    layer.weight.normal_(0.0, scale / math.sqrt(shape.width))
                else:
                    nn.init.orthogonal_(layer.weight, gain=scale)
            output = linear(shape.width, shape.out_features)
            output.weight.normal_(0.0, 1.0 / math.sqrt(shape.width))
            output.bias.zero_()
        return MLP(layers + [output], Activation("leaky_relu", alpha))

    def build(self, shape: Shape) -> MLP:
        if not self.cfg.sampling or sampling_candidates(shape.depth) == 1:
            return self.draw(shape)
        # Every candidate and the probe batch come from the caller's seeded generator, so the
        # choice is deterministic under the seed; the first candidate is the plain draw.
        # Candidates are drawn one at a time: only the best so far is kept in memory.
        best = self.draw(shape)
        probe = torch.randn(SAMPLING_BATCH, shape.in_features)
        best_rate = abs(float(measured_growth(best, probe)))
        for _ in range(sampling_candidates(shape.depth) - 1):
            model = self.draw(shape)
            rate = abs(float(measured_growth(model, probe)))
            if rate < best_rate:
                best, best_rate = model, rate
        return best

    def mean_field(self, shape: Shape) -> MeanFieldSpec:
        # Square layers N(0, sigma^2/d) or eta*O: fan_in * Var(W_ij) = sigma^2 (eta^2) either way.
        note = (f"width {shape.width}: the mean-field maps are the infinite-width limit, where leaky ReLU's "
                "critical sigma_w^2 is 2/(1+alpha^2); Lyapunov's critical scale is the finite-width correction "
                "(its log-norm's drift, not the mean of its square), so at small width the maps predict the "
                "mean of q_l but not its typical value")
        if self.cfg.sampling:
            note += "; method.sampling keeps a selected draw, not a random one"
        return MeanFieldSpec(weight_var=self.hidden_scale(shape.width) ** 2, bias_var=0.0,
                             weights=self.cfg.weights, input_weight_var=he_variance(float(self.cfg.negative_slope)),
                             input_bias_var=0.0, note=note)

    def constants(self, model: MLP) -> dict:
        alpha = float(self.cfg.negative_slope)
        depth = len(model.layers) - 1
        width = model.layers[0].weight.shape[0]
        J = lyapunov_integral(width, alpha)
        out = {
            "weights": self.cfg.weights,
            "negative_slope": alpha,
            "J": J,
            "first_layer_variance": he_variance(alpha),  # times 1/fan_in: He
            # what He (gaussian) or orthogonal with the He gain would give: the contrast to lambda = 0
            "he_exponent": lyapunov_exponent(width, alpha, math.sqrt(he_variance(alpha)), self.cfg.weights),
            "output_layer_variance": 1.0,  # times 1/fan_in (LeCun normal)
            "sampling": bool(self.cfg.sampling),
        }
        if self.cfg.weights == "gaussian":
            out["sigma2_crit"] = critical_variance(width, alpha)
            out["hidden_weight_std"] = math.sqrt(out["sigma2_crit"] / width)
        else:
            out["eta2_crit"] = critical_gain_squared(width, alpha)
            out["hidden_gain"] = math.sqrt(out["eta2_crit"])
        if self.cfg.sampling:
            out["sampling_candidates"] = sampling_candidates(depth)
        return out


@torch.no_grad()
def measured_growth(model: MLP, x: torch.Tensor) -> torch.Tensor:
    """Growth rate of the mean per-example log-norm over the hidden layers x_1..x_depth.
    The net is bias-free and positively homogeneous, so each example is renormalised after
    every layer and its log-norm accumulated: no underflow however deep or narrow."""
    log_norm = torch.zeros(len(x), dtype=torch.float64)
    log_norms = []
    for layer in model.layers[:-1]:
        x = model.activation(layer(x))
        norm = x.norm(dim=-1).clamp_min(torch.finfo(x.dtype).tiny)
        log_norm += norm.double().log()
        log_norms.append(log_norm.mean())
        x = x / norm[:, None]
    return growth_rate(torch.stack(log_norms))


METHOD = Lyapunov
