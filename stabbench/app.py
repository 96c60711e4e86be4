"""Hydra glue shared by the subcommands that take config overrides (run, probe, bench).

Before Hydra makes any directory, every config the command line asks for (each point of
a sweep) is composed and checked, so bad input ends in one line and exit status 2 with
nothing written. Hydra's own flags (--help, --cfg job, -m, hydra.run.dir=...) pass through.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stabbench import locks
from stabbench.errors import UNWRITABLE, UserError

CONFIG_MODULE = "stabbench.conf"
GROUPS = ("method", "dataset", "optimizer", "experiment")
# With any of these Hydra prints something and runs nothing: no need to check configs.
INFO_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion")


def fail(message: str, status: int = 2) -> None:
    print(f"stabbench: error: {message}", file=sys.stderr)
    sys.exit(status)


# The errors of a full disk, a quota or a read-only file system: the environment's, not the input's.
def unwritable_message(error: OSError, out_dir: Path) -> str:
    where = f" ({error.filename})" if getattr(error, "filename", None) else ""
    return (f"cannot write into {out_dir}: {UNWRITABLE[error.errno]}{where}; every file already there is whole "
            f"(a run's last checkpoint included): make room and type the same command again to continue, "
            f"then `stabbench report <dir>` for a sweep's report")


def group_options(group: str) -> list[str]:
    from importlib.resources import files

    folder = files(CONFIG_MODULE).joinpath(group)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def group_choices() -> str:
    """The help's list of config groups: the options conf/ offers. Hydra's own list
    ($APP_CONFIG_GROUPS) also shows the structured-config schemas registered beside them
    (stabbench.config.register_schemas), which a user cannot pick."""
    return "\n".join(f"{group}: {', '.join(group_options(group))}" for group in GROUPS)


def register_help_resolver() -> None:
    """`${stabbench_choices:}` in conf/config.yaml's hydra.help.template."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("stabbench_choices", group_choices, replace=True)


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
            # Hydra lists the options between "Available options in ..." and "Config search path:"
            options = lines[1:]
            options = options[:next((i for i, l in enumerate(options) if l.startswith("Config search path")), None)]
            options = [l for l in options if not l.startswith(("Available", "Set the", "To append"))]
            parts.append(lines[0] + (f" (available: {', '.join(options)})" if "Could not find" in lines[0] else ""))
        error = error.__cause__
    return "; ".join(dict.fromkeys(parts)) or "invalid configuration"


@dataclass
class Plan:
    """What a command will write: each job's directory, and the one directory the command
    writes into as a whole (a run's, or a sweep's), None for Hydra's info flags. `default`:
    that directory's name comes from the config's template (${now:}...), not from the user."""
    dirs: list[Path] = field(default_factory=list)
    root: Path | None = None
    default: bool = False


def check_overrides(argv: list[str], config_name: str, validate: Callable) -> Plan:
    """Compose and validate each configuration the arguments describe; exit 2 on the first
    bad one. Returns what the jobs will write (see find_bad_config)."""
    try:
        return find_bad_config(argv, config_name, validate)
    except UserError as error:
        fail(str(error))


def find_bad_config(argv: list[str], config_name: str, validate: Callable) -> Plan:
    """Raise UserError for the first configuration of the arguments that is not valid;
    else return the output directory planned for each (none for Hydra's info flags)."""
    from hydra import compose, initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from stabbench.config import register_schemas

    args = parse_arguments(argv)
    if args.cfg == "hydra" and args.resolve:
        # Hydra prints the hydra node alone, whose run directory names (${method.name}, ...) point
        # into the run's config: resolving it ends in an InterpolationKeyError traceback
        raise UserError("--cfg hydra --resolve cannot resolve the hydra node on its own (its directory names "
                        "use the run's keys); allowed: --cfg hydra without --resolve, or --cfg all --resolve")
    if any(getattr(args, flag, None) for flag in INFO_FLAGS):
        return Plan()
    register_schemas()
    planned = []
    root_key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
    default = not any(o.startswith(f"{root_key}=") for o in args.overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
        for override in parsed:
            if override.key_or_group in GROUPS and not override.is_delete():
                options = group_options(override.key_or_group)
                values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
                for value in values:
                    if value not in options and value != "null":
                        raise UserError(f"{override.key_or_group}={value!r} is unknown; choose one of: {', '.join(options)}")
        if args.multirun:
            # A search space for a tuning sweeper (Optuna: lr=tag(log,interval(1e-4,1e-1))) is checked at its ends.
            parsed = [parsed_override(f"{o.get_key_element()}=choice({o.value().start},{o.value().end})")
                      if o.is_interval_sweep() else o for o in parsed]
        combos = BasicSweeper.split_arguments(parsed, None)[0] if args.multirun else [args.overrides]
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            for number, combo in enumerate(combos):
                cfg = compose(config_name=config_name, overrides=list(combo), return_hydra_config=True)
                validate(cfg)
                planned.append(planned_output_dir(cfg, args.multirun, number))
                if number == 0:
                    root = planned[0].parent if args.multirun else planned[0]
                    if args.multirun:
                        check_sweep_dir(root)
                check_output_dir(planned[-1], cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise UserError(_one_line(error)) from None
    return Plan(planned, root if planned else None, default)


def flags_first(argv: list[str]) -> list[str]:
    """`stabbench run depth=2,3 -m` as `-m depth=2,3`: Hydra's parser takes the overrides as
    one run of positional arguments, so a flag after them would leave the rest unrecognised."""
    switches = [a for a in argv if a in ("-m", "--multirun")]
    return switches + [a for a in argv if a not in switches]


def parse_arguments(argv: list[str]):
    """Hydra's command-line arguments; a malformed one is a UserError (one line), not
    argparse's usage text."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str):
        raise UserError(f"{message}; Hydra's flags go before the overrides (see --help)")

    parser.error = error
    return parser.parse_args(argv)


def parsed_override(text: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(text)


def planned_output_dir(cfg, multirun: bool, number: int) -> Path:
    """Where Hydra will put this job (its ${now:} is resolved a moment earlier: only an
    explicitly given or reused directory can already exist)."""
    from omegaconf import OmegaConf, open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.hydra.job.num = number
    if not multirun:
        return Path(OmegaConf.select(cfg, "hydra.run.dir"))
    return Path(OmegaConf.select(cfg, "hydra.sweep.dir")) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))


def is_run_dir(folder: Path) -> bool:
    """Whether `folder` is a run's (or a probe's, a bench's) own directory."""
    return any((folder / name).exists() for name in (".hydra", "summary.json", "checkpoint.pt", "metrics.csv"))


def nested_runs(folder: Path, limit: int = 20_000) -> Path | None:
    """A run or sweep directory below `folder` (not itself), if any; looks at `limit` folders at most."""
    seen = 0
    for here, dirs, files in os.walk(folder):
        here = Path(here)
        if here != folder and (is_run_dir(here) or "multirun.yaml" in files):
            return here
        dirs[:] = [d for d in dirs if d != ".hydra"]
        seen += 1
        if seen > limit:
            return None
    return None


def check_sweep_dir(sweep_dir: Path) -> None:
    """A sweep's directory is not a run's own: the sweep's runs would hide inside that run."""
    if sweep_dir.is_dir() and is_run_dir(sweep_dir):
        raise UserError(f"hydra.sweep.dir={sweep_dir} is a run's own directory; a sweep needs a directory of its own")


def check_output_dir(out_dir: Path, cfg) -> None:
    """Refuse, before Hydra writes anything there, a directory that holds another config's
    run or checkpoint, one that holds other runs or sweeps, or one that cannot be written."""
    import tempfile

    from omegaconf import OmegaConf

    from stabbench import checkpoint

    if out_dir.is_dir():
        inner = nested_runs(out_dir)
        if inner is not None:
            raise UserError(f"{out_dir} already holds other runs or sweeps (e.g. {inner}); a run needs a directory "
                            f"of its own: choose another hydra.run.dir")
    config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    checkpoint.check_run_dir(out_dir, config)
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:  # a real try, since permission bits say little to root (and nothing about /proc or a full disk)
        if not existing.is_dir():
            raise OSError
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".stabbench-write-test-"))
    except OSError:
        raise UserError(f"output directory {out_dir} cannot be written ({existing} is not a writable folder); "
                        f"set hydra.run.dir / hydra.sweep.dir to a writable place") from None


# What Hydra (and the directory's lock) puts into a job's or a sweep's directory before
# stabbench writes anything.
HYDRA_RECORDS = {".hydra", "stabbench.log", "multirun.yaml", locks.FILENAME}


def holds_results(folder: Path) -> bool:
    """Whether a run or sweep directory holds anything but Hydra's own records."""
    try:
        return bool(set(os.listdir(folder)) - HYDRA_RECORDS)
    except OSError:
        return False


def existing_ancestors(path: Path) -> list[Path]:
    """The folders of `path` (itself included) that exist now."""
    path = Path(path).absolute()
    return [folder for folder in (path, *path.parents) if folder.exists()]


def remove_made(out_dir: Path, kept: set[Path]) -> None:
    """Remove a job's directory that holds no results, then each folder above it (a sweep's
    directory, results/runs) that holds nothing else and did not exist before the command."""
    out_dir = Path(out_dir).absolute()
    shutil.rmtree(out_dir, ignore_errors=True)
    if not kept:  # nothing known of what existed before: leave the folders above alone
        return
    for folder in out_dir.parents:
        if folder in kept or holds_results(folder) or not folder.exists():
            break
        shutil.rmtree(folder, ignore_errors=True)


def previous_output_dir(argv: list[str], config_name: str) -> list[str]:
    """The same command typed again continues where it left off: if an earlier run (or
    sweep) was started with exactly these overrides, reuse its directory, so finished runs
    are skipped (skip_done) and checkpointed ones resume. Returns the override to add."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    args = parse_arguments(argv)
    if any(getattr(args, flag, None) for flag in INFO_FLAGS):
        return []
    task = sorted(o for o in args.overrides if not o.startswith(("hydra.", "hydra/", "+hydra", "~hydra")))
    if any(o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in args.overrides) or "skip_done=false" in task:
        return []
    hydra_overrides = [o for o in args.overrides if o not in task]  # where runs go depends on these alone
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=hydra_overrides, return_hydra_config=True)
    key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
    root = Path(OmegaConf.select(cfg, key)).parent
    pattern = "*/multirun.yaml" if args.multirun else "*/.hydra/overrides.yaml"
    for record in sorted(root.glob(pattern), reverse=True):  # newest first: names start with the time
        try:
            saved = OmegaConf.load(record)
            saved = saved.hydra.overrides.task if args.multirun else saved
            if sorted(OmegaConf.to_container(saved)) == task:
                folder = record.parent if args.multirun else record.parent.parent
                print(f"stabbench: continuing {folder} (same command as before)", flush=True)
                return [f"{key}={folder}"]  # the caller checks the runs there still match
        except Exception:  # an unreadable old record is simply not a match
            continue
    return []


def spread_over_gpus(hydra_config) -> None:
    """Sweep jobs running side by side on one machine with several GPUs (joblib,
    submitit_local) take GPU job.num mod count; under SLURM each job sees only its own."""
    import torch
    from hydra.types import RunMode

    if hydra_config.mode == RunMode.MULTIRUN and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(int(hydra_config.job.num) % torch.cuda.device_count())


def share_cpus(hydra_config) -> None:
    """joblib runs n_jobs processes side by side; each taking every core for its own
    threads oversubscribes the machine (measured here: 2 jobs x 2 threads on 2 cores ran
    up to 27x slower than 1 thread each). Give each job its share of the cores."""
    import os

    import torch

    n_jobs = getattr(hydra_config.launcher, "n_jobs", None) if "launcher" in hydra_config else None
    if n_jobs is None or "joblib" not in str(hydra_config.launcher.get("_target_", "")):
        return
    cores = os.cpu_count() or 1
    parallel = cores if n_jobs < 0 else min(n_jobs, cores)
    torch.set_num_threads(max(1, cores // max(parallel, 1)))


def run_hydra(argv: list[str], task: Callable, config_name: str = "config",
              validate: Callable | None = None, continue_earlier: bool = True) -> None:
    """Run `task(cfg, out_dir)` as a Hydra app over `argv` (one run or a -m sweep);
    `continue_earlier`: the same command again reuses the earlier directory."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from stabbench.config import register_schemas

    if validate is None:
        from stabbench.config import validate
    argv = flags_first(argv)
    plan = check_overrides(argv, config_name, validate)
    register_schemas()
    register_help_resolver()
    earlier = previous_output_dir(argv, config_name) if continue_earlier else []
    if earlier:
        try:
            plan = find_bad_config(argv + earlier, config_name, validate)
            argv = argv + earlier
        except UserError as error:  # e.g. stabbench's defaults changed since: keep that dir as it is
            print(f"stabbench: not continuing there ({error}); starting a new directory", flush=True)
    # Folders that exist before Hydra makes any: a failed job's cleanup stops at them.
    kept = {folder for path in plan.dirs for folder in existing_ancestors(path)}
    root = plan.root
    if root is not None:
        try:
            if plan.default:  # a name no other command holds, fixed now for Hydra to use
                root = claim_new_dir(root)
                argv = argv + [f"{'hydra.sweep.dir' if parse_arguments(argv).multirun else 'hydra.run.dir'}="
                               f"{quoted(root)}"]
            locks.acquire(root)  # refused: the directory is another live command's, and stays as it is
        except UserError as error:
            fail(str(error))
        except OSError as error:
            if error.errno in UNWRITABLE:
                fail(unwritable_message(error, root), 1)
            raise

    def job(cfg):
        """One run; what `task` returns goes back to Hydra's sweeper (a run: its selection score)."""
        from stabbench import memory

        spread_over_gpus(HydraConfig.get())
        share_cpus(HydraConfig.get())
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        fresh = not holds_results(out_dir)
        try:
            locks.acquire(out_dir)  # a sweep's job: its own directory, against a run typed into it
            validate(cfg)
            return task(cfg, out_dir)
        except UserError as error:
            if fresh:  # a directory this job just made holds nothing worth keeping
                remove_made(out_dir, kept)
            fail(str(error))
        except BaseException as error:  # noqa: BLE001 - cleaned up, then reported or raised on
            if fresh and not holds_results(out_dir):  # stopped before it wrote anything (Ctrl-C, out of memory)
                remove_made(out_dir, kept)
            if isinstance(error, OSError) and error.errno in UNWRITABLE:
                fail(unwritable_message(error, out_dir), 1)
            if isinstance(error, Exception) and memory.is_out_of_memory(error):
                fail(memory.out_of_memory_message(error))
            raise
        finally:
            if root is None or out_dir.absolute() != Path(root).absolute():
                locks.release(out_dir)

    main = hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=config_name)(job)
    sys.argv = ["stabbench", *argv]
    from hydra.errors import HydraException

    try:
        main()
    except (HydraException, ValueError) as error:  # raised by Hydra itself, outside any job (e.g. clashing flags)
        fail(_one_line(error))
    except OSError as error:  # Hydra writing its records (multirun.yaml, .hydra/) onto a full disk
        if error.errno in UNWRITABLE:
            fail(unwritable_message(error, root or Path(".")), 1)
        raise
    finally:
        if root is not None:
            made = Path(root).absolute() not in kept
            if made and Path(root).exists() and not holds_results(Path(root)):
                remove_made(Path(root), kept)  # still locked: no other command is starting there
            locks.release(root)


def claim_new_dir(path: Path) -> Path:
    """Make `path`, or `path-2`, `path-3`, ... if another command made it first: a default name
    is taken by one command only, however many start in the same microsecond."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = path if attempt == 1 else path.with_name(f"{path.name}-{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"no free directory name next to {path}")


def quoted(path: Path) -> str:
    """A path as a quoted Hydra override value (commas, spaces and = stay part of it)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"
