"""The report's figures. Each function takes long-format frames prepared by report.py, draws
one PNG and returns True, or returns False and writes nothing when it has no data to draw.

Figures are built with matplotlib's object API (no pyplot): no global state, no display
backend, safe inside a Hydra callback. A method keeps one colour in every figure of a
report (`palette`).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from stabbench.outputs import atomic_write_bytes

DPI = 110
PANEL = (4.6, 3.2)  # inches per panel
MAX_PANELS = 6
DIVERGED_MARK = dict(marker="x", color="black", s=40, linewidths=1.5, zorder=5)


def palette(labels: list[str]) -> dict:
    from matplotlib import colormaps

    colors = list(colormaps["tab10"].colors)
    if len(labels) > len(colors):
        colors = list(colormaps["tab20"].colors)
    return {label: colors[i % len(colors)] for i, label in enumerate(labels)}


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]


def _style(colors: dict, method: str, index_size: int = 7) -> dict:
    """Colour and a hollow marker per method; earlier methods get larger markers, so curves
    that coincide (methods identical at initialisation) still show every method."""
    k = list(colors).index(method)
    return dict(color=colors[method], marker=MARKERS[k % len(MARKERS)], markerfacecolor="none",
                ms=max(3.0, index_size - 1.2 * k), markeredgewidth=1.3)


def _figure(rows: int, cols: int, width: float = PANEL[0], height: float = PANEL[1], extra_width: float = 0,
            **subplots):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(cols * width + extra_width, rows * height), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **subplots)
    return fig, axes


def _save(fig, path: Path) -> bool:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())
    return True


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return -(-n // cols), cols


def _hide_unused(axes, used: int) -> None:
    for ax in axes.flat[used:]:
        ax.set_visible(False)


def _legend(fig, colors: dict, methods, extra: list | None = None) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], lw=2, label=m, **_style(colors, m)) for m in sorted(methods)]
    handles += extra or []
    fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=9)


def _every(line) -> int:
    return max(1, len(line) // 24)  # markers, not a smear, on a 200-layer line


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plain_log_labels(ax) -> None:
    """Under a decade of range a log axis labels its minor ticks in 10^x form, unreadably
    many: plain numbers instead."""
    from matplotlib.ticker import FuncFormatter

    low, high = ax.get_ylim()
    if low > 0 and high / low < 10:
        plain = FuncFormatter(lambda v, _: f"{v:.2g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)


def _log_if_spread(ax, values, axis: str = "y", spread: float = 50.0) -> None:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) and values.max() / values.min() > spread:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _geometric_band(frame: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """Geometric mean and min/max of a positive quantity over seeds (means of logs: norms
    spread over orders of magnitude across seeds of a deep network)."""
    frame = frame[np.isfinite(frame[value].astype(float)) & (frame[value] > 0)]
    frame = frame.assign(log=np.log(frame[value].astype(float)))
    stats = frame.groupby(by)[["log", value]].agg({"log": "mean", value: ["min", "max"]})
    stats.columns = ["log_mean", "low", "high"]
    return stats.assign(mean=np.exp(stats["log_mean"])).reset_index()


# -- 1. gradient norm per layer ------------------------------------------------------------

def grad_norm_per_layer(snapshots: pd.DataFrame, colors: dict, cells: list[str], path: Path,
                        legend: bool = True) -> bool:
    """One row per cell, columns: at initialisation, at the end of training."""
    if snapshots.empty or "grad_norm" not in snapshots or not snapshots["grad_norm"].notna().any():
        return False
    stats = _geometric_band(snapshots, ["cell", "when", "method", "layer"], "grad_norm")
    cells = [c for c in cells if c in set(stats["cell"])]
    if not cells:
        return False
    fig, axes = _figure(len(cells), 2, extra_width=2.2 if legend else 0, sharey="row")
    for row, cell in enumerate(cells):
        for col, when in enumerate(("init", "end")):
            ax = axes[row, col]
            part = stats[(stats["cell"] == cell) & (stats["when"] == when)]
            for method, line in part.groupby("method"):
                line = line.sort_values("layer")
                ax.plot(line["layer"], line["mean"], lw=1.8, markevery=_every(line), **_style(colors, method))
                ax.fill_between(line["layer"], line["low"], line["high"], color=colors[method], alpha=0.2, lw=0)
            ax.set_yscale("log")
            if when == "init":
                subtitle = "at initialisation"
            else:
                cut = snapshots.loc[(snapshots["cell"] == cell) & (snapshots["when"] == "end"), "cut"].astype(bool)
                subtitle = "end of training" + (" (diverged seeds: last finite step)" if cut.any() else "")
            ax.set_title(f"{cell}\n{subtitle}", fontsize=10)
            ax.set_xlabel("layer (1 = input, last = output)")
            _integer_ticks(ax)
            ax.grid(True, which="major", alpha=0.3)
            if col == 0:
                ax.set_ylabel("gradient norm ‖∂L/∂W‖")
    for ax in axes.flat:  # once every panel of a shared row is drawn
        _plain_log_labels(ax)
    if legend:
        _legend(fig, colors, stats["method"].unique())
    return _save(fig, path)


# -- 2. loss against step ------------------------------------------------------------------

def loss_curves(metrics: pd.DataFrame, colors: dict, cells: list[str], path: Path, legend: bool = True) -> bool:
    if metrics.empty or "loss" not in metrics:
        return False
    metrics = metrics[np.isfinite(metrics["loss"].astype(float))]
    cells = [c for c in cells if c in set(metrics["cell"])]
    if not cells:
        return False
    from matplotlib.lines import Line2D

    stats = metrics.groupby(["cell", "method", "split", "gstep"])["loss"].agg(["mean", "min", "max"]).reset_index()
    rows, cols = _grid(len(cells))
    fig, axes = _figure(rows, cols, extra_width=2.2 if legend else 0)
    for ax, cell in zip(axes.flat, cells):
        part = stats[stats["cell"] == cell]
        for (method, split), line in part.groupby(["method", "split"]):
            color = colors[method]
            if split == "test":
                ax.plot(line["gstep"], line["mean"], color=color, ls="--", marker="o", ms=4, lw=1.5)
            else:
                ax.plot(line["gstep"], line["mean"], color=color, lw=1.8)
                ax.fill_between(line["gstep"], line["min"], line["max"], color=color, alpha=0.2, lw=0)
        _log_if_spread(ax, part["mean"])
        if ax.get_yscale() == "log":
            _plain_log_labels(ax)
        ax.set_title(cell, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
    _hide_unused(axes, len(cells))
    style = [Line2D([], [], color="grey", lw=1.8, label="train"),
             Line2D([], [], color="grey", ls="--", marker="o", ms=4, label="test")]
    if legend:
        _legend(fig, colors, stats["method"].unique(), style)
    else:
        axes.flat[0].legend(handles=style, frameon=False, fontsize=9)
    return _save(fig, path)


# -- 3. trainability map --------------------------------------------------------------------

def _final_score(runs: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """Final test accuracy per seed; for regression (no accuracy anywhere) final train loss."""
    if "test_acc" in runs and runs["test_acc"].notna().any():
        return "final test accuracy", runs.assign(score=runs["test_acc"].astype(float))
    return "final train loss", runs.assign(score=runs["train_loss"].astype(float))


def trainability_map(runs: pd.DataFrame, path: Path, chosen: pd.DataFrame | None = None) -> bool:
    """Depth x method in one panel per (dataset, width), methods side by side: the final score
    (mean over seeds), hatched where seeds diverged. `chosen` (a tuned report's cells): each cell
    names its lr, with an arrow where it sits at an edge of its grid. Panels of one dataset
    share one colour scale."""
    if runs.empty or runs[["method", "depth", "width"]].drop_duplicates().shape[0] < 2:
        return False
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize

    lr_of = {} if chosen is None else {
        (m, d, h, w): (lr, edge) for m, d, h, w, lr, edge in chosen[["method", "dataset", "depth", "width", "lr",
                                                                      "edge"]].itertuples(index=False)}
    panels = []
    for dataset, data in runs.groupby("dataset"):
        name, data = _final_score(data)
        grid = data.groupby(["width", "method", "depth"]).agg(score=("score", "mean"), n=("score", "size"),
                                                              diverged=("diverged", "sum"))
        finite = grid["score"][np.isfinite(grid["score"])]
        if name.endswith("accuracy"):
            # From 0, not from the worst cell: a small gap between good cells should not look like a cliff.
            norm, cmap = Normalize(0.0, max(finite.max(), 1e-6) if len(finite) else 1.0), colormaps["viridis"]
        else:  # a loss: lower is better, log scale
            positive = finite[finite > 0]
            low, high = (positive.min(), positive.max()) if len(positive) else (1e-3, 1.0)
            norm, cmap = LogNorm(low / 1.001, high * 1.001), colormaps["viridis_r"]
        panels += [(dataset, width, name, cells.droplevel(0), norm, cmap) for width, cells in grid.groupby(level=0)]
    panels = panels[:MAX_PANELS]
    methods = sorted(runs["method"].unique())
    depths = sorted(runs["depth"].unique())
    rows, cols = _grid(len(panels), 2)
    fig, axes = _figure(rows, cols, width=max(3.6, 1.25 * len(methods) + 2.0),
                        height=max(2.6, 0.55 * len(depths) + 1.8))
    arrows = {"low": "↓", "high": "↑"}
    for ax, (dataset, width, name, cells, norm, cmap) in zip(axes.flat, panels):
        scores = cells["score"].unstack("method").reindex(index=depths, columns=methods)
        image = ax.imshow(np.ma.masked_invalid(scores.to_numpy(dtype=float)), origin="lower", aspect="auto",
                          cmap=cmap.with_extremes(bad="#dddddd"), norm=norm)
        for i, depth in enumerate(depths):
            for j, method in enumerate(methods):
                if (method, depth) not in cells.index:
                    continue
                cell = cells.loc[(method, depth)]
                finite = np.isfinite(cell["score"])
                text = f"{cell['score']:.3g}" if finite else "-"
                if (method, dataset, depth, width) in lr_of:
                    lr, edge = lr_of[(method, dataset, depth, width)]
                    text += f"\nlr {lr:g}{arrows.get(edge, '')}"
                if cell["diverged"]:
                    text += f"\n{int(cell['diverged'])}/{int(cell['n'])} div."
                    ax.add_patch(_hatch(j, i))
                shade = float(norm(cell["score"])) if finite else 1.0
                dark = shade < 0.55 if cmap.name == "viridis" else shade > 0.45
                ax.text(j, i, text, ha="center", va="center", fontsize=7.5,
                        color="white" if dark and finite else "black", fontweight="bold" if cell["diverged"] else None)
        ax.set_xticks(range(len(methods)), methods, rotation=25, ha="right", fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_ylabel("depth")
        ax.set_title(f"width {width:g}" + (f" · {dataset}" if runs["dataset"].nunique() > 1 else ""), fontsize=10)
        fig.colorbar(image, ax=ax, label=name, shrink=0.9)
    _hide_unused(axes, len(panels))
    return _save(fig, path)


def lr_sensitivity(per_lr: pd.DataFrame, chosen: pd.DataFrame, colors: dict, path: Path) -> bool:
    """Final validation score against learning rate (as DeepOBS draws it): one line per method,
    one panel per (dataset, width, depth); a ring on each cell's chosen lr, a cross where seeds
    diverged at that lr."""
    per_lr = per_lr[per_lr.groupby(["method", "dataset", "depth", "width"])["lr"].transform("nunique") > 1]
    if per_lr.empty:
        return False
    from matplotlib.lines import Line2D

    keys = ["dataset", "width", "depth"]
    panels = list(per_lr.groupby(keys, sort=True))
    panels = panels[-MAX_PANELS * 2:]  # the deepest and widest
    several = {k: per_lr[k].nunique() > 1 for k in ("dataset", "width")}
    rows, cols = _grid(len(panels), 4)
    fig, axes = _figure(rows, cols, width=3.8, height=3.0, extra_width=2.4)
    for ax, ((dataset, width, depth), part) in zip(axes.flat, panels):
        for method, line in part.groupby("method"):
            line = line.sort_values("lr")
            finite = np.isfinite(line["val_score"].astype(float))
            ax.plot(line["lr"][finite], line["val_score"][finite], lw=1.6, **_style(colors, method, 6))
            bad = line[line["diverged"] > 0]
            if len(bad):
                floor = ax.get_xaxis_transform()
                ax.scatter(bad["lr"], np.full(len(bad), 0.03), transform=floor, clip_on=False, **DIVERGED_MARK)
            pick = chosen[(chosen["method"] == method) & (chosen["dataset"] == dataset) & (chosen["depth"] == depth)
                          & (chosen["width"] == width)]
            for lr in pick["lr"]:
                score = line.loc[line["lr"] == lr, "val_score"]  # exact: isclose's 1e-8 joins tiny lrs
                if len(score) and np.isfinite(score.iloc[0]):
                    ax.scatter([lr], [score.iloc[0]], s=130, facecolors="none", edgecolors=colors[method], lw=1.5,
                               zorder=6)
        ax.set_xscale("log")
        metric = part["metric"].iloc[0]
        if not metric.endswith("accuracy"):
            _log_if_spread(ax, part["val_score"])
        title = f"depth {depth:g}" + (f" · width {width:g}" if several["width"] else "")
        ax.set_title(title + (f" · {dataset}" if several["dataset"] else ""), fontsize=10)
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"final {metric}")
        ax.grid(True, alpha=0.3)
    _hide_unused(axes, len(panels))
    extra = [Line2D([], [], ls="", marker="o", ms=10, markerfacecolor="none", color="grey", label="chosen lr"),
             Line2D([], [], ls="", marker="x", color="black", mew=1.5, label="seeds diverged")]
    _legend(fig, colors, per_lr["method"].unique(), extra)
    return _save(fig, path)


def _hatch(x: float, y: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="///", edgecolor="red", lw=0)


# -- 4. accuracy against depth ----------------------------------------------------------------

def accuracy_vs_depth(runs: pd.DataFrame, colors: dict, path: Path) -> bool:
    """One panel per (dataset, width) with at least two depths; a line per method with std error bars."""
    from matplotlib.lines import Line2D

    panels = []
    for (dataset, width), data in runs.groupby(["dataset", "width"]):
        if data["depth"].nunique() < 2:
            continue
        accuracy = "test_acc" in data and data["test_acc"].notna().any()
        name = "final test accuracy" if accuracy else "final test loss"
        data = data.assign(score=data["test_acc" if accuracy else "test_loss"].astype(float))
        panels.append((dataset, width, name, data))
    if not panels:
        return False
    panels = panels[-MAX_PANELS:]  # the widest
    several_datasets = runs["dataset"].nunique() > 1
    rows, cols = _grid(len(panels))
    fig, axes = _figure(rows, cols, extra_width=2.2)
    any_diverged = False
    for ax, (dataset, width, name, data) in zip(axes.flat, panels):
        for method, line in data.groupby("method"):
            stats = line.groupby("depth").agg(mean=("score", "mean"), std=("score", "std"), diverged=("diverged", "sum"))
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), lw=1.8, capsize=3,
                        **_style(colors, method))
            bad = stats[stats["diverged"] > 0]
            if len(bad):
                any_diverged = True
                # At the line where a mean exists, else on the axis floor: every seed diverged.
                floor = ax.get_xaxis_transform()
                ok = bad["mean"].notna()
                ax.scatter(bad.index[ok], bad["mean"][ok], **DIVERGED_MARK)
                ax.scatter(bad.index[~ok], np.full((~ok).sum(), 0.03), transform=floor, clip_on=False, **DIVERGED_MARK)
        depths = np.sort(data["depth"].unique())
        if depths.max() / max(depths.min(), 1) >= 8:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        if len(depths) <= 12:
            ax.set_xticks(depths, [f"{d:g}" for d in depths])
        if not name.endswith("accuracy"):
            _log_if_spread(ax, data["score"])
        ax.set_title((f"{dataset} · " if several_datasets else "") + f"width {width:g}", fontsize=10)
        ax.set_xlabel("depth")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    _hide_unused(axes, len(panels))
    extra = [Line2D([], [], ls="", marker="x", color="black", mew=1.5, label="seeds diverged")] if any_diverged else []
    _legend(fig, colors, runs["method"].unique(), extra)
    return _save(fig, path)


# -- 5. beta per layer over training ----------------------------------------------------------

def beta_per_layer(layers: pd.DataFrame, colors: dict, cells: list[str], path: Path, snapshots: int = 6) -> bool:
    """Per (method, cell) with a beta column: beta against layer at a few steps, mean over seeds."""
    if layers.empty or "beta" not in layers:
        return False
    layers = layers[np.isfinite(layers["beta"].astype(float))]
    if layers.empty:
        return False
    from matplotlib import colormaps

    panels = [(method, cell, part) for cell in cells for method, part in layers[layers["cell"] == cell].groupby("method")]
    panels = panels[-MAX_PANELS:]  # the deepest cells
    rows, cols = _grid(len(panels))
    fig, axes = _figure(rows, cols)
    cmap = colormaps["viridis"]
    for ax, (method, cell, part) in zip(axes.flat, panels):
        steps = np.sort(part["step"].unique())
        chosen = steps[np.unique(np.linspace(0, len(steps) - 1, min(snapshots, len(steps))).round().astype(int))]
        mean = part[part["step"].isin(chosen)].groupby(["step", "layer"])["beta"].mean().reset_index()
        for k, (step, line) in enumerate(mean.groupby("step")):
            ax.plot(line["layer"], line["beta"], color=cmap(k / max(len(chosen) - 1, 1)), lw=1.8,
                    label=f"step {step:g}")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{method}\n{cell}", fontsize=10, color=colors.get(method, "black"))
        ax.set_xlabel("layer")
        _integer_ticks(ax)
        ax.set_ylabel("β (per-layer scale)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, frameon=False, title="training step", title_fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))
    _hide_unused(axes, len(panels))
    return _save(fig, path)


# -- 6. activation std at init ------------------------------------------------------------------

def activation_std_at_init(init: pd.DataFrame, colors: dict, cells: list[str], path: Path) -> bool:
    if init.empty or "act_std" not in init or not init["act_std"].notna().any():
        return False
    stats = _geometric_band(init, ["cell", "method", "layer"], "act_std")
    cells = [c for c in cells if c in set(stats["cell"])]
    if not cells:
        return False
    rows, cols = _grid(len(cells))
    fig, axes = _figure(rows, cols, extra_width=2.2)
    for ax, cell in zip(axes.flat, cells):
        part = stats[stats["cell"] == cell]
        for method, line in part.groupby("method"):
            line = line.sort_values("layer")
            ax.plot(line["layer"], line["mean"], lw=1.8, markevery=_every(line), **_style(colors, method))
            ax.fill_between(line["layer"], line["low"], line["high"], color=colors[method], alpha=0.2, lw=0)
        _log_if_spread(ax, pd.concat([part["low"], part["high"]]), spread=20)
        if ax.get_yscale() == "log":
            _plain_log_labels(ax)
        ax.set_title(cell, fontsize=10)
        ax.set_xlabel("layer (1 = input, last = output)")
        _integer_ticks(ax)
        ax.set_ylabel("activation std at init")
        ax.grid(True, alpha=0.3)
    _hide_unused(axes, len(cells))
    _legend(fig, colors, stats["method"].unique())
    return _save(fig, path)
