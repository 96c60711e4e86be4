"""Sweeps on Hydra's launcher plugins: joblib (parallel processes on one machine) and
submitit (SLURM job arrays; `submitit_local` runs the same code path here), the SLURM
preset, GPU spreading, and idempotent reruns: the same command typed again skips every
finished run (skip_done) in the same directory and completes the unfinished ones."""
from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import TINY, in_process_cli, run_dirs
from stabbench import report

SWEEP = [*TINY, "device=cpu", "log_every=2"]
JOBLIB_SWEEP = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "depth=4,8", "seed=0,1", "epochs=1",
                *SWEEP]


def shut_down_joblib_workers() -> None:
    """joblib keeps its worker processes for the next sweep; they keep the working directory
    and the stdout they were started with, so each test starts and ends without them."""
    from joblib.externals.loky import reusable_executor

    executor = getattr(reusable_executor, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)


@pytest.fixture
def sweep_cli(tmp_path, monkeypatch, capfd):
    """Like conftest's `cli`, but captures at the file-descriptor level, so that what the
    launcher's worker processes print is seen too."""
    monkeypatch.chdir(tmp_path)
    # the sweep's report is tested in test_report; its figures only cost seconds here
    monkeypatch.setattr(report, "write_figures", lambda run_set, out_dir, *shown: [])
    shut_down_joblib_workers()
    call = in_process_cli(capfd)
    yield call
    shut_down_joblib_workers()


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def files_state(runs: list[Path]) -> dict:
    """Bytes and modification time of each run's result files."""
    return {(run.name, name): ((run / name).read_bytes(), (run / name).stat().st_mtime_ns)
            for run in runs for name in ("summary.json", "metrics.csv", "layers.csv")}


def assert_complete(run: Path, steps: int) -> None:
    assert {"summary.json", "metrics.csv", "layers.csv"} <= {p.name for p in run.iterdir()}
    assert summary(run)["steps"] == steps and summary(run)["diverged"] is False
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics[metrics.split == "test"].step.tolist() == [steps]  # the last evaluation is there
    assert not (run / "checkpoint.pt").exists()


def test_joblib_sweep_runs_in_parallel_and_the_same_command_again_retrains_nothing(sweep_cli, tmp_path):
    code, out, err = sweep_cli("run", *JOBLIB_SWEEP)
    assert code == 0, err
    assert "Joblib.Parallel(n_jobs=2" in out + err  # Hydra's joblib launcher ran the jobs
    [sweep] = list((tmp_path / "results" / "sweeps").iterdir())
    runs = run_dirs(sweep)
    assert len(runs) == 4
    assert sorted((summary(r)["depth"], summary(r)["seed"]) for r in runs) == [(4, 0), (4, 1), (8, 0), (8, 1)]
    for run in runs:
        assert_complete(run, steps=(512 - 51) // 128)
    assert OmegaConf.load(sweep / "multirun.yaml").hydra.launcher.n_jobs == 2
    assert len(pd.read_csv(sweep / "report" / "runs.csv")) == 4  # the sweep's report, written at its end

    # the same command again: same sweep dir, nothing retrained, nothing rewritten
    before = files_state(runs)
    code, out, err = sweep_cli("run", *JOBLIB_SWEEP)
    assert code == 0, err
    assert f"continuing results/sweeps/{sweep.name} (same command as before)" in out
    assert out.count("already complete") == 4
    assert list((tmp_path / "results" / "sweeps").iterdir()) == [sweep]
    assert files_state(runs) == before

    # a half-finished sweep (one job killed before its first checkpoint) is completed by it
    unfinished = runs[2]
    figures = {k: v for k, v in summary(unfinished).items() if k not in ("wall_time_s",)}
    for name in ("summary.json", "metrics.csv", "layers.csv"):
        (unfinished / name).unlink()
    code, out, err = sweep_cli("run", *JOBLIB_SWEEP)
    assert code == 0, err
    assert out.count("already complete") == 3 and f"wrote {unfinished}" in out
    assert_complete(unfinished, steps=(512 - 51) // 128)
    assert {k: v for k, v in summary(unfinished).items() if k != "wall_time_s"} == figures
    assert {k: v for k, v in files_state(runs).items() if k[0] != unfinished.name} == \
           {k: v for k, v in before.items() if k[0] != unfinished.name}


@pytest.mark.slow  # 11 s; the joblib launcher's test covers the launcher path by default
def test_submitit_local_sweep_writes_complete_runs(sweep_cli, tmp_path):
    code, out, err = sweep_cli("run", "-m", "hydra/launcher=submitit_local", "depth=2,3", *SWEEP)
    assert code == 0, err
    [sweep] = list((tmp_path / "results" / "sweeps").iterdir())
    runs = run_dirs(sweep)
    assert sorted(summary(r)["depth"] for r in runs) == [2, 3]
    for run in runs:
        assert_complete(run, steps=(512 - 51) // 128)
    # each job ran as its own submitit job, in its own process, and said where it wrote
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2
    assert sorted(line.split("wrote ")[1].strip() for log in logs for line in log.read_text().splitlines()
                  if line.startswith("wrote ")) == sorted(str(r.resolve()) for r in runs)
    for log in (sweep / ".submitit").glob("*/*_log.err"):
        assert "Traceback" not in log.read_text()


def test_the_same_run_command_again_skips_and_skip_done_false_retrains(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "write_run_figures", lambda out_dir: [])
    args = ["run", "depth=3", *SWEEP]
    assert cli(*args)[0] == 0
    [run] = run_dirs(tmp_path / "results")
    before = files_state([run])
    code, out, err = cli(*args)
    assert code == 0, err
    assert f"continuing results/runs/{run.name}" in out and f"already complete: {run}" in out
    assert run_dirs(tmp_path / "results") == [run] and files_state([run]) == before
    # skip_done=false: trained again, in place, to the same numbers
    code, out, err = cli(*args, f"hydra.run.dir={run}", "skip_done=false")
    assert code == 0, err
    assert "already complete" not in out
    after = files_state([run])
    assert after[(run.name, "summary.json")][1] > before[(run.name, "summary.json")][1]
    assert after[(run.name, "metrics.csv")][0].count(b"\n") == before[(run.name, "metrics.csv")][0].count(b"\n")
    assert summary(run)["test_loss"] == json.loads(before[(run.name, "summary.json")][0])["test_loss"]


def test_a_finished_run_of_the_same_config_is_skipped_whatever_its_checkpoint_every(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "write_run_figures", lambda out_dir: [])
    assert cli("run", "hydra.run.dir=run", "depth=2", *SWEEP)[0] == 0
    before = files_state([tmp_path / "run"])
    code, out, err = cli("run", "hydra.run.dir=run", "depth=2", "checkpoint_every=3", *SWEEP)
    assert code == 0 and "already complete" in out, err
    assert files_state([tmp_path / "run"]) == before


def test_slurm_preset():
    from hydra import compose, initialize_config_module

    from stabbench.checkpoint import Preemption
    from stabbench.config import register_schemas

    register_schemas()
    with initialize_config_module(config_module="stabbench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1 and launcher.partition == "gpu"
    assert launcher.timeout_min > 0 and launcher.cpus_per_task > 0 and launcher.mem_gb > 0
    assert launcher.max_num_timeout >= 1  # requeued after preemption or timeout
    # SLURM warns with SIGUSR2 signal_delay_s before the end; the run checkpoints on it
    assert 0 < launcher.signal_delay_s < launcher.timeout_min * 60
    assert signal.SIGUSR2 in Preemption.SIGNALS
    assert launcher.submitit_folder.startswith(str(cfg.hydra.sweep.dir))


@pytest.mark.parametrize("mode, gpus, job, device", [
    ("MULTIRUN", 3, 4, 1),  # job 4 of a sweep on 3 GPUs: GPU 4 mod 3
    ("MULTIRUN", 3, 2, 2),
    ("MULTIRUN", 1, 5, None),  # one GPU: nothing to choose
    ("RUN", 3, 0, None),  # a single run keeps the default device
])
def test_local_sweep_jobs_spread_over_the_gpus(monkeypatch, mode, gpus, job, device):
    import torch
    from hydra.types import RunMode

    from stabbench.app import spread_over_gpus

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    spread_over_gpus(SimpleNamespace(mode=getattr(RunMode, mode), job=SimpleNamespace(num=job)))
    assert chosen == ([] if device is None else [device])


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the field after the state is the parent's pid
            children.append(int(stat.parent.name))
    return children


@pytest.mark.slow
def test_submitit_job_preempted_with_sigusr2_is_requeued_and_resumes(cli, tmp_path, monkeypatch):
    """The SLURM path for real, on submitit's local executor: SIGUSR2 (SLURM's warning before
    preemption) reaches the job; it checkpoints, submitit requeues it, and the requeued job
    resumes in the same directory (its ${now:} sweep dir included) to the uninterrupted result."""
    import os
    import subprocess
    import sys
    import time

    args = ["dataset.n_train=512", "dataset.n_test=128", "width=16", "depth=4", "epochs=2", "batch_size=8",
            "log_every=1", "checkpoint_every=4", "device=cpu"]
    monkeypatch.setattr(report, "write_run_figures", lambda out_dir: [])
    assert cli("run", "hydra.run.dir=reference", *args)[0] == 0
    process = subprocess.Popen([sys.executable, "-m", "stabbench.cli", "run", "-m", "hydra/launcher=submitit_local",
                                *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("results/sweeps/*/0_*/checkpoint.pt")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    [controller] = [int(p.name) for p in tmp_path.glob("results/sweeps/*/.submitit/[0-9]*")]
    [job] = children_of(controller)
    os.kill(job, signal.SIGUSR2)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, out + err
    [run] = run_dirs(tmp_path / "results" / "sweeps")
    log = next((run.parent / ".submitit").glob("*/*_log.out")).read_text()
    errors = next((run.parent / ".submitit").glob("*/*_log.err")).read_text()
    assert "caught SIGUSR2; checkpoint written" in errors and "Requeued job" in log + errors
    assert f"resuming {run.resolve()}" in log
    for name in ("metrics.csv", "layers.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(run / name).drop(columns="time_s", errors="ignore"),
                                      pd.read_csv(tmp_path / "reference" / name).drop(columns="time_s",
                                                                                      errors="ignore"),
                                      check_exact=True)
    keys = ("train_loss", "test_loss", "test_acc", "grad_norm_ratio_final", "steps")
    assert {k: summary(run)[k] for k in keys} == {k: summary(tmp_path / "reference")[k] for k in keys}
