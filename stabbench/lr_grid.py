"""A learning-rate grid trained as one batched model (`lrs=[...]`).

With `lrs` set, a run's members are the (lr, seed) pairs, lr-major: member m = (lrs[m // seeds],
seed + m % seeds), E = len(lrs) x seeds. Each member draws its network and its data order as
a single run with that seed does (train.build_ensemble, train.Run.train_stage), so the
ensemble trains exactly what `len(lrs) x seeds` separate runs would; only the learning rate
differs between members. Without `lrs` every member has `lr` and nothing here runs: the step
is exactly the plain one.

One optimiser steps all members' stacked tensors, and torch's optimisers take one scalar lr,
so the optimiser runs at lr = 1 and each member's own lr enters in one of two exact ways:
- `gradient` (SGD without weight decay): member k's objective is weighted by lr_k, so its
  gradients come out as lr_k g_k. SGD's momentum buffer is linear in the gradients and does
  not involve lr (buf = mu buf + g; p -= lr buf), so the buffer is lr_k times the member's own
  and p -= 1 * buf is the member's own update. Free: one multiply of an [E] vector.
- `update` (Adam, or SGD with weight decay): Adam's update is not linear in g (eps), and
  weight decay would be scaled by lr_k along with the gradient, so there the optimiser steps
  on the true gradients at lr = 1 and each member's parameter change is then scaled by lr_k:
  p <- p_before + lr_k (p_after - p_before). Both optimisers' updates are lr times an
  lr-free step, so this is exact too; it costs a copy and a lerp over the parameters.
The per-layer gradient norms a log step records stay the true gradients': under `gradient`
they are divided by lr_k.
"""
from __future__ import annotations

import math

import torch

from stabbench.errors import UserError


def members(cfg) -> tuple[list[int], list[float]]:
    """(seed, lr) of every member of the run, lr-major."""
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    lrs = [float(lr) for lr in cfg.lrs] if cfg.lrs is not None else [float(cfg.lr)]
    return [seed for _ in lrs for seed in seeds], [lr for lr in lrs for _ in seeds]


def validate(cfg) -> None:
    """`lrs`: unset, or a non-empty list of distinct finite positive numbers, not combined with an
    explicit `lr` override (a batched grid ignores `lr`; `-m lr=...` next to it would train
    the same grid once per value of lr, each labelled with an lr it did not use)."""
    from omegaconf import OmegaConf

    lrs = cfg.lrs
    if lrs is None:
        return
    if len(lrs) == 0:
        raise UserError("lrs=[] is empty; give one or more learning rates, e.g. 'lrs=[1e-3,1e-2]', or lrs=null")
    for lr in lrs:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise UserError(f"lrs contains {lr!r}; every learning rate must be a finite number > 0")
    if len(set(map(float, lrs))) < len(lrs):
        raise UserError(f"lrs={list(lrs)} repeats a learning rate; each must appear once")
    task = OmegaConf.select(cfg, "hydra.overrides.task", default=None) or []
    given = [o for o in task if o.split("=", 1)[0].lstrip("+~") == "lr"]
    if given:
        raise UserError(f"{given[0]} contradicts lrs={list(lrs)}: with lrs set, each member's learning rate "
                        f"comes from lrs; drop the lr override, or set lrs=null to sweep lr as separate runs")


class PerMemberLR:
    """Member k steps with learning rate lrs[k] under one optimiser run at lr = 1 (see the module's text)."""

    def __init__(self, cfg, lrs: list[float], params: list[torch.Tensor], device: torch.device):
        self.scheme = "gradient" if cfg.optimizer.name == "sgd" and cfg.optimizer.weight_decay == 0 else "update"
        self.lrs = torch.tensor(lrs, dtype=params[0].dtype, device=device)
        self.params = params
        # lr_k shaped to broadcast over each stacked parameter [E, ...]
        self.per_param = [self.lrs.view(-1, *([1] * (p.ndim - 1))) for p in params]
        self.before = [torch.empty_like(p) for p in params] if self.scheme == "update" else None

    def objective(self, objective: torch.Tensor) -> torch.Tensor:
        """What to backpropagate for the per-member objectives [E]."""
        return objective * self.lrs if self.scheme == "gradient" else objective

    def grad_norms(self, norms: torch.Tensor) -> torch.Tensor:
        """The true gradients' norms from the backpropagated ones, [E, layers]."""
        return norms / self.lrs[:, None] if self.scheme == "gradient" else norms

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scheme == "gradient":
            optimizer.step()
            return
        torch._foreach_copy_(self.before, self.params)
        optimizer.step()
        torch._foreach_lerp_(self.before, self.params, self.per_param)  # before + lr_k (after - before)
        torch._foreach_copy_(self.params, self.before)


def optimizer_lr(cfg) -> float:
    """The lr the optimiser itself runs at: 1 under a grid (PerMemberLR scales), else `lr`."""
    return 1.0 if cfg.lrs is not None else cfg.lr
