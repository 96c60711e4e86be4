"""Hydra glue shared by the subcommands that take config overrides (run, probe, bench).

Before Hydra makes any directory, every config the command line asks for (each point of
a sweep) is composed and checked, so bad input ends in one line and exit status 2 with
nothing written. Hydra's own flags (--help, --cfg job, -m, hydra.run.dir=...) pass through.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Callable

from stabbench.errors import UserError

CONFIG_MODULE = "stabbench.conf"
GROUPS = ("method", "dataset", "optimizer", "experiment")
# With any of these Hydra prints something and runs nothing: no need to check configs.
INFO_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion")


def fail(message: str) -> None:
    print(f"stabbench: error: {message}", file=sys.stderr)
    sys.exit(2)


def group_options(group: str) -> list[str]:
    from importlib.resources import files

    folder = files(CONFIG_MODULE).joinpath(group)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _one_line(error: BaseException) -> str:
    """The first informative line of an error and of its causes, without Hydra's hints."""
    from omegaconf.errors import OmegaConfBaseException

    parts = []
    while error is not None:
        lines = [l.strip() for l in str(error).splitlines() if l.strip()]
        if isinstance(error, OmegaConfBaseException):
            key = getattr(error, "full_key", None)
            text = lines[0] if lines else type(error).__name__
            parts.append(f"{key}: {text}" if key and key not in text else text)
        elif lines:
            available = [l for l in lines[1:] if not l.startswith(("Available", "Set the", "To append"))]
            parts.append(lines[0] + (f" (available: {', '.join(available)})" if "Could not find" in lines[0] else ""))
        error = error.__cause__
    return "; ".join(dict.fromkeys(parts)) or "invalid configuration"


def check_overrides(argv: list[str], config_name: str, validate: Callable) -> None:
    """Compose and validate each configuration the arguments describe; exit 2 on the first bad one."""
    from hydra import compose, initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from stabbench.config import register_schemas

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        raise
    if any(getattr(args, flag, None) for flag in INFO_FLAGS):
        return
    register_schemas()
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
        for override in parsed:
            if override.key_or_group in GROUPS and not override.is_delete():
                options = group_options(override.key_or_group)
                values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
                for value in values:
                    if value not in options and value != "null":
                        raise UserError(f"{override.key_or_group}={value!r} is unknown; choose one of: {', '.join(options)}")
        combos = BasicSweeper.split_arguments(parsed, None)[0] if args.multirun else [args.overrides]
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            for combo in combos:
                cfg = compose(config_name=config_name, overrides=list(combo), return_hydra_config=True)
                validate(cfg)
    except UserError as error:
        fail(str(error))
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        fail(_one_line(error))


def run_hydra(argv: list[str], task: Callable, config_name: str = "config",
              validate: Callable | None = None) -> None:
    """Run `task(cfg, out_dir)` as a Hydra app over `argv` (one run or a -m sweep)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from stabbench.config import register_schemas

    if validate is None:
        from stabbench.config import validate
    check_overrides(argv, config_name, validate)
    register_schemas()

    def job(cfg) -> None:
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        existed = {p.name for p in out_dir.iterdir()} - {".hydra", "stabbench.log"}
        try:
            validate(cfg)
            task(cfg, out_dir)
        except UserError as error:
            if not existed:  # a directory this job just made holds nothing worth keeping
                shutil.rmtree(out_dir, ignore_errors=True)
            fail(str(error))

    main = hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=config_name)(job)
    sys.argv = ["stabbench", *argv]
    main()
