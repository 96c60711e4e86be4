"""`stabbench bench`: how much faster than the loop a user would otherwise write.

Times, in one process, on the same shape, device and method:
- reference: the tutorial way — a DataLoader over CPU tensors, one eager nn.Module per
  seed, an optimiser step per batch, the same diagnostics at log steps (per-layer
  activation statistics and gradient norms via torch._foreach_norm), and the test split
  evaluated at the end of every epoch, as the runner does;
- stabbench: the runner's own training loop (train.Run.train_stage) with `seeds` seeds as
  one batched model, CUDA graphs per `trainer.cuda_graph`.
Each measurement trains N and 2N steps and takes the difference, so set-up, warm-up,
compilation/capture and the end-of-run evaluation cancel; the median over
`bench.repeats` is reported as ms per step per model, with the ratio reference / stabbench.
"""
from __future__ import annotations

import gc
import math
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

from stabbench import datasets, fast, methods, train
from stabbench.checkpoint import Preemption
from stabbench.methods.base import Shape, Stage
from stabbench.outputs import write_json
from stabbench.progress import console


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


def reference_loop(cfg, method, data: datasets.Data, shape: Shape, device: torch.device, steps: int) -> float:
    """Seconds for `steps` steps of the tutorial loop, one model: the method's own network,
    computed by torch's own kernels layer by layer, as a user's nn.Linear + torch.tanh loop
    would be (fast.torch_kernels_only: numpy's activations and fast.plain_mlp are stabbench's
    tricks, so what they buy counts on its side of the ratio)."""
    torch.manual_seed(cfg.seed)
    model = method.build(shape).to(device)
    optimizer = train.make_optimizer(cfg, list(model.parameters()), fused=False)  # torch.optim defaults
    weights, weight_names = dict(model.named_parameters()), model.weight_param_names()  # the trained matrices
    cpu = TensorDataset(data.x_train.cpu(), data.y_train.cpu())
    loader = DataLoader(cpu, batch_size=min(cfg.batch_size, len(cpu)), shuffle=True, drop_last=True)
    test_loader = DataLoader(TensorDataset(data.x_test.cpu(), data.y_test.cpu()), batch_size=cfg.trainer.eval_batch_size)
    batches = iter(())
    settle(device)
    start = time.perf_counter()
    with fast.torch_kernels_only():
        for step in range(steps):
            try:
                x, y = next(batches)
            except StopIteration:
                if step:  # an epoch ended: the test split, as the runner evaluates it
                    test_epoch(model, test_loader, data.task, device)
                batches = iter(loader)
                x, y = next(batches)
            x, y = x.to(device), y.to(device)
            record = step % cfg.log_every == 0
            out = model(x, record=record)
            loss = F.cross_entropy(out["logits"], y) if data.task == "classification" else F.mse_loss(out["logits"], y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if record:
                grad_norms = torch._foreach_norm([weights[name].grad for name in weight_names])
                _ = [float(g) for g in grad_norms] + [float(out["act_std"].detach().sum())]  # a user prints these
            optimizer.step()
            loss.item()  # the tutorial's running-loss print: one sync per step
    sync(device)
    return time.perf_counter() - start


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
    """Seconds for `steps` steps of stabbench's own loop (all seeds together). The seeds'
    networks are drawn once (32 seeds at depth 200 take ~10 s on the CPU) and reset to
    that draw before each measurement."""

    def __init__(self, cfg, out_dir: Path):
        self.cfg, self.out_dir = cfg.copy(), out_dir
        with open_dict(self.cfg):
            self.cfg.checkpoint_every = 0
        run = train.Run(self.cfg, out_dir)
        self.stage = Stage(depth=cfg.depth, epochs=max(cfg.epochs, 10_000))
        self.ensemble = train.build_ensemble(run.method, run.shape(self.stage), run.seeds, run.device)
        self.initial = {name: tensor.clone() for name, tensor in self.ensemble.state_dict().items()}

    def __call__(self, steps: int) -> float:
        with open_dict(self.cfg):
            self.cfg.max_steps = steps
        run = train.Run(self.cfg, self.out_dir)
        self.ensemble.load_state_dict(self.initial)
        settle(run.device)
        start = time.perf_counter()
        with Preemption() as preemption:
            run.train_stage(self.stage, self.ensemble, None, [], preemption)
        sync(run.device)
        return time.perf_counter() - start


def per_step(measures: dict, steps: int, repeats: int, min_seconds: float,
             epoch_steps: int | None = None) -> dict[str, tuple[float, int, list[float]]]:
    """For each named `measure(n) -> seconds`: the median seconds per step, the N used and
    every repeat's figure, from (time of 2N steps - time of N steps) / N, so set-up cancels.

    N is at least `steps`, and enough that the difference itself lasts `min_seconds`: on an
    H100 the runner's 20 steps at 8 seeds take ~0.4 s, about what graph capture and
    allocation vary by (20-step figures ranged from 12x to 35x). Once 2N reaches the end of
    an epoch (`epoch_steps`), N is rounded up to whole epochs, so that every difference holds
    the same share of the epoch-end test evaluation: with N = 51 of a 64-step epoch the 2N
    run held one evaluation more than the N run, with N = 30 none, and the runner's figure
    moved by 0.4 ms per model with nothing else changed. The loops take turns, one pair each
    per repeat, so a slow spell of a shared machine (the 2-core development VM's reference
    loop drifted from 6.3 to 10.5 ms per step within a minute) hits both alike."""
    def pair(measure, n: int) -> float:
        short, long = measure(n), measure(2 * n)
        # With very few steps, noise can outweigh the difference: then the plain average it is.
        return (long - short) / n if long > short else long / (2 * n)

    def whole_epochs(n: int) -> int:
        return math.ceil(n / epoch_steps) * epoch_steps if epoch_steps and 2 * n >= epoch_steps else n

    sizes, samples = {}, {}
    for name, measure in measures.items():
        measure(2)  # warm-up: first-call costs (allocator, kernels, imports)
        sizes[name] = whole_epochs(steps)
        while True:
            sample = pair(measure, sizes[name])
            needed = whole_epochs(math.ceil(round(min_seconds / sample, 6)))  # 50.0000001 steps is 50
            if needed <= sizes[name]:
                samples[name] = [sample]
                break
            sizes[name] = needed  # that pair only sized N
    for _ in range(repeats - 1):
        for name, measure in measures.items():
            samples[name].append(pair(measure, sizes[name]))
    return {name: (statistics.median(samples[name]), sizes[name], samples[name]) for name in measures}


def run(cfg, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    device = train.resolve_device(cfg.device)
    method = methods.create(cfg.method)
    data = datasets.load(cfg.dataset, device)
    shape = Shape(data.in_features, data.n_outputs, cfg.depth, cfg.width, data.task)
    steps, repeats = cfg.bench.steps, cfg.bench.repeats
    scratch = out_dir / "runner"
    scratch.mkdir(exist_ok=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    measures = {"stabbench": RunnerLoop(cfg, scratch)}
    if cfg.bench.reference:
        measures["reference"] = lambda n: reference_loop(cfg, method, data, shape, device, n)
    epoch_steps = len(data.x_train) // min(cfg.batch_size, len(data.x_train))  # as both loops count an epoch
    timed = per_step(measures, steps, repeats, cfg.bench.min_seconds, epoch_steps)
    stabbench_s, stabbench_steps, stabbench_samples = timed["stabbench"]
    stabbench_s /= cfg.seeds
    reference_s, reference_steps, reference_samples = timed.get("reference", (None, None, None))
    # Each repeat's pair of figures was taken back to back: their ratios show how far the
    # machine's own drift moves the result.
    ratios = None if reference_s is None else [r / (s / cfg.seeds) for r, s in zip(reference_samples, stabbench_samples)]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    result = {
        "shape": {"depth": cfg.depth, "width": cfg.width, "batch_size": cfg.batch_size, "in_features": shape.in_features,
                  "out_features": shape.out_features, "seeds": cfg.seeds, "method": cfg.method.name},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "cuda_graph": cfg.trainer.cuda_graph, "tf32": cfg.trainer.tf32,
        "reference_ms_per_step": None if reference_s is None else round(reference_s * 1e3, 4),
        "stabbench_ms_per_step_per_model": round(stabbench_s * 1e3, 4),
        "ratio": None if reference_s is None else round(reference_s / stabbench_s, 3),
        "ratio_per_repeat": None if ratios is None else [round(r, 3) for r in ratios],
        "peak_memory_bytes": peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "steps": {"stabbench": stabbench_steps, "reference": reference_steps}, "repeats": repeats,
        "torch_version": torch.__version__,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(out_dir / "bench.json", result)
    table = Table(title=f"{cfg.method.name} depth {cfg.depth} width {cfg.width} batch {cfg.batch_size} "
                        f"on {device}, ms per step per model", title_justify="left")
    for column in ("reference (DataLoader, eager, 1 model)", f"stabbench ({cfg.seeds} seeds batched)", "ratio"):
        table.add_column(column, justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    table.add_row(fmt(result["reference_ms_per_step"]), fmt(result["stabbench_ms_per_step_per_model"]),
                  "-" if result["ratio"] is None else f"{result['ratio']:.2f}x")
    console.print(table)
    spread = "" if ratios is None else f" (per repeat {min(ratios):.2f}-{max(ratios):.2f})"
    print(f"ratio {result['ratio']}{spread}  (wrote {out_dir / 'bench.json'})", flush=True)
    return result
