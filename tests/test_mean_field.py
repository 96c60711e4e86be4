"""Mean-field theory (stabbench/mean_field.py, docs/theory.md) against independent numbers:
Monte Carlo of the maps, the closed forms of the linear and ReLU networks, Schoenholz et al.'s
critical point for tanh; and its use: method.weight_var / bias_var, the probe's block."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from stabbench import mean_field as mf
from stabbench import methods
from stabbench.errors import UserError
from stabbench.methods.base import Shape
from stabbench.methods.bsnn import GPNActivation
from stabbench.model import Activation

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 1_000_000


def monte_carlo(f, generator, dims=1):
    """Mean and standard error of f(z) over SAMPLES standard-normal draws (float64)."""
    z = torch.randn(dims, SAMPLES, generator=generator, dtype=torch.float64)
    values = f(*z)
    return float(values.mean()), float(values.std() / math.sqrt(SAMPLES))


def phi_numpy(activation):
    return lambda u: activation(u)


ACTIVATIONS = {
    "tanh": Activation("tanh"),
    "selu": Activation("selu"),
    "gpn_relu": GPNActivation("relu"),  # kinked and shifted: phi(0) = b != 0
    "gelu": Activation("gelu"),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_length_and_correlation_maps_match_monte_carlo(name):
    phi = ACTIVATIONS[name]
    generator = torch.Generator().manual_seed(0)
    weight_var, bias_var = 1.7, 0.1
    for q in (0.3, 1.0, 2.5):
        mean, se = monte_carlo(lambda z: phi(math.sqrt(q) * z) ** 2, generator)
        assert abs(mf.length_map(phi, q, weight_var, bias_var) - (weight_var * mean + bias_var)) < 5 * weight_var * se
    for q_a, q_b, c in ((1.0, 1.0, 0.9), (0.5, 2.0, -0.4), (1.3, 1.3, 0.2), (0.8, 0.8, 0.999)):
        expected, se = monte_carlo(lambda z1, z2: phi(math.sqrt(q_a) * z1)
                                   * phi(math.sqrt(q_b) * (c * z1 + math.sqrt(1 - c * c) * z2)), generator, dims=2)
        got = mf.pair_expectations(phi, q_a, q_b, c)["phi_phi"]
        assert abs(got - expected) < 5 * se, (q_a, q_b, c)


def test_linear_network_closed_forms():
    linear = Activation("linear")
    for weight_var, bias_var in ((0.5, 0.2), (0.9, 0.05)):
        p = mf.predict(linear, weight_var, bias_var)
        assert p.q_star == pytest.approx(bias_var / (1 - weight_var), rel=1e-8)
        assert p.chi_1 == pytest.approx(weight_var, rel=1e-12)  # phi' = 1
        assert p.chi_q == pytest.approx(weight_var, rel=1e-10)  # the length map is affine
        assert p.phase == "ordered" and p.c_star == 1.0
    assert math.isinf(mf.predict(linear, 1.2, 0.1).q_star)  # sigma_w^2 > 1: the length map diverges


def arc_cosine(q, c):
    """E[relu(u_a) relu(u_b)] at equal variances q and correlation c (Cho & Saul 2009)."""
    return q / (2 * math.pi) * (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c)


def test_relu_closed_forms():
    relu = Activation("relu")
    for weight_var in (1.0, 1.5, 1.9):
        p = mf.predict(relu, weight_var, 0.1)
        assert p.chi_1 == pytest.approx(weight_var / 2, rel=1e-10)
        assert p.q_star == pytest.approx(0.1 / (1 - weight_var / 2), rel=1e-8)  # q = sigma_w^2 q / 2 + sigma_b^2
    for q in (0.4, 2.0):
        for c in (-0.95, -0.3, 0.0, 0.5, 0.99):
            assert mf.pair_expectations(relu, q, q, c)["phi_phi"] == pytest.approx(arc_cosine(q, c), abs=1e-12)
    assert mf.critical_weight_var(relu, 0.1) == pytest.approx(2.0, rel=1e-8)


def test_tanh_critical_point_matches_the_paper_and_monte_carlo():
    tanh = Activation("tanh")
    critical = mf.critical_weight_var(tanh, 0.05)
    assert critical == pytest.approx(1.76, abs=0.01)  # Schoenholz et al. 2017, Fig. 1 at sigma_b^2 = 0.05
    # Independently: iterate the length map by Monte Carlo to q*, then chi_1 by Monte Carlo there.
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(SAMPLES, generator=generator, dtype=torch.float64)
    q = 1.0
    for _ in range(60):
        q = critical * float(torch.tanh(math.sqrt(q) * z).pow(2).mean()) + 0.05
    chi_1 = critical * float((1 - torch.tanh(math.sqrt(q) * z) ** 2).pow(2).mean())
    assert chi_1 == pytest.approx(1.0, abs=2e-3)
    assert mf.predict(tanh, critical, 0.05).phase == "critical"
    assert math.isinf(mf.predict(tanh, critical, 0.05).xi_c)


def test_chaotic_fixed_point_and_depth_scales_by_independent_computation():
    tanh = Activation("tanh")
    p = mf.predict(tanh, 4.0, 0.05)
    assert p.phase == "chaotic" and 0 < p.c_star < 1
    generator = torch.Generator().manual_seed(2)
    s, c = math.sqrt(p.q_star), p.c_star
    mapped, se = monte_carlo(lambda z1, z2: torch.tanh(s * z1) * torch.tanh(s * (c * z1 + math.sqrt(1 - c * c) * z2)),
                             generator, dims=2)
    assert (4.0 * mapped + 0.05) / p.q_star == pytest.approx(c, abs=5 * 4.0 * se / p.q_star)  # a fixed point
    # chi_c is the C-map's slope at c*: a finite difference of the map itself
    slope = (mf.correlation_map(tanh, c + 1e-5, p.q_star, 4.0, 0.05)
             - mf.correlation_map(tanh, c - 1e-5, p.q_star, 4.0, 0.05)) / 2e-5
    assert p.chi_c == pytest.approx(float(slope), rel=1e-6)
    assert p.xi_c == pytest.approx(-1 / math.log(float(slope)), rel=1e-5)
    # chi_q is the length map's slope at q*
    for phi, weight_var in ((tanh, 1.5), (GPNActivation("relu"), 0.8)):
        p = mf.predict(phi, weight_var, 0.05)
        slope = (mf.length_map(phi, p.q_star * (1 + 1e-6), weight_var, 0.05)
                 - mf.length_map(phi, p.q_star * (1 - 1e-6), weight_var, 0.05)) / (2e-6 * p.q_star)
        assert p.chi_q == pytest.approx(float(slope), rel=1e-5)


@pytest.mark.parametrize("weight_var", [1.5, 2.0, 3.0, 4.0])
def test_zero_bias_chaotic_fixed_point_is_the_stable_zero_not_minus_one(weight_var):
    """An odd phi without bias has C(-1) = -1 exactly, but that fixed point is unstable (slope
    chi_1 > 1); correlations go to c* = 0. Independently, with numpy's Gauss-Hermite rule (not
    mean_field's split Legendre panels; tanh is smooth): q* by iterating the length map,
    chi_c = sigma_w^2 E[tanh'(u)]^2 there (u_a, u_b independent at c = 0), and the two-input
    map iterated from c = 0.9 and from c = -0.9 falls to 0, from -0.9 away from -1."""
    x, w = np.polynomial.hermite_e.hermegauss(120)
    w = w / math.sqrt(2 * math.pi)  # E over N(0, 1)
    q = 1.0
    for _ in range(3000):
        q = weight_var * float(w @ np.tanh(math.sqrt(q) * x) ** 2)
    chi_c = weight_var * float(w @ (1 - np.tanh(math.sqrt(q) * x) ** 2)) ** 2
    outer = w * np.tanh(math.sqrt(q) * x)  # over z1
    c_map = lambda c: weight_var * float(outer @ (np.tanh(math.sqrt(q) * (c * x[:, None] + math.sqrt(1 - c * c) * x))
                                                  @ w)) / q
    for c in (0.9, -0.9):
        for _ in range(2000):
            c = c_map(c)
        assert abs(c) < 1e-6
    p = mf.predict(Activation("tanh"), weight_var, 0.0)
    assert p.phase == "chaotic" and p.c_star == 0.0 and not p.undefined
    assert p.q_star == pytest.approx(q, rel=1e-6)
    assert p.chi_c == pytest.approx(chi_c, rel=1e-6) and p.chi_c < 1
    assert p.xi_c == pytest.approx(-1 / math.log(chi_c), rel=1e-5)


@pytest.mark.parametrize("name, weight_var", [("relu", 1.0), ("relu", 1.5), ("relu", 3.0), ("tanh", 0.5),
                                              ("tanh", 0.9), ("linear", 0.5), ("linear", 1.5)])
def test_no_depth_scale_where_q_star_is_zero_or_infinite(name, weight_var):
    """ReLU without bias (q* = 0 below sigma_w^2 = 2, inf above) and tanh without bias below
    sigma_w^2 = 1 (q* = 0): the normalised correlation map has slope 1 at c = 1, the same map
    whatever sigma_w^2, so there is no xi_c; it is undefined, with the reason, not -1/log chi_1."""
    p = mf.predict(Activation(name), weight_var, 0.0)
    assert p.q_star in (0.0, math.inf)
    assert set(p.undefined) == {"c_star", "chi_c", "xi_c"} and "q* =" in p.undefined["xi_c"]
    assert math.isnan(p.xi_c) and math.isnan(p.chi_c) and math.isnan(p.c_star)
    assert p.as_dict()["undefined"]["six_xi_c"] == p.undefined["xi_c"]
    if name == "relu":  # the normalised map is the arc-cosine kernel's, sigma_w^2 drops out
        for c in (0.2, 0.9):
            normalised = arc_cosine(1.0, c) / arc_cosine(1.0, 1.0)
            assert normalised == pytest.approx(float(mf.pair_expectations(Activation("relu"), 1.0, 1.0, c)["phi_phi"])
                                               / float(mf.pair_expectations(Activation("relu"), 1.0, 1.0, 1.0)["phi_phi"]))


def test_a_depth_scale_within_rounding_of_one_is_infinite():
    assert mf.depth_scale(1.0 - 4e-14) == math.inf  # was 2.5e13 at tanh's critical point without bias
    assert mf.depth_scale(0.999) == pytest.approx(-1 / math.log(0.999))
    assert math.isnan(mf.depth_scale(math.nan))


def test_gpn_activations_sit_on_the_critical_line():
    # GPN: E[phi(z)^2] = 1 and E[phi'(z)^2] = 1 under N(0, 1): with sigma_w^2 = 1, sigma_b^2 = 0, q* = 1 and chi_1 = 1
    for name in ("tanh", "selu", "relu"):
        p = mf.predict(GPNActivation(name), 1.0, 0.0)
        assert p.q_star == pytest.approx(1.0, abs=1e-8) and p.chi_1 == pytest.approx(1.0, abs=1e-6), name


# -- method.weight_var / method.bias_var ---------------------------------------------------

def method_config(name, **options):
    cfg = OmegaConf.structured(methods.REGISTRY[name].Config)
    for key, value in options.items():
        cfg[key] = value
    return cfg


@pytest.mark.parametrize("name", ["baseline", "self_stabilizer"])
def test_weight_and_bias_variances_are_drawn_as_set(name):
    method = methods.create(method_config(name, weight_var=2.5, bias_var=0.3))
    torch.manual_seed(0)
    model = method.build(Shape(300, 10, 3, 400))
    hidden = model.layers[1]
    assert float(hidden.weight.var()) * 400 == pytest.approx(2.5, rel=0.01)
    assert float(model.layers[0].weight.var()) * 300 == pytest.approx(2.5, rel=0.01)  # every layer: fan_in
    assert float(torch.cat([l.bias for l in model.layers[:-1]]).var()) == pytest.approx(0.3, rel=0.1)
    spec = method.mean_field(Shape(300, 10, 3, 400))
    assert (spec.weight_var, spec.bias_var, spec.input_weight_var) == (2.5, 0.3, 2.5)


@pytest.mark.parametrize("key,value,allowed", [("weight_var", 0.0, "> 0"), ("weight_var", -1.0, "> 0"),
                                               ("bias_var", -0.1, ">= 0"), ("weight_var", float("nan"), "finite")])
def test_bad_variances_are_one_line_errors(key, value, allowed):
    with pytest.raises(UserError, match=allowed) as error:
        methods.create(method_config("baseline", **{key: value}))
    assert f"method.{key}" in str(error.value) and "\n" not in str(error.value)


def test_bad_variance_on_the_command_line_exits_2_without_a_directory(tmp_path):
    out = tmp_path / "never"
    done = subprocess.run([sys.executable, "-m", "stabbench.cli", "run", "method=self_stabilizer",
                           "method.weight_var=-2", f"hydra.run.dir={out}"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "method.weight_var=-2" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


# -- the probe's block -------------------------------------------------------------------------

def test_probe_q_l_follows_the_length_map_and_the_pre_activations_are_the_networks(tmp_path):
    from tests.test_probe import probe_run
    from stabbench import probe_theory
    from stabbench.train import build_ensemble

    summary = probe_run(tmp_path, "method=baseline", "method.weight_var=1.5", "method.bias_var=0.05", "depth=12",
                        "width=512", "probe.networks=4", "probe.batch_size=32", "probe.jacobian_examples=0")
    block = summary["mean_field"]
    assert block["applies"] and block["phase"] == "ordered"
    assert block["chi_1"] == pytest.approx(mf.predict(Activation("tanh"), 1.5, 0.05).chi_1)
    assert block["q_max_relative_error"] < 0.05 and block["c_max_abs_error"] < 0.05
    # The measured q_l against pre-activations computed here from the drawn weights (seeds 0..3)
    method = methods.create(method_config("baseline", weight_var=1.5, bias_var=0.05))
    from tests.test_probe import config
    from stabbench import probe

    x = probe.probe_batch(config("probe.batch_size=32"), torch.device("cpu"))[0]
    shape = Shape(x.shape[1], 10, 12, 512)
    ensemble = build_ensemble(method, shape, [0, 1, 2, 3], torch.device("cpu"))
    q = []
    for k in range(4):
        model, h_in, per_layer = ensemble.member(k), x, []
        with torch.no_grad():
            for layer in model.layers[:-1]:
                h = h_in @ layer.weight.T + layer.bias
                per_layer.append(float((h.double() ** 2).mean()))
                h_in = torch.tanh(h)
        q.append(per_layer)
    assert np.allclose(np.mean(q, 0), block["measured"]["q"], rtol=1e-5)
    assert np.allclose(probe_theory.pre_activation_stats(ensemble, x, torch.device("cpu"))["q"], q, rtol=1e-5)


def test_probe_block_for_a_method_outside_the_theory_says_why(tmp_path):
    from tests.test_probe import probe_run

    summary = probe_run(tmp_path, "method=bsnn", "method.batch_norm=true", "depth=4", "width=16", "probe.networks=2",
                        "probe.batch_size=16")
    block = summary["mean_field"]
    assert block["applies"] is False and "batch" in block["note"]
    assert len(block["measured"]["q"]) == 4 and "chi_1" not in block
    assert summary["deep_jacobian"]["theory_mean_squared"] is None


def test_deep_jacobian_mean_square_is_chi_1_to_the_depth_on_a_gaussian_tanh_net():
    """Pennington et al. 2017: E[s^2] of d x_L / d x_1 = chi_1^(L-1) in the wide limit, inputs at q*."""
    from stabbench import probe_theory
    from stabbench.train import build_ensemble

    weight_var, bias_var, depth, width = 2.5, 0.05, 12, 384
    tanh = Activation("tanh")
    p = mf.predict(tanh, weight_var, bias_var)
    method = methods.create(method_config("baseline", weight_var=weight_var, bias_var=bias_var))
    ensemble = build_ensemble(method, Shape(width, 10, depth, width), list(range(6)), torch.device("cpu"))
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0))
    x = x / x.pow(2).mean(1, keepdim=True).sqrt() * math.sqrt((p.q_star - bias_var) / weight_var)  # q_1 = q*
    sv = probe_theory.deep_jacobian_singular_values(ensemble, x, 4, torch.device("cpu"))
    assert sv.shape == (6, 4, width)
    measured = float((sv ** 2).mean())
    assert p.chi_1 ** (depth - 1) > 2.5  # far from 1: the test tells chi_1's power from isometry
    print(measured, p.chi_1 ** (depth - 1))
    assert measured == pytest.approx(p.chi_1 ** (depth - 1), rel=0.1)
