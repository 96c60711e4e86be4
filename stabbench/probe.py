"""`stabbench probe`: signal propagation at initialisation, no training. See docs/probe.md.

Builds `probe.networks` draws of the network exactly as `stabbench run` would (seeds
seed .. seed+n-1, one batched model), pushes one batch forward (the dataset's, or
standard-normal inputs for the synthetic datasets) and the loss's error backward, and
writes probe_layers.csv, probe.json and probe.png. The method is reached only through
its interface (build, constants), so the probe works for every method.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

import stabbench
from stabbench import datasets, memory, methods
from stabbench.methods.base import Shape
from stabbench.outputs import atomic_write_bytes, finite_or_none, write_csv, write_json
from stabbench.train import build_ensemble, grad_norm_ratio, resolve_device, task_loss

LAYER_COLUMNS = ["network", "seed", "layer", "kind", "act_mean", "act_std", "act_log_norm", "grad_norm"]
JACOBIAN_MAX_WIDTH = 64
JACOBIAN_EXAMPLES = 16  # per draw
MEMORY_BUDGET_CPU = 2 << 30  # bytes for one chunk of draws (weights, grads, saved activations)


def probe_batch(cfg, device: torch.device):
    """(x [B, F], targets, task, n_outputs, source): one fixed batch, drawn from cfg.seed."""
    data = datasets.load(cfg.dataset, torch.device("cpu"))
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.dataset.name.startswith("synthetic"):
        # The synthetic tasks' inputs are N(0, I) already; a fresh standard-normal batch and
        # random targets give the error signal without tying it to one teacher.
        batch = cfg.probe.batch_size
        x = torch.randn(batch, data.in_features, generator=generator)
        if data.task == "classification":
            targets = torch.randint(data.n_outputs, (batch,), generator=generator)
        else:
            targets = torch.randn(batch, data.n_outputs, generator=generator)
        source = "standard_normal"
    else:
        batch = min(cfg.probe.batch_size, len(data.x_train))
        index = torch.randperm(len(data.x_train), generator=generator)[:batch]
        x, targets = data.x_train[index], data.y_train[index]
        source = f"{cfg.dataset.name}_train"
    return x.to(device), targets.to(device), data.task, data.n_outputs, source


def draws_per_chunk(shape: Shape, batch: int, networks: int, device: torch.device) -> int:
    """How many draws to hold at once: all of them unless weights, grads and saved
    activations would pass the memory budget (depth 200, width 500 is ~1 GB a draw)."""
    per_draw = memory.probe_draw(shape.in_features, shape.out_features, shape.depth, shape.width, batch)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 3
    else:
        budget = MEMORY_BUDGET_CPU
    return int(max(1, min(networks, budget // max(per_draw, 1))))


def measure(ensemble, x, targets, task: str) -> dict[str, np.ndarray]:
    """Per-layer figures [E, depth+1] of one forward and one backward at init."""
    ensemble.train()  # as the first training step sees the network (dropout, batch statistics)
    out = ensemble(x, shared_input=True, record=True, keep_hidden=True)
    tiny = torch.finfo(out["logits"].dtype).tiny
    # mean over examples of log ||x_l||: per-example norms, so one large example cannot hide the rest
    log_norms = [h.detach().norm(dim=-1).clamp_min(tiny).log().mean(-1) for h in out["hidden"] + [out["logits"]]]
    loss, _ = task_loss(task, out["logits"], targets.expand(ensemble.size, *targets.shape))
    loss.sum().backward()  # the sum over draws: each draw's gradient is its own loss's
    grads = [ensemble.params[name].grad for name in ensemble.skeleton.weight_param_names()]
    figures = {
        "act_mean": out["act_mean"], "act_std": out["act_std"],
        "act_log_norm": torch.stack(log_norms, 1),
        "grad_norm": torch.stack([g.flatten(1).norm(dim=1) for g in grads], 1),
    }
    figures.update({k: v for k, v in out.items() if k not in ("logits", "hidden", "act_mean", "act_std")})
    return {k: v.detach().double().cpu().numpy() for k, v in figures.items()}


def jacobian_singular_values(ensemble, x: torch.Tensor) -> np.ndarray:
    """Singular values of d logits / d input, per draw and example: [E, examples, min(out, in)].
    In eval mode: the Jacobian of the deterministic map (no dropout noise, no batch coupling)."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in ensemble.params.items()}
    skeleton = ensemble.skeleton

    def logits(p, b, example):
        return functional_call(skeleton, (p, b), (example[None],))["logits"][0]

    skeleton.eval()
    try:
        per_example = vmap(jacrev(logits, argnums=2), in_dims=(None, None, 0))
        jac = vmap(per_example, in_dims=(0, 0, None))(params, ensemble.buffers, x[:JACOBIAN_EXAMPLES])
    finally:
        skeleton.train()
    jac = jac.double()
    finite = torch.isfinite(jac).flatten(2).all(-1)  # an overflowed net has no singular values to report
    values = torch.linalg.svdvals(torch.where(finite[..., None, None], jac, torch.zeros_like(jac)))
    return values.masked_fill(~finite[..., None], float("nan")).cpu().numpy()


def spread(values) -> dict:
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "median": None}
    return {"mean": float(finite.mean()), "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
            "min": float(finite.min()), "max": float(finite.max()), "median": float(np.median(finite))}


def layer_growth_rate(log_norms: np.ndarray) -> np.ndarray:
    """Least-squares slope of log ||x_l|| against l over x_1..x_depth (the span of the square
    layers), per draw: the measured Lyapunov exponent, nats per layer."""
    depth = log_norms.shape[1] - 1  # the last column is the output layer
    if depth < 2:
        return np.full(len(log_norms), np.nan)
    y = log_norms[:, :depth]
    l = np.arange(1, depth + 1, dtype=float)
    centred = l - l.mean()
    return ((y - y.mean(1, keepdims=True)) * centred).sum(1) / (centred ** 2).sum()


def run(cfg, out_dir: Path) -> dict:
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    method = methods.create(cfg.method)
    x, targets, task, n_outputs, source = probe_batch(cfg, device)
    depth = method.stages(cfg.depth, cfg.epochs)[-1].depth  # a staged method's final network
    shape = Shape(x.shape[1], n_outputs, depth, cfg.width, task)
    seeds = list(range(cfg.seed, cfg.seed + cfg.probe.networks))
    chunk = draws_per_chunk(shape, len(x), len(seeds), device)

    per_layer: dict[str, list] = {}
    singular_values, constants = [], None
    for start in range(0, len(seeds), chunk):
        ensemble = build_ensemble(method, shape, seeds[start:start + chunk], device)
        if constants is None:
            with torch.no_grad():
                constants = method.constants(ensemble.member(0, device))
        for key, value in measure(ensemble, x, targets, task).items():
            per_layer.setdefault(key, []).append(value)
        if cfg.width <= JACOBIAN_MAX_WIDTH:
            # beyond rank min(width, inputs, outputs) the singular values are 0 up to rounding
            rank = min(cfg.width, x.shape[1], n_outputs)
            singular_values.append(jacobian_singular_values(ensemble, x)[..., :rank])
        del ensemble
    per_layer = {k: np.concatenate(v) for k, v in per_layer.items()}  # [networks, depth+1]

    n_layers = depth + 1
    kinds = np.array(["input"] + ["hidden"] * (n_layers - 2) + ["output"])
    E = len(seeds)
    frame = pd.DataFrame({
        "network": np.repeat(np.arange(E), n_layers), "seed": np.repeat(seeds, n_layers),
        "layer": np.tile(np.arange(1, n_layers + 1), E), "kind": np.tile(kinds, E),
        **{k: v.reshape(-1) for k, v in per_layer.items()},
    })
    frame = frame.reindex(columns=LAYER_COLUMNS + [c for c in frame.columns if c not in LAYER_COLUMNS])
    write_csv(out_dir / "probe_layers.csv", frame)

    with np.errstate(all="ignore"):  # an overflowed net gives inf/NaN figures, reported as null
        rates = layer_growth_rate(per_layer["act_log_norm"])
        ratios = grad_norm_ratio(per_layer["grad_norm"], depth)
    finite_rates = rates[np.isfinite(rates)]
    summary = {
        "schema_version": stabbench.SCHEMA_VERSION,
        "method": cfg.method.name, "dataset": cfg.dataset.name, "depth": depth, "width": cfg.width,
        "networks": E, "seeds": seeds, "batch_size": len(x), "inputs": source,
        "constants": constants,
        "lyapunov_exponent": {
            "mean": float(finite_rates.mean()) if finite_rates.size else None,
            "se": float(finite_rates.std(ddof=1) / math.sqrt(finite_rates.size)) if finite_rates.size > 1 else None,
            "per_network": rates.tolist(),
            "layers": f"x_1..x_{depth}",
        },
        "grad_norm_ratio": {**spread(ratios), "per_network": ratios.tolist(), "layers": f"2..{depth}"},
        "act_std_last_hidden": spread(per_layer["act_std"][:, depth - 1]),
        "jacobian_singular_values": None,
    }
    if singular_values:
        sv = np.concatenate(singular_values)  # [E, examples, k]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_sv = np.log(sv)
            condition = sv.max(-1) / sv.min(-1)
        summary["jacobian_singular_values"] = {
            "of": "d logits / d input, eval mode", "examples_per_network": int(sv.shape[1]),
            "values_per_example": int(sv.shape[2]),
            **spread(sv.reshape(-1)),
            "mean_log": float(np.mean(log_sv)) if np.isfinite(log_sv).all() else None,
            "condition_number": spread(condition.reshape(-1)),
        }
    summary.update({"wall_time_s": round(time.perf_counter() - started, 3), "device": str(device),
                    "torch_version": torch.__version__, "config": OmegaConf.to_container(cfg, resolve=True)})
    summary = finite_or_none(summary)
    write_json(out_dir / "probe.json", summary)
    plot(per_layer, summary, out_dir / "probe.png")
    print_table(summary, out_dir)
    return summary


def plot(per_layer: dict[str, np.ndarray], summary: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.arange(1, per_layer["act_std"].shape[1] + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, key, label in ((axes[0], "act_std", "activation std"), (axes[1], "grad_norm", "weight-gradient norm")):
        values = np.where(per_layer[key] > 0, per_layer[key], np.nan)  # log axis: zeros and NaN drop out
        for row in values:
            ax.plot(layers, row, color="tab:blue", alpha=0.25, linewidth=0.8)
        with np.errstate(all="ignore"):
            ax.plot(layers, np.exp(np.nanmedian(np.log(values), 0)), color="black", linewidth=1.6,
                    label=f"median of {len(values)} draws")
        ax.set_yscale("log")
        ax.set_xlabel("layer (1 = input layer, last = output layer)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    exponent, ratio = summary["lyapunov_exponent"], summary["grad_norm_ratio"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}"
    axes[0].set_title(f"forward: growth {fmt(exponent['mean'])} ± {fmt(exponent['se'])} nats/layer", fontsize=10)
    axes[1].set_title(f"backward: grad-norm max/min over hidden layers {fmt(ratio['median'])} (median)", fontsize=10)
    fig.suptitle(f"{summary['method']} at init, depth {summary['depth']}, width {summary['width']}, "
                 f"{summary['dataset']} ({summary['inputs']})", fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def print_table(summary: dict, out_dir: Path) -> None:
    from rich.table import Table

    from stabbench.progress import console

    fmt = lambda v: "-" if v is None else f"{v:.4g}"
    table = Table(title=f"probe: {summary['method']} at init, depth {summary['depth']}, width {summary['width']}, "
                        f"{summary['networks']} draws", title_justify="left")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    exponent, ratio, std = summary["lyapunov_exponent"], summary["grad_norm_ratio"], summary["act_std_last_hidden"]
    table.add_row("growth of log ||x_l|| per layer", f"{fmt(exponent['mean'])} ± {fmt(exponent['se'])}")
    table.add_row("grad-norm max/min, hidden layers", f"median {fmt(ratio['median'])}  [{fmt(ratio['min'])}, {fmt(ratio['max'])}]")
    table.add_row("activation std, last hidden layer", f"median {fmt(std['median'])}  [{fmt(std['min'])}, {fmt(std['max'])}]")
    if summary["jacobian_singular_values"]:
        sv = summary["jacobian_singular_values"]
        table.add_row("Jacobian singular values", f"mean {fmt(sv['mean'])}  [{fmt(sv['min'])}, {fmt(sv['max'])}]")
    for key, value in (summary["constants"] or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            table.add_row(key, fmt(value))
        elif isinstance(value, (str, bool)):
            table.add_row(key, str(value))
    table.add_row("time", f"{summary['wall_time_s']:.1f} s on {summary['device']}")
    console.print(table)
    print(f"wrote {out_dir}", flush=True)
