"""The training loop: `stabbench run`. Reads top to bottom.

One run trains `seeds` networks (seed, seed+1, ...) as one batched model (ensemble.py),
through each of the method's stages (one, unless the method is staged like SAL), and
writes metrics.csv, layers.csv and summary.json into the run directory. The method is
called only through its interface (methods/base.py); this file knows no method by name.
"""
from __future__ import annotations

import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.func import vmap

import stabbench
from stabbench import datasets, methods
from stabbench.ensemble import Ensemble
from stabbench.errors import UserError
from stabbench.methods.base import Shape, Stage
from stabbench.outputs import RunRecorder, write_json
from stabbench.progress import TrainingProgress, console


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available here; use device=cpu or device=auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"device={name!r} is not allowed; choose one of: auto, cpu, cuda")
    return torch.device(name)


def build_ensemble(method, shape: Shape, seeds: list[int], device: torch.device) -> Ensemble:
    """Each seed's network drawn exactly as a single run with that seed would draw it."""
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(method.build(shape).to(device))
    return Ensemble(models)


def make_optimizer(cfg, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=opt.momentum, nesterov=opt.nesterov,
                               weight_decay=opt.weight_decay)
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
    raise UserError(f"optimizer={opt.name!r} is unknown; choose one of: sgd, adam")


def task_loss(task: str, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-member mean loss and accuracy over a batch: logits [E, B, C] -> [E]."""
    if task == "classification":
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape).mean(-1)
        return loss, (logits.argmax(-1) == targets).float().mean(-1)
    return (logits - targets).pow(2).flatten(1).mean(-1), None


@dataclass
class StageResult:
    steps: int = 0
    epochs: int = 0
    train_loss: list = field(default_factory=list)  # per member, mean over the last epoch's steps
    test_loss: list = field(default_factory=list)
    test_acc: list = field(default_factory=list)
    diverged_step: list = field(default_factory=list)  # per member, -1 if it never diverged
    grad_norm_ratio_init: list = field(default_factory=list)
    grad_norm_ratio_final: list = field(default_factory=list)
    flops: int = 0  # per member


def matmul_weights(ensemble: Ensemble) -> int:
    """Weights of one member that take part in matrix products (the FLOP count's unit)."""
    return sum(p[0].numel() for p in ensemble.params.values() if p.ndim == 3)


def grad_norm_ratio(grad_norms: np.ndarray, depth: int) -> np.ndarray:
    """max/min gradient norm over the square hidden layers (2..depth), per member; the BSNN
    paper's figure of merit. Layer 1 is left out: its shape (width x inputs) differs."""
    square = grad_norms[:, 1:depth] if depth >= 2 else grad_norms[:, :1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return square.max(1) / square.min(1)


@torch.no_grad()
def evaluate(ensemble: Ensemble, data: datasets.Data, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    ensemble.eval()
    loss_sum = torch.zeros(ensemble.size, device=data.x_test.device)
    correct = torch.zeros_like(loss_sum)
    for start in range(0, len(data.x_test), batch_size):
        x, y = data.x_test[start:start + batch_size], data.y_test[start:start + batch_size]
        logits = ensemble(x, shared_input=True)["logits"]
        targets = y.expand(ensemble.size, *y.shape)
        loss, acc = task_loss(data.task, logits, targets)
        loss_sum += loss * len(x)
        if acc is not None:
            correct += acc * len(x)
    ensemble.train()
    n = len(data.x_test)
    return (loss_sum / n).cpu().numpy(), (correct / n).cpu().numpy() if data.task == "classification" else None


def train_stage(cfg, method, stage: Stage, ensemble: Ensemble, guide: Ensemble | None, data: datasets.Data,
                seeds: list[int], recorder: RunRecorder, started: float) -> StageResult:
    device = data.x_train.device
    n_train, E = len(data.x_train), ensemble.size
    batch_size = min(cfg.batch_size, n_train)  # a tiny data-scarce split still trains
    steps_per_epoch = n_train // batch_size  # drop the ragged last batch: static shapes
    total_steps = stage.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = make_optimizer(cfg, ensemble.parameters())
    weight_names = ensemble.skeleton.weight_param_names()
    n_layers = len(weight_names)
    kinds = np.array(["input"] + ["hidden"] * (n_layers - 2) + ["output"]) if n_layers > 1 else np.array(["output"])
    orders = [torch.Generator().manual_seed(seed * 1_000_003 + stage.index) for seed in seeds]

    # Running sums live on the device; they reach the host only at log steps (no per-step sync).
    loss_sum = torch.zeros(E, device=device)
    acc_sum = torch.zeros(E, device=device)
    epoch_loss_sum = torch.zeros(E, device=device)
    diverged_at = torch.full((E,), -1, dtype=torch.long, device=device)
    term_sums: dict[str, torch.Tensor] = {}  # guidance loss terms of a guided stage, by name
    since_log = epoch_steps = 0
    alive = np.ones(E, dtype=bool)
    result = StageResult()
    first_ratio = last_ratio = np.full(E, np.nan)
    progress = TrainingProgress(f"{cfg.method.name} d{stage.depth} w{cfg.width}"
                                + (f" stage {stage.index}" if stage.index else ""), total_steps)
    step = epoch = 0
    ensemble.train()
    while step < total_steps and alive.any():
        order = torch.stack([torch.randperm(n_train, generator=g) for g in orders]).to(device)  # [E, n]
        epoch_loss_sum.zero_()
        epoch_steps = 0
        for batch_index in range(steps_per_epoch):
            if step >= total_steps:
                break
            record = step % cfg.log_every == 0 or step == total_steps - 1
            index = order[:, batch_index * batch_size:(batch_index + 1) * batch_size]
            x, y = data.x_train[index], data.y_train[index]  # [E, B, F], [E, B]

            # -- the step: forward, loss, backward, diagnostics, update -------------------
            out = ensemble(x, record=record, keep_hidden=guide is not None)
            loss, acc = task_loss(data.task, out["logits"], y)
            objective = loss
            if guide is not None:
                with torch.no_grad():
                    guide_out = guide(x, keep_hidden=True)
                terms = vmap(lambda s, g: method.guidance_losses(s, g, stage), randomness="different")(out, guide_out)
                objective = objective + sum(terms.values())
                for name, value in terms.items():
                    term_sums[name] = term_sums.get(name, 0) + value.detach()
            optimizer.zero_grad(set_to_none=True)
            objective.sum().backward()
            if record:
                grads = [ensemble.params[name].grad for name in weight_names]
                grad_norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], 1)  # [E, layers]
            optimizer.step()

            loss_sum += loss.detach()
            epoch_loss_sum += loss.detach()
            if acc is not None:
                acc_sum += acc
            diverged_at = torch.where(~torch.isfinite(objective.detach()) & (diverged_at < 0), step, diverged_at)
            since_log += 1
            epoch_steps += 1

            if record:
                now = time.perf_counter() - started
                mean_loss = (loss_sum / since_log).cpu().numpy()
                mean_acc = (acc_sum / since_log).cpu().numpy() if acc is not None else [None] * E
                diverged = diverged_at.cpu().numpy() >= 0
                mean_terms = {name: (value / since_log).cpu().numpy() for name, value in term_sums.items()}
                for k in np.flatnonzero(alive):
                    recorder.metrics(step=step, epoch=epoch, stage=stage.index, seed=seeds[k], split="train",
                                     loss=float(mean_loss[k]),
                                     acc=None if mean_acc[k] is None else float(mean_acc[k]), time_s=round(now, 3),
                                     **{name: float(value[k]) for name, value in mean_terms.items()})
                layer_stats = {"grad_norm": grad_norms, **{k: v for k, v in out.items() if k not in ("logits", "hidden")}}
                layer_stats = {k: v.detach().cpu().numpy() for k, v in layer_stats.items()}
                rows = alive  # a member's rows stop after its divergence
                recorder.layers(pd.DataFrame({
                    "step": step, "epoch": epoch, "stage": stage.index,
                    "seed": np.repeat(np.array(seeds)[rows], n_layers),
                    "layer": np.tile(np.arange(1, n_layers + 1), rows.sum()),
                    "kind": np.tile(kinds, rows.sum()),
                    **{k: v[rows].reshape(-1) for k, v in layer_stats.items()},
                }))
                ratio = grad_norm_ratio(layer_stats["grad_norm"], stage.depth)
                if step == 0:
                    first_ratio = ratio
                last_ratio = np.where(alive & ~diverged, ratio, last_ratio)
                alive &= ~diverged
                progress.update(step + 1, loss=float(np.nanmean(np.where(alive, mean_loss, np.nan)))
                                if alive.any() else float("nan"),
                                acc=float(np.mean(mean_acc[alive])) if acc is not None and alive.any() else float("nan"))
                loss_sum.zero_()
                acc_sum.zero_()
                term_sums.clear()
                since_log = 0
                if not alive.any():
                    break
            step += 1
        epoch += 1
        if alive.any():
            test_loss, test_acc = evaluate(ensemble, data, cfg.trainer.eval_batch_size)
            now = time.perf_counter() - started
            for k in np.flatnonzero(alive):
                recorder.metrics(step=step, epoch=epoch, stage=stage.index, seed=seeds[k], split="test",
                                 loss=float(test_loss[k]), acc=None if test_acc is None else float(test_acc[k]),
                                 time_s=round(now, 3))
            result.test_loss, result.test_acc = test_loss.tolist(), None if test_acc is None else test_acc.tolist()
            result.train_loss = (epoch_loss_sum / max(epoch_steps, 1)).cpu().tolist()
        recorder.flush()
    progress.close()

    result.steps, result.epochs = step, epoch
    # Training compute: forward + backward ~ 6 FLOP per weight per example; a guide adds its forward (2).
    examples = step * batch_size
    result.flops = 6 * matmul_weights(ensemble) * examples + (2 * matmul_weights(guide) * examples if guide else 0)
    result.diverged_step = diverged_at.cpu().tolist()
    result.grad_norm_ratio_init, result.grad_norm_ratio_final = first_ratio.tolist(), last_ratio.tolist()
    if not result.test_loss:  # every member diverged before the first evaluation
        result.test_loss = [float("nan")] * E
        result.test_acc = None if data.task == "regression" else [float("nan")] * E
        result.train_loss = [float("nan")] * E
    return result


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=5)
        return done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run(cfg, out_dir: Path) -> list[dict]:
    """Train as configured; write the run's files into out_dir; return one summary per seed."""
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    method = methods.create(cfg.method)
    data = datasets.load(cfg.dataset, device)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    recorder = RunRecorder(out_dir)
    guide, stage_records, results = None, [], []
    for stage in method.stages(cfg.depth, cfg.epochs):
        shape = Shape(data.in_features, data.n_outputs, stage.depth, cfg.width)
        ensemble = build_ensemble(method, shape, seeds, device)
        if guide is not None:
            method.warm_start(ensemble, guide, stage)
        result = train_stage(cfg, method, stage, ensemble, guide, data, seeds, recorder, started)
        results.append((stage, result))
        guide = ensemble.freeze()

    stage, final = results[-1]
    wall = time.perf_counter() - started
    summaries = []
    for k, seed in enumerate(seeds):
        summary = {
            "schema_version": stabbench.SCHEMA_VERSION,
            "method": cfg.method.name, "dataset": cfg.dataset.name, "depth": cfg.depth, "width": cfg.width,
            "seed": seed, "steps": final.steps, "epochs": final.epochs,
            "train_loss": final.train_loss[k], "test_loss": final.test_loss[k],
            "test_acc": None if final.test_acc is None else final.test_acc[k],
            "diverged": final.diverged_step[k] >= 0,
            "diverged_step": final.diverged_step[k] if final.diverged_step[k] >= 0 else None,
            "grad_norm_ratio_init": final.grad_norm_ratio_init[k],
            "grad_norm_ratio_final": final.grad_norm_ratio_final[k],
            "total_steps": sum(r.steps for _, r in results),
            "total_flops": sum(r.flops for _, r in results),
            "wall_time_s": round(wall, 3), "device": str(device), "torch_version": torch.__version__,
            "git_commit": git_commit(),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        if len(results) > 1:
            summary["stages"] = [{"stage": s.index, "depth": s.depth, "epochs": r.epochs, "steps": r.steps,
                                  "train_loss": r.train_loss[k], "test_loss": r.test_loss[k],
                                  "test_acc": None if r.test_acc is None else r.test_acc[k]} for s, r in results]
        summaries.append(_finite_or_none(summary))
    write_json(out_dir / "summary.json", summaries[0] if len(summaries) == 1 else
               {"schema_version": stabbench.SCHEMA_VERSION, "seeds": summaries})
    print_summary(summaries, out_dir)
    return summaries


def _finite_or_none(value):
    """JSON has no NaN/inf: a diverged figure is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def print_summary(summaries: list[dict], out_dir: Path) -> None:
    from rich.table import Table

    table = Table(title=f"{summaries[0]['method']} on {summaries[0]['dataset']}, depth {summaries[0]['depth']}, "
                        f"width {summaries[0]['width']}", title_justify="left")
    for column in ("seed", "steps", "train loss", "test loss", "test acc", "grad ratio init", "grad ratio final",
                   "diverged"):
        table.add_column(column, justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.4g}"
    for s in summaries:
        table.add_row(str(s["seed"]), str(s["steps"]), fmt(s["train_loss"]), fmt(s["test_loss"]), fmt(s["test_acc"]),
                      fmt(s["grad_norm_ratio_init"]), fmt(s["grad_norm_ratio_final"]),
                      f"step {s['diverged_step']}" if s["diverged"] else "no")
    console.print(table)
    print(f"wrote {out_dir}", flush=True)
