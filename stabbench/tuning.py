"""The tuning protocol: each method gets its best learning rate from the grid it was run with,
chosen on the validation split (docs/tuning.md).

For each cell (method with its options, dataset, depth, width) that was trained at more
than one learning rate, whether by one batched run (`lrs=[...]`) or by separate runs
(`-m lr=...`), the chosen lr is the one with the best mean final validation score over
its seeds: accuracy for classification (higher is better), loss for regression (lower is
better). A dataset that is a memorisation task (pure-noise targets: `synthetic_regression`)
declares `SELECTED_ON = "train_loss"`: there the validation loss rewards not fitting, so the
lr is chosen by the final training loss, and the report says so. A diverged seed scores as the worst possible (accuracy 0, loss +inf); among lrs
tied at +inf, fewer diverged seeds win, then the better mean of the rest. Only finished
seeds count (a partial run is still going). The report then shows that lr's test metrics.

Nothing here reads a test column: `SELECTION_COLUMNS` is all `select` looks at, and the
test suite checks that permuting the test labels changes no choice.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from stabbench import datasets
from stabbench.outputs import FINISHED

CELL = ["method", "dataset", "depth", "width"]
SELECTION_COLUMNS = CELL + ["lr", "seed", "status", "diverged", "exploded", "val_acc", "val_loss", "train_loss",
                            "dataset.name"]
MEMORISATION_NOTE = "a memorisation task, where the validation loss rewards not fitting"


@dataclass
class Selection:
    cells: pd.DataFrame  # per cell: lr (chosen), grid (its lrs, ascending), edge, val_score, metric, seeds
    per_lr: pd.DataFrame  # per (cell, lr): val_score, n, diverged (the sensitivity figure's data)
    chosen: pd.Series  # per row of the runs given: it is a seed of its cell's chosen lr

    def protocol(self) -> str:
        """One sentence for index.html."""
        grids = sorted({lr for grid in self.cells["grid"] for lr in grid})
        metrics = " / ".join(sorted(set(self.cells["metric"])))
        seeds = sorted(set(self.cells["seeds"]))
        seeds_text = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
        return (f"Each method's learning rate was chosen per (method, dataset, depth, width) from the grid "
                f"{{{', '.join(f'{lr:g}' for lr in grids)}}} by the best mean final {metrics} over {seeds_text} "
                f"seeds (a diverged seed scoring as the worst possible); the table and figures show the test "
                f"metrics at that learning rate, and an lr at the edge of its grid is flagged.")


class NoValidation(Exception):
    """Learning rates vary within a cell but the runs have no validation scores to choose by."""


def tuned_cells(runs: pd.DataFrame) -> bool:
    """Whether any cell was trained at more than one learning rate."""
    return "lr" in runs and bool((runs.groupby(CELL, dropna=False)["lr"].nunique() > 1).any())


def select(runs: pd.DataFrame) -> Selection:
    """The chosen lr of every cell of `runs` (one row per seed, the report's runs frame)."""
    runs = runs[[c for c in SELECTION_COLUMNS if c in runs]].copy()
    if "exploded" not in runs:
        runs["exploded"] = False
    for column in ("val_acc", "val_loss", "train_loss"):
        runs[column] = pd.to_numeric(runs[column], errors="coerce") if column in runs else np.nan
    if "dataset.name" not in runs:
        runs["dataset.name"] = runs["dataset"]
    finished = runs[runs["status"].isin(FINISHED)]
    cells, per_lr = [], []
    for key, cell in finished.groupby(CELL, dropna=False, sort=True):
        on_train = datasets.selected_on(str(cell["dataset.name"].iloc[0])) == "train_loss"
        accuracy = not on_train and cell["val_acc"].notna().any()
        value = cell["val_acc" if accuracy else "train_loss" if on_train else "val_loss"].astype(float)
        failed = cell["diverged"].astype(bool) | cell["exploded"].astype(bool)  # an exploded seed is not trained either
        healthy = ~failed & np.isfinite(value)
        if not healthy.any() and not failed.all():
            raise NoValidation(f"{key[0]} at depth {key[2]}, width {key[3]} has no "
                               f"{'training' if on_train else 'validation'} scores")
        # Higher is better from here on: a loss is negated. The worst possible: accuracy 0, loss +inf.
        score = np.where(healthy, value if accuracy else -value, 0.0 if accuracy else -np.inf)
        frame = cell.assign(score=score, healthy=healthy, good=np.where(healthy, score, np.nan))
        scores = frame.groupby("lr").agg(val_score=("score", "mean"), n=("score", "size"),
                                         diverged=("healthy", lambda h: int((~h).sum())),
                                         healthy_mean=("good", "mean")).reset_index()
        ranked = scores.assign(fewer_diverged=-scores["diverged"], rest=scores["healthy_mean"].fillna(-np.inf))
        ranked = ranked.sort_values(["val_score", "fewer_diverged", "rest", "lr"],
                                    ascending=[False, False, False, True], kind="stable")
        best = ranked.iloc[0]
        grid = sorted(scores["lr"])
        edge = "" if len(grid) < 2 else "low" if best["lr"] == grid[0] else "high" if best["lr"] == grid[-1] else ""
        sign = 1.0 if accuracy else -1.0
        metric = ("validation accuracy" if accuracy else f"training loss ({MEMORISATION_NOTE})" if on_train
                  else "validation loss")
        cells.append(dict(zip(CELL, key), lr=float(best["lr"]), grid=tuple(grid), edge=edge,
                          val_score=sign * float(best["val_score"]), metric=metric, seeds=int(best["n"])))
        per_lr.append(scores.assign(val_score=sign * scores["val_score"], metric=metric,
                                    **dict(zip(CELL, key)))[CELL + ["lr", "val_score", "n", "diverged", "metric"]])
    cells = pd.DataFrame(cells, columns=CELL + ["lr", "grid", "edge", "val_score", "metric", "seeds"])
    per_lr = pd.concat(per_lr, ignore_index=True) if per_lr else pd.DataFrame(
        columns=CELL + ["lr", "val_score", "n", "diverged", "metric"])
    chosen_lr = runs[CELL].merge(cells[CELL + ["lr"]], on=CELL, how="left")["lr"].to_numpy()
    return Selection(cells=cells, per_lr=per_lr,
                     # exact: the chosen lr is one of the cell's own lr values (isclose's absolute
                     # tolerance 1e-8 would call lrs 1e-8 and 2e-8 the same)
                     chosen=pd.Series(runs["lr"].astype(float).to_numpy() == chosen_lr.astype(float),
                                      index=runs.index))


def run_score(summaries: list[dict]) -> float | None:
    """A run's selection score for Hydra's sweepers (the Optuna plugin): the best lr's mean final
    validation accuracy (classification; maximise) or loss (regression; minimise) over its seeds,
    chosen as above; None without a validation split."""
    runs = pd.DataFrame([{"method": s["method"], "dataset": s["dataset"], "depth": s["depth"], "width": s["width"],
                          "lr": s["lr"], "seed": s["seed"], "status": "complete", "diverged": s["diverged"],
                          "exploded": bool(s.get("exploded")),
                          "val_acc": s.get("val_acc"), "val_loss": s.get("val_loss"),
                          "train_loss": s.get("train_loss")} for s in summaries])
    try:
        cells = select(runs).cells
    except NoValidation:
        return None
    score = float(cells["val_score"].iloc[0])
    return score if np.isfinite(score) else (0.0 if cells["metric"].iloc[0].endswith("accuracy") else float("inf"))
