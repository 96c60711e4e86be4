"""Each per-layer diagnostic the runner records, against an independent computation on a
plain nn.Module with ordinary autograd (no vmap, no stacking)."""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from conftest import compose
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
