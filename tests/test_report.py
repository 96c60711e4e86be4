"""`stabbench report`: reading runs (complete, diverged, partial, multi-seed, mixed schemas),
the aggregated tables, the figures, index.html, the CLI's errors, and the multirun callback.

Most tests write run directories by hand in the documented schema (fast, exact numbers);
the slow ones train a tiny real sweep through `stabbench run -m`."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stabbench import report
from stabbench.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_config(method="baseline", depth=4, width=8, seed=0, seeds=1, lr=0.01, activation="tanh", **method_extra):
    return {"method": {"name": method, "activation": activation, "init": "xavier", **method_extra},
            "dataset": {"name": "synthetic", "root": None, "n_train": 256},
            "optimizer": {"name": "sgd", "momentum": 0.9, "betas": [0.9, 0.999]},
            "trainer": {"cuda_graph": "auto"}, "depth": depth, "width": width, "seed": seed, "seeds": seeds,
            "device": "cpu", "epochs": 1, "lr": lr, "log_every": 1}


def fake_summary(config, seed, train_loss, test_loss, test_acc, ratio_init=2.0, ratio_final=3.0, diverged=False,
                 steps=4):
    return {"schema_version": 1, "method": config["method"]["name"], "dataset": "synthetic",
            "depth": config["depth"], "width": config["width"], "seed": seed, "steps": steps, "epochs": 1,
            "train_loss": None if diverged else train_loss, "test_loss": None if diverged else test_loss,
            "test_acc": None if diverged else test_acc, "diverged": diverged, "diverged_step": 2 if diverged else None,
            "grad_norm_ratio_init": ratio_init, "grad_norm_ratio_final": None if diverged else ratio_final,
            "total_steps": steps, "total_flops": 1000, "wall_time_s": 1.0, "device": "cpu", "config": config}


def fake_logs(run_dir: Path, config, losses: dict[int, list[float]], beta=False, stages=1):
    """metrics.csv and layers.csv: one train row per step per seed, a test row at the end."""
    metrics, layers = [], []
    depth = config["depth"]
    for stage in range(stages):
        for seed, curve in losses.items():
            for step, loss in enumerate(curve):
                metrics.append(dict(step=step, epoch=0, stage=stage, seed=seed, split="train", loss=loss, acc=0.5,
                                    time_s=0.1))
                for layer in range(1, depth + 2):
                    row = dict(step=step, epoch=0, stage=stage, seed=seed, layer=layer,
                               kind="input" if layer == 1 else "output" if layer == depth + 1 else "hidden",
                               grad_norm=(seed + 1) * 0.1 * layer * (1 + step), weight_norm=1.0, act_mean=0.0,
                               act_std=1.0 / layer)
                    if beta:
                        row["beta"] = 1.0 + 0.01 * step * layer
                    layers.append(row)
            metrics.append(dict(step=len(curve), epoch=1, stage=stage, seed=seed, split="test", loss=curve[-1] + 0.1,
                                acc=0.6, time_s=0.2))
    pd.DataFrame(metrics).to_csv(run_dir / "metrics.csv", index=False)
    pd.DataFrame(layers).to_csv(run_dir / "layers.csv", index=False)


def make_run(root: Path, name: str, config, summaries=None, losses=None, beta=False, hydra=True, stages=1) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    if hydra:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if summaries is not None:
        data = summaries[0] if len(summaries) == 1 else {"schema_version": 1, "seeds": summaries}
        (run_dir / "summary.json").write_text(json.dumps(data))
    if losses is not None:
        fake_logs(run_dir, config, losses, beta=beta, stages=stages)
    return run_dir


@pytest.fixture
def sweep(tmp_path) -> Path:
    """baseline and self_stabilizer at depth 4 and 8, seeds 0 and 1; one diverged seed."""
    root = tmp_path / "sweep"
    values = {  # (method, depth): [(train, test, acc, ratio_init, ratio_final) per seed]
        ("baseline", 4): [(1.0, 1.5, 0.50, 2.0, 3.0), (2.0, 2.5, 0.70, 4.0, 5.0)],
        ("baseline", 8): [(1.2, 1.6, 0.40, 2.5, 3.5), (1.6, 2.0, 0.45, 3.5, 6.5)],
        ("self_stabilizer", 4): [(0.8, 1.1, 0.80, 2.0, 2.0), (0.6, 0.9, 0.90, 3.0, 3.0)],
        ("self_stabilizer", 8): [(0.9, 1.0, 0.75, 2.0, 2.0), (None, None, None, 9.0, None)],  # seed 1 diverged
    }
    job = 0
    for (method, depth), seeds in values.items():
        for seed, (train, test, acc, r0, r1) in enumerate(seeds):
            config = fake_config(method, depth=depth, seed=seed)
            diverged = train is None
            summary = fake_summary(config, seed, train, test, acc, r0, r1, diverged=diverged)
            curve = [2.3, 2.0, float("nan")] if diverged else [2.3, 2.0, 1.5, train]
            make_run(root, f"{job}_{method}_d{depth}_s{seed}", config, [summary], {seed: curve},
                     beta=method == "self_stabilizer")
            job += 1
    return root


# -- reading and tables ---------------------------------------------------------------------

def test_table_aggregates_equal_hand_computed_means_and_stds(sweep):
    runs = report.runs_table(report.load_runs([sweep]))
    table = report.aggregate(runs).set_index(["method", "depth"])
    row = table.loc[("baseline", 4)]
    assert row["n"] == 2 and row["diverged"] == 0 and row["width"] == 8
    assert row["train_loss_mean"] == pytest.approx(1.5)
    assert row["train_loss_std"] == pytest.approx(statistics.stdev([1.0, 2.0]))
    assert row["test_loss_mean"] == pytest.approx(2.0)
    assert row["test_acc_mean"] == pytest.approx(0.6)
    assert row["test_acc_std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert row["grad_norm_ratio_init_mean"] == pytest.approx(3.0)
    assert row["grad_norm_ratio_final_std"] == pytest.approx(statistics.stdev([3.0, 5.0]))
    other = table.loc[("baseline", 8)]
    assert other["test_loss_std"] == pytest.approx(statistics.stdev([1.6, 2.0]))
    assert other["grad_norm_ratio_final_mean"] == pytest.approx(5.0)


def test_diverged_seed_is_counted_and_left_out_of_the_means(sweep):
    runs = report.runs_table(report.load_runs([sweep]))
    assert (runs["status"] == "diverged").sum() == 1
    assert runs.loc[runs["status"] == "diverged", "seed"].tolist() == [1]
    row = report.aggregate(runs).set_index(["method", "depth"]).loc[("self_stabilizer", 8)]
    assert row["n"] == 2 and row["diverged"] == 1
    assert row["train_loss_mean"] == pytest.approx(0.9)  # the surviving seed only
    assert np.isnan(row["train_loss_std"])  # one value: no spread to report
    assert row["grad_norm_ratio_init_mean"] == pytest.approx(2.0)  # every mean: the diverged seed's 9.0 left out


def test_a_diverged_seed_is_left_out_of_every_mean_whatever_its_summary_holds(tmp_path):
    """An older summary.json kept a diverged seed's test_acc (argmax of NaN logits: the share of
    class 0) while its test_loss was null: the table averaged one over all seeds, the other over
    survivors. Every figure of a diverged seed is left out; the table and index.html count it."""
    config = fake_config(seeds=3)
    summaries = [fake_summary(config, 0, 1.0, 1.5, 0.60, 2.0, 3.0), fake_summary(config, 1, 1.2, 1.7, 0.70, 4.0, 5.0),
                 {**fake_summary(config, 2, 9.0, 9.0, 0.0547, 6.0, 7.0), "diverged": True, "diverged_step": 3}]
    make_run(tmp_path, "run", config, summaries)
    report.write_report([tmp_path], tmp_path / "report", quiet=True)
    row = pd.read_csv(tmp_path / "report" / "table.csv").iloc[0]
    assert (row["n"], row["diverged"]) == (3, 1)
    for key, survivors in (("test_acc", [0.6, 0.7]), ("test_loss", [1.5, 1.7]), ("train_loss", [1.0, 1.2]),
                           ("grad_norm_ratio_init", [2.0, 4.0]), ("grad_norm_ratio_final", [3.0, 5.0])):
        assert row[f"{key}_mean"] == pytest.approx(np.mean(survivors)), key
        assert row[f"{key}_std"] == pytest.approx(statistics.stdev(survivors)), key
    page = (tmp_path / "report" / "index.html").read_text()
    assert "1 diverged" in page and "<th>diverged</th>" in page


def test_runs_csv_has_one_row_per_seed_of_a_batched_run(tmp_path):
    config = fake_config(seeds=3)
    summaries = [fake_summary({**config, "seed": s}, s, 1.0 + s, 2.0, 0.5) for s in range(3)]
    make_run(tmp_path, "batched", config, summaries)
    runs = report.runs_table(report.load_runs([tmp_path]))
    assert runs["seed"].tolist() == [0, 1, 2]
    assert runs["train_loss"].tolist() == [1.0, 2.0, 3.0]
    assert set(runs["status"]) == {"complete"}


def test_partial_run_is_marked_and_reported_with_what_exists(tmp_path):
    config = fake_config(depth=4)
    make_run(tmp_path, "done", config, [fake_summary(config, 0, 1.0, 1.5, 0.5)])
    make_run(tmp_path, "killed", {**config, "seed": 1}, losses={1: [2.3, 2.1, 1.9]})
    make_run(tmp_path, "just_started", {**config, "seed": 2})  # only .hydra/ so far
    runs = report.runs_table(report.load_runs([tmp_path])).set_index("run")
    assert runs.loc["killed", "status"] == "partial"
    assert runs.loc["killed", "train_loss"] == pytest.approx(1.9)  # its last logged train loss
    assert runs.loc["killed", "test_loss"] == pytest.approx(2.0)
    assert runs.loc["killed", "steps"] == 3
    assert runs.loc["just_started", "status"] == "partial" and np.isnan(runs.loc["just_started", "train_loss"])
    assert runs.loc["just_started", "depth"] == 4 and runs.loc["just_started", "method"] == "baseline"
    row = report.aggregate(runs.reset_index()).iloc[0]
    assert (row["n"], row["partial"]) == (1, 2)
    assert row["train_loss_mean"] == pytest.approx(1.0)  # partial seeds are not averaged


def test_older_schema_and_extra_columns_mix_without_crashing(tmp_path):
    config = fake_config()
    old = fake_summary(config, 0, 1.0, 1.5, 0.5)
    for key in ("grad_norm_ratio_init", "grad_norm_ratio_final", "total_flops", "schema_version"):
        del old[key]
    make_run(tmp_path, "old", config, [old])
    new = fake_summary({**config, "seed": 1}, 1, 3.0, 1.5, 0.5, ratio_init=2.0)
    new["something_new"] = 7
    make_run(tmp_path, "new", {**config, "seed": 1}, [new])
    runs = report.runs_table(report.load_runs([tmp_path])).set_index("run")
    assert np.isnan(runs.loc["old", "grad_norm_ratio_init"]) and runs.loc["new", "grad_norm_ratio_init"] == 2.0
    row = report.aggregate(runs.reset_index()).iloc[0]
    assert row["n"] == 2 and row["train_loss_mean"] == pytest.approx(2.0)
    assert row["grad_norm_ratio_init_mean"] == pytest.approx(2.0)


def test_method_label_names_the_options_that_vary(tmp_path):
    for k, activation in enumerate(("relu", "tanh")):
        config = fake_config("bsnn", activation=activation)
        make_run(tmp_path, f"bsnn_{activation}", config, [fake_summary(config, 0, 1.0 + k, 1.5, 0.5)])
    config = fake_config("baseline")
    make_run(tmp_path, "baseline", config, [fake_summary(config, 0, 1.0, 1.5, 0.5)])
    table = report.aggregate(report.runs_table(report.load_runs([tmp_path])))
    assert sorted(table["method"]) == ["baseline", "bsnn (activation=relu)", "bsnn (activation=tanh)"]
    assert table.set_index("method").loc["bsnn (activation=tanh)", "train_loss_mean"] == 2.0


def test_training_options_that_vary_split_every_method(tmp_path):
    for lr in (0.01, 1e6):
        config = fake_config(lr=lr)
        make_run(tmp_path, f"lr{lr}", config, [fake_summary(config, 0, 1.0, 1.5, 0.5)])
    runs = report.runs_table(report.load_runs([tmp_path]))
    assert sorted(runs["method"]) == ["baseline (lr=0.01)", "baseline (lr=1e+06)"]
    assert "lr" in runs.columns


def test_regression_runs_have_no_accuracy_and_still_get_their_figures(tmp_path):
    for depth in (2, 4):
        config = fake_config(depth=depth)
        config["dataset"]["name"] = "synthetic_regression"
        summary = fake_summary(config, 0, 0.5 * depth, 0.6 * depth, None)
        summary["dataset"] = "synthetic_regression"
        make_run(tmp_path, f"d{depth}", config, [summary], {0: [2.0, 0.5 * depth]})
    out = report.write_report([tmp_path], quiet=True)
    table = pd.read_csv(out / "table.csv")
    assert table["test_acc_mean"].isna().all() and table["train_loss_mean"].tolist() == [1.0, 2.0]
    for name in ("trainability_map.png", "accuracy_vs_depth.png", "grad_norm_per_layer.png"):
        assert_png(out / name)


def test_steps_to_target_loss(sweep):
    runs = report.runs_table(report.load_runs([sweep]), target_loss=1.6)
    by_run = runs.set_index("run")["steps_to_target"]
    assert by_run["0_baseline_d4_s0"] == 2  # curve 2.3, 2.0, 1.5, 1.0
    assert by_run["7_self_stabilizer_d8_s1"] != by_run["7_self_stabilizer_d8_s1"]  # diverged: never (NaN)
    table = report.aggregate(runs).set_index(["method", "depth"])
    assert table.loc[("baseline", 4), "reached_target"] == 2
    assert table.loc[("baseline", 4), "steps_to_target_mean"] == 2.0


def test_staged_run_counts_steps_across_stages_and_draws_its_last_stage(tmp_path):
    config = fake_config("sal")
    run_dir = make_run(tmp_path, "sal", config, [fake_summary(config, 0, 1.0, 1.5, 0.5)], {0: [2.0, 1.0]}, stages=2)
    run_set = report.load_runs([run_dir])
    metrics = run_set.metrics([0])
    assert metrics.loc[metrics["stage"] == 1, "gstep"].min() == 2  # after stage 0's 2 steps
    assert set(run_set.layers([0])["stage"]) == {1}


# -- figures, index.html, files ---------------------------------------------------------------

def assert_png(path: Path, min_side: int = 200, max_side: int = 4000) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        colors = image.convert("L").getextrema()
    assert min_side <= width <= max_side and min_side <= height <= max_side, (path, width, height)
    assert colors[0] < colors[1], f"{path} is blank"


def test_report_files_figures_and_index(sweep, capsys):
    out = sweep / "report"
    assert main(["report", str(sweep), "--target-loss", "1.6"]) == 0
    printed = capsys.readouterr().out
    assert "self_stabilizer" in printed and f"wrote {out}" in printed
    for name in ("runs.csv", "table.csv", "table.md", "index.html"):
        assert (out / name).is_file(), name
    figures = sorted(out.glob("*.png"))
    # lr_sensitivity.png belongs to tuned reports (one lr per cell here: tests/test_tuning.py),
    # phase_diagram.png to sweeps over method.weight_var (tests/test_phase_diagram.py)
    assert {p.name for p in figures} == {name for name, _ in report.FIGURES} - {"lr_sensitivity.png",
                                                                                "phase_diagram.png"}
    for figure in figures:
        assert_png(figure)
    html = (out / "index.html").read_text()
    referenced = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert {p.name for p in figures} <= set(referenced)
    for name in referenced:
        assert not name.startswith(("/", "http")) and (out / name).is_file(), name
    table_md = (out / "table.md").read_text()
    assert "| self_stabilizer | synthetic | 8 | 8 | 2 | 1 |" in table_md
    assert "1.5 ± 0.71" in table_md  # baseline depth 4: train loss 1.0 and 2.0
    assert len(pd.read_csv(out / "runs.csv")) == 8


def test_figures_without_data_are_skipped(tmp_path):
    """One depth, one width, no beta column, no logs at all: no trainability map, no
    accuracy-vs-depth, no beta, no per-layer or loss figures; never an empty image."""
    config = fake_config()
    make_run(tmp_path, "only", config, [fake_summary(config, 0, 1.0, 1.5, 0.5)])
    out = report.write_report([tmp_path], quiet=True)
    assert not list(out.glob("*.png"))
    assert "<img" not in (out / "index.html").read_text()


def test_run_figures_in_the_run_directory(tmp_path):
    config = fake_config(seeds=2)
    summaries = [fake_summary({**config, "seed": s}, s, 1.0, 1.5, 0.5) for s in range(2)]
    run_dir = make_run(tmp_path, "run", config, summaries, {0: [2.3, 2.0, 1.5], 1: [2.2, 1.9, 1.4]})
    written = report.write_run_figures(run_dir)
    assert [p.name for p in written] == ["grad_norm_per_layer.png", "loss_curve.png"]
    for path in written:
        assert path.parent == run_dir
        assert_png(path)


def test_run_figures_of_a_run_still_going(tmp_path):
    """Before summary.json, and in a directory Hydra did not make: the CSVs are enough."""
    run_dir = make_run(tmp_path, "run", fake_config(), losses={0: [2.3, 2.0]}, hydra=False)
    assert [p.name for p in report.write_run_figures(run_dir)] == ["grad_norm_per_layer.png", "loss_curve.png"]


# -- the command line --------------------------------------------------------------------------

def test_no_runs_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stabbench: error: no runs found under") and "\n" not in err
    assert not (tmp_path / "empty" / "report").exists()


def test_missing_path_and_several_paths_without_out(tmp_path, sweep, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(sweep), str(sweep)]) == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(sweep), "--target-loss", "nan"])
    assert exit_info.value.code == 2


def test_several_paths_into_one_report(tmp_path, sweep, monkeypatch):
    monkeypatch.setattr(report, "write_figures", lambda run_set, out_dir, *shown: [])  # tested above; slow
    other = tmp_path / "other"
    config = fake_config(width=16)
    make_run(other, "wide", config, [fake_summary(config, 0, 1.0, 1.5, 0.5)])
    assert main(["report", str(sweep), str(other), "--out", str(tmp_path / "both")]) == 0
    runs = pd.read_csv(tmp_path / "both" / "runs.csv")
    assert len(runs) == 9 and set(runs["width"]) == {8, 16}
    assert "other/wide" in set(runs["run"])


def test_reading_a_thousand_runs_takes_seconds(tmp_path):
    import time

    config = fake_config()
    summary = fake_summary(config, 0, 1.0, 1.5, 0.5)
    for k in range(1000):
        run_dir = tmp_path / f"{k}_run"
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps({**summary, "depth": 4 + k % 5}))
    started = time.perf_counter()
    runs = report.runs_table(report.load_runs([tmp_path]))
    table = report.aggregate(runs)
    elapsed = time.perf_counter() - started
    assert len(runs) == 1000 and len(table) == 5 and table["n"].sum() == 1000
    assert elapsed < 10, elapsed


def test_probe_directories_are_not_runs(tmp_path):
    config = fake_config()
    make_run(tmp_path, "trained", config, [fake_summary(config, 0, 1.0, 1.5, 0.5)])
    probe = make_run(tmp_path, "probe", config)  # .hydra/ as a run has, but a probe's outputs
    (probe / "probe.json").write_text("{}")
    assert report.find_run_dirs([tmp_path]) == [tmp_path / "trained"]


def test_multirun_callback_writes_the_report_into_the_sweep_dir(sweep, monkeypatch):
    from omegaconf import OmegaConf

    from stabbench.callbacks import WriteReport

    monkeypatch.setattr(report, "write_figures", lambda run_set, out_dir, *shown: [])  # tested above; slow
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    WriteReport().on_multirun_end(config, config_name="probe")  # another app's sweep: nothing to report
    assert not (sweep / "report").exists()
    WriteReport().on_multirun_end(config, config_name="config")
    assert len(pd.read_csv(sweep / "report" / "table.csv")) == 4
    assert (sweep / "report" / "index.html").is_file()


def test_the_callback_is_registered_for_run():
    from importlib.resources import files

    from stabbench.callbacks import WriteReport

    config = yaml.safe_load(files("stabbench.conf").joinpath("config.yaml").read_text())
    target = config["hydra"]["callbacks"]["report"]["_target_"]
    assert target == f"{WriteReport.__module__}.{WriteReport.__name__}"


# -- real runs: the multirun callback and a diverged run (slow: trains) ------------------------

SMALL = ["width=8", "dataset.n_train=256", "dataset.n_test=64", "device=cpu"]


@pytest.mark.slow
def test_multirun_leaves_a_report_in_its_sweep_dir_and_report_reproduces_it(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    assert main(["run", "-m", f"hydra.sweep.dir={sweep_dir}", "depth=2,3", "seed=0,1", "epochs=1", *SMALL]) == 0
    out = sweep_dir / "report"
    table = pd.read_csv(out / "table.csv")
    assert table["depth"].tolist() == [2, 3] and table["n"].tolist() == [2, 2]
    for name in ("grad_norm_per_layer.png", "loss_curves.png", "activation_std_at_init.png",
                 "trainability_map.png", "accuracy_vs_depth.png"):
        assert_png(out / name)
    runs = pd.read_csv(out / "runs.csv")
    summaries = [json.loads((sweep_dir / run / "summary.json").read_text()) for run in runs["run"]]
    assert runs["train_loss"].tolist() == pytest.approx([s["train_loss"] for s in summaries])
    first = (out / "table.csv").read_text()
    assert main(["report", str(sweep_dir)]) == 0
    assert (out / "table.csv").read_text() == first


@pytest.mark.slow
def test_real_diverged_run_is_counted_as_diverged(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["run", f"hydra.run.dir={run_dir}", "lr=1e6", "optimizer=sgd", "method.activation=relu",
                 "depth=2", "epochs=2", *SMALL]) == 0
    table = report.aggregate(report.runs_table(report.load_runs([run_dir])))
    assert table[["n", "diverged"]].values.tolist() == [[1, 1]]
    assert [p.name for p in report.write_run_figures(run_dir)] == ["grad_norm_per_layer.png", "loss_curve.png"]
