"""Golden outputs: a small fixed set of runs, one per method (and the paths off the plain MLP:
batch norm, an lr grid, alpha dropout, SAL's stages, TAT), on the CPU, compared with the
metrics.csv, layers.csv and summary.json recorded in tests/golden/ (wall time, versions and
the host aside). A restructuring that changes no behaviour leaves every number as it was.

New columns and summary keys are allowed (a new per-layer statistic adds one); a changed or
missing one fails. To record the files again after a change that is meant to alter results:

    STABBENCH_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

and say in the commit why the numbers moved.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import compose
from stabbench import report, train

GOLDEN = Path(__file__).parent / "golden"
COMMON = ["depth=4", "width=16", "dataset.n_train=512", "dataset.n_test=128", "max_steps=6", "log_every=2",
          "epochs=2", "device=cpu", "batch_size=64", "seeds=2"]
RUNS = {
    "baseline": ["method=baseline"],
    "baseline_batch_norm_adam": ["method=baseline", "method.norm=batch", "optimizer=adam"],
    "baseline_lr_grid": ["method=baseline", "lrs=[0.003,0.05]", "seeds=1"],
    "self_stabilizer": ["method=self_stabilizer"],
    "snn_alpha_dropout": ["method=snn", "method.alpha_dropout=0.1"],
    "bsnn": ["method=bsnn"],
    "lyapunov": ["method=lyapunov"],
    "sal": ["method=sal"],
    "tat": ["method=tat", "method.c_val_0_target=0.6"],
    "regression": ["method=baseline", "dataset=synthetic_regression"],
}
# What differs between two runs of the same config: when and where it ran.
VOLATILE_COLUMNS = {"time_s"}
VOLATILE_KEYS = {"wall_time_s", "device", "torch_version", "git_commit"}
RTOL, ATOL = 1e-4, 1e-6  # float32 on another CPU may round differently; a behaviour change is far larger


@pytest.fixture(autouse=True)
def no_run_figures(monkeypatch):
    monkeypatch.setattr(report, "write_run_figures", lambda out_dir: [])


def comparable(value):
    """A summary without its volatile keys, at every depth (SAL's stages hold summaries too)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def assert_close(new, old, where: str) -> None:
    if isinstance(old, dict):
        assert isinstance(new, dict), where
        for key, value in old.items():
            assert key in new, f"{where}.{key} is gone"
            assert_close(new[key], value, f"{where}.{key}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), where
        for i, (a, b) in enumerate(zip(new, old)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(old, float) and not isinstance(new, bool):
        assert isinstance(new, (int, float)), (where, new)
        assert new == pytest.approx(old, rel=RTOL, abs=ATOL), where
    else:
        assert new == old, (where, new, old)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_outputs_match_the_golden_files(name, tmp_path):
    out = tmp_path / name
    out.mkdir()
    train.run(compose(*COMMON, *RUNS[name]), out)
    golden = GOLDEN / name
    if os.environ.get("STABBENCH_WRITE_GOLDEN"):
        shutil.rmtree(golden, ignore_errors=True)
        golden.mkdir(parents=True)
        for file in ("metrics.csv", "layers.csv"):
            pd.read_csv(out / file).drop(columns=list(VOLATILE_COLUMNS), errors="ignore").to_csv(golden / file,
                                                                                                index=False)
        (golden / "summary.json").write_text(json.dumps(comparable(json.loads((out / "summary.json").read_text())),
                                                        indent=1, sort_keys=True) + "\n")
        pytest.skip(f"recorded {golden}")
    assert golden.is_dir(), f"no golden files for {name}: record them (see this module's docstring)"
    for file in ("metrics.csv", "layers.csv"):
        old, new = pd.read_csv(golden / file), pd.read_csv(out / file)
        missing = [c for c in old.columns if c not in new.columns]
        assert not missing, f"{name}/{file} lost its columns {missing}"
        new = new[list(old.columns)]
        assert len(new) == len(old), f"{name}/{file}: {len(new)} rows, golden {len(old)}"
        for column in old.columns:
            if pd.api.types.is_numeric_dtype(old[column]):
                np.testing.assert_allclose(new[column].to_numpy(float), old[column].to_numpy(float), rtol=RTOL,
                                           atol=ATOL, equal_nan=True, err_msg=f"{name}/{file}:{column}")
            else:
                assert new[column].astype(str).tolist() == old[column].astype(str).tolist(), f"{name}/{file}:{column}"
    assert_close(comparable(json.loads((out / "summary.json").read_text())),
                 json.loads((golden / "summary.json").read_text()), f"{name}/summary.json")
