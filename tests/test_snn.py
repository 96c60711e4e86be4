"""snn: the self-normalising fixed point at init, the LeCun variance (not torch's 3/4 SELU
gain), alpha dropout under the batched ensemble, options checked."""
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
from stabbench.methods.snn import Config
from stabbench.train import build_ensemble


def make(**options):
    return create(OmegaConf.structured(Config(**options)))


def hidden_stats(model, width=512, batch=1024):
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(0))  # standardised input
    with torch.no_grad():
        hidden = model(x, keep_hidden=True)["hidden"]
    return torch.stack([h.mean() for h in hidden]), torch.stack([h.std() for h in hidden])


def test_activations_keep_mean_zero_and_unit_std_through_32_layers():
    torch.manual_seed(0)
    means, stds = hidden_stats(make().build(Shape(512, 10, 32, 512)))
    assert len(stds) == 32
    assert ((stds >= 0.9) & (stds <= 1.1)).all(), stds
    assert means.abs().max() < 0.1, means


def test_torch_selu_gain_would_not_self_normalise():
    # The trap the method avoids: std 3/4 / sqrt(fan_in) (calculate_gain('selu')) decays.
    torch.manual_seed(0)
    model = make().build(Shape(512, 10, 32, 512))
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.mul_(torch.nn.init.calculate_gain("selu"))
    _, stds = hidden_stats(model)
    assert stds[-1] < 0.5


def test_weights_are_lecun_normal_and_biases_zero():
    torch.manual_seed(0)
    model = make().build(Shape(300, 10, 3, 400))
    for layer in model.layers[:-1]:
        fan_in = layer.weight.shape[1]
        assert layer.weight.var().item() * fan_in == pytest.approx(1.0, abs=0.02)
        assert not layer.bias.detach().any()
    assert model.activation.name == "selu"


def test_alpha_dropout_differs_per_member_in_training_and_is_off_in_eval():
    method = make(alpha_dropout=0.1)
    ensemble = build_ensemble(method, Shape(64, 10, 8, 512), [0, 0], torch.device("cpu"))  # twin members
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        train_out = ensemble(x, shared_input=True, keep_hidden=True)
        assert not torch.equal(train_out["logits"][0], train_out["logits"][1])
        # Alpha dropout keeps the fixed point: the activations stay near mean 0, std 1.
        last = train_out["hidden"][-1]
        assert 0.85 < last.std().item() < 1.15 and abs(last.mean().item()) < 0.15
        ensemble.eval()
        eval_out = ensemble(x, shared_input=True)["logits"]
        assert torch.equal(eval_out[0], eval_out[1])


def test_no_dropout_module_at_rate_zero():
    assert make().build(Shape(8, 2, 2, 8)).dropout is None
    assert isinstance(make(alpha_dropout=0.05).build(Shape(8, 2, 2, 8)).dropout, torch.nn.AlphaDropout)


def test_bad_options_are_user_errors():
    for rate in (-0.1, 1.0):
        with pytest.raises(UserError, match="method.alpha_dropout"):
            make(alpha_dropout=rate)
    with pytest.raises(UserError, match="method.activation"):
        make(activation="relu")
    with pytest.raises(UserError, match="method.init"):
        make(init="he")


def test_constants_report_unit_fan_in_variance():
    torch.manual_seed(0)
    method = make()
    info = method.constants(method.build(Shape(256, 10, 2, 256)))
    assert info["weight_variance_times_fan_in"] == pytest.approx([1.0, 1.0], abs=0.03)
    json.dumps(info)


@pytest.mark.slow
def test_snn_trains_end_to_end(cli, tmp_path):
    code, _, err = cli("run", "method=snn", "method.alpha_dropout=0.05", "depth=30", "width=64", "epochs=1",
                       "seeds=2", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert all(not s["diverged"] and math.isfinite(s["train_loss"]) for s in summary["seeds"])
    train = pd.read_csv(tmp_path / "run" / "metrics.csv").query("split == 'train'")
    for _, rows in train.groupby("seed"):
        assert rows.loss.iloc[-1] < rows.loss.iloc[0]
