"""`stabbench probe`: signal propagation at initialisation, no training. See docs/probe.md.

Builds `probe.networks` draws of the network exactly as `stabbench run` would (seeds
seed .. seed+n-1, one batched model), pushes one batch forward (the dataset's, or
standard-normal inputs for the synthetic datasets) and an error backward (the loss's, or
with probe.error=gaussian a standard-normal one at the last hidden layer), renormalised
layer by layer so that no figure underflows at any depth, and writes probe_layers.csv,
probe.json and probe.png (and after a sweep, probe_sweep.png). The method is reached only through
its interface (build, constants, mean_field), so the probe works for every method. The
comparisons with mean-field theory live in probe_theory.py.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

import stabbench
from stabbench import datasets, devices, memory, methods, probe_theory
from stabbench.methods.base import Shape
from stabbench.outputs import atomic_write_bytes, finite_or_none, write_csv, write_json
from stabbench.train import build_ensemble, grad_norm_ratio, task_loss

LAYER_COLUMNS = ["network", "seed", "layer", "kind", "act_mean", "act_std", "act_log_norm", "grad_norm",
                 "log_grad_norm", "homogeneous"]
ERRORS = ("loss", "gaussian")  # probe.error: what is backpropagated (docs/probe.md, "The error signal")
HOMOGENEITY_ROWS = 8  # examples the homogeneity check of a layer runs on
# At or below this width `propagate` runs single-threaded: its layer-by-layer kernels are then
# tiny, and two threads on a busy 2-core CPU wait for each other (measured: a width-2 layer's
# forward and two gradients 15.6 ms with 2 threads, 0.55 ms with 1).
SMALL_WIDTH = 128
JACOBIAN_MAX_WIDTH = 64
JACOBIAN_EXAMPLES = 16  # per draw
MEMORY_BUDGET_CPU = 2 << 30  # bytes for one chunk of draws (weights, grads, saved activations)


def probe_batch(cfg, device: torch.device):
    """(x [B, F], targets, task, n_outputs, source, error): one fixed batch, drawn from cfg.seed;
    error is the N(0, I) error [B, width] at the last hidden layer (probe.error=gaussian), else None."""
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
    # drawn after the batch, so the batch is the same in both modes; independent of every draw's forward
    error = torch.randn(len(x), cfg.width, generator=generator) if cfg.probe.error == "gaussian" else None
    return (x.to(device), targets.to(device), data.task, data.n_outputs, source,
            None if error is None else error.to(device))


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


def measure(ensemble, x) -> dict[str, np.ndarray]:
    """The float32 forward as the first training step sees it (train mode: dropout, batch
    statistics): act_mean, act_std, weight_norm and a method's own diagnostics, [E, depth+1].
    The ensemble is left as built: batch norm's running statistics are put back."""
    initial = {name: tensor.clone() for name, tensor in ensemble.buffers.items()}
    ensemble.train()
    with torch.no_grad():
        out = ensemble(x, shared_input=True, record=True)
        for name, tensor in ensemble.buffers.items():
            tensor.copy_(initial[name])
    return {k: v.double().cpu().numpy() for k, v in out.items() if k != "logits"}


def _layer_map(model, index: int):
    """x_{l-1} -> x_l as the network computes it: layer, then (hidden layers) activation and dropout."""
    layer, hidden = model.layers[index], index < len(model.layers) - 1

    def apply(x):
        y = layer(x)
        if hidden:
            y = model.activation(y)
            if model.dropout is not None:
                y = model.dropout(y)
        return y

    return apply


def _positively_homogeneous(apply, x: torch.Tensor) -> bool:
    """Whether apply(c x) = c apply(x) for every c > 0 and example, checked on a few rows at
    c = 2 and 1/2 (scalings by a power of two are exact in floating point): a bias-free
    (or zero-bias) linear layer with relu, leaky relu or no activation. Then the layer can
    be applied to the renormalised signal and its scale carried alongside, exactly. Tanh,
    biases, GPN's shift, batch norm (scale-invariant, not homogeneous) and dropout (a fresh
    mask per call) all fail it."""
    rows = x[:HOMOGENEITY_ROWS]
    c = torch.where(torch.arange(len(rows), device=x.device) % 2 == 0, 2.0, 0.5).to(x.dtype)[:, None]
    plain, scaled = apply(rows), apply(c * rows)
    return torch.allclose(scaled, c * plain, rtol=1e-9, atol=1e-12 * float(plain.abs().max().clamp_min(1e-300)))


def _unit_rows(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y / ||y_i||, log ||y_i||) per example (row); a zero row stays zero, its log-norm -inf."""
    norm = y.norm(dim=-1)
    return torch.where(norm[:, None] > 0, y / norm.clamp_min(torch.finfo(y.dtype).tiny)[:, None], 0.0), norm.log()


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextlib.contextmanager
def _threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def propagate(model, x: torch.Tensor, targets: torch.Tensor, task: str, error: torch.Tensor | None) -> dict:
    """One draw's forward and backward at init, in float64, with the signal renormalised after
    every layer and its log-scale carried separately, so that nothing underflows or overflows
    however deep or narrow the net (a width-2 He net loses ~1.4 nats a layer: float32 is gone
    by layer 60, float64 by layer 500).

    Forward: each example is x_l = exp(s_l) u_l with ||u_l|| = 1. A positively homogeneous
    layer map (see _positively_homogeneous) is applied to u_l, and s_{l+1} = s_l + log ||f(u_l)||:
    exact. Any other layer is applied to the true input exp(s_l) u_l, as the network does.
    Backward: the error at the layer's output is exp(t) v with ||v||_F = 1 over the batch (one
    scale for the batch, so batch norm's coupling between examples stays exact); each layer's
    weight gradient is recomputed from its saved input (the same dropout draws: the RNG state
    is restored) and its log Frobenius norm kept. `error` None: the task loss's error through
    the output layer (probe.error=loss); else the given error at the last hidden layer's
    output x_depth, and no output layer (probe.error=gaussian; its gradient is NaN).

    Returns act_log_norm (mean over examples of log ||x_l||; the logits' for the output
    layer), log_grad_norm (log ||dE/dW_l||_F) and homogeneous (1 where the layer was applied
    to the renormalised signal), each [depth+1]."""
    device = x.device
    model = model.double()
    weights = [model.get_parameter(name) for name in model.weight_param_names()]
    n_layers = len(model.layers)
    unit, log_scale = _unit_rows(model.map_input(x.double()))
    saved, log_norms, homogeneous = [], [], []
    with torch.no_grad():
        for index in range(n_layers):
            apply = _layer_map(model, index)
            scaled = _positively_homogeneous(apply, unit)
            if scaled:
                inputs, input_scale = unit, log_scale
            else:
                inputs, input_scale = unit * log_scale.exp()[:, None], torch.zeros_like(log_scale)
            state = _rng_state(device)
            unit, output_log_norm = _unit_rows(apply(inputs))
            log_scale = input_scale + output_log_norm
            saved.append((inputs, input_scale, state))
            log_norms.append(log_scale.mean())
            homogeneous.append(float(scaled))
    after_forward = _rng_state(device)  # the backward replays earlier draws: the next draw must not

    log_grad = torch.full((n_layers,), float("nan"), dtype=torch.float64)
    if error is None:
        logits = (unit * log_scale.exp()[:, None]).requires_grad_()  # the true logits: they set the error
        loss, _ = task_loss(task, logits[None], targets[None])
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        last = n_layers - 1
    else:
        grad, last = error.double(), n_layers - 2
    norm = grad.norm()
    direction, grad_scale = grad / norm, norm.log()
    for index in range(last, -1, -1):
        inputs, input_scale, state = saved[index]
        _set_rng_state(state, device)
        inputs = inputs.detach().requires_grad_(index > 0)
        with torch.enable_grad():
            out = _layer_map(model, index)(inputs)
            # dW sums exp(s_i) J_W(u_i)^T v_i over examples: weight each by exp(s_i - max s) in (0, 1]
            top = input_scale.max()
            if index > 0:
                (grad_input,) = torch.autograd.grad(out, inputs, direction, retain_graph=True)
            (grad_weight,) = torch.autograd.grad(out, weights[index], direction * (input_scale - top).exp()[:, None])
        log_grad[index] = grad_scale + top + grad_weight.norm().log()
        if index > 0:
            norm = grad_input.norm()
            direction, grad_scale = grad_input / norm, grad_scale + norm.log()
    _set_rng_state(after_forward, device)
    return {"act_log_norm": torch.stack(log_norms).numpy(), "log_grad_norm": log_grad.detach().numpy(),
            "homogeneous": np.array(homogeneous)}


def jacobian_singular_values(ensemble, x: torch.Tensor) -> np.ndarray:
    """Singular values of d logits / d input, per draw and example: [E, examples, min(out, in)].
    The map at initialisation: eval mode (no dropout noise, no batch coupling) with batch norm's
    running statistics as built, in float64 (a narrow deep net's Jacobian is far below float32's range)."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach().double() for k, v in ensemble.params.items()}
    buffers = {k: v.double() if v.is_floating_point() else v for k, v in ensemble.buffers.items()}
    skeleton = ensemble.skeleton

    def logits(p, b, example):
        return functional_call(skeleton, (p, b), (example[None],))["logits"][0]

    skeleton.eval()
    try:
        per_example = vmap(jacrev(logits, argnums=2), in_dims=(None, None, 0))
        jac = vmap(per_example, in_dims=(0, 0, None))(params, buffers, x[:JACOBIAN_EXAMPLES].double())
    finally:
        skeleton.train()
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
    device = devices.resolve(cfg.device)
    method = methods.create(cfg.method)
    x, targets, task, n_outputs, source, error = probe_batch(cfg, device)
    depth = method.stages(cfg.depth, cfg.epochs)[-1].depth  # a staged method's final network
    shape = Shape(x.shape[1], n_outputs, depth, cfg.width, task)
    seeds = list(range(cfg.seed, cfg.seed + cfg.probe.networks))
    chunk = draws_per_chunk(shape, len(x), len(seeds), device)

    spec = method.mean_field(shape)
    per_layer: dict[str, list] = {}
    singular_values, constants = [], None
    pre_activations: dict[str, list] = {}
    deep_singular_values = []
    for start in range(0, len(seeds), chunk):
        ensemble = build_ensemble(method, shape, seeds[start:start + chunk], device)
        mode_note = probe_theory.eval_mode_note(ensemble)  # what eval mode changes in the Jacobians
        if constants is None:
            with torch.no_grad():
                first = ensemble.member(0, device)
                constants = method.constants(first)
                activation = first.activation  # the network's own phi: the theory's
                del first
        # the Jacobians first, in eval mode: every forward in training mode below moves batch norm's
        # running statistics, and the Jacobians are of the network as built
        if cfg.probe.jacobian_examples and depth >= 2 and start < probe_theory.JACOBIAN_DRAWS:
            deep_singular_values.append(probe_theory.deep_jacobian_singular_values(
                ensemble, x, cfg.probe.jacobian_examples, device, draws=probe_theory.JACOBIAN_DRAWS - start))
        if cfg.width <= JACOBIAN_MAX_WIDTH:
            # beyond rank min(width, inputs, outputs) the singular values are 0 up to rounding
            rank = min(cfg.width, x.shape[1], n_outputs)
            singular_values.append(jacobian_singular_values(ensemble, x)[..., :rank])
        for key, value in probe_theory.pre_activation_stats(ensemble, x, device).items():
            pre_activations.setdefault(key, []).append(value)
        for key, value in measure(ensemble, x).items():
            per_layer.setdefault(key, []).append(value)
        with _threads(1 if cfg.width <= SMALL_WIDTH and device.type == "cpu" else torch.get_num_threads()):
            propagated = [propagate(ensemble.member(k, device), x, targets, task, error) for k in range(ensemble.size)]
        for key in propagated[0]:
            per_layer.setdefault(key, []).append(np.stack([p[key] for p in propagated]))
        del ensemble
    per_layer = {k: np.concatenate(v) for k, v in per_layer.items()}  # [networks, depth+1]
    with np.errstate(over="ignore", under="ignore"):
        per_layer["grad_norm"] = np.exp(per_layer["log_grad_norm"])  # 0 or inf beyond float64: the log is the figure
    pre_activations = {k: np.concatenate(v) for k, v in pre_activations.items()}  # q [E, depth], c [E, pairs, depth]
    mean_field_block, curves = probe_theory.mean_field_block(spec, activation, x, pre_activations)
    hidden_columns = {"q": pre_activations["q"], "c": pre_activations["c"].mean(1)}
    hidden_columns.update({k: np.broadcast_to(v, pre_activations["q"].shape) for k, v in curves.items()})
    for key, value in hidden_columns.items():  # hidden layers only: NaN on the output layer's row
        per_layer[key] = np.concatenate([value, np.full((len(value), 1), np.nan)], 1)

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
        # from the logs, each draw's largest first: the ratio is right whatever the norms' scale
        log_grad = per_layer["log_grad_norm"]
        ratios = grad_norm_ratio(np.exp(log_grad - np.nanmax(log_grad, 1, keepdims=True)), depth)
    finite_rates = rates[np.isfinite(rates)]
    summary = {
        "schema_version": stabbench.SCHEMA_VERSION,
        "method": cfg.method.name, "dataset": cfg.dataset.name, "depth": depth, "width": cfg.width,
        "networks": E, "seeds": seeds, "batch_size": len(x), "inputs": source, "error": cfg.probe.error,
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
        "mean_field": mean_field_block,
        "deep_jacobian": None,
    }
    if deep_singular_values:
        deep_sv = np.concatenate(deep_singular_values)  # [draws, examples, width]
        summary["deep_jacobian"] = probe_theory.deep_jacobian_block(deep_sv, mean_field_block, spec, activation, x, depth,
                                                                    mode_note)
    else:
        deep_sv = None
    if singular_values:
        sv = np.concatenate(singular_values)  # [E, examples, k]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_sv = np.log(sv)
            condition = sv.max(-1) / sv.min(-1)
        summary["jacobian_singular_values"] = {
            "of": "d logits / d input, eval mode" + mode_note, "examples_per_network": int(sv.shape[1]),
            "values_per_example": int(sv.shape[2]),
            **spread(sv.reshape(-1)),
            "mean_log": float(np.mean(log_sv)) if np.isfinite(log_sv).all() else None,
            "condition_number": spread(condition.reshape(-1)),
        }
    summary.update({"wall_time_s": round(time.perf_counter() - started, 3), "device": str(device),
                    "torch_version": torch.__version__, "config": OmegaConf.to_container(cfg, resolve=True)})
    summary = finite_or_none(summary)
    write_json(out_dir / "probe.json", summary)
    plot(per_layer, summary, out_dir / "probe.png", deep_sv)
    print_table(summary, out_dir)
    return summary


def plot(per_layer: dict[str, np.ndarray], summary: dict, path: Path, deep_sv: np.ndarray | None = None) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.arange(1, per_layer["act_log_norm"].shape[1] + 1)
    fig, grid = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    axes = grid[0]
    # log10 of the renormalised figures on a linear axis: right at any depth, where the
    # values themselves would be 0 or inf (a width-2 He net reaches 10^-370 by layer 600)
    panels = ((axes[0], "act_log_norm", "log10 ||x_l||, mean over examples"),
              (axes[1], "log_grad_norm", "log10 ||dE/dW_l||_F"))
    for ax, key, label in panels:
        values = per_layer[key] / math.log(10)
        values = np.where(np.isfinite(values), values, np.nan)
        for row in values:
            ax.plot(layers, row, color="tab:blue", alpha=0.25, linewidth=0.8)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a layer without the figure (gaussian: the output)
            ax.plot(layers, np.nanmedian(values, 0), color="black", linewidth=1.6,
                    label=f"median of {len(values)} draws")
        ax.set_xlabel("layer (1 = input layer, last = output layer)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    exponent, ratio = summary["lyapunov_exponent"], summary["grad_norm_ratio"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}"
    axes[0].set_title(f"forward: growth {fmt(exponent['mean'])} ± {fmt(exponent['se'])} nats/layer", fontsize=10)
    axes[1].set_title(f"backward: grad-norm max/min over hidden layers {fmt(ratio['median'])} (median)", fontsize=10)
    probe_theory.plot_mean_field(grid[1, 0], per_layer, summary["mean_field"])
    probe_theory.plot_deep_jacobian(grid[1, 1], deep_sv, summary["deep_jacobian"])
    fig.suptitle(f"{summary['method']} at init, depth {summary['depth']}, width {summary['width']}, "
                 f"{summary['dataset']} ({summary['inputs']}), error: {summary['error']}", fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def print_table(summary: dict, out_dir: Path) -> None:
    from rich.table import Table

    from stabbench.progress import plus_minus, print_rich_table

    fmt = lambda v: "-" if v is None else f"{v:.4g}"
    table = Table(title=f"probe: {summary['method']} at init, depth {summary['depth']}, width {summary['width']}, "
                        f"{summary['networks']} draws", title_justify="left")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    exponent, ratio, std = summary["lyapunov_exponent"], summary["grad_norm_ratio"], summary["act_std_last_hidden"]
    table.add_row("growth of log ||x_l|| per layer", f"{fmt(exponent['mean'])} {plus_minus()} {fmt(exponent['se'])}")
    table.add_row("grad-norm max/min, hidden layers", f"median {fmt(ratio['median'])}  [{fmt(ratio['min'])}, {fmt(ratio['max'])}]")
    table.add_row("activation std, last hidden layer", f"median {fmt(std['median'])}  [{fmt(std['min'])}, {fmt(std['max'])}]")
    if summary["jacobian_singular_values"]:
        sv = summary["jacobian_singular_values"]
        table.add_row("Jacobian singular values", f"mean {fmt(sv['mean'])}  [{fmt(sv['min'])}, {fmt(sv['max'])}]")
    for label, value in probe_theory.table_rows(summary["mean_field"], summary["deep_jacobian"], summary["depth"]):
        table.add_row(label, value)
    for key, value in (summary["constants"] or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            table.add_row(key, fmt(value))
        elif isinstance(value, (str, bool)):
            table.add_row(key, str(value))
    table.add_row("time", f"{summary['wall_time_s']:.1f} s on {summary['device']}")
    print_rich_table(table)
    print(f"wrote {out_dir}", flush=True)
