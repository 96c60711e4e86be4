"""A learning-rate grid (`lrs=[...]`) trained as one batched model gives, for each (lr, seed)
member, what a separate run with that lr and seed gives: every method, SGD and Adam, the
stacked and the vmap path; a diverging lr stops its own members only; bad grids are refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose
from stabbench import datasets, lr_grid, methods, report, train

SMALL = ["depth=4", "width=16", "dataset.n_train=512", "dataset.n_test=128", "max_steps=6", "log_every=2",
         "epochs=2", "device=cpu", "batch_size=64"]
OPTIMIZERS = {"sgd": ["optimizer=sgd"], "adam": ["optimizer=adam"],
              # weight decay: the member's change is rescaled (lr_grid's `update` scheme), not its gradient
              "sgd_decay": ["optimizer=sgd", "optimizer.weight_decay=0.01", "optimizer.nesterov=true"]}
GRID_LR, OTHER_LR = 0.05, 0.003


@pytest.fixture(autouse=True)
def no_run_figures(monkeypatch):
    monkeypatch.setattr(report, "write_run_figures", lambda out_dir: [])


def run_pair(tmp_path: Path, *overrides: str) -> tuple[list[dict], dict, Path, Path]:
    """A grid run (seeds 3, 4 x lrs OTHER_LR, GRID_LR) and a separate run of seed 4 at GRID_LR."""
    grid_dir, single_dir = tmp_path / "grid", tmp_path / "single"
    grid_dir.mkdir(), single_dir.mkdir()
    train.run(compose(*overrides, "seed=3", "seeds=2", f"lrs=[{OTHER_LR},{GRID_LR}]", *SMALL), grid_dir)
    train.run(compose(*overrides, "seed=4", f"lr={GRID_LR}", *SMALL), single_dir)
    grid = json.loads((grid_dir / "summary.json").read_text())["seeds"]
    single = json.loads((single_dir / "summary.json").read_text())
    return grid, single, grid_dir, single_dir


def assert_member_equals_single_run(tmp_path, *overrides, rtol=2e-4, acc_atol=1e-6):
    grid, single, grid_dir, single_dir = run_pair(tmp_path, *overrides)
    assert [(s["lr"], s["seed"]) for s in grid] == [(OTHER_LR, 3), (OTHER_LR, 4), (GRID_LR, 3), (GRID_LR, 4)]
    assert single["lr"] == GRID_LR
    member = grid[3]
    for key in ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "grad_norm_ratio_init",
                "grad_norm_ratio_final", "diverged"):
        assert member[key] == pytest.approx(single[key], rel=rtol, abs=acc_atol if "acc" in key else 1e-6), key
    assert grid[1]["train_loss"] != pytest.approx(member["train_loss"], rel=1e-3)  # same seed: the lr made a difference
    for name in ("metrics.csv", "layers.csv"):
        g, s = pd.read_csv(grid_dir / name), pd.read_csv(single_dir / name)
        assert set(g["lr"]) == {OTHER_LR, GRID_LR} and set(s["lr"]) == {GRID_LR}
        g = g[(g.seed == 4) & np.isclose(g.lr, GRID_LR)].reset_index(drop=True).drop(columns="time_s", errors="ignore")
        s = s.drop(columns="time_s", errors="ignore")
        assert list(g.columns) == list(s.columns) and len(g) == len(s) > 0, name
        if "acc" in s:
            np.testing.assert_allclose(g["acc"].to_numpy(float), s["acc"].to_numpy(float), atol=acc_atol, rtol=0)
        numeric = s.select_dtypes("number").columns.drop("acc", errors="ignore")
        # grad_norm included: the recorded norms are the true gradients', not the lr-weighted ones
        np.testing.assert_allclose(g[numeric].to_numpy(float), s[numeric].to_numpy(float), rtol=2.5 * rtol, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("method", sorted(methods.REGISTRY))
def test_grid_member_equals_a_separate_run(method, optimizer, tmp_path):
    # TAT's default target (C_net(0) = 0.9) needs 13 layers; at SMALL's depth 4, 0.6 is reachable
    options = ["method.c_val_0_target=0.6"] if method == "tat" else []
    assert_member_equals_single_run(tmp_path, f"method={method}", *options, *OPTIMIZERS[optimizer])


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("variant, stacked", [(("method.constraint=orthogonal",), False),
                                              (("method.batch_norm=true",), True)],
                         ids=["orthogonal-vmap", "batch_norm-stacked"])
def test_grid_member_equals_a_separate_run_off_the_plain_path(variant, stacked, optimizer, tmp_path):
    """The orthogonal parametrization goes through vmap; batch norm runs stacked with each
    member's own statistics: neither is the plain MLP's fast path."""
    assert train.build_ensemble(methods.create(compose("method=bsnn", *variant).method),
                                methods.base.Shape(8, 2, 3, 8), [0, 1], torch.device("cpu")).stacked is stacked
    # Adam moves each weight by about lr whatever its gradient's size, so float noise in a near-zero
    # gradient shows: plain seeds batched through vmap already differ from a one-network run by ~3e-4
    # (batch_norm, val loss) before any grid, and an example or two changes class; the grid adds nothing
    # beyond that. Batch norm makes it worse: the bias of a layer before batch norm has no true
    # gradient, only rounding noise, which Adam turns into steps of about lr that move the running
    # means eval mode uses: 2 seeds batched without a grid already differ from a one-network run by
    # 1.1e-3 in val loss (2.1320 against 2.1344), the grid member by 2.0e-3.
    adam = optimizer == "adam"
    assert_member_equals_single_run(tmp_path, "method=bsnn", *variant, *OPTIMIZERS[optimizer],
                                    rtol=(3e-3 if stacked else 1e-3) if adam else 2e-4,
                                    acc_atol=2.5 / 64 if adam else 1e-6)


def test_sgd_with_weight_decay_member_equals_a_separate_run(tmp_path):
    assert_member_equals_single_run(tmp_path, "method=baseline", *OPTIMIZERS["sgd_decay"])


@pytest.mark.parametrize("optimizer, huge", [("sgd", 1e3), ("adam", 1e20)])  # Adam's steps are ~lr: bounded
def test_a_diverging_lr_stops_only_its_own_members(optimizer, huge, tmp_path):
    cfg = compose("seeds=2", "method.activation=relu", "method.init=he", f"lrs=[0.01,{huge}]",
                  f"optimizer={optimizer}", *SMALL)
    summaries = train.run(cfg, tmp_path)
    assert [(s["lr"], s["diverged"]) for s in summaries] == [(0.01, False)] * 2 + [(huge, True)] * 2
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    healthy = metrics[metrics.lr == 0.01]
    assert healthy.step.max() == 6 and np.isfinite(healthy.loss).all()
    assert metrics[metrics.lr == huge].step.max() < 6
    assert all(s["steps"] == 6 and s["test_loss"] is not None for s in summaries[:2])


def test_members_are_lr_major_and_the_unset_grid_is_lr():
    assert lr_grid.members(compose("seed=2", "seeds=2", "lrs=[0.1,0.01]")) == ([2, 3, 2, 3], [0.1, 0.1, 0.01, 0.01])
    assert lr_grid.members(compose("seed=2", "seeds=2", "lr=0.3")) == ([2, 3], [0.3, 0.3])


@pytest.mark.parametrize("grid, message", [
    ("lrs=[]", "lrs=[] is empty"),
    ("lrs=[0.1,-0.01]", "lrs contains -0.01"),
    ("lrs=[0.1,0]", "lrs contains 0"),
    ("lrs=[0.1,nan]", "lrs contains nan"),
    ("lrs=[0.1,inf]", "lrs contains inf"),
    ("lrs=[0.1,0.1]", "repeats a learning rate"),
])
def test_a_bad_grid_is_one_line_exit_2_nothing_written(cli, tmp_path, grid, message):
    code, out, err = cli("run", grid, *SMALL, "hydra.run.dir=out")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [("-m", "lr=0.1,0.01"), ("lr=0.1",)])
def test_lr_next_to_lrs_is_refused(cli, tmp_path, args):
    code, out, err = cli("run", *args, "lrs=[0.1,0.01]", *SMALL, "hydra.run.dir=out", "hydra.sweep.dir=sweep")
    assert code == 2 and "contradicts lrs=[0.1, 0.01]" in err and "lrs=null" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "sweep").exists()


def test_validation_split_is_held_out_stratified_and_the_fraction_keeps_the_same_share_of_both():
    """At dataset.fraction=0.01 the validation split was the full 10% of the data while training
    kept 1%: selection saw ten times the examples training did. The fraction now applies to both."""
    full = datasets.load(compose("dataset.validation=0", "dataset.standardize=false").dataset, torch.device("cpu"))
    whole = datasets.load(compose("dataset.validation=0.1", "dataset.standardize=false").dataset, torch.device("cpu"))
    data = datasets.load(compose("dataset.validation=0.1", "dataset.fraction=0.5", "dataset.standardize=false").dataset,
                         torch.device("cpu"))
    assert data.x_val is not None and full.x_val is None
    n = len(full.x_train)
    assert len(whole.x_val) == pytest.approx(0.1 * n, abs=10)
    assert len(data.x_val) == pytest.approx(0.5 * len(whole.x_val), abs=10)  # the fraction of each split
    assert len(data.x_train) == pytest.approx(0.5 * (n - len(whole.x_val)), abs=10)
    assert len(data.x_val) / len(data.x_train) == pytest.approx(len(whole.x_val) / len(whole.x_train), rel=0.05)
    rows = lambda x: {tuple(r) for r in x.tolist()}
    assert not rows(data.x_val) & rows(data.x_train)  # disjoint
    assert rows(data.x_val) <= rows(whole.x_val) and not rows(data.x_val) & rows(full.x_test)
    share = lambda y: torch.bincount(y, minlength=10).double() / len(y)
    assert torch.allclose(share(data.y_val), share(full.y_train), atol=0.03)  # stratified


def test_validation_is_evaluated_every_epoch_and_summarised(tmp_path):
    summaries = train.run(compose("seeds=2", *SMALL, "max_steps=null"), tmp_path)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    val = metrics[metrics.split == "val"]
    assert sorted(val.epoch.unique()) == [1, 2] and len(val) == 4
    assert all(s["val_acc"] is not None and s["val_loss"] is not None for s in summaries)
    last = val[val.epoch == 2].sort_values("seed")
    assert last.acc.tolist() == pytest.approx([s["val_acc"] for s in summaries])
    (tmp_path / "none").mkdir()
    assert train.run(compose(*SMALL, "dataset.validation=0"), tmp_path / "none")[0]["val_loss"] is None


def test_with_dropout_a_grid_member_starts_as_its_separate_run_but_draws_other_masks(tmp_path):
    """What docs/tuning.md claims for dropout: a member's initial network is the separate run's
    (same seed, same draw), but its dropout masks come from the batched model's generator, so
    its training is a run of the same distribution, not the same run."""
    grid, single, grid_dir, single_dir = run_pair(tmp_path, "method=snn", "method.alpha_dropout=0.1")
    g, s = pd.read_csv(grid_dir / "layers.csv"), pd.read_csv(single_dir / "layers.csv")
    g = g[(g.step == 0) & (g.seed == 4) & (g.lr == GRID_LR)].reset_index(drop=True)
    s = s[s.step == 0].reset_index(drop=True)
    np.testing.assert_allclose(g["weight_norm"], s["weight_norm"], rtol=1e-6)
    print("grid member", grid[3]["train_loss"], "alone", single["train_loss"])
    assert grid[3]["train_loss"] != pytest.approx(single["train_loss"], rel=1e-4)
