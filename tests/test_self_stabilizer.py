"""self_stabilizer: beta = 1 at init, the same start as the baseline with the same seed,
beta trained and logged in layers.csv, options checked."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY
from stabbench.errors import UserError
from stabbench.methods import create
from stabbench.methods.base import Shape
from stabbench.methods.baseline import Config as BaselineConfig
from stabbench.methods.self_stabilizer import Config, StabilizedLinear

SHAPE = Shape(in_features=20, out_features=7, depth=6, width=32)


def make(**options):
    return create(OmegaConf.structured(Config(**options)))


def betas(model) -> list[float]:
    return [layer.beta.item() for layer in model.layers if isinstance(layer, StabilizedLinear)]


@pytest.mark.parametrize("options", [{"parametrization": "exp"}, {"parametrization": "softplus"},
                                     {"parametrization": "softplus", "steepness": 1.0},
                                     {"parametrization": "softplus", "steepness": 10.0}])
def test_beta_is_exactly_one_at_init(options):
    torch.manual_seed(0)
    model = make(**options).build(SHAPE)
    assert betas(model) == [1.0] * (SHAPE.depth + 1)


def test_softplus_parameter_starts_at_the_published_value():
    layer = make(parametrization="softplus").build(SHAPE).layers[0]
    assert layer.beta_param.item() == pytest.approx(math.log(math.e ** 4 - 1) / 4, abs=1e-7)
    assert layer.beta_param.item() == pytest.approx(0.99537863, abs=1e-7)


def test_output_layer_option_leaves_the_output_layer_plain():
    model = make(output_layer=False).build(SHAPE)
    assert len(betas(model)) == SHAPE.depth
    assert not isinstance(model.layers[-1], StabilizedLinear)


@pytest.mark.parametrize("parametrization", ["exp", "softplus"])
@pytest.mark.parametrize("activation,init", [("tanh", "xavier"), ("relu", "he"), ("tanh", "torch"),
                                             ("selu", "lecun"), ("leaky_relu", "orthogonal")])
@pytest.mark.parametrize("output_layer", [True, False])
def test_outputs_at_init_equal_the_baselines_with_the_same_seed(parametrization, activation, init, output_layer):
    baseline = create(OmegaConf.structured(BaselineConfig(activation=activation, init=init)))
    stabilized = make(parametrization=parametrization, activation=activation, init=init, output_layer=output_layer)
    torch.manual_seed(3)
    plain_model = baseline.build(SHAPE)
    torch.manual_seed(3)
    stabilized_model = stabilized.build(SHAPE)
    x = torch.randn(16, SHAPE.in_features)
    with torch.no_grad():
        assert torch.equal(stabilized_model(x)["logits"], plain_model(x)["logits"])
        for plain_layer, layer in zip(plain_model.layers, stabilized_model.layers):
            assert torch.equal(layer.weight, plain_layer.weight)


def test_effective_weight_is_beta_times_w():
    layer = make(parametrization="softplus").build(SHAPE).layers[1]
    with torch.no_grad():
        layer.beta_param.fill_(0.3)
        x = torch.randn(5, SHAPE.width)
        beta = torch.nn.functional.softplus(torch.tensor(4 * 0.3)) / 4
        assert torch.allclose(layer.beta, beta)
        assert torch.allclose(layer.weight, beta * layer.unscaled_weight)
        assert torch.allclose(layer(x), beta * (x @ layer.unscaled_weight.T) + layer.bias, atol=1e-6)


@pytest.mark.parametrize("parametrization", ["exp", "softplus"])
def test_beta_moves_during_training_and_is_logged_in_layers_csv(cli, tmp_path, parametrization):
    out = tmp_path / "run"
    code, _, err = cli("run", "method=self_stabilizer", f"method.parametrization={parametrization}", "depth=4",
                       "log_every=1", "max_steps=6", "seeds=2", "device=cpu", f"hydra.run.dir={out}", *TINY)
    assert code == 0, err
    layers = pd.read_csv(out / "layers.csv")
    assert "beta" in layers.columns
    assert len(layers[layers.step == 0]) == 2 * 5  # 2 seeds x (depth + 1) layers, each with a beta
    assert (layers[layers.step == 0].beta == 1.0).all()  # recorded before the first update
    last = layers[layers.step == layers.step.max()]
    assert last.beta.notna().all()
    assert (np.abs(last.beta - 1.0) > 1e-5).all()  # every layer's beta was trained


def test_no_beta_for_a_plain_output_layer_in_layers_csv(cli, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli("run", "method=self_stabilizer", "method.output_layer=false", "depth=3", "max_steps=2",
                       "device=cpu", f"hydra.run.dir={out}", *TINY)
    assert code == 0, err
    layers = pd.read_csv(out / "layers.csv")
    assert layers[layers.kind == "output"].beta.isna().all()
    assert layers[layers.kind != "output"].beta.notna().all()


def test_constants_report_every_beta():
    method = make()
    info = method.constants(method.build(SHAPE))
    assert info["beta"] == [1.0] * (SHAPE.depth + 1)
    json.dumps(info)


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="method.parametrization"):
        make(parametrization="sigmoid")
    with pytest.raises(UserError, match="method.steepness"):
        make(parametrization="softplus", steepness=0.0)
    with pytest.raises(UserError, match="method.init"):
        make(init="kaiming")
    with pytest.raises(UserError, match="method.alpha_dropout"):
        make(alpha_dropout=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("parametrization", ["exp", "softplus"])
def test_self_stabilizer_trains_end_to_end(cli, tmp_path, parametrization):
    code, _, err = cli("run", "method=self_stabilizer", f"method.parametrization={parametrization}", "depth=30",
                       "width=64", "epochs=1", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert not summary["diverged"] and math.isfinite(summary["train_loss"])
    train = pd.read_csv(tmp_path / "run" / "metrics.csv").query("split == 'train'")
    assert train.loss.iloc[-1] < train.loss.iloc[0]
