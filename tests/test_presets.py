"""conf/experiment presets: each composes to the published setting it names."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_module

from stabbench.config import register_schemas, validate

ROOT = Path(__file__).resolve().parents[1]


def config(*overrides, hydra=False):
    register_schemas()
    with initialize_config_module(config_module="stabbench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def test_bsnn_paper_is_the_papers_real_data_setting():
    cfg = config("experiment=bsnn_paper")
    validate(cfg)
    assert cfg.method.name == "bsnn" and cfg.method.gpn and cfg.method.constraint == "rownorm"
    assert cfg.dataset.name == "mnist"
    # 200 square width-500 layers: layer 1 maps 784 -> 500, layers 2..201 are square
    assert (cfg.depth - 1, cfg.width) == (200, 500)
    assert (cfg.optimizer.name, cfg.optimizer.momentum, cfg.optimizer.nesterov) == ("sgd", 0.5, False)
    assert (cfg.batch_size, cfg.lr, cfg.epochs) == (64, 1e-4, 50)
    assert cfg.optimizer.weight_decay == 0


def test_snn_figure1_sweeps_the_three_depths():
    cfg = config("experiment=snn_figure1", hydra=True)
    assert cfg.method.name == "snn" and cfg.dataset.name == "mnist"
    assert cfg.width == 28 * 28  # width = input size
    assert (cfg.optimizer.name, cfg.optimizer.momentum, cfg.lr, cfg.batch_size) == ("sgd", 0.0, 1e-5, 128)
    assert [int(d) for d in str(cfg.hydra.sweeper.params.depth).split(",")] == [8, 16, 32]
    validate(config("experiment=snn_figure1"))


def test_lyapunov_narrow_is_narrow_deep_and_adam():
    cfg = config("experiment=lyapunov_narrow")
    validate(cfg)
    assert cfg.method.name == "lyapunov" and (cfg.depth, cfg.width) == (40, 2)
    assert cfg.optimizer.name == "adam"
    # a user's override still wins over the preset
    assert config("experiment=lyapunov_narrow", "width=3", "optimizer=sgd").width == 3


def test_preset_composes_on_the_command_line():
    done = subprocess.run([sys.executable, "-m", "stabbench.cli", "run", "experiment=lyapunov_narrow", "--cfg", "job"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "depth: 40" in done.stdout and "width: 2" in done.stdout and "name: adam" in done.stdout


def test_lyapunov_narrow_trains(tmp_path):
    from stabbench import train

    cfg = config("experiment=lyapunov_narrow", "epochs=1", "max_steps=20", "seeds=2", "device=cpu")
    summaries = train.run(cfg, tmp_path)
    assert all(not s["diverged"] and math.isfinite(s["train_loss"]) for s in summaries)
    assert json.loads((tmp_path / "summary.json").read_text())["seeds"][0]["width"] == 2


def test_bsnn_synthetic_is_the_papers_synthetic_probe():
    cfg = config("experiment=bsnn_synthetic", hydra=True)
    validate(cfg)
    assert cfg.method.name == "bsnn" and cfg.dataset.name == "synthetic"
    # 200 square 500 x 500 layers: x ~ N(0, I_500), so layer 1 is square too
    assert (cfg.depth, cfg.width, cfg.dataset.features) == (200, 500, 500)
    assert (cfg.probe.error, cfg.probe.batch_size) == ("gaussian", 500)
    params = cfg.hydra.sweeper.params
    assert str(params["method.gpn"]).split(",") == ["true", "false"] and "selu" in str(params["method.activation"])


def test_phase_diagram_is_schoenholz_et_als_setting_on_a_cpu():
    cfg = config("experiment=phase_diagram", hydra=True)
    validate(config("experiment=phase_diagram"))
    assert (cfg.method.name, cfg.method.activation, cfg.method.bias_var) == ("baseline", "tanh", 0.05)
    assert cfg.dataset.name == "fashion_mnist" and cfg.width >= 100
    assert (cfg.optimizer.name, cfg.optimizer.momentum) == ("sgd", 0.0) and cfg.max_steps == 200
    grid = [float(v) for v in str(cfg.hydra.sweeper.params["method.weight_var"]).split(",")]
    depths = [int(d) for d in str(cfg.hydra.sweeper.params.depth).split(",")]
    assert min(grid) == 1.0 and max(grid) == 4.0 and len(grid) >= 5
    assert max(depths) >= 100 and cfg.seeds >= 2
