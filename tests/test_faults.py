"""Faults: a run stopped by SIGTERM / SIGUSR (preemption) or killed by SIGKILL, then
rerun with the same command, resumes from its checkpoint and ends with exactly the
numbers and files of a run never interrupted (on the CPU); no file is ever left corrupt;
a checkpoint is data, never code; a diverging run is a result, never a crash."""
from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import blow_up_seed_1, run_dirs
from stabbench import checkpoint, report, train
from stabbench.errors import UserError
from stabbench.outputs import LAYER_COLUMNS, METRICS_COLUMNS

# 512 / 16 = 32 steps per epoch, 2 epochs; a log row every 3 steps, a checkpoint every 4.
# 569: the default validation split (0.1) holds 57 out, leaving the 512 training examples these timings assume
FAULT_RUN = ["dataset.n_train=569", "dataset.n_test=128", "width=16", "depth=4", "epochs=2", "batch_size=16",
             "log_every=3", "checkpoint_every=4", "device=cpu"]
FIGURES = ["train_loss", "test_loss", "test_acc", "grad_norm_ratio_init", "grad_norm_ratio_final", "steps",
           "epochs", "total_steps", "total_flops", "diverged", "diverged_step", "stages"]


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    """The run figures are tested elsewhere; here they only cost seconds per run."""
    monkeypatch.setattr(report, "write_run_figures", lambda out_dir: [])


def results_of(run: Path) -> dict:
    """What must not depend on interruptions: summary figures and both CSVs minus wall time."""
    summary = json.loads((run / "summary.json").read_text())
    summaries = summary["seeds"] if "seeds" in summary else [summary]
    return {"summary": [{k: s.get(k) for k in FIGURES} for s in summaries],
            "metrics": pd.read_csv(run / "metrics.csv").drop(columns="time_s"),
            "layers": pd.read_csv(run / "layers.csv")}


def assert_same_results(run: Path, reference: Path) -> None:
    got, want = results_of(run), results_of(reference)
    assert got["summary"] == want["summary"]
    pd.testing.assert_frame_equal(got["metrics"], want["metrics"], check_exact=True)
    pd.testing.assert_frame_equal(got["layers"], want["layers"], check_exact=True)


def assert_nothing_corrupt(run: Path) -> dict | None:
    """Every file a run writes reads back whole; returns the checkpoint, if there is one."""
    saved = None
    if (run / checkpoint.FILENAME).exists():
        saved = torch.load(run / checkpoint.FILENAME, weights_only=True)  # data only
        assert saved["config_key"] and saved["loop"]["step"] > 0
    for name, columns in (("metrics.csv", METRICS_COLUMNS), ("layers.csv", LAYER_COLUMNS)):
        if (run / name).exists():
            frame = pd.read_csv(run / name)
            assert list(frame.columns[:len(columns)]) == columns
            assert not frame[["step", "seed"]].isna().any().any()
            if saved is not None:  # the checkpoint's rows are all there
                assert len(frame) >= saved["rows"]["metrics" if name == "metrics.csv" else "layers"]
    if (run / "summary.json").exists():
        assert "test_loss" in json.loads((run / "summary.json").read_text())
    for record in (run / ".hydra").glob("*.yaml"):
        OmegaConf.load(record)
    return saved


def start(args: list[str], cwd: Path, extra_code: str = "", command: str = "run") -> subprocess.Popen:
    """`stabbench run ARGS` as a real process (own signal handlers, own exit status)."""
    code = f"import sys\n{extra_code}\nfrom stabbench.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, command, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def file_version(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120, newer_than: tuple = (),
             may_finish: bool = False) -> bool:
    """Until `path` exists (in another version than `newer_than`); False if the process
    finished successfully first and `may_finish`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if file_version(path) != newer_than:
                return True
        except FileNotFoundError:
            pass
        if process.poll() is not None:
            if may_finish and process.returncode == 0:
                return False
            out, err = process.communicate()
            pytest.fail(f"the run ended (status {process.returncode}) before {path.name} appeared:\n{out}\n{err}")
        time.sleep(0.005)
    process.kill()
    pytest.fail(f"no {path} after {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """FAULT_RUN trained without interruption."""
    from hydra.core.global_hydra import GlobalHydra

    from stabbench.cli import main

    run = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "write_run_figures", lambda out_dir: [])
        GlobalHydra.instance().clear()
        assert main(["run", f"hydra.run.dir={run}", *FAULT_RUN]) == 0
        GlobalHydra.instance().clear()
    return run


# -- real processes ---------------------------------------------------------------------------

# a step takes milliseconds: slow them down so that a signal lands mid-run
SLOW_LOG_STEPS = ("import time, stabbench.train as t; f = t.Run.log_step; "
                  "t.Run.log_step = lambda *a: (time.sleep(0.2), f(*a))[1]")


def assert_stopped_then_resumed(cli, run: Path, reference: Path) -> dict:
    """The stopped run left a whole checkpoint and no summary; the same command resumes from
    the checkpoint's step and ends with the uninterrupted run's results. Returns the checkpoint."""
    saved = assert_nothing_corrupt(run)
    assert saved is not None and not (run / "summary.json").exists()
    code, out, err = cli("run", f"hydra.run.dir={run}", *FAULT_RUN)
    assert code == 0, err
    assert f"resuming {run} at stage 0, step {saved['loop']['step']}" in out
    assert_same_results(run, reference)
    return saved

def test_sigterm_checkpoints_exits_143_and_the_rerun_resumes_to_the_same_result(cli, tmp_path, reference):
    run = tmp_path / "run"
    process = start([f"hydra.run.dir={run}", *FAULT_RUN], tmp_path, SLOW_LOG_STEPS)
    wait_for(run / checkpoint.FILENAME, process)  # training is under way
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM == 143, err
    assert "caught SIGTERM; checkpoint written" in err and "Traceback" not in err
    assert_stopped_then_resumed(cli, run, reference)
    assert not (run / checkpoint.FILENAME).exists()  # the summary is what counts now


def test_ctrl_c_checkpoints_exits_130_and_the_same_command_resumes_to_the_same_result(cli, tmp_path, reference):
    """Ctrl-C (SIGINT) is treated as SIGTERM: checkpoint at the next step boundary, one
    line saying how to continue, exit 130; typing the same command again resumes."""
    run = tmp_path / "run"
    process = start([f"hydra.run.dir={run}", *FAULT_RUN], tmp_path, SLOW_LOG_STEPS)
    wait_for(run / checkpoint.FILENAME, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "caught SIGINT; checkpoint written" in lines[0], err
    assert "the same command continues" in lines[0] and str(run) in lines[0]
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in err
    saved = assert_stopped_then_resumed(cli, run, reference)
    assert f"step {saved['loop']['step']})" in lines[0]  # the line names the step it continues from


def test_a_second_ctrl_c_stops_at_once_and_the_last_checkpoint_still_resumes(cli, tmp_path, reference):
    """The second Ctrl-C lands while a step sleeps 10 s: the run stops within seconds,
    prints one line, no traceback, and the periodic checkpoint it had written resumes."""
    run = tmp_path / "run"
    # once a checkpoint exists, a log step leaves a mark and sleeps 10 s
    slow = ("import time, stabbench.train as t; f = t.Run.log_step\n"
            "def log_step(self, *a):\n"
            "    if (self.out_dir / 'checkpoint.pt').exists():\n"
            "        (self.out_dir.parent / 'sleeping').touch(); time.sleep(10)\n"
            "    return f(self, *a)\n"
            "t.Run.log_step = log_step")
    process = start([f"hydra.run.dir={run}", *FAULT_RUN], tmp_path, slow)
    wait_for(tmp_path / "sleeping", process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert time.monotonic() - sent < 5  # did not wait for the 10 s step to end
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "stopped (Ctrl-C)" in lines[0] and "Traceback" not in out + err, err
    assert_stopped_then_resumed(cli, run, reference)


@pytest.mark.slow  # 28 s; a single run's Ctrl-C is in the default run
def test_ctrl_c_in_a_sweep_checkpoints_and_the_same_command_finishes_it(tmp_path):
    """A sweep (-m) stopped by Ctrl-C in its second run: the first is complete, the second
    checkpointed; the same command again skips the first, resumes the second, runs the third."""
    args = ["-m", *[a for a in FAULT_RUN if not a.startswith("checkpoint_every")], "seed=0,1,2"]
    process = start(args, tmp_path, SLOW_LOG_STEPS)
    sweeps = tmp_path / "results" / "sweeps"
    deadline = time.monotonic() + 120
    while not list(sweeps.glob("*/1_*/metrics.csv")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)  # the second run has logged its first epoch (epochs=2: more to come)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in out + err, err
    assert "caught SIGINT; checkpoint written" in err
    [sweep] = list(sweeps.iterdir())
    assert (sweep / "0_baseline_synthetic_d4_w16_s0" / "summary.json").exists()
    second = sweep / "1_baseline_synthetic_d4_w16_s1"
    assert (second / checkpoint.FILENAME).exists() and not (second / "summary.json").exists()
    assert not list(sweep.glob("2_*"))

    done = subprocess.run([sys.executable, "-m", "stabbench.cli", "run", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"continuing {sweep.relative_to(tmp_path)}" in done.stdout and "resuming" in done.stdout
    assert sorted(p.parent.name for p in sweep.glob("*/summary.json")) == [
        "0_baseline_synthetic_d4_w16_s0", "1_baseline_synthetic_d4_w16_s1", "2_baseline_synthetic_d4_w16_s2"]


@pytest.mark.parametrize("command", ["probe", pytest.param("bench", marks=pytest.mark.slow)])
def test_ctrl_c_in_probe_or_bench_is_one_line_exit_130(tmp_path, command):
    """Probe and bench keep no checkpoint: Ctrl-C stops them with one line, no traceback,
    and a directory that holds nothing yet is removed."""
    slow = {"probe": "import time, stabbench.probe as p; f = p.measure; p.measure = lambda *a: (time.sleep(30), f(*a))[1]",
            "bench": "import time, stabbench.bench as b; f = b.take_turns; b.take_turns = lambda *a: (time.sleep(30), f(*a))[1]"}
    process = start(["depth=2", "width=8", "dataset.n_train=256", "dataset.n_test=64", "device=cpu"], tmp_path,
                    slow[command], command=command)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "results").rglob(".hydra")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((tmp_path / "results").rglob(".hydra")), "the job never started"
    time.sleep(2)  # inside the slow part
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"stopped (Ctrl-C); {command} did not finish" in lines[0], err
    assert "Traceback" not in out + err
    assert not (tmp_path / "results").exists()  # the job's directory, and results/ made for it, are gone


def test_sigkill_mid_run_leaves_no_corrupt_file_and_the_rerun_resumes_to_the_same_result(cli, tmp_path, reference):
    run = tmp_path / "run"
    process = start([f"hydra.run.dir={run}", *FAULT_RUN], tmp_path,
                    "import time, stabbench.train as t; f = t.Run.log_step; "
                    "t.Run.log_step = lambda *a: (time.sleep(0.2), f(*a))[1]")
    wait_for(run / checkpoint.FILENAME, process)
    time.sleep(random.uniform(0, 0.5))
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    saved = assert_nothing_corrupt(run)
    assert saved is not None and not (run / "summary.json").exists()

    # checkpoint_every (like skip_done) does not make it another run: it resumes
    code, out, err = cli("run", f"hydra.run.dir={run}", *FAULT_RUN, "checkpoint_every=5")
    assert code == 0, err
    assert f"resuming {run} at stage 0, step {saved['loop']['step']}" in out
    assert_same_results(run, reference)


@pytest.mark.slow
def test_killed_again_and_again_while_writing_every_step(cli, tmp_path):
    """SIGKILL at random moments of a run that writes its CSVs and a checkpoint every step;
    after each kill every file reads back whole; the third rerun finishes with the numbers
    of an uninterrupted run."""
    args = [*FAULT_RUN, "log_every=1", "checkpoint_every=1"]
    assert cli("run", f"hydra.run.dir={tmp_path / 'reference'}", *args)[0] == 0
    run = tmp_path / "run"
    rng = random.Random(0)
    last_version, killed_at = (), []
    for attempt in range(3):
        process = start([f"hydra.run.dir={run}", *args], tmp_path)
        if not wait_for(run / checkpoint.FILENAME, process, newer_than=last_version, may_finish=True):
            break  # it finished before a new checkpoint: nothing left to interrupt
        time.sleep(rng.uniform(0, 0.3))
        process.kill()
        process.communicate()
        if process.returncode == 0:  # finished before the kill: nothing more to interrupt
            break
        saved = assert_nothing_corrupt(run)
        assert saved is not None
        killed_at.append(saved["loop"]["step"])
        last_version = file_version(run / checkpoint.FILENAME)
    assert killed_at and killed_at == sorted(set(killed_at)), killed_at  # each rerun got further
    code, out, err = cli("run", f"hydra.run.dir={run}", *args)
    assert code == 0, err
    assert_same_results(run, tmp_path / "reference")


# -- in-process preemption: every method's state survives -------------------------------------

def preempt_at(monkeypatch, nth_log_step: int, signum: int) -> None:
    """Deliver `signum` to this process at the nth log step, as a scheduler would."""
    original, seen = train.Run.log_step, []

    def log_step(self, *args, **kwargs):
        seen.append(1)
        if len(seen) == nth_log_step:
            os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train.Run, "log_step", log_step)


PREEMPTIONS = {
    # name: (extra overrides, the log step at which the signal comes, signal, stage it lands in)
    "baseline_adam_two_seeds": (["optimizer=adam", "seeds=2"], 5, signal.SIGTERM, 0),
    "sal_second_stage": (["method=sal", "method.warm_start=true"], 30, signal.SIGUSR1, 1),
    "snn_alpha_dropout": (["method=snn", "method.alpha_dropout=0.1", "lr=0.001"], 15, signal.SIGUSR2, 0),
    "one_of_three_seeds_diverged": (["seeds=3", "method.activation=relu", "method.init=he", "lr=0.05"], 8,
                                    signal.SIGTERM, 0),
    # the signal at step 31 (the 32nd log step): the checkpoint is the first step of epoch 1, whose
    # data order must be epoch 1's, not replayed from the stage's start
    "at_an_epoch_boundary": (["log_every=1"], 32, signal.SIGTERM, 0),
}


@pytest.mark.parametrize("name", list(PREEMPTIONS))
def test_preempted_run_resumes_to_the_result_of_an_uninterrupted_one(cli, monkeypatch, tmp_path, name):
    extra, at, signum, stage = PREEMPTIONS[name]
    args = [*FAULT_RUN, *extra]
    if name == "one_of_three_seeds_diverged":
        blow_up_seed_1(monkeypatch)
    handler = signal.getsignal(signum)
    assert cli("run", "hydra.run.dir=reference", *args)[0] == 0
    with monkeypatch.context() as patch:
        preempt_at(patch, at, signum)
        code, out, err = cli("run", *args)  # into results/runs/<time>_...
    assert code == 128 + signum, out + err
    assert f"caught {signal.Signals(signum).name}; checkpoint written" in err
    [run] = [p.parent for p in (tmp_path / "results" / "runs").glob("*/.hydra")]
    saved = assert_nothing_corrupt(run)
    assert saved["stage"] == stage and not (run / "summary.json").exists()
    assert signal.getsignal(signum) == handler  # the run gave the handler back

    # the same command again finds the run directory, resumes, and ends where the reference did
    code, out, err = cli("run", *args)
    assert code == 0, err
    assert f"resuming {run} at stage {stage}, step {saved['loop']['step']}" in out
    assert run_dirs(tmp_path / "results") == [run]
    assert_same_results(run, tmp_path / "reference")
    if name == "one_of_three_seeds_diverged":
        assert [s["diverged"] for s in results_of(run)["summary"]] == [False, True, False]


def test_preemption_hands_the_signal_to_the_schedulers_handler(cli, monkeypatch, tmp_path, reference):
    """Under submitit a handler is already installed for SIGUSR2 (it requeues the job);
    the run checkpoints first, then calls it, and the requeued job resumes."""
    calls = []

    def requeue(signum, frame):
        calls.append(signum)
        sys.exit(0)  # submitit: requeue, then end this process

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        with monkeypatch.context() as patch:
            preempt_at(patch, 4, signal.SIGUSR2)
            code, out, err = cli("run", "hydra.run.dir=run", *FAULT_RUN)
        assert calls == [signal.SIGUSR2] and code == 0
        assert signal.getsignal(signal.SIGUSR2) is requeue  # given back
    finally:
        signal.signal(signal.SIGUSR2, previous)
    saved = assert_nothing_corrupt(tmp_path / "run")
    assert saved is not None and not (tmp_path / "run" / "summary.json").exists()
    code, out, err = cli("run", "hydra.run.dir=run", *FAULT_RUN)
    assert code == 0 and "resuming" in out
    assert_same_results(tmp_path / "run", reference)


def test_preemption_with_a_handler_that_returns_goes_on_training(cli, monkeypatch, tmp_path, reference):
    """submitit's SIGTERM handler only logs: the run checkpoints and trains on to the end."""
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with monkeypatch.context() as patch:
            preempt_at(patch, 4, signal.SIGTERM)
            code, out, err = cli("run", "hydra.run.dir=run", *FAULT_RUN)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 0 and calls == [signal.SIGTERM], err
    assert "checkpoint written" in err
    assert_same_results(tmp_path / "run", reference)


# -- checkpoints are data ---------------------------------------------------------------------

class Payload:
    """Unpickling this runs code: it makes a folder (harmless stand-in for anything worse)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_checkpoint_holding_code_is_refused_and_never_run(cli, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "code_ran"
    run.mkdir()
    torch.save({"config_key": "x", "ensemble": Payload(marker)}, run / checkpoint.FILENAME)
    with pytest.raises(pickle.UnpicklingError):  # torch's own guard, which load relies on
        torch.load(run / checkpoint.FILENAME, weights_only=True)
    with pytest.raises(UserError) as error:
        checkpoint.load(run / checkpoint.FILENAME)
    assert "not a readable stabbench checkpoint" in str(error.value) and "\n" not in str(error.value)
    code, out, err = cli("run", "hydra.run.dir=run", *FAULT_RUN)
    assert code == 2 and err.strip().count("\n") == 0 and "not a readable stabbench checkpoint" in err
    assert "Traceback" not in out + err
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == [checkpoint.FILENAME]


def test_checkpoint_round_trip_is_plain_data(tmp_path):
    state = {"config_key": "k", "step": 3, "rng": torch.get_rng_state(), "rows": {"metrics": 2},
             "nested": [{"a": torch.ones(2), "b": None, "c": "text", "d": 1.5}]}
    checkpoint.save(tmp_path / "c.pt", state)
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded["nested"][0]["c"] == "text" and torch.equal(loaded["rng"], state["rng"])
    assert not list(tmp_path.glob(".*.tmp"))


# -- divergence -------------------------------------------------------------------------------

def test_diverging_run_ends_as_diverged_in_summary_and_report(cli, tmp_path):
    code, out, err = cli("run", "hydra.run.dir=run", "lr=1e4", "method.activation=relu", "method.init=he",
                         "depth=6", "dataset.n_train=512", "dataset.n_test=128", "width=16", "epochs=2",
                         "log_every=1", "checkpoint_every=3")
    assert code == 0 and "Traceback" not in out + err, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["diverged"] is True and summary["diverged_step"] is not None
    assert summary["test_loss"] is None  # NaN is written as null, never as invalid JSON
    assert not (tmp_path / "run" / checkpoint.FILENAME).exists()
    code, out, err = cli("report", str(tmp_path / "run"))
    assert code == 0, err
    runs = pd.read_csv(tmp_path / "run_report" / "runs.csv")
    assert runs["status"].tolist() == ["diverged"] and runs["diverged"].tolist() == [True]
    table = pd.read_csv(tmp_path / "run_report" / "table.csv")
    assert table["diverged"].tolist() == [1]
