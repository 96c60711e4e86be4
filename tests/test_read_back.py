"""Every file the tool reads back, read safely: a report from damaged, hand-edited or hostile
run directories names each bad file in one warning and reports every other run; it never
expands a config's interpolations, never leaves a half-old, half-new report, and a full disk
or an ascii pipe is one line, not a traceback. The fuzz test at the end damages each file a
run leaves behind in each way a disk or an editor does, then runs `run` and `report` on it."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY
from test_data_safety import one_line_error, preempt_at_start

SMALL = TINY + ["depth=3", "device=cpu"]


def two_runs(cli, tmp_path) -> tuple[Path, Path]:
    """Two finished runs of one config (seeds 0 and 1) under tmp_path/sweep."""
    for seed in (0, 1):
        assert cli("run", *SMALL, f"seed={seed}", f"hydra.run.dir=sweep/s{seed}")[0] == 0
    return tmp_path / "sweep" / "s0", tmp_path / "sweep" / "s1"


def report_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def no_traceback(out: str, err: str) -> None:
    assert "Traceback" not in out + err, err[-3000:]


# -- what is read back is never executed or expanded ----------------------------------------------

def test_an_env_interpolation_in_a_runs_config_never_reaches_the_report(cli, tmp_path, monkeypatch):
    """Before: the report resolved `${oc.env:SECRET}` and wrote the value into index.html and
    the CSV tables."""
    monkeypatch.setenv("STABBENCH_TEST_SECRET", "hunter2-token")
    a, b = two_runs(cli, tmp_path)
    for run in (a, b):
        (run / "summary.json").unlink()  # partial runs: the report reads their configs
    config = (b / ".hydra" / "config.yaml").read_text()
    (b / ".hydra" / "config.yaml").write_text(config + "note: ${oc.env:STABBENCH_TEST_SECRET}\n")
    code, out, err = cli("report", "sweep")
    assert code == 0, err
    written = b"".join(report_files(tmp_path / "sweep" / "report").values()) + (out + err).encode()
    assert b"hunter2-token" not in written
    assert "${oc.env:STABBENCH_TEST_SECRET}" in pd.read_csv(tmp_path / "sweep" / "report" / "runs.csv").to_string()


# -- one bad file: a warning naming it, every other run reported ----------------------------------

@pytest.mark.parametrize("content", [b"\x00\xff\xfe garbage", b"{not json", b'{"seeds": 5}', b"null",
                                     b'{"train_loss": "low", "seed": 1}', {"train_loss": "low"},
                                     {"diverged": "no"}, {"method": 7},
                                     # json reads these as ints no table holds (OverflowError, int64 casts)
                                     {"lr": 10 ** 400}, {"depth": 10 ** 28}, {"train_loss": 10 ** 400}])
def test_an_unreadable_summary_is_shown_as_unreadable_with_a_warning(cli, tmp_path, content):
    """Before: wrong types aborted the report after some tables were rewritten, and an
    unreadable summary was shown as partial without a word. A dict is an edit of the real
    summary (one field retyped), the rest replace it."""
    good, bad = two_runs(cli, tmp_path)
    if isinstance(content, dict):
        content = json.dumps({**json.loads((bad / "summary.json").read_text()), **content}).encode()
    (bad / "summary.json").write_bytes(content)
    code, out, err = cli("report", "sweep")
    assert code == 0, err
    no_traceback(out, err)
    warnings = [line for line in err.splitlines() if line.startswith("stabbench: warning:")]
    assert len(warnings) == 1 and str(bad / "summary.json") in warnings[0] and "unreadable" in warnings[0], err
    runs = pd.read_csv(tmp_path / "sweep" / "report" / "runs.csv")
    assert dict(zip(runs["run"], runs["status"])) == {"s0": "complete", "s1": "unreadable"}
    table = pd.read_csv(tmp_path / "sweep" / "report" / "table.csv")
    assert list(table["n"]) == [1] and list(table["unreadable"]) == [1]
    assert "1 unreadable" in (tmp_path / "sweep" / "report" / "index.html").read_text()


@pytest.mark.parametrize("name, damage", [
    ("metrics.csv", "binary"), ("metrics.csv", "text_in_numbers"), ("metrics.csv", "no_loss_column"),
    ("layers.csv", "binary"), ("layers.csv", "text_in_numbers"), ("layers.csv", "no_layer_column"),
])
def test_a_bad_csv_is_named_and_the_other_runs_are_reported(cli, tmp_path, name, damage):
    good, bad = two_runs(cli, tmp_path)
    path = bad / name
    frame = pd.read_csv(path)
    if damage == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x00" * 50)
    elif damage == "text_in_numbers":
        column = "loss" if name == "metrics.csv" else "grad_norm"
        frame[column] = frame[column].astype(object)
        frame.loc[1, column] = "oops"
        frame.to_csv(path, index=False)
    else:
        frame.drop(columns=damage.split("_")[1]).to_csv(path, index=False)
    code, out, err = cli("report", "sweep")
    assert code == 0, err
    no_traceback(out, err)
    warnings = [line for line in err.splitlines() if line.startswith("stabbench: warning:")]
    assert len(warnings) == 1 and str(path) in warnings[0], err
    table = pd.read_csv(tmp_path / "sweep" / "report" / "table.csv")
    assert list(table["n"]) == [2]  # both summaries are whole: both seeds still count
    assert (tmp_path / "sweep" / "report" / "loss_curves.png").is_file()  # drawn from the good run


# -- the report directory: replaced whole, or not at all -----------------------------------------

def test_a_report_replaces_the_earlier_one_whole(cli, tmp_path):
    two_runs(cli, tmp_path)
    assert cli("report", "sweep")[0] == 0
    out_dir = tmp_path / "sweep" / "report"
    (out_dir / "tuning.csv").write_text("lr\n0.1\n")  # an earlier tuned report's table, stale now
    (out_dir / "trainability_map_old.png").write_bytes(b"stale")
    assert cli("report", "sweep")[0] == 0
    assert not (out_dir / "tuning.csv").exists() and not (out_dir / "trainability_map_old.png").exists()
    assert (out_dir / "index.html").is_file()
    assert [p.name for p in (tmp_path / "sweep").iterdir() if p.name.startswith(".")] == []  # no staging left


def test_a_report_refuses_a_directory_holding_other_files(cli, tmp_path):
    two_runs(cli, tmp_path)
    assert cli("report", "sweep", "--out", "rep")[0] == 0
    (tmp_path / "rep" / "notes.txt").write_text("my notes")
    before = report_files(tmp_path / "rep")
    one_line_error(*cli("report", "sweep", "--out", "rep"), "notes.txt")
    assert report_files(tmp_path / "rep") == before


def test_a_report_into_the_current_directory(cli, tmp_path, monkeypatch):
    """`--out .`: the staging folder goes beside the directory, not inside it."""
    two_runs(cli, tmp_path)
    (tmp_path / "rep").mkdir()
    monkeypatch.chdir(tmp_path / "rep")
    code, out, err = cli("report", str(tmp_path / "sweep"), "--out", ".")
    assert code == 0, err
    assert (tmp_path / "rep" / "index.html").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_report_that_cannot_be_swapped_in_keeps_the_earlier_one_and_says_where(cli, tmp_path, monkeypatch):
    two_runs(cli, tmp_path)
    assert cli("report", "sweep")[0] == 0
    before = report_files(tmp_path / "sweep" / "report")

    def refused(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "rename", refused)  # the new report cannot go in, nor the old one back
    line = one_line_error(*cli("report", "sweep"), "earlier report")
    kept = Path(line.rsplit("it is whole at ", 1)[1])
    assert report_files(kept) == before


def test_a_full_disk_during_a_report_is_one_line_and_keeps_the_earlier_report(cli, tmp_path, monkeypatch):
    from stabbench import report

    two_runs(cli, tmp_path)
    assert cli("report", "sweep")[0] == 0
    before = report_files(tmp_path / "sweep" / "report")
    original = report.write_csv

    def full(path, frame):
        if Path(path).name == "table.csv":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, frame)

    monkeypatch.setattr(report, "write_csv", full)
    (tmp_path / "sweep" / "s1" / "summary.json").unlink()  # the new report would differ
    one_line_error(*cli("report", "sweep"), "no space left on device", status=1)
    assert report_files(tmp_path / "sweep" / "report") == before
    assert [p.name for p in (tmp_path / "sweep").iterdir() if p.name.startswith(".")] == []


def test_a_full_disk_at_a_sweeps_report_says_how_to_finish_it(cli, tmp_path, monkeypatch):
    from stabbench import report

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write_report", full)
    code, out, err = cli("run", "-m", *SMALL, "seed=0,1", "hydra.sweep.dir=sweep")
    assert code == 1, err
    no_traceback(out, err)
    line = [line for line in err.splitlines() if line.startswith("stabbench: error:")]
    assert len(line) == 1 and "no space left on device" in line[0] and "stabbench report" in line[0], err
    assert len(list((tmp_path / "sweep").glob("*/summary.json"))) == 2  # every run kept


# -- printing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["ascii", "utf-8"])
def test_a_pipe_in_any_encoding_gets_whole_numbers(tmp_path, encoding):
    """Before: a loss of 5952811 was printed `5.953…` into a pipe, and an ascii output was a
    UnicodeEncodeError traceback."""
    env = {**os.environ, "PYTHONIOENCODING": encoding, "PYTHONUNBUFFERED": "1", "COLUMNS": "80"}
    args = [*SMALL, "lr=1e6", "method.activation=tanh", "hydra.run.dir=r"]
    done = subprocess.run([sys.executable, "-m", "stabbench.cli", "run", *args], cwd=tmp_path, env=env,
                          capture_output=True, timeout=300)
    out, err = done.stdout.decode(encoding), done.stderr.decode(encoding)
    assert done.returncode == 0, err[-2000:]
    no_traceback(out, err)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["exploded"] and summary["train_loss"] > 1e4
    assert f"{summary['train_loss']:.4g}" in out and f"{summary['test_loss']:.4g}" in out, out
    assert "…" not in out and f"step {summary['exploded_step']}" in out
    # a folder name the output cannot encode: `?` in the "wrote" line, not a UnicodeEncodeError
    done = subprocess.run([sys.executable, "-m", "stabbench.cli", "report", "r", "--out", "r\u00e9sum\u00e9"],
                          cwd=tmp_path, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0 and b"Traceback" not in done.stdout + done.stderr, done.stderr[-2000:]
    assert (tmp_path / "r\u00e9sum\u00e9" / "index.html").is_file()


# -- fuzz: every file a run leaves, damaged every way --------------------------------------------

DAMAGES = ["empty", "truncated", "garbage", "wrong_types", "wrong_shape"]


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif path.suffix == ".json":
        path.write_text(json.dumps({"seeds": [{"seed": "zero", "train_loss": [1], "diverged": 3}]})
                        if how == "wrong_types" else json.dumps([[{"seeds": None}]]))
    elif path.suffix == ".csv":
        frame = pd.read_csv(path)
        if how == "wrong_types":
            path.write_text(frame.astype(str).replace({r"^\d": "x"}, regex=True).to_csv(index=False))
        else:
            path.write_text("a,b\n1,2\n")
    else:  # the checkpoint: a torch file of another structure, or no torch file at all
        import torch

        torch.save({"step": "x", "ensemble": [1, 2]} if how == "wrong_types" else [1, 2, 3], path)


FUZZ_ARGS = [*SMALL, "checkpoint_every=2"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Trained once for the whole fuzz: `complete` (a finished run) and `partial` (stopped at
    its first checkpoint, which it keeps); each case damages its own copy."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from hydra.core.global_hydra import GlobalHydra

    from stabbench.cli import main

    def call(*args):
        GlobalHydra.instance().clear()
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            try:
                code = main(list(args))
            except SystemExit as stop:
                code = stop.code
        GlobalHydra.instance().clear()
        return code, "", ""

    root = tmp_path_factory.mktemp("pristine")
    assert call("run", *FUZZ_ARGS, f"hydra.run.dir={root / 'complete'}")[0] == 0
    preempt_at_start(call, *FUZZ_ARGS, f"hydra.run.dir={root / 'partial'}")
    return root


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["summary.json", "metrics.csv", "layers.csv", "checkpoint.pt"])
def test_damaged_run_directories_give_no_traceback_and_good_runs_are_still_reported(cli, tmp_path, pristine, name,
                                                                                    how):
    shutil.copytree(pristine / "complete", tmp_path / "sweep" / "good")
    shutil.copytree(pristine / ("partial" if name == "checkpoint.pt" else "complete"), tmp_path / "sweep" / "bad")
    damage(tmp_path / "sweep" / "bad" / name, how)

    code, out, err = cli("run", *FUZZ_ARGS, "hydra.run.dir=sweep/bad")
    no_traceback(out, err)
    assert code in (0, 1, 2), (code, err[-2000:])
    if code:
        one_line_error(code, out, err, status=code)

    code, out, err = cli("report", "sweep")
    no_traceback(out, err)
    assert code == 0, err[-2000:]
    runs = pd.read_csv(tmp_path / "sweep" / "report" / "runs.csv")
    status = dict(zip(runs["run"], runs["status"]))
    assert status["good"] == "complete" and "bad" in status, status
