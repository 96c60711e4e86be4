"""The speed path: what can be checked without a GPU (CUDA graphs need one; bench timings
are figures, not assertions)."""
from __future__ import annotations

import json
import time

import pytest
import torch

from stabbench import fast
from stabbench.errors import UserError


def test_cuda_graph_on_without_cuda_is_refused_up_front(cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = cli("run", "trainer.cuda_graph=on")
    assert code == 2 and err.strip().startswith("stabbench: error: trainer.cuda_graph=on") and "\n" not in err.strip()
    assert not (tmp_path / "results").exists()


def test_graphs_only_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not fast.graphs_enabled("auto", cpu) and not fast.graphs_enabled("off", cuda)
    assert fast.graphs_enabled("auto", cuda) and fast.graphs_enabled("on", cuda)
    with pytest.raises(UserError):
        fast.graphs_enabled("on", cpu)
    step = lambda index, record: {"index": index}
    assert fast.maybe_graphed(step, "auto", cpu) is step  # the CPU runs the plain step


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shared_input", [False, True])
def test_batched_linear_equals_vmapped_f_linear(bias, shared_input):
    """The CUDA path's batched linear (fast._VmappedLinear under vmap), run here on the CPU:
    same outputs and same gradients as vmap over F.linear, through its own backward."""
    from torch.func import vmap
    import torch.nn.functional as F

    E, B, n_in, n_out = 3, 5, 4, 6
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(B, n_in, generator=generator) if shared_input else torch.randn(E, B, n_in, generator=generator)
    grads = {}
    for name, fn in (("reference", F.linear), ("batched", fast._VmappedLinear.apply)):
        weight = torch.randn(E, n_out, n_in, generator=torch.Generator().manual_seed(1)).requires_grad_()
        b = torch.randn(E, n_out, generator=torch.Generator().manual_seed(2)).requires_grad_() if bias else None
        inputs = x.clone().requires_grad_()
        out = vmap(fn, in_dims=(None if shared_input else 0, 0, 0 if bias else None))(inputs, weight, b)
        (out * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
        grads[name] = (out.detach(), inputs.grad, weight.grad, b.grad if bias else None)
        if name == "batched":
            assert out.grad_fn.name().startswith("_BatchedLinear")
    for reference, batched in zip(grads["reference"], grads["batched"]):
        if reference is not None:
            torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-6)


def test_linear_keeps_f_linear_on_the_cpu_and_for_one_network():
    """Only CUDA tensors under vmap take the batched path; everything else is F.linear itself."""
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    out = fast.linear(x, layer.weight, layer.bias)
    assert out.grad_fn.name() == torch.nn.functional.linear(x, layer.weight, layer.bias).grad_fn.name()


def test_tf32_switch():
    fast.set_tf32(True)
    assert torch.backends.cuda.matmul.allow_tf32
    fast.set_tf32(False)
    assert not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("method", ["baseline", "bsnn", "self_stabilizer"])
def test_bench_writes_both_timings_and_their_ratio(cli, tmp_path, method):
    """bsnn and the self-stabilizer train a raw matrix behind a computed `.weight`: the
    reference loop must find the trained parameters, as the runner does."""
    code, out, err = cli("bench", f"method={method}", "device=cpu", "depth=3", "width=16", "seeds=2", "log_every=2",
                         "bench.steps=7", "bench.repeats=2", "dataset.n_train=512", "dataset.n_test=64",
                         "dataset.validation=0",
                         "hydra.run.dir=b")
    assert code == 0, err
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["shape"]["depth"] == 3 and result["shape"]["seeds"] == 2 and result["device"] == "cpu"
    # log steps 0, 2, 4, 6 (the last): the stretches 2-4 and 4-6 of each of the 2 turns
    assert result["shape"]["method"] == method and result["stretches"] == {"stabbench": 4, "reference": 4}
    assert result["steps_per_turn"] == 7 and result["steps_per_epoch"] == 4  # 512 examples, batch 128
    assert result["evaluation_ms"]["stabbench"] > 0 and result["evaluation_ms"]["reference"] > 0
    assert result["reference_ms_per_step"] > 0 and result["stabbench_ms_per_step_per_model"] > 0
    assert result["ratio"] == pytest.approx(result["reference_ms_per_step"] / result["stabbench_ms_per_step_per_model"],
                                            rel=0.01)
    assert len(result["ratio_per_repeat"]) == 2
    assert "ratio" in out


def test_the_same_bench_twice_keeps_both_results(cli, tmp_path):
    args = ("bench", "device=cpu", "depth=2", "width=8", "log_every=1", "bench.steps=3", "bench.repeats=1",
            "bench.reference=false", "dataset.n_train=256", "dataset.n_test=64")
    assert cli(*args)[0] == 0
    first = sorted((tmp_path / "results" / "bench").glob("*/bench.json"))
    time.sleep(1.1)  # run directories are named to the second
    assert cli(*args)[0] == 0
    both = sorted((tmp_path / "results" / "bench").glob("*/bench.json"))
    assert len(first) == 1 and len(both) == 2 and first[0] in both


def test_bench_refuses_turns_too_short_to_time(cli, tmp_path):
    code, _, err = cli("bench", "device=cpu", "log_every=10", "bench.steps=20")
    assert code == 2 and err.strip().startswith("stabbench: error: bench.steps=20 is too few") and "\n" not in err.strip()
    assert "at least 21 steps" in err


def test_bench_of_networks_that_diverge_at_once_is_a_clear_error(cli, tmp_path):
    code, _, err = cli("bench", "device=cpu", "method=lyapunov", "depth=10", "width=16", "lr=1e30", "log_every=2",
                       "bench.steps=7", "bench.repeats=1", "dataset.n_train=512", "dataset.n_test=64")
    assert code == 2 and "\n" not in err.strip()
    assert err.strip().startswith("stabbench: error: the bench timed no stretch of the stabbench loop") and "lr=1e+30" in err


def test_the_bench_clock_times_stretches_between_log_steps_without_the_evaluations(monkeypatch):
    import stabbench.bench as bench

    now = [1.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])

    def evaluation():
        now[0] += 0.5

    clock = bench.Clock(torch.device("cpu"), log_every=10)
    clock.mark(0)
    now[0] = 3.0
    clock.mark(10)  # the stretch from step 0 (set-up, warm-up, capture) is left out
    now[0] = 3.05
    clock.leave_out(evaluation)  # an epoch's end: 3.05 -> 3.55 is not the loop's time
    now[0] = 3.75
    clock.mark(20)  # (3.75 - 3.0 - 0.5) / 10
    now[0] = 4.05
    clock.mark(30)  # (4.05 - 3.75) / 10
    now[0] = 4.15
    clock.mark(33)  # the run's last step: a 3-step stretch with a whole log step in it, left out
    assert clock.per_step == [pytest.approx(0.025), pytest.approx(0.03)]


def test_the_bench_alternates_the_loops_and_adds_evaluation_per_epoch_step():
    from stabbench.bench import seconds_per_step, take_turns

    calls = []

    class Loop:
        def __init__(self, name, stretches, evaluation):
            self.name, self.stretches, self.evaluation_s = name, stretches, evaluation

        def __call__(self, steps):
            calls.append((self.name, steps))
            return list(self.stretches)

        def evaluation(self):
            calls.append((self.name, "evaluation"))
            return self.evaluation_s

    timings = take_turns({"a": Loop("a", [0.001, 0.003, 0.002], 0.064), "b": Loop("b", [0.01], 0.64)}, steps=30, repeats=2)
    assert calls == [("a", 2), ("a", "evaluation"), ("b", 2), ("b", "evaluation"),  # warm-up
                     ("a", 30), ("a", "evaluation"), ("b", 30), ("b", "evaluation"),
                     ("a", 30), ("a", "evaluation"), ("b", 30), ("b", "evaluation")]
    # the median stretch, plus an epoch's one evaluation shared by its 64 steps
    assert seconds_per_step(timings["a"], epoch_steps=64) == pytest.approx(0.002 + 0.001)
    assert seconds_per_step(timings["b"], epoch_steps=64, turn=1) == pytest.approx(0.01 + 0.01)


NUMPY_ACTIVATIONS = {"tanh": (fast.tanh, torch.tanh), "selu": (fast.selu, torch.nn.functional.selu),
                     "elu": (fast.elu, torch.nn.functional.elu)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(NUMPY_ACTIVATIONS))
def test_numpy_activations_match_torch_values_and_gradients(name, dtype):
    """fast.tanh / selu / elu (numpy's on the CPU) against torch's: within 2 ulp over the
    whole range (tails, zeros, infinities), on a non-contiguous view, the same gradient."""
    fast_fn, torch_fn = NUMPY_ACTIVATIONS[name]
    eps = torch.finfo(dtype).eps
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-8, 1e-3, 0.5, 9.0, -20.0, 1e4, float("inf"), float("-inf")], dtype=dtype)
    values = torch.cat([special, torch.linspace(-12, 12, 8000, dtype=dtype)])
    x = values.repeat(3, 1).T.requires_grad_()  # [N, 3]: a transposed, non-contiguous leaf
    assert not x.is_contiguous() and x.numel() >= fast.NUMPY_MIN_ELEMENTS
    reference = x.detach().clone().requires_grad_()
    out, want = fast_fn(x), torch_fn(reference)
    assert out.grad_fn.name().startswith("_Numpy")
    torch.testing.assert_close(out, want, rtol=2 * eps, atol=2 * eps)
    assert (out[:2, 0] == 0).all()  # f(+-0) = 0 exactly
    weights = torch.linspace(-1, 1, x.numel(), dtype=dtype).view(x.shape)
    (out * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=4 * eps, atol=4 * eps)
    nan = fast_fn(torch.full((fast.NUMPY_MIN_ELEMENTS,), float("nan"), dtype=dtype))
    assert nan.isnan().all()  # a diverged network's NaNs stay NaN


@pytest.mark.parametrize("name", sorted(NUMPY_ACTIVATIONS))
def test_torch_activations_inside_transforms_and_for_small_tensors(name):
    """numpy cannot see through vmap's or jacrev's wrapped tensors: there, torch's own."""
    from torch.func import jacrev, vmap

    fast_fn, torch_fn = NUMPY_ACTIVATIONS[name]
    x = torch.randn(3, fast.NUMPY_MIN_ELEMENTS)
    torch.testing.assert_close(vmap(fast_fn)(x), torch_fn(x))
    small = torch.randn(5)
    torch.testing.assert_close(jacrev(fast_fn)(small), jacrev(torch_fn)(small))
    assert fast_fn(small.requires_grad_()).grad_fn.name() == torch_fn(small).grad_fn.name()


PLAIN_NETWORKS = {  # method overrides -> a network that runs as fast.plain_mlp
    "baseline tanh": ["method=baseline"],
    "snn selu": ["method=snn"],
    "baseline elu": ["method=baseline", "method.activation=elu"],
    "baseline relu": ["method=baseline", "method.activation=relu"],
    "baseline linear": ["method=baseline", "method.activation=linear"],
    "lyapunov leaky_relu, no biases": ["method=lyapunov"],
}


def build(overrides, in_features=20, depth=5, width=64, seed=0):
    from conftest import compose
    from stabbench import methods
    from stabbench.methods.base import Shape

    torch.manual_seed(seed)
    return methods.create(compose(*overrides).method).build(Shape(in_features, 10, depth, width, "classification"))


def forward_backward(network, x, **kwargs):
    for p in network.parameters():
        p.grad = None
    out = network(x, record=True, **kwargs)
    (out["logits"] * torch.linspace(-1, 1, out["logits"].shape[-1])).sum().backward()
    return out, {name: p.grad for name, p in network.named_parameters()}


@pytest.mark.parametrize("seeds", [1, 3])
@pytest.mark.parametrize("name", sorted(PLAIN_NETWORKS))
def test_plain_mlp_gives_the_layer_by_layer_numbers(name, seeds):
    """fast.plain_mlp runs the same kernels in the same order as the layer-by-layer path
    (which keep_hidden=True takes): logits, every diagnostic and every gradient agree, for
    one network and for seeds stacked, with small and large layers (numpy's activations
    from NUMPY_MIN_ELEMENTS up, torch's below)."""
    from stabbench.ensemble import Ensemble

    ensemble = Ensemble([build(PLAIN_NETWORKS[name], seed=seed) for seed in range(seeds)])
    network = ensemble.skeleton.to_empty(device="cpu")
    params = {k: v.detach().clone().requires_grad_() for k, v in ensemble.params.items()}
    for key, tensor in params.items():  # the stacked tensors as the network's own parameters
        module, _, attr = key.rpartition(".")
        setattr(network.get_submodule(module), attr, torch.nn.Parameter(tensor[0] if seeds == 1 else tensor))
    for batch in (4, 128):  # 4 x 64 < NUMPY_MIN_ELEMENTS <= 128 x 64
        x = torch.randn(batch, 20) if seeds == 1 else torch.randn(seeds, batch, 20)
        assert network._plain_activation(x) is not None
        plain, plain_grads = forward_backward(network, x)
        assert ran_plain_mlp(plain["logits"])
        layered, layered_grads = forward_backward(network, x, keep_hidden=True)
        assert not ran_plain_mlp(layered["logits"])
        # With numpy's activation both paths take phi's gradient from its output: the same
        # numbers to the bit. torch's elu and selu take theirs from the input: ulps apart.
        tolerance = dict(rtol=0, atol=0) if batch == 128 else dict(rtol=1e-5, atol=1e-6)
        for key in plain:
            torch.testing.assert_close(plain[key], layered[key], **tolerance)
        for key in plain_grads:
            torch.testing.assert_close(plain_grads[key], layered_grads[key], **tolerance)
        with torch.no_grad():  # evaluation: the forward alone
            torch.testing.assert_close(network(x)["logits"], layered["logits"], **tolerance)
    # a gradient wanted for the input too (the first layer's input gradient is otherwise skipped)
    x = x.requires_grad_()
    plain_input_grad = torch.autograd.grad(network(x)["logits"].sum(), x)[0]
    layered_input_grad = torch.autograd.grad(network(x, keep_hidden=True)["logits"].sum(), x)[0]
    torch.testing.assert_close(plain_input_grad, layered_input_grad, rtol=0, atol=0)
    # a second derivative would miss the saved activations' history: refused, not wrong
    first = torch.autograd.grad(network(x)["logits"].square().sum(), x, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="once_differentiable"):
        first.sum().backward()


def ran_plain_mlp(output: torch.Tensor) -> bool:
    """Whether fast.plain_mlp computed `output` (one network's comes out through a squeeze)."""
    node = output.grad_fn
    if node is not None and node.name() == "SqueezeBackward1":
        node = node.next_functions[0][0]
    return node is not None and node.name() == "_PlainMLPBackward"


@pytest.mark.parametrize("overrides, why", [
    (["method=bsnn"], "normalised layers and a GPN activation"),
    (["method=self_stabilizer"], "stabilised layers"),
    (["method=baseline", "method.activation=gelu"], "gelu's gradient needs its input"),
    (["method=lyapunov", "method.negative_slope=-0.5"], "a negative slope's output hides the sign"),
    (["method=snn", "method.alpha_dropout=0.1"], "alpha dropout while training"),
])
def test_plain_mlp_is_left_to_networks_it_computes_right(overrides, why):
    network = build(overrides)
    x = torch.randn(128, 20)
    assert network._plain_activation(x) is None, why
    assert not ran_plain_mlp(network(x)["logits"])
    if "method.alpha_dropout=0.1" in overrides:
        assert network.eval()._plain_activation(x) is not None  # dropout is the identity in evaluation


def test_torch_kernels_only_switches_the_cpu_tricks_off_and_back():
    """The bench's reference loop runs under it: torch's own tanh, layer by layer."""
    network, x = build(PLAIN_NETWORKS["baseline tanh"]), torch.randn(128, 20)
    big = torch.randn(fast.NUMPY_MIN_ELEMENTS, requires_grad=True)
    with pytest.raises(RuntimeError), fast.torch_kernels_only():
        assert network._plain_activation(x) is None
        assert fast.tanh(big).grad_fn.name() == "TanhBackward0"
        raise RuntimeError  # and after an error inside, the tricks are back on
    assert network._plain_activation(x) is not None and fast.tanh(big).grad_fn.name() == "_NumpyTanhBackward"
