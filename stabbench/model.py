"""The deep MLP every method builds, and the activations they share.

Notation (docs/methods/README.md): `depth` hidden layers of `width` units; layer 1 maps the
flattened input to `width`, layers 2..depth are square, a final linear layer maps to the
outputs. `layers` holds those depth + 1 weight layers; each maps x_{l-1} to the
pre-activation h_l and exposes its effective weight matrix as `.weight`.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from stabbench import fast

ACTIVATIONS = ("tanh", "relu", "leaky_relu", "elu", "selu", "gelu", "sigmoid", "linear")


def activation_fn(name: str, negative_slope: float = 0.01):
    """The elementwise function for an activation name (plain function: cheap under vmap)."""
    table = {
        "tanh": fast.tanh,
        "relu": F.relu,
        "leaky_relu": lambda x: F.leaky_relu(x, negative_slope),
        "elu": fast.elu,
        "selu": fast.selu,
        "gelu": F.gelu,
        "sigmoid": torch.sigmoid,
        "linear": lambda x: x,
    }
    return table[name]


class Linear(nn.Linear):
    """nn.Linear computed by fast.linear: the same numbers, on stacked seeds too (a weight
    [E, out, in], x [E, batch, in]). Every method's plain layers are these."""

    stacked_seeds = True  # ensemble.runs_stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast.linear(x, self.weight, self.bias)


class Activation(nn.Module):
    """phi(x) = scale * base(x) + shift: a plain activation (1, 0) or a normalised one (BSNN's GPN)."""

    stacked_seeds = True  # elementwise

    def __init__(self, name: str, negative_slope: float = 0.01, scale: float = 1.0, shift: float = 0.0, base=None):
        super().__init__()
        self.name, self.negative_slope, self.scale, self.shift = name, negative_slope, scale, shift
        self.base = base or activation_fn(name, negative_slope)  # base: an elementwise function for `name`

    def forward(self, x):
        y = self.base(x)
        if self.scale != 1.0 or self.shift != 0.0:
            y = self.scale * y + self.shift
        return y

    def extra_repr(self):
        return f"{self.name}, scale={self.scale:.4f}, shift={self.shift:.4f}"


NORMS = ("none", "batch", "layer")


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over a [batch, width] pre-activation, or over stacked seeds [E, batch, width]
    with each seed's own statistics, running statistics [E, width] and affine parameters.
    Stacked, the seeds' channels sit side by side as E * width channels of one torch
    batch_norm call: the same kernel, per channel, as a seed alone, and the running
    statistics are updated in place through views of the stacked buffers."""

    stacked_seeds = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.ndim == 1:  # one network (or one seed under vmap): torch's own
            return super().forward(x)
        seeds, batch, width = x.shape
        if self.training:
            self.num_batches_tracked.add_(1)
        out = F.batch_norm(x.transpose(0, 1).reshape(batch, seeds * width), self.running_mean.view(-1),
                           self.running_var.view(-1), self.weight.view(-1), self.bias.view(-1),
                           self.training, self.momentum, self.eps)
        return out.view(batch, seeds, width).transpose(0, 1)


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the width of a pre-activation; on stacked seeds each seed's own gain and bias."""

    stacked_seeds = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.ndim == 1:
            return super().forward(x)
        return torch.addcmul(self.bias.unsqueeze(-2), F.layer_norm(x, self.normalized_shape, eps=self.eps),
                             self.weight.unsqueeze(-2))


def norm_layer(kind: str, width: int) -> nn.Module:
    """The normalisation `method.norm` names ("batch" or "layer") for a layer of `width` units."""
    return {"batch": BatchNorm, "layer": LayerNorm}[kind](width)


class NormalizedLayer(nn.Module):
    """A weight layer whose pre-activation is normalised (batch or layer norm) before the
    activation. `.weight` and `diagnostics()` are the weight layer's own."""

    stacked_seeds = True  # composes its parts; ensemble.runs_stacked checks them too

    def __init__(self, linear_layer: nn.Module, norm: nn.Module):
        super().__init__()
        self.linear = linear_layer
        self.norm = norm

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return self.linear.diagnostics() if hasattr(self.linear, "diagnostics") else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(x))


def normalize_hidden(layers: list[nn.Module], kind: str, width: int) -> list[nn.Module]:
    """`layers` (input layer, hidden layers, output layer) with `kind` of normalisation after
    every layer but the output layer; unchanged for kind "none"."""
    if kind == "none":
        return layers
    return [NormalizedLayer(layer, norm_layer(kind, width)) for layer in layers[:-1]] + layers[-1:]


def init_gain(activation: str, negative_slope: float = 0.01) -> float:
    """He-style gain for an activation; torch's table where it has one, sqrt(2) for elu/gelu."""
    if activation in ("elu", "gelu"):
        return math.sqrt(2.0)
    return nn.init.calculate_gain(activation, negative_slope if activation == "leaky_relu" else None)


def mean_std(values: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (n - 1) standard deviation over the last dimension, as Tensor.std computes
    them, in two plain passes: torch's CPU std (Welford) took 10.9 ms for the activations of
    depth 50, width 64, 8 seeds, this 2.0 ms, agreeing to 3e-7. `scratch`, a tensor of
    values' shape, holds the centred values (else a new one)."""
    mean = values.mean(-1, keepdim=True)
    centred = torch.sub(values, mean, out=scratch) if scratch is not None else values - mean
    return mean.squeeze(-1), torch.linalg.vector_norm(centred, dim=-1) / math.sqrt(values.shape[-1] - 1)


class MLP(nn.Module):
    """x_l = phi(layer_l(x_{l-1})) for the hidden layers, then the output layer.

    `forward` returns a dict: always `logits`; with `keep_hidden`, the list of hidden
    activations x_1..x_depth; with `record`, per-layer diagnostics as tensors of length
    depth + 1 (act_mean, act_std, weight_norm, and whatever a layer reports through its
    own `diagnostics()`, e.g. the self-stabilizer's beta). Returning tensors, never
    Python numbers, keeps the step free of host syncs and usable under torch.func.vmap.

    Called on stacked seeds (ensemble.py) every tensor has a leading seed dimension E,
    diagnostics included ([E, depth + 1]): hence the negative dimensions below.
    """

    stacked_seeds = True

    def __init__(self, layers: list[nn.Module], activation: nn.Module, dropout: nn.Module | None = None,
                 input_map: nn.Module | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.activation = activation
        self.dropout = dropout
        self.input_map = input_map  # a fixed map of each input before layer 1 (DKS's per-location normalisation)

    @property
    def depth(self) -> int:
        return len(self.layers) - 1

    def map_input(self, x: torch.Tensor) -> torch.Tensor:
        """What layer 1 sees: x after the fixed input map, if any (the probe's layer-by-layer
        passes start here too)."""
        return x if self.input_map is None else self.input_map(x)

    def forward(self, x, record: bool = False, keep_hidden: bool = False):
        x = self.map_input(x)
        plain = None if keep_hidden else self._plain_activation(x)
        if plain is not None:  # the same numbers, less autograd bookkeeping (fast.plain_mlp)
            logits, hidden = fast.plain_mlp(x, [layer.weight for layer in self.layers],
                                            [layer.bias for layer in self.layers], plain, keep_hidden=record)
        else:
            hidden = []
            for layer in self.layers[:-1]:
                x = self.activation(layer(x))
                if self.dropout is not None:
                    x = self.dropout(x)
                if keep_hidden or record:
                    hidden.append(x)
            logits = self.layers[-1](x)
        out = {"logits": logits}
        if keep_hidden:
            out["hidden"] = hidden
        if record:
            out.update(self._layer_stats(hidden, logits))
        return out

    def _plain_activation(self, x: torch.Tensor):
        """fast.in_place_activation's pair for phi when this network can run as fast.plain_mlp:
        on the CPU, outside torch.func transforms, every layer a plain Linear, phi a plain
        activation, no dropout at work, and nobody needing gradients through the hidden
        activations (keep_hidden: SAL's guidance losses). Otherwise None."""
        if not fast.CPU_TRICKS or x.device.type != "cpu" or fast.is_functorch_wrapped_tensor(x):
            return None
        if type(self.activation) is not Activation or self.activation.scale != 1.0 or self.activation.shift != 0.0:
            return None
        if self.dropout is not None and self.training:
            return None
        if any(type(layer) is not Linear for layer in self.layers) or x.ndim != self.layers[0].weight.ndim:
            return None
        return fast.in_place_activation(self.activation.name, self.activation.negative_slope)

    def _layer_stats(self, hidden: list[torch.Tensor], logits: torch.Tensor) -> dict[str, torch.Tensor]:
        # Layer by layer over each network's [batch, width]. Stacking the activations first
        # (one reduction, fewer kernel launches) copied depth x batch x width floats, 13 MB at
        # depth 50, width 64, 8 seeds, and on the CPU its fresh pages cost more than the
        # reductions; on CUDA the step is replayed as one graph, where launches cost next to nothing.
        # One scratch tensor for the centred values of every hidden layer: a fresh one per layer
        # took 86 us of page faults each on the CPU (5 us reused); a log step's forward at depth
        # 50, width 64, 8 seeds went 21 -> 12 ms.
        flat = [values.detach().flatten(-2) for values in hidden]  # diagnostics: no gradient through them
        scratch = torch.empty_like(flat[0]) if flat and not fast.is_functorch_wrapped_tensor(flat[0]) else None
        means, stds = zip(*(mean_std(values, scratch if scratch is not None and scratch.shape == values.shape else None)
                            for values in flat), mean_std(logits.detach().flatten(-2)))
        stats = {
            "act_mean": torch.stack(means, -1),
            "act_std": torch.stack(stds, -1),
            "weight_norm": torch.stack([torch.linalg.matrix_norm(layer.weight) for layer in self.layers], -1),
        }
        extras = [layer.diagnostics() if hasattr(layer, "diagnostics") else {} for layer in self.layers]
        missing = torch.full_like(logits[..., 0, 0], float("nan"))  # a layer without the column (e.g. no beta)
        for key in dict.fromkeys(k for e in extras for k in e):
            stats[key] = torch.stack([e.get(key, missing) for e in extras], -1)
        return stats

    def weight_param_names(self) -> list[str]:
        """Name (as in named_parameters) of the trained weight matrix of each of the depth + 1 layers."""
        names = []
        for index, layer in enumerate(self.layers):
            matrices = [n for n, p in layer.named_parameters() if p.ndim == 2]
            if not matrices:
                raise ValueError(f"layer {index} has no weight matrix")
            names.append(f"layers.{index}.{matrices[0]}")
        return names
