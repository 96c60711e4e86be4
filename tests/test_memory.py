"""The memory estimate (stabbench/memory.py): its parts against counts taken from the
networks and optimisers torch builds, a refusal in one line of what cannot fit (run, probe,
bench) before anything is written, no refusal of what fits, and an allocation that still
fails reported in one line with its directory removed."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, compose
from stabbench import memory, methods, train
from stabbench.methods.base import Shape

SMALL = [*TINY, "depth=2", "device=cpu"]


def assert_one_line(code: int, err: str, *named: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("stabbench: error: "), (code, err)
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.mark.parametrize("depth, width, features, outputs", [(1, 3, 5, 2), (4, 16, 64, 10), (7, 9, 2, 3)])
def test_parameter_count_is_the_baseline_networks(depth, width, features, outputs):
    cfg = compose("method=baseline")
    network = methods.create(cfg.method).build(Shape(features, outputs, depth, width))
    assert memory.parameters(features, outputs, depth, width) == sum(p.numel() for p in network.parameters())


@pytest.mark.parametrize("method", sorted(methods.REGISTRY))
def test_parameter_count_bounds_every_methods_network(method):
    """Counted as a plain MLP with biases: every method's network has at most that, give or
    take one vector per layer (self_stabilizer's step sizes, batch norm's affine pair)."""
    shape = Shape(12, 5, 16, 16)  # depth 16: TAT's default target is out of reach below ~10
    network = methods.create(compose(f"method={method}").method).build(shape)
    actual = sum(p.numel() for p in network.parameters())
    counted = memory.parameters(12, 5, 16, 16)
    assert abs(actual - counted) <= 2 * (shape.depth + 1) * shape.width, (actual, counted)


@pytest.mark.parametrize("optimizer, buffers", [(["optimizer=sgd"], 1), (["optimizer=sgd", "optimizer.momentum=0"], 0),
                                                (["optimizer=adam"], 2)])
def test_optimiser_state_is_what_torch_keeps(optimizer, buffers):
    cfg = compose(*SMALL, *optimizer)
    assert memory.optimizer_buffers(cfg) == buffers
    params = [torch.zeros(3, 4, requires_grad=True), torch.zeros(5, requires_grad=True)]
    opt = train.make_optimizer(cfg, params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    kept = sum(v.numel() for state in opt.state.values() for v in state.values()
               if torch.is_tensor(v) and v.numel() > 1)  # Adam's step count is a scalar
    assert kept == buffers * sum(p.numel() for p in params)


def test_estimate_parts_scale_with_members_and_shape():
    one = memory.training(compose(*SMALL, "width=32", "seeds=1"), "cpu")
    four = memory.training(compose(*SMALL, "width=32", "seeds=4"), "cpu")
    for part in ("parameters", "gradients", "optimiser state", "saved activations"):
        assert four.parts[part] == 4 * one.parts[part], part
    assert four.parts["data"] == one.parts["data"]  # one copy of the data, shared by the members
    # 512 + 128 examples of 64 float32 features and int64 labels, raw and standardised on the CPU,
    # and the teacher network that labels them (64 -> 64 -> 10)
    assert one.parts["data"] == 2 * ((512 + 128) * 64 * 4 + (512 + 128) * 8) + (64 * 64 + 64 * 10) * 4
    assert one.parts["parameters"] == 4 * memory.parameters(64, 10, 2, 32)


def test_staged_method_counts_its_guide():
    cfg = compose(*SMALL, "method=sal", "depth=4")
    estimate = memory.training(cfg, "cpu")
    assert estimate.parts["guide"] == 4 * memory.parameters(64, 10, 2, 16)  # the depth-2 stage guides depth 4


@pytest.mark.parametrize("command, args, what", [
    ("run", ["depth=2", "width=200000"], "this run"),
    ("probe", ["depth=2", "width=100000"], "this probe"),
    ("bench", ["depth=2", "width=200000"], "this bench"),
    ("run", ["dataset.n_train=1000000000000"], "this run"),
    ("run", ["dataset.teacher_width=9223372036854775808"], "this run"),  # an overflow traceback before
    ("run", ["-m", "width=8,200000"], "this run"),  # a sweep is refused before any point runs
])
def test_what_cannot_fit_is_refused_in_one_line_before_anything_is_written(cli, tmp_path, command, args, what):
    code, out, err = cli(command, *args, *[a for a in SMALL if a.split("=")[0] not in " ".join(args)])
    line = assert_one_line(code, err, what, "needs about", "parameters", "available")
    room = memory.available("cpu")[0]
    needed = float(line.split("needs about ")[1].split()[0]) * {"GB": 1e9, "TB": 1e12}[line.split("needs about ")[1].split()[1]]
    assert needed > room
    assert not (tmp_path / "results").exists()


def test_what_fits_is_not_refused():
    """The BSNN paper's shape, 8 seeds at once (about 5 GB), on this machine."""
    from stabbench.commands import validator

    cfg = compose("depth=200", "width=500", "seeds=8", "device=cpu")
    estimate = memory.training(cfg, "cpu")
    assert 4e9 < estimate.total < 7e9, estimate.describe()
    if memory.available("cpu")[0] < estimate.total:
        pytest.skip(f"this machine has {memory.available('cpu')[1]}")
    validator(memory.training, "this run")(cfg)  # no UserError


def test_refusal_against_the_room_the_device_reports(monkeypatch):
    from stabbench.errors import UserError

    cfg = compose(*SMALL, "width=64")
    need = memory.training(cfg, "cpu").total
    monkeypatch.setattr(memory, "available", lambda kind: (need, "exactly enough"))
    memory.check_fits(cfg, memory.training, "this run")
    monkeypatch.setattr(memory, "available", lambda kind: (need - 1, "one byte short"))
    with pytest.raises(UserError, match="one byte short"):
        memory.check_fits(cfg, memory.training, "this run")
    monkeypatch.setattr(memory, "available", lambda kind: None)  # unknowable: no refusal
    memory.check_fits(cfg, memory.training, "this run")


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 160000000000 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79 GiB"),
])
def test_an_allocation_that_still_fails_is_one_line_and_leaves_no_directory(cli, tmp_path, monkeypatch, error):
    def build(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "build_ensemble", build)
    code, out, err = cli("run", *SMALL)
    line = assert_one_line(code, err, "out of memory", "make it smaller")
    assert ("160000000000 bytes" in line) if "bytes" in str(error) else ("20.00 GiB" in line)
    assert "Traceback" not in out + err
    assert not (tmp_path / "results").exists()
