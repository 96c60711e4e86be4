"""The subcommands that run configs through Hydra. Each validates every config (each
sweep point) before any directory is made: the config's own checks, then whether what
the command will allocate fits the device (stabbench/memory.py)."""
from __future__ import annotations

from stabbench.app import run_hydra


def validator(need, what: str):
    def validate(cfg) -> None:
        from stabbench import memory
        from stabbench.config import validate as validate_config

        validate_config(cfg)
        memory.check_fits(cfg, need, what)

    return validate


def run(argv: list[str]) -> int:
    from stabbench import memory, report, train, tuning

    def task(cfg, out_dir):
        summaries = train.run(cfg, out_dir)
        report.draw_run_figures(out_dir)  # training never draws: the report owns every figure
        # The run's selection score goes back to Hydra, so a sweeper plugin such as Optuna's can
        # tune any option on it (docs/tuning.md).
        return tuning.run_score(summaries)

    run_hydra(argv, task, validate=validator(memory.training, "this run"))
    return 0


def probe(argv: list[str]) -> int:
    from stabbench import memory, probe as signal_probe

    # conf/probe.yaml is conf/config.yaml with the outputs under results/probes/
    run_hydra(argv, lambda cfg, out_dir: signal_probe.run(cfg, out_dir), config_name="probe",
              validate=validator(memory.probing, "this probe"))
    return 0


def bench(argv: list[str]) -> int:
    from stabbench import bench as speed, memory

    # conf/bench.yaml is conf/config.yaml with the outputs under results/bench/. Each bench is a
    # new measurement in a new directory: continuing an earlier one would overwrite its bench.json.
    run_hydra(argv, lambda cfg, out_dir: speed.run(cfg, out_dir), config_name="bench", continue_earlier=False,
              validate=validator(memory.benching, "this bench"))
    return 0
