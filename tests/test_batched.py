"""Seeds trained as one batched model give, for each seed, what a run of that seed alone
gives (every method), and a NaN in one seed stops that seed only."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import blow_up_seed_1, compose
from stabbench import methods, train

SMALL = ["depth=4", "width=16", "dataset.n_train=512", "dataset.n_test=128", "max_steps=8", "log_every=3",
         "epochs=2", "device=cpu"]


# Normalised networks: per-seed batch statistics and running statistics (the test loss is
# computed with them, in eval mode), per-seed gains and biases.
NORMED = [("baseline", "method.norm=batch", "method.activation=relu", "method.init=he"),
          ("baseline", "method.norm=layer"), ("self_stabilizer", "method.norm=batch")]


# Each method at its defaults, but TAT at a C(0) target these 4 layers can reach (0.9 needs 13 or more).
DEFAULTS = [("tat", "method.c_val_0_target=0.5") if name == "tat" else (name,) for name in sorted(methods.REGISTRY)]


@pytest.mark.parametrize("variant", DEFAULTS + NORMED,
                         ids=lambda v: "-".join(v))
def test_seed_k_of_a_batched_run_equals_a_run_of_seed_k(variant, tmp_path):
    method, *options = variant
    batched_dir, single_dir = tmp_path / "batched", tmp_path / "single"
    batched_dir.mkdir(), single_dir.mkdir()
    train.run(compose(f"method={method}", *options, "seed=3", "seeds=3", *SMALL), batched_dir)
    train.run(compose(f"method={method}", *options, "seed=4", *SMALL), single_dir)

    batched = json.loads((batched_dir / "summary.json").read_text())["seeds"]
    single = json.loads((single_dir / "summary.json").read_text())
    assert [s["seed"] for s in batched] == [3, 4, 5]
    for key in ("train_loss", "test_loss", "test_acc", "grad_norm_ratio_init", "grad_norm_ratio_final"):
        assert batched[1][key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key

    for name in ("metrics.csv", "layers.csv"):
        b = pd.read_csv(batched_dir / name)
        s = pd.read_csv(single_dir / name)
        b = b[b.seed == 4].reset_index(drop=True).drop(columns="time_s", errors="ignore")
        s = s.drop(columns="time_s", errors="ignore")
        assert list(b.columns) == list(s.columns) and len(b) == len(s) > 0
        numeric = s.select_dtypes("number").columns
        np.testing.assert_allclose(b[numeric].to_numpy(float), s[numeric].to_numpy(float), rtol=2e-4, atol=1e-6,
                                   err_msg=name)


def test_a_diverging_seed_stops_alone(tmp_path, monkeypatch):
    """Seed 1's lr is the same, but its init is scaled up so that it alone blows up."""
    cfg = compose("seeds=3", "method.activation=relu", "method.init=he", "lr=0.5", *SMALL)
    blow_up_seed_1(monkeypatch)
    summaries = train.run(cfg, tmp_path)
    assert [s["diverged"] for s in summaries] == [False, True, False]
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics[metrics.seed == 1].step.max() < metrics[metrics.seed == 0].step.max()
    assert np.isfinite(metrics[metrics.seed != 1].loss).all()
    assert summaries[0]["steps"] == 8 and summaries[0]["test_loss"] is not None


VARIANTS = [("baseline",), ("snn", "method.alpha_dropout=0.1"), ("bsnn",), ("bsnn", "method.constraint=none"),
            ("bsnn", "method.constraint=orthogonal"), ("bsnn", "method.batch_norm=true"), ("self_stabilizer",),
            ("self_stabilizer", "method.parametrization=softplus"), ("lyapunov",), ("sal",), *NORMED,
            ("sal", "method.base=self_stabilizer", "+method.base_options.norm=layer"),
            ("tat", "method.c_val_0_target=0.5"), ("tat", "method.transform=dks", "method.activation=softplus"),
            ("sal", "method.base=tat", "method.depths=[2,4]", "+method.base_options.c_val_0_target=0.4")]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
def test_stacked_call_equals_vmap(variant):
    """Where every module computes on stacked seeds itself, the ensemble calls the network
    once on the stacked tensors; vmap (always right) must give the same outputs, diagnostics
    and gradients, dropout masks included. The rest must be left to vmap."""
    cfg = compose(f"method={variant[0]}", *variant[1:], "seeds=3", "depth=4", "width=16",
                  "device=cpu")
    run = train.Run(cfg, "unused")
    stage = run.method.stages(cfg.depth, cfg.epochs)[-1]
    ensemble = train.build_ensemble(run.method, run.shape(stage), run.seeds, run.device)
    vmapped_only = variant[0] == "bsnn" and "method.constraint=orthogonal" in variant
    assert ensemble.stacked is not vmapped_only
    if vmapped_only:
        return
    x = torch.randn(3, 32, run.data.in_features, generator=torch.Generator().manual_seed(0))
    results = {}
    initial_buffers = {name: tensor.clone() for name, tensor in ensemble.buffers.items()}
    for stacked in (True, False):
        ensemble.stacked = stacked
        ensemble.load_state_dict({**ensemble.params, **initial_buffers})  # batch norm's running statistics
        for tensor in ensemble.params.values():
            tensor.grad = None
        torch.manual_seed(7)  # the same dropout draws for both
        out = ensemble(x, record=True, keep_hidden=True)
        (out["logits"] * torch.linspace(-1, 1, out["logits"].shape[-1])).sum().backward()
        with torch.no_grad():
            evaluated = ensemble.eval()(x[0], shared_input=True)["logits"]
        ensemble.train()
        results[stacked] = (out, evaluated, {name: t.grad.clone() for name, t in ensemble.params.items()})
    (stacked_out, stacked_eval, stacked_grads), (vmap_out, vmap_eval, vmap_grads) = results[True], results[False]
    assert stacked_out.keys() == vmap_out.keys() and "act_std" in stacked_out
    for key, value in vmap_out.items():
        for got, want in zip(stacked_out[key], value) if key == "hidden" else [(stacked_out[key], value)]:
            assert got.shape == want.shape, key
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True, msg=key)
    torch.testing.assert_close(stacked_eval, vmap_eval, rtol=1e-5, atol=1e-6)
    for name, grad in vmap_grads.items():
        # A norm after a hidden layer divides its beta out (layer norm while the biases are 0, as
        # at init), batch norm its bias too: those gradients are 0 up to cancellation (~1e-5).
        batch_norm = any(option.endswith("norm=batch") for option in variant)
        residue = ".linear." in name and (name.endswith("beta_param") or (batch_norm and name.endswith("bias")))
        torch.testing.assert_close(stacked_grads[name], grad, rtol=1e-4, atol=1e-4 if residue else 1e-6, msg=name)
