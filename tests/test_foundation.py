"""`stabbench run`: the command line, the files every run writes, and bad input."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import TINY, run_dirs

SUMMARY_KEYS = {"schema_version", "method", "dataset", "depth", "width", "seed", "steps", "epochs", "train_loss",
                "test_loss", "test_acc", "diverged", "diverged_step", "grad_norm_ratio_init",
                "grad_norm_ratio_final", "wall_time_s", "device", "torch_version", "git_commit"}


def test_help_lists_subcommands(cli):
    code, out, _ = cli("--help")
    assert code == 0 and "run" in out and "subcommands" in out


def test_run_writes_the_three_files_with_their_columns(cli, tmp_path):
    code, out, err = cli("run", "depth=5", "log_every=3", *TINY)
    assert code == 0, err
    [run] = run_dirs(tmp_path / "results" / "runs")
    assert "baseline_synthetic_d5_w16_s0" in run.name
    assert (run / ".hydra" / "config.yaml").is_file()
    metrics = pd.read_csv(run / "metrics.csv")
    assert {"step", "epoch", "seed", "split", "loss", "acc"} <= set(metrics.columns)
    assert set(metrics.split) == {"train", "val", "test"}
    layers = pd.read_csv(run / "layers.csv")
    assert {"step", "seed", "layer", "grad_norm", "weight_norm", "act_mean", "act_std"} <= set(layers.columns)
    steps = (512 - 51) // 128  # dataset.validation=0.1 holds 51 of the 512 out
    assert sorted(layers.step.unique()) == [0, 2]  # init, every log_every steps, and the last step
    assert (layers.groupby("step").layer.nunique() == 5 + 1).all()  # depth + 1 weight layers
    assert list(layers[layers.step == 0].kind) == ["input"] + ["hidden"] * 4 + ["output"]
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["steps"] == steps and summary["depth"] == 5 and summary["diverged"] is False
    assert summary["test_acc"] == pytest.approx(metrics[metrics.split == "test"].acc.iloc[-1])
    assert not list(run.glob(".*.tmp"))  # atomic writes leave no temp files behind


def test_sweep_writes_one_complete_run_per_point(cli, tmp_path):
    code, _, err = cli("run", "-m", "depth=2,3", "seed=0,1", *TINY)
    assert code == 0, err
    [sweep] = list((tmp_path / "results" / "sweeps").iterdir())
    runs = run_dirs(sweep)
    assert len(runs) == 4
    for run in runs:
        assert {"metrics.csv", "layers.csv", "summary.json"} <= {p.name for p in run.iterdir()}
    seeds_depths = {(json.loads((r / "summary.json").read_text())["seed"],
                     json.loads((r / "summary.json").read_text())["depth"]) for r in runs}
    assert seeds_depths == {(0, 2), (0, 3), (1, 2), (1, 3)}


def test_same_seed_same_numbers_on_cpu(cli, tmp_path):
    for name in ("a", "b"):
        assert cli("run", "depth=4", f"hydra.run.dir={name}", "device=cpu", *TINY)[0] == 0
    drop = ["time_s"]
    a = pd.read_csv(tmp_path / "a" / "metrics.csv").drop(columns=drop)
    b = pd.read_csv(tmp_path / "b" / "metrics.csv").drop(columns=drop)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / "layers.csv"), pd.read_csv(tmp_path / "b" / "layers.csv"))


def test_divergence_is_a_result_not_a_crash(cli, tmp_path):
    code, _, err = cli("run", "depth=6", "method.activation=relu", "method.init=he", "lr=1e4", "hydra.run.dir=out", *TINY)
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["diverged"] is True
    assert isinstance(summary["diverged_step"], int) and summary["diverged_step"] >= 0


def test_a_diverged_run_has_no_made_up_accuracy_anywhere(cli, tmp_path):
    """argmax of NaN logits is class 0: a diverging step's rows carried a training accuracy
    (0.145 with loss NaN) that the phase diagram averaged. From the divergence on, every
    accuracy is NaN/null, in metrics.csv, summary.json and the report; so is the final ratio."""
    code, _, err = cli("run", "depth=6", "method.activation=relu", "method.init=he", "lr=1e4", "seeds=2",
                       "log_every=1", "hydra.run.dir=out", *TINY)
    assert code == 0, err
    seeds = json.loads((tmp_path / "out" / "summary.json").read_text())["seeds"]
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    for summary in seeds:
        assert summary["diverged"] is True
        assert summary["test_acc"] is None and summary["val_acc"] is None
        assert summary["grad_norm_ratio_final"] is None
        rows = metrics[(metrics.seed == summary["seed"]) & (metrics.step >= summary["diverged_step"])]
        assert len(rows) and rows["acc"].isna().all(), rows
        assert np.isfinite(metrics.loss[metrics.acc.notna()]).all()  # an accuracy only beside a finite loss
    assert cli("report", "out")[0] == 0
    runs = pd.read_csv(tmp_path / "out_report" / "runs.csv")
    assert runs[["test_acc", "val_acc", "grad_norm_ratio_final"]].isna().all().all()


def test_regression_dataset_has_no_accuracy(cli, tmp_path):
    code, _, err = cli("run", "dataset=synthetic_regression", "depth=3", "hydra.run.dir=out", *TINY)
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["test_acc"] is None and np.isfinite(summary["test_loss"])
    assert pd.read_csv(tmp_path / "out" / "metrics.csv").acc.isna().all()


@pytest.mark.parametrize("args, named", [
    (["method=nope"], "method='nope'"),
    (["dataset=nope"], "dataset='nope'"),
    (["depth=0"], "depth=0"),
    (["width=0"], "width=0"),
    (["batch_size=0"], "batch_size=0"),
    (["epochs=0"], "epochs=0"),
    (["lr=0"], "lr=0"),
    (["lr=-1"], "lr=-1"),
    (["dataset.fraction=0"], "dataset.fraction=0"),
    (["dataset.fraction=1.5"], "dataset.fraction=1.5"),
    (["device=cuda"], "device=cuda"),
    (["device=tpu"], "device='tpu'"),
    (["no_such_key=1"], "no_such_key"),
    (["depth=deep"], "depth"),
    (["optimizer=nope"], "optimizer='nope'"),
    (["method.activation=swish"], "method.activation='swish'"),
    (["-m", "depth=4,0"], "depth=0"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, tmp_path, args, named):
    import torch

    if args == ["device=cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = cli("run", *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stabbench: error:") and named in lines[0], err
    assert "Traceback" not in err + out
    assert not (tmp_path / "results").exists()
