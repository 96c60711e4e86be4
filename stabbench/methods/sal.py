"""sal: Self-Abstraction Learning (Cho, Kim, Kim, Kim, Jung; arXiv 2604.24313), our reading
(docs/methods/sal.md says what we chose and why).

A schedule of depths d_1 < ... < d_K = depth. Stage 1 trains a d_1-layer net on the task
alone; stage k trains a fresh d_k-layer net with the frozen stage k-1 net as guide:

    loss = task loss + hint_weight * mean_j MSE(h_k[pi(j)], h_{k-1}[j])
                     + output_weight * tau^2 * KL(softmax(z_{k-1}/tau) || softmax(z_k/tau))

(MSE between outputs instead of the KL on regression). pi matches each guide hidden layer
j = 1..d_{k-1} to a student layer: `top` pi(j) = d_k - d_{k-1} + j, `relative`
pi(j) = round(j d_k / d_{k-1}) (half up). The last stage's net is the run's model.

Each stage's network is built by another method (`method.base`), so SAL composes with the
architecture methods: SAL decides how a net is trained, the base how it is made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stabbench.errors import UserError, check_choice, check_range
from stabbench.methods.base import Method, MethodConfig, Shape, Stage
from stabbench.model import MLP

SCHEDULES = ("geometric", "linear")
MATCHES = ("top", "relative")
OUTPUT_LOSSES = ("auto", "kl", "mse")
# The options every method shares (MethodConfig); SAL passes each one on to its base
# unless left null, so a base keeps its own defaults (snn: selu + lecun, bsnn: orthogonal).
SHARED_OPTIONS = ("activation", "negative_slope", "init", "gain", "alpha_dropout")


@dataclass
class Config(MethodConfig):
    name: str = "sal"
    # null: the base method's own default
    activation: Optional[str] = None
    negative_slope: Optional[float] = None
    init: Optional[str] = None
    gain: Optional[float] = None
    alpha_dropout: Optional[float] = None
    base: str = "baseline"  # the method that builds each stage's network
    base_options: dict[str, Any] = field(default_factory=dict)  # the base's own options, e.g. {constraint: none}
    schedule: str = "geometric"  # geometric: 1, 2, 4, ..., depth; linear: num_stages evenly spaced depths
    num_stages: Optional[int] = None  # linear only; null: as many stages as geometric
    depths: Optional[list[int]] = None  # explicit schedule; overrides `schedule`; must end at depth
    epochs_per_stage: Optional[int] = None  # null: `epochs` for every stage
    hint_weight: float = 1.0  # lambda_h
    output_weight: float = 1.0  # lambda_o
    temperature: float = 4.0  # tau
    match: str = "top"  # top | relative
    output_loss: str = "auto"  # auto (kl for classification, mse for regression) | kl | mse
    warm_start: bool = False  # copy the guide's layers into the new net (see warm_start)


def geometric_depths(depth: int) -> list[int]:
    depths = [1]
    while depths[-1] * 2 < depth:
        depths.append(depths[-1] * 2)
    return depths + [depth] if depths[-1] != depth else depths


def linear_depths(depth: int, num_stages: int) -> list[int]:
    """num_stages depths evenly spaced up to depth: ceil(k depth / K), k = 1..K."""
    return [math.ceil(k * depth / num_stages) for k in range(1, num_stages + 1)]


def check_depths(depths, depth: int | None) -> None:
    """One-line UserError unless depths is a non-empty, strictly increasing list of positive
    depths ending at `depth` (not checked when depth is None)."""
    shown = "[" + ",".join(map(str, depths)) + "]"
    if len(depths) == 0:
        raise UserError("method.depths=[] is empty; allowed: a strictly increasing list of positive depths ending at depth")
    if any(d < 1 for d in depths):
        raise UserError(f"method.depths={shown} has a depth below 1; allowed: positive depths, strictly increasing")
    if any(b <= a for a, b in zip(depths[:-1], depths[1:])):
        raise UserError(f"method.depths={shown} is not strictly increasing; allowed: e.g. [1,2,4,...,depth]")
    if depth is not None and depths[-1] != depth:
        raise UserError(f"method.depths={shown} does not end at depth={depth}; allowed: a schedule whose last depth is depth")


def layer_match(guide_depth: int, student_depth: int, match: str) -> list[int]:
    """pi: for each guide hidden layer j = 1..d_{k-1}, the student hidden layer (1-based) it guides."""
    if match == "top":
        return [student_depth - guide_depth + j for j in range(1, guide_depth + 1)]
    # round half up, not Python's half-to-even: pi stays monotone and pi(d_{k-1}) = d_k
    return [math.floor(j * student_depth / guide_depth + 0.5) for j in range(1, guide_depth + 1)]


def base_config(cfg, name: str):
    """The base method's config: its schema (the one home of its defaults; conf/method/*.yaml
    holds none), then SAL's shared options that are set, then method.base_options."""
    from stabbench.methods import REGISTRY

    schema = OmegaConf.structured(REGISTRY[name].Config)
    layers = [schema]
    shared = {k: cfg[k] for k in SHARED_OPTIONS if cfg.get(k) is not None}
    options = OmegaConf.to_container(cfg.base_options) if isinstance(cfg.base_options, DictConfig) else dict(cfg.base_options)
    allowed = [k for k in schema if k not in ("name", *SHARED_OPTIONS)]
    for key in options:
        if key not in allowed:
            raise UserError(f"method.base_options.{key} is not an option of method.base={name}; "
                            f"allowed: {', '.join(allowed) or 'none'}")
    layers += [{"name": name}, shared, options]
    try:
        return OmegaConf.merge(*layers)
    except OmegaConfBaseException as error:
        raise UserError(f"method.base={name}: {str(error).splitlines()[0]}") from None


class Sal(Method):
    Config = Config

    def __init__(self, cfg):
        super().__init__(cfg)
        self.base = None  # the base method object, made by validate()
        self.task = None

    def validate(self) -> None:
        from stabbench.methods import REGISTRY

        cfg = self.cfg
        bases = sorted(name for name in REGISTRY if name != "sal")
        check_choice("method.base", cfg.base, bases)
        check_choice("method.schedule", cfg.schedule, SCHEDULES)
        check_choice("method.match", cfg.match, MATCHES)
        check_choice("method.output_loss", cfg.output_loss, OUTPUT_LOSSES)
        check_range("method.hint_weight", cfg.hint_weight, low=0)
        check_range("method.output_weight", cfg.output_weight, low=0)
        check_range("method.temperature", cfg.temperature, low=0, low_open=True)
        if cfg.num_stages is not None:
            check_range("method.num_stages", cfg.num_stages, low=1)
        if cfg.epochs_per_stage is not None:
            check_range("method.epochs_per_stage", cfg.epochs_per_stage, low=1)
        if cfg.depths is not None:
            check_depths(list(cfg.depths), None)
        self.base = REGISTRY[cfg.base](base_config(cfg, cfg.base))
        try:
            self.base.validate()
        except UserError as error:
            # the base names its own keys; under SAL its specific ones live in method.base_options
            message = str(error)
            for key in cfg.base_options:
                message = message.replace(f"method.{key}=", f"method.base_options.{key}=")
            raise UserError(f"{message} (method.base={cfg.base})") from None
        # plain numbers: guidance_losses runs every step, and OmegaConf lookups are slow
        self.hint_weight, self.output_weight = float(cfg.hint_weight), float(cfg.output_weight)
        self.temperature, self.output_loss = float(cfg.temperature), str(cfg.output_loss)

    def validate_run(self, cfg) -> None:
        # a bad schedule fails before any sweep point runs, and so does a stage depth the base
        # cannot build (tat: a target a shallow stage cannot reach)
        for depth in self.schedule(cfg.depth):
            self.base.validate_run(OmegaConf.merge(cfg, {"depth": depth}))

    # -- building: the base method's networks --------------------------------------
    def build(self, shape: Shape) -> MLP:
        if self.base is None:
            self.validate()
        self.task = shape.task
        return self.base.build(shape)

    def constants(self, model: MLP) -> dict:
        if self.base is None:
            self.validate()
        return {"base": self.cfg.base, **self.base.constants(model)}

    def mean_field(self, shape: Shape):
        if self.base is None:
            self.validate()
        return self.base.mean_field(shape)  # the probe draws the last stage's network: the base's

    # -- training schedule -----------------------------------------------------------
    def schedule(self, depth: int) -> list[int]:
        cfg = self.cfg
        if cfg.depths is not None:
            depths = list(cfg.depths)
        elif cfg.schedule == "geometric":
            depths = geometric_depths(depth)
        else:
            stages = cfg.num_stages if cfg.num_stages is not None else len(geometric_depths(depth))
            if stages > depth:
                raise UserError(f"method.num_stages={stages} is more than depth={depth}; allowed: 1 to depth")
            depths = linear_depths(depth, stages)
        check_depths(depths, depth)
        return depths

    def stages(self, depth: int, epochs: int) -> list[Stage]:
        epochs = self.cfg.epochs_per_stage if self.cfg.epochs_per_stage is not None else epochs
        depths = self.schedule(depth)
        return [Stage(depth=d, epochs=epochs, index=k, guided=k > 0,
                      extra={"guide_depth": depths[k - 1] if k else None,
                             "match": layer_match(depths[k - 1], d, self.cfg.match) if k else None})
                for k, d in enumerate(depths)]

    @torch.no_grad()
    def warm_start(self, student, guide, stage: Stage) -> None:
        """Net2Net-style: the student starts from the guide's weights where the layer matching
        puts them. Weight layer i maps x_{i} to h_{i+1} (layer 0 is the input layer, the last
        the output layer). Copied: the input layer (0 -> 0), the output layer, and each square
        guide layer j-1 (j = 2..d_{k-1}) into student layer pi(j)-1; so with match=top the new
        layers sit just above the input layer, with match=relative they are spread between.
        The new layers keep the base method's initialisation. Every parameter and buffer of a
        copied layer is copied (biases, the stabilizer's beta, parametrizations' originals)."""
        if not self.cfg.warm_start:
            return
        guide_depth, student_depth = stage.extra["guide_depth"], stage.depth
        pi = stage.extra["match"]
        layer_map = {0: 0, guide_depth: student_depth}
        layer_map.update({j - 1: pi[j - 1] - 1 for j in range(2, guide_depth + 1)})
        for source, target in ((guide.params, student.params), (guide.buffers, student.buffers)):
            for name, tensor in source.items():
                parts = name.split(".")
                if parts[0] == "layers" and parts[1].isdigit():
                    parts[1] = str(layer_map[int(parts[1])])
                destination = target.get(".".join(parts))
                if destination is not None and destination.shape == tensor.shape:
                    destination.copy_(tensor)

    def guidance_losses(self, student: dict, guide: dict, stage: Stage) -> dict[str, torch.Tensor]:
        if self.base is None:
            self.validate()
        terms = {}
        if self.hint_weight > 0:
            # every hidden layer is [batch, width], so the mean over j of per-layer MSEs is one MSE
            matched = torch.stack([student["hidden"][p - 1] for p in stage.extra["match"]])
            terms["hint_loss"] = self.hint_weight * F.mse_loss(matched, torch.stack(guide["hidden"]))
        if self.output_weight > 0:
            terms["output_loss"] = self.output_weight * self.output_distance(student["logits"], guide["logits"])
        return terms

    def output_distance(self, student_logits: torch.Tensor, guide_logits: torch.Tensor) -> torch.Tensor:
        kind = self.output_loss
        if kind == "auto":
            kind = "mse" if self.task == "regression" else "kl"
        if kind == "mse":
            return F.mse_loss(student_logits, guide_logits)
        tau = self.temperature
        guide_log_p = F.log_softmax(guide_logits / tau, dim=-1)
        student_log_p = F.log_softmax(student_logits / tau, dim=-1)
        # KL(guide || student), summed over classes, averaged over the batch; tau^2 keeps
        # its gradient on the scale of the task loss's (Hinton et al., distillation).
        return tau**2 * (guide_log_p.exp() * (guide_log_p - student_log_p)).sum(-1).mean()


METHOD = Sal
