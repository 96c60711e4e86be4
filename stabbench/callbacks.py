"""Hydra callbacks, registered in conf/config.yaml under `hydra.callbacks`."""
from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from stabbench.errors import UNWRITABLE


class WriteReport(Callback):
    """When a multirun ends, write `stabbench report` into `<sweep dir>/report`; after a
    probe sweep, the probes' comparison figure `<sweep dir>/probe_sweep.png`."""

    def on_multirun_end(self, config, config_name: str | None = None, **kwargs) -> None:
        from stabbench import report

        sweep_dir = Path(str(config.hydra.sweep.dir))
        if config_name == "probe":
            write_probe_figure(sweep_dir)
            return
        if config_name not in (None, "config"):  # another app sharing conf/config.yaml: no training runs
            return
        try:
            report.write_report([sweep_dir], sweep_dir / "report")
        except Exception as error:  # noqa: BLE001 - the runs are saved; a failed report must not hide that
            if isinstance(error, OSError) and error.errno in UNWRITABLE:
                print(f"stabbench: error: every run is saved, but no report was written: "
                      f"{UNWRITABLE[error.errno]}; make room, then: stabbench report {sweep_dir}", file=sys.stderr)
                sys.exit(1)  # a sweep without its report is not done: a script must see that
            reason = (str(error).splitlines() or [""])[0]
            print(f"stabbench: warning: no report written ({type(error).__name__}: {reason}); "
                  f"retry with: stabbench report {sweep_dir}", file=sys.stderr)


def write_probe_figure(sweep_dir: Path) -> None:
    from stabbench import report

    try:
        path = report.write_probe_sweep_figure(sweep_dir)
    except Exception as error:  # noqa: BLE001 - the probes are saved; a failed figure must not hide that
        print(f"stabbench: warning: no probe_sweep.png ({type(error).__name__}: {error})", file=sys.stderr)
        return
    if path is not None:
        print(f"wrote {path}", flush=True)
