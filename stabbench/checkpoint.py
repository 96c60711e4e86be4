"""Checkpoints and preemption.

A checkpoint is data only (tensors, numbers, strings, lists, dicts), saved with
torch.save and loaded with `weights_only=True`: opening one never runs code. It is
written like every other file, temp + rename, so a kill mid-save keeps the last good one.

Preemption: SLURM (and submitit, Hydra's SLURM launcher) warn a job with a signal before
killing it. `Preemption` notes the signal; the training loop checks the note at the next
step boundary, checkpoints, then hands the signal on to whatever handler was there before
(submitit's requeues the job) or exits with 128 + signal number.

Ctrl-C (SIGINT) is how a person stops a run, and gets the same treatment: checkpoint at
the next step boundary, one line saying how to continue, exit 130. A second Ctrl-C before
that stops at once (KeyboardInterrupt, which the command line reports in one line): the
last checkpoint written, if any, is what the same command continues from.
"""
from __future__ import annotations

import io
import json
import signal
import sys
import threading
from pathlib import Path

import torch

from stabbench.errors import UserError
from stabbench.outputs import atomic_write_bytes

FILENAME = "checkpoint.pt"
# Keys that do not change what a run computes: a rerun may differ in these and still resume / skip.
NEUTRAL_KEYS = ("skip_done", "checkpoint_every", "explode_factor")  # explode_factor: only how a summary reads


def config_key(config: dict) -> str:
    """A canonical text of the resolved config, for 'is this the same run?'."""
    return json.dumps({k: v for k, v in config.items() if k not in NEUTRAL_KEYS and k != "hydra"}, sort_keys=True)


def config_difference(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (for the error message)."""
    keys = []
    for key in sorted(set(a) | set(b)):
        if not prefix and (key in NEUTRAL_KEYS or key == "hydra"):
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += config_difference(va, vb, f"{prefix}{key}.")
        elif va != vb:
            keys.append(f"{prefix}{key}")
    return keys


def save(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# What `train.Run.save_checkpoint` writes, by type: a file of another shape is refused whole.
CHECKPOINT_FIELDS = {"config_key": str, "config": dict, "stage": int, "finished": list, "ensemble": dict,
                     "optimizer": dict, "loop": dict, "rng": torch.Tensor, "rows": dict}


def read(path: Path) -> dict:
    """The checkpoint's data (weights_only: no code runs), checked only for being a dict."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{path}: not a readable stabbench checkpoint ({type(error).__name__}); "
                        f"delete it to start the run afresh") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a stabbench checkpoint (a {type(state).__name__}); delete it to start the run afresh")
    return state


def load(path: Path) -> dict:
    """A checkpoint to resume from: every field a run saves, of its type."""
    state = read(path)
    wrong = (["a dict"] if not isinstance(state, dict) else
             [key for key, kind in CHECKPOINT_FIELDS.items() if not isinstance(state.get(key), kind)])
    if wrong or not all(isinstance(state["rows"].get(k), int) for k in ("metrics", "layers")):
        raise UserError(f"{path}: not a stabbench checkpoint of this version (wrong or missing: "
                        f"{', '.join(wrong) or 'rows'}); delete it to start the run afresh")
    return state


class Preemption:
    SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None),
                                getattr(signal, "SIGUSR2", None)) if s)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _note(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without waiting for the step to end
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def hand_over(self, where: str = "") -> None:
        """After checkpointing (`where`: which run, which step): let the previous handler act
        (requeue), or exit 128 + signum. Python's own SIGINT handler (the one that raises
        KeyboardInterrupt) is not handed the signal: the checkpoint is the clean stop."""
        signum, self.signum = self.signum, None
        previous = self.previous.get(signum)
        print(f"stabbench: caught {signal.Signals(signum).name}; checkpoint written{where}; "
              f"the same command continues from there", file=sys.stderr, flush=True)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, None)  # submitit: requeue and exit; a handler that returns lets training go on
            return
        sys.exit(128 + signum)


SUMMARY_LIMIT = 64 * 2 ** 20  # bytes; a run's summary is kilobytes, even for a grid of hundreds of members
# Files a run writes as it goes: a directory holding any of them holds (part of) a run.
RECORDS = ("metrics.csv", "layers.csv")


class UnreadableSummary(ValueError):
    """summary.json cannot be read, or is not of the shape a run writes: the reason."""


def load_summaries(path: Path) -> list[dict]:
    """The per-seed entries of a summary.json, each a dict with its config; UnreadableSummary
    (the reason, one phrase) for a file too large, not JSON, or of another shape."""
    try:
        if path.stat().st_size > SUMMARY_LIMIT:
            raise ValueError(f"larger than {SUMMARY_LIMIT // 2 ** 20} MB")
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as error:
        raise UnreadableSummary(f"unreadable ({type(error).__name__}: {str(error)[:80]})") from None
    entries = data.get("seeds") if isinstance(data, dict) and "seeds" in data else [data]
    if (not isinstance(entries, list) or not entries
            or not all(isinstance(e, dict) and isinstance(e.get("config"), dict) for e in entries)):
        raise UnreadableSummary("not a stabbench summary (expected an object with its config, or "
                                "{\"seeds\": [...]} of such objects)")
    return entries


def read_summaries(out_dir: Path) -> list[dict] | None:
    """The per-seed summaries of a complete run in out_dir; None if it has no summary.json.
    A summary that cannot be read, or is not of the shape a run writes, is a UserError naming
    it: it must not pass for an absent one (which would let another config overwrite the run)."""
    path = Path(out_dir) / "summary.json"
    if not path.exists():
        return None
    try:
        return load_summaries(path)
    except UnreadableSummary as reason:
        raise UserError(f"{path} is {reason}; delete it (or the run directory) to run there again, "
                        f"or choose another hydra.run.dir") from None


def saved_task_config(out_dir: Path) -> dict | None:
    """The config Hydra recorded in out_dir/.hydra/config.yaml, unresolved (nothing in it is
    expanded); None if there is none or it cannot be read."""
    from omegaconf import OmegaConf

    path = Path(out_dir) / ".hydra" / "config.yaml"
    try:
        if not path.is_file() or path.stat().st_size > SUMMARY_LIMIT:
            return None
        saved = OmegaConf.to_container(OmegaConf.create(path.read_text()), resolve=False)
    except Exception:  # noqa: BLE001 - an unreadable record is no evidence either way
        return None
    return saved if isinstance(saved, dict) else None


def check_run_dir(out_dir: Path, config: dict) -> list[dict] | None:
    """Before a run touches out_dir: return its summaries if it already holds a complete run
    of this config; raise UserError if it holds a run, a checkpoint or a partial run of
    another config (so nothing there is overwritten), or an unreadable summary; else None."""
    out_dir = Path(out_dir)
    summaries = read_summaries(out_dir)
    if summaries is not None:
        if config_key(summaries[0]["config"]) == config_key(config):
            return summaries
        differ = ", ".join(config_difference(summaries[0]["config"], config)[:5])
        raise UserError(f"{out_dir} holds a complete run of another config (differs in: {differ}); "
                        f"choose another hydra.run.dir / hydra.sweep.dir")
    path = out_dir / FILENAME
    if path.is_file():
        saved = read(path)
        if saved.get("config_key") != config_key(config):
            differ = ", ".join(config_difference(saved.get("config") if isinstance(saved.get("config"), dict) else {},
                                                 config)[:5])
            raise UserError(f"{out_dir} holds a checkpoint of another config (differs in: {differ}); "
                            f"choose another hydra.run.dir / hydra.sweep.dir, or delete {path}")
        return None
    if any((out_dir / name).exists() for name in RECORDS):
        # A partial run killed before its first checkpoint: its config is Hydra's record.
        saved = saved_task_config(out_dir)
        if saved is None or config_key(saved) != config_key(config):
            differ = ", ".join(config_difference(saved, config)[:5]) if saved is not None else "its config is unreadable"
            raise UserError(f"{out_dir} holds a partial run of another config (differs in: {differ}); "
                            f"choose another hydra.run.dir / hydra.sweep.dir")
    return None
