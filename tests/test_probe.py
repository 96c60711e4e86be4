"""`stabbench probe`: its files, its figures against direct computation, and the claims it
exists to show (Lyapunov init vs He; BSNN's GPN vs plain SELU)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module

from stabbench import methods, probe
from stabbench.config import register_schemas
from stabbench.methods.base import Shape
from stabbench.methods.lyapunov import he_variance, lyapunov_exponent

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["network", "seed", "layer", "kind", "act_mean", "act_std", "act_log_norm", "grad_norm", "log_grad_norm",
           "homogeneous"]


def config(*overrides, hydra=False):
    register_schemas()
    with initialize_config_module(config_module="stabbench.conf", version_base="1.3"):
        return compose(config_name="probe", overrides=["device=cpu", *overrides], return_hydra_config=hydra)


def probe_run(tmp_path, *overrides) -> dict:
    out = tmp_path / "_".join(o.replace("/", "") for o in overrides)[:120]
    out.mkdir(parents=True)
    return probe.run(config(*overrides), out)


def probe_with_its_batch(tmp_path, *overrides):
    """(probe.json, probe_layers.csv, the probe's batch (x, targets, task, n_outputs, source,
    error), the method) for a direct computation on the same draws."""
    summary = probe_run(tmp_path, *overrides)
    layers = pd.read_csv(next(tmp_path.glob("*/probe_layers.csv")))
    cfg = config(*overrides)
    return summary, layers, probe.probe_batch(cfg, torch.device("cpu")), methods.create(cfg.method)


def test_probe_command_writes_its_files(tmp_path):
    out = tmp_path / "probe"
    done = subprocess.run([sys.executable, "-m", "stabbench.cli", "probe", "depth=5", "width=8", "probe.networks=3",
                           "probe.batch_size=32", "seed=4", "device=cpu", f"hydra.run.dir={out}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "growth of log ||x_l||" in done.stdout and str(out) in done.stdout

    layers = pd.read_csv(out / "probe_layers.csv")
    assert list(layers.columns[:len(COLUMNS)]) == COLUMNS
    assert len(layers) == 3 * 6  # draws x (depth + 1) weight layers
    assert sorted(layers.seed.unique()) == [4, 5, 6] and sorted(layers.network.unique()) == [0, 1, 2]
    assert list(layers[layers.network == 0].kind) == ["input"] + ["hidden"] * 4 + ["output"]
    assert np.isfinite(layers[["act_std", "act_log_norm", "grad_norm"]].to_numpy()).all()
    assert (layers.grad_norm > 0).all()

    summary = json.loads((out / "probe.json").read_text())
    assert summary["seeds"] == [4, 5, 6] and summary["networks"] == 3 and summary["inputs"] == "standard_normal"
    assert {"mean", "se", "per_network"} <= set(summary["lyapunov_exponent"])
    assert {"mean", "std", "min", "max", "per_network"} <= set(summary["grad_norm_ratio"])
    assert summary["constants"]["init"] == "xavier"  # the baseline's constants()
    jac = summary["jacobian_singular_values"]
    # d logits / d input is 10 x 64 through a width-8 layer: rank 8, the rest are rounding noise
    assert jac["values_per_example"] == 8 and 0 < jac["min"] <= jac["mean"] <= jac["max"]

    from PIL import Image

    png = out / "probe.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.size[0] > 600 and image.size[1] > 300


def test_probe_outputs_go_under_results_probes_unless_overridden():
    cfg = config("method=lyapunov", "depth=7", hydra=True)
    assert cfg.hydra.run.dir.startswith("results/probes/") and cfg.hydra.run.dir.endswith("_lyapunov_synthetic_d7_w128_s0")
    assert cfg.hydra.sweep.dir.startswith("results/probes/sweeps/")
    assert config("hydra.run.dir=/tmp/mine", hydra=True).hydra.run.dir == "/tmp/mine"


def test_probe_figures_match_a_direct_computation(tmp_path):
    overrides = ("method=baseline", "method.activation=linear", "depth=3", "width=12", "probe.networks=2",
                 "probe.batch_size=16", "seed=2")
    summary, layers, (x, targets, _, n_outputs, _, _), method = probe_with_its_batch(tmp_path, *overrides)
    for network, seed in enumerate((2, 3)):
        torch.manual_seed(seed)
        model = method.build(Shape(x.shape[1], n_outputs, 3, 12))
        out = model(x, keep_hidden=True)
        rows = layers[layers.network == network]
        for l, h in enumerate(out["hidden"]):
            h = h.detach()
            assert rows.act_log_norm.iloc[l] == pytest.approx(float(h.norm(dim=1).log().mean()), rel=1e-5)
            assert rows.act_std.iloc[l] == pytest.approx(float(h.std()), rel=1e-5)
        torch.nn.functional.cross_entropy(out["logits"], targets).backward()
        grad_norms = [float(layer.weight.grad.norm()) for layer in model.layers]
        assert rows.grad_norm.to_numpy() == pytest.approx(grad_norms, rel=1e-4)
        # a linear net's input-output Jacobian is the product of its weight matrices (width 12 > 10
        # outputs: all 10 singular values are far from 0)
        product = model.layers[3].weight @ model.layers[2].weight @ model.layers[1].weight @ model.layers[0].weight
        expected = torch.linalg.svdvals(product.detach().double())
        if network == 0:
            first = expected
    jac = summary["jacobian_singular_values"]
    both = torch.cat([first, expected])
    assert jac["max"] == pytest.approx(float(both.max()), rel=1e-4)
    assert jac["min"] == pytest.approx(float(both.min()), rel=1e-4)
    assert jac["mean"] == pytest.approx(float(both.mean()), rel=1e-4)


def test_no_jacobian_above_width_64(tmp_path):
    summary = probe_run(tmp_path, "depth=2", "width=65", "probe.networks=1", "probe.batch_size=8")
    assert summary["jacobian_singular_values"] is None
    assert summary["lyapunov_exponent"]["mean"] is not None  # depth 2 still has a slope


@pytest.mark.slow  # 13 s; test_growth_matches_the_theory_in_narrow_deep_nets[2-100] checks both inits by default
def test_lyapunov_init_keeps_growth_at_zero_where_he_shrinks(tmp_path):
    common = ("depth=400", "width=16", "probe.networks=8", "probe.batch_size=64")
    lyapunov = probe_run(tmp_path, "method=lyapunov", *common)["lyapunov_exponent"]
    he = probe_run(tmp_path, "method=baseline", "method.activation=leaky_relu", "method.init=he", *common)
    he_rate = he["lyapunov_exponent"]
    predicted = lyapunov_exponent(16, 0.01, math.sqrt(he_variance(0.01)), "gaussian")  # -0.088
    assert abs(lyapunov["mean"]) < max(4 * lyapunov["se"], 0.01) + 0.005, lyapunov
    assert he_rate["mean"] < -0.06 and he_rate["mean"] < -10 * he_rate["se"], he_rate
    assert he_rate["mean"] == pytest.approx(predicted, abs=max(4 * he_rate["se"], 0.01))


def _bsnn_selu(tmp_path, gpn: bool, width: int, networks: int) -> dict:
    return probe_run(tmp_path, "method=bsnn", "method.activation=selu", f"method.gpn={str(gpn).lower()}",
                     "depth=200", f"width={width}", f"probe.networks={networks}", "probe.batch_size=32")


def test_gpn_keeps_gradients_level_where_plain_selu_grows_them(tmp_path):
    # Same orthogonal, bias-free 200-layer net; only GPN differs. SELU has E[phi'(z)^2] =
    # 1/0.966^2 = 1.07 at the fixed point, so the backward signal grows by ~1.07^(1/2) per
    # layer: about 10^3 over 200 layers. GPN's a makes that factor 1.
    gpn = _bsnn_selu(tmp_path, True, 96, 2)["grad_norm_ratio"]
    plain = _bsnn_selu(tmp_path, False, 96, 2)["grad_norm_ratio"]
    assert gpn["max"] < 20, gpn
    assert plain["min"] > 200, plain
    layers = pd.read_csv(next(p for p in tmp_path.glob("*gpn=false*/probe_layers.csv")))
    hidden = layers[(layers.network == 0) & (layers.kind == "hidden")].grad_norm.to_numpy()
    assert hidden[0] > 100 * hidden[-1]  # growing toward the input


@pytest.mark.slow
def test_gpn_gradient_ratio_at_the_papers_shape(tmp_path):
    gpn = _bsnn_selu(tmp_path, True, 500, 4)["grad_norm_ratio"]
    plain = _bsnn_selu(tmp_path, False, 500, 4)["grad_norm_ratio"]
    assert gpn["max"] < 5, gpn
    assert plain["min"] > 300, plain
    tanh = probe_run(tmp_path, "method=bsnn", "depth=200", "width=500", "probe.networks=4",
                     "probe.batch_size=32")["grad_norm_ratio"]  # the default GPN-tanh net
    assert tanh["max"] < 5, tanh


# He's exponent at small widths is the Lyapunov paper's regime: at width 2 a net loses
# ~1.4 nats a layer, so float32 activations are gone by layer 60 and float64 ones by 500.
# width 2 in the default run (the case); the wider ones and the deepest in `make test-all`
NARROW = [(2, 100), pytest.param(4, 100, marks=pytest.mark.slow), pytest.param(16, 100, marks=pytest.mark.slow),
          pytest.param(2, 600, marks=pytest.mark.slow)]


@pytest.mark.parametrize("width,depth", NARROW, ids=lambda v: str(v))
def test_growth_matches_the_theory_in_narrow_deep_nets(tmp_path, width, depth):
    common = (f"depth={depth}", f"width={width}", "probe.networks=16", "probe.batch_size=16",
              "dataset=synthetic_regression")
    he = probe_run(tmp_path, "method=baseline", "method.activation=leaky_relu", "method.init=he", *common)
    theory = lyapunov_exponent(width, 0.01, math.sqrt(he_variance(0.01)), "gaussian")  # -1.435 at width 2
    he_rate = he["lyapunov_exponent"]
    assert abs(he_rate["mean"] - theory) < 3 * he_rate["se"], (he_rate, theory)
    lyapunov = probe_run(tmp_path, "method=lyapunov", *common)["lyapunov_exponent"]
    assert abs(lyapunov["mean"]) < 3 * lyapunov["se"], lyapunov
    # every hidden layer's gradient norm is a finite number, so the ratio over them is too
    layers = pd.read_csv(next(tmp_path.glob("*method.init=he*/probe_layers.csv")))
    assert np.isfinite(layers[layers.kind == "hidden"].log_grad_norm).all()
    assert he["grad_norm_ratio"]["median"] is not None


def test_log_norms_and_gradient_norms_equal_float64_autograd(tmp_path):
    """Depth 60 at width 2: float32 underflows (~e^-86) but float64 does not, so plain float64
    autograd on the same draws is an independent reference for the renormalised figures."""
    overrides = ("method=baseline", "method.activation=leaky_relu", "method.init=he", "depth=60", "width=2",
                 "probe.networks=2", "probe.batch_size=8", "seed=3")
    _, layers, (x, targets, _, n_outputs, _, _), method = probe_with_its_batch(tmp_path, *overrides)
    for network, seed in enumerate((3, 4)):
        torch.manual_seed(seed)
        model = method.build(Shape(x.shape[1], n_outputs, 60, 2)).double()
        out = model(x.double(), keep_hidden=True)
        rows = layers[layers.network == network]
        log_norms = [float(h.detach().norm(dim=1).log().mean()) for h in out["hidden"]]
        assert log_norms[-1] < -60  # below float32's range
        assert rows.act_log_norm.iloc[:60].to_numpy() == pytest.approx(log_norms, abs=1e-8)
        torch.nn.functional.cross_entropy(out["logits"], targets).backward()
        log_grads = [float(layer.weight.grad.norm().log()) for layer in model.layers]
        assert rows.log_grad_norm.to_numpy() == pytest.approx(log_grads, abs=1e-8)
        assert (rows.homogeneous == 1).all()


def test_jacobian_with_batch_norm_is_the_map_at_initialisation(tmp_path):
    """Batch norm in eval mode with the running statistics as built (mean 0, variance 1): the
    probe's train-mode forward must not have moved them before the Jacobian is taken."""
    overrides = ("method=bsnn", "method.batch_norm=true", "depth=3", "width=12", "probe.networks=2",
                 "probe.batch_size=16", "seed=5")
    summary, _, (x, _, _, n_outputs, _, _), method = probe_with_its_batch(tmp_path, *overrides)
    expected = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        model = method.build(Shape(x.shape[1], n_outputs, 3, 12)).double().eval()
        for example in x[:probe.JACOBIAN_EXAMPLES].double():
            jac = torch.autograd.functional.jacobian(lambda e: model(e[None])["logits"][0], example)
            expected.append(torch.linalg.svdvals(jac)[:10])
    expected = torch.stack(expected)
    jac = summary["jacobian_singular_values"]
    assert jac["mean"] == pytest.approx(float(expected.mean()), rel=1e-9)
    assert jac["min"] == pytest.approx(float(expected.min()), rel=1e-9)
    assert jac["max"] == pytest.approx(float(expected.max()), rel=1e-9)
    # the mode is named where the figures are shown: batch norm is the identity here, not in training
    assert "batch norm at its running statistics" in jac["of"]
    assert "batch norm at its running statistics" in summary["deep_jacobian"]["of"]
    plain = probe_run(tmp_path / "plain", "method=bsnn", "depth=3", "width=12", "probe.networks=2",
                      "probe.batch_size=16")
    assert plain["deep_jacobian"]["of"] == "d x_3 / d x_1, eval mode"


def test_the_deep_jacobian_is_float64_below_float32s_floor(tmp_path):
    """A narrow, deep, ordered net: d x_depth / d x_1 has singular values far below float32's
    resolution of the largest (about 1e-7 of it, 1e-11 absolute at the BSNN shape). Against a
    float64 jacrev of the same member, the smallest and the mean log agree to float64 accuracy."""
    from torch.func import jacrev

    from stabbench import probe_theory

    cfg = config("method=baseline", "method.activation=tanh", "method.weight_var=0.6", "depth=40", "width=24",
                 "probe.networks=1", "probe.batch_size=8", "device=cpu")
    method = methods.create(cfg.method)
    from stabbench.train import build_ensemble

    ensemble = build_ensemble(method, Shape(24, 10, 40, 24), [0], torch.device("cpu"))
    x = torch.randn(2, 24, generator=torch.Generator().manual_seed(0))
    sv = probe_theory.deep_jacobian_singular_values(ensemble, x, 2, torch.device("cpu"))
    member = ensemble.member(0).double().eval()
    hidden = member.layers[:-1]

    def deep(x1):
        for layer in hidden[1:]:
            x1 = member.activation(layer(x1[None]))[0]
        return x1

    with torch.no_grad():
        x1 = member.activation(hidden[0](member.map_input(x.double())))
    expected = torch.stack([torch.linalg.svdvals(jacrev(deep)(row)) for row in x1]).detach().numpy()
    assert expected.min() < 1e-12 * expected.max()  # far beyond float32's floor
    assert sv.min() < 1e-12 * sv.max()  # in float32 the smallest stopped at ~1e-7 of the largest
    np.testing.assert_allclose(sv[0], expected, rtol=1e-6, atol=1e-14 * expected.max())  # float64's own floor


def test_gaussian_error_is_backpropagated_from_the_last_hidden_layer(tmp_path):
    """probe.error=gaussian: E = sum over examples of e_i . x_depth,i with e ~ N(0, I) drawn
    independently of the forward pass; no output layer, no loss (the BSNN paper's synthetic setting)."""
    overrides = ("method=bsnn", "method.activation=selu", "depth=5", "width=12", "dataset.features=12",
                 "probe.networks=2", "probe.batch_size=8", "seed=1", "probe.error=gaussian")
    summary, layers, (x, _, _, n_outputs, _, error), method = probe_with_its_batch(tmp_path, *overrides)
    assert summary["error"] == "gaussian"
    assert error.shape == (8, 12) and torch.equal(x, probe.probe_batch(config(*overrides[:-1]), torch.device("cpu"))[0])
    for network, seed in enumerate((1, 2)):
        torch.manual_seed(seed)
        model = method.build(Shape(12, n_outputs, 5, 12)).double()
        hidden = model(x.double(), keep_hidden=True)["hidden"]
        (error.double() * hidden[-1]).sum().backward()
        params = dict(model.named_parameters())
        expected = [float(params[name].grad.norm().log()) for name in model.weight_param_names()[:-1]]
        rows = layers[layers.network == network]
        assert rows.log_grad_norm.iloc[:5].to_numpy() == pytest.approx(expected, abs=1e-9)
        assert np.isnan(rows.log_grad_norm.iloc[5]) and rows.kind.iloc[5] == "output"  # no output layer in E


def test_bad_error_mode_is_a_one_line_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "stabbench.cli", "probe", "probe.error=uniform", "device=cpu",
                           f"hydra.run.dir={tmp_path / 'p'}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and not (tmp_path / "p").exists()
    assert done.stderr.strip().splitlines() == [
        "stabbench: error: probe.error='uniform' is not allowed; choose one of: loss, gaussian"]


def test_a_probe_sweep_draws_its_probes_together(tmp_path):
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "stabbench.cli", "probe", "-m", "method=bsnn", "method.gpn=true,false",
                           "depth=4", "width=8", "probe.networks=2", "probe.batch_size=8", "probe.error=gaussian",
                           "device=cpu", f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(sweep.glob("*/probe.json"))) == 2 and f"wrote {sweep / 'probe_sweep.png'}" in done.stdout
    from PIL import Image

    with Image.open(sweep / "probe_sweep.png") as image:
        image.verify()
    assert not (sweep / "report").exists()  # no training runs: no report


@pytest.mark.parametrize("overrides, c_star", [
    (("method.activation=tanh", "method.weight_var=3.0"), 0.0),  # the stable fixed point, not -1
    (("method.activation=relu", "method.weight_var=1.0"), None),  # q* = 0: no depth scale
])
def test_the_probe_prints_c_star_and_xi_c_or_says_why_there_is_none(tmp_path, overrides, c_star):
    args = ["probe", "method=baseline", *overrides, "depth=30", "width=64", "probe.networks=2",
            "probe.jacobian_examples=0", "device=cpu", "hydra.run.dir=p"]
    done = subprocess.run([sys.executable, "-m", "stabbench.cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    block = json.loads((tmp_path / "p" / "probe.json").read_text())["mean_field"]
    row = next(line for line in done.stdout.splitlines() if "xi_q, xi_c" in line)
    if c_star is None:
        assert block["xi_c"] is None and "q* = 0" in block["undefined"]["xi_c"]
        assert "n/a, n/a" in row and "n/a because" in done.stdout
    else:
        assert block["c_star"] == c_star and block["undefined"] == {}
        assert math.isfinite(block["xi_c"]) and f"{block['xi_c']:.4g}" in row
        assert "-0" not in next(line for line in done.stdout.splitlines() if "q*, c*" in line)
