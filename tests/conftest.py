"""Shared test helpers: compose a config as `stabbench run` would, and call the CLI
in-process (fast) or as a real subprocess (exit codes, signals, stderr)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset.n_train=512", "dataset.n_test=128", "width=16", "epochs=1"]  # a run in about a second


def compose(*overrides: str, config_name: str = "config"):
    """The config `stabbench run <overrides>` would train (hydra node left out)."""
    from hydra import compose as hydra_compose, initialize_config_module

    from stabbench.config import register_schemas

    register_schemas()
    with initialize_config_module(config_module="stabbench.conf", version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def run_subprocess(*args: str, cwd: Path, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "stabbench.cli", *args], cwd=cwd, capture_output=True, text=True,
                           timeout=timeout, env=env, **kwargs)


def in_process_cli(capture):
    """`call(*args)` runs `stabbench <args>` in this process and returns (exit code, stdout,
    stderr) read from `capture` (pytest's capsys, or capfd to see child processes too)."""
    from hydra.core.global_hydra import GlobalHydra

    from stabbench.cli import main

    def call(*args: str):
        GlobalHydra.instance().clear()
        try:
            code = main(list(args))
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        finally:
            GlobalHydra.instance().clear()
        out = capture.readouterr()
        return code, out.out, out.err

    return call


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Run `stabbench ...` in-process from tmp_path; returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    return in_process_cli(capsys)


def blow_up_seed_1(monkeypatch) -> None:
    """Seed 1's initial weights scaled up 40x: it alone diverges, in the first steps."""
    from stabbench import train

    original = train.build_ensemble

    def build(method, shape, seeds, device):
        ensemble = original(method, shape, seeds, device)
        for tensor in ensemble.params.values():
            tensor.data[1] *= 40.0
        return ensemble

    monkeypatch.setattr(train, "build_ensemble", build)


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).rglob("summary.json"))


SELU_ALPHA = 1.7580993408473766  # -alpha' of alpha dropout: the value a dropped SELU unit is set to is -1.758


def alpha_dropout_keep_masks(seed: int, shapes: list[tuple], p: float) -> list:
    """The keep-masks torch's alpha dropout draws, in order, for tensors of these shapes after
    torch.manual_seed(seed): the draw depends on the shape only, so ones show it."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    a = ((1 - p) * (1 + p * SELU_ALPHA ** 2)) ** -0.5
    return [F.alpha_dropout(torch.ones(shape), p, True) > SELU_ALPHA * a * p for shape in shapes]


def apply_alpha_dropout(x, keep, p: float):
    """Alpha dropout with a given keep-mask (Klambauer et al. 2017, eq. for a, b): a (x or -1.758) + b."""
    import torch

    a = ((1 - p) * (1 + p * SELU_ALPHA ** 2)) ** -0.5
    return a * torch.where(keep, x, torch.full_like(x, -SELU_ALPHA)) + SELU_ALPHA * a * p
