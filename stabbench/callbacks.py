"""Hydra callbacks, registered in conf/config.yaml under `hydra.callbacks`."""
from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback


class WriteReport(Callback):
    """When a multirun ends, write `stabbench report` into `<sweep dir>/report`."""

    def on_multirun_end(self, config, config_name: str | None = None, **kwargs) -> None:
        from stabbench import report

        if config_name not in (None, "config"):  # another app (probe) sharing conf/config.yaml: no training runs
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            report.write_report([sweep_dir], sweep_dir / "report")
        except Exception as error:  # noqa: BLE001 - the runs are saved; a failed report must not hide that
            print(f"stabbench: warning: no report written ({type(error).__name__}: {error}); "
                  f"retry with: stabbench report {sweep_dir}", file=sys.stderr)
