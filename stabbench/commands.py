"""The subcommands that run configs through Hydra."""
from __future__ import annotations

from stabbench.app import run_hydra


def run(argv: list[str]) -> int:
    from stabbench import train, tuning

    # A run returns its selection score (tuning.run_score) to Hydra, so a sweeper plugin such as
    # Optuna's can tune any option on it (docs/tuning.md).
    run_hydra(argv, lambda cfg, out_dir: tuning.run_score(train.run(cfg, out_dir)))
    return 0


def probe(argv: list[str]) -> int:
    from stabbench import probe as signal_probe

    # conf/probe.yaml is conf/config.yaml with the outputs under results/probes/
    run_hydra(argv, lambda cfg, out_dir: signal_probe.run(cfg, out_dir), config_name="probe")
    return 0


def bench(argv: list[str]) -> int:
    from stabbench import bench as speed

    # conf/bench.yaml is conf/config.yaml with the outputs under results/bench/. Each bench is a
    # new measurement in a new directory: continuing an earlier one would overwrite its bench.json.
    run_hydra(argv, lambda cfg, out_dir: speed.run(cfg, out_dir), config_name="bench", continue_earlier=False)
    return 0
