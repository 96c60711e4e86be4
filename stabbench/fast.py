"""The speed tricks, all in one place (the rest of the code is plain eager PyTorch).

At the BSNN paper's shape (depth 200, width 500, batch 128) a training step is ~1,200
small kernels: launch-bound on a GPU. Measured on one H100 before the runner was built
(docs/speed.md, ms per step per model): plain eager loop 33.5; the whole step as one CUDA graph 11.6;
plus TF32 6.7; 8 seeds batched into one model (ensemble.py) + graph 2.95; 32 seeds 1.93.
What the runner does to get there:
- data lives on the device (datasets.prepare), batches are index gathers: no DataLoader;
- static shapes: the ragged last batch of an epoch is dropped (train.py);
- no host syncs inside a step: metrics are device tensors read back at log steps only;
- seeds batched into one model (ensemble.py), so each kernel does E times the work;
- the whole step (gather, forward, backward, grad norms, optimiser) captured once as a
  CUDA graph and replayed (below), one graph for plain steps and one for log steps;
- TF32 matmuls, opt-in (trainer.tf32), since they change the numbers;
- on CUDA, batched linear layers whose weight gradient comes out in the weight's own
  layout (`linear` below): 23.9 -> 20.0 ms per step at 8 seeds (H100, fp32);
- fused SGD (train.make_optimizer): 25.9 -> 23.9 ms per step, same shape;
- on the CPU, seeds stacked without vmap (ensemble.runs_stacked): 37 -> 29 ms per step at
  depth 50, width 64, 8 seeds on the 2-core development VM;
- on the CPU, numpy's tanh, selu and elu (below): 30 -> 24 ms per step, same shape (SNN: 37 -> 30);
- on the CPU, a plain MLP's forward and backward as one autograd Function (plain_mlp,
  below): the runner's step ~23 -> ~18 ms, same shape, the same numbers to the bit;
- a stacked network bound to the stacked tensors once, called without functional_call
  (ensemble.Ensemble._bind): 0.6-0.9 ms of an 18 ms step, same shape;
- log steps: the activation statistics centre into one reused scratch tensor
  (model.MLP._layer_stats): a log step's forward 21 -> 12 ms, same shape.
`torch.compile` does not help this shape on the GPU (docs/speed.md); on the CPU it bought
~15% at depth 50, width 64, 8 seeds for 83 s of compilation. It is not used.
"""
from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch._C._functorch import is_batchedtensor, is_functorch_wrapped_tensor
from torch.autograd.function import once_differentiable

WARMUP_STEPS = 3  # eager steps on a side stream before capture, as torch.cuda.graphs requires


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def graphs_enabled(mode: str, device: torch.device) -> bool:
    """trainer.cuda_graph: auto = on for CUDA; on = required (error off CUDA); off = eager."""
    if mode == "on" and device.type != "cuda":
        from stabbench.errors import UserError

        raise UserError(f"trainer.cuda_graph=on needs device=cuda (device is {device.type}); use auto or off")
    return mode != "off" and device.type == "cuda"


def maybe_graphed(train_step, mode: str, device: torch.device):
    return GraphedStep(train_step, strict=mode == "on") if graphs_enabled(mode, device) else train_step


class GraphedStep:
    """`train_step(index, record)` replayed from a CUDA graph per value of `record`.

    The first WARMUP_STEPS calls are real training steps run eagerly on a side stream (the
    allocator and cuBLAS settle there); the next call of each kind captures its graph,
    which does not execute, so it then replays it once for that step. Inputs are copied
    into a static index buffer; the returned tensors are the graph's static outputs,
    overwritten by the next replay of the same graph (the loop reads them before that).
    If capture fails (an op that cannot be captured) the step falls back to eager with a
    warning, unless trainer.cuda_graph=on, where it is an error.
    """

    def __init__(self, train_step, strict: bool = False):
        self.train_step, self.strict = train_step, strict
        self.calls = 0
        self.graphs: dict[bool, tuple] = {}
        self.failed = False
        self.stream = torch.cuda.Stream()

    def __call__(self, index: torch.Tensor, record: bool):
        if self.failed:
            return self.train_step(index, record)
        if self.calls < WARMUP_STEPS:
            self.calls += 1
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = self.train_step(index, record)
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        if record not in self.graphs:
            try:
                self.graphs[record] = self._capture(index, record)
            except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager
                if self.strict:
                    raise
                warnings.warn(f"CUDA graph capture failed ({type(error).__name__}: {error}); training eagerly")
                self.failed = True
                self.graphs.clear()
                return self.train_step(index, record)
        graph, static_index, static_out = self.graphs[record]
        static_index.copy_(index)
        graph.replay()
        return static_out

    def _capture(self, index: torch.Tensor, record: bool):
        static_index = index.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):  # a private memory pool per graph: the two never share buffers
            static_out = self.train_step(static_index, record)
        return graph, static_index, static_out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, the one every layer calls. Seeds batched give it a weight [E, out, in]:
    called directly on the stacked tensors (ensemble.py) or, under vmap, on CUDA. Either way
    it runs as one baddbmm with its own backward, which makes the weight gradient in the
    weight's own layout: autograd's rule for x @ W^T makes it transposed and then copies it
    back, one strided copy per layer per step (16% of the step at depth 200, width 500, 8
    seeds on an H100). Under vmap on the CPU the autograd.Function's extra Python costs more
    than the copy saves, and a single network gains nothing, so both keep F.linear."""
    if weight.ndim == 3:
        return _BatchedLinear.apply(x, weight, bias)
    if weight.is_cuda and is_batchedtensor(weight):
        return _VmappedLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


# Whether the CPU tricks below (numpy's activations, plain_mlp) are on. The bench's reference
# loop turns them off (torch_kernels_only): it stands for the loop a user would write, with
# torch's own kernels, so what these buy counts on stabbench's side of the ratio.
CPU_TRICKS = True


@contextlib.contextmanager
def torch_kernels_only():
    global CPU_TRICKS
    saved, CPU_TRICKS = CPU_TRICKS, False
    try:
        yield
    finally:
        CPU_TRICKS = saved


NUMPY_MIN_ELEMENTS = 2048  # below ~1,000 elements the autograd.Function's Python costs more than it saves


def tanh(x: torch.Tensor) -> torch.Tensor:
    """torch.tanh, computed by numpy on the CPU. This torch build's CPU tanh takes 126 us for
    65,536 floats on 2 threads of the development VM, numpy's 26 us on one (torch's sigmoid:
    23 us); at depth 50, width 64, 8 seeds that was a quarter of the step. numpy's is as
    accurate: over [-20, 20] it differs from torch's by at most one float32 ulp (6e-8; 1e-16
    in float64), and the gradient is torch's own formula on that output. Inside torch.func
    transforms (vmap, jacrev: wrapped tensors numpy cannot see), on other devices and for
    small tensors, torch's own."""
    return _NumpyTanh.apply(x) if _numpy_can_take(x) else torch.tanh(x)


class _NumpyTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = torch.empty_like(x)
        np.tanh(x.detach().numpy(), out=out.numpy())
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, out)  # grad * (1 - tanh^2), as torch.tanh's backward


SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946  # torch's, the paper's


def elu(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """F.elu, computed by numpy on the CPU like `tanh`, for the same reason: torch's CPU elu
    and selu take ~320 us per 65,536 floats here (its expm1 alone 314 us), numpy's expm1
    30 us. SNN's step at depth 50, width 64, 8 seeds: 37 -> 30 ms."""
    return _NumpyELU.apply(x, alpha, 1.0) if _numpy_can_take(x) else F.elu(x, alpha)


def selu(x: torch.Tensor) -> torch.Tensor:
    """F.selu (elu with SELU's alpha, times its scale), by numpy on the CPU as `elu`."""
    return _NumpyELU.apply(x, SELU_ALPHA, SELU_SCALE) if _numpy_can_take(x) else F.selu(x)


def _numpy_can_take(x: torch.Tensor) -> bool:
    return (CPU_TRICKS and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.numel() >= NUMPY_MIN_ELEMENTS and not is_functorch_wrapped_tensor(x))


def _numpy_elu(values: np.ndarray, result: np.ndarray, alpha: float, scale: float) -> None:
    """result = scale * elu(values, alpha); result may be values itself (in place)."""
    negative = np.minimum(values, 0.0)
    np.expm1(negative, out=negative)  # exp(x) - 1 where x < 0, exactly 0 elsewhere
    np.maximum(values, 0.0, out=result)
    if scale != 1.0:
        result *= scale
    negative *= alpha * scale
    result += negative


def _elu_grad(grad: torch.Tensor, out: torch.Tensor, alpha: float, scale: float) -> torch.Tensor:
    """torch's own elu backward from the output: grad * scale where out > 0, else grad * (out + alpha * scale)."""
    return torch.ops.aten.elu_backward(grad, alpha, scale, 1.0, True, out)


class _NumpyELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha: float, scale: float):
        out = torch.empty_like(x)
        _numpy_elu(x.detach().numpy(), out.numpy(), alpha, scale)
        ctx.save_for_backward(out)
        ctx.alpha, ctx.scale = alpha, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return _elu_grad(grad, out, ctx.alpha, ctx.scale), None, None


class _VmappedLinear(torch.autograd.Function):
    """F.linear whose vmap rule calls _BatchedLinear on the stacked [E, ...] tensors."""

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):  # an unbatched call (none in the runner), for completeness
        x, weight = ctx.saved_tensors
        rows_grad, rows_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        return (grad @ weight if ctx.needs_input_grad[0] else None,
                rows_grad.T @ rows_x if ctx.needs_input_grad[1] else None,
                rows_grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias):
        def stacked(tensor, dim):  # the ensemble dimension first; a shared input is broadcast
            if tensor is None:
                return None
            return tensor.expand(info.batch_size, *tensor.shape) if dim is None else tensor.movedim(dim, 0)

        return _BatchedLinear.apply(stacked(x, in_dims[0]), stacked(weight, in_dims[1]), stacked(bias, in_dims[2])), 0


class _BatchedLinear(torch.autograd.Function):
    """x [E, B, in], weight [E, out, in], bias [E, out] or None -> [E, B, out]."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return (torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None,
                torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None,  # [E, out, in]: no copy
                grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None)


# A plain MLP on the CPU as one autograd Function: every hidden layer phi(W x + b), weights
# [E, out, in] (seeds stacked) or [out, in] (one network). The same kernels as the layer-by-layer
# path, in the same order, so the numbers are identical; what goes is autograd's bookkeeping
# around them: two Python Functions, their nodes and gradient accumulations per layer, and a
# fresh tensor per activation (phi is applied in place on W x + b, which autograd cannot do for
# a tensor it also saves). At depth 50, width 64, 8 seeds on the 2-core development VM a
# hand-written step of that network took 19.7 ms layer by layer and 16.2 ms so (4 interleaved
# runs of 200 steps); the runner's step went from ~23 to ~18 ms.
# MLP.forward uses it when every layer is a plain model.Linear and phi is one of these:
# name -> (phi applied in place, d loss / d pre-activation from d loss / d output and the output).
def _tanh_(h: torch.Tensor) -> None:
    if _numpy_can_take(h):
        np.tanh(h.numpy(), out=h.numpy())
    else:
        h.tanh_()


def _elu_(h: torch.Tensor, alpha: float, scale: float) -> None:
    if _numpy_can_take(h):
        _numpy_elu(h.numpy(), h.numpy(), alpha, scale)
    elif scale == 1.0:
        F.elu_(h, alpha)
    else:
        F.selu_(h)


IN_PLACE_ACTIVATIONS = {
    "tanh": (_tanh_, torch.ops.aten.tanh_backward),
    "selu": (lambda h: _elu_(h, SELU_ALPHA, SELU_SCALE), lambda grad, out: _elu_grad(grad, out, SELU_ALPHA, SELU_SCALE)),
    "elu": (lambda h: _elu_(h, 1.0, 1.0), lambda grad, out: _elu_grad(grad, out, 1.0, 1.0)),
    "relu": (torch.relu_, lambda grad, out: torch.ops.aten.threshold_backward(grad, out, 0)),
    "linear": (lambda h: None, lambda grad, out: grad),
}


def in_place_activation(name: str, negative_slope: float = 0.01):
    """(phi in place, its gradient from the output) for an activation, or None if there is none.
    leaky ReLU's output gives its gradient only for a positive slope (the sign must survive)."""
    if name == "leaky_relu":
        if negative_slope <= 0:
            return None
        return (lambda h: F.leaky_relu_(h, negative_slope),
                lambda grad, out: torch.ops.aten.leaky_relu_backward(grad, out, negative_slope, True))
    return IN_PLACE_ACTIVATIONS.get(name)


def plain_mlp(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
              activation, keep_hidden: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, hidden activations) of x_l = phi(W_l x_{l-1} + b_l), then the output layer;
    `activation` from in_place_activation. The hidden activations (an empty list unless
    keep_hidden) are for diagnostics: no gradient flows back through them."""
    single = weights[0].ndim == 2  # one network: run it as a stack of one
    if single:
        x = x.unsqueeze(0)
        weights = [w.unsqueeze(0) for w in weights]
        biases = [None if b is None else b.unsqueeze(0) for b in biases]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights, *biases) if t is not None):
        logits, *hidden = _PlainMLP.apply(activation, len(weights), x, *weights, *biases)
        hidden = hidden if keep_hidden else []
    else:
        logits, hidden = _plain_mlp_forward(activation[0], x, weights, biases, keep_hidden)
    if single:
        return logits.squeeze(0), [h.squeeze(0) for h in hidden]
    return logits, hidden


def _plain_mlp_forward(phi_, x, weights, biases, keep_hidden: bool = True):
    hidden = []
    for weight, bias in zip(weights[:-1], biases[:-1]):
        x = _affine(x, weight, bias)
        phi_(x)
        if keep_hidden:
            hidden.append(x)
    return _affine(x, weights[-1], biases[-1]), hidden


def _affine(x, weight, bias):
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


class _PlainMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, activation, n_layers: int, x, *params):
        weights, biases = list(params[:n_layers]), list(params[n_layers:])
        logits, hidden = _plain_mlp_forward(activation[0], x, weights, biases)
        ctx.save_for_backward(x, *hidden, *weights)
        ctx.activation, ctx.n_layers, ctx.has_bias = activation, n_layers, [b is not None for b in biases]
        ctx.mark_non_differentiable(*hidden)
        ctx.set_materialize_grads(False)  # no zero tensors for the hidden outputs' (absent) gradients
        return (logits, *hidden)

    @staticmethod
    @once_differentiable  # the hidden activations it saves carry no history: a second derivative would be wrong
    def backward(ctx, grad, *hidden_grads):
        n = ctx.n_layers
        if grad is None:  # the logits did not reach the loss
            return (None,) * (3 + 2 * n)
        saved = ctx.saved_tensors
        inputs, weights = saved[:n], saved[n:]  # inputs[l] = x_{l}, the input of layer l + 1
        phi_grad = ctx.activation[1]
        needs = ctx.needs_input_grad[2:]
        weight_grads, bias_grads = [None] * n, [None] * n
        for layer in range(n - 1, -1, -1):
            if layer < n - 1:
                grad = phi_grad(grad, inputs[layer + 1])  # through phi, from its output
            if needs[1 + layer]:
                weight_grads[layer] = torch.bmm(grad.transpose(1, 2), inputs[layer])  # [E, out, in]: no copy
            if ctx.has_bias[layer] and needs[1 + n + layer]:
                bias_grads[layer] = grad.sum(1)
            if layer > 0 or needs[0]:
                grad = torch.bmm(grad, weights[layer])
        input_grad = grad if needs[0] else None
        return (None, None, input_grad, *weight_grads, *bias_grads)
