"""bsnn: GPN constants against the paper's, the normalisation property itself, the weight
constraints after optimiser steps inside the batched ensemble, and an end-to-end run."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from stabbench.errors import UserError
from stabbench.methods import create
from stabbench.methods.base import Shape
from stabbench.methods.bsnn import Config, GPNActivation, gpn_constants
from stabbench.train import build_ensemble

# The paper's table (Lu, Gould, Ajanthan 2023; docs/methods/bsnn.md), gelu as x * sigmoid(1.702 x).
PUBLISHED = {
    "tanh": (1.4674, 0.3885),
    "relu": (1.4142, 0.0),
    "leaky_relu": (1.4141, 0.0),
    "elu": (1.2234, 0.0742),
    "selu": (0.9660, 0.2585),
    "gelu": (1.4915, -0.9097),
}


def make(**options):
    return create(OmegaConf.structured(Config(**options)))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_gpn_constants_match_the_paper_to_three_decimals(name):
    a, b = gpn_constants(name, 0.01)
    published_a, published_b = PUBLISHED[name]
    assert abs(a - published_a) < 5e-4
    assert abs(b - published_b) < 5e-4


@pytest.mark.parametrize("name", sorted(PUBLISHED) + ["sigmoid"])
def test_gpn_activation_is_normalised_under_a_standard_normal(name):
    # The module the network runs, not the integrand: checks that forward and constants agree.
    phi = GPNActivation(name, 0.01)
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    y = phi(z)
    (slope,) = torch.autograd.grad(y.sum(), z)
    assert y.detach().pow(2).mean().item() == pytest.approx(1.0, abs=0.006)
    assert slope.pow(2).mean().item() == pytest.approx(1.0, abs=0.006)


def test_gelu_is_the_sigmoid_form_the_constants_are_for():
    x = torch.linspace(-4, 4, 101)
    plain = GPNActivation("gelu", gpn=False)
    assert torch.allclose(plain(x), x * torch.sigmoid(1.702 * x))
    assert not torch.allclose(plain(x), F.gelu(x), atol=1e-3)


def test_gpn_off_keeps_the_base_activation():
    x = torch.linspace(-3, 3, 61)
    assert torch.equal(GPNActivation("tanh", gpn=False)(x), torch.tanh(x))


def test_constants_report_the_gpn_coefficients():
    method = make(activation="elu")
    info = method.constants(method.build(Shape(8, 3, 4, 16)))
    assert info["gpn_a"] == pytest.approx(1.2234, abs=5e-4)
    assert info["gpn_b"] == pytest.approx(0.0742, abs=5e-4)
    assert info["constraint"] == "rownorm"
    json.dumps(info)  # probe.json must be able to hold it


@pytest.mark.parametrize("constraint", ["rownorm", "orthogonal", "none"])
def test_structure_orthogonal_init_and_bias_free_square_layers(constraint):
    torch.manual_seed(0)
    model = make(constraint=constraint).build(Shape(12, 5, 4, 24))
    first, *square, output = model.layers
    assert first.bias is not None and output.bias is not None
    assert len(square) == 3 and all(p.ndim == 2 for layer in square for p in layer.parameters())
    eye = torch.eye(24)
    for layer in square:
        assert torch.allclose(layer.weight.T @ layer.weight, eye, atol=1e-5)
    # Tall first layer: orthonormal columns; wide output layer: orthonormal rows.
    assert torch.allclose(first.weight.T @ first.weight, torch.eye(12), atol=1e-5)
    assert torch.allclose(output.weight @ output.weight.T, torch.eye(5), atol=1e-5)
    assert not first.bias.detach().any()


def test_every_constraint_starts_from_the_same_draw():
    weights = []
    for constraint in ("rownorm", "orthogonal", "none"):
        torch.manual_seed(5)
        weights.append(make(constraint=constraint).build(Shape(12, 5, 4, 24)).layers[2].weight.detach())
    assert torch.allclose(weights[0], weights[2], atol=1e-6) and torch.allclose(weights[1], weights[2], atol=1e-6)


def train_a_few_steps(method, seeds=(0, 1), depth=5, width=24, steps=8, lr=0.5):
    """Plain SGD with momentum on random labels, through the batched ensemble."""
    shape = Shape(12, 5, depth, width)
    ensemble = build_ensemble(method, shape, list(seeds), torch.device("cpu"))
    initial = [ensemble.member(k) for k in range(len(seeds))]
    optimizer = torch.optim.SGD(ensemble.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(len(seeds), 32, 12, generator=generator)
        y = torch.randint(0, 5, (len(seeds), 32), generator=generator)
        loss = F.cross_entropy(ensemble(x)["logits"].flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return initial, [ensemble.member(k) for k in range(len(seeds))], ensemble


def test_rownorm_forward_uses_the_row_normalised_raw_parameter_after_optimiser_steps():
    """What the layer computes, not what `.weight` says: after training, each square layer of
    the batched network maps x to x @ (V / ||V_i||)^T of its own raw parameter V."""
    initial, trained, ensemble = train_a_few_steps(make(constraint="rownorm"))
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(3))
    for index in range(1, 5):  # depth 5: layers 1..4 are the square hidden ones
        raw = ensemble.params[f"layers.{index}.raw_weight"].detach()  # [seeds, 24, 24]
        # the rows drifted from unit norm in training: normalising them changes the map
        assert (raw.norm(dim=2) - 1).abs().max() > 1e-3
        expected = x @ (raw / raw.norm(dim=2, keepdim=True)).transpose(1, 2)
        assert ensemble.stacked  # the runner calls these layers on the stacked tensors
        with torch.no_grad():
            torch.testing.assert_close(ensemble.network.layers[index](x), expected, rtol=1e-5, atol=1e-6)
        for k, (before, after) in enumerate(zip(initial, trained)):
            assert (after.layers[index].weight - before.layers[index].weight).abs().max() > 1e-3  # it did train
            with torch.no_grad():
                torch.testing.assert_close(after.layers[index](x[k]), expected[k], rtol=1e-5, atol=1e-6)


def test_unconstrained_rows_drift_from_unit_norm():
    _, trained, _ = train_a_few_steps(make(constraint="none"))
    assert (trained[0].layers[2].weight.norm(dim=1) - 1).abs().max() > 1e-3


def test_orthogonal_constraint_keeps_w_orthogonal_after_optimiser_steps():
    initial, trained, _ = train_a_few_steps(make(constraint="orthogonal"))
    eye = torch.eye(24)
    for before, after in zip(initial, trained):
        for layer_before, layer_after in zip(before.layers[1:-1], after.layers[1:-1]):
            w = layer_after.weight
            assert (w - layer_before.weight).abs().max() > 1e-3
            assert (w.T @ w - eye).abs().max() < 1e-4


def test_batch_norm_trains_and_updates_running_statistics_per_member():
    initial, trained, ensemble = train_a_few_steps(make(batch_norm=True))
    running_mean = ensemble.buffers["layers.1.norm.running_mean"]
    assert running_mean.abs().max() > 0
    assert not torch.equal(running_mean[0], running_mean[1])  # each member keeps its own
    assert int(ensemble.buffers["layers.1.norm.num_batches_tracked"][0]) == 8
    assert len(trained[0].layers) == 6 and isinstance(trained[0].layers[1].norm, torch.nn.BatchNorm1d)
    assert not hasattr(trained[0].layers[-1], "norm")  # not on the output layer


def hidden_grad_norms(model, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, width, generator=generator)
    y = torch.randint(0, 10, (64,), generator=generator)
    loss = F.cross_entropy(model(x)["logits"], y)
    params = dict(model.named_parameters())
    names = model.weight_param_names()[1:-1]  # the square hidden layers
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return torch.stack([g.norm() for g in grads])


def test_gpn_keeps_gradient_norms_level_where_plain_selu_grows_them_toward_the_input():
    # Cheap version of the paper's claim (depth 50, width 256): with GPN the hidden layers'
    # gradient norms stay within a small factor; with plain SELU on the same orthogonal net
    # they grow steadily toward the input.
    width = 256
    torch.manual_seed(0)
    gpn = hidden_grad_norms(make(activation="selu").build(Shape(width, 10, 50, width)), width)
    torch.manual_seed(0)
    plain = hidden_grad_norms(make(activation="selu", gpn=False).build(Shape(width, 10, 50, width)), width)
    assert gpn.max() / gpn.min() < 3
    assert plain[0] / plain[-1] > 4


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="method.constraint"):
        make(constraint="spectral")
    with pytest.raises(UserError, match="method.alpha_dropout"):
        make(alpha_dropout=0.1)
    with pytest.raises(UserError, match="method.init"):
        make(init="he")
    with pytest.raises(UserError, match="method.activation"):
        make(activation="swish")


@pytest.mark.slow
@pytest.mark.parametrize("options", [[], ["method.constraint=orthogonal", "seeds=2"],
                                     ["method.batch_norm=true", "seeds=2"]])
def test_bsnn_trains_end_to_end(cli, tmp_path, options):
    code, out, err = cli("run", "method=bsnn", "depth=30", "width=64", "epochs=1", "device=cpu",
                         f"hydra.run.dir={tmp_path / 'run'}", *options)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    members = summary["seeds"] if "seeds" in summary else [summary]
    assert all(not member["diverged"] and math.isfinite(member["train_loss"]) for member in members)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    for _, rows in metrics[metrics.split == "train"].groupby("seed"):
        assert rows.loss.iloc[-1] < rows.loss.iloc[0]  # it learned something
