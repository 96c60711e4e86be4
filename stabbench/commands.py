"""The subcommands that run configs through Hydra."""
from __future__ import annotations

from stabbench.app import run_hydra


def run(argv: list[str]) -> int:
    from stabbench import train

    run_hydra(argv, lambda cfg, out_dir: train.run(cfg, out_dir))
    return 0
