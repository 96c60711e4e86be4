"""The training loop: `stabbench run`. Reads top to bottom.

One run trains `seeds` networks (seed, seed+1, ...) as one batched model (ensemble.py), for
each learning rate of `lrs` if it is set (lr_grid.py: members are (lr, seed) pairs),
through each of the method's stages (one, unless the method is staged like SAL), and
writes metrics.csv, layers.csv and summary.json into the run directory. The method is
called only through its interface (methods/base.py); this file knows no method by name.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.func import vmap

import stabbench
from stabbench import checkpoint, datasets, devices, fast, lr_grid, methods
from stabbench.ensemble import Ensemble
from stabbench.errors import UserError
from stabbench.methods.base import Shape, Stage
from stabbench.outputs import RunRecorder, finite_or_none, write_json
from stabbench.progress import TrainingProgress, print_rich_table


def build_ensemble(method, shape: Shape, seeds: list[int], device: torch.device) -> Ensemble:
    """Each seed's network drawn exactly as a single run with that seed would draw it (a seed
    listed again, as in an lr grid's members, is drawn once: the stacking copies it)."""
    drawn = {}
    for seed in dict.fromkeys(seeds):
        torch.manual_seed(seed)
        drawn[seed] = method.build(shape).to(device)
    return Ensemble([drawn[seed] for seed in seeds])


def make_optimizer(cfg, params: list[torch.Tensor], capturable: bool = False, fused: bool = True) -> torch.optim.Optimizer:
    """capturable: Adam keeps its step count on the device, as a CUDA graph needs. fused: SGD
    updates each tensor in one kernel instead of three passes over (param, grad, momentum):
    at depth 200, width 500, 8 seeds on an H100 25.9 -> 23.9 ms per step; on the CPU it
    also replaces torch's per-tensor Python loop. The bench's reference loop passes False."""
    opt = cfg.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=lr_grid.optimizer_lr(cfg), momentum=opt.momentum, nesterov=opt.nesterov,
                               weight_decay=opt.weight_decay, fused=fused or None)
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=lr_grid.optimizer_lr(cfg), betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
                                capturable=capturable)
    raise UserError(f"optimizer={opt.name!r} is unknown; choose one of: sgd, adam")


def task_loss(task: str, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-member mean loss and accuracy over a batch: logits [E, B, C] -> [E]. A member whose
    loss is not finite (some logit NaN or infinite) has accuracy NaN: argmax of NaN logits is
    class 0, a made-up score."""
    if task == "classification":
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape).mean(-1)
        acc = (logits.argmax(-1) == targets).float().mean(-1)
        return loss, torch.where(torch.isfinite(loss), acc, float("nan"))
    return (logits - targets).pow(2).flatten(1).mean(-1), None


@dataclass
class StageResult:
    steps: int = 0
    epochs: int = 0
    train_loss: list = field(default_factory=list)  # per member, mean over the last epoch's steps
    test_loss: list = field(default_factory=list)
    test_acc: list | None = field(default_factory=list)
    val_loss: list | None = field(default_factory=list)  # None: no validation split
    val_acc: list | None = field(default_factory=list)
    diverged_step: list = field(default_factory=list)  # per member, -1 if it never diverged
    exploded_step: list = field(default_factory=list)  # per member: the log step from which it stayed exploded; -1 not
    grad_norm_ratio_init: list = field(default_factory=list)
    grad_norm_ratio_final: list = field(default_factory=list)
    flops: int = 0  # per member that trained every step
    member_steps: list = field(default_factory=list)  # per member: steps trained before it stopped (diverged)
    member_epochs: list = field(default_factory=list)


@dataclass
class LoopState:
    """Everything the loop carries from step to step: what a checkpoint saves."""
    size: int
    device: torch.device
    step: int = 0
    epoch: int = 0
    batch_index: int = 0  # next batch within the epoch
    order_states: list = field(default_factory=list)  # data-order generators at the epoch's start
    since_log: int = 0
    epoch_steps: int = 0

    def __post_init__(self):
        E, device = self.size, self.device
        # Running sums stay on the device and reach the host only at log steps (no per-step sync).
        self.loss_sum = torch.zeros(E, device=device)
        self.acc_sum = torch.zeros(E, device=device)
        self.epoch_loss_sum = torch.zeros(E, device=device)
        self.term_sums: dict[str, torch.Tensor] = {}  # a guided stage's extra loss terms, by name
        self.diverged_at = torch.full((E,), -1, dtype=torch.long, device=device)
        self.alive = np.ones(E, dtype=bool)
        self.stopped = np.full((2, E), -1)  # per member: (steps, epochs) when its divergence stopped it; -1 never
        self.first_ratio = np.full(E, np.nan)
        self.last_ratio = np.full(E, np.nan)
        self.initial_loss = np.full(E, np.nan)  # the first log step's train loss: what "exploded" is measured against
        self.exploded_at = np.full(E, -1)
        self.result = StageResult()

    TENSORS = ("loss_sum", "acc_sum", "epoch_loss_sum", "diverged_at")
    ARRAYS = ("alive", "first_ratio", "last_ratio", "stopped", "initial_loss", "exploded_at")
    NUMBERS = ("step", "epoch", "batch_index", "since_log", "epoch_steps")

    def state_dict(self) -> dict:
        state = {k: getattr(self, k) for k in self.NUMBERS + self.TENSORS}
        state.update({k: torch.from_numpy(getattr(self, k).copy()) for k in self.ARRAYS})
        state.update(order_states=self.order_states, term_sums=self.term_sums, result=asdict(self.result))
        return state

    def load_state_dict(self, state: dict) -> None:
        for k in self.NUMBERS:
            setattr(self, k, state[k])
        for k in self.TENSORS:
            setattr(self, k, state[k].to(self.device))
        for k in self.ARRAYS:
            if k in state:  # a checkpoint of an older version lacks the newer arrays: they start afresh
                setattr(self, k, state[k].numpy())
        self.order_states = state["order_states"]
        self.term_sums = {k: v.to(self.device) for k, v in state["term_sums"].items()}
        self.result = StageResult(**state["result"])


def matmul_weights(ensemble: Ensemble) -> int:
    """Weights of one member that take part in matrix products (the FLOP count's unit)."""
    return sum(p[0].numel() for p in ensemble.params.values() if p.ndim == 3)


def grad_norm_ratio(grad_norms: np.ndarray, depth: int) -> np.ndarray:
    """max/min gradient norm over the square hidden layers (2..depth), per member; the BSNN
    paper's figure of merit. Layer 1 is left out: its shape (width x inputs) differs. With
    fewer than two square layers (depth 1 or 2) the ratio says nothing: NaN (null)."""
    if depth < 3:
        return np.full(len(grad_norms), np.nan)
    square = grad_norms[:, 1:depth]
    with np.errstate(divide="ignore", invalid="ignore"):
        return square.max(1) / square.min(1)


def exploded_now(loss: np.ndarray, initial: np.ndarray, hidden_grads: np.ndarray, factor: float) -> np.ndarray:
    """Per member, whether training has blown up without a NaN: the train loss beyond `factor`
    times its initial value, or saturated (every hidden layer's gradient exactly 0) with the
    loss no lower than at the start, so nothing below the output can learn any more."""
    with np.errstate(invalid="ignore"):
        blown = np.abs(loss) > factor * np.abs(initial)
        saturated = (hidden_grads == 0).all(1) & (loss >= initial) if hidden_grads.shape[1] else False
    return np.asarray(blown | saturated)


def forget_diverged(result: StageResult, state: LoopState) -> None:
    """A diverged member's figures are null, whether or not other members survived it: every
    per-member metric (a StageResult field named *_loss or *_acc), and its steps and epochs are
    those it trained before its divergence stopped it, as a run of that seed alone reports."""
    diverged = state.diverged_at.cpu().numpy() >= 0
    for name in (f.name for f in fields(StageResult) if f.name.endswith(("_loss", "_acc"))):
        values = getattr(result, name)
        if values is not None:
            setattr(result, name, [float("nan") if gone else v for v, gone in zip(values, diverged)])
    stopped = state.stopped >= 0
    result.member_steps = np.where(stopped[0], state.stopped[0], state.step).tolist()
    result.member_epochs = np.where(stopped[1], state.stopped[1], state.epoch).tolist()


@torch.no_grad()
def evaluate(ensemble: Ensemble, data: datasets.Data, batch_size: int, split: str = "test"
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-member mean loss and accuracy over the `split` split ("test" or "val"); a member whose
    logits are not all finite (diverged) has accuracy NaN, not the share of class 0 that argmax
    of NaN gives."""
    x_all, y_all = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    ensemble.eval()
    loss_sum = torch.zeros(ensemble.size, device=x_all.device)
    correct = torch.zeros_like(loss_sum)
    finite = torch.ones(ensemble.size, dtype=torch.bool, device=x_all.device)
    for start in range(0, len(x_all), batch_size):
        x, y = x_all[start:start + batch_size], y_all[start:start + batch_size]
        logits = ensemble(x, shared_input=True)["logits"]
        targets = y.expand(ensemble.size, *y.shape)
        loss, acc = task_loss(data.task, logits, targets)
        loss_sum += loss * len(x)
        finite &= torch.isfinite(logits).flatten(1).all(1)
        if acc is not None:
            correct += acc * len(x)
    ensemble.train()
    n = len(x_all)
    acc = torch.where(finite, correct / n, float("nan"))
    return (loss_sum / n).cpu().numpy(), acc.cpu().numpy() if data.task == "classification" else None


def make_train_step(method, stage: Stage, ensemble: Ensemble, guide: Ensemble | None, optimizer,
                    data: datasets.Data, weight_names: list[str], member_lr: lr_grid.PerMemberLR | None = None):
    """One optimiser step on the batch `index` [E, B] of the training split: gather, forward,
    loss, backward, diagnostics, update. Device tensors in and out, no host sync, so the
    whole step can be captured as one CUDA graph (fast.py). member_lr: each member's own
    learning rate (an lr grid); None: the optimiser's lr for all."""
    task = data.task

    def train_step(index: torch.Tensor, record: bool) -> dict[str, torch.Tensor]:
        x, y = data.x_train[index], data.y_train[index]  # [E, B, F], [E, B]
        out = ensemble(x, record=record, keep_hidden=guide is not None)
        loss, acc = task_loss(task, out["logits"], y)
        objective, terms = loss, {}
        if guide is not None:
            with torch.no_grad():
                guide_out = guide(x, keep_hidden=True)
            terms = vmap(lambda s, g: method.guidance_losses(s, g, stage), randomness="different")(out, guide_out)
            objective = objective + sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        (objective if member_lr is None else member_lr.objective(objective)).sum().backward()
        step = {"loss": loss.detach(), "objective": objective.detach(), "terms": {k: v.detach() for k, v in terms.items()}}
        if acc is not None:
            step["acc"] = acc
        if record:
            # One fused norm over every (layer, seed) slice; views, no copies.
            grads = [ensemble.params[name].grad for name in weight_names]
            norms = torch.stack(torch._foreach_norm([g[k] for g in grads for k in range(ensemble.size)]))
            norms = norms.view(len(grads), ensemble.size).T
            step["layers"] = {"grad_norm": norms if member_lr is None else member_lr.grad_norms(norms),
                              **{k: v.detach() for k, v in out.items() if k not in ("logits", "hidden")}}
        if member_lr is None:
            optimizer.step()
        else:
            member_lr.step(optimizer)
        return step

    return train_step


@dataclass
class LoopHooks:
    """Named points of the training loop for code outside it (the bench's clock; later a
    tracker), instead of patching the loop's methods. Each list's callables run in order:
    `on_log(step)` right after a log step's rows are recorded (the host has read the device
    back there); `before_epoch_end()` and `after_epoch_end()` around an epoch's end (the
    evaluations, the files, a checkpoint)."""
    on_log: list = field(default_factory=list)
    before_epoch_end: list = field(default_factory=list)
    after_epoch_end: list = field(default_factory=list)


class Run:
    """What stays fixed across a run's stages: config, data, method, members, output files.
    Member k has seed seeds[k] and learning rate lrs[k] (lr_grid.members)."""

    def __init__(self, cfg, out_dir: Path):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.started = time.perf_counter()
        self.device = devices.resolve(cfg.device)
        fast.set_tf32(cfg.trainer.tf32)
        self.method = methods.create(cfg.method)
        self.data = datasets.load(cfg.dataset, self.device)
        self.seeds, self.lrs = lr_grid.members(cfg)
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.recorder = RunRecorder(self.out_dir)
        self.checkpoint_path = self.out_dir / checkpoint.FILENAME
        self.hooks = LoopHooks()

    def shape(self, stage: Stage) -> Shape:
        return Shape(self.data.in_features, self.data.n_outputs, stage.depth, self.cfg.width, self.data.task)

    def save_checkpoint(self, stage, ensemble, guide, optimizer, state: LoopState, finished: list) -> None:
        self.recorder.flush()
        checkpoint.save(self.checkpoint_path, {
            "config_key": checkpoint.config_key(self.config), "config": self.config,
            "stage": stage.index, "finished": [asdict(r) for _, r in finished],
            "ensemble": ensemble.state_dict(), "guide": guide.state_dict() if guide is not None else None,
            "optimizer": optimizer.state_dict(), "loop": state.state_dict(),
            "rng": torch.get_rng_state(), "rows": self.recorder.row_counts(), "digests": self.recorder.digests(),
        })

    def train_stage(self, stage: Stage, ensemble: Ensemble, guide: Ensemble | None, finished: list,
                    preemption: checkpoint.Preemption, resume: dict | None = None) -> StageResult:
        cfg, data, E = self.cfg, self.data, ensemble.size
        n_train = len(data.x_train)
        batch_size = min(cfg.batch_size, n_train)  # a tiny data-scarce split still trains
        steps_per_epoch = n_train // batch_size  # drop the ragged last batch: static shapes
        total_steps = stage.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total_steps = min(total_steps, cfg.max_steps)
        optimizer = make_optimizer(cfg, ensemble.parameters(), capturable=fast.graphs_enabled(cfg.trainer.cuda_graph,
                                                                                              self.device))
        member_lr = lr_grid.PerMemberLR(cfg, self.lrs, ensemble.parameters(), self.device) if cfg.lrs is not None else None
        weight_names = ensemble.skeleton.weight_param_names()
        n_layers = len(weight_names)
        kinds = np.array(["input"] + ["hidden"] * (n_layers - 2) + ["output"]) if n_layers > 1 else np.array(["output"])
        orders = [torch.Generator().manual_seed(seed * 1_000_003 + stage.index) for seed in self.seeds]
        train_step = fast.maybe_graphed(make_train_step(self.method, stage, ensemble, guide, optimizer, data,
                                                        weight_names, member_lr), cfg.trainer.cuda_graph, self.device)
        state = LoopState(E, self.device)
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            state.load_state_dict(resume["loop"])
            torch.set_rng_state(resume["rng"])
            for g, saved in zip(orders, state.order_states):
                g.set_state(saved)  # resumed at an epoch's first step, the loop below reads its start from here
        resumed_at = state.step
        progress = TrainingProgress(f"{cfg.method.name} d{stage.depth} w{cfg.width}"
                                    + (f" stage {stage.index}" if stage.index else ""), total_steps)
        ensemble.train()
        while state.step < total_steps and state.alive.any():
            if state.batch_index == 0:
                state.order_states = [g.get_state() for g in orders]
                state.epoch_loss_sum.zero_()
                state.epoch_steps = 0
            for g, saved in zip(orders, state.order_states):
                g.set_state(saved)  # the same epoch order whether started here or resumed mid-epoch
            order = torch.stack([torch.randperm(n_train, generator=g) for g in orders]).to(self.device)  # [E, n]
            while state.batch_index < steps_per_epoch and state.step < total_steps:
                step = state.step
                periodic = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                if step != resumed_at and (periodic or preemption.requested):
                    self.save_checkpoint(stage, ensemble, guide, optimizer, state, finished)
                    if preemption.requested:
                        progress.close()
                        preemption.hand_over(f" ({self.out_dir}, stage {stage.index}, step {step})")
                record = step % cfg.log_every == 0 or step == total_steps - 1
                index = order[:, state.batch_index * batch_size:(state.batch_index + 1) * batch_size]
                out = train_step(index, record)

                state.loss_sum += out["loss"]
                state.epoch_loss_sum += out["loss"]
                if "acc" in out:
                    state.acc_sum += out["acc"]
                for name, value in out["terms"].items():
                    state.term_sums[name] = state.term_sums.get(name, 0) + value
                state.diverged_at = torch.where(~torch.isfinite(out["objective"]) & (state.diverged_at < 0), step,
                                                state.diverged_at)
                state.since_log += 1
                state.epoch_steps += 1
                state.batch_index += 1
                state.step += 1
                if record:
                    self.log_step(stage, state, step, out, kinds, progress)
                    for hook in self.hooks.on_log:
                        hook(step)
                    if not state.alive.any():
                        break
            for hook in self.hooks.before_epoch_end:
                hook()
            self.end_epoch(stage, ensemble, state)
            for hook in self.hooks.after_epoch_end:
                hook()
        progress.close()

        result = state.result
        result.steps, result.epochs = state.step, state.epoch
        result.diverged_step = state.diverged_at.cpu().tolist()
        result.exploded_step = state.exploded_at.tolist()
        result.grad_norm_ratio_init, result.grad_norm_ratio_final = state.first_ratio.tolist(), state.last_ratio.tolist()
        # Training compute: forward + backward ~ 6 FLOP per weight per example; a guide adds its forward (2).
        examples = state.step * batch_size
        result.flops = 6 * matmul_weights(ensemble) * examples + (2 * matmul_weights(guide) * examples if guide else 0)
        if not result.test_loss:  # every member diverged before the first evaluation
            result.test_loss = [float("nan")] * E
            result.test_acc = None if data.task == "regression" else [float("nan")] * E
            result.train_loss = [float("nan")] * E
            if data.x_val is not None:
                result.val_loss, result.val_acc = result.test_loss, result.test_acc
        if data.x_val is None:
            result.val_loss = result.val_acc = None
        forget_diverged(result, state)
        return result

    def log_step(self, stage: Stage, state: LoopState, step: int, out: dict, kinds: np.ndarray, progress) -> None:
        """A log step's rows: one train row per live seed in metrics.csv, one row per layer in layers.csv."""
        seeds, lrs, n_layers = np.array(self.seeds), np.array(self.lrs), len(kinds)
        now = round(time.perf_counter() - self.started, 3)
        mean_loss = (state.loss_sum / state.since_log).cpu().numpy()
        mean_acc = (state.acc_sum / state.since_log).cpu().numpy() if "acc" in out else None
        mean_terms = {name: (value / state.since_log).cpu().numpy() for name, value in state.term_sums.items()}
        diverged = state.diverged_at.cpu().numpy() >= 0
        alive = state.alive  # a member's rows stop after the log step that saw it diverge
        for k in np.flatnonzero(alive):
            self.recorder.metrics(step=step, epoch=state.epoch, stage=stage.index, seed=int(seeds[k]),
                                  lr=float(lrs[k]), split="train",
                                  loss=float(mean_loss[k]), acc=None if mean_acc is None else float(mean_acc[k]),
                                  time_s=now, **{name: float(value[k]) for name, value in mean_terms.items()})
        layer_stats = {k: v.cpu().numpy() for k, v in out["layers"].items()}
        self.recorder.layers(pd.DataFrame({
            "step": step, "epoch": state.epoch, "stage": stage.index,
            "seed": np.repeat(seeds[alive], n_layers), "lr": np.repeat(lrs[alive], n_layers),
            "layer": np.tile(np.arange(1, n_layers + 1), alive.sum()),
            "kind": np.tile(kinds, alive.sum()),
            **{k: v[alive].reshape(-1) for k, v in layer_stats.items()},
        }))
        ratio = grad_norm_ratio(layer_stats["grad_norm"], stage.depth)
        if step == 0:
            state.first_ratio = ratio
            state.initial_loss = mean_loss.astype(float)
        state.last_ratio = np.where(alive & ~diverged, ratio, state.last_ratio)
        live = alive & ~diverged
        bad = exploded_now(mean_loss, state.initial_loss, layer_stats["grad_norm"][:, kinds == "hidden"],
                           self.cfg.explode_factor)
        state.exploded_at = np.where(live, np.where(bad, np.where(state.exploded_at >= 0, state.exploded_at, step), -1),
                                     state.exploded_at)
        state.stopped[:, alive & diverged] = [[step + 1], [state.epoch + 1]]  # where a run of it alone stops
        state.alive = alive & ~diverged
        live = state.alive
        progress.update(step + 1, loss=float(mean_loss[live].mean()) if live.any() else float("nan"),
                        acc=float(mean_acc[live].mean()) if mean_acc is not None and live.any() else float("nan"))
        state.loss_sum.zero_()
        state.acc_sum.zero_()
        state.term_sums.clear()
        state.since_log = 0

    def end_epoch(self, stage: Stage, ensemble: Ensemble, state: LoopState) -> None:
        state.epoch += 1
        state.batch_index = 0
        if state.alive.any():
            splits = ("val", "test") if self.data.x_val is not None else ("test",)
            for split in splits:  # both alike; what selects reads only val (tuning.py)
                loss, acc = evaluate(ensemble, self.data, self.cfg.trainer.eval_batch_size, split)
                now = round(time.perf_counter() - self.started, 3)
                for k in np.flatnonzero(state.alive):
                    self.recorder.metrics(step=state.step, epoch=state.epoch, stage=stage.index, seed=self.seeds[k],
                                          lr=self.lrs[k], split=split, loss=float(loss[k]),
                                          acc=None if acc is None else float(acc[k]), time_s=now)
                setattr(state.result, f"{split}_loss", loss.tolist())
                setattr(state.result, f"{split}_acc", None if acc is None else acc.tolist())
            state.result.train_loss = (state.epoch_loss_sum / max(state.epoch_steps, 1)).cpu().tolist()
        self.recorder.flush()


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=5)
        return done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run(cfg, out_dir: Path) -> list[dict]:
    """Train as configured; write the run's files into out_dir; return one summary per seed.
    A directory with a complete run of this config is left as it is (skip_done); one with
    a checkpoint of this config resumes from it."""
    out_dir = Path(out_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    done = checkpoint.check_run_dir(out_dir, config)
    if done is not None and cfg.skip_done:
        print(f"already complete: {out_dir} (skip_done=true; skip_done=false retrains)", flush=True)
        return done
    # A summary stands only beside the records it summarises: a retrain (skip_done=false)
    # removes it first, so a kill mid-retrain leaves a partial run, not a "complete" one.
    (out_dir / "summary.json").unlink(missing_ok=True)
    run = Run(cfg, out_dir)
    resume = checkpoint.load(run.checkpoint_path) if run.checkpoint_path.is_file() else None
    if resume is not None:
        run.recorder.reload(resume["rows"], resume.get("digests"))
        print(f"resuming {out_dir} at stage {resume['stage']}, step {resume['loop'].get('step')}", flush=True)
    try:
        return train_run(run, cfg, out_dir, resume)
    except (KeyError, TypeError, IndexError, RuntimeError) as error:
        if resume is None or isinstance(error, torch.OutOfMemoryError):
            raise
        raise UserError(f"{run.checkpoint_path} does not fit this run ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:120] if str(error) else ''}); delete it to start the run afresh") from None


def train_run(run: "Run", cfg, out_dir: Path, resume: dict | None) -> list[dict]:
    """Every stage of the run, from `resume` if given; then its summary and figures."""
    stages = run.method.stages(cfg.depth, cfg.epochs)
    finished: list[tuple[Stage, StageResult]] = []
    guide = None
    with checkpoint.Preemption() as preemption:
        for stage in stages:
            if resume is not None and stage.index < resume["stage"]:
                finished.append((stage, StageResult(**resume["finished"][stage.index])))
                continue
            ensemble = build_ensemble(run.method, run.shape(stage), run.seeds, run.device)
            stage_resume = None
            if resume is not None and stage.index == resume["stage"]:
                if resume["guide"] is not None:
                    guide = build_ensemble(run.method, run.shape(finished[-1][0]), run.seeds, run.device)
                    guide.load_state_dict(resume["guide"])
                    guide.freeze()
                ensemble.load_state_dict(resume["ensemble"])
                stage_resume, resume = resume, None
            elif guide is not None:
                run.method.warm_start(ensemble, guide, stage)
            result = run.train_stage(stage, ensemble, guide, finished, preemption, stage_resume)
            finished.append((stage, result))
            guide = ensemble.freeze()
    summaries = summarize(run, finished)
    write_json(out_dir / "summary.json", summaries[0] if len(summaries) == 1 else
               {"schema_version": stabbench.SCHEMA_VERSION, "seeds": summaries})
    run.checkpoint_path.unlink(missing_ok=True)  # the run is complete: the summary is what counts now
    print_summary(summaries, out_dir)
    return summaries


def member_extent(result: StageResult, k: int) -> tuple[int, int, int]:
    """(steps, epochs, flops) that member k trained in a stage: fewer than the stage's if it diverged."""
    if not result.member_steps:  # a stage finished before member_steps existed (resumed checkpoint)
        return result.steps, result.epochs, result.flops
    steps = result.member_steps[k]
    return steps, result.member_epochs[k], result.flops * steps // max(result.steps, 1)


def exploded_step(result: StageResult, k: int) -> int | None:
    step = result.exploded_step[k] if result.exploded_step else -1
    return int(step) if step >= 0 and result.diverged_step[k] < 0 else None


def summarize(run: Run, finished: list[tuple[Stage, StageResult]]) -> list[dict]:
    cfg = run.cfg
    final = finished[-1][1]
    summaries = []
    for k, seed in enumerate(run.seeds):
        extents = [member_extent(r, k) for _, r in finished]
        summary = {
            "schema_version": stabbench.SCHEMA_VERSION,
            "method": cfg.method.name, "dataset": cfg.dataset.name, "depth": cfg.depth, "width": cfg.width,
            "seed": seed, "lr": run.lrs[k], "steps": extents[-1][0], "epochs": extents[-1][1],
            "train_loss": final.train_loss[k], "test_loss": final.test_loss[k],
            "test_acc": None if final.test_acc is None else final.test_acc[k],
            "val_loss": None if final.val_loss is None else final.val_loss[k],
            "val_acc": None if final.val_acc is None else final.val_acc[k],
            "diverged": final.diverged_step[k] >= 0,
            "diverged_step": final.diverged_step[k] if final.diverged_step[k] >= 0 else None,
            # exploded: finite but blown up (explode_factor) or saturated at the end; reported like divergence
            "exploded": exploded_step(final, k) is not None,
            "exploded_step": exploded_step(final, k),
            "grad_norm_ratio_init": final.grad_norm_ratio_init[k],
            # a diverged member's last ratio is of the step before its NaN, not of a trained net
            "grad_norm_ratio_final": None if final.diverged_step[k] >= 0 else final.grad_norm_ratio_final[k],
            "total_steps": sum(steps for steps, _, _ in extents),
            "total_flops": sum(flops for _, _, flops in extents),
            "wall_time_s": round(time.perf_counter() - run.started, 3), "device": str(run.device),
            "torch_version": torch.__version__, "git_commit": git_commit(),
            "config": run.config,
        }
        if len(finished) > 1:
            summary["stages"] = [{"stage": s.index, "depth": s.depth, "epochs": epochs, "steps": steps,
                                  "train_loss": r.train_loss[k], "test_loss": r.test_loss[k],
                                  "test_acc": None if r.test_acc is None else r.test_acc[k]}
                                 for (s, r), (steps, epochs, _) in zip(finished, extents)]
        summaries.append(finite_or_none(summary))
    return summaries


def print_summary(summaries: list[dict], out_dir: Path) -> None:
    from rich.table import Table

    table = Table(title=f"{summaries[0]['method']} on {summaries[0]['dataset']}, depth {summaries[0]['depth']}, "
                        f"width {summaries[0]['width']}", title_justify="left")
    grid = len({s["lr"] for s in summaries}) > 1
    val = any(s["val_loss"] is not None for s in summaries)
    val_key = "val_acc" if any(s["val_acc"] is not None for s in summaries) else "val_loss"
    columns = {"lr": grid, "seed": True, "steps": True, "train loss": True, val_key.replace("_", " "): val, "test loss": True,
               "test acc": True, "grad ratio init": True, "grad ratio final": True, "diverged": True,
               "exploded": any(s.get("exploded") for s in summaries)}
    for column, shown in columns.items():
        if shown:
            table.add_column(column, justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.4g}"
    for s in summaries:
        cells = {"lr": f"{s['lr']:g}", "seed": str(s["seed"]), "steps": str(s["steps"]), "train loss": fmt(s["train_loss"]),
                 val_key.replace("_", " "): fmt(s[val_key]),
                 "test loss": fmt(s["test_loss"]), "test acc": fmt(s["test_acc"]),
                 "grad ratio init": fmt(s["grad_norm_ratio_init"]), "grad ratio final": fmt(s["grad_norm_ratio_final"]),
                 "diverged": f"step {s['diverged_step']}" if s["diverged"] else "no",
                 "exploded": f"step {s['exploded_step']}" if s.get("exploded") else "no"}
        table.add_row(*(cells[c] for c, shown in columns.items() if shown))
    print_rich_table(table)
    print(f"wrote {out_dir}", flush=True)
