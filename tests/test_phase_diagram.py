"""The report's phase diagram (stabbench/phase_diagram.py): drawn when runs vary
method.weight_var and depth, scored by the last logged training accuracy, with the theory's
6 xi_c and critical sigma_w^2 in phase_diagram.csv equal to mean_field's."""
from __future__ import annotations

import pandas as pd
import pytest

from stabbench import mean_field, report
from stabbench.model import Activation
from tests.test_report import PNG_MAGIC, fake_config, fake_summary, make_run


def phase_sweep(root, accuracy):
    """One run per (sigma_w^2, depth), one seed, whose last train row has accuracy[(v, d)]."""
    for job, ((weight_var, depth), acc) in enumerate(accuracy.items()):
        config = fake_config(depth=depth, width=16, weight_var=weight_var, bias_var=0.05)
        run_dir = make_run(root, f"{job}_w{weight_var}_d{depth}", config, [fake_summary(config, 0, 1.0, 1.0, acc)])
        rows = [dict(step=s, epoch=0, stage=0, seed=0, split="train", loss=1.0, acc=a, time_s=0.1)
                for s, a in ((0, 0.1), (9, acc))]
        rows.append(dict(step=10, epoch=1, stage=0, seed=0, split="test", loss=1.0, acc=0.0, time_s=0.2))
        pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)


def test_phase_diagram_reports_training_accuracy_and_the_theorys_edge(tmp_path):
    # trainable (0.8) below depth 50 at sigma_w^2 1.75 and 2.5, only at depth 10 at 1.0 and 4.0
    accuracy = {(v, d): (0.8 if d < 50 and v in (1.75, 2.5) or d == 10 else 0.1)
                for v in (1.0, 1.75, 2.5, 4.0) for d in (10, 30, 60)}
    phase_sweep(tmp_path / "sweep", accuracy)
    out = report.write_report([tmp_path / "sweep"], quiet=True)
    assert (out / "phase_diagram.png").read_bytes()[:8] == PNG_MAGIC
    assert "phase_diagram.png" in (out / "index.html").read_text()
    table = pd.read_csv(out / "phase_diagram.csv").set_index("weight_var")
    assert list(table.index) == [1.0, 1.75, 2.5, 4.0]
    assert table["deepest_trainable"].tolist() == [10, 30, 30, 10]  # the score is the last train row, not test_acc
    assert table["shallowest_untrainable"].tolist() == [30, 60, 60, 30]
    tanh = Activation("tanh")
    for v in (1.0, 2.5, 4.0):
        assert table.loc[v, "six_xi_c"] == pytest.approx(6 * mean_field.predict(tanh, v, 0.05).xi_c, rel=1e-9)
    assert table["critical_weight_var"].iloc[0] == pytest.approx(mean_field.critical_weight_var(tanh, 0.05))
    assert (table["bias_var"] == 0.05).all()


def test_no_phase_diagram_without_a_weight_var_sweep(tmp_path):
    for job, depth in enumerate((4, 8)):
        config = fake_config(depth=depth)
        make_run(tmp_path / "sweep", f"{job}_d{depth}", config, [fake_summary(config, 0, 1.0, 1.0, 0.5)],
                 {0: [2.0, 1.0]})
    out = report.write_report([tmp_path / "sweep"], quiet=True)
    assert not (out / "phase_diagram.png").exists() and not (out / "phase_diagram.csv").exists()


def test_without_bias_the_curve_has_no_depth_scale_where_q_star_is_zero_and_diverged_cells_are_untrainable(tmp_path):
    """tanh, sigma_b^2 = 0: below sigma_w^2 = 1 q* = 0 and there is no xi_c (NaN in the table,
    with the reason; a gap in the curve, not a line off the top); above, the stable c* = 0
    gives a finite 6 xi_c. A cell whose seed diverged has no accuracy and is untrainable."""
    runs = {(0.5, 10): 0.8, (0.5, 30): 0.8, (3.0, 10): 0.8, (3.0, 30): None}  # None: diverged
    for job, ((weight_var, depth), acc) in enumerate(runs.items()):
        config = fake_config(depth=depth, width=16, weight_var=weight_var, bias_var=0.0)
        run_dir = make_run(tmp_path / "sweep", f"{job}_w{weight_var}_d{depth}", config,
                           [fake_summary(config, 0, 1.0, 1.0, acc, diverged=acc is None)])
        rows = [dict(step=s, epoch=0, stage=0, seed=0, split="train", loss=1.0 if acc else float("nan"),
                     acc=float("nan") if acc is None else acc, time_s=0.1) for s in (0, 9)]
        pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)
    out = report.write_report([tmp_path / "sweep"], quiet=True)
    table = pd.read_csv(out / "phase_diagram.csv").set_index("weight_var")
    tanh = Activation("tanh")
    assert pd.isna(table.loc[0.5, "six_xi_c"]) and "q* = 0" in table.loc[0.5, "xi_c_undefined"]
    expected = mean_field.predict(tanh, 3.0, 0.0)
    assert expected.c_star == 0.0
    assert table.loc[3.0, "six_xi_c"] == pytest.approx(6 * expected.xi_c, rel=1e-9) and pd.isna(table.loc[3.0, "xi_c_undefined"])
    assert table.loc[3.0, "deepest_trainable"] == 10 and table.loc[3.0, "shallowest_untrainable"] == 30
