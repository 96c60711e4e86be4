"""tat: the transformed network keeps the method's own promise, checked by our quadrature of
the module the network runs (not by dks): the whole network's C-map value at 0 is TAT's
target, its slope at 1 DKS's; the quadrature itself against the leaky-ReLU closed form; the
module against dks's function; dks's weights and input normalisation; bad options."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from stabbench.errors import UserError
from stabbench.methods import create
from stabbench.methods.base import Shape
from stabbench.methods.tat import (Config, PerLocationNormalization, TransformedActivation, local_c_map,
                                   network_c_map, transform_parameters)


def make(**options):
    return create(OmegaConf.structured(Config(**options)))


def drawn(depth: int, width: int = 32, in_features: int = 20, **options):
    method = make(**options)
    torch.manual_seed(0)
    return method, method.build(Shape(in_features, 10, depth, width))


def leaky_relu_c_map(c: float, slope: float) -> float:
    """The arc-cosine kernel of leaky ReLU normalised to C(1) = 1 (Cho & Saul 2009; TAT, eq. for LReLU)."""
    relu = (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi
    return ((1 - slope) ** 2 * relu + 2 * slope * c) / (1 + slope ** 2)


@pytest.mark.parametrize("c", [0.0, 0.3, 0.9, 0.999])
def test_quadrature_matches_the_leaky_relu_closed_form(c):
    phi = TransformedActivation("leaky_relu", {"negative_slope": 0.3, "output_scale": 2.0, "input_shift": 0.0})
    assert local_c_map(phi, c) == pytest.approx(leaky_relu_c_map(c, 0.3), abs=1e-9)


@pytest.mark.parametrize("depth, target", [(50, 0.9), (20, 0.7)])
def test_tat_network_c_map_at_0_is_the_target(depth, target):
    method, model = drawn(depth, c_val_0_target=target)
    figures = method.constants(model)
    assert figures["network_c_map_0"] == pytest.approx(target, abs=1e-6)
    assert figures["local_q_map_1"] == pytest.approx(1.0, abs=1e-9)  # q = 1 kept layer to layer
    assert figures["network_c_slope_1"] == pytest.approx(1.0, abs=1e-6)  # leaky ReLU at q = 1: C'(1) = 1
    assert 0 < figures["negative_slope"] < 1 and model.activation.negative_slope == figures["negative_slope"]


@pytest.mark.parametrize("activation", ["tanh", "softplus"])
def test_dks_network_c_slope_at_1_is_the_target(activation):
    method, model = drawn(20, transform="dks", activation=activation, c_slope_1_target=1.5)
    figures = method.constants(model)
    assert figures["network_c_slope_1"] == pytest.approx(1.5, rel=1e-5)
    assert figures["network_c_map_0"] == pytest.approx(0.0, abs=1e-6)  # DKS: every local C(0) = 0
    assert figures["local_q_map_1"] == pytest.approx(1.0, abs=1e-6)


def test_deeper_tat_network_bends_each_layer_less():
    # eta is the whole network's C(0): spread over more layers, each is closer to linear.
    shallow = transform_parameters("leaky_relu", "tat", 20, 0.9)["negative_slope"]
    deep = transform_parameters("leaky_relu", "tat", 100, 0.9)["negative_slope"]
    assert 0 < shallow < deep < 1


@pytest.mark.slow  # 84 orthogonal draws of 1024 x 1024
def test_the_drawn_wide_network_has_the_c_map_it_promises():
    """On the drawn network itself: two orthogonal inputs of q = 1 come out of the last hidden
    layer with cosine similarity ~ the network's C(0) (finite width: within a few hundredths)."""
    width, draws = 1024, 4
    method = make(c_val_0_target=0.8, input_normalization="none")
    inputs = torch.linalg.qr(torch.randn(width, 16, generator=torch.Generator().manual_seed(1)))[0].T * math.sqrt(width)
    q_means, cosines = [], []
    for seed in range(draws):
        torch.manual_seed(seed)
        with torch.no_grad():
            last = method.build(Shape(width, 10, 20, width))(inputs, keep_hidden=True)["hidden"][-1]
        q = last.pow(2).mean(-1)
        cosine = (last @ last.T) / width / torch.sqrt(q[:, None] * q[None, :])
        q_means.append(q.mean().item())
        cosines.append(cosine[~torch.eye(16, dtype=torch.bool)].mean().item())
    assert sum(q_means) / draws == pytest.approx(1.0, abs=0.15)  # q = 1 kept (each draw drifts ~5% a layer / sqrt(width))
    assert sum(cosines) / draws == pytest.approx(0.8, abs=0.05)


@pytest.mark.parametrize("transform, activation", [("tat", "leaky_relu"), ("dks", "tanh")])
def test_module_equals_dks_transformed_function(transform, activation):
    from dks.pytorch.activation_transform import get_transformed_activations

    depth, target = 20, (0.9 if transform == "tat" else 1.5)

    def subnet_max(x, local_map):
        for _ in range(depth):
            x = local_map(x)
        return x

    params = {"tat_params": {"c_val_0_target": target}} if transform == "tat" else {"dks_params": {"c_slope_1_target": target}}
    theirs = get_transformed_activations([activation], method=transform.upper(), subnet_max_func=subnet_max,
                                         **params)[activation]
    ours = TransformedActivation(activation, transform_parameters(activation, transform, depth, target))
    x = torch.linspace(-6, 6, 4001, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


def test_weights_are_scaled_uniform_orthogonal_and_biases_zero():
    _, model = drawn(6, width=32, in_features=20, c_val_0_target=0.5)
    first, hidden, last = model.layers[0].weight, model.layers[2].weight, model.layers[-1].weight
    eye = lambda n: torch.eye(n)
    # 21 inputs (20 + PLN's coordinate) to 32 units: orthonormal columns scaled by sqrt(32 / 21)
    torch.testing.assert_close(first.T @ first, eye(21) * 32 / 21, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.T @ hidden, eye(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(last @ last.T, eye(10), atol=1e-5, rtol=0)  # 32 -> 10: orthonormal rows
    assert all(layer.bias.abs().max() == 0 for layer in model.layers)


def test_per_location_normalization_gives_q_1_as_dks_does():
    from dks.pytorch.data_preprocessing import per_location_normalization

    x = torch.randn(8, 20, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 9)[:, None]
    ours = PerLocationNormalization()(x)
    assert ours.shape == (8, 21)
    torch.testing.assert_close(ours.pow(2).mean(-1), torch.ones(8))
    torch.testing.assert_close(ours, per_location_normalization(x, homog_mode="one"))
    stacked = PerLocationNormalization()(torch.stack([x, 2 * x]))  # seeds stacked: each row on its own
    torch.testing.assert_close(stacked[1], PerLocationNormalization()(2 * x))
    torch.testing.assert_close(stacked[0], ours)


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match=r"method.activation='tanh'.*leaky_relu"):
        make(activation="tanh")  # TAT's leaky-ReLU form only; tanh goes with transform=dks
    with pytest.raises(UserError, match="method.transform"):
        make(transform="ntk")
    with pytest.raises(UserError, match="method.negative_slope=0.2 is TAT's to choose"):
        make(negative_slope=0.2)
    with pytest.raises(UserError, match="method.c_slope_1_target=1.0"):
        make(transform="dks", activation="tanh", c_slope_1_target=1.0)
    with pytest.raises(UserError, match="method.activation='relu'"):
        make(transform="dks", activation="relu")
    with pytest.raises(UserError, match=r"method.c_val_0_target=0.9 cannot be reached .* depth=3"):
        make().parameters(3)


def test_unreachable_target_fails_before_any_directory(cli, tmp_path):
    code, _, err = cli("run", "method=tat", "depth=3", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and "method.c_val_0_target=0.9 cannot be reached" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_the_probe_reports_the_network_c_map(cli, tmp_path):
    code, _, err = cli("probe", "method=tat", "depth=16", "width=16", "probe.networks=2", "device=cpu",
                       f"hydra.run.dir={tmp_path / 'probe'}")
    assert code == 0, err
    constants = json.loads((tmp_path / "probe" / "probe.json").read_text())["constants"]
    assert constants["network_c_map_0"] == pytest.approx(0.9, abs=1e-6)
    assert constants["transform"] == "tat" and 0 < constants["negative_slope"] < 1


@pytest.mark.slow
def test_tat_trains(cli, tmp_path):
    code, _, err = cli("run", "method=tat", "depth=16", "width=32", "dataset.n_train=1024", "dataset.n_test=256",
                       "epochs=6", "lr=0.05", "seeds=2", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, err
    members = json.loads((tmp_path / "run" / "summary.json").read_text())["seeds"]
    assert all(not m["diverged"] for m in members)
    train_rows = pd.read_csv(tmp_path / "run" / "metrics.csv").query("split == 'train'")
    for _, rows in train_rows.groupby("seed"):
        assert rows.loss.iloc[-1] < 0.9 * rows.loss.iloc[0]
