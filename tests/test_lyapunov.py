"""lyapunov: the critical scale against its closed forms, the large-width expansion and
Monte Carlo simulation of the random product; the built network; the sampling variant."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from scipy.special import digamma

from stabbench import methods
from stabbench.errors import UserError
from stabbench.methods.base import Shape
from stabbench.methods.lyapunov import (
    Config, critical_gain_squared, critical_variance, he_variance, lyapunov_exponent, lyapunov_integral,
    measured_growth, sampling_candidates,
)

ROOT = Path(__file__).resolve().parents[1]


def make(**options):
    return methods.create(OmegaConf.structured(Config(**options)))


def expansion_constant(alpha: float) -> float:
    """c in sigma^2_crit ~ (2/(1+alpha^2)) (1 + c/d): second-order delta method on E log S,
    S = sum_i s_i z_i^2; c = 2.5 at alpha = 0 (the paper: c ~ 2.5 for small alpha; docs/methods/lyapunov.md)."""
    m = (1 + alpha ** 2) / 2
    return (1.5 * (1 + alpha ** 4) - m ** 2) / (2 * m ** 2)


@pytest.mark.parametrize("d", [1, 2, 3, 16, 500, 4096])
def test_integral_has_the_closed_form_of_the_linear_case(d):
    # alpha = +-1 is the linear net: J = E log chi^2_d = psi(d/2) + log 2, so eta_crit = 1 exactly
    assert lyapunov_integral(d, 1.0) == pytest.approx(float(digamma(d / 2)) + math.log(2), abs=1e-9)
    assert critical_gain_squared(d, -1.0) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.5, 2.0])
def test_width_one_orthogonal_gain_is_one_over_sqrt_alpha(alpha):
    # d = 1: O = +-1 and each layer multiplies by eta or eta*|alpha| with probability 1/2
    assert critical_gain_squared(1, alpha) == pytest.approx(1 / abs(alpha), rel=1e-9)


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.5])
def test_critical_variance_follows_the_large_width_expansion(alpha):
    for d in (500, 1000, 4000):
        c = d * (critical_variance(d, alpha) / he_variance(alpha) - 1)
        # the next term is O(1/d^2) in sigma^2, O(1/d) in c
        assert c == pytest.approx(expansion_constant(alpha), abs=10 / d), d
    assert expansion_constant(0.01) == pytest.approx(2.5, abs=1e-3)
    c_1000 = 1000 * (critical_variance(1000, 0.01) / he_variance(0.01) - 1)
    assert c_1000 == pytest.approx(2.5, abs=0.02)


def test_critical_variance_exceeds_he_and_falls_with_width():
    widths = [1, 2, 4, 8, 16, 64, 256, 1024]
    variances = [critical_variance(d, 0.01) for d in widths]
    assert all(v > he_variance(0.01) for v in variances)
    assert variances == sorted(variances, reverse=True)
    assert critical_variance(2, 0.01) == pytest.approx(35.27, rel=1e-3)  # narrow nets need far more than He's 2
    assert critical_variance(16, 0.01) == pytest.approx(2.3856, rel=1e-4)


def test_integral_matches_monte_carlo_expectation():
    # J(d, alpha) = E log sum_i s_i z_i^2, s_i in {1, alpha^2} with probability 1/2
    generator = torch.Generator().manual_seed(0)
    for d, alpha in ((2, 0.01), (16, 0.01), (16, 0.3)):
        z2 = torch.randn(400_000, d, generator=generator, dtype=torch.float64) ** 2
        s = torch.where(torch.rand(400_000, d, generator=generator, dtype=torch.float64) < 0.5, 1.0, alpha ** 2)
        log_s = (s * z2).sum(1).log()
        se = float(log_s.std()) / math.sqrt(len(log_s))
        assert abs(float(log_s.mean()) - lyapunov_integral(d, alpha)) < 4 * se, (d, alpha)


def haar_orthogonal(n: int, d: int, generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, d, d, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]


def simulate_growth(d: int, alpha: float, scale: float, weights: str, chains=2000, layers=20, seed=0):
    """Per-layer growth of log ||x_l|| along random products phi(W_l ... phi(W_1 x)), and its
    standard error (each example renormalised after every layer: no underflow)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(chains, d, generator=generator, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    increments = []
    for _ in range(layers):
        if weights == "gaussian":
            w = torch.randn(chains, d, d, generator=generator, dtype=torch.float64) * (scale / math.sqrt(d))
        else:
            w = scale * haar_orthogonal(chains, d, generator)
        x = torch.nn.functional.leaky_relu(torch.einsum("nij,nj->ni", w, x), alpha)
        norm = x.norm(dim=1)
        increments.append(norm.log())
        x = x / norm[:, None]
    increments = torch.stack(increments)
    return float(increments.mean()), float(increments.std()) / math.sqrt(increments.numel())


@pytest.mark.parametrize("weights", ["gaussian", "orthogonal"])
@pytest.mark.parametrize("d", [2, 16])
def test_random_product_has_zero_growth_at_the_critical_scale(weights, d):
    alpha = 0.01
    critical = critical_variance(d, alpha) if weights == "gaussian" else critical_gain_squared(d, alpha)
    chains = 2000 if weights == "gaussian" else 1000  # QR of many small matrices is the slow part
    rate, se = simulate_growth(d, alpha, math.sqrt(critical), weights, chains=chains)
    assert abs(rate) < 4 * se + 1e-3, (rate, se)
    # ... while He's scale (gain sqrt(2/(1+alpha^2))) shrinks the signal at the predicted rate
    he_rate, he_se = simulate_growth(d, alpha, math.sqrt(he_variance(alpha)), weights, chains=chains, seed=1)
    predicted = lyapunov_exponent(d, alpha, math.sqrt(he_variance(alpha)), weights)
    assert abs(he_rate - predicted) < 4 * he_se + 1e-3, (he_rate, predicted)
    assert predicted < -0.05 and he_rate < -10 * he_se


def test_bad_options_are_user_errors():
    for options in ({"negative_slope": 0.0}, {"weights": "uniform"}, {"activation": "tanh"},
                    {"negative_slope": float("nan")}):
        with pytest.raises(UserError, match="method\\."):
            make(**options)


def test_zero_slope_fails_on_the_command_line_with_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "stabbench.cli", "run", "method=lyapunov", "method.negative_slope=0",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert "method.negative_slope=0" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("weights", ["gaussian", "orthogonal"])
def test_built_network_uses_the_critical_scale(weights):
    method = make(weights=weights, negative_slope=0.1)
    torch.manual_seed(0)
    model = method.build(Shape(in_features=30, out_features=5, depth=4, width=256))
    model.requires_grad_(False)
    first, square, output = model.layers[0], model.layers[1:-1], model.layers[-1]
    assert all(layer.bias is None for layer in model.layers[:-1])  # bias-free hidden layers
    assert float(first.weight.std()) == pytest.approx(math.sqrt(he_variance(0.1) / 30), rel=0.05)
    assert float(output.bias.abs().max()) == 0.0
    for layer in square:
        w = layer.weight.double()
        if weights == "gaussian":
            assert float(w.std()) == pytest.approx(math.sqrt(critical_variance(256, 0.1) / 256), rel=0.01)
        else:
            eta2 = critical_gain_squared(256, 0.1)
            assert torch.allclose(w.T @ w, eta2 * torch.eye(256, dtype=torch.float64), atol=1e-4)
    constants = method.constants(model)
    assert constants[{"gaussian": "sigma2_crit", "orthogonal": "eta2_crit"}[weights]] > he_variance(0.1)
    assert constants["he_exponent"] < 0


def test_sampling_variant_is_deterministic_and_keeps_the_flattest_candidate():
    shape = Shape(in_features=8, out_features=2, depth=30, width=4)
    plain, sampled = make(), make(sampling=True)
    torch.manual_seed(3)
    first = plain.build(shape)
    probe = torch.randn(64, 8)  # the variant draws its probe batch right after its first candidate
    torch.manual_seed(3)
    chosen = sampled.build(shape)
    torch.manual_seed(3)
    again = sampled.build(shape)
    for a, b in zip(chosen.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert abs(float(measured_growth(chosen, probe))) <= abs(float(measured_growth(first, probe)))
    assert sampling_candidates(30) == 6 and sampling_candidates(200) == 15
    assert sampled.constants(chosen)["sampling_candidates"] == 6
    # with 6 candidates it should pick another draw than the first for most seeds
    differs = 0
    for seed in range(5):
        torch.manual_seed(seed)
        one = plain.build(shape)
        torch.manual_seed(seed)
        best = sampled.build(shape)
        differs += not torch.equal(one.layers[1].weight, best.layers[1].weight)
    assert differs >= 2


@pytest.mark.slow
def test_lyapunov_trains_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, "-m", "stabbench.cli", "run", "method=lyapunov", "depth=30", "width=64",
                           "epochs=1", "device=cpu", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["diverged"] is False
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["test_loss"])
    train = [float(line.split(",")[5]) for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]
             if ",train," in line]
    assert max(train[-2:]) < train[0]  # the loss went down from its value at init
