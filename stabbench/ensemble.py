"""Several networks of one structure trained as one batched model.

Each seed's network is an ordinary nn.Module; `stack_module_state` gives every parameter
a leading dimension E (one slice per seed), and each kernel then runs all E at once: the
network is called once on the stacked tensors when every module of it computes on them
itself (`runs_stacked`, below), and through `vmap(functional_call(...))` otherwise. SGD,
momentum and Adam act elementwise, so one optimiser over the stacked tensors updates each
seed exactly as its own optimiser would; the loss is the sum of the seeds' losses, so
each slice's gradient is that seed's gradient alone. A single run is the case E = 1.
(docs/speed.md: on the GPU this is what makes the step fast.)
"""
from __future__ import annotations

import copy
from functools import partial

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils._pytree import tree_map

# torch's own modules that only hold others or act elementwise: right on stacked tensors as they are.
ELEMENTWISE_TORCH_MODULES = (nn.ModuleList, nn.Sequential, nn.Identity, nn.Dropout, nn.AlphaDropout)


def runs_stacked(network: nn.Module) -> bool:
    """Whether every module of `network` computes on stacked tensors itself: every parameter
    and input with a leading seed dimension E, each seed's slice giving that seed's result.
    A module says so with the class attribute `stacked_seeds = True` (model.Linear,
    model.Activation, model.MLP, ...). Such a network is called once on the stacked tensors:
    at depth 50, width 64, 8 seeds on the 2-core CPU a step takes 29 ms this way and 37 ms
    through vmap, whose per-op batching costs as much as the kernels at this size.
    Anything else (a torch parametrization, batch norm) goes through vmap, which is always right."""
    return all(isinstance(module, ELEMENTWISE_TORCH_MODULES) or getattr(module, "stacked_seeds", False)
               for module in network.modules())


class Ensemble:
    def __init__(self, models: list[nn.Module]):
        self.size = len(models)
        self.params, self.buffers = stack_module_state(models)
        # The structure alone: the tensors are passed in at every call (vmap, one network), or
        # bound once into `network` when it runs stacked.
        self.skeleton = copy.deepcopy(models[0]).to("meta")
        self.stacked = runs_stacked(self.skeleton)
        self.network = self._bind() if self.stacked else None

    def _bind(self) -> nn.Module:
        """A copy of the structure holding the stacked tensors themselves as its attributes,
        called directly: functional_call swaps every tensor in and out on each call, 0.6-0.9 ms
        of an 18 ms step at depth 50, width 64, 8 seeds on the CPU. The tensors are the same
        objects as in `params` and `buffers` (what the optimiser updates, load_state_dict fills)."""
        network = copy.deepcopy(self.skeleton)
        for key, tensor in {**self.params, **self.buffers}.items():
            module_name, _, attr = key.rpartition(".")
            module = network.get_submodule(module_name)
            module._parameters.pop(attr, None)
            module._buffers.pop(attr, None)
            setattr(module, attr, tensor)  # a plain attribute now, not a registered parameter
        return network

    def _call_one(self, params, buffers, x, **kwargs):
        return functional_call(self.skeleton, (params, buffers), (x,), kwargs)

    def __call__(self, x: torch.Tensor, shared_input: bool = False, **kwargs):
        """x is [E, batch, features], or [batch, features] fed to every member if shared_input."""
        if self.stacked:  # one seed too: [1, ...] tensors
            return self.network(x.expand(self.size, *x.shape) if shared_input else x, **kwargs)
        if self.size == 1:
            # One network: call it directly on its slices. vmap costs 1.4-2x at depth 200 on the CPU
            # even for E = 1, and gradients flow through the views to the stacked tensors alike.
            params = {name: tensor.squeeze(0) for name, tensor in self.params.items()}  # a view: no scatter in backward
            buffers = {name: tensor.squeeze(0) for name, tensor in self.buffers.items()}
            out = self._call_one(params, buffers, x if shared_input else x[0], **kwargs)
            return tree_map(lambda t: t.unsqueeze(0), out)
        batched = vmap(partial(self._call_one, **kwargs), in_dims=(0, 0, None if shared_input else 0),
                       randomness="different")
        return batched(self.params, self.buffers, x)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def train(self, mode: bool = True) -> "Ensemble":
        self.skeleton.train(mode)
        if self.network is not None:
            self.network.train(mode)
        return self

    def eval(self) -> "Ensemble":
        return self.train(False)

    def freeze(self) -> "Ensemble":
        for tensor in self.params.values():
            tensor.requires_grad_(False)
        return self.eval()

    def member(self, index: int, device: torch.device | str = "cpu") -> nn.Module:
        """Member `index` as an ordinary module (a copy), e.g. for inspection or a warm start."""
        model = copy.deepcopy(self.skeleton).to_empty(device=device)
        state = {name: tensor[index].detach() for name, tensor in {**self.params, **self.buffers}.items()}
        model.load_state_dict(state)
        return model.train(self.skeleton.training)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach() for name, tensor in {**self.params, **self.buffers}.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in {**self.params, **self.buffers}.items():
                tensor.copy_(state[name])
