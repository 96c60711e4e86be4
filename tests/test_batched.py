"""Seeds trained as one batched model give, for each seed, what a run of that seed alone
gives (every method), and a NaN in one seed stops that seed only."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import blow_up_seed_1, compose
from stabbench import methods, train

SMALL = ["depth=4", "width=16", "dataset.n_train=512", "dataset.n_test=128", "max_steps=8", "log_every=3",
         "epochs=2", "device=cpu"]


@pytest.mark.parametrize("method", sorted(methods.REGISTRY))
def test_seed_k_of_a_batched_run_equals_a_run_of_seed_k(method, tmp_path):
    batched_dir, single_dir = tmp_path / "batched", tmp_path / "single"
    batched_dir.mkdir(), single_dir.mkdir()
    train.run(compose(f"method={method}", "seed=3", "seeds=3", *SMALL), batched_dir)
    train.run(compose(f"method={method}", "seed=4", *SMALL), single_dir)

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
