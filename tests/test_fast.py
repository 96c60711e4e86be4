"""The speed path: what can be checked without a GPU (CUDA graphs need one; bench timings
are figures, not assertions)."""
from __future__ import annotations

import json

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


def test_tf32_switch():
    fast.set_tf32(True)
    assert torch.backends.cuda.matmul.allow_tf32
    fast.set_tf32(False)
    assert not torch.backends.cuda.matmul.allow_tf32


def test_bench_writes_both_timings_and_their_ratio(cli, tmp_path):
    code, out, err = cli("bench", "device=cpu", "depth=3", "width=16", "seeds=2", "bench.steps=3", "bench.repeats=1",
                         "dataset.n_train=512", "dataset.n_test=64", "hydra.run.dir=b")
    assert code == 0, err
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["shape"]["depth"] == 3 and result["shape"]["seeds"] == 2 and result["device"] == "cpu"
    assert result["reference_ms_per_step"] > 0 and result["stabbench_ms_per_step_per_model"] > 0
    assert result["ratio"] == pytest.approx(result["reference_ms_per_step"] / result["stabbench_ms_per_step_per_model"],
                                            rel=0.01)
    assert "ratio" in out
