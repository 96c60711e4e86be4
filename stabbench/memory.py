"""What a run, a probe or a bench needs in memory, estimated from the config before
anything is allocated, and a refusal, in one line, of what cannot fit on the device.

The estimate counts, for every member (seed) trained at once: the parameters, their
gradients, the optimiser's state (SGD with momentum one buffer a parameter, Adam two),
and the activations a training step saves for its backward pass; once: the dataset on
the device (and, on the CPU, the raw copy it is standardised from). A staged method's
guided stage adds its frozen guide. The network is counted as a plain MLP with biases,
which every method's network is, give or take a vector a layer.

An estimate can miss (allocator slack, a method's extra buffers): an allocation that still
fails is reported in one line by the command line (`is_out_of_memory`, app.job).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from stabbench.errors import UserError

FLOAT = 4  # bytes: every tensor of a run is float32
# [batch, width] tensors per layer and member that a training step holds at its peak: the
# layer's input and pre-activation saved for backward, the hidden state kept for the
# diagnostics at a log step, the gradient in flight. Calibrated against the peak RSS of
# CPU runs (docs/robustness.md): 3.2 measured for tanh, 3.7 for SELU.
SAVED_PER_LAYER = 4
GUIDED_EXTRA_PER_LAYER = 6  # a guided stage's student and guide keep their hidden states for the hint losses (SAL: ~10 in all)


@dataclass
class Estimate:
    parts: dict[str, int] = field(default_factory=dict)  # bytes, by what holds them
    members: int = 1

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {size(b)}" for name, b in self.parts.items() if b)
        return f"about {size(self.total)} ({parts}; {self.members} network{'s' if self.members != 1 else ''} at once)"


def size(n_bytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes / 1e3:.3g} kB"


def parameters(in_features: int, out_features: int, depth: int, width: int) -> int:
    """Weights and biases of an MLP with `depth` hidden layers of `width`."""
    return (in_features + 1) * width + (depth - 1) * (width + 1) * width + (width + 1) * out_features


def optimizer_buffers(cfg) -> int:
    """State tensors the optimiser keeps per parameter tensor."""
    if cfg.optimizer.name == "adam":
        return 2  # first and second moments
    return 1 if cfg.optimizer.momentum else 0


def data_bytes(dims, device_type: str) -> int:
    n = dims.n_train + dims.n_test
    targets = n * (dims.n_outputs * FLOAT if dims.task == "regression" else 8)
    copies = 2 if device_type == "cpu" else 1  # on the CPU the raw split and its standardised copy
    return copies * (n * dims.in_features * FLOAT + targets) + dims.loader_floats * FLOAT


def training(cfg, device_type: str, members: int | None = None) -> Estimate:
    """A run's peak: the stage that needs most."""
    from stabbench import datasets, lr_grid, methods

    dims = datasets.dimensions(cfg.dataset)
    members = len(lr_grid.members(cfg)[0]) if members is None else members  # seeds x lrs
    batch = min(cfg.batch_size, dims.n_train)
    eval_batch = min(cfg.trainer.eval_batch_size, dims.n_test)
    best, previous_depth = None, None
    for stage in methods.create(cfg.method).stages(cfg.depth, cfg.epochs):
        params = parameters(dims.in_features, dims.n_outputs, stage.depth, cfg.width)
        guide = parameters(dims.in_features, dims.n_outputs, previous_depth, cfg.width) if stage.guided else 0
        per_layer = SAVED_PER_LAYER + (GUIDED_EXTRA_PER_LAYER if stage.guided else 0)
        step = batch * cfg.width * (stage.depth + 1) * per_layer
        evaluation = 2 * eval_batch * max(cfg.width, dims.n_outputs)
        estimate = Estimate({
            "parameters": FLOAT * members * params,
            "gradients": FLOAT * members * params,
            "optimiser state": FLOAT * members * params * optimizer_buffers(cfg),
            "guide": FLOAT * members * guide,
            "saved activations": FLOAT * members * max(step, evaluation),
            "data": data_bytes(dims, device_type),
        }, members)
        if best is None or estimate.total > best.total:
            best = estimate
        previous_depth = stage.depth
    return best


def probe_draw(in_features: int, out_features: int, depth: int, width: int, batch: int) -> int:
    """Bytes for one draw of the probe: weights, their gradients and the saved activations
    (plus the gradient buffers of a backward pass)."""
    params = parameters(in_features, out_features, depth, width)
    return FLOAT * (3 * params + 4 * (depth + 1) * batch * width)


def probing(cfg, device_type: str) -> Estimate:
    """The probe holds as many draws at once as fit (probe.draws_per_chunk): one must fit."""
    from stabbench import datasets, methods

    dims = datasets.dimensions(cfg.dataset)
    depth = methods.create(cfg.method).stages(cfg.depth, cfg.epochs)[-1].depth
    synthetic_inputs = cfg.dataset.name.startswith("synthetic")  # probe.probe_batch draws its own batch
    batch = cfg.probe.batch_size if synthetic_inputs else min(cfg.probe.batch_size, dims.n_train)
    return Estimate({"one draw (parameters, gradients, saved activations)":
                     probe_draw(dims.in_features, dims.n_outputs, depth, cfg.width, batch),
                     "probe batch": FLOAT * batch * dims.in_features,
                     "data": data_bytes(dims, "cpu")}, 1)


def benching(cfg, device_type: str) -> Estimate:
    """The bench trains `seeds` members and the reference's one, and keeps a copy of the
    members' initial weights to reset them between turns."""
    from stabbench import datasets, lr_grid

    n = len(lr_grid.members(cfg)[0])  # seeds x lrs
    estimate = training(cfg, device_type, members=n + 1)
    dims = datasets.dimensions(cfg.dataset)
    estimate.parts["initial weights"] = FLOAT * n * parameters(dims.in_features, dims.n_outputs, cfg.depth,
                                                                       cfg.width)
    return estimate


def available(device_type: str) -> tuple[int, str] | None:
    """(bytes free for this process, what they are) on the device, or None if unknowable."""
    if device_type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return free, f"{size(free)} free of {size(total)} on {torch.cuda.get_device_name()}"
    free = _meminfo_available()
    if free is None:
        return None
    limit = _cgroup_room()
    if limit is not None and limit < free:
        return limit, f"{size(limit)} left under this container's memory limit"
    return free, f"{size(free)} of RAM available"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """cgroup v2: memory.max - memory.current of this process's group, if it has a limit."""
    try:
        group = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        folder = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((folder / "memory.current").read_text()))
    except (OSError, ValueError, IndexError):
        return None


def device_type(cfg) -> str:
    from stabbench import devices

    return devices.device_type(cfg.device)


def check_fits(cfg, need, what: str) -> None:
    """Raise UserError if `need(cfg, device type)` is more than the device has free.
    Under a launcher that runs jobs elsewhere (SLURM) the submitting machine's memory says
    nothing: the job checks again on its node, where app.job validates once more."""
    from omegaconf import OmegaConf

    launcher = str(OmegaConf.select(cfg, "hydra.launcher._target_", default="") or "")
    if "Slurm" in launcher:
        return
    kind = device_type(cfg)
    room = available(kind)
    if room is None:
        return
    estimate = need(cfg, kind)
    if estimate.total > room[0]:
        raise UserError(f"{what} needs {estimate.describe()}, but the {kind} has {room[1]}; "
                        f"make it smaller (width, depth, seeds, batch_size, dataset size) or use another device")


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def out_of_memory_message(error: BaseException) -> str:
    """One line for an allocation that failed in spite of the estimate."""
    import re

    text = " ".join(str(error).split())
    wanted = re.search(r"(?:tried to allocate|Tried to allocate) ([0-9.]+ ?[KMGT]?i?B|\d+ bytes)", text)
    amount = f" (an allocation of {wanted.group(1)})" if wanted else ""
    return (f"out of memory{amount}: {type(error).__name__}; the run is too large for the memory free now; "
            f"make it smaller (width, depth, seeds, batch_size) or free memory, then type the same command again")
