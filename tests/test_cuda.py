"""The CUDA path: device=cuda with the whole step captured as one CUDA graph (fast.py).

These need a GPU, so CI (which has none) skips them; they ran on an H100 through the
device tool (docs/speed.md). Every method must capture (trainer.cuda_graph=on makes a
failed capture an error instead of an eager fallback), and the graphed step must give the
eager step's numbers and the CPU's, so the speed trick changes nothing but the speed.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose
from stabbench import methods, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = ["depth=4", "width=16", "dataset.n_train=512", "dataset.n_test=128", "max_steps=24", "log_every=5",
         "epochs=2", "trainer.tf32=false"]


def train_run(tmp_path, name: str, *overrides: str) -> tuple[list[dict], pd.DataFrame, pd.DataFrame]:
    out = tmp_path / name
    out.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an eager fallback warns: that is a failure here
        summaries = train.run(compose(*SMALL, *overrides), out)
    return summaries, pd.read_csv(out / "metrics.csv"), pd.read_csv(out / "layers.csv")


def assert_same_numbers(a: pd.DataFrame, b: pd.DataFrame, rtol: float, what: str) -> None:
    a, b = a.drop(columns="time_s", errors="ignore"), b.drop(columns="time_s", errors="ignore")
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0, what
    numeric = a.select_dtypes("number").columns
    np.testing.assert_allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), rtol=rtol, atol=1e-5,
                               err_msg=what)


# Each method at its defaults, plus BSNN's other constraints (not yet run on a GPU: the
# orthogonal one solves a linear system inside the step).
# TAT at a C(0) target these 4 layers can reach (its default 0.9 needs 13 or more).
DEFAULTS = [[f"method={name}"] + (["method.c_val_0_target=0.5"] if name == "tat" else [])
            for name in sorted(methods.REGISTRY)]
VARIANTS = DEFAULTS + [
    ["method=bsnn", "method.constraint=orthogonal"], ["method=bsnn", "method.batch_norm=true"],
    ["method=baseline", "method.norm=batch"], ["method=baseline", "method.norm=layer"],
    ["method=tat", "method.transform=dks", "method.activation=tanh"]]


@pytest.mark.parametrize("variant", VARIANTS, ids=" ".join)
def test_graphed_step_equals_eager_step(variant, tmp_path):
    _, graphed_metrics, graphed_layers = train_run(tmp_path, "graphed", *variant, "device=cuda", "seeds=3",
                                                   "trainer.cuda_graph=on")
    _, eager_metrics, eager_layers = train_run(tmp_path, "eager", *variant, "device=cuda", "seeds=3",
                                               "trainer.cuda_graph=off")
    assert_same_numbers(graphed_metrics, eager_metrics, 1e-4, "metrics.csv")
    assert_same_numbers(graphed_layers, eager_layers, 1e-4, "layers.csv")


@pytest.mark.parametrize("variant", DEFAULTS + [["method=baseline", "method.norm=batch"]], ids=" ".join)
def test_cuda_run_equals_cpu_run(variant, tmp_path):
    """Same seeds, same data order (drawn on the CPU), float32 without TF32: CPU and GPU
    arithmetic differ only in summation order."""
    _, gpu_metrics, gpu_layers = train_run(tmp_path, "gpu", *variant, "device=cuda", "seeds=2")
    _, cpu_metrics, cpu_layers = train_run(tmp_path, "cpu", *variant, "device=cpu", "seeds=2")
    assert_same_numbers(gpu_metrics, cpu_metrics, 2e-3, "metrics.csv")
    assert_same_numbers(gpu_layers, cpu_layers, 2e-3, "layers.csv")


def replayed_losses(tmp_path, dropout: float, device: str, steps: int) -> torch.Tensor:
    """The step's loss [steps, seeds] for `steps` calls on one and the same batch, at lr 0: the
    weights never move, so only fresh dropout masks can change the loss from call to call."""
    from stabbench import fast

    cfg = compose(*SMALL, "method=snn", f"method.alpha_dropout={dropout}", f"device={device}", "seeds=2", "lr=0",
                  "trainer.cuda_graph=" + ("on" if device == "cuda" else "off"))
    run = train.Run(cfg, tmp_path / f"p{dropout}")
    stage = run.method.stages(cfg.depth, cfg.epochs)[-1]
    ensemble = train.build_ensemble(run.method, run.shape(stage), run.seeds, run.device)
    optimizer = train.make_optimizer(cfg, ensemble.parameters(), capturable=device == "cuda")
    step = fast.maybe_graphed(train.make_train_step(run.method, stage, ensemble, None, optimizer, run.data,
                                                    ensemble.skeleton.weight_param_names()),
                              cfg.trainer.cuda_graph, run.device)
    index = torch.arange(2 * 64, device=run.device).view(2, 64)
    return torch.stack([step(index, False)["loss"].clone() for _ in range(steps)]).cpu()


def test_graphed_alpha_dropout_draws_new_masks_every_replay(tmp_path):
    """SNN's alpha dropout inside a replayed graph: replays of the same batch at lr 0 must give
    different losses (the graph-safe RNG advances; a mask frozen at capture gives the same loss
    every replay), while without dropout they are identical."""
    from stabbench import fast

    steps = fast.WARMUP_STEPS + 3  # eager warm-up, then the capture's own replay and two more
    dropout = replayed_losses(tmp_path, 0.1, "cuda", steps)[fast.WARMUP_STEPS:]
    plain = replayed_losses(tmp_path, 0.0, "cuda", steps)[fast.WARMUP_STEPS:]
    assert torch.isfinite(dropout).all()
    assert not torch.allclose(dropout[0], dropout[1]) and not torch.allclose(dropout[1], dropout[2])
    torch.testing.assert_close(plain[1], plain[0])
    torch.testing.assert_close(plain[2], plain[0])


def test_graphed_adam_matches_eager_adam(tmp_path):
    """Adam keeps its step count on the device when captured (capturable=True)."""
    adam = ["optimizer=adam", "lr=1e-3", "device=cuda", "seeds=2"]
    _, graphed, _ = train_run(tmp_path, "graphed", *adam, "trainer.cuda_graph=on")
    _, eager, _ = train_run(tmp_path, "eager", *adam, "trainer.cuda_graph=off")
    assert_same_numbers(graphed, eager, 1e-4, "metrics.csv")


def test_a_diverging_seed_stops_alone_in_a_graph(tmp_path, monkeypatch):
    from conftest import blow_up_seed_1

    blow_up_seed_1(monkeypatch)
    summaries, metrics, _ = train_run(tmp_path, "nan", "seeds=3", "method.activation=relu", "method.init=he",
                                      "lr=0.5", "device=cuda", "trainer.cuda_graph=on")
    assert [s["diverged"] for s in summaries] == [False, True, False]
    assert np.isfinite(metrics[metrics.seed != 1].loss).all()


def test_sal_stages_each_capture(tmp_path):
    """SAL trains a new network per stage, guided by the last: each stage's step is its own graph."""
    summaries, metrics, _ = train_run(tmp_path, "sal", "method=sal", "device=cuda", "seeds=2",
                                      "trainer.cuda_graph=on")
    assert set(metrics.stage) == {0, 1, 2} and all(np.isfinite(s["test_loss"]) for s in summaries)
    summary = json.loads((tmp_path / "sal" / "summary.json").read_text())["seeds"][0]
    assert [s["depth"] for s in summary["stages"]] == [1, 2, 4]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("method", ["baseline", "bsnn"])
def test_lr_grid_members_run_in_the_cuda_graph(method, optimizer, tmp_path):
    """A learning-rate grid (lr_grid.py) is captured in the same graph as seeds are: its per-member
    lrs are device tensors read inside the step. Graphed = eager, on the grid's every member.
    (Written without a GPU in this session: not yet run.)"""
    grid = [f"method={method}", f"optimizer={optimizer}", "device=cuda", "seeds=2", "lrs=[0.003,0.05]"]
    summaries, graphed_metrics, graphed_layers = train_run(tmp_path, "graphed", *grid, "trainer.cuda_graph=on")
    _, eager_metrics, eager_layers = train_run(tmp_path, "eager", *grid, "trainer.cuda_graph=off")
    assert [(s["lr"], s["seed"]) for s in summaries] == [(0.003, 0), (0.003, 1), (0.05, 0), (0.05, 1)]
    assert_same_numbers(graphed_metrics, eager_metrics, 1e-4, "metrics.csv")
    assert_same_numbers(graphed_layers, eager_layers, 1e-4, "layers.csv")
