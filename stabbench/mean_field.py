"""Mean-field theory of signal propagation in a wide random network at initialisation (Poole
et al. 2016, "Exponential expressivity in deep neural networks through transient chaos";
Schoenholz et al., ICLR 2017, "Deep Information Propagation"). The formulas are written out,
with their sources, in docs/theory.md.

For W_ij ~ N(0, sigma_w^2 / N), b_i ~ N(0, sigma_b^2) and pre-activations h^l = W^l phi(h^{l-1}) + b^l:

- length map   q^l = sigma_w^2 E[phi(sqrt(q^{l-1}) z)^2] + sigma_b^2, fixed point q*;
- correlation map of two inputs, c^l = q_ab^l / sqrt(q_a^l q_b^l) with
  q_ab^l = sigma_w^2 E[phi(u_a) phi(u_b)] + sigma_b^2, (u_a, u_b) centred Gaussian of variances
  q_a^{l-1}, q_b^{l-1} and correlation c^{l-1}; fixed point c* of the map at q_a = q_b = q*;
- chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2] (ordered < 1 < chaotic), chi_c = sigma_w^2 E[phi'(u_a) phi'(u_b)]
  at (q*, c*), and the depth scales xi_q = -1 / log chi_q, xi_c = -1 / log chi_c, where chi_q is
  the slope of the length map at q*.

Every Gaussian expectation is a fixed quadrature: Gauss-Legendre on [-Z, 0] and [0, Z]
(Z = 10: the Gaussian weight beyond is < 1e-21) times the normal density. Splitting at 0
puts the kink of relu, leaky_relu, elu and selu (and of their GPN-normalised forms) on a
panel edge, where a single Gauss-Hermite rule across it converges only algebraically. In
two dimensions the inner integral runs over u_b given u_a, split where u_b = 0. phi is any
elementwise torch function or module (the method's own, taken from the built network), its
derivative by autograd in float64, so no activation is named here.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

CUTOFF = 10.0
NODES = 64  # Gauss-Legendre nodes per panel; 1e-12 agreement with 128 for every activation here
CRITICAL_TOLERANCE = 1e-3  # |chi_1 - 1| below this is the critical line
Q_TOO_LARGE, Q_TOO_SMALL = 1e12, 1e-14  # the length map is taken to diverge / collapse past these


@functools.lru_cache(maxsize=None)
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


def _panel(low: np.ndarray, high: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of E over z ~ N(0, 1) restricted to [low, high] (arrays broadcast: one
    panel per element), shape [..., n]."""
    t, w = _legendre(n)
    low, high = np.asarray(low, float)[..., None], np.asarray(high, float)[..., None]
    half = (high - low) / 2
    z = low + half * (t + 1)
    return z, w * half * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def gauss_rule(n: int = NODES) -> tuple[np.ndarray, np.ndarray]:
    """z, weights with sum(w f(z)) ~ E[f(z)], z ~ N(0, 1), for f smooth on each side of 0."""
    zl, wl = _panel(-CUTOFF, 0.0, n)
    zr, wr = _panel(0.0, CUTOFF, n)
    return np.concatenate([zl, zr]), np.concatenate([wl, wr])


class Phi:
    """phi and phi' of an elementwise activation on float64 numpy arrays (phi' by autograd)."""

    def __init__(self, activation):
        self.activation = activation

    def __call__(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(u, dtype=np.float64)).requires_grad_(True)
        with torch.enable_grad():
            y = self.activation(x)
            (slope,) = torch.autograd.grad(y.sum(), x)
        return y.detach().numpy(), slope.numpy()


def _as_phi(phi) -> Phi:
    return phi if isinstance(phi, Phi) else Phi(phi)


def gaussian_moments(phi, q, n: int = NODES) -> dict[str, np.ndarray]:
    """E[phi(u)^2], E[phi'(u)^2], E[z phi(u) phi'(u)] for u = sqrt(q) z; q an array (any shape)."""
    phi = _as_phi(phi)
    q = np.asarray(q, float)
    z, w = gauss_rule(n)
    s = np.sqrt(q)[..., None]
    value, slope = phi(s * z)
    return {"phi2": (w * value ** 2).sum(-1), "slope2": (w * slope ** 2).sum(-1),
            "z_phi_slope": (w * z * value * slope).sum(-1)}


def length_map(phi, q, weight_var: float, bias_var: float, n: int = NODES) -> np.ndarray:
    """q^{l+1} from q^l (elementwise over an array of q)."""
    return weight_var * gaussian_moments(phi, q, n)["phi2"] + bias_var


def pair_expectations(phi, q_a, q_b, c, n: int = NODES) -> dict[str, np.ndarray]:
    """E[phi(u_a) phi(u_b)] and E[phi'(u_a) phi'(u_b)] for (u_a, u_b) centred Gaussian with
    variances q_a, q_b and correlation c (arrays broadcast together).
    u_a = sqrt(q_a) z1, u_b = sqrt(q_b) (c z1 + sqrt(1 - c^2) z2): the outer rule over z1 is
    split at 0 (phi's kink in u_a), the inner one over z2 at -c z1 / sqrt(1 - c^2) (in u_b)."""
    phi = _as_phi(phi)
    q_a, q_b, c = np.broadcast_arrays(*(np.asarray(v, float) for v in (q_a, q_b, c)))
    c = np.clip(c, -1.0, 1.0)
    r = np.sqrt(1.0 - c * c)
    z1, w1 = gauss_rule(n)  # [m]
    z1 = np.broadcast_to(z1, c.shape + z1.shape)
    cc, rr = c[..., None], r[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        kink = np.where(rr > 0, -cc * z1 / rr, np.where(cc * z1 > 0, -CUTOFF, CUTOFF))
    kink = np.clip(kink, -CUTOFF, CUTOFF)
    zl, wl = _panel(np.full_like(kink, -CUTOFF), kink, n)
    zr, wr = _panel(kink, np.full_like(kink, CUTOFF), n)
    z2, w2 = np.concatenate([zl, zr], -1), np.concatenate([wl, wr], -1)  # [..., m, 2n]
    value_a, slope_a = phi(np.sqrt(q_a)[..., None] * z1)
    value_b, slope_b = phi(np.sqrt(q_b)[..., None, None] * (cc[..., None] * z1[..., None] + rr[..., None] * z2))
    inner_value, inner_slope = (w2 * value_b).sum(-1), (w2 * slope_b).sum(-1)
    return {"phi_phi": (w1 * value_a * inner_value).sum(-1), "slope_slope": (w1 * slope_a * inner_slope).sum(-1)}


def correlation_step(phi, q_a, q_b, c, weight_var: float, bias_var: float, n: int = NODES):
    """One layer of the two-input map: (q_a, q_b, c) -> (q_a', q_b', c')."""
    q_ab = weight_var * pair_expectations(phi, q_a, q_b, c, n)["phi_phi"] + bias_var
    new_a, new_b = length_map(phi, q_a, weight_var, bias_var, n), length_map(phi, q_b, weight_var, bias_var, n)
    return new_a, new_b, q_ab / np.sqrt(new_a * new_b)


def correlation_map(phi, c, q_star: float, weight_var: float, bias_var: float, n: int = NODES) -> np.ndarray:
    """Schoenholz et al.'s C-map at the fixed length: c^{l+1} = q_ab / q* with q_a = q_b = q*."""
    return (weight_var * pair_expectations(phi, q_star, q_star, c, n)["phi_phi"] + bias_var) / q_star


def iterate_length(phi, q1, depth: int, weight_var: float, bias_var: float, n: int = NODES) -> np.ndarray:
    """q^1..q^depth from q^1 (an array of starting points gives [depth, *shape])."""
    out = [np.asarray(q1, float)]
    for _ in range(depth - 1):
        out.append(length_map(phi, out[-1], weight_var, bias_var, n))
    return np.stack(out)


def iterate_correlation(phi, q_a, q_b, c1, depth: int, weight_var: float, bias_var: float,
                        n: int = NODES) -> np.ndarray:
    """c^1..c^depth of input pairs whose layer-1 pre-activations have lengths q_a, q_b and correlation c1."""
    q_a, q_b, c = (np.asarray(v, float) for v in (q_a, q_b, c1))
    out = [c]
    for _ in range(depth - 1):
        q_a, q_b, c = correlation_step(phi, q_a, q_b, c, weight_var, bias_var, n)
        out.append(c)
    return np.stack(out)


def fixed_point_length(phi, weight_var: float, bias_var: float, start: float = 1.0, n: int = NODES,
                       tolerance: float = 1e-13, max_iterations: int = 1000) -> float:
    """q* by iterating the length map from `start`; inf where it diverges, 0 where it collapses.
    On the critical point of an odd phi without bias (tanh, sigma_w^2 = 1, sigma_b^2 = 0: the
    default xavier tanh net) q falls only like 1/l, which Aitken's extrapolation (_aitken)
    only halves every two steps; still falling below 1e-3 after `max_iterations`, it is taken
    to collapse."""
    phi = _as_phi(phi)
    q = start
    history = [q]
    for _ in range(max_iterations):
        new = float(length_map(phi, q, weight_var, bias_var, n))
        if not math.isfinite(new) or new > Q_TOO_LARGE:
            return math.inf
        if new < Q_TOO_SMALL:
            return 0.0
        if abs(new - q) <= tolerance * max(new, 1e-300):
            return new
        falling, q = new < q, new
        history.append(q)
        if len(history) == 3:
            q = _aitken(*history)
            history = [q]
    return 0.0 if falling and q < 1e-3 * start else q


def _aitken(q0: float, q1: float, q2: float) -> float:
    """Aitken's delta-squared extrapolation of q0, q1 = L(q0), q2 = L(q1) towards the fixed point,
    where the steps shrink (|ratio| < 1); else q2. An estimate at or below 0 (a map collapsing
    to q* = 0, e.g. tanh without bias in the ordered phase) becomes a thousandth of q2. Near the
    critical line the length map's slope chi_q is close to 1 and plain iteration needs
    thousands of steps to 1e-13 (~9 s of the probe's critical-line search); this needs tens.
    Only the plain step's convergence test accepts a value, so the answer is the map's fixed
    point whatever the extrapolation did."""
    d1, d2 = q1 - q0, q2 - q1
    if d1 == 0 or d2 == d1 or abs(d2 / d1) >= 1:
        return q2
    estimate = q2 - d2 * d2 / (d2 - d1)
    if not math.isfinite(estimate):
        return q2
    return estimate if estimate > 0 else 1e-3 * q2


C_GRID = 41  # points on [-1, 1 - delta] where the C-map's fixed points are bracketed


def _c_star(phi, q_star: float, chi_1: float, weight_var: float, bias_var: float, n: int) -> float:
    """The stable fixed point of the C-map: 1 unless chaotic; otherwise the largest root of
    C(c) = c below 1, the one correlations starting near 1 fall to (C(c) < c just below 1
    where the slope chi_1 > 1, and C(-1) >= -1 by Cauchy-Schwarz). A root is accepted only
    where it is stable, |C'(c*)| < 1: for an odd phi without bias C(-1) = -1 exactly, but
    that fixed point has slope chi_1 > 1, and the correlations go to the interior root
    (c* = 0 by symmetry)."""
    if chi_1 <= 1.0 + CRITICAL_TOLERANCE:
        return 1.0
    from scipy.optimize import brentq

    gap = lambda c: correlation_map(phi, c, q_star, weight_var, bias_var, n) - c
    top = next((1.0 - d for d in (1e-2, 1e-4, 1e-6, 1e-8) if float(gap(1.0 - d)) < 0), None)
    if top is None:
        return 1.0
    grid = np.linspace(-1.0, top, C_GRID)
    gaps = np.asarray(gap(grid), float)
    for i in range(C_GRID - 2, -1, -1):  # from the top: the first sign change below 1
        low, high = grid[i], grid[i + 1]
        if gaps[i] == 0:
            root = float(low)
        elif gaps[i] > 0 > gaps[i + 1]:
            root = brentq(lambda c: float(gap(c)), low, high, xtol=1e-14, rtol=1e-13)
            root = 0.0 if abs(root) < 1e-12 else root  # an odd phi's symmetric root, to the quadrature's accuracy
        else:
            continue
        if abs(c_map_slope(phi, q_star, root, weight_var, n)) < 1.0:
            return root
    return 1.0


def c_map_slope(phi, q_star: float, c: float, weight_var: float, n: int = NODES) -> float:
    """C'(c) at the fixed length q*: sigma_w^2 E[phi'(u_a) phi'(u_b)] (Price's theorem), chi_c at c*."""
    return weight_var * float(pair_expectations(phi, q_star, q_star, c, n)["slope_slope"])


@dataclass
class Prediction:
    """The theory's numbers for one (phi, sigma_w^2, sigma_b^2). Infinite depth scales (the
    critical line) and q* = inf (a length map that diverges) are kept as inf here; a quantity
    the theory does not define there is NaN, named in `undefined` with the reason."""
    weight_var: float
    bias_var: float
    q_star: float
    chi_1: float
    chi_q: float
    c_star: float
    chi_c: float
    xi_q: float
    xi_c: float
    phase: str  # ordered | critical | chaotic
    undefined: dict = field(default_factory=dict)  # quantity -> why the theory gives it no value

    def as_dict(self) -> dict:
        out = asdict(self)
        out["six_xi_c"] = 6 * self.xi_c
        if "xi_c" in self.undefined:
            out["undefined"] = {**self.undefined, "six_xi_c": self.undefined["xi_c"]}
        return out


# Where q* is 0 or infinite there is no fixed length to linearise the correlation map around:
# its normalised form has slope 1 at c = 1 (the relu family is homogeneous; tanh near q = 0 is
# linear), so correlations converge polynomially or not at all, on no depth scale.
NO_FIXED_LENGTH = {0.0: "q* = 0 (the length map collapses): correlations converge polynomially "
                        "or not at all, on no depth scale",
                   math.inf: "q* = inf (the length map diverges): no fixed length to linearise the "
                             "correlation map around"}
ROUNDING = 1e-10  # a slope this close to 1 is 1: its depth scale is infinite, not 1/ROUNDING


def depth_scale(chi: float) -> float:
    """-1 / log chi: the layers over which a deviation shrinks by e (inf at chi >= 1, and
    within rounding of 1)."""
    if math.isnan(chi):
        return math.nan
    if chi >= 1.0 - ROUNDING:
        return math.inf
    return -1.0 / math.log(chi) if chi > 0 else 0.0


def phase_of(chi_1: float) -> str:
    if abs(chi_1 - 1.0) <= CRITICAL_TOLERANCE:
        return "critical"
    return "ordered" if chi_1 < 1.0 else "chaotic"


def predict(phi, weight_var: float, bias_var: float, n: int = NODES) -> Prediction:
    """q*, chi_1, chi_q, c*, chi_c, xi_q, xi_c and the phase (docs/theory.md)."""
    phi = _as_phi(phi)
    q_star = fixed_point_length(phi, weight_var, bias_var, n=n)
    # A length map that collapses or diverges: the slopes in its limit (exact for the
    # positively homogeneous relu family and the linear map, whose slopes do not depend on q).
    q_eval = min(max(q_star, Q_TOO_SMALL), Q_TOO_LARGE)
    moments = gaussian_moments(phi, q_eval, n)
    chi_1 = weight_var * float(moments["slope2"])
    # The length map's slope d q^{l+1} / d q^l = sigma_w^2 E[phi'^2 + phi phi''] (Schoenholz et
    # al.), written by Gaussian integration by parts as sigma_w^2 E[z phi phi'] / sqrt(q): no
    # phi'', whose delta at a kink (GPN-shifted relu: phi(0) != 0) this form keeps.
    chi_q = weight_var * float(moments["z_phi_slope"]) / math.sqrt(q_eval)
    phase = phase_of(chi_1)
    undefined = {}
    if q_star in NO_FIXED_LENGTH:
        c_star = chi_c = xi_c = math.nan
        undefined = dict.fromkeys(("c_star", "chi_c", "xi_c"), NO_FIXED_LENGTH[q_star])
    else:
        c_star = _c_star(phi, q_star, chi_1, weight_var, bias_var, n)
        chi_c = chi_1 if c_star == 1.0 else c_map_slope(phi, q_star, c_star, weight_var, n)
        xi_c = math.inf if phase == "critical" else depth_scale(chi_c)
    return Prediction(weight_var=weight_var, bias_var=bias_var, q_star=q_star, chi_1=chi_1, chi_q=chi_q,
                      c_star=c_star, chi_c=chi_c, xi_q=depth_scale(chi_q), xi_c=xi_c, phase=phase,
                      undefined=undefined)


def critical_weight_var(phi, bias_var: float, low: float = 0.05, high: float = 100.0, n: int = NODES) -> float | None:
    """sigma_w^2 on the critical line chi_1 = 1 for this sigma_b^2 (the first crossing above
    `low`), or None if chi_1 does not cross 1 in [low, high]."""
    from scipy.optimize import brentq

    phi = _as_phi(phi)
    excess = lambda v: predict(phi, v, bias_var, n).chi_1 - 1.0
    grid = np.geomspace(low, high, 25)
    values = [excess(v) for v in grid]
    for (a, fa), (b, fb) in zip(zip(grid, values), zip(grid[1:], values[1:])):
        if fa == 0:
            return float(a)
        if fa < 0 < fb:
            return float(brentq(excess, a, b, xtol=1e-9))
    return None
