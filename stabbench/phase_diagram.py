"""The report's phase diagram (Schoenholz et al., ICLR 2017, their Figure; docs/theory.md):
when runs vary `method.weight_var` (sigma_w^2) and `depth`, the training accuracy over
(sigma_w^2, depth) as a heatmap, with the mean-field depth scale 6 xi_c(sigma_w^2) and the
critical sigma_w^2 (chi_1 = 1) drawn on it, and phase_diagram.csv with the numbers: per
sigma_w^2 the theory's 6 xi_c and the measured edge of the trainable region.

The score is the paper's: training accuracy, here the last logged running accuracy of each
seed (the mean over its last `log_every` steps, from metrics.csv). A cell is trainable when
its mean over seeds is at least half the panel's best cell. The theory is computed for the
runs' own network: phi from the method's built network, sigma_b^2 from its `mean_field` hook.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stabbench.outputs import FINISHED

FIGURE = "phase_diagram.png"
CAPTION = ("Training accuracy over (sigma_w^2, depth) with the mean-field depth scale 6 xi_c (white line) "
           "and the critical sigma_w^2 (dashed) of Schoenholz et al. 2017")
TABLE = "phase_diagram.csv"
PANEL_KEYS = ["method.name", "dataset", "width", "method.activation", "method.bias_var"]
TRAINABLE_FRACTION = 0.5  # of the panel's best accuracy
CURVE_POINTS = 60


def _runs_with_scores(run_set) -> pd.DataFrame:
    runs = run_set.runs[run_set.runs["status"].isin(FINISHED)].copy()
    config = run_set.config.loc[runs.index]
    if "method.weight_var" not in config or config["method.weight_var"].notna().sum() == 0:
        return pd.DataFrame()
    runs["weight_var"] = pd.to_numeric(config["method.weight_var"], errors="coerce")
    for key in PANEL_KEYS:
        if key not in runs:
            runs[key] = config[key] if key in config else np.nan
    runs = runs[runs["weight_var"].notna()]
    if runs.empty:
        return runs
    metrics = run_set.metrics(runs["run_id"])
    train = metrics[(metrics["split"] == "train")].sort_values("gstep") if "acc" in metrics else metrics.iloc[:0]
    last = train.groupby(["run_id", "seed"])["acc"].last()
    runs["train_acc"] = last.reindex(pd.MultiIndex.from_frame(runs[["run_id", "seed"]])).to_numpy(dtype=float)
    # a diverged seed has no accuracy (NaN, never argmax of NaN logits): kept, as untrainable
    return runs[runs["train_acc"].notna() | runs["diverged"]]


def _activation_and_bias(run_set, run_id: int):
    """phi of the runs' network (built by its method at a tiny shape) and the theory's sigma_b^2."""
    import torch
    from omegaconf import OmegaConf

    from stabbench import methods
    from stabbench.methods.base import Shape

    row = run_set.config.iloc[int(np.flatnonzero(run_set.runs["run_id"].to_numpy() == run_id)[0])]
    options = {k[len("method."):]: v.item() if isinstance(v, np.generic) else v for k, v in row.items()
               if k.startswith("method.") and not (isinstance(v, float) and np.isnan(v))}
    schema = OmegaConf.structured(methods.REGISTRY[options["name"]].Config)
    method = methods.create(OmegaConf.merge(schema, {k: v for k, v in options.items() if k in schema}))
    shape = Shape(2, 2, 2, 2)
    with torch.random.fork_rng():
        model = method.build(shape)
    return model.activation, method.mean_field(shape).bias_var


def theory_curve(activation, bias_var: float, weight_vars: np.ndarray) -> pd.DataFrame:
    from stabbench import mean_field

    rows = []
    for weight_var in weight_vars:
        prediction = mean_field.predict(activation, float(weight_var), bias_var)
        row = prediction.as_dict()
        row.pop("undefined")  # one column for its reason instead (6 xi_c is NaN there: the curve has a gap)
        rows.append({**row, "xi_c_undefined": prediction.undefined.get("xi_c")})
    return pd.DataFrame(rows)


def trainable_edges(cells: pd.DataFrame) -> pd.DataFrame:
    """Per sigma_w^2: the deepest trainable depth and the shallowest untrainable one."""
    threshold = TRAINABLE_FRACTION * cells["train_acc"].max()
    out = []
    for weight_var, column in cells.groupby("weight_var"):
        good = column.loc[column["train_acc"] >= threshold, "depth"]
        bad = column.loc[~(column["train_acc"] >= threshold), "depth"]  # every seed diverged: NaN, untrainable
        out.append({"weight_var": weight_var, "deepest_trainable": good.max() if len(good) else np.nan,
                    "shallowest_untrainable": bad.min() if len(bad) else np.nan, "threshold": threshold})
    return pd.DataFrame(out)


def write(run_set, out_dir: Path) -> list[str]:
    """phase_diagram.png and phase_diagram.csv when the runs span >= 2 sigma_w^2 and >= 2 depths
    in some panel; returns the figure's name if drawn."""
    runs = _runs_with_scores(run_set)
    if runs.empty:
        return []
    panels = []
    for key, group in runs.groupby([k for k in PANEL_KEYS if runs[k].notna().any()], dropna=False, sort=True):
        if group["weight_var"].nunique() < 2 or group["depth"].nunique() < 2:
            continue
        cells = group.groupby(["weight_var", "depth"], as_index=False).agg(
            train_acc=("train_acc", "mean"), seeds=("train_acc", "size"), diverged=("diverged", "sum"))
        activation, bias_var = _activation_and_bias(run_set, int(group["run_id"].iloc[0]))
        from stabbench import mean_field

        grid = np.linspace(cells["weight_var"].min(), cells["weight_var"].max(), CURVE_POINTS)
        curve = theory_curve(activation, bias_var, grid)
        critical = mean_field.critical_weight_var(activation, bias_var)
        at_runs = theory_curve(activation, bias_var, np.sort(cells["weight_var"].unique()))
        edges = trainable_edges(cells).merge(
            at_runs[["weight_var", "chi_1", "xi_c", "six_xi_c", "xi_c_undefined", "phase"]], on="weight_var")
        title = " · ".join(str(v) for v in (key if isinstance(key, tuple) else (key,)) if not pd.isna(v))
        panels.append((title, cells, curve, critical, edges.assign(panel=title, bias_var=bias_var,
                                                                    critical_weight_var=critical)))
    if not panels:
        return []
    from stabbench.outputs import write_csv

    write_csv(out_dir / TABLE, pd.concat([p[4] for p in panels], ignore_index=True))
    _draw(panels, out_dir / FIGURE)
    return [FIGURE]


def _edges(values: np.ndarray) -> np.ndarray:
    values = np.sort(values).astype(float)
    middle = (values[1:] + values[:-1]) / 2
    return np.concatenate([[values[0] - (middle[0] - values[0])], middle, [values[-1] + (values[-1] - middle[-1])]])


def _draw(panels, path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    from stabbench.plots import _figure, _save

    fig, axes = _figure(1, len(panels), width=5.6, height=4.4)
    for ax, (title, cells, curve, critical, edges) in zip(axes.flat, panels):
        weight_vars, depths = np.sort(cells["weight_var"].unique()), np.sort(cells["depth"].unique())
        grid = cells.pivot(index="depth", columns="weight_var", values="train_acc").reindex(index=depths, columns=weight_vars)
        norm = Normalize(0.0, max(float(np.nanmax(grid.to_numpy())), 1e-6))
        image = ax.pcolormesh(_edges(weight_vars), _edges(depths), np.ma.masked_invalid(grid.to_numpy(dtype=float)),
                              cmap=colormaps["viridis"].with_extremes(bad="#dddddd"), norm=norm, shading="flat")
        diverged = cells.set_index(["depth", "weight_var"])["diverged"]
        for depth, weight_var in ((d, v) for d in grid.index for v in grid.columns):
            value = grid.loc[depth, weight_var]
            if np.isfinite(value):
                ax.text(weight_var, depth, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if norm(value) < 0.55 else "black")
            elif diverged.get((depth, weight_var), 0):  # every seed diverged: no accuracy to show
                ax.text(weight_var, depth, "diverged", ha="center", va="center", fontsize=6, color="black")
        top = _edges(depths)[-1]
        # inf (the critical line) runs off the top; NaN (no depth scale: q* = 0 or inf) is a gap
        six_xi_c = np.minimum(curve["six_xi_c"].to_numpy(dtype=float), top * 10)
        ax.plot(curve["weight_var"], six_xi_c, color="white", linewidth=2.0, label="6 xi_c")
        if critical is not None and weight_vars[0] <= critical <= weight_vars[-1] + 1e-9:
            ax.axvline(critical, color="white", linestyle="--", linewidth=1.3,
                       label=f"critical sigma_w^2 = {critical:.3g}")
        ax.set_ylim(_edges(depths)[0], top)
        ax.set_xlim(_edges(weight_vars)[0], _edges(weight_vars)[-1])
        ax.set_xlabel("sigma_w^2 (method.weight_var)")
        ax.set_ylabel("depth")
        ax.set_title(title, fontsize=9)
        ax.legend(loc="upper right", fontsize=7, facecolor="#444444", labelcolor="white", framealpha=0.7)
        fig.colorbar(image, ax=ax, label="training accuracy (last logged)", shrink=0.9)
    _save(fig, path)
