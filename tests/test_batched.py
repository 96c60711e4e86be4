"""Seeds trained as one batched model give, for each seed, what a run of that seed alone
gives (every method), and a NaN in one seed stops that seed only."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import alpha_dropout_keep_masks, apply_alpha_dropout, blow_up_seed_1, compose
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
    # 461 of the 512 examples train (dataset.validation=0.1 holds 51 out): 3 steps an epoch, 2 epochs
    assert summaries[0]["steps"] == 6 and summaries[0]["test_loss"] is not None


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


def diverge_at_step(monkeypatch, step: int) -> None:
    """Seed 4's weights become NaN before its `step`-th optimiser step: it diverges in its second
    epoch, after an evaluation, alone (member 1 of seeds 3, 4, 5) or as the only member."""
    original = train.make_train_step

    def make_train_step(method, stage, ensemble, *args):
        inner = original(method, stage, ensemble, *args)
        calls = iter(range(10**6))

        def train_step(index, record):
            if next(calls) == step:
                with torch.no_grad():
                    for tensor in ensemble.params.values():
                        tensor[1 if ensemble.size == 3 else 0] = float("nan")
            return inner(index, record)

        return train_step

    monkeypatch.setattr(train, "make_train_step", make_train_step)


def test_a_diverged_seed_of_a_batched_run_equals_the_same_seed_alone(tmp_path, monkeypatch):
    # 4 steps an epoch: NaN before step 6 (epoch 2); the log step 6 sees it, as both runs do
    small = [*SMALL, "max_steps=12", "epochs=3", "dataset.validation=0"]  # all 512 examples train
    diverge_at_step(monkeypatch, 6)
    batched_dir, single_dir = tmp_path / "batched", tmp_path / "single"
    batched_dir.mkdir(), single_dir.mkdir()
    train.run(compose("seed=3", "seeds=3", *small), batched_dir)
    train.run(compose("seed=4", *small), single_dir)
    batched = json.loads((batched_dir / "summary.json").read_text())["seeds"]
    single = json.loads((single_dir / "summary.json").read_text())
    assert [s["diverged"] for s in batched] == [False, True, False] and single["diverged"]
    for key in ("train_loss", "test_loss", "test_acc", "grad_norm_ratio_final"):
        assert single[key] is None and batched[1][key] is None, key  # null, not its pre-divergence figure
        assert batched[0][key] is not None and batched[2][key] is not None, key
    for key in ("diverged_step", "steps", "epochs", "total_steps", "total_flops", "grad_norm_ratio_init"):
        assert batched[1][key] == pytest.approx(single[key], rel=1e-4), key
    assert (single["diverged_step"], single["steps"], single["epochs"]) == (6, 7, 2)
    assert batched[0]["steps"] == 12 and batched[0]["total_flops"] == 12 / 7 * single["total_flops"]
    for name in ("metrics.csv", "layers.csv"):
        b = pd.read_csv(batched_dir / name)
        b = b[b.seed == 4].reset_index(drop=True).drop(columns="time_s", errors="ignore")
        s = pd.read_csv(single_dir / name).drop(columns="time_s", errors="ignore")
        numeric = s.select_dtypes("number").columns
        np.testing.assert_allclose(b[numeric].to_numpy(float), s[numeric].to_numpy(float), rtol=2e-4, atol=1e-6,
                                   err_msg=name)


def test_evaluate_gives_no_accuracy_for_nan_logits():
    """argmax of NaN logits is class 0: a diverged member would score the share of class 0."""
    cfg = compose("seeds=2", *SMALL)
    run = train.Run(cfg, "unused")
    ensemble = train.build_ensemble(run.method, run.shape(run.method.stages(cfg.depth, 1)[0]), run.seeds, run.device)
    with torch.no_grad():
        for tensor in ensemble.params.values():
            tensor[1] = float("nan")
    loss, acc = train.evaluate(ensemble, run.data, 64)
    assert np.isfinite(loss[0]) and 0 <= acc[0] <= 1
    assert np.isnan(loss[1]) and np.isnan(acc[1])


class FixedAlphaDropout(torch.nn.Module):
    """Alpha dropout applying given keep-masks in turn, one per call (one per hidden layer)."""

    def __init__(self, masks, p):
        super().__init__()
        self.masks, self.p = list(masks), p

    def forward(self, x):
        return apply_alpha_dropout(x, self.masks.pop(0), self.p)


# Each goes its own way through the ensemble: batch norm stacked with per-seed statistics, the
# orthogonal parametrization through vmap, alpha dropout stacked with one mask draw for all seeds.
ONE_BY_ONE = [("bsnn", "method.batch_norm=true"), ("bsnn", "method.constraint=orthogonal"),
              ("snn", "method.alpha_dropout=0.1")]


@pytest.mark.parametrize("variant", ONE_BY_ONE, ids=lambda v: "-".join(v))
def test_batched_forward_and_backward_equal_each_member_alone(variant):
    """Logits, every recorded diagnostic, every gradient and batch norm's running statistics of
    the batched model equal those of each member called alone on its own inputs, in training
    mode (batch statistics per member; each member's own slice of the dropout masks)."""
    cfg = compose(f"method={variant[0]}", *variant[1:], "seeds=3", "depth=4", "width=16", "device=cpu")
    run = train.Run(cfg, "unused")
    ensemble = train.build_ensemble(run.method, run.shape(run.method.stages(cfg.depth, 1)[-1]), run.seeds, run.device)
    members = [ensemble.member(k) for k in range(3)]  # copies at init, before the batched call moves anything
    x = torch.randn(3, 32, run.data.in_features, generator=torch.Generator().manual_seed(0))
    probe = torch.linspace(-1, 1, run.data.n_outputs)
    torch.manual_seed(7)
    out = ensemble(x, record=True)
    (out["logits"] * probe).sum().backward()
    dropout = cfg.method.alpha_dropout
    masks = alpha_dropout_keep_masks(7, [(3, 32, 16)] * 4, dropout) if dropout else None
    for k, member in enumerate(members):
        if dropout:
            member.dropout = FixedAlphaDropout([m[k] for m in masks], dropout)
        alone = member(x[k], record=True)
        (alone["logits"] * probe).sum().backward()
        for key, value in alone.items():
            torch.testing.assert_close(out[key][k], value.detach(), rtol=1e-5, atol=1e-6, equal_nan=True, msg=key)
        for name, tensor in member.named_parameters():
            torch.testing.assert_close(ensemble.params[name].grad[k], tensor.grad, rtol=1e-4, atol=1e-6, msg=name)
        for name, tensor in member.named_buffers():
            torch.testing.assert_close(ensemble.buffers[name][k], tensor, rtol=1e-5, atol=1e-6, msg=name)
    if "method.batch_norm=true" in variant:
        assert ensemble.buffers["layers.1.norm.running_mean"].abs().max() > 0  # the statistics did move
