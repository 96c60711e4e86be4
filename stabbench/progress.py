"""Terminal output: a rich progress bar on a TTY; sparse plain lines otherwise (CI, SLURM
logs), where a redrawn bar would fill the log with control characters."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=False)
PIPE_WIDTH = 200  # a pipe or a log has no width of its own; rich would assume 80 and cut cells


def print_rich_table(table) -> None:
    """A rich table printed whole on any output. A cell wider than its column folds onto the
    next line instead of being cut with an ellipsis (a loss of 5952811 is never `5.953…`); on
    a pipe or a log it is PIPE_WIDTH columns wide; an output that cannot encode a character
    (PYTHONIOENCODING=ascii, a C locale) gets rich's ascii borders, and `?` for the rest
    (cli.main sets such an output to replace what it cannot encode)."""
    for column in table.columns:
        column.overflow = "fold"
    (console if console.is_terminal else Console(width=PIPE_WIDTH, file=sys.stdout)).print(table)


def plus_minus() -> str:
    """± where the output can show it."""
    return "±" if console.encoding.startswith("utf") else "+/-"


class TrainingProgress:
    def __init__(self, title: str, total_steps: int, plain_lines: int = 10):
        self.title, self.total = title, max(total_steps, 1)
        self.interactive = console.is_terminal
        self.start = time.perf_counter()
        self.next_line = 0
        self.line_every = max(1, self.total // plain_lines)
        if self.interactive:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                                transient=False)
            self.task = self.bar.add_task(title, total=self.total, info="")
            self.bar.start()

    def update(self, step: int, **figures) -> None:
        """Called at log steps with the latest figures (no host syncs of its own)."""
        rate = step / max(time.perf_counter() - self.start, 1e-9)
        info = "  ".join(f"{k} {v:.4g}" for k, v in figures.items() if v == v) + f"  {rate:.1f} steps/s"
        if self.interactive:
            self.bar.update(self.task, completed=step, info=info)
        elif step >= self.next_line:
            print(f"{self.title}  step {step}/{self.total}  {info}", flush=True)
            self.next_line = step + self.line_every

    def close(self) -> None:
        if self.interactive:
            self.bar.stop()
        sys.stdout.flush()
