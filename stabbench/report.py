"""`stabbench report PATH... [--out DIR] [--target-loss X]`: tables and figures from any
runs and sweeps found under the given directories.

A run is a directory holding `summary.json` (finished: complete, diverged or exploded) or a
`.hydra/` folder without one (partial: still running, crashed or killed). A summary or CSV
that cannot be read, or holds what a run never writes (text in a numeric column, a missing
column), is named in one warning line; its run is shown as `unreadable` (a bad summary) or
drawn without that file's curves, and every other run is reported as usual. Nothing read back
is executed or expanded: configs are read unresolved, so `${oc.env:...}` stays text. Each run gives one row per
seed; a learning-rate grid (`lrs=[...]`) is read as one run per lr, so its members and those
of separate `-m lr=...` runs look alike. Where a cell was trained at several learning rates
the report is tuned (tuning.py): each cell shows its lr chosen on the validation split. Config values that differ between runs name the groups: the method label is the
method plus those of its options (and of the training options) that vary, e.g.
`bsnn (activation=relu)`. The table aggregates finished seeds per (method label, dataset,
depth, width); partial seeds are counted, and drawn in the loss curves, but not averaged.

Everything is read with pandas in whole frames; only the figures read `layers.csv`, and only
for the cells they draw, so a sweep of a thousand runs reports in seconds.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stabbench import phase_diagram, progress
from stabbench.errors import UNWRITABLE, UserError
from stabbench.outputs import (FINISHED, LAYER_COLUMNS, METRICS_COLUMNS, atomic_write_bytes, atomic_write_text,
                               write_csv)

SUMMARY_FIELDS = ["schema_version", "method", "dataset", "depth", "width", "seed", "lr", "steps", "epochs",
                  "train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "diverged", "diverged_step", "exploded",
                  "exploded_step", "grad_norm_ratio_init",
                  "grad_norm_ratio_final", "total_steps", "total_flops", "wall_time_s", "device"]
# What each summary field must be, so that a hand-edited or damaged summary is caught here,
# named, and not averaged as text.
TEXT_FIELDS = {"method", "dataset", "device", "status"}
FLAG_FIELDS = {"diverged", "exploded"}
NUMBER_FIELDS = set(SUMMARY_FIELDS) - TEXT_FIELDS - FLAG_FIELDS
# The columns without which a CSV gives no curve; every other known column must be numeric.
CSV_REQUIRED = {"metrics.csv": ("step", "seed", "split", "loss"), "layers.csv": ("step", "seed", "layer")}
CSV_TEXT = {"split", "kind"}
GROUP_KEYS = ["method", "dataset", "depth", "width"]
AGGREGATED = ["train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "grad_norm_ratio_init",
              "grad_norm_ratio_final"]
# Config keys that never name a group: run bookkeeping, speed switches, where things live.
NOT_AN_OPTION = {"seed", "seeds", "depth", "width", "device", "log_every", "checkpoint_every", "skip_done",
                 "dataset.root", "dataset.download", "lrs"}  # lrs: each member's own lr is the `lr` column
NOT_AN_OPTION_PREFIXES = ("trainer.", "probe.", "hydra.")
OTHER_APPS = {"probe.json", "bench.json"}  # outputs of `stabbench probe` / `bench` dirs: no training runs
MAX_CELLS = 6  # (dataset, depth, width) cells drawn in the per-layer and loss figures: the deepest
MAX_MEMBERS = 16  # seeds per method and cell read for a band

REPORT_FILES = {"runs.csv", "table.csv", "table.md", "tuning.csv", "index.html", phase_diagram.TABLE}
FIGURES = [  # file, caption (index.html)
    ("grad_norm_per_layer.png", "Gradient norm per layer at initialisation and at the end of training "
                                "(line: geometric mean over seeds, band: min to max)"),
    ("loss_curves.png", "Training (solid) and test (dashed) loss against step (line: mean over seeds, band: min to max)"),
    ("trainability_map.png", "Final test accuracy (regression: final train loss) over depth and method, one "
                             "panel per width; hatched cells: seeds diverged; tuned: the chosen lr in each cell "
                             "(an arrow: at the edge of the grid)"),
    ("lr_sensitivity.png", "Final validation score against learning rate, one line per method, one panel per "
                           "depth (mean over seeds, a diverged seed scoring as the worst possible; ring: chosen)"),
    ("accuracy_vs_depth.png", "Final test accuracy (regression: test loss) against depth (error bars: std over seeds)"),
    ("beta_per_layer.png", "Self-stabilizer beta per layer over training (mean over seeds)"),
    ("activation_std_at_init.png", "Forward activation std per layer at initialisation"),
    (phase_diagram.FIGURE, phase_diagram.CAPTION),
]


# -- finding and reading runs --------------------------------------------------------------

def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Every run directory under `paths`, in a stable order. A run's own subfolders are not searched."""
    found = []
    for top in paths:
        for here, dirs, files in os.walk(top):
            started = os.path.isfile(os.path.join(here, ".hydra", "config.yaml")) and not OTHER_APPS & set(files)
            if "summary.json" in files or started:
                found.append(Path(here))
                dirs[:] = []
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
    return sorted(dict.fromkeys(p.resolve() for p in found))  # a run given twice (or via a link) counts once


def _read_summary(run_dir: Path) -> tuple[list[dict] | None, str | None]:
    """(the summary's entries, None), or (None, why it is unreadable)."""
    from stabbench.checkpoint import UnreadableSummary, load_summaries

    try:
        entries = load_summaries(run_dir / "summary.json")
    except UnreadableSummary as reason:
        return None, str(reason)
    for entry in entries:
        for key, value in entry.items():
            wrong = (key in NUMBER_FIELDS and not (value is None or _is_number(value))
                     or key in FLAG_FIELDS and not (value is None or isinstance(value, bool))
                     or key in TEXT_FIELDS and not (value is None or isinstance(value, str)))
            if wrong:
                return None, f"its {key} is {str(value)[:40]!r}, not a {_kind(key)}"
    return entries, None


INT_LIMIT = 2 ** 63  # what a column of int64 holds; a summary's integer beyond it is damage


def _is_number(value) -> bool:
    """A JSON number the tables can hold: a float, or an int within int64 (json reads 10**400 as an int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, float) or -INT_LIMIT < value < INT_LIMIT


def _kind(key: str) -> str:
    return "number" if key in NUMBER_FIELDS else "true/false" if key in FLAG_FIELDS else "text"


def _read_hydra_config(run_dir: Path) -> dict:
    """The run's config as Hydra recorded it, unresolved: an interpolation is kept as its text
    (`${oc.env:SECRET}` must never put the variable's value into a report)."""
    from stabbench.checkpoint import saved_task_config

    return saved_task_config(run_dir) or {}


def _read_csv(path: Path, columns=None, problems: list | None = None) -> pd.DataFrame | None:
    """A run's metrics.csv or layers.csv (only `columns`, if given), its known numeric columns
    numeric; None if absent or empty, or (with a line in `problems`) if it is not such a file."""
    def unreadable(reason: str) -> None:
        if problems is not None:
            problems.append(f"{path}: {reason}; its curves are left out")

    try:
        frame = pd.read_csv(path, usecols=(lambda c: c in columns) if columns else None, low_memory=False)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return None
    except (OSError, ValueError, pd.errors.ParserError) as error:  # UnicodeDecodeError: binary bytes
        unreadable(f"unreadable ({type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''})")
        return None
    missing = [c for c in CSV_REQUIRED.get(path.name, ()) if c not in frame and (columns is None or c in columns)]
    if missing:
        unreadable(f"no {', '.join(missing)} column")
        return None
    for column in frame.columns:
        if column in CSV_TEXT or column not in set(METRICS_COLUMNS) | set(LAYER_COLUMNS) | {"beta"}:
            continue
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = numbers.isna() & frame[column].notna()
        if bad.any():
            unreadable(f"column {column} holds {str(frame[column][bad].iloc[0])[:20]!r}, not a number")
            return None
        frame[column] = numbers
    return frame


def _flatten_config(configs: list[dict]) -> pd.DataFrame:
    flat = pd.json_normalize(configs, sep=".")
    for column in flat.columns[flat.dtypes == object]:
        flat[column] = flat[column].map(lambda v: str(v) if isinstance(v, (list, dict)) else v)
    return flat


def _format_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"  # a config's null (a key a run lacks reads the same: neither set it)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _label(names: pd.Series, options: pd.DataFrame, short: callable) -> pd.Series:
    """`name (key=value, ...)` with, per name, only the option columns whose values differ among its runs."""
    label = names.astype(str).copy()
    for name, rows in options.groupby(names, sort=False):
        varying = [c for c in rows.columns if rows[c].nunique(dropna=False) > 1]  # null is a value too
        if not varying:
            continue
        parts = [short(c) + "=" + rows[c].map(_format_value) for c in varying]
        label.loc[rows.index] = name + " (" + pd.concat(parts, axis=1).agg(", ".join, axis=1) + ")"
    return label


def _strip(prefix: str):
    return lambda key: key[len(prefix):] if key.startswith(prefix) else key


@dataclass
class RunSet:
    """Every run found: `runs` has one row per (run, seed); `dirs[run_id]` is its directory. A
    learning-rate grid's directory is several runs, one per lr: `member_lr[run_id]` is the lr
    whose rows of metrics.csv and layers.csv are that run's."""
    root: Path
    dirs: list[Path]
    runs: pd.DataFrame
    config: pd.DataFrame  # flattened config per row of `runs`
    varying: list[str] = field(default_factory=list)  # config keys that differ between runs
    member_lr: dict = field(default_factory=dict)
    tuned: bool = False  # some cell was trained at several lrs and has validation scores: lr is not a label
    problems: list = field(default_factory=list)  # one line per file that could not be read
    _metrics: dict = field(default_factory=dict, repr=False)

    def _own_rows(self, run_id, frame: pd.DataFrame | None) -> pd.DataFrame | None:
        lr = self.member_lr.get(run_id)
        if frame is None or lr is None or "lr" not in frame:
            return frame
        return frame[np.isclose(frame["lr"].astype(float), lr, rtol=1e-9, atol=0)]

    # Per-run files are read on demand and kept: the table needs none of them.
    def metrics(self, run_ids) -> pd.DataFrame:
        """metrics.csv rows of the given runs, with `run_id` and `gstep` (step counted across stages)."""
        wanted = [r for r in dict.fromkeys(run_ids) if r not in self._metrics]
        for run_id in wanted:
            frame = self._own_rows(run_id, _read_csv(self.dirs[run_id] / "metrics.csv", problems=self.problems))
            self._metrics[run_id] = None if frame is None or frame.empty else frame.assign(run_id=run_id)
        frames = [self._metrics[r] for r in dict.fromkeys(run_ids) if self._metrics.get(r) is not None]
        if not frames:
            return pd.DataFrame(columns=["run_id", "step", "stage", "seed", "split", "loss", "acc", "gstep"])
        return with_global_step(pd.concat(frames, ignore_index=True))

    def layers(self, run_ids, columns=("grad_norm", "act_std", "beta")) -> pd.DataFrame:
        """layers.csv rows of the last stage of the given runs, with `run_id`."""
        wanted = {"step", "stage", "seed", "layer", *columns}
        frames = []
        for run_id in dict.fromkeys(run_ids):
            frame = self._own_rows(run_id, _read_csv(self.dirs[run_id] / "layers.csv", wanted | {"lr"},
                                                     self.problems))
            if frame is not None and not frame.empty:
                frames.append(frame.drop(columns="lr", errors="ignore").assign(run_id=run_id))
        if not frames:
            return pd.DataFrame(columns=["run_id", *sorted(wanted)])
        layers = pd.concat(frames, ignore_index=True)
        if "stage" in layers:
            layers = layers[layers["stage"] == layers.groupby("run_id")["stage"].transform("max")]
        return layers.reindex(columns=["run_id", *sorted(wanted)])


def with_global_step(metrics: pd.DataFrame) -> pd.DataFrame:
    """Steps restart at 0 in each stage of a staged method; `gstep` counts on across stages."""
    metrics = metrics.copy()
    if "stage" not in metrics:
        metrics["stage"] = 0
    metrics["stage"] = metrics["stage"].fillna(0)
    stage_length = metrics.groupby(["run_id", "stage"])["step"].max().rename("length")
    offset = (stage_length.groupby(level="run_id").cumsum() - stage_length).rename("offset")
    metrics = metrics.join(offset, on=["run_id", "stage"])
    metrics["gstep"] = metrics["step"] + metrics["offset"]
    return metrics.drop(columns="offset")


def load_runs(paths: list[Path | str]) -> RunSet:
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.exists():
            raise UserError(f"{path} does not exist; give a run or sweep directory")
    paths = [p.parent if p.is_file() else p for p in paths]
    dirs = find_run_dirs(paths)
    if not dirs:
        raise UserError(f"no runs found under {', '.join(map(str, paths))} "
                        "(a run is a directory with summary.json or .hydra/)")
    return read_runs(dirs, Path(os.path.commonpath([p.resolve() for p in paths])))


def _member_lr(entry: dict, config: dict):
    """A seed's learning rate: its summary's `lr`, else (older runs) its config's."""
    lr = entry.get("lr", config.get("lr"))
    return float(lr) if _is_number(lr) else None


def read_runs(dirs: list[Path], root: Path) -> RunSet:
    """The runs in `dirs` (each a run directory), named relative to `root`; a grid's directory
    gives one run per lr (run ids index `run_dirs`, which repeats such a directory)."""
    records, configs, run_dirs, member_lr, problems = [], [], [], {}, []
    for run_dir in dirs:
        entries, status = None, "partial"
        if (run_dir / "summary.json").exists():
            entries, reason = _read_summary(run_dir)
            if entries is None:
                problems.append(f"{run_dir / 'summary.json'} is {reason}; the run is shown as unreadable")
                status = "unreadable"
        if entries is None:
            entries = _entries_from_config(_read_hydra_config(run_dir), status)
        by_lr: dict = {}
        for entry in entries:
            by_lr.setdefault(_member_lr(entry, entry.get("config") or {}), []).append(entry)
        for lr, members in by_lr.items():
            run_id = len(run_dirs)
            run_dirs.append(run_dir)
            if len(by_lr) > 1:
                member_lr[run_id] = lr
            for entry in members:
                config = dict(entry.get("config") or {})
                if lr is not None:
                    config["lr"] = lr  # a grid member's own lr, as a separate run's config would say
                record = {k: v for k, v in entry.items() if k not in ("config", "stages")}
                status = entry.get("status") or ("diverged" if entry.get("diverged") else
                                                 "exploded" if entry.get("exploded") else "complete")
                record.update(run_id=run_id, status=status, lr=lr)
                records.append(record)
                configs.append(config)
    dirs = run_dirs

    runs = pd.DataFrame.from_records(records)
    runs = runs.reindex(columns=list(dict.fromkeys(["run_id", "status", *SUMMARY_FIELDS, *runs.columns])))
    config = _flatten_config(configs)
    for key in ("method.name", "dataset.name", "depth", "width"):
        if key not in config:
            config[key] = np.nan
    # Partial runs and older summaries: what the summary lacks, the config knows.
    runs["method"] = runs["method"].astype(object).fillna(config["method.name"]).fillna("?")
    runs["dataset"] = runs["dataset"].astype(object).fillna(config["dataset.name"]).fillna("?")
    runs["dataset.name"] = runs["dataset"].to_numpy()  # the dataset's own name, before labels (tuning reads it)
    runs["depth"] = runs["depth"].fillna(config["depth"])
    runs["width"] = runs["width"].fillna(config["width"])
    for column in ("depth", "width", "seed"):  # ints, even where a partial run's NaN made them floats
        numbers = pd.to_numeric(runs[column], errors="coerce")
        if (numbers.dropna() % 1 == 0).all():
            runs[column] = numbers.astype("Int64")
    runs["diverged"] = runs["diverged"].astype("boolean").fillna(False).astype(bool)
    runs["exploded"] = runs["exploded"].astype("boolean").fillna(False).astype(bool)  # older summaries: none

    run_set = RunSet(root=root, dirs=dirs, runs=runs, config=config, member_lr=member_lr, problems=problems)
    _fill_partial(run_set)
    _add_labels(run_set)
    runs["run"] = [os.path.relpath(dirs[i].resolve(), root) for i in runs["run_id"]]
    return run_set


def _entries_from_config(config: dict, status: str) -> list[dict]:
    """A run without a (readable) summary: one entry per member its config asks for."""
    def integer(value, default: int) -> int:
        return int(value) if _is_number(value) and math.isfinite(value) else default

    first = integer(config.get("seed"), 0)
    lrs = config.get("lrs")
    grid = [lr if _is_number(lr) else None for lr in lrs] if isinstance(lrs, list) and lrs else [config.get("lr")]
    seeds = min(max(integer(config.get("seeds"), 1), 1), 10_000)
    return [{"seed": seed, "lr": lr, "status": status, "config": config}
            for lr in grid for seed in range(first, first + seeds)]


def _fill_partial(run_set: RunSet) -> None:
    """A partial run's figures so far: its last logged train and test rows per seed."""
    runs = run_set.runs
    partial = runs["status"] == "partial"
    if not partial.any():
        return
    metrics = run_set.metrics(runs.loc[partial, "run_id"])
    if metrics.empty:
        return
    metrics = metrics.sort_values(["run_id", "seed", "gstep"])
    key = ["run_id", "seed"]
    last_train = metrics[metrics["split"] == "train"].groupby(key).last()
    last_test = metrics[metrics["split"] == "test"].groupby(key).last()
    seen = metrics.groupby(key).agg(steps=("step", "max"), epochs=("epoch", "max"), total_steps=("gstep", "max"))
    finite = metrics[metrics["split"] == "train"].assign(bad=lambda m: ~np.isfinite(m["loss"].astype(float)))
    bad_step = finite[finite["bad"]].groupby(key)["step"].min()
    index = pd.MultiIndex.from_frame(runs.loc[partial, key])
    runs.loc[partial, "train_loss"] = last_train["loss"].reindex(index).to_numpy()
    runs.loc[partial, "test_loss"] = last_test["loss"].reindex(index).to_numpy()
    if "acc" in last_test:
        runs.loc[partial, "test_acc"] = last_test["acc"].reindex(index).to_numpy()
    for column in ("steps", "epochs", "total_steps"):
        runs.loc[partial, column] = seen[column].reindex(index).to_numpy()
    diverged_step = bad_step.reindex(index).to_numpy()
    runs.loc[partial, "diverged_step"] = diverged_step
    runs.loc[partial, "diverged"] = ~np.isnan(diverged_step.astype(float))


def _add_labels(run_set: RunSet) -> None:
    runs, config = run_set.runs, run_set.config
    options = [c for c in config.columns
               if c not in NOT_AN_OPTION and not c.startswith(NOT_AN_OPTION_PREFIXES)
               and c not in ("method.name", "dataset.name")]
    run_set.varying = [c for c in config.columns if config[c].nunique(dropna=False) > 1]
    method_options = [c for c in options if c.startswith("method.")]
    training_options = [c for c in options if not c.startswith(("method.", "dataset."))]
    dataset_options = [c for c in options if c.startswith("dataset.")]
    # Training options (lr, optimizer...) that vary anywhere split every method's runs.
    varying_training = [c for c in training_options if config[c].nunique(dropna=False) > 1]

    def short(key: str) -> str:
        return key[len("method."):] if key.startswith("method.") else key

    names = runs["method"].copy()
    runs["dataset"] = _label(runs["dataset"], config[dataset_options], _strip("dataset."))
    # lr is the tuning dimension where a cell was trained at several lrs (tuning.py), not a label;
    # without validation scores to choose by, each lr stays a method of its own, as before.
    without_lr = [c for c in varying_training if c != "lr"]
    runs["method"] = _label(names, config[method_options + without_lr], short)
    from stabbench import tuning

    run_set.tuned = tuning.tuned_cells(runs)
    if run_set.tuned:
        try:
            tuning.select(runs)
        except tuning.NoValidation as error:
            print(f"stabbench: note: learning rates not tuned: {error}; the tuning protocol selects on a "
                  f"validation split (dataset.validation > 0). Each lr is reported as a method of its own.",
                  file=sys.stderr)
            run_set.tuned = False
    if not run_set.tuned:
        runs["method"] = _label(names, config[method_options + varying_training], short)


def steps_to_target(run_set: RunSet, target: float) -> pd.Series:
    """First step (counted across stages) at which a seed's logged train loss is <= target; NaN if never."""
    runs = run_set.runs
    metrics = run_set.metrics(runs["run_id"])
    reached = metrics[(metrics["split"] == "train") & (metrics["loss"] <= target)]
    first = reached.groupby(["run_id", "seed"])["gstep"].min()
    return pd.Series(first.reindex(pd.MultiIndex.from_frame(runs[["run_id", "seed"]])).to_numpy(), index=runs.index)


# -- tables -----------------------------------------------------------------------------------

def runs_table(run_set: RunSet, target_loss: float | None = None) -> pd.DataFrame:
    runs = run_set.runs.copy()
    if target_loss is not None:
        runs["steps_to_target"] = steps_to_target(run_set, target_loss)
    extra = [c for c in run_set.varying if c not in runs.columns]
    for column in dict.fromkeys(["method.name", "dataset.name", *extra]):
        runs[column] = run_set.config[column].to_numpy()
    first = ["run", "status", "method", "dataset", "depth", "width", "seed"]
    return runs[first + [c for c in runs.columns if c not in first and c != "run_id"]]


def without_diverged(runs: pd.DataFrame) -> pd.DataFrame:
    """A copy with a diverged or exploded seed's figures (AGGREGATED, steps_to_target) NaN, so
    that no mean, table or figure counts them, whatever an older summary.json holds for them."""
    runs = runs.copy()
    values = [c for c in AGGREGATED + ["steps_to_target"] if c in runs]
    runs[values] = runs[values].apply(pd.to_numeric, errors="coerce")  # all-null columns read as objects
    failed = runs["diverged"].astype(bool) | (runs["exploded"].astype(bool) if "exploded" in runs else False)
    runs.loc[failed, values] = np.nan
    return runs


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (method label, dataset, depth, width): seeds of finished runs averaged
    (std with ddof=1, NaN for a single seed); diverged seeds counted (`diverged`) and left
    out of every mean; partial seeds counted only. `n` counts finished seeds, diverged included."""
    runs = without_diverged(runs)
    runs["finished"] = runs["status"].isin(FINISHED)
    runs["partial"] = runs["status"] == "partial"
    runs["unreadable"] = runs["status"] == "unreadable"
    finished = runs[runs["finished"]]
    groups = runs.groupby(GROUP_KEYS, dropna=False, sort=True)
    if "exploded" not in runs:
        runs["exploded"] = False
    table = groups.agg(n=("finished", "sum"), diverged=("diverged", "sum"), exploded=("exploded", "sum"),
                       partial=("partial", "sum"), unreadable=("unreadable", "sum"))
    values = [c for c in AGGREGATED if c in runs]
    stats = finished.groupby(GROUP_KEYS, dropna=False)[values].agg(["mean", "std"])
    stats.columns = [f"{c}_{s}" for c, s in stats.columns]
    table = table.join(stats)
    if "steps_to_target" in runs:
        target = finished.groupby(GROUP_KEYS, dropna=False)["steps_to_target"].agg(
            steps_to_target_mean="mean", steps_to_target_std="std", reached_target="count")
        table = table.join(target)
    table = table.reset_index()
    counts = ["n", "diverged", "exploded", "partial", "unreadable"]
    table[counts] = table[counts].astype(int)
    return table


def with_selection(table: pd.DataFrame, selection) -> pd.DataFrame:
    """The tuned table: each cell's chosen lr, whether it sits at an edge of its grid, the grid's size."""
    from stabbench.tuning import CELL

    cells = selection.cells.assign(lrs_tried=selection.cells["grid"].map(len)).rename(columns={"edge": "lr_edge"})
    table = table.merge(cells[CELL + ["lr", "lr_edge", "lrs_tried"]], on=CELL, how="left")
    table["lr_edge"] = table["lr_edge"].fillna("")
    first = CELL + ["lr", "lr_edge", "lrs_tried"]
    return table[first + [c for c in table.columns if c not in first]]


def _fmt(value, digits: int = 4) -> str:
    if value is None or pd.isna(value) or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}g}"


def readable_table(table: pd.DataFrame) -> pd.DataFrame:
    """table.csv for people: `mean ± std` strings, one column per figure."""
    out = table[GROUP_KEYS].copy()
    out["depth"] = out["depth"].map(_fmt)
    out["width"] = out["width"].map(_fmt)
    if "lr" in table:  # tuned: the chosen lr, flagged at an edge of its grid
        arrows = {"low": " ↓ (grid's lowest)", "high": " ↑ (grid's highest)"}
        out["lr"] = table["lr"].map(lambda v: f"{v:g}") + table["lr_edge"].map(lambda e: arrows.get(e, ""))
        out["lrs tried"] = table["lrs_tried"].astype(str)
    out["n"] = table["n"].astype(str)
    out["diverged"] = table["diverged"].astype(str)
    if table["exploded"].any():
        out["exploded"] = table["exploded"].astype(str)
    for count in ("partial", "unreadable"):
        if table[count].any():
            out[count] = table[count].astype(str)
    names = {"train_loss": "train loss", "val_acc": "val acc", "test_loss": "test loss", "test_acc": "test acc",
             "grad_norm_ratio_init": "grad ratio init", "grad_norm_ratio_final": "grad ratio final",
             "steps_to_target": "steps to target"}
    for key, name in names.items():
        if f"{key}_mean" not in table or (key == "val_acc" and table[f"{key}_mean"].isna().all()):
            continue
        mean, std = table[f"{key}_mean"].map(_fmt), table[f"{key}_std"].map(lambda v: _fmt(v, 2))
        out[name] = np.where(std == "-", mean, mean + " ± " + std)
    if "reached_target" in table:
        out["steps to target"] += " (" + table["reached_target"].astype(str) + "/" + table["n"].astype(str) + ")"
    return out


def markdown(frame: pd.DataFrame) -> str:
    escape = lambda v: str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(map(escape, frame.columns)) + " |",
             "|" + "|".join("---" if c in ("method", "dataset") else "---:" for c in frame.columns) + "|"]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def print_table(table: pd.DataFrame, title: str) -> None:
    """The table in the terminal: compact (3 significant digits, std under the mean)."""
    from rich.table import Table

    figures = {"train_loss": "train loss", "val_acc": "val acc", "test_loss": "test loss", "test_acc": "test acc",
               "grad_norm_ratio_init": "grad ratio\ninit", "grad_norm_ratio_final": "grad ratio\nend",
               "steps_to_target": "steps to\ntarget"}
    figures = {k: v for k, v in figures.items() if f"{k}_mean" in table and table[f"{k}_mean"].notna().any()}
    rich_table = Table(title=title, title_justify="left")
    keys = ["method"] + (["dataset"] if table["dataset"].nunique() > 1 else []) + ["depth", "width"]
    keys += ["lr"] if "lr" in table else []
    counts = ["n", "diverged"] + [c for c in ("exploded", "partial", "unreadable") if table[c].any()]
    for column in keys + counts + list(figures.values()):
        text = column in ("method", "dataset")
        rich_table.add_column(column, justify="left" if text else "right", overflow="fold",
                              min_width=min(40, int(table[column].astype(str).str.len().max())) if text else None)
    for _, row in table.iterrows():
        cells = [str(row[k]) if k in ("method", "dataset") else _fmt(row[k]) for k in keys]
        if "lr" in table:
            cells[-1] += {"low": " ↓", "high": " ↑"}.get(row["lr_edge"], "")
        cells += [str(int(row[k])) for k in counts]
        for key in figures:
            mean, std = _fmt(row[f"{key}_mean"], 3), _fmt(row[f"{key}_std"], 2)
            cells.append(mean if std == "-" else f"{mean}\n[dim]{progress.plus_minus()}{std}[/dim]")
        rich_table.add_row(*cells)
    progress.print_rich_table(rich_table)


# -- figures --------------------------------------------------------------------------------

def _cells(runs: pd.DataFrame, limit: int = MAX_CELLS) -> pd.DataFrame:
    """The (dataset, depth, width) cells the per-cell figures draw: the deepest, then the widest."""
    cells = runs[["dataset", "depth", "width"]].drop_duplicates()
    cells = cells.sort_values(["depth", "width", "dataset"], ascending=[False, False, True]).head(limit)
    cells = cells.sort_values(["dataset", "depth", "width"]).reset_index(drop=True)
    several_datasets = runs["dataset"].nunique() > 1
    cells["cell"] = [(f"{d} · " if several_datasets else "") + f"depth {_fmt(h)} · width {_fmt(w)}"
                     for d, h, w in cells.itertuples(index=False)]
    return cells


def _members(runs: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Rows of `runs` in the drawn cells, at most MAX_MEMBERS seeds per method and cell."""
    members = runs.merge(cells, on=["dataset", "depth", "width"])
    return members.groupby(["method", "cell"], sort=False).head(MAX_MEMBERS)


def layer_snapshots(layers: pd.DataFrame) -> pd.DataFrame:
    """Per seed: the rows at its first logged step (`when`=init) and at its last step whose
    gradients are all finite (`when`=end; a diverged seed's last healthy step)."""
    key = ["run_id", "seed"]
    layers = layers.dropna(subset=["step", "layer"])
    healthy = np.isfinite(layers["grad_norm"].astype(float))
    healthy_step = healthy.groupby([layers[k] for k in key] + [layers["step"]]).transform("all")
    first = layers.groupby(key)["step"].transform("min")
    last = layers["step"].where(healthy_step).groupby([layers[k] for k in key]).transform("max")
    init = layers[layers["step"] == first].assign(when="init", cut=False)
    # cut: this seed's log goes on past its last healthy step (it diverged there)
    cut = last < layers.groupby(key)["step"].transform("max")
    end = layers[layers["step"] == last].assign(when="end", cut=cut[layers["step"] == last])
    return pd.concat([init, end], ignore_index=True)


def method_colors(labels) -> dict:
    from stabbench.plots import palette

    return palette(sorted(dict.fromkeys(labels)))


def write_figures(run_set: RunSet, out_dir: Path, runs: pd.DataFrame | None = None, selection=None) -> list[str]:
    """The report's figures from `runs` (default: all; tuned: the chosen lr's seeds), and with a
    tuning `selection` the learning-rate sensitivity figure."""
    from stabbench import plots

    runs = run_set.runs if runs is None else runs
    runs = runs.assign(diverged=runs["diverged"] | runs["exploded"])  # the figures mark an exploded seed as diverged
    colors = method_colors(run_set.runs["method"])
    cells = _cells(runs)
    members = _members(runs, cells)
    order = [c for c in cells["cell"]]
    written = []

    def keep(name, made):
        if made:
            written.append(name)

    layers = run_set.layers(members["run_id"])
    layers = layers.merge(members[["run_id", "seed", "method", "cell"]], on=["run_id", "seed"])
    snapshots = layer_snapshots(layers) if not layers.empty else layers.assign(when=[])
    keep("grad_norm_per_layer.png", plots.grad_norm_per_layer(snapshots, colors, order,
                                                              out_dir / "grad_norm_per_layer.png"))
    metrics = run_set.metrics(members["run_id"])
    metrics = metrics.merge(members[["run_id", "seed", "method", "cell"]], on=["run_id", "seed"])
    keep("loss_curves.png", plots.loss_curves(metrics, colors, order, out_dir / "loss_curves.png"))

    finished = without_diverged(runs[runs["status"].isin(FINISHED)])
    keep("trainability_map.png", plots.trainability_map(
        finished, out_dir / "trainability_map.png", None if selection is None else selection.cells))
    if selection is not None:
        keep("lr_sensitivity.png", plots.lr_sensitivity(selection.per_lr, selection.cells, colors,
                                                        out_dir / "lr_sensitivity.png"))
    keep("accuracy_vs_depth.png", plots.accuracy_vs_depth(finished, colors, out_dir / "accuracy_vs_depth.png"))
    keep("beta_per_layer.png", plots.beta_per_layer(layers, colors, order, out_dir / "beta_per_layer.png"))
    init = snapshots[snapshots["when"] == "init"] if "when" in snapshots else snapshots
    keep("activation_std_at_init.png", plots.activation_std_at_init(init, colors, order,
                                                                    out_dir / "activation_std_at_init.png"))
    written += phase_diagram.write(run_set, out_dir)  # only when the runs vary method.weight_var and depth
    return written


RUN_FIGURES = ("grad_norm_per_layer.png", "loss_curve.png")


def draw_run_figures(out_dir: Path | str) -> None:
    """After `stabbench run`: the run's own figures, unless each is there and no older than
    its summary. So a kill between the summary and the figures, or a retrain, is made good by
    the same command; a partial run (no summary) gets none. A failure is one warning line:
    the run's data is saved, and a figure must not turn it into a failed run."""
    out_dir = Path(out_dir)
    summary = out_dir / "summary.json"
    if not summary.is_file():
        return
    made = summary.stat().st_mtime
    if all((out_dir / name).is_file() and (out_dir / name).stat().st_mtime >= made for name in RUN_FIGURES):
        return
    try:
        write_run_figures(out_dir)
    except Exception as error:  # noqa: BLE001 - see above
        reason = (str(error).splitlines() or [""])[0]
        print(f"stabbench: warning: no figures for {out_dir} ({type(error).__name__}: {reason})", flush=True)


def write_run_figures(out_dir: Path | str) -> list[Path]:
    """A single run's own figures, into its directory: gradient norm per layer (at init and
    at the end) and the loss curve. Returns the files written; a run without the data gets none.
    Works on a finished run and on one still going (reads only its CSVs and config)."""
    from stabbench import plots

    out_dir = Path(out_dir)
    run_set = read_runs([out_dir], out_dir)
    first = run_set.runs.iloc[0]
    title = f"{first['method']} on {first['dataset']}, depth {_fmt(first['depth'])}, width {_fmt(first['width'])}"
    # One line per run: a grid's lrs, each `lr=...`; a plain run's one line has no legend.
    ids = list(range(len(run_set.dirs)))
    names = {i: f"lr={run_set.member_lr[i]:g}" if i in run_set.member_lr else str(first["method"]) for i in ids}
    colors = method_colors(names.values())
    grid = len(ids) > 1
    written = []
    layers = run_set.layers(ids, columns=("grad_norm",))
    layers = layers.assign(method=layers["run_id"].map(names), cell=title)
    grad_figure, loss_figure = (out_dir / name for name in RUN_FIGURES)
    if not layers.empty and plots.grad_norm_per_layer(layer_snapshots(layers), colors, [title], grad_figure,
                                                      legend=grid):
        written.append(grad_figure)
    metrics = run_set.metrics(ids)
    metrics = metrics.assign(method=metrics["run_id"].map(names), cell=title)
    if plots.loss_curves(metrics, colors, [title], loss_figure, legend=grid):
        written.append(loss_figure)
    return written


# -- index.html -------------------------------------------------------------------------------

def write_index(out_dir: Path, readable: pd.DataFrame, runs: pd.DataFrame, figures: list[str], title: str,
                protocol: str | None = None) -> None:
    import html

    counts = runs["status"].value_counts()
    status = ", ".join(f"{counts.get(s, 0)} {s}" for s in (*FINISHED, "partial", "unreadable")
                       if counts.get(s, 0))
    files = [name for name in ("table.csv", "table.md", "runs.csv", "tuning.csv") if (out_dir / name).exists()]
    captions = dict(FIGURES)
    parts = [
        "<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}th{background:#f3f3f3}"
        "figure{margin:2em 0}img{max-width:100%;border:1px solid #eee}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(runs)} seeds in {runs['run'].nunique()} runs: {html.escape(status)}. Files: "
        + ", ".join(f"<a href='{html.escape(f)}'>{html.escape(f)}</a>" for f in files) + "</p>",
        "<h2>Results</h2>",
        *([f"<p class='protocol'><b>Protocol.</b> {html.escape(protocol)}</p>"] if protocol else []),
        readable.to_html(index=False, border=0, na_rep="-", escape=True),
        "<p>mean ± std over the seeds that finished without diverging or exploding; n counts finished seeds, "
        "diverged ones included; the diverged (and exploded) columns say how many of them diverged (NaN) or "
        "exploded (a finite loss beyond explode_factor times its initial value, or saturated gradients): "
        "they are left out of every mean.</p>",
    ]
    shown = [f for f in figures if (out_dir / f).exists()]
    if shown:
        parts.append("<h2>Figures</h2>")
    for name in shown:
        parts.append(f"<figure><img src='{html.escape(name)}' alt='{html.escape(name)}'>"
                     f"<figcaption>{html.escape(captions.get(name, name))}</figcaption></figure>")
    parts.append("</body></html>")
    atomic_write_text(out_dir / "index.html", "\n".join(parts) + "\n")


# -- the command ------------------------------------------------------------------------------

def write_report(paths: list[Path | str], out_dir: Path | str | None = None, target_loss: float | None = None,
                 quiet: bool = False) -> Path:
    """Read every run under `paths`; write runs.csv, table.csv, table.md, figures and index.html into out_dir."""
    paths = [Path(p) for p in paths]
    if out_dir is None:
        if len(paths) > 1:
            raise UserError("several paths given: say where the report goes with --out DIR")
        top = paths[0].parent if paths[0].is_file() else paths[0]
        own = (top / "summary.json").exists() or (top / ".hydra" / "config.yaml").exists()
        out_dir = top.parent / f"{top.name}_report" if own else top / "report"  # never inside a run's own directory
    out_dir = Path(out_dir).absolute()  # `--out .` has a name and a parent to stage beside
    for folder in (out_dir, *out_dir.parents):
        if (folder / "summary.json").exists() or (folder / ".hydra" / "config.yaml").exists():
            raise UserError(f"{out_dir} is inside the run directory {folder}; a report never writes into a run's "
                            f"own directory: give --out DIR elsewhere")
    check_replaceable(out_dir)
    from stabbench import tuning

    run_set = load_runs(paths)
    runs = runs_table(run_set, target_loss)
    selection = tuning.select(run_set.runs) if run_set.tuned else None
    chosen = slice(None) if selection is None else selection.chosen.to_numpy()
    table = aggregate(runs[chosen])
    if selection is not None:
        runs = runs.assign(chosen=selection.chosen)
        table = with_selection(table, selection)
    readable = readable_table(table)
    title = f"stabbench report: {', '.join(str(p) for p in paths)}"
    # Written into a fresh sibling folder, then swapped in: a reader (or a kill, or a full
    # disk) never meets a report half old and half new.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        os.chmod(staging, 0o777 & ~_umask())
        if selection is not None:
            write_csv(staging / "tuning.csv", selection.per_lr)
        write_csv(staging / "runs.csv", runs)
        write_csv(staging / "table.csv", table)
        atomic_write_text(staging / "table.md", markdown(readable))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN bands of diverged seeds
            figures = write_figures(run_set, staging, run_set.runs[chosen], selection)
        write_index(staging, readable, runs, figures, title, None if selection is None else selection.protocol())
        swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for problem in dict.fromkeys(run_set.problems):
        print(f"stabbench: warning: {problem}", file=sys.stderr)
    if not quiet:
        print_table(table, f"{len(runs)} seeds in {len(set(run_set.dirs))} runs (mean, "
                    f"{progress.plus_minus()} std over seeds)"
                    + ("; tuned: each cell at its lr chosen on the validation split (a memorisation task: on the "
                       "training loss)" if selection is not None else ""))
        print(f"wrote {out_dir}", flush=True)
    return out_dir


def write_probe_sweep_figure(sweep_dir: Path | str) -> Path | None:
    """After `stabbench probe -m ...`: every probe of the sweep in one figure, <sweep dir>/probe_sweep.png.
    One line per probe (the median over its draws), labelled by the config keys that differ
    between the probes: forward log-norms on the left, weight-gradient norms on the right."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stabbench.plots import palette

    sweep_dir = Path(sweep_dir)
    found = sorted(p.parent for p in sweep_dir.glob("*/probe.json"))
    if not found:
        return None
    summaries = [json.loads((d / "probe.json").read_text()) for d in found]
    config = _flatten_config([s["config"] for s in summaries])
    varying = [c for c in config.columns if config[c].nunique(dropna=True) > 1 and not c.startswith("hydra.")]
    labels = [", ".join(f"{c.removeprefix('method.')}={config[c].iloc[i]}" for c in varying) or s["method"]
              for i, s in enumerate(summaries)]
    colors = palette(labels)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for directory, label in zip(found, labels):
        layers = pd.read_csv(directory / "probe_layers.csv")
        for ax, key in zip(axes, ("act_log_norm", "log_grad_norm")):
            per_layer = (layers[key] / math.log(10)).groupby(layers["layer"])
            ax.plot(per_layer.median().index, per_layer.median(), color=colors[label], linewidth=1.5, label=label)
            ax.fill_between(per_layer.min().index, per_layer.min(), per_layer.max(), color=colors[label], alpha=0.15)
    axes[0].set_ylabel("log10 ||x_l||, mean over examples")
    axes[1].set_ylabel("log10 ||dE/dW_l||_F")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(True, alpha=0.3)
    axes[1].legend(loc="best", fontsize=8)
    first = summaries[0]
    fig.suptitle(f"probe sweep: depth {first['depth']}, width {first['width']}, {first['networks']} draws each "
                 f"(line: median, band: min to max), error: {first.get('error', 'loss')}", fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    path = sweep_dir / "probe_sweep.png"
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_report_file(path: Path) -> bool:
    """A file a report writes (its tables, index and figures): what replacing a report may delete."""
    return path.is_file() and (path.name in REPORT_FILES or path.suffix == ".png")


def check_replaceable(out_dir: Path) -> None:
    """A report replaces its directory whole; it refuses one holding anything else."""
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if not is_report_file(p))
        if foreign:
            raise UserError(f"{out_dir} holds {foreign[0]}, which is not part of a report, and a report replaces "
                            f"its whole directory: give --out a new or report directory")
    elif out_dir.exists():
        raise UserError(f"{out_dir} is a file; give --out a directory")


def swap_in(staging: Path, out_dir: Path) -> None:
    """Puts the finished report at out_dir: two renames, the old report removed only once the
    new one is in place. On a failure the old one is put back; if even that fails it is left
    whole where it was moved, and the error names that place."""
    check_replaceable(out_dir)  # again: someone may have written there while this report was made
    retired = None
    try:
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
            os.replace(out_dir, retired / "report")
        os.rename(staging, out_dir)
    except OSError as error:
        kept = None if retired is None else retired / "report"
        if kept is not None and kept.exists() and not out_dir.exists():
            try:
                os.rename(kept, out_dir)  # never no report at all
            except OSError:
                raise UserError(f"could not write {out_dir} ({error.strerror}), nor put the earlier report back: "
                                f"it is whole at {kept}") from None
        if retired is not None and not (kept and kept.exists()):
            shutil.rmtree(retired, ignore_errors=True)
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise UserError(f"{out_dir} was written by another report at the same time; run this one again") from None
        raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="stabbench report",
        description="Tables and figures from the runs and sweeps under PATH (searched recursively).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  stabbench report results/sweeps/<time>                   # writes <time>/report/\n"
               "  stabbench report results/runs/a results/runs/b --out cmp # several paths need --out\n"
               "  stabbench report results/sweeps/<time> --target-loss 0.5 # also steps to loss <= 0.5\n"
               "files and figures: docs/report.md")
    parser.add_argument("paths", nargs="+", metavar="PATH", type=Path, help="run or sweep directories")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="where to write (default PATH/report; required with several PATHs)")
    parser.add_argument("--target-loss", type=_finite_float, default=None, metavar="X",
                        help="also report the steps each run took to reach train loss <= X")
    args = parser.parse_args(argv)
    try:
        write_report(args.paths, args.out, args.target_loss)
    except UserError as error:
        print(f"stabbench: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in UNWRITABLE:
            raise
        print(f"stabbench: error: cannot write the report: {UNWRITABLE[error.errno]}; nothing was changed "
              f"(an earlier report there is whole): make room and type the same command again", file=sys.stderr)
        return 1
    return 0
