"""Nothing lost, nothing mixed: one writer per directory, run state that cannot lie, no run
directory inside another, exploded runs told from trained ones, and the report keeping
configs apart that differ only by null. Each test reproduces a way results were lost or
mixed while the command exited 0."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, TINY, run_dirs

SMALL = TINY + ["depth=3", "device=cpu"]


def one_line_error(code, out, err, *named, status=2):
    lines = err.strip().splitlines()
    assert code == status, (code, out[-1500:], err[-1500:])
    assert len(lines) == 1 and lines[0].startswith("stabbench: error:"), err
    assert "Traceback" not in out + err
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def preempt_at_start(cli, *args):
    """Run `stabbench run args` with SIGUSR1 sent as training starts: it checkpoints at its
    first checkpoint_every boundary and exits 128+10, leaving a resumable partial run."""
    import stabbench.checkpoint as checkpoint

    original = checkpoint.Preemption.__enter__

    def enter(self):
        result = original(self)
        os.kill(os.getpid(), signal.SIGUSR1)
        return result

    checkpoint.Preemption.__enter__ = enter
    try:
        code, _, _ = cli("run", *args)
    finally:
        checkpoint.Preemption.__enter__ = original
    assert code == 128 + signal.SIGUSR1


# -- 1. the report: null is a value ---------------------------------------------------------------

@pytest.mark.parametrize("key, values", [("method.weight_var", "null,3.0"), ("max_steps", "null,20")])
def test_configs_differing_only_by_null_are_two_cells_not_two_seeds(cli, tmp_path, key, values):
    code, _, err = cli("run", "-m", *SMALL, "max_steps=20" if key != "max_steps" else "epochs=1",
                       f"{key}={values}", "hydra.sweep.dir=sweep")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "sweep" / "report" / "table.csv")
    assert len(table) == 2 and list(table["n"]) == [1, 1], table[["method", "n"]]
    assert any("null" in m for m in table["method"]), list(table["method"])


# -- 2. one writer per directory ---------------------------------------------------------------------

def start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stabbench.cli", "run", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_runs_started_together_each_keep_their_result_or_are_refused_in_one_line(tmp_path):
    """Four runs at once: two into the default location, two into one explicit directory,
    each with its own lr. Before: same-second default names shared one directory and the
    config on record disagreed with the summary."""
    long = ["dataset.n_train=512", "dataset.n_test=64", "width=16", "depth=3", "epochs=300", "device=cpu"]
    procs = {("default", lr): start(tmp_path, *long, f"lr={lr}") for lr in (0.01, 0.003)}
    procs.update({("explicit", lr): start(tmp_path, *long, f"lr={lr}", "hydra.run.dir=shared") for lr in (0.01, 0.003)})
    outcomes = {key: (p.wait(timeout=300), *p.communicate()) for key, p in procs.items()}
    for lr in (0.01, 0.003):
        code, out, err = outcomes[("default", lr)]
        assert code == 0, err[-2000:]
    default_dirs = sorted((tmp_path / "results" / "runs").iterdir())
    assert len(default_dirs) == 2
    assert sorted(json.loads((d / "summary.json").read_text())["lr"] for d in default_dirs) == [0.003, 0.01]
    explicit = [outcomes[("explicit", lr)] for lr in (0.01, 0.003)]
    assert sorted(code for code, _, _ in explicit) == [0, 2], [e[2][-500:] for e in explicit]
    for code, out, err in explicit:
        if code == 2:
            line = one_line_error(code, out, err)
            assert "in use by pid" in line or "another config" in line, line
    summary = json.loads((tmp_path / "shared" / "summary.json").read_text())
    recorded = (tmp_path / "shared" / ".hydra" / "config.yaml").read_text()
    assert f"lr: {summary['lr']}" in recorded
    metrics = pd.read_csv(tmp_path / "shared" / "metrics.csv")
    assert set(metrics["lr"]) == {summary["lr"]}


def test_the_same_command_typed_while_it_runs_is_refused_naming_the_holder(tmp_path):
    """Before: the copy joined the live directory and retrained from step 0."""
    args = ["dataset.n_train=512", "dataset.n_test=64", "width=16", "depth=3", "epochs=2000", "device=cpu"]
    first = start(tmp_path, *args, "hydra.run.dir=live")
    try:
        for _ in range(600):  # until it trains (its first progress line)
            if (tmp_path / "live" / ".stabbench.lock").exists() and first.poll() is None:
                break
            time.sleep(0.1)
        time.sleep(1)
        second = start(tmp_path, *args, "hydra.run.dir=live")
        code = second.wait(timeout=120)
        out, err = second.communicate()
        line = one_line_error(code, out, err, "live is in use by pid", str(first.pid))
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    # The first one checkpointed on SIGTERM, undisturbed: the same command continues it.
    assert (tmp_path / "live" / "checkpoint.pt").is_file()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    from stabbench import locks

    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); "
                               f"from stabbench import locks; locks.acquire({str(tmp_path / 'd')!r}); "
                               f"print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match="in use by pid"):
        locks.acquire(tmp_path / "d")
    holder.kill()
    holder.wait()
    locks.acquire(tmp_path / "d")  # the kernel dropped the dead process's lock
    locks.release(tmp_path / "d")
    assert not (tmp_path / "d" / locks.FILENAME).exists()


def test_two_sweeps_into_one_sweep_dir_at_once_the_second_is_refused(tmp_path):
    args = ["-m", "dataset.n_train=512", "dataset.n_test=64", "width=16", "depth=3", "epochs=300", "device=cpu",
            "hydra.sweep.dir=sweep"]
    first = start(tmp_path, *args, "lr=0.01,0.02")
    for _ in range(600):
        if (tmp_path / "sweep" / ".stabbench.lock").exists():
            break
        time.sleep(0.1)
    second = start(tmp_path, *args, "lr=0.003,0.004")
    code = second.wait(timeout=300)
    out, err = second.communicate()
    line = one_line_error(code, out, err)
    assert "in use by pid" in line or "another config" in line, line
    assert first.wait(timeout=300) == 0
    lrs = sorted(json.loads(p.read_text())["lr"] for p in (tmp_path / "sweep").glob("*/summary.json"))
    assert lrs == [0.01, 0.02]


# -- 3. run state that cannot lie ---------------------------------------------------------------------

def test_a_killed_retrain_leaves_a_partial_run_not_the_old_summary(cli, tmp_path, monkeypatch):
    from stabbench import train

    assert cli("run", *SMALL, "hydra.run.dir=r")[0] == 0

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # a kill partway through the retrain

    with monkeypatch.context() as patch:
        patch.setattr(train.Run, "train_stage", killed)
        code, _, _ = cli("run", *SMALL, "hydra.run.dir=r", "skip_done=false")
    assert code == 130
    assert not (tmp_path / "r" / "summary.json").exists()
    code, out, _ = cli("run", *SMALL, "hydra.run.dir=r")
    assert code == 0 and "already complete" not in out and (tmp_path / "r" / "summary.json").is_file()


@pytest.mark.parametrize("content", [b"{not json", b"\x00\xff\xfe garbage", b'{"seeds": 5}', b"null", b"[]",
                                     b'{"seeds": [1, 2]}', b"[" * 100_000 + b"]" * 100_000])
def test_an_unreadable_or_misshapen_summary_is_refused_naming_it(cli, tmp_path, content):
    """Before: a corrupt summary switched off the 'another config' guard (a different config
    then overwrote the run), and one of the wrong shape gave a traceback."""
    assert cli("run", *SMALL, "hydra.run.dir=r")[0] == 0
    (tmp_path / "r" / "summary.json").write_bytes(content)
    metrics = (tmp_path / "r" / "metrics.csv").read_bytes()
    for lr in ("lr=0.01", "lr=0.05"):  # the same config and another
        one_line_error(*cli("run", *SMALL, "hydra.run.dir=r", lr), "summary.json")
    assert (tmp_path / "r" / "metrics.csv").read_bytes() == metrics
    assert (tmp_path / "r" / "summary.json").read_bytes() == content


def test_a_partial_run_without_checkpoint_is_not_overwritten_by_another_config(cli, tmp_path):
    assert cli("run", *SMALL, "hydra.run.dir=r")[0] == 0
    (tmp_path / "r" / "summary.json").unlink()  # as if killed before its first checkpoint
    metrics = (tmp_path / "r" / "metrics.csv").read_bytes()
    one_line_error(*cli("run", *SMALL, "hydra.run.dir=r", "lr=0.05"), "partial run of another config", "lr")
    assert (tmp_path / "r" / "metrics.csv").read_bytes() == metrics
    assert cli("run", *SMALL, "hydra.run.dir=r")[0] == 0  # its own config trains there again


@pytest.mark.parametrize("damage", ["truncate_metrics", "edit_layers", "drop_column"])
def test_resume_refuses_records_that_differ_from_its_checkpoint(cli, tmp_path, damage):
    args = ("depth=3", "hydra.run.dir=r", "checkpoint_every=2", *TINY)
    preempt_at_start(cli, *args)
    run = tmp_path / "r"
    if damage == "truncate_metrics":
        lines = (run / "metrics.csv").read_text().splitlines()
        (run / "metrics.csv").write_text("\n".join(lines[:-1]) + "\n")
    elif damage == "edit_layers":
        layers = pd.read_csv(run / "layers.csv")
        layers.loc[0, "grad_norm"] = 123.0
        layers.to_csv(run / "layers.csv", index=False)
    else:
        pd.read_csv(run / "layers.csv").drop(columns="weight_norm").to_csv(run / "layers.csv", index=False)
    one_line_error(*cli("run", *args), "checkpoint")
    assert not (run / "summary.json").exists()


def test_resume_from_intact_records_still_matches_an_uninterrupted_run(cli, tmp_path):
    args = ("depth=3", "checkpoint_every=2", *TINY)
    preempt_at_start(cli, *args, "hydra.run.dir=r")
    assert cli("run", *args, "hydra.run.dir=r")[0] == 0
    assert cli("run", *args, "hydra.run.dir=ref")[0] == 0
    for name in ("metrics.csv", "layers.csv"):
        a, b = pd.read_csv(tmp_path / "r" / name), pd.read_csv(tmp_path / "ref" / name)
        pd.testing.assert_frame_equal(a.drop(columns="time_s", errors="ignore"), b.drop(columns="time_s", errors="ignore"))


def test_a_checkpoint_of_another_structure_is_one_line(cli, tmp_path):
    import torch

    from stabbench import checkpoint

    args = ("depth=3", "hydra.run.dir=r", "checkpoint_every=2", *TINY)
    preempt_at_start(cli, *args)
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    for broken in ({**state, "loop": {"step": 1}}, {**state, "rows": [1, 2]}, {**state, "ensemble": {"x": torch.ones(2)}}):
        checkpoint.save(tmp_path / "r" / "checkpoint.pt", broken)
        one_line_error(*cli("run", *args), "checkpoint")


# -- 4. directories that hold other directories ---------------------------------------------------------

def test_a_run_into_a_sweep_directory_is_refused_and_the_sweep_stays_whole(cli, tmp_path):
    assert cli("run", "-m", *SMALL, "seed=0,1", "hydra.sweep.dir=sweep")[0] == 0
    one_line_error(*cli("run", *SMALL, "hydra.run.dir=sweep"), "already holds other runs")
    one_line_error(*cli("run", *SMALL, "hydra.run.dir=."), "already holds other runs")
    code, out, _ = cli("report", "sweep")
    assert code == 0 and "2 seeds in 2 runs" in out


def test_a_sweep_into_a_run_directory_is_refused(cli, tmp_path):
    assert cli("run", *SMALL, "hydra.run.dir=r")[0] == 0
    one_line_error(*cli("run", "-m", *SMALL, "seed=0,1", "hydra.sweep.dir=r"), "run's own directory")


def test_the_report_never_writes_into_a_run_and_counts_a_run_once(cli, tmp_path):
    assert cli("run", *SMALL, "hydra.run.dir=r")[0] == 0
    before = sorted(p.name for p in (tmp_path / "r").iterdir())
    code, out, _ = cli("report", "r")
    assert code == 0 and (tmp_path / "r_report" / "table.csv").is_file()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before
    one_line_error(*cli("report", "r", "--out", "r/inside"), "inside the run directory")
    code, out, _ = cli("report", "r", str(tmp_path / "r"), ".", "--out", "both")
    assert code == 0 and "1 seeds in 1 runs" in out


# -- 5. blown up is not trained --------------------------------------------------------------------------

def test_a_blown_up_run_is_exploded_and_left_out_of_the_means(cli, tmp_path):
    """lr=1e6 with tanh: the loss goes from ~2.4 to millions, finite; before: diverged false
    and its chance accuracy averaged into the report."""
    code, _, err = cli("run", "-m", *SMALL, "max_steps=40", "method.activation=tanh", "lr=1e6,0.01",
                       "hydra.sweep.dir=sweep", "dataset.validation=0")
    assert code == 0, err
    summaries = {json.loads(p.read_text())["lr"]: json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/summary.json")}
    blown = summaries[1e6]
    assert blown["diverged"] is False and blown["exploded"] is True and blown["exploded_step"] >= 0
    assert blown["train_loss"] > 100 * 2.3  # an independent look at the same run: beyond the factor
    assert summaries[0.01]["exploded"] is False
    table = pd.read_csv(tmp_path / "sweep" / "report" / "table.csv")
    row = table[table["method"].str.contains("lr=1e")].iloc[0]
    assert row["exploded"] == 1 and np.isnan(row["test_acc_mean"])
    runs = pd.read_csv(tmp_path / "sweep" / "report" / "runs.csv")
    assert set(runs["status"]) == {"complete", "exploded"}


def test_exploded_rule_against_hand_computed_cases():
    from stabbench.train import exploded_now

    loss, initial = np.array([2.0, 500.0, 2.5, 1.0]), np.array([2.3, 2.3, 2.3, 2.3])
    hidden = np.array([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    # member 1: beyond 100x; member 2: saturated and no better than at the start; member 3: saturated but learned
    assert exploded_now(loss, initial, hidden, 100.0).tolist() == [False, True, True, False]


# -- 6. a ratio over one layer is not level gradients ---------------------------------------------------

@pytest.mark.parametrize("depth", [1, 2])
def test_the_gradient_ratio_is_null_with_fewer_than_two_square_layers(cli, tmp_path, depth):
    assert cli("run", *TINY, f"depth={depth}", "hydra.run.dir=r")[0] == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["grad_norm_ratio_init"] is None and summary["grad_norm_ratio_final"] is None


# -- a full disk, a kill before the figures ----------------------------------------------------------

def test_a_full_disk_during_a_run_is_one_line_and_keeps_what_was_written(cli, tmp_path, monkeypatch):
    import errno

    from stabbench import outputs

    original = outputs.atomic_write_bytes

    def full(path, data):
        if Path(path).name == "summary.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(outputs, "atomic_write_bytes", full)
        line = one_line_error(*cli("run", *SMALL, "hydra.run.dir=r"), "no space left on device", status=1)
    assert "same command" in line
    assert not (tmp_path / "r" / "summary.json").exists() and (tmp_path / "r" / "metrics.csv").is_file()
    code, out, _ = cli("run", *SMALL, "hydra.run.dir=r")
    assert code == 0 and (tmp_path / "r" / "summary.json").is_file()


def test_the_same_command_draws_figures_a_kill_left_undrawn(cli, tmp_path):
    assert cli("run", *SMALL, "hydra.run.dir=r")[0] == 0
    for name in ("grad_norm_per_layer.png", "loss_curve.png"):
        (tmp_path / "r" / name).unlink()
    code, out, _ = cli("run", *SMALL, "hydra.run.dir=r")
    assert code == 0 and "already complete" in out
    assert (tmp_path / "r" / "grad_norm_per_layer.png").is_file() and (tmp_path / "r" / "loss_curve.png").is_file()
