"""Each per-layer diagnostic the runner records, against an independent computation on a
plain nn.Module with ordinary autograd (no vmap, no stacking)."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import alpha_dropout_keep_masks, apply_alpha_dropout, compose
from stabbench import methods
from stabbench.datasets import Data
from stabbench.methods.base import Shape, Stage
from stabbench.train import build_ensemble, grad_norm_ratio, make_optimizer, make_train_step


def test_recorded_diagnostics_equal_plain_autograd():
    cfg = compose("depth=4", "width=8", "method.activation=tanh")
    method = methods.create(cfg.method)
    shape = Shape(in_features=5, out_features=3, depth=4, width=8)
    ensemble = build_ensemble(method, shape, seeds=[7, 8], device=torch.device("cpu"))
    reference = [ensemble.member(k) for k in range(2)]  # copies taken before the step updates anything
    torch.manual_seed(0)
    data = Data(torch.randn(32, 5), torch.randint(0, 3, (32,)), torch.zeros(1, 5), torch.zeros(1), "classification", 3)
    index = torch.stack([torch.arange(16), torch.arange(16, 32)])
    x, y = data.x_train[index], data.y_train[index]
    step = make_train_step(method, Stage(depth=4, epochs=1), ensemble, None,
                           make_optimizer(cfg, ensemble.parameters()), data, ensemble.skeleton.weight_param_names())
    recorded = step(index, record=True)

    for k, model in enumerate(reference):
        h, acts = x[k], []
        for layer in model.layers[:-1]:
            h = torch.tanh(h @ layer.weight.T + layer.bias)
            acts.append(h)
        logits = h @ model.layers[-1].weight.T + model.layers[-1].bias
        acts.append(logits)
        loss = F.cross_entropy(logits, y[k])
        loss.backward()
        assert torch.allclose(recorded["loss"][k], loss.detach(), atol=1e-6)
        expect = {
            "grad_norm": [layer.weight.grad.norm() for layer in model.layers],
            "weight_norm": [layer.weight.detach().norm() for layer in model.layers],
            "act_mean": [a.detach().mean() for a in acts],
            "act_std": [a.detach().std() for a in acts],
        }
        for name, values in expect.items():
            assert torch.allclose(recorded["layers"][name][k], torch.stack(values), rtol=1e-5, atol=1e-7), name


def test_members_get_only_their_own_gradient():
    """Stacking must not mix seeds: member 1's gradient is unchanged by member 0's data."""
    cfg = compose("depth=3", "width=8")
    method = methods.create(cfg.method)
    shape = Shape(5, 3, 3, 8)
    grads = []
    for first_input in (torch.zeros(16, 5), torch.ones(16, 5) * 3):
        ensemble = build_ensemble(method, shape, [0, 1], torch.device("cpu"))
        x = torch.cat([first_input, torch.linspace(-1, 1, 80).view(16, 5)])
        data = Data(x, torch.zeros(32, dtype=torch.long), x[:1], torch.zeros(1), "classification", 3)
        step = make_train_step(method, Stage(3, 1), ensemble, None, make_optimizer(cfg, ensemble.parameters()),
                               data, ensemble.skeleton.weight_param_names())
        grads.append(step(torch.stack([torch.arange(16), torch.arange(16, 32)]), record=True)["layers"]["grad_norm"])
    assert torch.equal(grads[0][1], grads[1][1])
    assert not torch.equal(grads[0][0], grads[1][0])


def test_grad_norm_ratio_is_over_square_layers_only():
    grad_norms = np.array([[100.0, 2.0, 4.0, 1.0, 50.0]])  # input, 3 square hidden, output (depth 4)
    assert grad_norm_ratio(grad_norms, depth=4) == [4.0]


# -- the layer-by-layer path (not fast.plain_mlp): a method's own layers, beta, dropout ---------

def stabilized(p, i, x):
    beta = p[f"layers.{i}.beta_param"].exp()  # the paper's parametrization: beta = exp(B)
    w = p[f"layers.{i}.unscaled_weight"]
    return beta * (x @ w.T) + p[f"layers.{i}.bias"], beta * w


def row_normalised(p, i, x):
    if f"layers.{i}.raw_weight" not in p:  # BSNN's first and output layers: ordinary, with bias
        return x @ p[f"layers.{i}.weight"].T + p[f"layers.{i}.bias"], p[f"layers.{i}.weight"]
    v = p[f"layers.{i}.raw_weight"]
    w = v / v.norm(dim=1, keepdim=True)
    return x @ w.T, w


def plain(p, i, x):
    return x @ p[f"layers.{i}.weight"].T + p[f"layers.{i}.bias"], p[f"layers.{i}.weight"]


def gpn_tanh(h):
    from stabbench.methods.bsnn import gpn_constants

    a, b = gpn_constants("tanh")
    return a * torch.tanh(h) + b


LAYER_BY_LAYER = {  # variant: (overrides, layer map, activation, matrix parameter names per layer)
    "self_stabilizer": (["method=self_stabilizer"], stabilized, torch.tanh, "layers.{}.unscaled_weight"),
    "bsnn": (["method=bsnn"], row_normalised, gpn_tanh, None),
    "snn_alpha_dropout": (["method=snn", "method.alpha_dropout=0.2"], plain, F.selu, "layers.{}.weight"),
}


@pytest.mark.parametrize("variant", sorted(LAYER_BY_LAYER))
def test_layer_by_layer_diagnostics_equal_an_independent_computation(variant):
    overrides, layer_map, phi, matrix = LAYER_BY_LAYER[variant]
    depth, width = 4, 8
    cfg = compose(*overrides, f"depth={depth}", f"width={width}")
    method = methods.create(cfg.method)
    ensemble = build_ensemble(method, Shape(5, 3, depth, width), seeds=[7, 8], device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move away from init, where beta = 1 and unit rows would hide a skipped step
        for name, tensor in ensemble.params.items():
            if name.endswith("beta_param"):
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
            if name.endswith("raw_weight"):
                tensor.mul_(torch.rand(tensor.shape[:-1], generator=generator)[..., None] + 0.5)
    reference = {name: tensor.detach().clone() for name, tensor in ensemble.params.items()}
    data = Data(torch.randn(32, 5, generator=generator), torch.randint(0, 3, (32,), generator=generator),
                torch.zeros(1, 5), torch.zeros(1), "classification", 3)
    index = torch.stack([torch.arange(16), torch.arange(16, 32)])
    names = ensemble.skeleton.weight_param_names()
    step = make_train_step(method, Stage(depth=depth, epochs=1), ensemble, None,
                           make_optimizer(cfg, ensemble.parameters()), data, names)
    torch.manual_seed(7)
    recorded = step(index, record=True)
    p_drop = cfg.method.alpha_dropout
    masks = alpha_dropout_keep_masks(7, [(2, 16, width)] * depth, p_drop) if p_drop else None

    for k in range(2):
        p = {name: tensor[k].clone().requires_grad_() for name, tensor in reference.items()}
        h, acts, weights = data.x_train[index[k]], [], []
        for i in range(depth + 1):
            h, w = layer_map(p, i, h)
            weights.append(w.detach())
            if i < depth:
                h = phi(h)
                if masks is not None:
                    h = apply_alpha_dropout(h, masks[i][k], p_drop)
            acts.append(h)
        loss = F.cross_entropy(h, data.y_train[index[k]])
        loss.backward()
        assert torch.allclose(recorded["loss"][k], loss.detach(), atol=1e-6)
        matrices = [p[matrix.format(i) if matrix else names[i]] for i in range(depth + 1)]
        expect = {
            "grad_norm": [m.grad.norm() for m in matrices],
            "weight_norm": [w.norm() for w in weights],
            "act_mean": [a.detach().mean() for a in acts],
            "act_std": [a.detach().std() for a in acts],
        }
        if variant == "self_stabilizer":
            expect["beta"] = [p[f"layers.{i}.beta_param"].detach().exp() for i in range(depth + 1)]
        assert set(expect) <= set(recorded["layers"])
        for name, values in expect.items():
            assert torch.allclose(recorded["layers"][name][k], torch.stack(values), rtol=1e-5, atol=1e-6), name
