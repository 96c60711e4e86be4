"""The tuning protocol (tuning.py, the tuned report): each cell's lr is chosen on the validation
split, never the test split; a diverged seed scores as the worst possible; a batched grid and
separate `-m lr=...` runs are reported alike; Hydra's Optuna sweeper gets each run's score."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import compose, run_dirs
from stabbench import report, train, tuning
from test_report import fake_config, fake_summary, make_run

TINY = ["depth=3", "width=16", "dataset.n_train=512", "dataset.n_test=128", "epochs=1", "device=cpu"]


def grid_runs(root, cells: dict, regression=False):
    """Hand-made runs: cells[(method, depth)][lr] = [(val, test) per seed]; val/test None: diverged."""
    job = 0
    for (method, depth), by_lr in cells.items():
        for lr, seeds in by_lr.items():
            config = fake_config(method, depth=depth, seeds=len(seeds), lr=lr)
            summaries = []
            for seed, (val, test) in enumerate(seeds):
                diverged = val is None
                summary = fake_summary(config, seed, 1.0, None if regression else 1.5, None if regression else test,
                                       diverged=diverged)
                if regression:
                    summary["test_loss"] = None if diverged else test
                summary.update(lr=lr, val_acc=None if diverged or regression else val,
                               val_loss=None if diverged else (val if regression else 1.0))
                summaries.append(summary)
            make_run(root, f"{job}_{method}_d{depth}_lr{lr}", config, summaries)
            job += 1
    return report.load_runs([root])


CELLS = {  # validation favours 0.01 for baseline; test would favour 0.1
    ("baseline", 4): {0.001: [(0.50, 0.50), (0.52, 0.52)], 0.01: [(0.80, 0.60), (0.82, 0.61)],
                      0.1: [(0.70, 0.95), (0.72, 0.96)]},
    # 0.1 has the best healthy seed, but its other seed diverged: it scores (0.9 + 0) / 2
    ("bsnn", 4): {0.001: [(0.40, 0.40), (0.42, 0.41)], 0.01: [(0.60, 0.60), (0.62, 0.62)],
                  0.1: [(0.90, 0.90), (None, None)]},
}


def chosen(run_set) -> dict:
    cells = tuning.select(run_set.runs).cells
    return {(m, d): (lr, edge) for m, d, lr, edge in cells[["method", "depth", "lr", "edge"]].itertuples(index=False)}


def test_selection_picks_the_best_validation_mean_with_diverged_seeds_worst(tmp_path):
    run_set = grid_runs(tmp_path, CELLS)
    assert run_set.tuned and sorted(run_set.runs["method"].unique()) == ["baseline", "bsnn"]  # lr is no label
    assert chosen(run_set) == {("baseline", 4): (0.01, ""), ("bsnn", 4): (0.01, "")}
    per_lr = tuning.select(run_set.runs).per_lr.set_index(["method", "lr"])
    assert per_lr.loc[("bsnn", 0.1), "val_score"] == pytest.approx(0.45) and per_lr.loc[("bsnn", 0.1), "diverged"] == 1


def test_permuting_the_test_split_changes_no_choice(tmp_path):
    run_set = grid_runs(tmp_path, CELLS)
    before = tuning.select(run_set.runs)
    runs = run_set.runs.copy()
    rng = np.random.default_rng(0)
    for column in ("test_acc", "test_loss"):  # the test results shuffled among all seeds and lrs
        runs[column] = rng.permutation(runs[column].to_numpy())
    after = tuning.select(runs)
    pd.testing.assert_frame_equal(before.cells, after.cells)
    assert before.chosen.equals(after.chosen)


def test_edge_of_the_grid_is_flagged(tmp_path):
    run_set = grid_runs(tmp_path, {("baseline", 4): {0.001: [(0.5, 0.5)], 0.01: [(0.6, 0.6)], 0.1: [(0.7, 0.7)]},
                                   ("baseline", 8): {0.001: [(0.8, 0.5)], 0.01: [(0.6, 0.6)], 0.1: [(0.7, 0.7)]}})
    assert chosen(run_set) == {("baseline", 4): (0.1, "high"), ("baseline", 8): (0.001, "low")}


def test_regression_chooses_the_lowest_validation_loss_and_a_diverged_seed_is_infinite(tmp_path):
    run_set = grid_runs(tmp_path, {("baseline", 4): {0.001: [(0.9, 0.1), (0.8, 0.1)], 0.01: [(0.2, 0.9), (None, None)],
                                                     0.1: [(0.5, 0.5), (0.6, 0.5)]}}, regression=True)
    assert chosen(run_set) == {("baseline", 4): (0.1, "high")}


def test_the_tuned_report_shows_the_chosen_lrs_test_metrics(tmp_path):
    grid_runs(tmp_path / "runs", CELLS)
    out = report.write_report([tmp_path / "runs"], tmp_path / "report", quiet=True)
    table = pd.read_csv(out / "table.csv").set_index("method")
    assert table.loc["baseline", "lr"] == 0.01 and table.loc["baseline", "test_acc_mean"] == pytest.approx(0.605)
    assert table.loc["bsnn", "lr"] == 0.01 and table.loc["bsnn", "n"] == 2 and table.loc["bsnn", "diverged"] == 0
    assert table.loc["baseline", "lrs_tried"] == 3
    assert "0.01" in (out / "table.md").read_text()
    html = (out / "index.html").read_text()
    assert "grid {0.001, 0.01, 0.1}" in html and "validation accuracy over 2 seeds" in html
    assert (out / "lr_sensitivity.png").stat().st_size > 1000 and (out / "trainability_map.png").is_file()
    runs = pd.read_csv(out / "runs.csv")
    assert runs["chosen"].sum() == 4 and len(runs) == 12


def test_without_validation_scores_each_lr_stays_a_method(tmp_path, capsys):
    for lr in (0.01, 0.1):
        config = fake_config(lr=lr)
        make_run(tmp_path, f"lr{lr}", config, [fake_summary(config, 0, 1.0, 1.5, 0.5)])
    run_set = report.load_runs([tmp_path])
    assert not run_set.tuned and sorted(run_set.runs["method"]) == ["baseline (lr=0.01)", "baseline (lr=0.1)"]
    assert "dataset.validation > 0" in capsys.readouterr().err


def test_a_batched_grid_and_separate_lr_runs_report_alike(tmp_path):
    grid, separate = tmp_path / "grid", tmp_path / "separate"
    grid.mkdir()
    train.run(compose("seeds=2", "lrs=[0.003,0.1]", *TINY), grid)
    for lr in (0.003, 0.1):
        (separate / str(lr)).mkdir(parents=True)
        train.run(compose("seeds=2", f"lr={lr}", *TINY), separate / str(lr))
    tables = [pd.read_csv(report.write_report([d], tmp_path / f"{d.name}_report", quiet=True) / "table.csv")
              for d in (grid, separate)]
    columns = ["method", "lr", "lr_edge", "lrs_tried", "n", "val_acc_mean", "test_acc_mean", "test_loss_mean"]
    pd.testing.assert_frame_equal(tables[0][columns], tables[1][columns], rtol=1e-4)
    assert tables[0]["method"].tolist() == ["baseline"]


def test_done_when_a_grid_run_and_its_report(cli, tmp_path):
    """The issue's first check, on synthetic data: 6 members carrying their lr, a report naming the lr."""
    code, out, err = cli("run", "method=bsnn", "depth=4", "width=16", "dataset.n_train=1024", "epochs=2",
                         "lrs=[1e-4,1e-3,1e-2]", "seeds=2", "device=cpu", "hydra.run.dir=run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["seeds"]
    assert [(s["lr"], s["seed"]) for s in summary] == [(lr, seed) for lr in (1e-4, 1e-3, 1e-2) for seed in (0, 1)]
    for name in ("metrics.csv", "layers.csv"):
        rows = pd.read_csv(tmp_path / "run" / name)
        assert set(zip(rows.lr, rows.seed)) == {(lr, seed) for lr in (1e-4, 1e-3, 1e-2) for seed in (0, 1)}, name
    code, out, err = cli("report", "run")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "run_report" / "table.csv")
    best = max((np.mean([s["val_acc"] for s in summary if s["lr"] == lr]), lr) for lr in (1e-4, 1e-3, 1e-2))[1]
    assert table["lr"].tolist() == [best]
    test_acc = np.mean([s["test_acc"] for s in summary if s["lr"] == best])
    assert table["test_acc_mean"].tolist() == pytest.approx([test_acc])
    assert f"{test_acc:.3g}" in out and "tuned" in out


def test_optuna_sweeper_tunes_on_the_runs_selection_score(cli, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # the `tune` extra; `make test` installs it (dev)
    code, out, err = cli("run", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
                         "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=0",
                         "lr=tag(log,interval(1e-3,1e-1))", *TINY, "hydra.sweep.dir=study")
    assert code == 0, err
    result = yaml.safe_load((tmp_path / "study" / "optimization_results.yaml").read_text())
    summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs(tmp_path / "study")]
    assert len(summaries) == 3
    best = max(summaries, key=lambda s: s["val_acc"])
    assert result["best_value"] == pytest.approx(best["val_acc"]) and result["best_params"]["lr"] == pytest.approx(best["lr"])


def memorisation_runs(root, train_and_val: dict):
    """synthetic_regression runs, one per lr: train_and_val[lr] = (train loss, val loss) per seed."""
    for job, (lr, seeds) in enumerate(train_and_val.items()):
        config = fake_config(lr=lr, seeds=len(seeds))
        config["dataset"]["name"] = "synthetic_regression"
        summaries = []
        for seed, (train_loss, val_loss) in enumerate(seeds):
            summary = fake_summary(config, seed, train_loss, 1.0, None)
            summary.update(dataset="synthetic_regression", lr=lr, val_loss=val_loss, val_acc=None, test_acc=None)
            summaries.append(summary)
        make_run(root, f"{job}_lr{lr}", config, summaries)


def test_a_memorisation_task_is_tuned_on_the_training_loss_and_says_so(tmp_path):
    """Pure-noise targets: the validation loss rewards not fitting (it chose lr 0.01, train loss
    0.83, over lr 0.1, 0.22). The dataset declares that its selection uses the training loss."""
    from stabbench import datasets

    assert datasets.selected_on("synthetic_regression") == "train_loss"
    assert datasets.selected_on("fashion_mnist") == "validation"
    memorisation_runs(tmp_path / "runs", {0.01: [(0.83, 1.01), (0.85, 1.02)], 0.1: [(0.22, 1.30), (0.24, 1.31)]})
    selection = tuning.select(report.load_runs([tmp_path / "runs"]).runs)
    assert list(selection.cells["lr"]) == [0.1]
    assert selection.cells["metric"].iloc[0].startswith("training loss")
    assert selection.cells["val_score"].iloc[0] == pytest.approx(0.23)
    out = report.write_report([tmp_path / "runs"], tmp_path / "report", quiet=True)
    assert "training loss (a memorisation task" in (out / "index.html").read_text()
    assert pd.read_csv(out / "table.csv")["train_loss_mean"].iloc[0] == pytest.approx(0.23)
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("*/summary.json"))]
    assert tuning.run_score([s for d in summaries for s in d["seeds"]]) == pytest.approx(0.23)


def test_tiny_learning_rates_are_told_apart(tmp_path):
    """np.isclose's absolute tolerance (1e-8) marked both 1e-8 and 2e-8 as chosen."""
    run_set = grid_runs(tmp_path, {("baseline", 4): {1e-8: [(0.5, 0.5)], 2e-8: [(0.7, 0.7)], 4e-8: [(0.6, 0.6)]}})
    selection = tuning.select(run_set.runs)
    assert list(selection.cells["lr"]) == [2e-8]
    assert selection.chosen.sum() == 1 and list(run_set.runs.loc[selection.chosen, "lr"]) == [2e-8]
