"""`stabbench bench`: how much faster than the loop a user would otherwise write.

Times, in one process, on the same shape, device and method:
- reference: the tutorial way — a DataLoader over CPU tensors, one eager nn.Module per
  seed, an optimiser step per batch, the running loss and accuracy read back every step
  (the runner's train rows carry both), the same diagnostics at log steps (per-layer
  activation statistics and gradient norms via torch._foreach_norm), and the test split
  evaluated at the end of every epoch, as the runner does;
- stabbench: the runner's own training loop (train.Run.train_stage) with `seeds` seeds as
  one batched model, CUDA graphs per `trainer.cuda_graph`.
The two take turns (`bench.repeats` turns of `bench.steps` steps each). Within a turn, a
loop's clock reads the time at every log step, where both loops wait for the device anyway
(the metrics are read back there): each stretch of `log_every` steps between two log steps
gives one per-step figure. The first stretch of a turn (set-up, warm-up, graph capture) is
left out, as is a shorter last one, and so is the time of any epoch's end inside a stretch: the evaluation of the test
split is timed on its own, once per turn. A loop's ms per step = median stretch + median
evaluation / steps per epoch. Medians of many short stretches, rather than the difference of
two long runs: on the shared 2-core development VM the machine's speed drifts by up to 2x
within seconds, and a difference of two runs doubles such drift (per-repeat ratios ranged
1.3x to 5.5x in one run; with stretches 2.7x to 3.4x).
"""
from __future__ import annotations

import gc
import platform
import resource
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

from stabbench import datasets, devices, fast, lr_grid, methods, train
from stabbench.checkpoint import Preemption
from stabbench.errors import UserError
from stabbench.methods.base import Shape, Stage
from stabbench.outputs import write_json
from stabbench.progress import print_rich_table


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def settle(device: torch.device) -> None:
    """Every measurement starts from the same allocator state: the last one's graphs and
    buffers freed, its memory handed back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sync(device)


class Clock:
    """Per-step seconds of the stretches between a loop's log steps (see the module's text)."""

    def __init__(self, device: torch.device, log_every: int):
        self.device, self.log_every = device, log_every
        self.last: tuple[int, float] | None = None
        self.excluded = 0.0  # seconds of evaluation inside the current stretch
        self.paused = 0.0  # when the current epoch's end began
        self.per_step: list[float] = []

    def mark(self, step: int) -> None:
        """Right after a log step, where the host has waited for the device. Counted: whole
        stretches of log_every steps, each holding one log step, after the first (which holds
        warm-up and graph capture). A run's last step also logs; the shorter stretch before it
        would weigh its log step more, and is left out."""
        now = time.perf_counter()
        if self.last is not None and self.last[0] > 0 and step - self.last[0] == self.log_every:
            self.per_step.append((now - self.last[1] - self.excluded) / self.log_every)
        self.last, self.excluded = (step, now), 0.0

    def pause(self) -> None:
        """Before an epoch's end (the evaluation): its time is not counted in the stretch."""
        sync(self.device)
        self.paused = time.perf_counter()

    def resume(self) -> None:
        sync(self.device)
        self.excluded += time.perf_counter() - self.paused

    def leave_out(self, function, *args) -> None:
        """Run an epoch's end (the evaluation) between pause and resume (the reference loop's)."""
        self.pause()
        function(*args)
        self.resume()


def timed(function, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    function()
    sync(device)
    return time.perf_counter() - start


class ReferenceLoop:
    """The tutorial loop, one model: the method's own network, computed by torch's own
    kernels layer by layer, as a user's nn.Linear + torch.tanh loop would be
    (fast.torch_kernels_only: numpy's activations and fast.plain_mlp are stabbench's tricks,
    so what they buy counts on its side of the ratio)."""

    def __init__(self, cfg, method, data: datasets.Data, shape: Shape, device: torch.device):
        self.cfg, self.method, self.data, self.shape, self.device = cfg, method, data, shape, device
        cpu = TensorDataset(data.x_train.cpu(), data.y_train.cpu())
        self.loader = DataLoader(cpu, batch_size=min(cfg.batch_size, len(cpu)), shuffle=True, drop_last=True)
        self.test_loader = DataLoader(TensorDataset(data.x_test.cpu(), data.y_test.cpu()),
                                      batch_size=cfg.trainer.eval_batch_size)

    def build(self):
        torch.manual_seed(self.cfg.seed)
        return self.method.build(self.shape).to(self.device)

    def __call__(self, steps: int) -> list[float]:
        """Train a fresh model `steps` steps; the clock's per-step stretches."""
        cfg, data, device = self.cfg, self.data, self.device
        model = self.build()
        optimizer = train.make_optimizer(cfg, list(model.parameters()), fused=False)  # torch.optim defaults
        weights, weight_names = dict(model.named_parameters()), model.weight_param_names()  # the trained matrices
        clock, batches = Clock(device, cfg.log_every), iter(())
        settle(device)
        with fast.torch_kernels_only():
            for step in range(steps):
                try:
                    x, y = next(batches)
                except StopIteration:
                    if step:  # an epoch ended: the test split, as the runner evaluates it
                        clock.leave_out(test_epoch, model, self.test_loader, data.task, device)
                    batches = iter(self.loader)
                    x, y = next(batches)
                x, y = x.to(device), y.to(device)
                record = step % cfg.log_every == 0 or step == steps - 1
                out = model(x, record=record)
                loss = F.cross_entropy(out["logits"], y) if data.task == "classification" else F.mse_loss(out["logits"], y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if record:
                    grad_norms = torch._foreach_norm([weights[name].grad for name in weight_names])
                    _ = [float(g) for g in grad_norms] + [float(out["act_std"].detach().sum())]  # a user prints these
                optimizer.step()
                loss.item()  # the tutorial's running-loss print: one sync per step
                if data.task == "classification":  # and its running accuracy, as the runner's train rows carry
                    (out["logits"].argmax(1) == y).sum().item()
                if record:
                    clock.mark(step)
        return clock.per_step

    def evaluation(self) -> float:
        """Seconds for one evaluation of the test split."""
        model = self.build()
        with fast.torch_kernels_only():
            return timed(lambda: test_epoch(model, self.test_loader, self.data.task, self.device), self.device)


@torch.no_grad()
def test_epoch(model, loader: DataLoader, task: str, device: torch.device) -> tuple[float, float]:
    """The tutorial's test loop: mean loss and accuracy over the test split."""
    model.eval()
    loss_sum = correct = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)["logits"]
        if task == "classification":
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
        else:
            loss_sum += F.mse_loss(logits, y, reduction="sum").item()
    model.train()
    return loss_sum / len(loader.dataset), correct / len(loader.dataset)


class RunnerLoop:
    """stabbench's own loop (all seeds together). The seeds' networks are drawn once (32
    seeds at depth 200 take ~10 s on the CPU) and reset to that draw before each turn."""

    def __init__(self, cfg, out_dir: Path):
        self.cfg, self.out_dir = cfg.copy(), out_dir
        with open_dict(self.cfg):
            self.cfg.checkpoint_every = 0
        self.run = train.Run(self.cfg, out_dir)
        self.stage = Stage(depth=cfg.depth, epochs=max(cfg.epochs, 10_000))
        self.ensemble = train.build_ensemble(self.run.method, self.run.shape(self.stage), self.run.seeds, self.run.device)
        self.initial = {name: tensor.clone() for name, tensor in self.ensemble.state_dict().items()}

    def __call__(self, steps: int) -> list[float]:
        """Train `steps` steps from the initial draw; the clock's per-step stretches."""
        with open_dict(self.cfg):
            self.cfg.max_steps = steps
        run = train.Run(self.cfg, self.out_dir)
        clock = Clock(run.device, self.cfg.log_every)
        run.hooks.on_log.append(clock.mark)  # the clock reads after the log step's read-back
        run.hooks.before_epoch_end.append(clock.pause)  # an epoch's end (the evaluation) is not counted
        run.hooks.after_epoch_end.append(clock.resume)
        self.ensemble.load_state_dict(self.initial)
        settle(run.device)
        with Preemption() as preemption:
            run.train_stage(self.stage, self.ensemble, None, [], preemption)
        return clock.per_step

    def evaluation(self) -> float:
        """Seconds for one evaluation of the test split, all seeds."""
        run = self.run
        return timed(lambda: train.evaluate(self.ensemble, run.data, self.cfg.trainer.eval_batch_size), run.device)


def take_turns(loops: dict, steps: int, repeats: int) -> dict[str, dict]:
    """Each loop in turn, `repeats` times: `steps` steps, then one evaluation. Per loop: the
    stretches' per-step seconds of each turn, and the evaluations' seconds."""
    timings = {name: {"turns": [], "evaluations": []} for name in loops}
    for name, loop in loops.items():
        loop(2)  # warm-up: first-call costs (allocator, kernels, imports)
        loop.evaluation()
    for _ in range(repeats):
        for name, loop in loops.items():
            timings[name]["turns"].append(loop(steps))
            timings[name]["evaluations"].append(loop.evaluation())
    return timings


def seconds_per_step(timing: dict, epoch_steps: int, turn: int | None = None) -> float:
    """Median stretch (of one turn, or of all) + median evaluation spread over an epoch's steps."""
    stretches = timing["turns"][turn] if turn is not None else [s for t in timing["turns"] for s in t]
    evaluations = [timing["evaluations"][turn]] if turn is not None else timing["evaluations"]
    return statistics.median(stretches) + statistics.median(evaluations) / epoch_steps


def run(cfg, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    steps, repeats = cfg.bench.steps, cfg.bench.repeats
    if steps < 2 * cfg.log_every + 1:
        raise UserError(f"bench.steps={steps} is too few: the bench times the stretches between log steps after "
                        f"the first, so with log_every={cfg.log_every} a turn needs at least {2 * cfg.log_every + 1} steps")
    device = devices.resolve(cfg.device)
    method = methods.create(cfg.method)
    data = datasets.load(cfg.dataset, device)
    shape = Shape(data.in_features, data.n_outputs, cfg.depth, cfg.width, data.task)
    scratch = out_dir / "runner"
    scratch.mkdir(exist_ok=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    try:
        loops = {"stabbench": RunnerLoop(cfg, scratch)}
        if cfg.bench.reference:
            loops["reference"] = ReferenceLoop(cfg, method, data, shape, device)
        timings = take_turns(loops, steps, repeats)
    except BaseException:  # stopped or failed: the runner's scratch files are no result
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    epoch_steps = len(data.x_train) // min(cfg.batch_size, len(data.x_train))  # as both loops count an epoch
    for name, timing in timings.items():
        if not any(timing["turns"]):  # every seed stopped before the second log step of each turn
            raise UserError(f"the bench timed no stretch of the {name} loop: its networks diverged (NaN or inf loss) "
                            f"before step {2 * cfg.log_every}; bench a configuration that trains (lr={cfg.lr})")
    members = len(lr_grid.members(cfg)[0])  # seeds, times the lrs of a grid: each member is one model
    stabbench_s = seconds_per_step(timings["stabbench"], epoch_steps) / members
    reference_s = seconds_per_step(timings["reference"], epoch_steps) if "reference" in timings else None
    # Each turn's pair of figures was taken back to back: their ratios show how far the
    # machine's own drift moves the result.
    ratios = None if reference_s is None else [
        seconds_per_step(timings["reference"], epoch_steps, k) * members / seconds_per_step(timings["stabbench"], epoch_steps, k)
        for k in range(repeats) if timings["reference"]["turns"][k] and timings["stabbench"]["turns"][k]]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    evaluation_ms = {name: round(statistics.median(t["evaluations"]) * 1e3, 3) for name, t in timings.items()}
    result = {
        "shape": {"depth": cfg.depth, "width": cfg.width, "batch_size": cfg.batch_size, "in_features": shape.in_features,
                  "out_features": shape.out_features, "seeds": cfg.seeds, "lrs": None if cfg.lrs is None else list(cfg.lrs),
                  "members": members, "method": cfg.method.name},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "cuda_graph": cfg.trainer.cuda_graph, "tf32": cfg.trainer.tf32,
        "reference_ms_per_step": None if reference_s is None else round(reference_s * 1e3, 4),
        "stabbench_ms_per_step_per_model": round(stabbench_s * 1e3, 4),
        "ratio": None if reference_s is None else round(reference_s / stabbench_s, 3),
        "ratio_per_repeat": None if ratios is None else [round(r, 3) for r in ratios],
        "evaluation_ms": evaluation_ms,  # one evaluation of the test split: the reference's model, all seeds
        "steps_per_epoch": epoch_steps,
        "peak_memory_bytes": peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "steps_per_turn": steps, "repeats": repeats,
        "stretches": {name: sum(len(turn) for turn in t["turns"]) for name, t in timings.items()},
        "torch_version": torch.__version__,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(out_dir / "bench.json", result)
    table = Table(title=f"{cfg.method.name} depth {cfg.depth} width {cfg.width} batch {cfg.batch_size} "
                        f"on {device}, ms per step per model", title_justify="left")
    for column in ("reference (DataLoader, eager, 1 model)", f"stabbench ({cfg.seeds} seeds batched)" if cfg.lrs is None
                   else f"stabbench ({len(cfg.lrs)} lrs x {cfg.seeds} seeds batched)", "ratio"):
        table.add_column(column, justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    table.add_row(fmt(result["reference_ms_per_step"]), fmt(result["stabbench_ms_per_step_per_model"]),
                  "-" if result["ratio"] is None else f"{result['ratio']:.2f}x")
    print_rich_table(table)
    spread = "" if not ratios else f" (per repeat {min(ratios):.2f}-{max(ratios):.2f})"
    print(f"ratio {result['ratio']}{spread}  (wrote {out_dir / 'bench.json'})", flush=True)
    return result
