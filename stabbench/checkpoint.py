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
NEUTRAL_KEYS = ("skip_done", "checkpoint_every")


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


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{path}: not a readable stabbench checkpoint ({type(error).__name__}); "
                        f"delete it to start the run afresh") from None


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


def read_summaries(out_dir: Path) -> list[dict] | None:
    """The per-seed summaries of a complete run in out_dir, or None."""
    path = Path(out_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data["seeds"] if isinstance(data, dict) and "seeds" in data else [data]


def check_run_dir(out_dir: Path, config: dict) -> list[dict] | None:
    """Before a run touches out_dir: return its summaries if it already holds a complete run
    of this config; raise UserError if it holds a run or checkpoint of another config (so
    nothing there is overwritten); else None."""
    out_dir = Path(out_dir)
    summaries = read_summaries(out_dir)
    if summaries is not None and summaries and "config" in summaries[0]:
        if config_key(summaries[0]["config"]) == config_key(config):
            return summaries
        differ = ", ".join(config_difference(summaries[0]["config"], config)[:5])
        raise UserError(f"{out_dir} holds a complete run of another config (differs in: {differ}); "
                        f"choose another hydra.run.dir / hydra.sweep.dir")
    path = out_dir / FILENAME
    if path.is_file():
        saved = load(path)
        if saved.get("config_key") != config_key(config):
            differ = ", ".join(config_difference(saved.get("config", {}), config)[:5])
            raise UserError(f"{out_dir} holds a checkpoint of another config (differs in: {differ}); "
                            f"choose another hydra.run.dir / hydra.sweep.dir, or delete {path}")
    return None
